"""One settings model: service options from `ETCD_AUTODEFRAG_*` env vars, clusters from a YAML file.

Precedence, highest first: command-line flags, environment, the YAML file, defaults. Every model
forbids unknown keys, so a typo in the config is an error at start-up and never silently ignored.
"""

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from exporter.rule import RuleSyntaxError, parse_rule

ENV_PREFIX = "ETCD_AUTODEFRAG_"
DEFAULT_CLUSTER_NAME = "local"
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_LISTEN_HOST = "127.0.0.1"
# 9479: clear of etcd's own 2379 (client), 2380 (peer) and 2381 (kubeadm metrics) ports.
DEFAULT_LISTEN_PORT = 9479
# Names end up in Kubernetes object names and label values (`etcd-defrag-<name>`, at most 63 chars).
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_MAX = 40

PositiveSeconds = Annotated[float, Field(gt=0)]
Ratio = Annotated[float, Field(ge=0, le=1)]


class ConfigError(Exception):
    """The configuration cannot be used; the message says which field and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class TlsConfig(_Model):
    """Client TLS for one cluster. Paths are read when the cluster is first contacted."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = Field(
        default=None, description="TLS server name to verify when endpoints are IP addresses."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        return self


class Thresholds(_Model):
    """Structured defrag rule; unset parts do not constrain.

    A member is defragmented when it is at least `min_db_size_bytes` big, has at least
    `min_free_bytes` to reclaim, and is either fragmented by `min_fragmentation_ratio` or
    above `quota_usage_above` of its quota.
    """

    min_free_bytes: ByteSize | None = None
    min_fragmentation_ratio: Ratio | None = None
    quota_usage_above: Ratio | None = None
    min_db_size_bytes: ByteSize | None = None


# The default: reclaim at least 100 MiB (the floor the upstream etcd fragmentation alert needed to
# stop being noisy) from a member that is half empty or closing in on its quota.
DEFAULT_THRESHOLDS = Thresholds(
    min_free_bytes=ByteSize(100 * 1024 * 1024),
    min_fragmentation_ratio=0.5,
    quota_usage_above=0.8,
)


class KubernetesTarget(_Model):
    """Where and how this cluster's defrag Job runs on Kubernetes (owned by exporter/jobs.py, kube.py)."""


class AlertRouting(_Model):
    """Which Alertmanager alerts belong to this cluster (owned by exporter/routing.py)."""


class ClusterConfig(_Model):
    """One etcd cluster we watch and may defragment."""

    name: str
    endpoints: list[str] = Field(min_length=1)
    discover_members: bool = Field(
        default=True, description="Find the other members from the member list of the endpoints."
    )
    tls: TlsConfig | None = None
    rule: str | None = Field(default=None, description="Expression in etcd-defrag's syntax.")
    thresholds: Thresholds | None = None
    quota_bytes: ByteSize | None = Field(
        default=None, description="Used only when a member reports no quota of its own."
    )
    request_timeout_seconds: PositiveSeconds = 5.0
    member_timeout_seconds: PositiveSeconds = 300.0
    health_timeout_seconds: PositiveSeconds = 60.0
    deadline_seconds: PositiveSeconds = 1800.0
    compact: bool = False
    move_leader: bool = False
    continue_on_error: bool = False
    disarm_below_ratio: Annotated[float, Field(gt=0, le=1)] = 0.9
    paused: bool = False
    alerts: AlertRouting = Field(default_factory=AlertRouting)
    kubernetes: KubernetesTarget | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if len(name) > _NAME_MAX or not _NAME.match(name):
            raise ValueError(
                f"must be lowercase letters, digits and '-', start and end with a letter or digit, "
                f"at most {_NAME_MAX} characters (it names Kubernetes objects); got {name!r}"
            )
        return name

    @field_validator("endpoints")
    @classmethod
    def _valid_endpoints(cls, endpoints: list[str]) -> list[str]:
        for endpoint in endpoints:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"{endpoint!r} is not a client URL like https://10.0.0.1:2379 (scheme http or https)"
                )
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise ValueError(f"{endpoint!r}: {exc}") from None
            if parts.path not in ("", "/") or parts.query:
                raise ValueError(f"{endpoint!r} must not have a path or query")
        return [e.rstrip("/") for e in endpoints]

    @field_validator("rule")
    @classmethod
    def _valid_rule(cls, rule: str | None) -> str | None:
        if rule is not None:
            try:
                parse_rule(rule)
            except RuleSyntaxError as exc:
                raise ValueError(str(exc)) from None
        return rule

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.rule is not None and self.thresholds is not None:
            raise ValueError("set either 'rule' or 'thresholds', not both")
        https = [e for e in self.endpoints if e.startswith("https://")]
        if self.tls is not None and len(https) != len(self.endpoints):
            plain = next(e for e in self.endpoints if not e.startswith("https://"))
            raise ValueError(f"tls is configured but endpoint {plain!r} is plain http")
        if self.member_timeout_seconds > self.deadline_seconds:
            raise ValueError("member_timeout_seconds must not exceed deadline_seconds")
        return self


class WebhookSettings(_Model):
    """The Alertmanager webhook: authentication, limits, which alerts act (owned by exporter/webhook.py)."""


class ExecutorSettings(_Model):
    """How a launched defrag runs: a Kubernetes Job or a local subprocess (owned by exporter/executors.py)."""


class Settings(BaseSettings):
    """Everything the service and the CLI read at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    file_data: ClassVar[dict[str, Any]] = {}

    log_format: LogFormat = LogFormat.TEXT
    log_level: str = "INFO"
    clusters: list[ClusterConfig] = Field(default_factory=list)

    # --- the service (`etcd-autodefrag serve`) ---
    listen_address: str = Field(
        default=f"{DEFAULT_LISTEN_HOST}:{DEFAULT_LISTEN_PORT}",
        description="host:port for /metrics, /healthz, /readyz and the webhook.",
    )
    scrape_budget_seconds: PositiveSeconds = Field(
        default=4.0, description="Longest a scrape waits for fresh data; keep it below scrape_timeout."
    )
    min_refresh_interval_seconds: Annotated[float, Field(ge=0)] = Field(
        default=0.0,
        description="Scrapes closer together reuse the last snapshot (concurrent ones always share).",
    )
    background_refresh_seconds: PositiveSeconds = Field(
        default=30.0, description="Refresh at least this often even when nobody scrapes."
    )
    member_list_refresh_seconds: PositiveSeconds = 60.0
    max_concurrent_requests: Annotated[int, Field(ge=1, le=10_000)] = 64
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)

    @field_validator("listen_address")
    @classmethod
    def _valid_listen(cls, address: str) -> str:
        split_listen_address(address)
        return address

    @property
    def listen_host(self) -> str:
        """Host part of listen_address."""
        return split_listen_address(self.listen_address)[0]

    @property
    def listen_port(self) -> int:
        """Port part of listen_address."""
        return split_listen_address(self.listen_address)[1]

    @field_validator("log_level")
    @classmethod
    def _valid_level(cls, level: str) -> str:
        level = level.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"must be one of DEBUG, INFO, WARNING, ERROR; got {level!r}")
        return level

    @field_validator("clusters")
    @classmethod
    def _unique_names(cls, clusters: list[ClusterConfig]) -> list[ClusterConfig]:
        seen: set[str] = set()
        for cluster in clusters:
            if cluster.name in seen:
                raise ValueError(f"cluster name {cluster.name!r} appears twice")
            seen.add(cluster.name)
        return clusters

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls, cls.file_data)

    def cluster(self, name: str) -> ClusterConfig:
        """The configured cluster of that name, or a ConfigError listing the known ones."""
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        known = ", ".join(c.name for c in self.clusters) or "none"
        raise ConfigError(f"cluster {name!r} is not in the configuration (configured: {known})")


def split_listen_address(address: str) -> tuple[str, int]:
    """("0.0.0.0", 9479) from "0.0.0.0:9479"; IPv6 as "[::1]:9479"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port with a port from 1 to 65535; got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def default_cluster() -> ClusterConfig:
    """The cluster used when nothing is configured: one local member on etcd's default port."""
    return ClusterConfig(name=DEFAULT_CLUSTER_NAME, endpoints=[DEFAULT_ENDPOINT])


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from env and the optional YAML file; raises ConfigError with readable messages."""
    data = _read_yaml(config_file) if config_file is not None else {}
    settings_cls = type("FileSettings", (Settings,), {"file_data": data})
    try:
        return settings_cls(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=config_file)) from None


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's top-level mapping, below env vars in precedence."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping; a plain message for a missing, unreadable or non-mapping YAML file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping with a 'clusters' list")
    return data


def format_validation_error(exc: ValidationError, *, source: Path | None = None) -> str:
    """One line per problem: `clusters[0].rule: <what is wrong>`."""
    lines = [f"invalid configuration{f' in {source}' if source else ''}:"]
    for error in exc.errors():
        location = ""
        for part in error["loc"]:
            location += f"[{part}]" if isinstance(part, int) else f".{part}" if location else part
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling)"
        lines.append(f"  {location or '(top level)'}: {message}")
    return "\n".join(lines)
