"""Observing a cluster without changing it: members, statuses, quota, alarms, rule verdicts.

`etcd-autodefrag status` prints one snapshot; the service keeps the latest snapshot of every cluster
and exports it on /metrics. Every member is asked concurrently with its own timeout, so a dead member
costs one timeout, not one per member, and never hides the others.
"""

import asyncio
from dataclasses import dataclass, field, replace

from exporter.config.settings import ClusterConfig
from exporter.core import clock
from exporter.core.model import AlarmKind, Member, MemberStatus
from exporter.core.policy import evaluate, leader_of, with_quota
from exporter.core.rule import Rule
from exporter.core.snapshot import ClusterSnapshot, MemberSnapshot
from exporter.etcd.client import EtcdApi, EtcdError, MetricsFacts
from exporter.etcd.topology import Topology, discover


@dataclass
class QuotaCache:
    """What a member's /metrics page says (quota, process start), read once: both change only with a restart.

    An entry is dropped when its member stops answering (it may come back with another quota and
    start time) and otherwise kept for `max_age_seconds`; 0 reads the page at every status (the
    engine does, so that its rollout gate sees a restart between two members).
    """

    max_age_seconds: float = 600.0
    _entries: dict[str, tuple[MetricsFacts, float]] = field(default_factory=dict)

    def get(self, endpoint: str) -> MetricsFacts | None:
        """What the endpoint's page said, or None when it has not been read (lately)."""
        entry = self._entries.get(endpoint)
        if entry is None or clock.monotonic() - entry[1] >= self.max_age_seconds:
            return None
        return entry[0]

    def put(self, endpoint: str, facts: MetricsFacts) -> None:
        """Remember what the endpoint's metrics said."""
        self._entries[endpoint] = (facts, clock.monotonic())

    def forget(self, endpoint: str) -> None:
        """Drop an endpoint, e.g. after it failed to answer."""
        self._entries.pop(endpoint, None)


async def member_status(
    client: EtcdApi, cluster: ClusterConfig, endpoint: str, quotas: QuotaCache
) -> MemberStatus:
    """A member's status with the quota it runs with (status field, metrics page, or configured).

    The metrics page also gives the process start time the rollout gate needs; it is read even when
    the status carries the quota (etcd >= 3.6), once per `quotas.max_age_seconds`.
    """
    try:
        status = await client.status(endpoint)
    except EtcdError:
        quotas.forget(endpoint)
        raise
    facts = quotas.get(endpoint)
    if facts is None:
        try:
            facts = await client.read_metrics(endpoint)
            quotas.put(endpoint, facts)
        except EtcdError:
            facts = MetricsFacts()  # retried next time; the configured quota covers meanwhile
    configured = int(cluster.quota_bytes) if cluster.quota_bytes else None
    status = with_quota(status, metrics_quota=facts.quota_bytes, configured_quota=configured)
    if facts.process_start_time_seconds:
        status = replace(status, process_start_time_seconds=facts.process_start_time_seconds)
    return status


async def observe_cluster(
    client: EtcdApi,
    cluster: ClusterConfig,
    rule: Rule,
    quotas: QuotaCache,
    *,
    topology: Topology | None = None,
) -> ClusterSnapshot:
    """One snapshot of the members the configuration selects; never raises for etcd failures.

    One status call per member is all it takes: the reply carries the leader, the sizes and the
    cluster's active alarms. `topology` (a cached one) saves the member-list round trip.
    """
    taken_at = clock.utcnow()
    if topology is None:
        try:
            topology = await discover(client, cluster)
        except EtcdError as exc:
            return ClusterSnapshot(cluster.name, taken_at, error=exc.message)

    async def one(member: Member, endpoint: str | None) -> tuple[Member, str, MemberStatus | str]:
        if endpoint is None:
            return member, "", "member has no client URL (not started yet?)"
        try:
            return member, endpoint, await member_status(client, cluster, endpoint, quotas)
        except EtcdError as exc:
            return member, endpoint, exc.message

    answers = await asyncio.gather(*(one(m, url) for m, url in topology.selected()))
    statuses = [a for _, _, a in answers if isinstance(a, MemberStatus)]
    alarms = {alarm for status in statuses for alarm in status.alarms}
    nospace = any(a.kind is AlarmKind.NOSPACE for a in alarms)
    snapshots = tuple(
        MemberSnapshot(member, endpoint, answer, None, evaluate(rule, answer, nospace=nospace))
        if isinstance(answer, MemberStatus)
        else MemberSnapshot(member, endpoint, None, answer)
        for member, endpoint, answer in answers
    )
    return ClusterSnapshot(
        cluster.name,
        taken_at,
        snapshots,
        tuple(sorted(alarms, key=lambda a: (a.member_id, a.kind))),
        leader_of(statuses),
    )
