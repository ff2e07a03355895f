"""The command line: defrag and status against real etcd, TLS, exit codes, messages for bad input."""

import asyncio
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trustme
import yaml
from etcd_harness import EtcdCluster, _free_ports, start_cluster, wait_until
from fake_kube import FakeKube
from test_render import kubeconfig

from exporter.cli.exit_codes import EXIT_CODE_MEANINGS, ExitCode, exit_code_table
from exporter.cli.main import main
from exporter.config.settings import ClusterConfig
from exporter.core.handoff import cluster_from_json
from exporter.core.launches import Trigger
from exporter.core.report import EXIT_CODES, MemberReport, RunReport, RunResult
from exporter.defrag.lock import HOLDER_KEY as LOCK_KEY
from exporter.kubernetes import jobs
from exporter.kubernetes.discovery import discovered
from exporter.launch import local as executors

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.etcd


def tls_flags(cluster: EtcdCluster) -> list[str]:
    assert cluster.tls is not None
    return [
        "--cacert",
        str(cluster.tls.ca_file),
        "--cert",
        str(cluster.tls.cert_file),
        "--key",
        str(cluster.tls.key_file),
    ]


# The harness's clusters started seconds ago, which the rollout gate would defer (docs/safety.md).
SETTLED = ["--settle-seconds", "0"]


def test_defrag_json_report(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    etcd.churn()
    args = ["defrag", "--endpoints", etcd.endpoints[0], "--rule", "dbSizeFree > 0", "--output", "json"]
    code = main([*args, *SETTLED])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["result"] == "success"
    assert report["exit_code"] == 0
    assert len(report["members"]) == 3
    assert report["members"][-1]["leader"] is True
    assert report["reclaimed_bytes"] == sum(m["reclaimed_bytes"] for m in report["members"]) > 0
    for member in report["members"]:
        assert set(member) >= {
            "endpoint",
            "id",
            "leader",
            "size_before_bytes",
            "size_after_bytes",
            "in_use_before_bytes",
            "reclaimed_bytes",
            "duration_seconds",
            "outcome",
        }


def test_defrag_over_tls(tls_etcd_cluster: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = tls_etcd_cluster
    cluster.churn()
    args = ["defrag", "--endpoints", cluster.endpoints[0], *tls_flags(cluster), "--rule", "dbSizeFree > 0"]
    assert main([*args, *SETTLED]) == 0
    out = capsys.readouterr().out
    assert out.count("defragmented") == 3


def test_tls_cluster_without_client_cert_is_refused(
    tls_etcd_cluster: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tls_etcd_cluster.tls is not None
    args = [
        "defrag",
        "--endpoints",
        tls_etcd_cluster.endpoints[0],
        "--cacert",
        str(tls_etcd_cluster.tls.ca_file),
    ]
    assert main([*args, "--request-timeout", "2"]) == 3
    assert "no configured endpoint answered" in capsys.readouterr().err


@pytest.mark.parametrize(("rule", "selected"), [("", True), ("dbSize > 2**40", False)])
def test_rules_etcd_defrag_users_pass_carry_over(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str], rule: str, selected: bool
) -> None:
    """`--rule ""` (etcd-defrag's "always") selects every member; `**` is power (docs/rules.md)."""
    assert main(["status", "--endpoints", etcd.endpoints[0], "--rule", rule, "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    assert [row["defrag_recommended"] for row in rows] == [selected] * 3


def test_status_table(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    etcd.churn()
    assert main(["status", "--endpoints", etcd.endpoints[0], "--rule", "dbSizeFree > 0"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    for column in (
        "ENDPOINT",
        "DB SIZE",
        "IN USE",
        "FREE",
        "FRAG",
        "QUOTA USE",
        "LEADER",
        "ALARMS",
        "DEFRAG?",
    ):
        assert column in header
    rows = [line for line in out.splitlines() if "| http" in line]
    assert len(rows) == 3
    assert sum(" true " in row.split("|")[11] for row in rows) == 1  # one leader
    assert all("| 32.0 MiB |" in row for row in rows)  # the quota, read from the members


def test_status_json_agrees_with_etcd(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--endpoints", etcd.endpoints[0], "--output", "json"]) == 0
    rows = {r["endpoint"]: r for r in json.loads(capsys.readouterr().out)}
    statuses = {m.client_url: m.status() for m in etcd.members}
    assert set(rows) == set(statuses)
    leader = etcd.leader().client_url
    for endpoint, row in rows.items():
        assert row["quota_bytes"] == etcd.quota_bytes
        assert row["is_leader"] == (endpoint == leader)
        assert row["db_size_bytes"] > 0
        assert row["db_free_bytes"] == row["db_size_bytes"] - row["db_size_in_use_bytes"]
        assert row["defrag_cost"] == "none"
        assert "leaves 2 of 3 voting members" in row["defrag_cost_reason"]


def test_status_with_a_stopped_member(
    fresh_etcd_cluster: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh_etcd_cluster.members[2].stop()
    code = main(["status", "--endpoints", fresh_etcd_cluster.endpoints[0], "--request-timeout", "1"])
    out = capsys.readouterr().out
    assert code == 3  # as a defrag would be refused: the same code for the same cluster
    assert out.count("| http") == 3
    # The reason for the missing member, in plain words (no "Connect call failed ('127.0.0.1', ...)").
    assert "etcd-2: /v3/maintenance/status: connection refused" in out
    assert "Connect call" not in out


def test_cluster_from_config_file(
    etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"clusters:\n  - name: shared\n    endpoints: [{etcd.endpoints[1]}]\n    rule: 'false'\n"
    )
    assert main(["defrag", "--config", str(config), "--cluster", "shared", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == "nothing_to_do"


def exit_code(args: list[str]) -> int:
    """main(args), or the code argparse exits with for a flag it refuses itself."""
    try:
        return main(args)
    except SystemExit as stop:
        return int(stop.code or 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--rule", "dbSize >"],
            "--rule: invalid defrag rule at column",
        ),
        (["defrag", "--endpoints", "ftp://x"], "--endpoints: 'ftp://x' is not a client URL"),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--cert", "/c"],
            "--cert and --key must be set together",
        ),
        (
            ["defrag", "--endpoints", "https://127.0.0.1:1", "--cacert", "/nonexistent"],
            "etcd-autodefrag: --cacert /nonexistent: no such file or directory",
        ),
        (["defrag", "--cluster", "nope"], "'nope' is not in the configuration"),
        # A command that reads or changes a cluster names it: no silent http://127.0.0.1:2379.
        (["defrag"], "defrag: name the cluster with --cluster NAME (and --config FILE) or give --endpoints"),
        (["status"], "status: name the cluster with --cluster NAME (and --config FILE) or give --endpoints"),
        (["defrag", "--endpoints", ""], "--endpoints: no URL in ''; give client URLs like https://"),
        (["status", "--endpoints", " , "], "--endpoints: no URL in ' , '"),
        (["render", "cronjob", "--variant", "talos", "--endpoints", ""], "--endpoints: no URL in ''"),
        # Flag errors speak in flag names, checked by the settings' own types.
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--deadline", "-1"],
            "argument --deadline: must be greater than 0",
        ),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--member-timeout", "-5"],
            "argument --member-timeout: must be greater than 0; got '-5'",
        ),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--deadline", "inf"],
            "argument --deadline: must be a finite number",
        ),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--deadline", "nan"],
            "argument --deadline: must be a finite number",
        ),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--deadline", "1e300"],
            "argument --deadline: must be less than or equal to 31536000; got '1e300'",
        ),
        (
            ["status", "--endpoints", "http://127.0.0.1:1", "--request-timeout", "inf"],
            "argument --request-timeout: must be a finite",
        ),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--quota-bytes", "8GB-ish"],
            "argument --quota-bytes: '8GB-ish' is not a byte size: bytes, or a number with a unit: 8Gi",
        ),
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--member-timeout", "600", "--deadline", "300"],
            "etcd-autodefrag: --member-timeout must not exceed --deadline",
        ),
        (
            ["status", "--endpoints", "http://127.0.0.1:1", "--output", "table", "--output", "yaml"],
            "invalid choice: 'yaml'",
        ),
    ],
)
def test_bad_usage_exits_2_with_a_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ETCD_AUTODEFRAG_CONFIG", raising=False)
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert "_seconds" not in err  # field names of the settings never stand in for flags


# Issue 19 item 5: inputs that used to end in a traceback or fail late.
CLUSTER = "clusters:\n  - name: a\n    endpoints: [http://127.0.0.1:1]\n"


@pytest.mark.parametrize(
    ("config", "environment", "message"),
    [
        (b"clusters:\n  - name: caf\xe9\n", {}, "config.yaml is not UTF-8 text: byte 0xe9 on line 2"),
        (("clusters: " + "[" * 5000 + "]" * 5000).encode(), {}, "config.yaml is nested too deeply to read"),
        ((CLUSTER + "clusters: []\n").encode(), {}, "key 'clusters' appears twice (first on line 1)"),
        (
            (CLUSTER + "    deadline_seconds: .inf\n").encode(),
            {},
            "clusters[0].deadline_seconds: Input should be a finite",
        ),
        (
            (CLUSTER + "    health_timeout_seconds: .inf\n").encode(),
            {},
            "clusters[0].health_timeout_seconds: Input should be a finite number",
        ),
        (
            (CLUSTER + "    quota_bytes: 8GB-ish\n").encode(),
            {},
            "clusters[0].quota_bytes: '8GB-ish' is not a byte size",
        ),
        (
            b"",
            {"ETCD_AUTODEFRAG_CLUSTERS": "tenant-a"},
            "environment variable ETCD_AUTODEFRAG_CLUSTERS: not valid JSON",
        ),
        (
            b"",
            {"ETCD_AUTODEFRAG_WEBHOOK": "token=x"},
            "environment variable ETCD_AUTODEFRAG_WEBHOOK: not valid JSON",
        ),
    ],
)
@pytest.mark.parametrize("command", ["defrag", "status", "serve"])
def test_inputs_that_used_to_crash_exit_2_naming_the_file_key_or_variable(
    command: str,
    config: bytes,
    environment: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(config)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    target = ["--cluster", "a"] if command != "serve" else []
    assert exit_code([command, "--config", str(path), *target]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    paused: maybe\n")
    assert main(["status", "--config", str(config), "--cluster", "a"]) == 2
    assert "clusters[0].paused" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["defrag", "status"])
def test_an_unreachable_cluster_exits_3_from_every_command(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = _free_ports(1)  # nothing listens there
    assert main([command, "--endpoints", f"http://127.0.0.1:{port}", "--request-timeout", "1"]) == 3
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}: /v3/cluster/member/list: connection refused" in err
    assert "ssl:default" not in err
    assert "Connect call failed" not in err


def test_a_second_run_on_the_same_cluster_is_refused(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_LOCK_DIR", str(tmp_path))
    cluster_id = int(etcd.members[0].status()["header"]["cluster_id"])
    with (tmp_path / f"etcd-autodefrag-{cluster_id:x}.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress would
        assert main(["defrag", "--endpoints", etcd.endpoints[2], "--rule", "true"]) == 3
    assert "another defrag run on this cluster holds" in capsys.readouterr().err
    # Released: the next run goes ahead (dry run: nothing to prove beyond the lock).
    assert main(["defrag", "--endpoints", etcd.endpoints[2], "--dry-run"]) == 0


def test_an_unwritable_lock_directory_refuses(
    etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_LOCK_DIR", "/nonexistent/dir")
    assert main(["defrag", "--endpoints", etcd.endpoints[0], "--dry-run"]) == 3
    assert "cannot open the lock file" in capsys.readouterr().err


def test_console_script_runs(etcd: EtcdCluster) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "defrag",
            "--endpoints",
            etcd.endpoints[0],
            "--dry-run",
            "--rule",
            "true",
            *SETTLED,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("DRY-RUN: would defragment") == 3
    assert result.stdout.count("would_defrag") == 3


def test_report_file_gets_the_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ETCD_AUTODEFRAG_CONFIG", raising=False)
    report_file = tmp_path / "termination-log"
    args = ["defrag", "--endpoints", "http://127.0.0.1:9", "--request-timeout", "1", "--output", "json"]
    assert main([*args, "--report-file", str(report_file)]) == 3
    written = json.loads(report_file.read_text())
    assert written == json.loads(capsys.readouterr().out)  # small enough: the full report
    assert (written["result"], written["exit_code"]) == ("refused", 3)

    # A report that cannot be written is said, and the exit code still tells how the run went.
    assert main([*args, "--report-file", str(tmp_path / "missing" / "file")]) == 3
    assert "cannot write report" in capsys.readouterr().err


def test_closed_pipe_ends_quietly(etcd: EtcdCluster) -> None:
    """`etcd-autodefrag status | head`: the reader is gone before the table is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, whatever the timing
    try:
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "status", "--endpoints", etcd.endpoints[0]],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""


def test_sighup_reloads_the_clusters_and_names_what_needs_a_restart(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    (port,) = _free_ports(1)
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    one = {"name": "one", "endpoints": [etcd.endpoints[0]]}
    config.write_text(yaml.safe_dump({"clusters": [one]}))
    command = [
        sys.executable,
        "-m",
        "exporter",
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    service = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, timeout=30, what="the service to be ready")
        two = {"name": "two", "endpoints": [etcd.endpoints[1]]}
        config.write_text(yaml.safe_dump({"clusters": [one, two], "webhook": {"max_body_bytes": 12345}}))
        service.send_signal(signal.SIGHUP)
        wait_until(
            lambda: 'etcd_cluster="two"' in _get(f"{base}/metrics")[1],
            timeout=30,
            what="the reloaded cluster on /metrics",
        )
    finally:
        service.terminate()
        _, stderr = service.communicate(timeout=30)
    assert "SIGHUP: reloaded 2 clusters" in stderr
    (warning,) = [line for line in stderr.splitlines() if "only the cluster list is reloaded" in line]
    # The changed webhook section is named; --listen, given again on reload, is not.
    assert "SIGHUP: webhook changed" in warning


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except OSError:  # not listening yet, or 503 while not ready
        return 0, ""


# --- endpoints from the Kubernetes API (kubernetes.discover_endpoints) ------------------------------

KAMAJI = {
    "name": "tenant",
    "kubernetes": {
        "namespace": "kamaji-system",
        "variant": "kamaji",
        "etcd_name": "kamaji-etcd",
        "etcd_service": "kamaji-etcd-hl",
        "discover_endpoints": True,
    },
}


async def test_discovered_reads_the_statefulset_and_feeds_the_jobs(
    fake_kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, fake_kube.url)))
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas=4)
    plain = ClusterConfig(name="plain", endpoints=["http://127.0.0.1:2379"])
    found, same = await discovered([ClusterConfig.model_validate(KAMAJI), plain])
    urls = [f"https://kamaji-etcd-{i}.kamaji-etcd-hl.kamaji-system.svc.cluster.local:2379" for i in range(4)]
    assert found.endpoints == urls
    assert found.kubernetes is not None
    assert found.kubernetes.secret_layout == "self-signed"  # what the StatefulSet mounts
    assert same is plain
    # The Job has no API access: it is handed the cluster with the discovered URLs, as is a local run.
    args = jobs.build_job(found, image="i", trigger=Trigger(alertname="a"))["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert cluster_from_json(args[args.index("--cluster-json") + 1]).endpoints == urls
    local = executors.LocalExecutor(state_dir=tmp_path, cooldown_seconds=60)
    command = local.child_command(found)
    assert cluster_from_json(command[command.index("--cluster-json") + 1]) == found
    with pytest.raises(jobs.JobConfigError, match="not been discovered"):
        jobs.build_job(ClusterConfig.model_validate(KAMAJI), image="i", trigger=Trigger(alertname="a"))


async def test_serve_exits_1_when_discovery_fails(
    fake_kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, fake_kube.url)))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"clusters": [KAMAJI]}))
    (port,) = _free_ports(1)  # never listened on: discovery fails first
    code = await asyncio.to_thread(main, ["serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cluster tenant: cannot discover its endpoints" in err
    assert 'statefulsets.apps "kamaji-etcd" not found' in err
    assert "Traceback" not in err


def test_defrag_of_a_discovering_cluster_needs_endpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"clusters": [KAMAJI]}))
    assert main(["defrag", "--config", str(config), "--cluster", "tenant", "--dry-run"]) == 2
    assert "reads its endpoints from the Kubernetes API" in capsys.readouterr().err


def test_render_job_of_a_discovering_cluster_takes_the_endpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"clusters": [KAMAJI, {"name": "plain", "endpoints": ["http://a:2379"]}]})
    )
    render = ["render", "job", "--config", str(config)]
    assert main([*render, "--cluster", "tenant"]) == 2
    assert "give them with --endpoints" in capsys.readouterr().err
    assert main([*render, "--cluster", "tenant", "--endpoints", "http://a:2379"]) == 2
    err = capsys.readouterr().err
    assert "--endpoints: " in err
    assert "plain http" in err
    assert main([*render, "--cluster", "plain", "--endpoints", "https://a:2379"]) == 2
    assert "takes its endpoints from the configuration" in capsys.readouterr().err
    urls = "https://m-0:2379,https://m-1:2379"
    assert main([*render, "--cluster", "tenant", "--endpoints", urls, "--secret-layout", "self-signed"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert cluster_from_json(args[args.index("--cluster-json") + 1]).endpoints == urls.split(",")


# --- TLS: every error names the file, the setting or the flag (issue 17 items 2, 3) ---------------


@pytest.fixture
def foreign_ca(tmp_path: Path) -> Path:
    """A CA that signed nothing any test member serves."""
    path = tmp_path / "foreign-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_https_against_plain_etcd_says_tls_handshake_failed(
    etcd: EtcdCluster, foreign_ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    https = etcd.endpoints[0].replace("http://", "https://")
    assert main(["status", "--endpoints", https, "--cacert", str(foreign_ca), "--request-timeout", "2"]) == 3
    err = capsys.readouterr().err
    assert f"{https}: /v3/cluster/member/list: TLS handshake failed (is the member serving plain HTTP?" in err
    assert "ssl:default" not in err


@pytest.mark.parametrize("command", ["status", "defrag"])
def test_a_wrong_ca_is_named_as_such(
    command: str, tls_etcd_cluster: EtcdCluster, foreign_ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tls_flags(tls_etcd_cluster)
    flags[flags.index("--cacert") + 1] = str(foreign_ca)
    assert (
        main([command, "--endpoints", tls_etcd_cluster.endpoints[0], *flags, "--request-timeout", "2"]) == 3
    )
    err = capsys.readouterr().err
    assert "TLS: the member's certificate is not trusted: unable to get local issuer certificate" in err
    assert "SSLCertVerificationError" not in err


def test_plain_http_against_tls_etcd_suggests_https(
    tls_etcd_cluster: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    http = tls_etcd_cluster.endpoints[0].replace("https://", "http://")
    assert main(["status", "--endpoints", http, "--request-timeout", "2"]) == 3
    assert "closed the connection without an answer (does it serve TLS? then use https://)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("setting", "content", "problem"),
    [
        ("ca_file", None, "no such file or directory"),
        ("ca_file", "not a certificate\n", "no PEM certificate in it (is it the CA bundle?)"),
        ("cert_file", "garbage\n", "no PEM certificate in it"),
        ("key_file", "garbage\n", "no PEM private key in it"),
    ],
)
def test_a_bad_tls_file_in_the_config_names_cluster_setting_and_file(
    tls_etcd_cluster: EtcdCluster,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    content: str | None,
    problem: str,
) -> None:
    assert tls_etcd_cluster.tls is not None
    tls = {
        "ca_file": str(tls_etcd_cluster.tls.ca_file),
        "cert_file": str(tls_etcd_cluster.tls.cert_file),
        "key_file": str(tls_etcd_cluster.tls.key_file),
    }
    bad = tmp_path / f"bad-{setting}.pem"
    if content is not None:
        bad.write_text(content)
    tls[setting] = str(bad)
    config = tmp_path / "config.yaml"
    cluster = {"name": "tenant-a", "endpoints": tls_etcd_cluster.endpoints[:1], "tls": tls}
    config.write_text(yaml.safe_dump({"clusters": [cluster]}))
    assert main(["status", "--config", str(config), "--cluster", "tenant-a"]) == 2
    assert capsys.readouterr().err == f"etcd-autodefrag: cluster tenant-a: tls.{setting} {bad}: {problem}\n"


def test_serve_with_a_missing_ca_is_a_config_error_not_a_port_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = _free_ports(1)
    config = tmp_path / "config.yaml"
    cluster = {
        "name": "tenant-a",
        "endpoints": ["https://127.0.0.1:2379"],
        "tls": {"ca_file": "/nonexistent/ca.crt", "cert_file": "/c.crt", "key_file": "/c.key"},
    }
    config.write_text(yaml.safe_dump({"clusters": [cluster]}))
    code = main(["serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "etcd-autodefrag: cluster tenant-a: tls.ca_file /nonexistent/ca.crt: no such file or directory" in err
    )
    assert "cannot listen" not in err
    assert "serving" not in err


def test_serve_on_a_port_in_use_says_so_before_claiming_to_serve(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--listen", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"etcd-autodefrag: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "serving /metrics" not in err  # the bind comes first


# --- one CLI contract (issue 17 item 6) ------------------------------------------------------------


def help_text(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert exit_code([*args, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ([], ["etcd-autodefrag defrag --cluster tenant-a"]),
        (
            ["defrag"],
            ["(default: 300)", "(default: 1800)", "(default: 5)", "dbSizeFree >= 104857600", "--dry-run"],
        ),
        (["status"], ["(default: text)", "etcd-autodefrag status --endpoints"]),
        (["serve"], ["(default: 127.0.0.1:9479)", "etcd-autodefrag serve --config"]),
        (["render", "cronjob"], ["etcd-autodefrag render cronjob -e kamaji-etcd"]),
        (["render", "job"], ["AlreadyExists", "| kubectl create -f -"]),
    ],
)
def test_help_shows_defaults_an_example_and_the_one_exit_code_table(
    command: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys)
    for part in shown:
        assert part in " ".join(text.split()), part
    assert exit_code_table() in text
    assert "waits its turn" not in text  # a second `kubectl create` fails with AlreadyExists


def test_docs_list_the_exit_codes_of_the_code() -> None:
    docs = (ROOT / "docs" / "cli.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", docs, flags=re.MULTILINE)
    assert [(int(code), meaning) for code, meaning in rows] == [
        (int(code), meaning) for code, meaning in EXIT_CODE_MEANINGS.items()
    ]
    # The engine's results exit with codes of that table.
    assert {RunResult(r): c for r, c in EXIT_CODES.items()} == {
        RunResult.SUCCESS: ExitCode.OK,
        RunResult.NOTHING_TO_DO: ExitCode.OK,
        RunResult.DRY_RUN: ExitCode.OK,
        RunResult.FAILED: ExitCode.FAILED,
        RunResult.REFUSED: ExitCode.REFUSED,
        RunResult.DEFERRED: ExitCode.DEFERRED,
    }


def test_status_output_formats_are_named_as_defrag_s(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--endpoints", etcd.endpoints[0], "--output", "text"]) == 0
    text = capsys.readouterr().out
    assert main(["status", "--endpoints", etcd.endpoints[0], "--output", "table"]) == 0  # the old name
    assert capsys.readouterr().out.splitlines()[:2] == text.splitlines()[:2]


def report_schema() -> dict[str, Any]:
    return json.loads((resources.files("exporter") / "schemas" / "run-report.schema.json").read_text())


def status_schema() -> dict[str, Any]:
    return json.loads((resources.files("exporter") / "schemas" / "status.schema.json").read_text())


def test_json_reports_of_real_runs_match_the_schema(
    etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_LOCK_DIR", str(tmp_path))
    validator = jsonschema.Draft202012Validator(report_schema())
    endpoint = ["--endpoints", etcd.endpoints[0], "--output", "json"]
    etcd.churn()
    reports = {}
    for name, flags in {
        "dry_run": ["--dry-run", "--rule", "dbSizeFree > 0", *SETTLED],
        "deferred": ["--rule", "dbSizeFree > 0", "--settle-seconds", "36000"],
        "success": ["--rule", "dbSizeFree > 0", "--compact", *SETTLED],
        "nothing_to_do": ["--rule", "false", *SETTLED],
    }.items():
        main(["defrag", *endpoint, *flags])
        reports[name] = json.loads(capsys.readouterr().out)
    (port,) = _free_ports(1)
    main(["defrag", "--endpoints", f"http://127.0.0.1:{port}", "--output", "json", "--request-timeout", "1"])
    reports["refused"] = json.loads(capsys.readouterr().out)
    for result, report in reports.items():
        validator.validate(report)
        assert report["result"] == result
    skipped = reports["nothing_to_do"]["members"]
    assert {m["outcome"] for m in skipped} == {"skipped"}
    assert all(m["size_after_bytes"] is None and m["duration_seconds"] is None for m in skipped)
    assert all(m["size_before_bytes"] > 0 for m in skipped)
    assert reports["nothing_to_do"]["compacted_revision"] is None
    assert reports["success"]["compacted_revision"] > 0
    assert list(tmp_path.iterdir()) == []  # every run removed its lock file
    # The summary written when the full report outgrows a termination message matches too.
    members = [
        MemberReport(name=f"member-{i:03}" * 8, id=f"{i + 1:x}", endpoint="", leader=False) for i in range(60)
    ]
    summary = json.loads(RunReport(cluster="c", result=RunResult.FAILED, members=members).summary_json())
    assert summary["summary"] is True
    validator.validate(summary)


def test_status_json_matches_its_schema_with_alarms_as_a_list(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--endpoints", etcd.endpoints[0], "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator(status_schema()).validate(rows)
    assert [r["alarms"] for r in rows] == [[], [], []]


def test_text_reports_say_what_a_dry_run_would_reclaim_and_why_a_run_was_refused(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    etcd.churn()
    assert (
        main(["defrag", "--endpoints", etcd.endpoints[0], "--dry-run", "--rule", "dbSizeFree > 0", *SETTLED])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["WOULD", "RECLAIM"]
    rows = [line for line in lines[1:] if "would_defrag" in line]
    assert len(rows) == 3
    assert all(not row.endswith(" 0 B") and row.split()[-1] in ("KiB", "MiB") for row in rows)
    assert lines[-1].startswith("dry_run (would reclaim ")
    (port,) = _free_ports(1)
    assert main(["defrag", "--endpoints", f"http://127.0.0.1:{port}", "--request-timeout", "1"]) == 3
    out = capsys.readouterr().out
    assert out == f"refused: no configured endpoint answered: http://127.0.0.1:{port}: " + (
        "/v3/cluster/member/list: connection refused\n"
    )


def test_a_foreign_lock_holder_is_shown_as_text(
    etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    etcd.churn()
    etcd.put(LOCK_KEY.decode(), b"someone else")  # not a holder record of ours
    assert main(["defrag", "--endpoints", etcd.endpoints[0], "--rule", "dbSizeFree > 0", *SETTLED]) == 3
    out = capsys.readouterr().out
    assert "another defrag run holds the lock key /etcd-autodefrag/defrag-lock in etcd: 'someone else'" in out
    assert "b'" not in out


# --- the safety gates (docs/safety.md) --------------------------------------------------------


def test_a_single_member_cluster_needs_allow_unavailable_and_status_shows_the_risk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with start_cluster(tmp_path / "etcd", size=1) as cluster:
        cluster.churn()
        endpoint = cluster.endpoints[0]
        defrag = ["defrag", "--endpoints", endpoint, "--rule", "dbSizeFree > 0", "--output", "json", *SETTLED]

        assert main(defrag) == 3
        refused = json.loads(capsys.readouterr().out)
        assert refused["result"] == "refused"
        assert "a single voting member" in refused["reason"]
        assert "--allow-unavailable" in refused["reason"]
        assert refused["members"][0]["outcome"] == "not_reached"

        assert main(["status", "--endpoints", endpoint]) == 0
        text = capsys.readouterr().out
        assert "defrag risk (cluster_unavailable): a single voting member: the whole cluster stops" in text
        assert main(["status", "--endpoints", endpoint, "--output", "json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["defrag_cost"] == "cluster_unavailable"

        assert main([*defrag, "--allow-unavailable"]) == 0
        assert json.loads(capsys.readouterr().out)["result"] == "success"


def test_a_deferred_run_exits_75(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """The shared cluster started this session, well within an hour: a rollout for the gate."""
    etcd.churn()
    args = ["defrag", "--endpoints", etcd.endpoints[0], "--rule", "dbSizeFree > 0", "--output", "json"]
    assert main([*args, "--settle-seconds", "36000"]) == 75
    report = json.loads(capsys.readouterr().out)
    assert (report["result"], report["exit_code"]) == ("deferred", 75)
    assert "settle_seconds 36000" in report["reason"]
    assert {m["outcome"] for m in report["members"]} == {"not_reached"}
