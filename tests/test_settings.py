"""Settings: the YAML cluster list, env overrides, and start-up errors that name the field."""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from exporter.cli.main import main
from exporter.config.settings import (
    DEFAULT_SETTLE_SECONDS,
    ENV_PREFIX,
    ConfigError,
    Settings,
    load_settings,
    unknown_environment,
)
from exporter.core.units import parse_byte_size

REPO = Path(__file__).resolve().parent.parent

VALID = """
log_level: debug
clusters:
  - name: tenant-a
    endpoints: [https://10.0.0.1:2379, https://10.0.0.2:2379/]
    tls: {ca_file: /ca.crt, cert_file: /c.crt, key_file: /c.key}
    rule: "dbQuotaUsage > 0.8 || dbSize - dbSizeInUse > 200*1024*1024"
    quota_bytes: 8GiB
  - name: tenant-b
    endpoints: [http://127.0.0.1:2379]
    thresholds: {min_free_bytes: 100MiB, min_fragmentation_ratio: 0.5}
    paused: true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_valid_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, VALID))
    assert settings.log_level == "DEBUG"
    a, b = settings.clusters
    assert a.endpoints == ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    assert a.quota_bytes == 8 * 1024**3
    assert b.thresholds is not None
    assert b.thresholds.min_free_bytes == 100 * 1024**2
    assert b.paused
    assert settings.cluster("tenant-b") is b


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_LOG_LEVEL", "warning")
    monkeypatch.setenv("ETCD_AUTODEFRAG_LISTEN_ADDRESS", "0.0.0.0:9000")
    settings = load_settings(write(tmp_path, VALID))
    assert settings.log_level == "WARNING"
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 9000)


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.clusters == []
    assert settings.listen_address == "127.0.0.1:9479"


def test_unknown_cluster_lists_the_configured_ones(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'nope' is not in the configuration \(configured: tenant-a, tenant-b\)"
    ):
        load_settings(write(tmp_path, VALID)).cluster("nope")


@pytest.mark.parametrize(
    ("yaml_text", "messages"),
    [
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    rule: 'dbSize >'\n",
            ["clusters[0].rule: invalid defrag rule at column", "dbSize >"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    rule: 'dbsize > 1'\n",
            ["clusters[0].rule", "dbSize"],
        ),
        (
            "clusters:\n  - name: Tenant_A\n    endpoints: [http://x:2379]\n",
            ["clusters[0].name: must be lowercase letters"],
        ),
        ("clusters:\n  - name: a\n    endpoints: []\n", ["clusters[0]: endpoints: give at least one"]),
        ("clusters:\n  - name: a\n", ["or set kubernetes.discover_endpoints"]),
        (
            "clusters:\n  - name: a\n"
            "    kubernetes: {namespace: n, tls_secret: s, discover_endpoints: true}\n",
            ["discover_endpoints works with variants kamaji and kubeadm, not plain"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [https://x:2379]\n"
            "    kubernetes: {namespace: n, variant: kubeadm, etcd_service: s}\n",
            ["etcd_service is only used by variant kamaji"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [ftp://x]\n",
            ["clusters[0].endpoints: 'ftp://x' is not a client URL"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379/v3]\n",
            ["must not have a path"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:99999]\n",
            ["clusters[0].endpoints", "99999"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    tls: {ca_file: /ca}\n",
            ["tls is configured but endpoint 'http://x:2379' is plain http"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [https://x:2379]\n    tls: {cert_file: /c}\n",
            ["cert_file and key_file must be set together"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    rule: 'true'\n"
            "    thresholds: {min_free_bytes: 1}\n",
            ["set either 'rule' or 'thresholds', not both"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    member_timout_seconds: 5\n",
            ["clusters[0].member_timout_seconds: unknown setting (check the spelling)"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    deadline_seconds: -1\n",
            ["clusters[0].deadline_seconds: Input should be greater than 0"],
        ),
        (
            "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n"
            "    thresholds: {min_fragmentation_ratio: 1.5}\n",
            ["clusters[0].thresholds.min_fragmentation_ratio"],
        ),
        (
            "clusters:\n  - {name: a, endpoints: ['http://x:2379']}\n  - {name: a, endpoints: ['http://y:2379']}\n",
            ["cluster name 'a' appears twice"],
        ),
        ("listen_address: nowhere\n", ["listen_address: must be host:port"]),
        ("clusters: 3\n", ["clusters: Input should be a valid list"]),
    ],
)
def test_invalid_config_names_field_and_problem(tmp_path: Path, yaml_text: str, messages: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, yaml_text))
    text = str(caught.value)
    assert text.startswith(f"invalid configuration in {tmp_path / 'config.yaml'}:")
    for message in messages:
        assert message in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config file"),
        ("clusters: [\n", "is not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_empty_file_is_no_clusters(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")).clusters == []


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.log_level = "DEBUG"  # type: ignore[misc]


# --- byte sizes: one parser for every size (issue 17) -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (8, 8),
        ("8", 8),
        ("8Gi", 8 * 1024**3),
        ("512Mi", 512 * 1024**2),
        ("8GiB", 8 * 1024**3),
        ("1.5Ki", 1536),
        ("8G", 8_000_000_000),
        ("8e9", 8_000_000_000),
        ("100k", 100_000),
        (" 8 Gi ", 8 * 1024**3),
    ],
)
def test_byte_sizes_take_kubernetes_quantities_and_iec_units(text: object, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8GB-ish", "'8GB-ish' is not a byte size: bytes, or a number with a unit: 8Gi or 8GiB"),
        ("8GB", "'8GB' is ambiguous: write 8Gi (binary, 1024-based) or 8G (decimal, 1000-based)"),
        ("8kB", "write 8Ki (binary, 1024-based) or 8k (decimal"),
        ("500m", "unknown unit 'm'"),
        ("1.3", "'1.3' is not a whole number of bytes"),
        ("inf", "'inf' is not a byte size"),
        ("nan", "'nan' is not a byte size"),
        (float("inf"), "inf is not a byte size"),
        ("1e300", "'1e300' is too large (at most 9223372036854775807 bytes, 8 EiB)"),
        ("1e9999999", "is not a byte size"),
        (-1, "-1: a size cannot be negative"),
        (True, "True is not a byte size"),
    ],
)
def test_byte_sizes_refuse_garbage_saying_what_to_write(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_byte_size(text)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("quota_bytes", "8GB-ish", "clusters[0].quota_bytes: '8GB-ish' is not a byte size"),
        ("quota_bytes", "8GB", "clusters[0].quota_bytes: '8GB' is ambiguous"),
        ("thresholds", "{min_free_bytes: 1.5}", "clusters[0].thresholds.min_free_bytes: 1.5 is not a byte"),
        ("deadline_seconds", ".inf", "clusters[0].deadline_seconds: Input should be a finite number"),
        ("deadline_seconds", ".nan", "clusters[0].deadline_seconds: Input should be a finite number"),
        ("health_timeout_seconds", ".inf", "clusters[0].health_timeout_seconds: Input should be a finite"),
        ("deadline_seconds", "1e300", "clusters[0].deadline_seconds: Input should be less than or equal"),
        ("disarm_below_ratio", ".nan", "clusters[0].disarm_below_ratio: Input should be a finite number"),
    ],
)
def test_sizes_and_durations_in_the_file_are_checked_by_name(
    tmp_path: Path, setting: str, value: str, message: str
) -> None:
    text = f"clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    {setting}: {value}\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert message in str(caught.value)


def test_sizes_in_the_file_accept_quantities(tmp_path: Path) -> None:
    text = "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    quota_bytes: 8Gi\n"
    text += "webhook: {max_body_bytes: 1Mi}\n"
    settings = load_settings(write(tmp_path, text))
    assert settings.clusters[0].quota_bytes == 8 * 1024**3
    assert settings.webhook.max_body_bytes == 1024**2


# --- inputs that used to crash (issue 19 item 5) -----------------------------------------------------


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    text = "clusters:\n  - name: a\n    endpoints: [http://x:2379]\nclusters: []\n"
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert str(caught.value).splitlines() == [
        f"config file {tmp_path / 'config.yaml'} is not valid YAML: key 'clusters' appears twice "
        "(first on line 1)",
        f'  in "{tmp_path / "config.yaml"}", line 4, column 1',
    ]


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "clusters:\n  - &a {name: a, endpoints: ['http://x:2379'], paused: true}\n"
        "  - <<: *a\n    name: b\n    paused: false\n"
    )
    a, b = load_settings(write(tmp_path, text)).clusters
    assert (a.paused, b.paused, b.endpoints) == (True, False, ["http://x:2379"])


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"clusters:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"config\.yaml is not UTF-8 text: byte 0xe9 on line 2$"):
        load_settings(path)


@pytest.mark.parametrize("nesting", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000])
def test_yaml_nested_thousands_of_levels_is_refused(tmp_path: Path, nesting: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.yaml is nested too deeply to read$"):
        load_settings(write(tmp_path, f"clusters: {nesting}\n"))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "ETCD_AUTODEFRAG_CLUSTERS",
            "tenant-a",
            "environment variable ETCD_AUTODEFRAG_CLUSTERS: not valid JSON (Expecting value at line 1 "
            "column 1); it must hold the setting as JSON",
        ),
        (
            "ETCD_AUTODEFRAG_WEBHOOK",
            "{token: x}",
            "environment variable ETCD_AUTODEFRAG_WEBHOOK: not valid JSON (Expecting property name",
        ),
        ("ETCD_AUTODEFRAG_CLUSTERS", "[" * 100_000, "ETCD_AUTODEFRAG_CLUSTERS: JSON nested too deeply"),
    ],
)
def test_environment_that_is_not_json_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_an_empty_rule_loads_and_means_always(tmp_path: Path) -> None:
    """etcd-defrag's `--defrag-rule=""` carried over as `rule: ""` (docs/rules.md)."""
    from exporter.core.policy import cluster_rule

    settings = load_settings(
        write(tmp_path, "clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    rule: ''\n")
    )
    (cluster,) = settings.clusters
    assert cluster.rule == ""
    assert cluster_rule(cluster).evaluate({}) is True


# --- environment variables: a typo stops start-up ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("ETCD_AUTODEFRAG_LISTEN_ADRESS", "(did you mean ETCD_AUTODEFRAG_LISTEN_ADDRESS?)"),
        ("ETCD_AUTODEFRAG_WEBHOOK__TOKN", "(did you mean ETCD_AUTODEFRAG_WEBHOOK__TOKEN?)"),
        ("ETCD_AUTODEFRAG_EXECUTOR__COOLDOWN", "(did you mean ETCD_AUTODEFRAG_EXECUTOR__COOLDOWN_SECONDS?)"),
        ("ETCD_AUTODEFRAG_CONFG", "(did you mean ETCD_AUTODEFRAG_CONFIG?)"),
        ("ETCD_AUTODEFRAG_LOCKDIR", "(did you mean ETCD_AUTODEFRAG_LOCK_DIR?)"),
        ("etcd_autodefrag_log_levl", "(did you mean ETCD_AUTODEFRAG_LOG_LEVEL?)"),  # any case, as read
        ("ETCD_AUTODEFRAG_LOG_LEVEL__X", "(ETCD_AUTODEFRAG_LOG_LEVEL has no parts to set with __)"),
        ("ETCD_AUTODEFRAG_PORT", ""),  # not a service link's tcp:// value: a mistyped port setting
        ("ETCD_AUTODEFRAG_ZZZ", ""),
    ],
)
def test_an_unknown_environment_variable_names_the_closest_setting(name: str, hint: str) -> None:
    problems = unknown_environment({name: "9479", "HOME": "/root"})
    assert problems == [f"{name}: no such setting{' ' + hint if hint else ''}"]


def test_every_variable_the_project_reads_or_documents_is_known() -> None:
    """The settings' own names, those read outside the model, and every one named in the repository."""
    known = {
        "ETCD_AUTODEFRAG_LOG_LEVEL": "debug",
        "ETCD_AUTODEFRAG_LISTEN_ADDRESS": "0.0.0.0:9479",
        "ETCD_AUTODEFRAG_WEBHOOK__TOKEN": "t",
        "ETCD_AUTODEFRAG_WEBHOOK": "{}",
        "ETCD_AUTODEFRAG_EXECUTOR__KIND": "local",
        "ETCD_AUTODEFRAG_CLUSTERS": "[]",
        "ETCD_AUTODEFRAG_CONFIG": "/c.yaml",
        "ETCD_AUTODEFRAG_LOCK_DIR": "/run/lock",
        # Kubernetes service links of a Service named etcd-autodefrag (when a Pod keeps them on).
        "ETCD_AUTODEFRAG_SERVICE_HOST": "10.0.0.1",
        "ETCD_AUTODEFRAG_SERVICE_PORT": "9479",
        "ETCD_AUTODEFRAG_SERVICE_PORT_HTTP": "9479",
        "ETCD_AUTODEFRAG_PORT": "tcp://10.0.0.1:9479",
        "ETCD_AUTODEFRAG_PORT_9479_TCP": "tcp://10.0.0.1:9479",
        "ETCD_AUTODEFRAG_PORT_9479_TCP_ADDR": "10.0.0.1",
    }
    assert unknown_environment(known) == []
    # Every ETCD_AUTODEFRAG_* name written anywhere in code, manifests or docs (prefix-only mentions
    # and the service-link names quoted above aside).
    found: dict[str, str] = {}
    places = ("exporter", "scripts", "tests", "deploy", "docs", "demo", "bench", "alerts", ".ci")
    files = [REPO / "README.md", REPO / "Makefile", REPO / "Dockerfile"]
    files += [p for place in places for p in (REPO / place).rglob("*") if p.is_file()]
    for path in files:
        if path.name == Path(__file__).name or not path.exists():
            continue  # this file spells typos on purpose
        for name in re.findall(rf"{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")):
            found[name] = known.get(name, "tcp://10.0.0.1:9479" if name.endswith("_PORT") else "x")
    assert len(found) >= 5, found
    assert unknown_environment(found) == []


def test_a_typo_in_the_environment_stops_start_up_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_LISTEN_ADRESS", "0.0.0.0:9000")
    with pytest.raises(ConfigError, match="did you mean ETCD_AUTODEFRAG_LISTEN_ADDRESS"):
        load_settings()
    # Every command that reads the settings (`serve` included) stops before doing anything.
    assert main(["status", "--endpoints", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "invalid environment" in err
    assert (
        "ETCD_AUTODEFRAG_LISTEN_ADRESS: no such setting (did you mean ETCD_AUTODEFRAG_LISTEN_ADDRESS?)" in err
    )
    assert "Traceback" not in err


def test_safety_settings_per_cluster(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, VALID + "    allow_unavailable_defrag: true\n    settle_seconds: 0\n")
    )
    a, b = settings.clusters
    assert (a.allow_unavailable_defrag, a.settle_seconds) == (False, DEFAULT_SETTLE_SECONDS)
    assert (b.allow_unavailable_defrag, b.settle_seconds) == (True, 0)
    assert 120 <= DEFAULT_SETTLE_SECONDS <= 300
    with pytest.raises(
        ConfigError, match=r"clusters\[1\]\.settle_seconds: Input should be greater than or equal to 0"
    ):
        load_settings(write(tmp_path, VALID + "    settle_seconds: -1\n"))


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[type[BaseModel]]:
    """The model and every model its fields hold, however nested (lists, optionals)."""
    if model in seen:
        return
    seen.add(model)
    yield model
    for info in model.model_fields.values():
        stack: list[Any] = [info.annotation]
        while stack:
            kind = stack.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _models(kind, seen)
            stack.extend(get_args(kind))


def test_every_setting_has_a_description() -> None:
    """docs/configuration.md is generated from these: a field without one is a blank line there."""
    missing = [
        f"{model.__name__}.{name}"
        for model in _models(Settings, set())
        for name, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert missing == []
