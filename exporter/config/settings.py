"""One settings model: service options from `ETCD_AUTODEFRAG_*` env vars, clusters from a YAML file.

Precedence, highest first: command-line flags, environment, the YAML file, defaults. Every model
forbids unknown keys, so a typo in the config is an error at start-up and never silently ignored.
"""

import difflib
import io
import json
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from exporter.core.matchers import MatcherSyntaxError, parse_matcher
from exporter.core.names import is_dns_label, is_dns_subdomain
from exporter.core.rule import RuleSyntaxError, parse_rule
from exporter.core.units import BYTE_SIZE_HELP, parse_byte_size
from exporter.kubernetes import variants as _variants
from exporter.kubernetes.kamaji import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_CLUSTER_DOMAIN,
    ClientSecrets,
    SecretLayout,
    client_secrets,
)
from exporter.kubernetes.variants import Members, TlsSource, Variant, spec_of, variants_where

ENV_PREFIX = "ETCD_AUTODEFRAG_"
DEFAULT_CLUSTER_NAME = "local"
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_LISTEN_HOST = "127.0.0.1"
# 9479: clear of etcd's own 2379 (client), 2380 (peer) and 2381 (kubeadm metrics) ports.
DEFAULT_LISTEN_PORT = 9479
# Names end up in Kubernetes object names and label values (`etcd-defrag-<name>`, at most 63 chars).
_NAME_MAX = 40

# A rolling update restarts one member after the other: kamaji-etcd's StatefulSet waits for each Pod to
# be Ready (etcd's /readyz, or its /health probe every 10 s) before the next, so a member that started
# within the last 3 minutes says the rollout may still be going, and a freshly restarted member may
# still be catching up with the leader's log (a snapshot transfer of a large database takes minutes).
# kubeadm upgrades restart one control-plane node at a time with a similar cadence. Short enough that
# an alert that keeps firing (`for: 10m`, re-sent every repeat_interval) runs soon after a rollout.
DEFAULT_SETTLE_SECONDS = 180.0

# No duration here needs to be longer than a year; a bound also keeps `1e300` out of asyncio's
# timeouts and etcd's lease TTL, where it would fail late (OverflowError, a Go unmarshal error).
MAX_SECONDS = 365 * 24 * 3600
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

ByteCount = Annotated[int, BeforeValidator(parse_byte_size)]


def checked_matchers(matchers: list[str]) -> list[str]:
    """The matchers unchanged if every one parses in Alertmanager syntax, else a ValueError saying why."""

    for text in matchers:
        try:
            parse_matcher(text)
        except MatcherSyntaxError as exc:
            raise ValueError(str(exc)) from None
    return matchers


class ConfigError(Exception):
    """The configuration cannot be used; the message says which field and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class TlsConfig(_Model):
    """Client TLS for one cluster. Paths are read when the cluster is first contacted."""

    ca_file: Path | None = Field(
        default=None, description="PEM file of the CA that signed the members' server certificates."
    )
    cert_file: Path | None = Field(
        default=None, description="PEM client certificate (etcd `--client-cert-auth`); with `key_file`."
    )
    key_file: Path | None = Field(default=None, description="PEM private key of `cert_file`.")
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

    min_free_bytes: ByteCount | None = Field(
        default=None, description="Defrag a member with at least this much free space (`dbSizeFree`)."
    )
    min_fragmentation_ratio: Ratio | None = Field(
        default=None, description="... and at least this share of its file free (`dbSizeFree / dbSize`)."
    )
    quota_usage_above: Ratio | None = Field(
        default=None, description="... or a file above this share of the quota (`dbQuotaUsage`)."
    )
    min_db_size_bytes: ByteCount | None = Field(
        default=None, description="Never defrag a file smaller than this."
    )


# The default: reclaim at least 100 MiB (the floor the upstream etcd fragmentation alert needed to
# stop being noisy) from a member that is half empty or closing in on its quota.
DEFAULT_THRESHOLDS = Thresholds(
    min_free_bytes=100 * 1024 * 1024,
    min_fragmentation_ratio=0.5,
    quota_usage_above=0.8,
)


class KubernetesTarget(_Model):
    """Where and how this cluster's defrag Job runs on Kubernetes.

    Whatever the variant, the Job finds the etcd client TLS files at one fixed place,
    `/etc/etcd-autodefrag/tls/{ca.crt,tls.crt,tls.key}`, and passes them with `--cacert/--cert/--key`,
    which override the cluster's `tls` paths: the cluster the Job is handed (docs/run-handoff.md)
    may keep the paths the service itself uses.

    Where the files come from:
    - kamaji: the kamaji-etcd chart's Secrets, by `secret_layout` (exporter/kubernetes/kamaji.py):
      self-signed,
      key `ca.crt` of `<etcd_name>-certs` and `tls.crt`/`tls.key` of `<etcd_name>-root-client-certs`;
      cert-manager, all three of `<etcd_name>-client-certs`; auto, whichever the StatefulSet mounts.
    - talos, plain: one Secret `tls_secret`; `ca_key`, `cert_key`, `key_key` name its keys (Talos-style
      `ca`/`crt`/`key` by default; for a cert-manager or `kubernetes.io/tls` Secret set `ca.crt`,
      `tls.crt`, `tls.key`). `cert_key` and `key_key` null: server-side TLS only, no client certificate.
    - kubeadm: the control-plane node's `/etc/kubernetes/pki/etcd/{ca.crt,healthcheck-client.crt,
      healthcheck-client.key}` (hostPath; the pod runs on a control-plane node, on the host network).
    """

    # What each variant means lives in exporter/kubernetes/variants.py; the name is kept here too.
    Variant: ClassVar[type[Variant]] = Variant

    # Keys we set ourselves: the Job watch selects on them, so a user value would hide the Job.
    RESERVED_LABELS: ClassVar[frozenset[str]] = frozenset(
        {"app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/managed-by"}
    )
    RESERVED_PREFIX: ClassVar[str] = "etcd-autodefrag.io/"
    # Kubernetes' own syntax rules (apimachinery validation), so a typo fails at start-up, not at launch.
    _SECRET_KEY: ClassVar[re.Pattern[str]] = re.compile(r"^[-._a-zA-Z0-9]+$")
    _QUALIFIED_NAME: ClassVar[re.Pattern[str]] = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
    _LABEL_VALUE: ClassVar[re.Pattern[str]] = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    _QUANTITY: ClassVar[re.Pattern[str]] = re.compile(
        r"^\+?[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
    )

    namespace: str = Field(description="Namespace the Job runs in (its Secrets live there).")
    variant: _variants.Variant = Field(
        default=_variants.Variant.PLAIN,
        description="How etcd is run: plain, talos, kamaji or kubeadm (where the TLS and members come from).",
    )
    image: str | None = Field(default=None, description="Overrides the service-wide Job image.")
    config_map: str = Field(
        default="etcd-autodefrag",
        description="Ignored (kept so that old configs load): a Job is handed its cluster in its args "
        "and reads no ConfigMap (docs/run-handoff.md).",
    )
    etcd_name: str | None = Field(default=None, description="kamaji: name of the etcd StatefulSet.")
    discover_endpoints: bool = Field(
        default=False,
        description="kamaji, kubeadm: read the members' client URLs from the Kubernetes API (the "
        "StatefulSet's replicas, or kubeadm's etcd static pods) instead of `endpoints`.",
    )
    etcd_service: str | None = Field(
        default=None, description="kamaji: the headless Service of the StatefulSet (default: etcd_name)."
    )
    secret_layout: SecretLayout = Field(
        default=SecretLayout.AUTO,
        description="kamaji: where the chart keeps the client certificate: self-signed "
        "(<etcd_name>-certs, <etcd_name>-root-client-certs), cert-manager (<etcd_name>-client-certs), "
        "or auto: whichever the StatefulSet mounts, read when the service starts (docs/kamaji.md).",
    )
    cluster_domain: str = Field(
        default=DEFAULT_CLUSTER_DOMAIN,
        description="kamaji, discover_endpoints: the cluster's DNS domain (the chart's clusterDomain).",
    )
    client_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=DEFAULT_CLIENT_PORT,
        description="kamaji, discover_endpoints: the members' client port (the chart's clientPort).",
    )
    tls_secret: str | None = Field(default=None, description="talos, plain: Secret with the client TLS.")
    ca_secret: str | None = Field(
        default=None, description="talos, plain: the Secret holding ca_key, when not tls_secret."
    )
    ca_key: str = Field(
        default="ca", description="talos, plain: key of the CA certificate in `tls_secret` (or `ca_secret`)."
    )
    cert_key: str | None = Field(
        default="crt", description="talos, plain: key of the client certificate in `tls_secret`."
    )
    key_key: str | None = Field(
        default="key", description="talos, plain: key of the client key in `tls_secret`."
    )
    cooldown_seconds: Annotated[int, Field(ge=0, le=MAX_SECONDS)] | None = Field(
        default=None,
        description="ttlSecondsAfterFinished: no new Job for this cluster until the finished one is "
        "removed. Default: the service-wide executor.cooldown_seconds.",
    )
    active_deadline_seconds: Annotated[int, Field(gt=0, le=MAX_SECONDS)] | None = Field(
        default=None, description="Kubernetes stops the Job after this long; default deadline_seconds + 120."
    )
    service_account: str | None = Field(
        default=None, description="The Job needs no API access: its token is never mounted."
    )
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        description="The defrag container's resources (requests, limits), as in a Pod spec.",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on the Job and its Pod.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the Job and its Pod."
    )

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, namespace: str) -> str:
        if not is_dns_label(namespace):
            raise ValueError(f"must be a DNS label (lowercase letters, digits, '-'); got {namespace!r}")
        return namespace

    @field_validator("config_map", "etcd_name", "tls_secret", "ca_secret", "service_account")
    @classmethod
    def _valid_object_name(cls, name: str | None) -> str | None:
        if name is not None and not is_dns_subdomain(name, max_chars=200):
            raise ValueError(f"must be a Kubernetes object name (lowercase, digits, '-', '.'); got {name!r}")
        return name

    @field_validator("cluster_domain")
    @classmethod
    def _valid_domain(cls, domain: str) -> str:
        if not is_dns_subdomain(domain):
            raise ValueError(f"must be a DNS domain like cluster.local; got {domain!r}")
        return domain

    @field_validator("ca_key", "cert_key", "key_key")
    @classmethod
    def _valid_secret_key(cls, key: str | None) -> str | None:
        if key is not None and (len(key) > 253 or not cls._SECRET_KEY.match(key)):
            raise ValueError(f"must be a Secret key (letters, digits, '-', '_', '.'); got {key!r}")
        return key

    @field_validator("image")
    @classmethod
    def _valid_image(cls, image: str | None) -> str | None:
        if image is not None and (not image or any(c.isspace() for c in image)):
            raise ValueError(f"must be an image reference without spaces; got {image!r}")
        return image

    @field_validator("resources")
    @classmethod
    def _valid_quantities(cls, resources: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for kind, amounts in resources.items():
            if kind not in ("requests", "limits"):
                raise ValueError(f"{kind!r}: only requests and limits can be set")
            for name, quantity in amounts.items():
                if not cls._QUANTITY.match(str(quantity)):
                    raise ValueError(f"{kind}.{name}: {quantity!r} is not a quantity like 100m, 64Mi or 1")
        return resources

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            cls._check_key(key)
            if len(value) > 63 or not cls._LABEL_VALUE.match(value):
                raise ValueError(
                    f"label {key}: {value!r} is not a label value (at most 63 of [A-Za-z0-9._-])"
                )
        return labels

    @field_validator("annotations")
    @classmethod
    def _valid_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key in annotations:
            cls._check_key(key)
        return annotations

    @classmethod
    def _check_key(cls, key: str) -> None:
        prefix, _, name = key.rpartition("/")
        if (prefix and not is_dns_subdomain(prefix)) or len(name) > 63 or not cls._QUALIFIED_NAME.match(name):
            raise ValueError(f"{key!r} is not a label or annotation key like example.com/name")
        if key in cls.RESERVED_LABELS or key.startswith(cls.RESERVED_PREFIX):
            raise ValueError(f"{key!r} is set by etcd-autodefrag itself")

    @model_validator(mode="after")
    def _variant_fields(self) -> Self:
        variant = self.variant
        spec = spec_of(variant)
        statefulset = spec.members is Members.STATEFULSET  # the kamaji-etcd fields name it
        kamaji_etcd = variants_where(lambda s: s.members is Members.STATEFULSET)
        if statefulset and self.etcd_name is None:
            raise ValueError(
                f"variant {variant.value} needs etcd_name (the etcd StatefulSet, e.g. kamaji-etcd)"
            )
        if not statefulset and self.etcd_name is not None:
            raise ValueError(f"etcd_name is only used by {kamaji_etcd}, not {variant.value}")
        if spec.tls is not TlsSource.TLS_SECRET and self.tls_secret is not None:
            which = variants_where(lambda s: s.tls is TlsSource.TLS_SECRET)
            raise ValueError(f"tls_secret is only used by {which}, not {variant.value}")
        if (self.cert_key is None) != (self.key_key is None):
            raise ValueError("cert_key and key_key must both be set or both be null")
        if self.ca_secret is not None and self.tls_secret is None:
            raise ValueError("ca_secret is used with tls_secret (variants talos and plain)")
        if self.discover_endpoints and not spec.discovers_endpoints:
            which = variants_where(lambda s: s.discovers_endpoints)
            raise ValueError(f"discover_endpoints works with {which}, not {variant.value}: give endpoints")
        if self.etcd_service is not None and not statefulset:
            raise ValueError(f"etcd_service is only used by {kamaji_etcd}, not {variant.value}")
        kamaji_only = {
            "secret_layout": spec.tls is not TlsSource.KAMAJI_SECRETS
            and self.secret_layout is not SecretLayout.AUTO,
            "cluster_domain": not statefulset and self.cluster_domain != DEFAULT_CLUSTER_DOMAIN,
            "client_port": not statefulset and self.client_port != DEFAULT_CLIENT_PORT,
        }
        if given := [k for k, v in kamaji_only.items() if v]:
            raise ValueError(f"{', '.join(given)}: only used by {kamaji_etcd}, not {variant.value}")
        return self

    @property
    def kamaji_secrets(self) -> ClientSecrets:
        """kamaji: the Secrets a defrag Pod mounts; ValueError while secret_layout is still auto."""
        if spec_of(self.variant).tls is not TlsSource.KAMAJI_SECRETS or self.etcd_name is None:
            raise ValueError(f"variant {self.variant.value} has no kamaji-etcd Secrets")
        return client_secrets(self.secret_layout, self.etcd_name)

    def problems(self, *, endpoints: list[str], deadline_seconds: float) -> list[str]:
        """What makes this target unusable for a cluster with these endpoints and deadline ([] = fine)."""
        found = []
        plain = [e for e in endpoints if not e.startswith("https://")]
        needs_tls = spec_of(self.variant).tls.always_mounted or self.tls_secret
        if needs_tls and plain:
            what = f"variant {self.variant.value}" if not self.tls_secret else "kubernetes.tls_secret"
            found.append(f"{what} mounts client TLS, but endpoint {plain[0]!r} is plain http")
        if not needs_tls and len(plain) < len(endpoints):
            found.append(
                f"kubernetes.tls_secret is required: the endpoints use https and variant "
                f"{self.variant.value} reads the client certificate from that Secret"
            )
        if self.active_deadline_seconds is not None and self.active_deadline_seconds <= deadline_seconds:
            found.append(
                f"kubernetes.active_deadline_seconds ({self.active_deadline_seconds}) must exceed "
                f"deadline_seconds ({deadline_seconds:g}), or Kubernetes stops the run before it can report"
            )
        return found


class AlertRouting(_Model):
    """Which Alertmanager alerts belong to this cluster.

    An alert belongs to the cluster when its labels match every matcher (Alertmanager syntax:
    `name="v"`, `name!="v"`, `name=~"re"`, `name!~"re"`, regexes anchored). Without matchers:
    `etcd_cluster="<cluster name>"`. In YAML `alerts:` may also be the bare list of matchers.
    """

    matchers: list[str] = Field(
        default_factory=list,
        description="""Label matchers, e.g. ['job="kube-etcd"'] or ['namespace="a"', 'service="a-etcd"'].""",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        return {"matchers": data} if isinstance(data, list) else data

    @field_validator("matchers")
    @classmethod
    def _valid_matchers(cls, matchers: list[str]) -> list[str]:
        return checked_matchers(matchers)


class ClusterConfig(_Model):
    """One etcd cluster we watch and may defragment."""

    name: str = Field(
        description="Lowercase DNS label of at most 40 characters: the metrics' `etcd_cluster` label and "
        "the Job's name."
    )
    endpoints: list[str] = Field(
        default_factory=list,
        description="Client URLs of one or more members; empty only with kubernetes.discover_endpoints.",
    )
    discover_members: bool = Field(
        default=True,
        description="true: observe and defragment every member of the endpoints' member list. false: only "
        "the members behind `endpoints`, each through its configured URL (matched by the member id it "
        "reports, so a proxy works); the safety gates still count every voting member of the list.",
    )
    tls: TlsConfig | None = Field(default=None, description="Client TLS for the members (https endpoints).")
    rule: str | None = Field(default=None, description="Expression in etcd-defrag's syntax.")
    thresholds: Thresholds | None = Field(
        default=None, description="The rule as thresholds, instead of `rule`; unset: the default rule."
    )
    quota_bytes: ByteCount | None = Field(
        default=None,
        description="Used only when a member reports no quota of its own. " + BYTE_SIZE_HELP + ".",
    )
    request_timeout_seconds: PositiveSeconds = Field(
        default=5.0, description="Timeout of one request to a member (status, member list, alarms)."
    )
    member_timeout_seconds: PositiveSeconds = Field(
        default=300.0, description="Timeout of one member's defragment call; at most `deadline_seconds`."
    )
    health_timeout_seconds: PositiveSeconds = Field(
        default=60.0,
        description="How long a member may take to be healthy and caught up again after its defrag.",
    )
    deadline_seconds: PositiveSeconds = Field(
        default=1800.0, description="The whole run's deadline; a run past it stops before the next member."
    )
    compact: bool = Field(
        default=False,
        description="Compact the history to the current revision before defragmenting (kube-apiserver "
        "compacts on its own).",
    )
    move_leader: bool = Field(
        default=False,
        description="Move leadership to a defragmented follower before defragmenting the leader.",
    )
    continue_on_error: bool = Field(
        default=False,
        description="Go on with the next member after one fails (default: stop at the first failure).",
    )
    disarm_below_ratio: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(
        default=0.9,
        description="Disarm NOSPACE after the run when every member is below this share of its quota.",
    )
    paused: bool = Field(
        default=False, description="Observe and export, but never launch a run for this cluster."
    )
    allow_unavailable_defrag: bool = Field(
        default=False,
        description="Accept that the cluster stops answering while a member is defragmented: needed to "
        "defragment a cluster of one or two voting members (docs/safety.md).",
    )
    settle_seconds: Seconds = Field(
        default=DEFAULT_SETTLE_SECONDS,
        description="Defer a run while a member's etcd process started less than this long ago "
        "(a restart or rolling update in progress; docs/safety.md). 0 turns the check off.",
    )
    alerts: AlertRouting = Field(
        default_factory=AlertRouting, description="Which alerts belong to this cluster."
    )
    kubernetes: KubernetesTarget | None = Field(
        default=None, description="Where and how its defrag Job runs (the kubernetes executor)."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not is_dns_label(name, max_chars=_NAME_MAX):
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

    @property
    def discovers_endpoints(self) -> bool:
        """The members' URLs come from the Kubernetes API (exporter.kubernetes.api.discover_endpoints)."""
        return self.kubernetes is not None and self.kubernetes.discover_endpoints

    @property
    def reads_kubernetes_api(self) -> bool:
        """Start-up reads the Kubernetes API for it: its endpoints, or its kamaji-etcd Secret layout."""
        target = self.kubernetes
        return self.discovers_endpoints or (
            target is not None
            and spec_of(target.variant).tls is TlsSource.KAMAJI_SECRETS
            and target.secret_layout is SecretLayout.AUTO
        )

    def with_endpoints(self, endpoints: list[str]) -> "ClusterConfig":
        """This cluster with these endpoints, checked as the config file's are; ValueError says why."""
        return self._revalidated({"endpoints": endpoints})

    def with_secret_layout(self, layout: SecretLayout) -> "ClusterConfig":
        """This cluster with kubernetes.secret_layout resolved (kube.discover read it)."""
        assert self.kubernetes is not None
        return self._revalidated({"kubernetes": {**self.kubernetes.model_dump(), "secret_layout": layout}})

    def _revalidated(self, changes: dict[str, Any]) -> "ClusterConfig":
        try:
            return ClusterConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            problems = format_validation_error(exc).splitlines()[1:]
            raise ValueError("; ".join(p.strip() for p in problems)) from None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.endpoints and not self.discovers_endpoints:
            raise ValueError(
                "endpoints: give at least one client URL, or set kubernetes.discover_endpoints "
                "(variants kamaji and kubeadm)"
            )
        if self.rule is not None and self.thresholds is not None:
            raise ValueError("set either 'rule' or 'thresholds', not both")
        https = [e for e in self.endpoints if e.startswith("https://")]
        if self.tls is not None and len(https) != len(self.endpoints):
            plain = next(e for e in self.endpoints if not e.startswith("https://"))
            raise ValueError(f"tls is configured but endpoint {plain!r} is plain http")
        if self.member_timeout_seconds > self.deadline_seconds:
            raise ValueError("member_timeout_seconds must not exceed deadline_seconds")
        if self.kubernetes is not None and (
            problems := self.kubernetes.problems(
                endpoints=self.endpoints, deadline_seconds=self.deadline_seconds
            )
        ):
            raise ValueError("kubernetes: " + "; ".join(problems))
        return self


class WebhookSettings(_Model):
    """The Alertmanager webhook: authentication, limits, which alerts act.

    Secrets are SecretStr and files are read at start-up, so neither a repr nor a log line shows them.
    """

    token: SecretStr | None = Field(
        default=None,
        description="Bearer token Alertmanager sends (env ETCD_AUTODEFRAG_WEBHOOK__TOKEN); or token_file.",
    )
    token_file: Path | None = Field(
        default=None, description="File holding the bearer token (the receiver's credentials_file)."
    )
    basic_auth_username: str | None = Field(
        default=None, description="HTTP basic auth instead of a bearer token: the user name."
    )
    basic_auth_password: SecretStr | None = Field(
        default=None, description="... and its password (never logged)."
    )
    basic_auth_password_file: Path | None = Field(
        default=None, description="... or a file holding it, re-read when it changes."
    )
    # Alertmanager sends every alert of a group in one body, ~1-3 KiB per alert with its labels and
    # annotations. 4 MiB holds groups of well over 1,000 alerts; a bigger body is refused with 413,
    # which Alertmanager does not retry, so the cap errs large. Bound groups with the receiver's
    # `max_alerts` instead (Alertmanager then reports the rest in `truncatedAlerts`).
    max_body_bytes: Annotated[ByteCount, Field(ge=1024)] = Field(
        default=4 * 1024 * 1024, description="Largest request body accepted; a larger one is answered 413."
    )
    # A minimal alert is ~80 bytes, so 4 MiB can hold ~50,000 of them, which take seconds of CPU
    # to validate and decide: the count is capped too, and checked before that work.
    max_alerts: int = Field(
        default=1000,
        ge=1,
        description="Most alerts one notification may carry; more are refused with 413 (not retried). "
        "Set the Alertmanager receiver's max_alerts to this or less: it then sends the first ones "
        "and counts the rest in truncatedAlerts.",
    )
    acting_alerts: list[str] | None = Field(
        default=None,
        description="Alert names that launch runs; default EtcdDefragRecommended, EtcdNoSpaceAlarm and "
        "EtcdQuotaUsageCritical; [] means any name (then acting_matchers must narrow it).",
    )
    acting_matchers: list[str] = Field(
        default_factory=list,
        description="""Matchers an acting alert must also match, e.g. ['severity="critical"'].""",
    )
    max_snapshot_age_seconds: PositiveSeconds = Field(
        default=60.0,
        description="A launch needs a cluster snapshot at most this old; an older one is refreshed first.",
    )

    @field_validator("acting_matchers")
    @classmethod
    def _valid_matchers(cls, matchers: list[str]) -> list[str]:
        return checked_matchers(matchers)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set either token or token_file, not both")
        password = self.basic_auth_password is not None or self.basic_auth_password_file is not None
        if self.basic_auth_password is not None and self.basic_auth_password_file is not None:
            raise ValueError("set either basic_auth_password or basic_auth_password_file, not both")
        if (self.basic_auth_username is not None) != password:
            raise ValueError("basic_auth_username and a basic_auth_password(_file) must be set together")
        if self.acting_alerts == [] and not self.acting_matchers:
            raise ValueError(
                "acting_alerts is empty and acting_matchers is not set: every alert would launch a "
                "defrag; name the alerts or give matchers"
            )
        return self


class ExecutorSettings(_Model):
    """How a launched defrag runs: a Kubernetes Job or a local subprocess."""

    class Kind(StrEnum):
        """`auto`: `kubernetes` when running in a Pod (KUBERNETES_SERVICE_HOST is set), else `local`."""

        AUTO = "auto"
        KUBERNETES = "kubernetes"
        LOCAL = "local"

    kind: Kind = Field(
        default=Kind.AUTO,
        description="local (a child process), kubernetes (a Job), or auto: kubernetes inside a Pod.",
    )
    dry_run: bool = Field(
        default=False,
        description="Decide and log every launch ('DRY-RUN: would ...') but create or run nothing.",
    )
    state_dir: Path | None = Field(
        default=None,
        description="local: where run locks and states live; every service on a host must share it. "
        "Default $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME or ~/.local/state, /etcd-autodefrag.",
    )
    image: str | None = Field(
        default=None,
        description="kubernetes: image of the defrag Job when the cluster names none; default this "
        "release's ghcr.io/etcd-autodefrag/etcd-autodefrag:<version>.",
    )
    kubernetes_timeout_seconds: PositiveSeconds = Field(
        default=10.0, description="kubernetes: timeout of one Kubernetes API request."
    )
    cooldown_seconds: Seconds = Field(
        default=3600.0,
        description="After a run ends (any result), alerts for that cluster launch nothing for this long.",
    )


# What a discovered DataStore's cluster does not take from `discover.kamaji_datastores.defaults`:
# what the DataStore itself says (name, endpoints, TLS, where its Job runs and what it mounts), and
# `alerts`: the same matchers for every DataStore would route each alert to all of them, so a
# discovered cluster is routed by `etcd_cluster="<name>"`. Everything else is a default.
DATASTORE_OWN = ("name", "endpoints", "tls", "alerts")
DATASTORE_OWN_KUBERNETES = (
    "namespace",
    "variant",
    "etcd_name",
    "discover_endpoints",
    "etcd_service",
    "secret_layout",
    "cluster_domain",
    "client_port",
    "tls_secret",
    "ca_secret",
    "ca_key",
    "cert_key",
    "key_key",
)


class KamajiDataStores(_Model):
    """Every Kamaji DataStore with `driver: etcd` becomes a cluster named after it (docs/kamaji.md)."""

    enabled: bool = Field(
        default=False, description="List and watch kamaji.clastix.io DataStores (a ClusterRole is needed)."
    )
    label_selector: str = Field(
        default="", description="Only the DataStores with these labels, e.g. `tier=gold` (all when empty)."
    )
    secret_refresh_seconds: PositiveSeconds = Field(
        default=300.0,
        description="Read the Secrets the DataStores reference again this often (and whenever a "
        "DataStore changes), so that renewed certificates are used without a restart.",
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of every discovered cluster, as in clusters[] (rule, thresholds, timeouts, "
        "paused, kubernetes.image, kubernetes.cooldown_seconds, ...), but not "
        + ", ".join(DATASTORE_OWN)
        + " or kubernetes.{"
        + ", ".join(DATASTORE_OWN_KUBERNETES)
        + "}, which each DataStore says itself.",
    )

    @field_validator("defaults")
    @classmethod
    def _valid_defaults(cls, defaults: dict[str, Any]) -> dict[str, Any]:
        own = [f"{k}" for k in defaults if k in DATASTORE_OWN]
        kubernetes = defaults.get("kubernetes") or {}
        if not isinstance(kubernetes, dict):
            raise ValueError("kubernetes must be a mapping")
        own += [f"kubernetes.{k}" for k in kubernetes if k in DATASTORE_OWN_KUBERNETES]
        if own:
            raise ValueError(
                f"{', '.join(own)}: not settable for discovered DataStores: each DataStore gives its "
                "own endpoints and TLS, its Job runs where its client certificate's Secret is, and it "
                'is routed by etcd_cluster="<name>"'
            )
        # Checked as a cluster's would be, on a stand-in DataStore, so that a bad default stops
        # start-up instead of every DataStore later.
        trial = {"namespace": "default", "tls_secret": "client", "ca_key": "ca.crt"}
        try:
            cls.cluster_with(
                defaults, name="datastore", endpoints=["https://127.0.0.1:2379"], tls=None, kubernetes=trial
            )
        except ValidationError as exc:
            problems = format_validation_error(exc).splitlines()[1:]
            raise ValueError("; ".join(p.strip().removeprefix("(top level): ") for p in problems)) from None
        return defaults

    def cluster(
        self, *, name: str, endpoints: list[str], tls: TlsConfig | None, kubernetes: dict[str, Any] | None
    ) -> "ClusterConfig":
        """A discovered cluster: what the DataStore says, the rest from `defaults`; ValidationError."""
        return self.cluster_with(
            self.defaults, name=name, endpoints=endpoints, tls=tls, kubernetes=kubernetes
        )

    @staticmethod
    def cluster_with(
        defaults: dict[str, Any],
        *,
        name: str,
        endpoints: list[str],
        tls: TlsConfig | None,
        kubernetes: dict[str, Any] | None,
    ) -> "ClusterConfig":
        data: dict[str, Any] = {**defaults, "name": name, "endpoints": endpoints, "tls": tls}
        data.pop("kubernetes", None)
        if kubernetes is not None:
            # The plain variant with the DataStore's own Secrets (exporter/kubernetes/datastores.py).
            data["kubernetes"] = {**(defaults.get("kubernetes") or {}), "variant": "plain", **kubernetes}
        return ClusterConfig.model_validate(data)


class DiscoverSettings(_Model):
    """Clusters the service finds by itself, besides `clusters`."""

    kamaji_datastores: KamajiDataStores = Field(
        default_factory=KamajiDataStores,
        description="Every Kamaji DataStore with driver etcd as a cluster (docs/kamaji.md).",
    )


class ShardingSettings(_Model):
    """Split the clusters over replicas by a stable hash of their names (docs/sharding.md).

    Each replica refreshes and exports only its shard's clusters; every replica still answers the
    webhook for every cluster. kube-state-metrics' convention: `--shard I --total-shards N`.
    """

    total_shards: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=1, description="How many replicas share the clusters; 1 means no sharding."
    )
    shard: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description="This replica's shard, 0 to total_shards - 1. Unset with total_shards > 1: the "
        "trailing ordinal of env POD_NAME (a StatefulSet pod `etcd-autodefrag-3` is shard 3).",
    )

    @model_validator(mode="after")
    def _in_range(self) -> Self:
        if self.shard is not None and self.shard >= self.total_shards:
            raise ValueError(
                f"shard {self.shard} is out of range for total_shards {self.total_shards} "
                f"(0 to {self.total_shards - 1})"
            )
        return self


class Settings(BaseSettings):
    """Everything the service and the CLI read at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )
    file_data: ClassVar[dict[str, Any]] = {}

    log_format: LogFormat = Field(default=LogFormat.TEXT, description="text (one line per record) or json.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    clusters: list[ClusterConfig] = Field(
        default_factory=list,
        description="The etcd clusters to watch; empty: one cluster `local` at http://127.0.0.1:2379.",
    )

    # --- the service (`etcd-autodefrag serve`) ---
    listen_address: str = Field(
        default=f"{DEFAULT_LISTEN_HOST}:{DEFAULT_LISTEN_PORT}",
        description="host:port for /metrics, /healthz, /readyz and the webhook.",
    )
    scrape_budget_seconds: PositiveSeconds = Field(
        default=4.0, description="Longest a scrape waits for fresh data; keep it below scrape_timeout."
    )
    min_refresh_interval_seconds: Seconds = Field(
        default=0.0,
        description="Scrapes closer together reuse the last snapshot (concurrent ones always share).",
    )
    background_refresh_seconds: PositiveSeconds = Field(
        default=30.0, description="Refresh at least this often even when nobody scrapes."
    )
    member_list_refresh_seconds: PositiveSeconds = Field(
        default=60.0,
        description="How long a member list is reused before it is read again (at once when a member fails).",
    )
    max_concurrent_requests: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=64, description="Requests to etcd members in flight at once, over all clusters."
    )
    webhook: WebhookSettings = Field(default_factory=WebhookSettings, description="The Alertmanager webhook.")
    executor: ExecutorSettings = Field(
        default_factory=ExecutorSettings, description="What runs a launched defrag."
    )
    discover: DiscoverSettings = Field(
        default_factory=DiscoverSettings,
        description="Clusters found in the Kubernetes API, besides `clusters`.",
    )
    sharding: ShardingSettings = Field(
        default_factory=ShardingSettings,
        description="Split the clusters over replicas: each observes one shard (docs/sharding.md).",
    )

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
    if problems := unknown_environment(os.environ):
        raise ConfigError("\n".join(["invalid environment:", *(f"  {p}" for p in problems)]))
    data = _read_yaml(config_file) if config_file is not None else {}
    settings_cls = type("FileSettings", (Settings,), {"file_data": data})
    try:
        return settings_cls(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=config_file)) from None
    except SettingsError as exc:
        # pydantic-settings parses a complex field's env var as JSON before validation, and says
        # only 'error parsing value for field "clusters" from source "EnvSettingsSource"'.
        raise ConfigError(_env_error(exc)) from None
    except RecursionError:  # json.loads of an env var: pydantic-settings lets it through unwrapped
        raise ConfigError(
            f"environment variable {_too_deep_env_var()}: JSON nested too deeply to read"
        ) from None


def _too_deep_env_var() -> str:
    """The name of the ETCD_AUTODEFRAG_* variable whose JSON is nested too deeply for json.loads."""
    for name, value in os.environ.items():
        if name.upper().startswith(ENV_PREFIX):
            try:
                json.loads(value)
            except RecursionError:
                return name
            except ValueError:
                continue
    return f"{ENV_PREFIX}*"


def _env_error(exc: SettingsError) -> str:
    """Which environment variable is not JSON, and why, from pydantic-settings' error."""
    field = re.search(r'field "([^"]+)"', str(exc))
    name = f"{ENV_PREFIX}{field[1].upper()}" if field else f"an environment variable {ENV_PREFIX}*"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        why = f"not valid JSON ({cause.msg} at line {cause.lineno} column {cause.colno})"
    else:
        why = f"cannot be read ({cause or exc})"
    return f"environment variable {name}: {why}; it must hold the setting as JSON"


# `ETCD_AUTODEFRAG_*` variables read outside the settings model: the config file's path
# (exporter/cli/parser.py) and the host lock's directory (exporter/defrag/host_lock.py).
ENV_OUTSIDE_SETTINGS = ("CONFIG", "LOCK_DIR")
# What Kubernetes adds for a Service named etcd-autodefrag when a Pod keeps service links on
# (Kubernetes docs, "Environment variables" of Services): not ours, so not a typo either. PORT only
# with its `tcp://host:port` value, since a user could well mistype a port setting as ..._PORT.
_SERVICE_LINK = re.compile(
    r"SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?"
)
_SERVICE_LINK_URL = re.compile(r"(tcp|udp|sctp)://\S+")


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """One problem per `ETCD_AUTODEFRAG_*` variable that no setting reads, naming the closest valid name.

    pydantic-settings ignores such variables, so a typo (`..._LISTEN_ADRESS`) would otherwise start
    the service on the default silently. Names match case-insensitively, as pydantic-settings reads them.
    """
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].upper()
        if rest in ENV_OUTSIDE_SETTINGS or _SERVICE_LINK.fullmatch(rest):
            continue
        if rest == "PORT" and _SERVICE_LINK_URL.fullmatch(environ[name]):
            continue
        if (hint := _env_hint(rest)) is not None:
            problems.append(f"{name}: no such setting{hint}")
    return problems


def _env_hint(rest: str) -> str | None:
    """None when `rest` (after the prefix) names a setting, else a "did you mean" hint (maybe empty)."""
    model: type[BaseModel] = Settings
    path: list[str] = []
    parts = rest.lower().split("__")
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            # Compared without the common prefix, which would make every name look alike.
            names = [f.upper() for f in model.model_fields]
            if not path:
                names += ENV_OUTSIDE_SETTINGS
            matches = difflib.get_close_matches(part.upper(), names, n=1, cutoff=0.6)
            return f" (did you mean {ENV_PREFIX}{'__'.join([*path, matches[0]]).upper()}?)" if matches else ""
        path.append(part)
        nested = field.annotation
        if index + 1 < len(parts):
            if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
                return f" ({ENV_PREFIX}{'__'.join(path).upper()} has no parts to set with __)"
            model = nested
    return None


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's top-level mapping, below env vars in precedence."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then overriding a merged key is how merges are meant
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first != line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping; a plain message for a missing, unreadable or non-mapping YAML file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}"
        ) from None
    try:
        stream = io.StringIO(text)
        stream.name = str(path)  # PyYAML names the file in its error marks
        data = yaml.load(stream, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to read") from None
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
