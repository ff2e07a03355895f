"""The safety gates as the service applies them (docs/safety.md), over real HTTP and real etcd.

The engine's own gates are tested in test_engine.py and the pure decisions in test_policy.py; here:
the webhook does not launch a run its quorum gate would refuse, the Kubernetes executor creates no Job
while a kamaji StatefulSet rolls out, and a deferred run starts no cooldown.
"""

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster, start_cluster
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient
from test_webhook import (
    FakeExecutor,
    alert,
    eventually,
    notification,
    outcomes,
    post,
    reason,
    scrape,
    settings,
)

from exporter.config.settings import ClusterConfig
from exporter.launch.executor import Executor
from exporter.launch.kubernetes import KubernetesExecutor
from exporter.launch.local import LocalExecutor
from exporter.service.app import create_app

Serve = Callable[..., Awaitable[TestClient]]

pytestmark = pytest.mark.etcd


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The executor kind `auto` looks at KUBERNETES_SERVICE_HOST: keep CI pods from changing the tests.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture
def serve(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> Serve:
    async def start(clusters: list[ClusterConfig], executor: Executor, **options: Any) -> TestClient:
        return await aiohttp_client(create_app(settings(), clusters=clusters, executor=executor, **options))

    return start


@pytest.fixture
def one_member(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = start_cluster(tmp_path / "etcd", size=1)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_the_webhook_launches_nothing_the_quorum_gate_would_refuse(
    one_member: EtcdCluster, serve: Serve
) -> None:
    executor = FakeExecutor()
    solo = ClusterConfig(name="solo", endpoints=one_member.endpoints)
    accepted = ClusterConfig(name="accepted", endpoints=one_member.endpoints, allow_unavailable_defrag=True)
    client = await serve([solo, accepted], executor)

    status, body = await post(client, notification(alert("solo")))
    assert (status, outcomes(body)) == (200, ["skip_unavailable"])
    assert "a single voting member" in reason(body, "skip_unavailable")
    assert executor.launched == []  # no Job, no local run: nothing to cool down after
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_unavailable") == 1

    status, body = await post(client, notification(alert("accepted")))
    assert (status, outcomes(body)) == (200, ["launch"])
    assert [name for name, _ in executor.launched] == ["accepted"]


def kamaji_cluster(etcd: EtcdCluster) -> ClusterConfig:
    assert etcd.tls is not None
    return ClusterConfig.model_validate(
        {
            "name": "tenant",
            "endpoints": etcd.endpoints,
            "tls": {
                "ca_file": etcd.tls.ca_file,
                "cert_file": etcd.tls.cert_file,
                "key_file": etcd.tls.key_file,
            },
            "kubernetes": {
                "namespace": "kamaji-system",
                "variant": "kamaji",
                "etcd_name": "tenant-etcd",
                "secret_layout": "self-signed",
            },
        }
    )


async def test_no_job_while_the_kamaji_statefulset_rolls_out(
    tls_etcd_cluster: EtcdCluster, serve: Serve, fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    statefulset = fake_kube.add_statefulset("kamaji-system", "tenant-etcd", replicas=3)
    # `kubectl rollout restart`: a new revision, one Pod updated so far.
    statefulset["metadata"]["generation"] = 2
    statefulset["status"].update(observedGeneration=2, updatedReplicas=1, updateRevision="tenant-etcd-2")
    executor = KubernetesExecutor(
        api_client=kube_api,
        image="ghcr.io/etcd-autodefrag/etcd-autodefrag:test",
        cooldown_seconds=3600,
        timeout_seconds=5,
        namespaces=["kamaji-system"],  # watched from the start, as the service does
    )
    client = await serve([kamaji_cluster(tls_etcd_cluster)], executor)

    status, body = await post(client, notification(alert("tenant")))
    assert (status, outcomes(body)) == (200, ["skip_deferred"])
    assert reason(body, "skip_deferred") == (
        "deferred: StatefulSet tenant-etcd: rolling update in progress "
        "(1 of 3 replicas at revision tenant-etcd-2)"
    )
    assert fake_kube.jobs == {}

    # Rolled out: the next notification (Alertmanager re-sends firing alerts) launches at once.
    statefulset["status"].update(updatedReplicas=3, currentRevision="tenant-etcd-2")
    status, body = await post(client, notification(alert("tenant")))
    assert (status, outcomes(body)) == (200, ["launch"])
    assert list(fake_kube.jobs) == [("kamaji-system", "etcd-autodefrag-tenant")]


async def test_a_deferred_run_starts_no_cooldown(etcd: EtcdCluster, serve: Serve, tmp_path: Path) -> None:
    """Alert -> webhook -> local executor -> the real `defrag` child, deferred by the rollout gate."""
    etcd.churn()
    # The shared cluster started this session: within 10 hours, a member "just restarted".
    cluster = {
        "name": "t",
        "endpoints": etcd.endpoints[:1],
        "rule": "dbSizeFree > 0",
        "settle_seconds": 36000,
    }
    executor = LocalExecutor(
        state_dir=tmp_path / "state",
        cooldown_seconds=3600,
        reconcile_interval_seconds=0.05,
    )
    client = await serve([ClusterConfig.model_validate(cluster)], executor)

    for attempt in (1, 2):
        status, body = await post(client, notification(alert("t")))
        assert (status, outcomes(body)) == (200, ["launch"]), body  # the second: no skip_cooldown

        async def recorded(count: int = attempt) -> bool:
            metrics = await scrape(client)
            return metrics.value("etcd_autodefrag_runs_total", etcd_cluster="t", result="deferred") == count

        await eventually(recorded, timeout=60, what=f'runs_total{{result="deferred"}} == {attempt}')
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_runs_total", etcd_cluster="t", result="success") == 0
    assert (
        metrics.value("etcd_autodefrag_last_run_timestamp_seconds", etcd_cluster="t", result="deferred") > 0
    )
