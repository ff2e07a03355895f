"""Sharding (issue 15 item 2): the split of the clusters over replicas, and what each replica serves.

The pure split and the shard's resolution are table-tested; the rest runs real services (`create_app`
on loopback) against real etcd: the union of the shards' expositions is the unsharded one, a replica
answers webhooks for another shard's cluster with a fresh read of it, and two replicas behind one
Service launch one Job per cluster through the Kubernetes executor and the fake API server.
"""

import asyncio
import copy
import os
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster
from fake_kube import FakeKube
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import DEPLOY, NAME, built, deployment, find, kustomize, needs_kubectl, one
from test_deploy import NAMESPACE as SERVICE_NAMESPACE
from test_jobs import validate
from test_webhook import (
    NAMESPACE,
    TOKEN,
    FakeExecutor,
    alert,
    eventually,
    job_report,
    kube_executor,
    notification,
    outcomes,
    post,
)

from exporter.cli.main import main
from exporter.config.settings import ENV_PREFIX, ClusterConfig, ConfigError, Settings, load_settings
from exporter.core.shard import Shard, ShardError, resolve_shard, shard_of
from exporter.kubernetes.api import kube_api_client
from exporter.service.app import REFRESHER, create_app, shard_from_settings

ClientFactory = Callable[..., Awaitable[TestClient]]
# Series every replica exports about itself, not about a cluster: left out of the partition.
PER_REPLICA = {
    "etcd_autodefrag_build_info",
    "etcd_autodefrag_shard_info",
    "etcd_autodefrag_alerts_total",
    "etcd_autodefrag_alerts_created",
    "etcd_autodefrag_http_errors_total",
    "etcd_autodefrag_http_errors_created",
}


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # POD_NAME decides the shard when none is set; KUBERNETES_SERVICE_HOST the executor kind.
    for name in ("POD_NAME", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)


# --- the split, pure ---------------------------------------------------------------------------------


# Pinned: a change of hash (Python's salted hash(), another digest) would move clusters between
# shards on upgrade, and two replicas of different versions would then disagree.
@pytest.mark.parametrize(
    ("name", "total", "shard"),
    [
        ("c0", 1, 0),
        ("c0", 2, 1),
        ("c0", 4, 3),
        ("tenant-a", 4, 1),
        ("tenant-b", 4, 2),
        ("kamaji-etcd", 3, 2),
        ("bench-0000", 4, 0),
    ],
)
def test_the_split_is_sha256_of_the_name(name: str, total: int, shard: int) -> None:
    assert shard_of(name, total) == shard


def test_every_cluster_has_one_shard_and_the_shards_are_balanced() -> None:
    names = [f"cluster-{i:04d}" for i in range(4000)]
    for total in range(1, 9):
        shards = [Shard(i, total) for i in range(total)]
        owners = [[s.index for s in shards if s.owns(name)] for name in names]
        assert all(len(o) == 1 for o in owners), f"total {total}: a cluster in no or several shards"
        counts = Counter(o[0] for o in owners)
        expected = len(names) / total
        # sha256 is uniform: 4000 names stay within 15% of an even split (binomial sd ~1.6% here).
        assert all(abs(counts[i] - expected) < 0.15 * expected for i in range(total)), counts


@pytest.mark.parametrize(
    ("shard", "total", "pod_name", "expected"),
    [
        (None, 1, None, Shard(0, 1)),
        (None, 1, "anything", Shard(0, 1)),
        (2, 4, None, Shard(2, 4)),
        (2, 4, "etcd-autodefrag-3", Shard(2, 4)),  # the setting wins over the pod's ordinal
        (None, 4, "etcd-autodefrag-3", Shard(3, 4)),
        (None, 4, "etcd-autodefrag-0", Shard(0, 4)),
        (None, 12, "a-b-c-11", Shard(11, 12)),
    ],
)
def test_resolve_shard(shard: int | None, total: int, pod_name: str | None, expected: Shard) -> None:
    assert resolve_shard(shard=shard, total_shards=total, pod_name=pod_name) == expected


@pytest.mark.parametrize(
    ("pod_name", "message"),
    [
        (None, "this replica's shard is not set: give --shard"),
        ("", "this replica's shard is not set: give --shard"),
        ("etcd-autodefrag", "has no trailing ordinal"),
        ("etcd-autodefrag-7d9f8-x2b4q", "has no trailing ordinal"),  # a Deployment's pod
        ("etcd-autodefrag-01", "has no trailing ordinal"),
        ("etcd-autodefrag-4", "ordinal 4, out of range for sharding.total_shards 4"),
    ],
)
def test_an_underivable_shard_is_a_clear_error(pod_name: str | None, message: str) -> None:
    with pytest.raises(ShardError, match=re.escape(message)):
        resolve_shard(shard=None, total_shards=4, pod_name=pod_name)


def test_shard_out_of_range_is_refused() -> None:
    with pytest.raises(ShardError, match=re.escape("sharding.shard 4 is out of range for total_shards 4")):
        Shard(4, 4)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_AUTODEFRAG_SHARDING__TOTAL_SHARDS", "3")
    monkeypatch.setenv("ETCD_AUTODEFRAG_SHARDING__SHARD", "1")
    settings = load_settings()
    assert (settings.sharding.shard, settings.sharding.total_shards) == (1, 3)
    assert shard_from_settings(settings, {}) == Shard(1, 3)
    # A flag (an override) changes one part and keeps the other from the environment.
    assert load_settings(sharding={"shard": 2}).sharding.total_shards == 3
    monkeypatch.delenv("ETCD_AUTODEFRAG_SHARDING__SHARD")
    assert shard_from_settings(load_settings(), {"POD_NAME": "etcd-autodefrag-2"}) == Shard(2, 3)
    with pytest.raises(ConfigError, match="not set: give --shard"):
        shard_from_settings(load_settings(), {})
    monkeypatch.setenv("ETCD_AUTODEFRAG_SHARDING__SHARD", "3")
    with pytest.raises(ConfigError, match=re.escape("sharding: shard 3 is out of range for total_shards 3")):
        load_settings()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--total-shards", "2"], "this replica's shard is not set: give --shard"),
        (["--shard", "2", "--total-shards", "2"], "shard 2 is out of range for total_shards 2 (0 to 1)"),
        (
            ["--shard", "-1", "--total-shards", "2"],
            "sharding.shard: Input should be greater than or equal to 0",
        ),
        (["--total-shards", "0"], "sharding.total_shards: Input should be greater than or equal to 1"),
    ],
)
def test_serve_refuses_a_bad_shard_at_start_up(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a free port: the refusal must come before any bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["serve", "--listen", f"127.0.0.1:{port}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert "serving" not in err


# --- services against real etcd -------------------------------------------------------------------


def cluster_configs(etcd: EtcdCluster, names: list[str], **overrides: Any) -> list[ClusterConfig]:
    return [
        ClusterConfig.model_validate({"name": name, "endpoints": etcd.endpoints[:1], **overrides})
        for name in names
    ]


def settings(**overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "min_refresh_interval_seconds": 0,
        "scrape_budget_seconds": 3,
        "webhook": {"token": TOKEN},
        # No NOSPACE lock tokens written: the partition test compares values read at different times.
        "executor": {"dry_run": True},
    }
    return Settings(**{**options, **overrides})


Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start(aiohttp_client: ClientFactory) -> Start:
    async def start(clusters: list[ClusterConfig], shard: Shard, executor: Any, **options: Any) -> TestClient:
        app = create_app(settings(**options), clusters=clusters, executor=executor, shard=shard)
        return await aiohttp_client(app)

    return start


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def exposition(client: TestClient) -> Series:
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def comparable(series: Series) -> Series:
    """The series about clusters, with the values that differ between two reads left out."""
    out = {}
    for (name, labels), value in series.items():
        if name in PER_REPLICA:
            continue
        assert "etcd_cluster" in dict(labels), f"{name}{labels}: neither per cluster nor listed per replica"
        varies = name.endswith("_created") or name == "etcd_autodefrag_refresh_duration_seconds"
        out[(name, labels)] = 0.0 if varies else value
    return out


def clusters_in(series: Series) -> set[str]:
    return {dict(labels)["etcd_cluster"] for (_, labels) in series}


PARTITION_CLUSTERS = [f"tenant-{i}" for i in range(12)]


async def test_the_shards_together_export_exactly_the_unsharded_series(
    fresh_etcd_cluster: EtcdCluster, start: Start
) -> None:
    # A cluster of its own: on the shared one, another test's leftovers (a lease that expires, a
    # write) change the sizes between two scrapes; and any change at all is caught below.
    clusters = cluster_configs(fresh_etcd_cluster, PARTITION_CLUSTERS)
    unsharded = await start(clusters, Shard(), FakeExecutor())
    whole = await exposition(unsharded)
    expected = comparable(whole)
    assert clusters_in(expected) == set(PARTITION_CLUSTERS)
    # 3 members per cluster, every member up: the comparison is about real series.
    assert sum(v for (n, _), v in expected.items() if n == "etcd_autodefrag_member_up") == 3 * 12
    per_replica = {name for name, _ in whole} & PER_REPLICA
    assert per_replica == PER_REPLICA
    replicas = {
        total: [await start(clusters, Shard(index, total), FakeExecutor()) for index in range(total)]
        for total in range(1, 5)
    }
    for total, shards in replicas.items():
        # The shards' scrapes against the unsharded scrapes just before and after them: equal when
        # etcd did not change in between (sizes move with any write), so that is what is compared.
        for _attempt in range(5):
            before = comparable(await exposition(unsharded))
            union: Series = {}
            owners: Counter[str] = Counter()
            for index, replica in enumerate(shards):
                series = await exposition(replica)
                info = {k: v for k, v in series.items() if k[0] == "etcd_autodefrag_shard_info"}
                assert info == {
                    ("etcd_autodefrag_shard_info", (("shard", str(index)), ("total_shards", str(total)))): 1.0
                }
                part = comparable(series)
                assert not part.keys() & union.keys(), f"shard {index} of {total} repeats another's series"
                owned = clusters_in(part)
                assert owned == {c for c in PARTITION_CLUSTERS if shard_of(c, total) == index}
                owners.update(owned)
                union |= part
            if comparable(await exposition(unsharded)) == before:
                break
        else:
            pytest.fail(f"{total} shards: etcd changed during each of 5 attempts")
        assert before.keys() == expected.keys()
        assert union == before, f"{total} shards"
        assert owners == Counter(PARTITION_CLUSTERS), f"{total} shards: a cluster in no or several shards"


def hung_endpoint() -> Iterator[str]:
    """A member that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def hung() -> Iterator[str]:
    yield from hung_endpoint()


async def test_readiness_counts_only_the_shards_clusters(etcd: EtcdCluster, start: Start, hung: str) -> None:
    names = [f"tenant-{i}" for i in range(12)]
    slow = next(n for n in names if shard_of(n, 2) == 1)
    clusters = [
        ClusterConfig(name=n, endpoints=[hung], request_timeout_seconds=30)
        if n == slow
        else cluster_configs(etcd, [n])[0]
        for n in names
    ]
    options = {"scrape_budget_seconds": 30}
    shard0 = await start(clusters, Shard(0, 2), FakeExecutor(), **options)
    shard1 = await start(clusters, Shard(1, 2), FakeExecutor(), **options)

    async def ready(client: TestClient) -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(lambda: ready(shard0), timeout=20, what="shard 0 ready")
    # Shard 1 waits for its hung cluster (up to 30 s); shard 0 never looked at it.
    response = await shard1.get("/readyz")
    assert response.status == 503
    assert "shard 1 of 2" in await response.text()
    assert shard0.app[REFRESHER].watches[slow].snapshot is None


def status_calls(etcd: EtcdCluster) -> int:
    """Maintenance.Status requests the members have served (the JSON gateway's go through gRPC)."""
    total = 0
    for member in etcd.members:
        for family in text_string_to_metric_families(member.metrics_page()):
            for s in family.samples:
                if s.name == "grpc_server_started_total" and s.labels.get("grpc_method") == "Status":
                    total += int(s.value)
    return total


async def test_another_shards_cluster_is_read_once_on_demand_and_launched(
    etcd: EtcdCluster, start: Start
) -> None:
    # Shard 0 owns none of these clusters, so nothing but the webhook makes it read their etcd.
    names = [n for n in (f"tenant-{i}" for i in range(40)) if shard_of(n, 2) == 1][:6]
    clusters = cluster_configs(etcd, names)
    executor = FakeExecutor()
    client = await start(clusters, Shard(0, 2), executor)
    await eventually(lambda: _ready(client), timeout=10, what="shard 0 ready")
    refresher = client.app[REFRESHER]
    target = names[2]
    assert refresher.watches[target].snapshot is None  # never read before the alert
    metrics = await exposition(client)
    assert not [k for k in metrics if dict(k[1]).get("etcd_cluster")]  # and not exported
    before = status_calls(etcd)
    answers = await asyncio.gather(*(post(client, notification(alert(target))) for _ in range(50)))
    assert {status for status, _ in answers} == {200}
    found = Counter(o for _, body in answers for o in outcomes(body))
    assert found == {"launch": 1, "skip_already_running": 49}
    assert [name for name, _ in executor.launched] == [target]
    # One read of the cluster for the 50 notifications: one status request to each of its 3 members.
    assert status_calls(etcd) - before == len(etcd.members)
    snapshot = refresher.watches[target].snapshot
    assert snapshot is not None
    assert all(m.up for m in snapshot.members)
    # The read is reused while it is fresh enough: another alert reads nothing.
    executor.running.clear()
    status, body = await post(client, notification(alert(target)))
    assert (status, outcomes(body)) == (200, ["launch"])
    assert status_calls(etcd) - before == len(etcd.members)
    # Still shard 1's cluster: shard 0 exports nothing of it, before or after the read.
    metrics = await exposition(client)
    assert not [k for k in metrics if dict(k[1]).get("etcd_cluster")]


async def _ready(client: TestClient) -> bool:
    return (await client.get("/readyz")).status == 200


async def test_an_unanswering_cluster_of_another_shard_is_skipped_within_the_budget(
    etcd: EtcdCluster, start: Start, hung: str
) -> None:
    name = next(n for n in (f"tenant-{i}" for i in range(40)) if shard_of(n, 2) == 1)
    clusters = [ClusterConfig(name=name, endpoints=[hung])]
    executor = FakeExecutor()
    client = await start(clusters, Shard(0, 2), executor, scrape_budget_seconds=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    answers = await asyncio.gather(*(post(client, notification(alert(name))) for _ in range(20)))
    elapsed = loop.time() - started
    assert {status for status, _ in answers} == {200}
    assert {o for _, body in answers for o in outcomes(body)} == {"skip_unhealthy"}
    assert "no answer within the scrape budget of 1s" in answers[0][1]["outcomes"]["skip_unhealthy"]["reason"]
    assert executor.launched == []
    # The read is cut at the budget (1 s): the webhook answers instead of waiting for the member.
    assert elapsed < 10


# --- two replicas behind one Service, the Kubernetes executor --------------------------------------


@pytest.fixture
async def two_kube_clients(fake_kube: FakeKube) -> AsyncIterator[list[Any]]:
    async with (
        await kube_api_client(host=fake_kube.url) as first,
        await kube_api_client(host=fake_kube.url) as second,
    ):
        yield [first, second]


async def test_two_replicas_launch_one_job_per_cluster_and_count_its_end_once(
    etcd: EtcdCluster, start: Start, fake_kube: FakeKube, two_kube_clients: list[Any]
) -> None:
    names = [f"c{i}" for i in range(10)]
    clusters = cluster_configs(etcd, names, kubernetes={"namespace": NAMESPACE, "variant": "plain"})
    replicas = [
        await start(clusters, Shard(i, 2), kube_executor(api)) for i, api in enumerate(two_kube_clients)
    ]
    # A Service spreads the notifications over both replicas: every cluster's alert reaches both.
    answers = await asyncio.gather(
        *(post(replicas[i % 2], notification(alert(names[(i // 2) % 10]))) for i in range(400))
    )
    assert {status for status, _ in answers} == {200}
    found = Counter(o for _, body in answers for o in outcomes(body))
    assert found == {"launch": 10, "skip_already_running": 390}
    assert sorted(name for _, name in fake_kube.jobs) == sorted(f"etcd-autodefrag-{n}" for n in names)
    # Both replicas launched some: each for clusters of the other shard too.
    launched_by = [sum(o == "launch" for _, body in answers[i::2] for o in outcomes(body)) for i in (0, 1)]
    assert all(launched_by), launched_by

    owner = next(i for i in (0, 1) if shard_of("c3", 2) == i)
    fake_kube.start_job(NAMESPACE, "etcd-autodefrag-c3")
    fake_kube.finish_job(NAMESPACE, "etcd-autodefrag-c3", message=job_report("c3", 3 * 1024 * 1024))
    key = ("etcd_autodefrag_runs_total", (("etcd_cluster", "c3"), ("result", "success")))

    async def counted() -> bool:
        return (await exposition(replicas[owner])).get(key) == 1.0

    await eventually(counted, timeout=10, what="the owner counting the run")
    # The other replica saw the Job end too (its watch keeps its run state), but exports nothing of c3.
    other = await exposition(replicas[1 - owner])
    assert not [k for k in other if dict(k[1]).get("etcd_cluster") == "c3"]


# --- the kustomize component -----------------------------------------------------------------------


# Not with overlays/kubeadm: a kubeadm control plane has one etcd cluster, and its host-network pod
# holds port 9479 on its node (docs/sharding.md).
@needs_kubectl
def test_the_sharding_component_makes_a_statefulset_of_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay = "kamaji"
    mine = tmp_path / "mine"
    mine.mkdir()
    resource = os.path.relpath(DEPLOY / "overlays" / overlay, mine)
    component = os.path.relpath(DEPLOY / "components" / "sharding", mine)
    (mine / "kustomization.yaml").write_text(f"resources:\n  - {resource}\ncomponents:\n  - {component}\n")
    objects = kustomize(mine)
    unsharded = built(overlay)
    assert not find(objects, "Deployment")
    statefulset = one(objects, "StatefulSet", NAME, SERVICE_NAMESPACE)
    validate(statefulset)
    replicas = statefulset["spec"]["replicas"]
    assert replicas == 2
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    # Everything else is the overlay's Deployment: the same pod, selector, Service and the rest.
    template = copy.deepcopy(statefulset["spec"]["template"])
    env = template["spec"]["containers"][0].pop("env")
    expected = deployment(unsharded)["spec"]["template"]
    expected_env = expected["spec"]["containers"][0].pop("env")
    assert template == expected
    assert env[: len(expected_env)] == expected_env
    added = {e["name"]: e.get("value", e.get("valueFrom")) for e in env[len(expected_env) :]}
    assert added == {
        "POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        f"{ENV_PREFIX}SHARDING__TOTAL_SHARDS": str(replicas),
    }
    assert statefulset["spec"]["selector"] == deployment(unsharded)["spec"]["selector"]
    assert [o for o in objects if o["kind"] != "StatefulSet"] == [
        o for o in unsharded if o["kind"] != "Deployment"
    ]
    # Each pod finds its shard: pod <name>-I is shard I of `replicas`; one more would refuse to start.
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}SHARDING__TOTAL_SHARDS", added[f"{ENV_PREFIX}SHARDING__TOTAL_SHARDS"])
    settings = load_settings()
    for index in range(replicas):
        assert shard_from_settings(settings, {"POD_NAME": f"{NAME}-{index}"}) == Shard(index, replicas)
    with pytest.raises(ConfigError, match="more replicas than shards"):
        shard_from_settings(settings, {"POD_NAME": f"{NAME}-{replicas}"})
