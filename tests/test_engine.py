"""The defrag engine against real 3-member etcd clusters: order, safety gates, failures, NOSPACE."""

import asyncio
import base64
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from etcd_harness import NOSPACE_ERROR, EtcdCluster, EtcdMember, EtcdRequestError, start_cluster

from exporter.config.settings import ClusterConfig
from exporter.core.report import MemberOutcome, RunReport, RunResult
from exporter.defrag.engine import DefragEngine
from exporter.defrag.lock import HOLDER_KEY as LOCK_KEY
from exporter.defrag.lock import PREFIX as LOCK_PREFIX
from exporter.defrag.lock import TOKEN_COUNT
from exporter.etcd.client import START_TIME_METRIC, EtcdClient, EtcdUnavailable, find_gauge

pytestmark = pytest.mark.etcd

ALWAYS = "dbSizeFree > 0"


class HookedClient(EtcdClient):
    """A real etcd client with hooks around defragment, to inject faults at exact points of a run."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        super().__init__(session, timeout_seconds=5)
        self.defragmented: list[str] = []
        self.before_defrag: Callable[[str, int], Awaitable[None]] | None = None
        self.after_defrag: Callable[[str, int], Awaitable[None]] | None = None

    async def defragment(self, endpoint: str, *, timeout: float) -> None:
        index = len(self.defragmented)
        if self.before_defrag is not None:
            await self.before_defrag(endpoint, index)
        await super().defragment(endpoint, timeout=timeout)
        self.defragmented.append(endpoint)
        if self.after_defrag is not None:
            await self.after_defrag(endpoint, index)


@pytest.fixture
async def client() -> AsyncIterator[HookedClient]:
    async with aiohttp.ClientSession() as session:
        yield HookedClient(session)


def config(cluster: EtcdCluster, **overrides: object) -> ClusterConfig:
    options: dict[str, object] = {
        "name": "test",
        "endpoints": cluster.endpoints[:1],  # one seed: the rest come from the member list
        "rule": ALWAYS,
        "health_timeout_seconds": 20,
        # The harness's clusters started seconds ago: the rollout gate would defer every run.
        "settle_seconds": 0,
        **overrides,
    }
    return ClusterConfig.model_validate(options)


def sizes(cluster: EtcdCluster) -> dict[str, int]:
    return {m.client_url: int(m.status()["dbSize"]) for m in cluster.running_members()}


def by_endpoint(report: RunReport) -> dict[str, MemberOutcome]:
    return {m.endpoint: m.outcome for m in report.members}


async def run(client: HookedClient, cluster_config: ClusterConfig, *, dry_run: bool = False) -> RunReport:
    return await DefragEngine(client, cluster_config, dry_run=dry_run).run()


async def test_reclaims_space_on_every_member_leader_last(
    etcd: EtcdCluster, client: HookedClient, caplog: pytest.LogCaptureFixture
) -> None:
    etcd.churn()
    leader = etcd.leader().client_url
    before = sizes(etcd)
    caplog.set_level(logging.INFO, logger="exporter.defrag.engine")

    report = await run(client, config(etcd))

    assert report.result is RunResult.SUCCESS, report.reason
    assert report.exit_code == 0
    after = sizes(etcd)
    assert all(after[e] < before[e] for e in before), (before, after)
    # One member at a time, each exactly once, the leader last.
    assert sorted(client.defragmented) == sorted(etcd.endpoints)
    assert client.defragmented[-1] == leader
    assert [m.endpoint for m in report.members] == client.defragmented
    assert [m.leader for m in report.members] == [False, False, True]
    for m in report.members:
        assert m.outcome is MemberOutcome.DEFRAGMENTED
        assert m.reclaimed_bytes == m.size_before_bytes - m.size_after_bytes > 0
        # Releasing the lock is a write after the last defrag: a file may have grown a page since.
        assert m.size_after_bytes <= after[m.endpoint] < m.size_before_bytes
    assert report.reclaimed_bytes == sum(m.reclaimed_bytes for m in report.members)
    # A person can follow it: the plan, then one line per member with before/after sizes.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("defragmented in" in m for m in messages) == 3
    assert any(m.startswith("plan 3/3: ") and "(leader)" in m for m in messages)


async def test_nothing_to_do_when_rule_does_not_match(etcd: EtcdCluster, client: HookedClient) -> None:
    report = await run(client, config(etcd, rule="dbSizeFree > 1024*1024*1024"))
    assert report.result is RunResult.NOTHING_TO_DO
    assert report.exit_code == 0
    assert client.defragmented == []
    assert {m.outcome for m in report.members} == {MemberOutcome.SKIPPED}
    assert all("does not match" in m.reason for m in report.members)


async def test_dry_run_changes_nothing(etcd: EtcdCluster, client: HookedClient) -> None:
    etcd.churn()
    before = sizes(etcd)
    revision = etcd.revision()
    report = await run(client, config(etcd, compact=True), dry_run=True)
    assert report.result is RunResult.DRY_RUN
    assert report.exit_code == 0
    assert client.defragmented == []
    assert {m.outcome for m in report.members} == {MemberOutcome.WOULD_DEFRAG}
    assert report.compacted_revision is None  # nothing compacted: null in the JSON
    assert sizes(etcd) == before
    assert etcd.revision() == revision  # a dry run takes no lock in etcd either


async def test_stopped_member_refuses_and_touches_nothing(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    stopped = next(m for m in cluster.members if m.client_url != cluster.endpoints[0])
    stopped.stop()
    before = sizes(cluster)

    report = await run(client, config(cluster, request_timeout_seconds=2))

    assert report.result is RunResult.REFUSED
    assert report.exit_code == 3
    assert stopped.name in report.reason
    assert "linearizable read" in report.reason
    assert client.defragmented == []
    assert sizes(cluster) == before


async def test_member_dying_mid_run_stops_the_run(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    leader = cluster.leader()
    follower = next(m for m in cluster.members if m is not leader)

    async def kill_a_follower_after_the_first(endpoint: str, index: int) -> None:
        if index == 0:
            victim = next(m for m in cluster.members if m is not leader and m.client_url != endpoint)
            await asyncio.to_thread(victim.kill)

    client.after_defrag = kill_a_follower_after_the_first
    before = sizes(cluster)

    report = await run(client, config(cluster, endpoints=[follower.client_url], request_timeout_seconds=2))

    assert report.result is RunResult.FAILED
    assert report.exit_code == 1
    assert len(client.defragmented) == 1  # nothing after the failure was touched
    first = client.defragmented[0]
    assert by_endpoint(report)[first] is MemberOutcome.DEFRAGMENTED
    assert "unhealthy" in report.reason
    # The leader was neither defragmented nor shrunk.
    assert leader.client_url not in client.defragmented
    assert sizes(cluster)[leader.client_url] == before[leader.client_url]
    assert lock_holder(cluster) is None  # no defrag left unanswered: the lock is released


async def test_member_dying_during_its_defrag_fails_that_member(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    leader = cluster.leader()

    async def kill_the_second(endpoint: str, index: int) -> None:
        if index == 1:
            member = next(m for m in cluster.members if m.client_url == endpoint)
            await asyncio.to_thread(member.kill)

    client.before_defrag = kill_the_second
    report = await run(client, config(cluster, request_timeout_seconds=2))

    assert report.result is RunResult.FAILED
    assert report.exit_code == 1
    outcomes = [m.outcome for m in report.members]
    assert outcomes == [MemberOutcome.DEFRAGMENTED, MemberOutcome.FAILED, MemberOutcome.NOT_REACHED]
    assert report.members[2].endpoint == leader.client_url
    assert "not reached" in report.members[2].reason
    # The killed member's defrag got an answer (connection refused), so nothing can still run there.
    assert lock_holder(cluster) is None


async def test_leadership_moving_mid_run_keeps_the_leader_last(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    old_leader = cluster.leader()
    caplog.set_level(logging.INFO, logger="exporter.defrag.engine")
    moved_to: list[str] = []

    async def move_leadership_to_the_next(endpoint: str, index: int) -> None:
        if index != 0:
            return
        # Hand leadership to the follower that the plan would visit next (not yet defragmented).
        target = next(m for m in cluster.members if m is not old_leader and m.client_url != endpoint)
        target_id = target.status()["header"]["member_id"]
        await client.move_leader(old_leader.client_url, int(target_id))
        await asyncio.to_thread(
            cluster.wait, lambda: cluster.leader() is target, timeout=10, what="new leader"
        )
        moved_to.append(target.client_url)

    client.after_defrag = move_leadership_to_the_next
    report = await run(client, config(cluster))

    assert report.result is RunResult.SUCCESS, report.reason
    assert len(client.defragmented) == 3
    assert client.defragmented[-1] == moved_to[0]  # the member that is leader now went last
    assert client.defragmented[1] == old_leader.client_url
    assert any("leadership moved" in r.getMessage() for r in caplog.records)


async def test_move_leader_option_hands_leadership_away_first(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    old_leader = cluster.leader()
    report = await run(client, config(cluster, move_leader=True))
    assert report.result is RunResult.SUCCESS, report.reason
    assert client.defragmented[-1] == old_leader.client_url
    assert cluster.leader() is not old_leader  # it was no longer the leader when defragmented


async def test_deadline_stops_the_run_cleanly(etcd: EtcdCluster, client: HookedClient) -> None:
    etcd.churn()
    never = asyncio.Event()

    async def hang_on_the_second(endpoint: str, index: int) -> None:
        if index == 1:
            await never.wait()  # a defrag that never answers

    client.before_defrag = hang_on_the_second
    report = await run(client, config(etcd, deadline_seconds=3, member_timeout_seconds=3))

    assert report.result is RunResult.FAILED
    assert report.exit_code == 1
    assert "deadline of 3s exceeded" in report.reason
    assert [m.outcome for m in report.members] == [
        MemberOutcome.DEFRAGMENTED,
        MemberOutcome.FAILED,
        MemberOutcome.NOT_REACHED,
    ]
    assert "deadline exceeded while defragmenting" in report.members[1].reason
    assert len(client.defragmented) == 1
    # The second member's defrag may still be running: its lock stays until the lease expires.
    assert lock_holder(etcd) is not None


# --- the lock in etcd: one run per cluster, whichever host, Job or CronJob runs it -----------------


def lock_holder(cluster: EtcdCluster) -> dict[str, object] | None:
    """The value of the engine's lock key, or None when no run holds it."""
    reply = cluster.request("/v3/kv/range", {"key": base64.b64encode(LOCK_KEY).decode()})
    kvs = reply.get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


async def test_lock_is_held_during_the_run_and_released(etcd: EtcdCluster, client: HookedClient) -> None:
    etcd.churn()
    seen: list[dict[str, object] | None] = []

    async def look(endpoint: str, index: int) -> None:
        seen.append(lock_holder(etcd))

    client.before_defrag = look
    report = await run(client, config(etcd))
    assert report.result is RunResult.SUCCESS, report.reason
    assert len(seen) == 3
    assert all(holder is not None and holder["cluster"] == "test" for holder in seen)
    assert lock_holder(etcd) is None


async def test_second_run_is_refused_while_the_first_holds_the_lock(
    etcd: EtcdCluster, client: HookedClient
) -> None:
    """Two runs with no host lock between them (two pods, or a CronJob and a webhook Job)."""
    etcd.churn()
    second: list[RunReport] = []

    async def start_another_run(endpoint: str, index: int) -> None:
        if index == 0:  # the first run holds the lock and is about to defragment its first member
            async with aiohttp.ClientSession() as session:
                other = HookedClient(session)
                second.append(await run(other, config(etcd, name="other")))
                assert other.defragmented == []

    client.before_defrag = start_another_run
    first = await run(client, config(etcd))

    assert first.result is RunResult.SUCCESS, first.reason
    assert len(client.defragmented) == 3
    (refused,) = second
    assert refused.result is RunResult.REFUSED
    assert refused.exit_code == 3
    assert "another defrag run holds the lock key /etcd-autodefrag/defrag-lock" in refused.reason
    assert "cluster test" in refused.reason
    assert lock_holder(etcd) is None


async def test_nospace_recovers_with_compaction_and_disarm(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    await run(client, config(cluster, rule="false"))  # the NOSPACE lock tokens, as any run writes them
    fill_with_history(cluster)

    # The rule would never select a member: NOSPACE overrides it.
    report = await run(client, config(cluster, compact=True, rule="false"))

    assert report.result is RunResult.SUCCESS, report.reason
    assert report.compacted_revision > 0
    assert len(client.defragmented) == 3
    assert report.disarmed_alarms  # every member is far below 90% of its quota now
    assert cluster.alarms() == []
    cluster.put("/after-recovery", b"writes work again")


async def test_nospace_stays_armed_while_members_are_still_full(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    await run(client, config(cluster, rule="false"))  # the NOSPACE lock tokens
    cluster.fill_until_nospace()  # distinct keys: live data, nothing to compact away
    # How close to the quota the live data ends depends on the last batch that fit; a low disarm
    # threshold makes "still full" certain (the live data stays far above 20% of the quota).
    report = await run(client, config(cluster, compact=True, disarm_below_ratio=0.2))
    assert report.result is RunResult.SUCCESS  # the defrags ran...
    assert report.disarmed_alarms == []  # ...but the alarm stays: compaction cannot help
    assert any(a.get("alarm") == "NOSPACE" for a in cluster.alarms())


# --- the lock under NOSPACE: deletes of tokens written while there was space (docs/locking.md) ---------


def lock_keys(cluster: EtcdCluster) -> dict[str, bytes]:
    """Every key of the lock (holder and NOSPACE tokens), by name under /etcd-autodefrag/."""
    return cluster.keys_with_prefix(LOCK_PREFIX.decode())


def tokens(cluster: EtcdCluster) -> list[str]:
    return sorted(name for name in lock_keys(cluster) if name.startswith("nospace-lock/"))


def fill_with_history(cluster: EtcdCluster) -> None:
    """NOSPACE from overwrites of a few keys: history a compaction frees, so a run can recover."""
    value = b"v" * (256 * 1024)
    with pytest.raises(EtcdRequestError, match=NOSPACE_ERROR):  # noqa: PT012
        for n in range(10_000):
            cluster.put(f"/fill/{n % 8}", value)
    cluster.wait(
        lambda: any(a.get("alarm") == "NOSPACE" for a in cluster.alarms()), timeout=10, what="NOSPACE"
    )


async def test_a_run_with_space_writes_the_nospace_tokens(etcd: EtcdCluster, client: HookedClient) -> None:
    assert tokens(etcd) == []
    report = await run(client, config(etcd, rule="false"))  # nothing to do: still writes them, once
    assert report.result is RunResult.NOTHING_TO_DO
    assert tokens(etcd) == [f"nospace-lock/{i:02d}" for i in range(TOKEN_COUNT)]
    revision = etcd.revision()
    await run(client, config(etcd, rule="false"))
    assert etcd.revision() == revision  # they exist: a second run writes nothing


async def test_nospace_run_holds_the_lock_by_a_deleted_token_and_gives_it_back(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    await run(client, config(cluster, rule="false"))  # the tokens, as any earlier run writes them
    fill_with_history(cluster)
    seen: list[list[str]] = []

    async def look(endpoint: str, index: int) -> None:
        seen.append(tokens(cluster))

    client.before_defrag = look
    report = await run(client, config(cluster, compact=True, rule="false"))

    assert report.result is RunResult.SUCCESS, report.reason
    # During the run: token 00 deleted (one deletion, odd: held), and no holder key (no put possible).
    assert seen == [[f"nospace-lock/{i:02d}" for i in range(1, TOKEN_COUNT)]] * 3
    assert cluster.alarms() == []
    # After it, with space again, the deleted token is back: the lock is free with a full ladder.
    assert tokens(cluster) == [f"nospace-lock/{i:02d}" for i in range(TOKEN_COUNT)]
    assert "defrag-lock" not in lock_keys(cluster)


async def test_second_run_under_nospace_is_refused_while_the_first_holds_the_lock(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    await run(client, config(cluster, rule="false"))
    fill_with_history(cluster)
    second: list[RunReport] = []

    async def start_another_run(endpoint: str, index: int) -> None:
        if index == 0:
            async with aiohttp.ClientSession() as session:
                other = HookedClient(session)
                second.append(await run(other, config(cluster, name="other", compact=True)))
                assert other.defragmented == []

    client.before_defrag = start_another_run
    first = await run(client, config(cluster, compact=True, rule="false"))

    assert first.result is RunResult.SUCCESS, first.reason
    (refused,) = second
    assert refused.result is RunResult.REFUSED
    assert refused.exit_code == 3
    assert "another defrag run that started under NOSPACE holds the lock" in refused.reason
    assert "--break-lock" in refused.reason


async def test_nospace_without_tokens_is_refused_unless_the_operator_breaks_the_lock(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    fill_with_history(cluster)  # no run ever wrote the tokens: no lock can be taken under NOSPACE

    refused = await run(client, config(cluster, compact=True))
    assert refused.result is RunResult.REFUSED
    assert refused.exit_code == 3
    assert "holds no NOSPACE lock tokens" in refused.reason
    assert "--break-lock" in refused.reason
    assert client.defragmented == []

    broken = await DefragEngine(client, config(cluster, compact=True), break_lock=True).run()
    assert broken.result is RunResult.SUCCESS, broken.reason
    assert cluster.alarms() == []
    cluster.put("/after-recovery", b"writes work again")


async def test_a_nospace_lock_left_by_a_dead_run_is_broken_only_on_request(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    await run(client, config(cluster, rule="false"))
    fill_with_history(cluster)
    # A run under NOSPACE died holding the lock: its token is deleted and nobody gives it back.
    cluster.request(
        "/v3/kv/deleterange", {"key": base64.b64encode(LOCK_PREFIX + b"nospace-lock/00").decode()}
    )

    refused = await run(client, config(cluster, compact=True))
    assert refused.result is RunResult.REFUSED
    assert "started under NOSPACE holds the lock" in refused.reason
    assert client.defragmented == []

    broken = await DefragEngine(client, config(cluster, compact=True), break_lock=True).run()
    assert broken.result is RunResult.SUCCESS, broken.reason
    assert len(client.defragmented) == 3
    assert cluster.alarms() == []
    # The break gave the dead run's lock back (token 01), this run took and gave back its own.
    assert tokens(cluster) == [f"nospace-lock/{i:02d}" for i in range(TOKEN_COUNT)]


async def test_a_lock_key_left_by_a_dead_run_is_broken_on_request(
    etcd: EtcdCluster, client: HookedClient
) -> None:
    etcd.churn()
    etcd.put(LOCK_KEY.decode(), b'{"holder": "dead-host", "pid": 1, "cluster": "test", "since": "then"}')
    refused = await run(client, config(etcd))
    assert refused.result is RunResult.REFUSED
    assert "dead-host (pid 1, cluster test) since then" in refused.reason
    broken = await DefragEngine(client, config(etcd), break_lock=True).run()
    assert broken.result is RunResult.SUCCESS, broken.reason
    assert lock_holder(etcd) is None


# --- a defragment call that fails: keep the lock while it may still run, name a member that died ---------


class DroppedClient(HookedClient):
    """etcd defragments, but the answer never arrives: the connection drops (optionally the member dies)."""

    def __init__(self, session: aiohttp.ClientSession, cluster: EtcdCluster, *, kill: bool) -> None:
        super().__init__(session)
        self.cluster = cluster
        self.kill = kill

    async def defragment(self, endpoint: str, *, timeout: float) -> None:
        await super().defragment(endpoint, timeout=timeout)
        if self.kill:
            next(m for m in self.cluster.members if m.client_url == endpoint).kill()
        raise EtcdUnavailable(endpoint, "/v3/maintenance/defragment: Server disconnected")


async def test_a_dropped_connection_mid_defrag_keeps_the_lock(etcd: EtcdCluster) -> None:
    etcd.churn()
    async with aiohttp.ClientSession() as session:
        client = DroppedClient(session, etcd, kill=False)
        report = await run(client, config(etcd))
    assert report.result is RunResult.FAILED
    assert len(client.defragmented) == 1  # nothing after the failure
    (failed,) = [m for m in report.members if m.outcome is MemberOutcome.FAILED]
    assert "the connection failed during the defragment" in failed.reason
    assert "it may still be running on the member" in failed.reason
    assert lock_holder(etcd) is not None  # it may still be defragmenting: the lock stays


async def test_a_member_that_died_during_its_defrag_is_reported_down(fresh_etcd_cluster: EtcdCluster) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    async with aiohttp.ClientSession() as session:
        client = DroppedClient(session, cluster, kill=True)
        report = await run(client, config(cluster))
    (dead,) = [m for m in cluster.members if not m.running]
    assert report.result is RunResult.FAILED
    assert report.reason == f"defragmentation failed on {dead.name}; down now: {dead.name}"
    (failed,) = [m for m in report.members if m.outcome is MemberOutcome.FAILED]
    assert f"{dead.name} is down now" in failed.reason
    assert report.down_members == [dead.name]
    # Nothing listens on the member any more, so its defrag cannot be running: the lock is given back.
    assert lock_holder(cluster) is None
    dead.start()


# --- the safety gates: quorum and rollout (exporter.core.policy, docs/safety.md) -----------------------


@pytest.fixture
def small_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh cluster of `request.param` members."""
    cluster = start_cluster(tmp_path / "etcd", size=request.param)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.parametrize("small_cluster", [1], indirect=True)
async def test_a_single_member_cluster_is_refused_unless_downtime_is_accepted(
    small_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = small_cluster
    cluster.churn()
    revision = cluster.revision()

    for dry_run in (False, True):  # a dry run runs the gates too, and says what the real run would do
        report = await run(client, config(cluster), dry_run=dry_run)
        assert report.result is RunResult.REFUSED
        assert report.exit_code == 3
        assert "a single voting member: the whole cluster stops answering" in report.reason
        assert "allow_unavailable_defrag: true" in report.reason
        assert report.members[0].reason == "not reached: refuse_unavailable"
    assert client.defragmented == []
    assert cluster.revision() == revision  # no lock taken, nothing written

    # Nothing to defragment is not a refusal: a daily CronJob on a dev cluster exits 0 most days.
    assert (await run(client, config(cluster, rule="false"))).result is RunResult.NOTHING_TO_DO

    accepted = await run(client, config(cluster, allow_unavailable_defrag=True))
    assert accepted.result is RunResult.SUCCESS, accepted.reason
    assert client.defragmented == cluster.endpoints


@pytest.mark.parametrize("small_cluster", [2], indirect=True)
async def test_a_two_member_cluster_is_refused_one_defrag_blocks_half_the_votes(
    small_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = small_cluster
    cluster.churn()
    report = await run(client, config(cluster))
    assert report.result is RunResult.REFUSED
    assert report.exit_code == 3
    assert "defragmenting one leaves 1, fewer than the quorum of 2" in report.reason
    assert client.defragmented == []
    accepted = await run(client, config(cluster, allow_unavailable_defrag=True))
    assert accepted.result is RunResult.SUCCESS, accepted.reason
    assert len(client.defragmented) == 2


def started_at(member: EtcdMember) -> float:
    """The member's process_start_time_seconds, from its own metrics page."""
    with urllib.request.urlopen(member.client_url + "/metrics", timeout=5) as page:
        found = find_gauge(page.read(), START_TIME_METRIC)
    assert found is not None
    return found


async def test_a_member_started_within_settle_seconds_defers_the_run(
    etcd: EtcdCluster, client: HookedClient, caplog: pytest.LogCaptureFixture
) -> None:
    etcd.churn()
    revision = etcd.revision()
    youngest = max(started_at(m) for m in etcd.members)
    caplog.set_level(logging.INFO, logger="exporter.defrag.engine")

    report = await run(client, config(etcd, settle_seconds=time.time() - youngest + 3600))

    assert report.result is RunResult.DEFERRED
    assert report.exit_code == 75
    assert report.reason.startswith("the cluster is changing: member etcd-")
    assert "a restart or rolling update may be in progress" in report.reason
    assert client.defragmented == []
    assert etcd.revision() == revision  # no lock taken
    assert json.loads(report.to_json())["result"] == "deferred"
    (last,) = [r for r in caplog.records if "deferred: the cluster is changing" in r.getMessage()]
    assert last.levelno == logging.WARNING  # not an error: the next alert or schedule retries


async def test_a_member_restarted_mid_run_defers_the_rest(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    """A rolling update that reaches the next member while the run is on its first one."""
    cluster = fresh_etcd_cluster
    cluster.churn()
    settle_seconds = 5.0
    # Every member older than the settle time (their own clocks say), so that the run starts.
    cluster.wait(
        lambda: all(time.time() - started_at(m) > settle_seconds + 0.5 for m in cluster.members),
        timeout=30,
        what="members older than the settle time",
    )
    leader = cluster.leader()
    restarted: list[EtcdMember] = []

    async def restart_another_follower(endpoint: str, index: int) -> None:
        if index == 0:
            victim = next(m for m in cluster.members if m is not leader and m.client_url != endpoint)
            await asyncio.to_thread(victim.stop)
            await asyncio.to_thread(cluster.start)  # restarts it and waits until all are healthy
            restarted.append(victim)

    client.after_defrag = restart_another_follower
    report = await run(client, config(cluster, settle_seconds=settle_seconds))

    assert report.result is RunResult.DEFERRED, report.reason
    assert f"member {restarted[0].name} started" in report.reason
    assert len(client.defragmented) == 1  # nothing after the restart
    outcomes = [m.outcome for m in report.members]
    assert outcomes == [MemberOutcome.DEFRAGMENTED, MemberOutcome.NOT_REACHED, MemberOutcome.NOT_REACHED]
    assert {m.reason for m in report.members[1:]} == {"not reached: defer_recent_start"}
    assert lock_holder(cluster) is None  # given back: nothing is in flight


async def test_a_member_list_change_mid_run_and_a_learner_defer_the_run(
    fresh_etcd_cluster: EtcdCluster, client: HookedClient
) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()

    def add_learner() -> bool:
        # etcd refuses a member change until every member has been connected for 5 s (strict
        # reconfig check): retried until it takes. The learner is never started: quorum is unchanged.
        try:
            cluster.request("/v3/cluster/member/add", {"peerURLs": ["http://127.0.0.1:9"], "isLearner": True})
        except EtcdRequestError as exc:
            if "unhealthy" in exc.message:
                return False
            raise
        return True

    async def add_a_learner(endpoint: str, index: int) -> None:
        if index == 0:
            await asyncio.to_thread(cluster.wait, add_learner, timeout=20, what="the learner added")

    client.after_defrag = add_a_learner
    report = await run(client, config(cluster))

    assert report.result is RunResult.DEFERRED, report.reason
    assert report.exit_code == 75
    assert "the member list changed since the plan (added " in report.reason
    assert len(client.defragmented) == 1
    assert lock_holder(cluster) is None

    client.after_defrag = None
    again = await run(client, config(cluster))
    assert again.result is RunResult.DEFERRED
    assert "present: a member is being added" in again.reason
    assert len(client.defragmented) == 1  # the second run touched nothing
