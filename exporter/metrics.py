"""The metrics: what /metrics exports, built fresh from the latest snapshots on every scrape.

`SnapshotCollector.collect()` holds no state of its own: a member or cluster that is gone from the
snapshots is gone from the exposition, so no stale series linger (prometheus/client_python,
"Custom Collectors"). Label names: `etcd_cluster` for the etcd cluster (never `cluster`, which
clashes with Prometheus target labels) and `member` for the member name.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.model import AlarmKind
from exporter.policy import fragmentation_ratio, free_bytes, label, quota_usage_ratio, voting_members
from exporter.snapshot import ClusterSnapshot

if TYPE_CHECKING:
    from exporter.refresh import Refresher

PREFIX = "etcd_autodefrag"
MEMBER_LABELS = ["etcd_cluster", "member"]
ALARM_KINDS = (AlarmKind.NOSPACE, AlarmKind.CORRUPT)


def cluster_healthy(snapshot: ClusterSnapshot) -> bool:
    """Every voting member answered, they agree on a leader, and no CORRUPT alarm is raised."""
    if snapshot.error or not snapshot.members:
        return False
    voters = [m for m in snapshot.members if not m.member.is_learner]
    if not all(m.up for m in voters) or not snapshot.leader_id:
        return False
    if any(m.status and m.status.leader_id != snapshot.leader_id for m in voters):
        return False
    return not any(a.kind is AlarmKind.CORRUPT for a in snapshot.alarms)


def cluster_defrag_recommended(snapshot: ClusterSnapshot) -> bool:
    """The rule (as the engine applies it) selects at least one member."""
    return any(m.verdict is not None and m.verdict.defrag for m in snapshot.members)


def quota_headroom_bytes(snapshot: ClusterSnapshot) -> int | None:
    """Smallest `quota - size` over the members that answered and report a quota."""
    room = [
        m.status.quota_bytes - m.status.db_size_bytes
        for m in snapshot.members
        if m.status and m.status.quota_bytes
    ]
    return min(room) if room else None


class SnapshotCollector(Collector):
    """Yields every etcd-derived gauge from the refresher's latest snapshots."""

    def __init__(self, refresher: "Refresher") -> None:
        self.refresher = refresher

    def describe(self) -> list[Metric]:
        # No up-front description: collect() must not be called at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        def member_gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=MEMBER_LABELS + (extra or []))

        info = InfoMetricFamily(
            f"{PREFIX}_member",
            "Identity of each etcd member: id, the endpoint we query and the etcd version.",
            labels=[*MEMBER_LABELS, "member_id", "endpoint", "version", "learner"],
        )
        up = member_gauge("member_up", "1 if the member answered the last status request, else 0.")
        size = member_gauge(
            "db_size_bytes", "Size of the member's database file on disk, free pages included."
        )
        in_use = member_gauge("db_size_in_use_bytes", "Bytes of the database file that hold live data.")
        quota = member_gauge(
            "db_quota_bytes",
            "The member's backend quota (--quota-backend-bytes); NOSPACE is raised when the file reaches it.",
        )
        free = member_gauge("db_free_bytes", "Bytes a defragmentation would give back (size minus in use).")
        frag = member_gauge(
            "db_fragmentation_ratio", "Share of the database file that is free pages (free / size)."
        )
        usage = member_gauge(
            "db_quota_usage_ratio", "Share of the quota the database file occupies (size / quota)."
        )
        leader = member_gauge("member_is_leader", "1 if the member is the raft leader.")
        recommended = member_gauge(
            "defrag_recommended",
            "1 if the cluster's defrag rule selects this member now (the rule the engine applies).",
        )
        alarm = member_gauge(
            "alarm_active", "1 while etcd reports this alarm raised by the member.", ["alarm"]
        )
        cl = ["etcd_cluster"]
        headroom = GaugeMetricFamily(
            f"{PREFIX}_cluster_quota_headroom_bytes",
            "Smallest (quota - database size) over the members: bytes left before NOSPACE.",
            labels=cl,
        )
        c_recommended = GaugeMetricFamily(
            f"{PREFIX}_cluster_defrag_recommended",
            "1 if the defrag rule selects at least one member of the cluster.",
            labels=cl,
        )
        healthy = GaugeMetricFamily(
            f"{PREFIX}_cluster_healthy",
            "1 if every voting member answered, all agree on one leader and no CORRUPT alarm is raised.",
            labels=cl,
        )
        members = GaugeMetricFamily(
            f"{PREFIX}_cluster_members", "Members in the cluster's member list, learners included.", labels=cl
        )
        duration = GaugeMetricFamily(
            f"{PREFIX}_refresh_duration_seconds",
            "Time the last refresh of this cluster took (bounded by the scrape budget).",
            labels=cl,
        )
        errors = CounterMetricFamily(
            f"{PREFIX}_refresh_errors",
            "Refreshes of this cluster in which a member or the member list did not answer.",
            labels=cl,
        )
        build = InfoMetricFamily(f"{PREFIX}_build", "Version of etcd-autodefrag serving these metrics.")
        build.add_metric([], {"version": __version__})
        yield build

        for watch, snapshot in self.refresher.snapshots():
            name = snapshot.cluster
            duration.add_metric([name], watch.refresh_duration_seconds)
            errors.add_metric([name], watch.refresh_errors_total)
            healthy.add_metric([name], float(cluster_healthy(snapshot)))
            if snapshot.error:
                continue
            members.add_metric([name], len(snapshot.members))
            c_recommended.add_metric([name], float(cluster_defrag_recommended(snapshot)))
            if (room := quota_headroom_bytes(snapshot)) is not None:
                headroom.add_metric([name], room)
            raised = {(a.member_id, a.kind) for a in snapshot.alarms}
            voter_ids = {m.id for m in voting_members(m.member for m in snapshot.members)}
            for m in snapshot.members:
                s = m.status
                labels = [name, label(m.member) if m.member.id else (m.endpoint or m.member.name)]
                member_id = m.member.id or (s.member_id if s else 0)
                info.add_metric(
                    labels,
                    {
                        "member_id": f"{member_id:x}",
                        "endpoint": m.endpoint,
                        "version": s.version if s else "",
                        "learner": "true" if m.member.is_learner else "false",
                    },
                )
                up.add_metric(labels, float(s is not None))
                if s is None:
                    continue  # no old values for a member that did not answer
                size.add_metric(labels, s.db_size_bytes)
                in_use.add_metric(labels, s.db_size_in_use_bytes)
                free.add_metric(labels, free_bytes(s))
                frag.add_metric(labels, fragmentation_ratio(s))
                if s.quota_bytes:
                    quota.add_metric(labels, s.quota_bytes)
                    usage.add_metric(labels, quota_usage_ratio(s) or 0.0)
                leader.add_metric(labels, float(s.member_id == snapshot.leader_id))
                selected = m.verdict is not None and m.verdict.defrag and member_id in voter_ids
                recommended.add_metric(labels, float(selected))
                for kind in ALARM_KINDS:
                    alarm.add_metric([*labels, kind.value], float((s.member_id, kind) in raised))

        yield from (info, up, size, in_use, quota, free, frag, usage, leader, recommended, alarm)
        yield from (headroom, c_recommended, healthy, members, duration, errors)
