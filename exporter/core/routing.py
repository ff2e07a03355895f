"""Alert routing: which Alertmanager alert launches a defrag run on which cluster, and why not.

Pure: no I/O, time passed in. `exporter.service.webhook` parses the payload (core/alertmanager.py),
collects the latest cluster health and run states, calls `iter_decisions` and hands each `LAUNCH`
to an executor (`exporter.launch`), which performs the only side effect. A cluster's
alerts are told by its matchers (core/matchers.py, Alertmanager's grammar).
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache

from exporter.config.settings import ClusterConfig, WebhookSettings
from exporter.core.alertmanager import AlertmanagerAlert, AlertStatus
from exporter.core.cooldown import cluster_cooldown
from exporter.core.launches import RunState
from exporter.core.matchers import Matcher, MatchOp, matches_all, parse_matchers
from exporter.core.policy import quorum_gate

# The alerts this project ships (the alert rules use exactly these names).
ALERT_DEFRAG_RECOMMENDED = "EtcdDefragRecommended"
ALERT_NOSPACE = "EtcdNoSpaceAlarm"
ALERT_QUOTA_CRITICAL = "EtcdQuotaUsageCritical"
DEFAULT_ACTING_ALERTS = (ALERT_DEFRAG_RECOMMENDED, ALERT_NOSPACE, ALERT_QUOTA_CRITICAL)
# The label that names the etcd cluster in our alert rules, and so the default route.
CLUSTER_LABEL = "etcd_cluster"


def cluster_matchers(cluster: ClusterConfig) -> tuple[Matcher, ...]:
    """The matchers identifying this cluster's alerts; default `etcd_cluster="<name>"`."""
    return _cluster_matchers(cluster.name, tuple(cluster.alerts.matchers))


@lru_cache(maxsize=4096)
def _cluster_matchers(name: str, matchers: tuple[str, ...]) -> tuple[Matcher, ...]:
    # Cached: every alert is routed against every configured cluster (bench/webhook_storm.py).
    if matchers:
        return parse_matchers(matchers)
    return (Matcher(CLUSTER_LABEL, MatchOp.EQUAL, name),)


def route(*, labels: Mapping[str, str], clusters: Sequence[ClusterConfig]) -> list[ClusterConfig]:
    """The configured clusters whose matchers all match these alert labels."""
    return [c for c in clusters if matches_all(cluster_matchers(c), labels)]


class ClusterIndex:
    """The configured clusters, indexed by their `etcd_cluster="<value>"` matcher; `route` in O(1).

    Most clusters are identified by that one equality matcher (it is the default), so an alert
    needs checking only against the clusters indexed under its own `etcd_cluster` value, plus the
    clusters without such a matcher (e.g. `job="kube-etcd"`), which are checked against every
    alert. The answer is exactly `route`'s, in configuration order.
    """

    def __init__(self, clusters: Sequence[ClusterConfig]) -> None:
        self.clusters = tuple(clusters)
        self.by_name = {c.name: c for c in self.clusters}
        self._by_value: dict[str, list[int]] = {}
        self._others: list[int] = []
        for position, cluster in enumerate(self.clusters):
            key = next(
                (
                    m.value
                    for m in cluster_matchers(cluster)
                    if m.name == CLUSTER_LABEL and m.op is MatchOp.EQUAL and m.value
                ),
                None,
            )
            if key is None:
                self._others.append(position)
            else:
                self._by_value.setdefault(key, []).append(position)

    def route(self, labels: Mapping[str, str]) -> list[ClusterConfig]:
        """The configured clusters whose matchers all match these alert labels."""
        indexed = self._by_value.get(labels.get(CLUSTER_LABEL, ""), [])
        positions = sorted([*indexed, *self._others]) if self._others else indexed
        candidates = (self.clusters[p] for p in positions)
        return [c for c in candidates if matches_all(cluster_matchers(c), labels)]


# --- deciding ------------------------------------------------------------------------------------


class Decision(StrEnum):
    """What becomes of one alert; also the `outcome` label of etcd_autodefrag_alerts_total."""

    LAUNCH = "launch"
    SKIP_RESOLVED = "skip_resolved"
    SKIP_NOT_ACTING = "skip_not_acting"
    SKIP_UNROUTED = "skip_unrouted"
    SKIP_AMBIGUOUS = "skip_ambiguous"
    SKIP_PAUSED = "skip_paused"
    SKIP_ALREADY_RUNNING = "skip_already_running"
    SKIP_COOLDOWN = "skip_cooldown"
    SKIP_NO_SNAPSHOT = "skip_no_snapshot"
    SKIP_STALE_SNAPSHOT = "skip_stale_snapshot"
    SKIP_UNHEALTHY = "skip_unhealthy"
    SKIP_UNAVAILABLE = "skip_unavailable"  # the run would be refused: a defrag would stop the cluster
    SKIP_DEFERRED = "skip_deferred"  # the cluster is changing (a StatefulSet rolling out): next time
    SKIP_DUPLICATE = "skip_duplicate"


@dataclass(frozen=True)
class ClusterHealth:
    """What the latest exporter snapshot says about a cluster (built by the webhook from metrics)."""

    taken_at: datetime
    healthy: bool
    problem: str = ""
    voting_members: int | None = None  # None: not counted; a healthy cluster has them all up


@dataclass(frozen=True)
class ActingFilter:
    """Which alerts may launch a run: by alertname (empty: any name) and label matchers (all must match)."""

    names: frozenset[str]
    matchers: tuple[Matcher, ...] = ()

    @classmethod
    def from_settings(cls, webhook: WebhookSettings) -> "ActingFilter":
        """The filter the webhook settings describe (None names: the alerts this project ships)."""
        names = DEFAULT_ACTING_ALERTS if webhook.acting_alerts is None else webhook.acting_alerts
        return cls(frozenset(names), parse_matchers(webhook.acting_matchers))

    def acts(self, labels: Mapping[str, str]) -> bool:
        """Whether an alert with these labels is one that launches runs."""
        named = not self.names or labels.get("alertname", "") in self.names
        return named and matches_all(self.matchers, labels)


@dataclass(frozen=True)
class Policy:
    """The knobs of `decide`, from the settings."""

    acting: ActingFilter
    cooldown_seconds: float
    max_snapshot_age_seconds: float


@dataclass(frozen=True)
class AlertDecision:
    """The decision for one alert, with a reason a person understands."""

    decision: Decision
    reason: str
    alertname: str
    fingerprint: str
    cluster: str | None = None

    @property
    def launch(self) -> bool:
        """True when this alert launches a run."""
        return self.decision is Decision.LAUNCH


def decide(
    *,
    alert: AlertmanagerAlert,
    clusters: Sequence[ClusterConfig] | ClusterIndex,
    snapshots: Mapping[str, ClusterHealth],
    runs: Mapping[str, RunState],
    now: datetime,
    policy: Policy,
    routed: Sequence[ClusterConfig] | None = None,
) -> AlertDecision:
    """Whether this alert launches a defrag run and on which cluster; performs nothing.

    `routed`: the clusters the alert routes to, when the caller has routed it already.

    Checked in order: firing, acting, routed to exactly one cluster, not paused, no run in flight,
    out of cooldown, a fresh snapshot that shows the cluster healthy, and a defrag that would not
    stop the cluster (or the cluster accepts that: allow_unavailable_defrag).
    """

    def result(decision: Decision, reason: str, cluster: str | None = None) -> AlertDecision:
        return AlertDecision(decision, reason, alert.name, alert.fingerprint, cluster)

    if alert.status is AlertStatus.RESOLVED:
        return result(Decision.SKIP_RESOLVED, "alert resolved: acknowledged, nothing to do")
    if not policy.acting.acts(alert.labels):
        return result(
            Decision.SKIP_NOT_ACTING, f"alert {alert.name or '(no alertname)'} does not launch runs"
        )
    if routed is not None:
        matched = list(routed)
    elif isinstance(clusters, ClusterIndex):
        matched = clusters.route(alert.labels)
    else:
        matched = route(labels=alert.labels, clusters=clusters)
    if not matched:
        return result(Decision.SKIP_UNROUTED, f"labels {_labels(alert.labels)} match no configured cluster")
    if len(matched) > 1:
        names = ", ".join(c.name for c in matched)
        return result(
            Decision.SKIP_AMBIGUOUS,
            f"labels {_labels(alert.labels)} match several clusters ({names}): fix their alerts matchers",
        )
    cluster = matched[0]
    name = cluster.name
    if cluster.paused:
        return result(Decision.SKIP_PAUSED, f"cluster {name} is paused in the configuration", name)
    run = runs.get(name, RunState())
    if run.running:
        since = f" since {run.started_at.isoformat(timespec='seconds')}" if run.started_at else ""
        return result(Decision.SKIP_ALREADY_RUNNING, f"a run on cluster {name} is in flight{since}", name)
    cooldown = cluster_cooldown(cluster, run, default_seconds=policy.cooldown_seconds, now=now)
    if cooldown.active:
        return result(Decision.SKIP_COOLDOWN, f"cluster {name} cools down {cooldown.reason}", name)
    health = snapshots.get(name)
    if health is None:
        return result(Decision.SKIP_NO_SNAPSHOT, f"cluster {name} has not been observed yet", name)
    age = (now - health.taken_at).total_seconds()
    if age > policy.max_snapshot_age_seconds:
        return result(
            Decision.SKIP_STALE_SNAPSHOT,
            f"latest snapshot of cluster {name} is {age:.0f}s old "
            f"(limit {policy.max_snapshot_age_seconds:g}s)",
            name,
        )
    if not health.healthy:
        return result(Decision.SKIP_UNHEALTHY, f"cluster {name} is not healthy: {health.problem}", name)
    if health.voting_members is not None:
        # The run's own quorum gate would refuse it: no Job, no cooldown, the reason said here.
        gate = quorum_gate(
            voting=health.voting_members,
            healthy_voting=health.voting_members,
            allow_unavailable=cluster.allow_unavailable_defrag,
        )
        if not gate.proceed:
            return result(Decision.SKIP_UNAVAILABLE, f"cluster {name}: {gate.reason}", name)
    return result(Decision.LAUNCH, f"alert {alert.name} fired for cluster {name}", name)


def snapshot_wanted(
    *,
    alerts: Sequence[AlertmanagerAlert],
    routes: Sequence[Sequence[ClusterConfig]],
    policy: Policy,
) -> set[str]:
    """The clusters whose health `decide` may look at for these alerts: those a firing, acting alert
    routes to alone and that are not paused. The webhook reads a fresh snapshot of these only.

    `routes`: each alert's clusters (ClusterIndex.route), as `iter_decisions` takes them.
    """
    wanted = set()
    for alert, matched in zip(alerts, routes, strict=True):
        if alert.status is AlertStatus.RESOLVED or not policy.acting.acts(alert.labels):
            continue
        if len(matched) == 1 and not matched[0].paused:
            wanted.add(matched[0].name)
    return wanted


def iter_decisions(
    *,
    alerts: Sequence[AlertmanagerAlert],
    clusters: Sequence[ClusterConfig] | ClusterIndex,
    snapshots: Mapping[str, ClusterHealth],
    runs: Mapping[str, RunState],
    now: datetime,
    policy: Policy,
    routes: Sequence[Sequence[ClusterConfig]] | None = None,
) -> Iterator[AlertDecision]:
    """`decide` for every alert of a notification in turn, with at most one launch per cluster.

    A generator, so that the webhook can decide a large notification a slice at a time and let
    other requests (`/healthz` included) in between. `routes`: each alert's clusters, when the
    caller has routed them already (the webhook does, to know which snapshots to judge).
    """
    launching: dict[str, str] = {}
    for position, alert in enumerate(alerts):
        decision = decide(
            alert=alert,
            clusters=clusters,
            snapshots=snapshots,
            runs=runs,
            now=now,
            policy=policy,
            routed=None if routes is None else routes[position],
        )
        cluster = decision.cluster
        if decision.launch and cluster is not None:
            if cluster in launching:
                decision = AlertDecision(
                    Decision.SKIP_DUPLICATE,
                    f"alert {launching[cluster]} of the same notification already launches a run on "
                    f"cluster {cluster}",
                    decision.alertname,
                    decision.fingerprint,
                    cluster,
                )
            else:
                launching[cluster] = decision.alertname
        yield decision


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
