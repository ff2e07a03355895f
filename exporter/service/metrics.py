"""The metrics: what /metrics exports, built fresh from the latest snapshots on every scrape.

`SnapshotCollector.collect()` holds no state of its own: a member or cluster that is gone from the
snapshots is gone from the exposition, so no stale series linger (prometheus/client_python,
"Custom Collectors"). Label names: `etcd_cluster` for the etcd cluster (never `cluster`, which
clashes with Prometheus target labels) and `member` for the member name.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.core.model import AlarmKind
from exporter.core.policy import fragmentation_ratio, free_bytes, label, quota_usage_ratio, voting_members
from exporter.core.snapshot import ClusterSnapshot

if TYPE_CHECKING:
    from exporter.service.refresh import Refresher

PREFIX = "etcd_autodefrag"
MEMBER_LABELS = ["etcd_cluster", "member"]
ALARM_KINDS = (AlarmKind.NOSPACE, AlarmKind.CORRUPT)
HTTP_ERROR_CAUSES = ("malformed_request", "server_error")


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
            "Identity of each etcd member: id, the client URL we query and the etcd version.",
            labels=[*MEMBER_LABELS, "member_id", "client_url", "version", "learner"],
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
        shard = self.refresher.shard
        shard_info = InfoMetricFamily(
            f"{PREFIX}_shard",
            "Which part of the clusters this replica observes: shard (0-based) of total_shards "
            "(docs/sharding.md). A series of every replica, as build_info is.",
        )
        shard_info.add_metric([], {"shard": str(shard.index), "total_shards": str(shard.total)})
        yield shard_info

        for watch, snapshot in self.refresher.snapshots():
            name = snapshot.cluster
            duration.add_metric([name], watch.refresh_duration_seconds)
            errors.add_metric([name], watch.refresh_errors_total)
            healthy.add_metric([name], float(snapshot.health().healthy))
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
                        "client_url": m.endpoint,
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


class RunMetrics:
    """Counters and gauges of defrag runs and of the webhook, registered in the app's registry.

    Runs and alerts are events, not observations, so they live in ordinary prometheus_client
    metrics rather than in a snapshot collector. `run_duration_seconds` is the duration of the last
    run, a gauge rather than a histogram: a cluster sees a handful of runs a day, too few for
    quantiles, and "the last run took 40 minutes" is what one graphs and alerts on; a histogram
    would cost ~15 series per cluster for nothing.
    """

    def __init__(self, registry: CollectorRegistry, *, alert_outcomes: Iterable[str]) -> None:
        cl = ["etcd_cluster"]
        self.runs = Counter(
            f"{PREFIX}_runs",
            "Defrag runs that ended, by result: the engine's result (success, nothing_to_do, failed, "
            "refused, dry_run) or job_failed when the run ended without a report.",
            [*cl, "result"],
            registry=registry,
        )
        self.duration = Gauge(
            f"{PREFIX}_run_duration_seconds",
            "How long the last finished defrag run of the cluster took, start to end.",
            cl,
            registry=registry,
        )
        self.reclaimed = Counter(
            f"{PREFIX}_reclaimed_bytes",
            "Disk space defrag runs gave back, summed over members and runs.",
            cl,
            registry=registry,
        )
        self.last_run = Gauge(
            f"{PREFIX}_last_run_timestamp_seconds",
            "When the last defrag run with this result ended (Unix time), e.g. the last success.",
            [*cl, "result"],
            registry=registry,
        )
        self.alerts = Counter(
            f"{PREFIX}_alerts",
            "Alerts received on the Alertmanager webhook, by what became of them (launch, skip_* with "
            "the reason); a refused request (unauthorized, bad_request, ...) counts once.",
            ["outcome"],
            registry=registry,
        )
        for outcome in alert_outcomes:
            self.alerts.labels(outcome)  # every outcome exported from the start, at 0
        self.http_errors = Counter(
            f"{PREFIX}_http_errors",
            "HTTP requests answered with an error before or outside the handlers' own answers: "
            "malformed_request (not valid HTTP, answered 400 by the server) or server_error (a "
            "handler failed: a bug, answered 5xx).",
            ["cause"],
            registry=registry,
        )
        for cause in HTTP_ERROR_CAUSES:
            self.http_errors.labels(cause)

    def declare_clusters(self, clusters: Iterable[str], results: Iterable[str]) -> None:
        """Export every cluster's run counters from the start, at 0, and drop removed clusters.

        A counter child that appears only at its first increment makes `increase()` miss that
        first run (after every restart); a removed cluster must leave no series behind.
        """
        wanted = set(clusters)
        results = list(results)
        for metric in (self.runs, self.last_run, self.reclaimed, self.duration):
            # prometheus_client has no public way to list a metric's children.
            for labels in list(metric._metrics):
                if labels[0] not in wanted:
                    metric.remove(*labels)
        for cluster in sorted(wanted):
            self.reclaimed.labels(cluster)
            for result in results:
                self.runs.labels(cluster, result)

    def record_run(
        self,
        *,
        cluster: str,
        result: str,
        duration_seconds: float,
        reclaimed_bytes: int,
        finished_at: datetime,
    ) -> None:
        """Account for one finished run."""
        self.runs.labels(cluster, result).inc()
        self.duration.labels(cluster).set(duration_seconds)
        self.reclaimed.labels(cluster).inc(max(reclaimed_bytes, 0))
        self.last_run.labels(cluster, result).set(finished_at.timestamp())

    def count_http_error(self, cause: str) -> None:
        """Count a request the HTTP server answered with an error (HTTP_ERROR_CAUSES)."""
        self.http_errors.labels(cause).inc()

    def count_alert(self, outcome: str, count: int = 1) -> None:
        """Count alerts (or one refused request) under an outcome."""
        self.alerts.labels(outcome).inc(count)


class InFlightCollector(Collector):
    """`runs_in_flight` per configured cluster, read from the executor at scrape time (no stale series)."""

    def __init__(self, in_flight: Callable[[], Mapping[str, bool]]) -> None:
        self.in_flight = in_flight

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_runs_in_flight",
            "1 while a defrag run (Job or local process) of the cluster is running, else 0.",
            labels=["etcd_cluster"],
        )
        for cluster, running in sorted(self.in_flight().items()):
            gauge.add_metric([cluster], float(running))
        yield gauge


class TenantCollector(Collector):
    """`datastore_tenant_info` per tenant control plane of each discovered Kamaji DataStore.

    Read at scrape time from the DataStores' `status.usedBy`, so a tenant that moves or a DataStore
    that is deleted leaves no series behind.
    """

    def __init__(self, tenants: Callable[[], Mapping[str, Iterable[str]]]) -> None:
        self.tenants = tenants

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(
            f"{PREFIX}_datastore_tenant",
            "1 for each tenant control plane (namespace/name) that uses the Kamaji DataStore of this "
            "etcd cluster (its status.usedBy).",
            labels=["etcd_cluster", "tenant"],
        )
        for cluster, tenants in sorted(self.tenants().items()):
            for tenant in sorted(tenants):
                info.add_metric([cluster, tenant], {})
        yield info
