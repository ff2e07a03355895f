"""Parsing etcd's JSON gateway replies (strings for 64-bit ints, omitted zero values), and where
each etcd release reports what the client reads."""

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from etcd_harness import EtcdBuild, EtcdCluster

from exporter.config.settings import ClusterConfig
from exporter.core.model import Alarm, AlarmKind
from exporter.core.policy import cluster_rule
from exporter.core.report import RunResult
from exporter.defrag.engine import DefragEngine
from exporter.etcd.client import (
    EtcdApiError,
    EtcdClient,
    EtcdUnavailable,
    MetricsFacts,
    find_quota,
    parse_alarm_error,
    parse_alarms,
    parse_members,
    parse_quota_line,
    parse_status,
)
from exporter.etcd.observe import QuotaCache, member_status, observe_cluster

# Recorded from Debian's etcd 3.4.23 during a NOSPACE alarm.
STATUS_NOSPACE = {
    "header": {"cluster_id": "17491670987244668264", "member_id": "17783827971225459260", "revision": "496"},
    "version": "3.4.23",
    "dbSize": "31764480",
    "leader": "3139280975184511874",
    "raftIndex": "524",
    "raftTerm": "2",
    "raftAppliedIndex": "524",
    "errors": ["memberID:5925017834310168007 alarm:NOSPACE ", "memberID:3139280975184511874 alarm:NOSPACE "],
    "dbSizeInUse": "26705920",
}


def test_status_with_alarms() -> None:
    s = parse_status("http://a:2379", STATUS_NOSPACE)
    assert s.member_id == 17783827971225459260
    assert s.leader_id == 3139280975184511874
    assert s.cluster_id == 17491670987244668264
    assert (s.db_size_bytes, s.db_size_in_use_bytes) == (31764480, 26705920)
    assert (s.raft_index, s.raft_applied_index, s.raft_term) == (524, 524, 2)
    assert s.quota_bytes == 0
    assert not s.is_leader
    assert s.alarms == (
        Alarm(5925017834310168007, AlarmKind.NOSPACE),
        Alarm(3139280975184511874, AlarmKind.NOSPACE),
    )


def test_status_omitted_zero_values_and_36_quota() -> None:
    s = parse_status(
        "e", {"header": {"member_id": "7"}, "leader": "7", "dbSize": "100", "dbSizeQuota": "8589934592"}
    )
    assert s.is_leader
    assert s.raft_applied_index == 0
    assert s.quota_bytes == 8 * 1024**3
    assert s.db_size_in_use_bytes == 100  # no dbSizeInUse (etcd < 3.4): nothing counted as free
    assert s.alarms == ()


def test_status_learner() -> None:
    assert parse_status("e", {"isLearner": True}).is_learner


@pytest.mark.parametrize(
    ("text", "alarm"),
    [
        ("memberID:12 alarm:CORRUPT ", Alarm(12, AlarmKind.CORRUPT)),
        ("etcdserver: no leader", None),
        ("memberID:12 alarm:SOMETHINGNEW ", None),
    ],
)
def test_alarm_errors(text: str, alarm: Alarm | None) -> None:
    assert parse_alarm_error(text) == alarm


def test_members_with_learner_and_unstarted_member() -> None:
    body = {
        "members": [
            {"ID": "1", "name": "a", "peerURLs": ["http://p"], "clientURLs": ["http://c"]},
            {"ID": "2", "peerURLs": ["http://q"], "isLearner": True},
        ]
    }
    a, b = parse_members(body)
    assert (a.id, a.name, a.client_urls, a.is_learner) == (1, "a", ("http://c",), False)
    assert (b.name, b.client_urls, b.is_learner) == ("", (), True)
    assert parse_members({}) == []


def test_alarm_list() -> None:
    body = {"alarms": [{"memberID": "5", "alarm": "NOSPACE"}, {"memberID": "6"}]}
    assert parse_alarms(body) == [Alarm(5, AlarmKind.NOSPACE)]  # "alarm" omitted = NONE
    assert parse_alarms({}) == []


@pytest.mark.parametrize(
    ("line", "quota"),
    [
        ("etcd_server_quota_backend_bytes 1.6777216e+07\n", 16777216),
        ("etcd_server_quota_backend_bytes 8.589934592e+09", 8589934592),
        ('etcd_server_quota_backend_bytes{x="y"} 2048', 2048),
        ("etcd_server_quota_backend_bytes_total 5", None),
        ("# HELP etcd_server_quota_backend_bytes Current backend storage quota size in bytes.", None),
        ("etcd_server_quota_backend_bytes", None),
        ("etcd_server_quota_backend_bytes garbage", None),
    ],
)
def test_quota_line(line: str, quota: int | None) -> None:
    assert parse_quota_line(line) == quota


@pytest.mark.parametrize(
    ("page", "quota"),
    [
        (
            b"# HELP etcd_server_quota_backend_bytes x\netcd_server_quota_backend_bytes 2.147483648e+09\n",
            2**31,
        ),
        (b"etcd_server_quota_backend_bytes 1024", 1024),  # first line, no newline at the end
        (b"x_etcd_server_quota_backend_bytes 5\netcd_server_quota_backend_bytes_total 6\n", None),
        (b"", None),
    ],
)
def test_find_quota_in_a_whole_page(page: bytes, quota: int | None) -> None:
    assert find_quota(page) == quota


def test_find_quota_in_a_recorded_etcd_page() -> None:
    page = (Path(__file__).parent.parent / "bench" / "data" / "metrics.txt").read_bytes()
    assert len(page) > 100_000  # the real page, not a stub
    assert find_quota(page) == int(float(page.split(b"\netcd_server_quota_backend_bytes ")[1].split()[0]))


# --- every request bounded as a whole ------------------------------------------------------------------


@pytest.fixture
async def dribbler() -> AsyncIterator[str]:
    """A member that accepts, reads the request and answers one byte every 0.2 s, forever."""

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            for byte in itertools.cycle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: "):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)  # the attacker's pace, not a synchronisation

    server = await asyncio.start_server(dribble, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_a_member_that_dribbles_its_answer_is_cut_off_by_the_request_timeout(dribbler: str) -> None:
    async with aiohttp.ClientSession() as session:
        client = EtcdClient(session, timeout_seconds=1)
        # Each byte comes well within any socket read timeout; only a bound on the whole request ends it.
        with pytest.raises(EtcdUnavailable, match=r"/v3/maintenance/status: no answer within 1s"):
            await client.status(dribbler)
        with pytest.raises(EtcdUnavailable, match=r"/metrics: no answer within 1s"):
            await client.read_metrics(dribbler)


async def test_a_run_against_a_dribbling_member_is_refused_not_failed(dribbler: str) -> None:
    """A run that touched nothing exits 3 with the reason, long before its deadline."""
    cluster = ClusterConfig(name="slow", endpoints=[dribbler], discover_members=False)
    async with aiohttp.ClientSession() as session:
        report = await DefragEngine(EtcdClient(session, timeout_seconds=1), cluster).run()
    assert report.result is RunResult.REFUSED
    assert report.exit_code == 3
    assert "no answer within 1s" in report.reason


async def test_a_refused_connection_says_the_request_never_reached_the_member() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(EtcdUnavailable) as caught:
            await EtcdClient(session, timeout_seconds=1).status(closed)
    assert caught.value.reached is False


class MetricsCountingClient(EtcdClient):
    """The real client, counting how often it reads a member's metrics page."""

    metrics_reads = 0

    async def read_metrics(self, endpoint: str, *, timeout: float | None = None) -> MetricsFacts:
        self.metrics_reads += 1
        return await super().read_metrics(endpoint, timeout=timeout)


@pytest.mark.etcd
async def test_quota_from_the_status_on_36_and_from_the_metrics_page_before(
    etcd: EtcdCluster, etcd_build: EtcdBuild
) -> None:
    # etcd 3.6 added dbSizeQuota to StatusResponse; 3.4 and 3.5 only export the quota as a metric.
    status_has_quota = etcd_build.release >= (3, 6)
    endpoint = etcd.endpoints[0]
    assert ("dbSizeQuota" in etcd.members[0].status()) is status_has_quota
    config = ClusterConfig.model_validate({"name": "q", "endpoints": [endpoint]})
    async with aiohttp.ClientSession() as session:
        client = MetricsCountingClient(session)
        status = await client.status(endpoint)
        assert status.quota_bytes == (etcd.quota_bytes if status_has_quota else 0)
        assert (await client.read_metrics(endpoint)).quota_bytes == etcd.quota_bytes
        # Both sources agree with --quota-backend-bytes; what every reader of a status gets:
        client.metrics_reads = 0
        observed = await member_status(client, config, endpoint, QuotaCache())
    assert observed.quota_bytes == etcd.quota_bytes
    # Read once either way: it also gives the process start time the rollout gate needs.
    assert client.metrics_reads == 1


@pytest.mark.etcd
async def test_api_errors_carry_code_and_message_and_a_repeated_compaction_is_not_one(
    etcd: EtcdCluster,
) -> None:
    # etcd 3.6's gateway (grpc-gateway v2) answers errors without the "error" field 3.4 and 3.5 send.
    endpoint = etcd.endpoints[0]
    revision = etcd.put("/test-client/compact", b"x")
    async with aiohttp.ClientSession() as session:
        client = EtcdClient(session)
        with pytest.raises(EtcdApiError, match="future revision") as future:
            await client.compact(endpoint, revision + 1000)
        assert (future.value.code, future.value.http_status) == (11, 400)  # OUT_OF_RANGE
        assert await client.compact(endpoint, revision) is True
        assert await client.compact(endpoint, revision) is False  # "already compacted"


@pytest.mark.etcd
async def test_member_list_without_quorum_is_refused_from_35_on(
    fresh_etcd_cluster: EtcdCluster, etcd_build: EtcdBuild
) -> None:
    # We ask for a linearizable member list so that a member cut off from the quorum cannot hand out
    # a stale one; etcd 3.4 has no such option and answers from its local copy.
    cluster = fresh_etcd_cluster
    for member in cluster.members[1:]:
        member.kill()
    survivor = cluster.members[0].client_url
    config = ClusterConfig.model_validate({"name": "q", "endpoints": [survivor], "rule": "dbSize > 0"})
    async with aiohttp.ClientSession() as session:
        client = EtcdClient(session, timeout_seconds=1.0)
        if etcd_build.release >= (3, 5):
            # etcd gives up after its request timeout (~6 s here); we stop waiting before that.
            with pytest.raises(EtcdUnavailable, match="no answer within 1s"):
                await client.members(survivor)
        else:
            assert len(await client.members(survivor)) == 3
        snapshot = await observe_cluster(client, config, cluster_rule(config), QuotaCache())
    # Either way the cluster is reported unhealthy, for a reason that says why.
    problems = list(snapshot.health().problems)
    if etcd_build.release >= (3, 5):
        assert problems == [
            f"no configured endpoint answered: {survivor}: /v3/cluster/member/list: no answer within 1s"
        ]
    else:
        assert [problem.split(": ")[0] for problem in sorted(problems)] == [
            "member etcd-1 did not answer",
            "member etcd-2 did not answer",
        ]
