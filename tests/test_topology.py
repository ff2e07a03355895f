"""exporter.etcd.topology: one meaning of `discover_members` for the engine, `status` and /metrics."""

import socket
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest
from etcd_harness import EtcdCluster

from exporter.config.settings import ClusterConfig
from exporter.core.model import Member
from exporter.core.policy import cluster_rule
from exporter.core.report import MemberOutcome, RunResult
from exporter.defrag.engine import DefragEngine
from exporter.etcd.client import EtcdClient
from exporter.etcd.observe import QuotaCache, observe_cluster
from exporter.etcd.topology import topology

A = Member(1, "a", ("http://a:2380",), ("http://10.0.0.1:2379",))
B = Member(2, "b", ("http://b:2380",), ("http://10.0.0.2:2379", "http://b.example:2379"))
C = Member(3, "c", ("http://c:2380",), ("http://10.0.0.3:2379",))
UNSTARTED = Member(4, "", ("http://d:2380",), ())
MEMBERS = (A, B, C)


def stand_in(url: str) -> Member:
    return Member(0, url, (), (url,))


# (case, members, configured, discover_members, member_ids,
#  expected targets, endpoints, unanswered, selected as (member, url))
Case = tuple[str, tuple[Member, ...], list[str], bool, dict[str, int | str], object, object, object, object]
CASES: list[Case] = [
    (
        "discovery: every member, each through its first client URL",
        MEMBERS,
        ["http://10.0.0.1:2379"],
        True,
        {},
        None,
        {1: "http://10.0.0.1:2379", 2: "http://10.0.0.2:2379", 3: "http://10.0.0.3:2379"},
        {},
        [(A, "http://10.0.0.1:2379"), (B, "http://10.0.0.2:2379"), (C, "http://10.0.0.3:2379")],
    ),
    (
        "discovery: a configured URL among a member's client URLs is the one used",
        MEMBERS,
        ["http://b.example:2379"],
        True,
        {},
        None,
        {1: "http://10.0.0.1:2379", 2: "http://b.example:2379", 3: "http://10.0.0.3:2379"},
        {},
        [(A, "http://10.0.0.1:2379"), (B, "http://b.example:2379"), (C, "http://10.0.0.3:2379")],
    ),
    (
        "discovery: a member not started yet has no URL",
        (A, UNSTARTED),
        ["http://10.0.0.1:2379"],
        True,
        {},
        None,
        {1: "http://10.0.0.1:2379"},
        {},
        [(A, "http://10.0.0.1:2379"), (UNSTARTED, None)],
    ),
    (
        "no discovery: the member behind a proxy is found by the id its status reports",
        MEMBERS,
        ["http://proxy:1234"],
        False,
        {"http://proxy:1234": 2},
        frozenset({2}),
        {1: "http://10.0.0.1:2379", 2: "http://proxy:1234", 3: "http://10.0.0.3:2379"},
        {},
        [(B, "http://proxy:1234")],
    ),
    (
        "no discovery: an endpoint that does not answer is matched by its client URL",
        MEMBERS,
        ["http://10.0.0.3:2379"],
        False,
        {"http://10.0.0.3:2379": "connection refused"},
        frozenset({3}),
        {1: "http://10.0.0.1:2379", 2: "http://10.0.0.2:2379", 3: "http://10.0.0.3:2379"},
        {"http://10.0.0.3:2379": "connection refused"},
        [(C, "http://10.0.0.3:2379")],
    ),
    (
        "no discovery: one that does not answer and is no client URL stays a stand-in",
        MEMBERS,
        ["http://10.0.0.1:2379", "http://proxy:1234"],
        False,
        {"http://10.0.0.1:2379": 1, "http://proxy:1234": "no answer within 5s"},
        frozenset({1}),
        {1: "http://10.0.0.1:2379", 2: "http://10.0.0.2:2379", 3: "http://10.0.0.3:2379"},
        {"http://proxy:1234": "no answer within 5s"},
        [(A, "http://10.0.0.1:2379"), (stand_in("http://proxy:1234"), "http://proxy:1234")],
    ),
    (
        "no discovery: an endpoint of a member missing from the list stays a stand-in",
        MEMBERS,
        ["http://other:2379"],
        False,
        {"http://other:2379": 99},
        frozenset(),
        {1: "http://10.0.0.1:2379", 2: "http://10.0.0.2:2379", 3: "http://10.0.0.3:2379"},
        {},
        [(stand_in("http://other:2379"), "http://other:2379")],
    ),
    (
        "no discovery: two endpoints of one member select it once, through the last",
        MEMBERS,
        ["http://10.0.0.2:2379", "http://b.example:2379"],
        False,
        {"http://10.0.0.2:2379": 2, "http://b.example:2379": 2},
        frozenset({2}),
        {1: "http://10.0.0.1:2379", 2: "http://b.example:2379", 3: "http://10.0.0.3:2379"},
        {},
        [(B, "http://b.example:2379")],
    ),
]


@pytest.mark.parametrize(
    ("members", "configured", "discover", "member_ids", "targets", "endpoints", "unanswered", "selected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_topology(
    members: tuple[Member, ...],
    configured: list[str],
    discover: bool,
    member_ids: dict[str, int | str],
    targets: frozenset[int] | None,
    endpoints: Mapping[int, str],
    unanswered: Mapping[str, str],
    selected: list[tuple[Member, str | None]],
) -> None:
    found = topology(members=members, configured=configured, discover_members=discover, member_ids=member_ids)
    assert found.members == members  # the gates always see the whole member list
    assert found.targets == targets
    assert found.whole_cluster is (targets is None)
    assert dict(found.endpoints) == endpoints
    assert dict(found.unanswered) == unanswered
    assert found.selected() == selected
    assert found.unmatched == tuple(m.client_urls[0] for m, _ in selected if m.id == 0)


# --- against a real cluster -----------------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[EtcdClient]:
    async with aiohttp.ClientSession() as session:
        yield EtcdClient(session, timeout_seconds=2)


def closed_port_url() -> str:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def one_member_by_another_name(etcd: EtcdCluster, **options: object) -> tuple[ClusterConfig, str]:
    """The second member named `http://localhost:PORT`, which it does not advertise, and no discovery."""
    assert etcd.members[1].client_url.startswith("http://127.0.0.1:")
    aliased = etcd.members[1].client_url.replace("127.0.0.1", "localhost")
    config = ClusterConfig.model_validate(
        {
            "name": "alias",
            "endpoints": [aliased],
            "discover_members": False,
            "rule": "dbSize > 0",
            "settle_seconds": 0,
            **options,
        }
    )
    return config, aliased


@pytest.mark.etcd
async def test_without_discovery_status_and_run_pick_the_same_member_through_an_alias(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    config, aliased = one_member_by_another_name(etcd)
    member = etcd.members[1]

    snapshot = await observe_cluster(client, config, cluster_rule(config), QuotaCache())
    # The member itself, under its own name, id and the URL configured for it (it was a stand-in
    # "http://localhost:PORT" with id 0 before the topology was one function).
    assert [(m.member.name, m.endpoint, m.up) for m in snapshot.members] == [(member.name, aliased, True)]
    assert snapshot.members[0].member.id == int(member.status()["header"]["member_id"])

    report = await DefragEngine(client, config, dry_run=True).run()
    assert report.result is RunResult.DRY_RUN, report.reason
    outcomes = {m.name: (m.outcome, m.endpoint) for m in report.members}
    assert outcomes == {
        m.name: (
            (MemberOutcome.WOULD_DEFRAG, aliased) if m is member else (MemberOutcome.SKIPPED, m.client_url)
        )
        for m in etcd.members
    }


@pytest.mark.etcd
async def test_with_discovery_every_member_is_observed_through_its_own_url(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    config, _ = one_member_by_another_name(etcd, discover_members=True)
    snapshot = await observe_cluster(client, config, cluster_rule(config), QuotaCache())
    assert sorted((m.member.name, m.endpoint, m.up) for m in snapshot.members) == sorted(
        (m.name, m.client_url, True) for m in etcd.members
    )


@pytest.mark.etcd
async def test_without_discovery_a_dead_endpoint_is_shown_down_and_refuses_the_run(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    dead = closed_port_url()
    config = ClusterConfig.model_validate(
        {
            "name": "dead",
            "endpoints": [etcd.members[0].client_url, dead],
            "discover_members": False,
            "rule": "dbSize > 0",
            "settle_seconds": 0,
        }
    )
    snapshot = await observe_cluster(client, config, cluster_rule(config), QuotaCache())
    assert [(m.member.name, m.endpoint, m.up) for m in snapshot.members] == [
        (etcd.members[0].name, etcd.members[0].client_url, True),
        (dead, dead, False),
    ]
    assert "connection refused" in (snapshot.members[1].error or "")

    report = await DefragEngine(client, config).run()
    assert report.result is RunResult.REFUSED
    assert report.reason.startswith(f"cluster unhealthy: {dead}: ")
    assert "connection refused" in report.reason
    assert report.members == []  # refused before any plan: nothing touched


async def test_no_configured_endpoint_answering_is_one_error_for_both(client: EtcdClient) -> None:
    dead = closed_port_url()
    config = ClusterConfig.model_validate({"name": "gone", "endpoints": [dead], "discover_members": False})
    snapshot = await observe_cluster(client, config, cluster_rule(config), QuotaCache())
    report = await DefragEngine(client, config).run()
    assert (snapshot.error or "").startswith("no configured endpoint answered: ")
    assert report.result is RunResult.REFUSED
    assert report.reason == snapshot.error
