"""The command line: defrag and status against real etcd, TLS, exit codes, messages for bad input."""

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from etcd_harness import EtcdCluster, _free_ports, start_cluster, wait_until
from fake_kube import FakeKube
from test_render import kubeconfig

from exporter import executors, jobs
from exporter.cli import discovered, main
from exporter.settings import ClusterConfig

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
    assert code == 1
    assert out.count("| http") == 3
    assert "etcd-2" in out
    assert "Connect" in out or "connect" in out  # the reason for the missing member is shown


def test_cluster_from_config_file(
    etcd: EtcdCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"clusters:\n  - name: shared\n    endpoints: [{etcd.endpoints[1]}]\n    rule: 'false'\n"
    )
    assert main(["defrag", "--config", str(config), "--cluster", "shared", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"] == "nothing_to_do"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["defrag", "--endpoints", "http://127.0.0.1:1", "--rule", "dbSize >"],
            "invalid defrag rule at column",
        ),
        (["defrag", "--endpoints", "ftp://x"], "is not a client URL"),
        (["defrag", "--endpoints", "http://127.0.0.1:1", "--cert", "/c"], "cert_file and key_file"),
        (
            ["defrag", "--endpoints", "https://127.0.0.1:1", "--cacert", "/nonexistent"],
            "cannot load TLS files",
        ),
        (["defrag", "--cluster", "nope"], "'nope' is not in the configuration"),
        (["defrag", "--endpoints", "http://127.0.0.1:1", "--deadline", "-1"], "deadline_seconds"),
    ],
)
def test_bad_usage_exits_2_with_a_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ETCD_AUTODEFRAG_CONFIG", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("clusters:\n  - name: a\n    endpoints: [http://x:2379]\n    paused: maybe\n")
    assert main(["status", "--config", str(config), "--cluster", "a"]) == 2
    assert "clusters[0].paused" in capsys.readouterr().err


def test_unreachable_cluster_is_refused_with_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["defrag", "--endpoints", "http://127.0.0.1:9", "--request-timeout", "1"]) == 3
    assert "refused: no configured endpoint answered" in capsys.readouterr().err


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
    assert same is plain
    # The Job has no API access: it gets the discovered URLs on its command line.
    args = jobs.build_job(found, image="i", trigger=jobs.Trigger(alertname="a"))["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert args[args.index("--endpoints") + 1] == ",".join(urls)
    local = executors.LocalExecutor(
        state_dir=tmp_path, config_file=tmp_path / "config.yaml", embedded_default=False, cooldown_seconds=60
    )
    assert local.child_command(found)[-4:] == ["--cluster", "tenant", "--endpoints", ",".join(urls)]
    assert "--endpoints" not in local.child_command(plain)
    with pytest.raises(jobs.JobConfigError, match="not been discovered"):
        jobs.build_job(ClusterConfig.model_validate(KAMAJI), image="i", trigger=jobs.Trigger(alertname="a"))


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
    assert main([*render, "--cluster", "tenant", "--endpoints", "https://m-0:2379,https://m-1:2379"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--endpoints") + 1] == "https://m-0:2379,https://m-1:2379"


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
