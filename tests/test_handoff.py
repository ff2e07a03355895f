"""A launched run is handed the cluster the service resolved (exporter/core/handoff.py), not a config
file to re-read: what runs is what was decided, whatever happens to the file afterwards."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_harness import EtcdCluster
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient

from exporter.cli.main import main
from exporter.cli.parser import build_parser, cluster_from_args
from exporter.config.settings import ClusterConfig, Settings, TlsConfig, load_settings
from exporter.core.handoff import RunSettings, cluster_from_json, cluster_json, run_args
from exporter.core.launches import LaunchOutcome, Trigger
from exporter.core.report import RunOutcome, RunResult
from exporter.kubernetes.api import discover
from exporter.kubernetes.jobs import CA_FILE, CERT_FILE, KEY_FILE
from exporter.launch.kubernetes import KubernetesExecutor
from exporter.launch.local import local_executor

TRIGGER = Trigger(alertname="EtcdDefragRecommended")
NOTHING_TO_SELECT = "dbSizeFree > 1024*1024*1024"  # the shared cluster's quota is 32 MiB


def test_the_json_round_trips_and_leaves_defaults_out() -> None:
    cluster = ClusterConfig.model_validate(
        {
            "name": "t",
            "endpoints": ["https://10.0.0.1:2379"],
            "tls": {"ca_file": "/etc/ca.crt", "server_name": "etcd.example"},
            "rule": NOTHING_TO_SELECT,
            "kubernetes": {"namespace": "etcd", "tls_secret": "etcd-client"},
        }
    )
    text = cluster_json(cluster)
    assert cluster_from_json(text) == cluster
    assert "deadline_seconds" not in text  # a default: left to the run's own model
    assert "BEGIN" not in text  # paths, never certificate contents


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not a cluster configuration"),
        ('{"name": "t"}', "endpoints: give at least one client URL"),
        ('{"name": "t", "endpoints": ["http://a:1"], "typo": 1}', "typo: unknown setting"),
    ],
)
def test_a_bad_cluster_json_is_a_usage_error(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["defrag", "--cluster-json", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("etcd-autodefrag: --cluster-json: ")
    assert message in err
    assert "Traceback" not in err


def test_cluster_json_and_cluster_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    handed = cluster_json(ClusterConfig(name="t", endpoints=["http://127.0.0.1:1"]))
    assert main(["defrag", "--cluster-json", handed, "--cluster", "t"]) == 2
    assert "--cluster and --cluster-json: give one" in capsys.readouterr().err


@pytest.mark.etcd
async def test_a_local_run_acts_on_what_the_service_decided_after_the_file_changed(
    etcd: EtcdCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    cluster: dict[str, Any] = {
        "name": "t",
        "endpoints": etcd.endpoints[:1],
        "rule": NOTHING_TO_SELECT,
        "settle_seconds": 0,  # the shared cluster may have started moments ago
    }
    config.write_text(yaml.safe_dump({"clusters": [cluster]}))
    settings = load_settings(config, executor={"state_dir": tmp_path / "state"})
    decided = settings.cluster("t")
    # Then the file changes under the service (an edit not yet reloaded): the cluster now points at
    # nothing. The child inherits the service's environment, which names the file.
    config.write_text(yaml.safe_dump({"clusters": [{**cluster, "endpoints": ["http://127.0.0.1:1"]}]}))
    monkeypatch.setenv("ETCD_AUTODEFRAG_CONFIG", str(config))

    ended: asyncio.Queue[RunOutcome] = asyncio.Queue()
    executor = local_executor(settings)
    await executor.start(ended.put_nowait)
    try:
        launched = await executor.launch(decided, TRIGGER)
        assert launched.outcome is LaunchOutcome.CREATED
        outcome = await asyncio.wait_for(ended.get(), timeout=60)
    finally:
        await executor.stop()
    assert outcome.result is RunResult.NOTHING_TO_DO, outcome.reason
    report = json.loads((tmp_path / "state" / "t.report.json").read_text())
    assert report["cluster"] == "t"
    assert len(report["members"]) == len(etcd.endpoints)  # it reached the cluster the service decided on


async def test_the_job_is_handed_the_resolved_cluster_and_its_args_rebuild_it(
    fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    """The Job spec (`kubectl get job -o yaml`) holds the cluster as the service resolved it from the
    API, and the CLI's own parsing of the container's args gives back exactly that cluster."""
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas=3, layout="cert-manager")
    configured = ClusterConfig.model_validate(
        {
            "name": "tenant-a",
            "tls": {"ca_file": "/srv/ca.crt", "cert_file": "/srv/c.crt", "key_file": "/srv/c.key"},
            "kubernetes": {
                "namespace": "kamaji-system",
                "variant": "kamaji",
                "etcd_name": "kamaji-etcd",
                "discover_endpoints": True,
            },
        }
    )
    decided = await discover(configured, kube_api)  # endpoints and certificate layout from the API
    executor = KubernetesExecutor(
        api_client=kube_api,
        image="img:1",
        cooldown_seconds=60,
        timeout_seconds=5,
        run_settings=RunSettings(log_format="json", log_level="DEBUG"),
    )
    await executor.start(lambda _outcome: None)
    try:
        assert (await executor.launch(decided, TRIGGER)).outcome is LaunchOutcome.CREATED
    finally:
        await executor.stop()
    pod = fake_kube.job("kamaji-system", "etcd-autodefrag-tenant-a")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[: len(run_args(decided, executor.run_settings))] == run_args(decided, executor.run_settings)
    assert not [v for v in pod["volumes"] if "configMap" in v]  # nothing else to read it from

    parsed = build_parser().parse_args(args)
    assert (parsed.log_format, parsed.log_level) == ("json", "DEBUG")
    runs = cluster_from_args(parsed, Settings())
    # The one difference: the TLS files are where the pod mounts them (--cacert/--cert/--key).
    assert runs.tls == TlsConfig(ca_file=Path(CA_FILE), cert_file=Path(CERT_FILE), key_file=Path(KEY_FILE))
    assert runs.model_copy(update={"tls": decided.tls}) == decided
