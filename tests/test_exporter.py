"""`etcd-autodefrag serve`: /metrics against real etcd, parsed with prometheus-client's own parser."""

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster
from prometheus_client.parser import text_string_to_metric_families

from exporter.config.settings import ClusterConfig, Settings
from exporter.defrag.lock import TOKEN_COUNT
from exporter.service.app import REFRESHER, create_app, reconfigure

pytestmark = pytest.mark.etcd

ClientFactory = Callable[..., Any]


def cluster_config(name: str, cluster: EtcdCluster, **overrides: Any) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {"name": name, "endpoints": cluster.endpoints[:1], "rule": "dbSizeFree > 1024*1024", **overrides}
    )


def settings(**overrides: Any) -> Settings:
    # min_refresh_interval 0: every scrape refreshes, so a test sees the effect of what it just did.
    return Settings(**{"min_refresh_interval_seconds": 0, "scrape_budget_seconds": 3, **overrides})


class Scrape:
    """One parsed exposition: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def by_member(self, name: str, cluster: str) -> dict[str, float]:
        return {
            s.labels["member"]: s.value
            for s in self.samples
            if s.name == name and s.labels.get("etcd_cluster") == cluster
        }

    def series_of(self, cluster: str) -> list[str]:
        return [s.name for s in self.samples if s.labels.get("etcd_cluster") == cluster]


async def scrape(client: TestClient) -> Scrape:
    # What Prometheus sends; we answer in the text format, which it accepts too.
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
    response = await client.get("/metrics", headers={"Accept": accept})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(await response.text())


@pytest.fixture
async def serve(aiohttp_client: ClientFactory) -> Callable[..., Any]:
    async def start(clusters: list[ClusterConfig], **options: Any) -> TestClient:
        client: TestClient = await aiohttp_client(create_app(settings(**options), clusters=clusters))
        return client

    return start


async def test_gauges_agree_with_etcd(etcd: EtcdCluster, serve: Callable[..., Any]) -> None:
    client = await serve([cluster_config("main", etcd)])
    # etcd commits in the background now and then; compare a scrape taken between two equal readings.
    for _ in range(20):
        statuses = {m.name: m.status() for m in etcd.members}
        metrics = await scrape(client)
        if statuses == {m.name: m.status() for m in etcd.members}:
            break
    else:
        pytest.fail("etcd never held still between two status readings")
    assert metrics.by_member("etcd_autodefrag_member_up", "main") == dict.fromkeys(statuses, 1.0)
    sizes = metrics.by_member("etcd_autodefrag_db_size_bytes", "main")
    in_use = metrics.by_member("etcd_autodefrag_db_size_in_use_bytes", "main")
    free = metrics.by_member("etcd_autodefrag_db_free_bytes", "main")
    for name, status in statuses.items():
        assert sizes[name] == int(status["dbSize"])
        assert in_use[name] == int(status["dbSizeInUse"])
        assert free[name] == sizes[name] - in_use[name]
    assert metrics.by_member("etcd_autodefrag_db_quota_bytes", "main") == dict.fromkeys(
        statuses, etcd.quota_bytes
    )
    leaders = metrics.by_member("etcd_autodefrag_member_is_leader", "main")
    assert leaders == {name: float(name == etcd.leader().name) for name in statuses}
    assert metrics.value("etcd_autodefrag_cluster_healthy", etcd_cluster="main") == 1
    assert metrics.value("etcd_autodefrag_cluster_members", etcd_cluster="main") == 3
    headroom = metrics.value("etcd_autodefrag_cluster_quota_headroom_bytes", etcd_cluster="main")
    assert headroom == etcd.quota_bytes - max(sizes.values())
    for name in statuses:
        for alarm in ("NOSPACE", "CORRUPT"):
            assert (
                metrics.value("etcd_autodefrag_alarm_active", etcd_cluster="main", member=name, alarm=alarm)
                == 0
            )


# etcd's own gauge for each of ours (https://etcd.io/docs/v3.5/metrics/), as each member exports it.
ETCD_OWN_GAUGES = {
    "etcd_mvcc_db_total_size_in_bytes": "etcd_autodefrag_db_size_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes": "etcd_autodefrag_db_size_in_use_bytes",
    "etcd_server_quota_backend_bytes": "etcd_autodefrag_db_quota_bytes",
    "etcd_server_is_leader": "etcd_autodefrag_member_is_leader",
}


def etcd_own_gauges(cluster: EtcdCluster) -> dict[str, dict[str, float]]:
    """etcd gauge name -> member name -> value, read from every member's /metrics."""
    pages = {m.name: Scrape(m.metrics_page()) for m in cluster.members}
    return {name: {member: page.value(name) for member, page in pages.items()} for name in ETCD_OWN_GAUGES}


async def test_gauges_equal_etcds_own_metrics(etcd: EtcdCluster, serve: Callable[..., Any]) -> None:
    client = await serve([cluster_config("main", etcd)])
    # As above: a scrape taken between two equal readings of etcd's metrics.
    for _ in range(20):
        theirs = etcd_own_gauges(etcd)
        ours = await scrape(client)
        if theirs == etcd_own_gauges(etcd):
            break
    else:
        pytest.fail("etcd's metrics never held still between two readings")
    assert sum(theirs["etcd_server_is_leader"].values()) == 1
    for etcd_name, our_name in ETCD_OWN_GAUGES.items():
        assert ours.by_member(our_name, "main") == theirs[etcd_name], etcd_name


async def test_exposition_names_types_labels_and_help(etcd: EtcdCluster, serve: Callable[..., Any]) -> None:
    metrics = await scrape(await serve([cluster_config("main", etcd)]))
    expected_gauges = {
        "etcd_autodefrag_member_up",
        "etcd_autodefrag_db_size_bytes",
        "etcd_autodefrag_db_size_in_use_bytes",
        "etcd_autodefrag_db_quota_bytes",
        "etcd_autodefrag_db_free_bytes",
        "etcd_autodefrag_db_fragmentation_ratio",
        "etcd_autodefrag_db_quota_usage_ratio",
        "etcd_autodefrag_member_is_leader",
        "etcd_autodefrag_defrag_recommended",
        "etcd_autodefrag_alarm_active",
        "etcd_autodefrag_cluster_quota_headroom_bytes",
        "etcd_autodefrag_cluster_defrag_recommended",
        "etcd_autodefrag_cluster_healthy",
        "etcd_autodefrag_refresh_duration_seconds",
    }
    for name in expected_gauges:
        family = metrics.families[name]
        assert family.type == "gauge", name
        assert len(family.documentation) > 20, name
    assert metrics.families["etcd_autodefrag_refresh_errors"].type == "counter"
    # Info families travel as `<name>_info` gauges with value 1 in the Prometheus text format.
    assert metrics.families["etcd_autodefrag_member_info"].type == "gauge"
    assert metrics.value("etcd_autodefrag_build_info") == 1
    for sample in metrics.samples:
        if sample.name.startswith(("etcd_autodefrag_db_", "etcd_autodefrag_member_up")):
            assert {"etcd_cluster", "member"} <= set(sample.labels), sample
            assert "cluster" not in sample.labels
    info = [s for s in metrics.samples if s.name == "etcd_autodefrag_member_info"]
    assert {s.labels["client_url"] for s in info} == set(
        etcd.endpoints
    )  # not "endpoint": it clashes with ServiceMonitor target labels
    assert all(s.labels["version"].startswith("3.") for s in info)


async def test_fragmentation_rises_with_churn_and_falls_after_defrag(
    etcd: EtcdCluster, serve: Callable[..., Any]
) -> None:
    client = await serve([cluster_config("main", etcd)])
    etcd.etcdctl("defrag", "--cluster")
    calm = await scrape(client)
    etcd.churn()
    churned = await scrape(client)
    etcd.etcdctl("defrag", "--cluster")
    defragmented = await scrape(client)

    def ratios(s: Scrape) -> dict[str, float]:
        return s.by_member("etcd_autodefrag_db_fragmentation_ratio", "main")

    def free(s: Scrape) -> dict[str, float]:
        return s.by_member("etcd_autodefrag_db_free_bytes", "main")

    for member in ratios(calm):
        assert ratios(churned)[member] > ratios(calm)[member]
        assert ratios(churned)[member] > 0.5
        assert free(churned)[member] > free(calm)[member] + 1024 * 1024
        assert ratios(defragmented)[member] < ratios(churned)[member]
        assert free(defragmented)[member] < free(churned)[member] / 10
    assert churned.value("etcd_autodefrag_cluster_defrag_recommended", etcd_cluster="main") == 1
    assert set(churned.by_member("etcd_autodefrag_defrag_recommended", "main").values()) == {1.0}
    assert defragmented.value("etcd_autodefrag_cluster_defrag_recommended", etcd_cluster="main") == 0


async def test_stopped_member_is_down_within_one_scrape(
    fresh_etcd_cluster: EtcdCluster, serve: Callable[..., Any]
) -> None:
    cluster = fresh_etcd_cluster
    client = await serve([cluster_config("main", cluster)])
    before = await scrape(client)
    assert set(before.by_member("etcd_autodefrag_member_up", "main").values()) == {1.0}
    stopped = cluster.members[2]
    stopped.stop()

    after = await scrape(client)

    up = after.by_member("etcd_autodefrag_member_up", "main")
    assert up == {m.name: float(m is not stopped) for m in cluster.members}
    sizes = after.by_member("etcd_autodefrag_db_size_bytes", "main")
    assert stopped.name not in sizes  # no old value for a member that did not answer
    assert set(sizes) == {m.name for m in cluster.members if m is not stopped}
    assert after.value("etcd_autodefrag_cluster_healthy", etcd_cluster="main") == 0
    assert after.value("etcd_autodefrag_refresh_errors_total", etcd_cluster="main") >= 1


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A TCP endpoint that accepts connections and never answers (a hung member)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


async def test_a_hung_cluster_does_not_hold_up_the_others(
    etcd: EtcdCluster, blackhole: str, serve: Callable[..., Any]
) -> None:
    hung = ClusterConfig(name="hung", endpoints=[blackhole], discover_members=False)
    client = await serve([cluster_config("main", etcd), hung], scrape_budget_seconds=1)
    metrics = await scrape(client)
    assert set(metrics.by_member("etcd_autodefrag_member_up", "main").values()) == {1.0}
    assert metrics.value("etcd_autodefrag_cluster_healthy", etcd_cluster="hung") == 0
    # What etcd would have told us is absent; what we know without etcd (refresh figures, run
    # counters at 0, runs in flight) is there.
    from_etcd = [
        n
        for n in metrics.series_of("hung")
        if n.startswith(("etcd_autodefrag_db_", "etcd_autodefrag_member"))
    ]
    assert from_etcd == []
    assert {"etcd_autodefrag_cluster_healthy", "etcd_autodefrag_refresh_errors_total"} <= set(
        metrics.series_of("hung")
    )
    assert "etcd_autodefrag_cluster_defrag_recommended" not in metrics.series_of("hung")
    # Bounded by the 1 s budget, not by the 5 s request timeout (slack for a busy CI machine).
    assert metrics.value("etcd_autodefrag_refresh_duration_seconds", etcd_cluster="hung") < 4


async def test_a_removed_cluster_leaves_no_series(etcd: EtcdCluster, serve: Callable[..., Any]) -> None:
    client = await serve([cluster_config("one", etcd), cluster_config("two", etcd)])
    both = await scrape(client)
    assert both.series_of("one")
    assert both.series_of("two")
    assert both.value("etcd_autodefrag_runs_total", etcd_cluster="two", result="success") == 0
    reconfigure(client.app, [cluster_config("one", etcd)])
    only_one = await scrape(client)
    assert only_one.series_of("one")
    assert only_one.series_of("two") == []


async def test_concurrent_scrapes_share_one_refresh(etcd: EtcdCluster, serve: Callable[..., Any]) -> None:
    client = await serve([cluster_config("main", etcd)], min_refresh_interval_seconds=60)
    await scrape(client)
    refresher = client.app[REFRESHER]
    count = refresher.refreshes_total
    await asyncio.gather(*(scrape(client) for _ in range(20)))
    assert refresher.refreshes_total == count  # inside the interval: no new refresh at all


async def test_health_and_readiness(etcd: EtcdCluster, aiohttp_client: ClientFactory) -> None:
    app = create_app(settings(background_refresh_seconds=3600), clusters=[cluster_config("main", etcd)])
    client: TestClient = await aiohttp_client(app)
    assert (await client.get("/healthz")).status == 200
    refresher = client.app[REFRESHER]
    await refresher.refresh(max_age_seconds=0)
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert isinstance(app, web.Application)


async def test_not_ready_before_the_first_refresh(aiohttp_client: ClientFactory, blackhole: str) -> None:
    hung = ClusterConfig(name="hung", endpoints=[blackhole])
    # The first refresh waits up to the 60 s budget on a member that never answers.
    app = create_app(settings(scrape_budget_seconds=60), clusters=[hung])
    client: TestClient = await aiohttp_client(app)
    response = await client.get("/readyz")
    assert response.status == 503
    assert "waiting for the first refresh" in await response.text()


async def test_serve_writes_the_nospace_lock_tokens_while_the_cluster_has_space(
    etcd: EtcdCluster, serve: Callable[..., Any]
) -> None:
    """A run that starts under NOSPACE can lock only with tokens written before (docs/locking.md)."""
    await scrape(await serve([cluster_config("main", etcd)]))
    assert sorted(etcd.keys_with_prefix("/etcd-autodefrag/")) == [
        f"nospace-lock/{i:02d}" for i in range(TOKEN_COUNT)
    ]


async def test_a_dry_run_service_writes_nothing_to_etcd(etcd: EtcdCluster, serve: Callable[..., Any]) -> None:
    revision = etcd.revision()
    await scrape(await serve([cluster_config("main", etcd)], executor={"dry_run": True}))
    assert etcd.keys_with_prefix("/etcd-autodefrag/") == {}
    assert etcd.revision() == revision
