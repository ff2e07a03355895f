"""The policy: pure decisions about one etcd cluster, over facts the I/O edges collected.

Nothing here performs I/O. `exporter.defrag.engine` gathers statuses and carries out the plan these
functions return; `exporter.collector` exports the same derived figures and rule verdicts, so the
gauges and the engine can never disagree about what "defrag recommended" means.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from exporter.config.settings import DEFAULT_THRESHOLDS, ClusterConfig, Thresholds
from exporter.core.model import Alarm, AlarmKind, Member, MemberStatus
from exporter.core.rule import Rule, RuleEvaluationError, parse_rule
from exporter.core.units import human_bytes

# --- derived figures -----------------------------------------------------------------------------


def free_bytes(status: MemberStatus) -> int:
    """Bytes a defragmentation would give back: database file size minus the part in use."""
    return max(status.db_size_bytes - status.db_size_in_use_bytes, 0)


def fragmentation_ratio(status: MemberStatus) -> float:
    """Share of the database file that is free pages (0 for an empty file)."""
    return free_bytes(status) / status.db_size_bytes if status.db_size_bytes else 0.0


def quota_usage_ratio(status: MemberStatus) -> float | None:
    """Share of the quota the file occupies; None while the quota is unknown."""
    return status.db_size_bytes / status.quota_bytes if status.quota_bytes else None


def with_quota(
    status: MemberStatus, *, metrics_quota: int | None, configured_quota: int | None
) -> MemberStatus:
    """The status with the quota the member runs with.

    Order of trust: what the member reports in its status (etcd >= 3.6), then its own metrics
    page, then the configured fallback. Never a guess: kamaji's defrag.sh assumed 2 GiB on
    clusters running 8 GiB and so misjudged quota usage fourfold.
    """
    if status.quota_bytes:
        return status
    return replace(status, quota_bytes=metrics_quota or configured_quota or 0)


# --- the rule ------------------------------------------------------------------------------------


def thresholds_expression(thresholds: Thresholds) -> str:
    """The etcd-defrag expression equivalent to structured thresholds (shown in logs and plans)."""
    required = []
    if thresholds.min_db_size_bytes is not None:
        required.append(f"dbSize >= {int(thresholds.min_db_size_bytes)}")
    if thresholds.min_free_bytes is not None:
        required.append(f"dbSizeFree >= {int(thresholds.min_free_bytes)}")
    either = []
    if thresholds.min_fragmentation_ratio is not None:
        either.append(f"dbSizeFree >= {thresholds.min_fragmentation_ratio!r} * dbSize")
    if thresholds.quota_usage_above is not None:
        either.append(f"dbQuotaUsage > {thresholds.quota_usage_above!r}")
    if either:
        required.append(either[0] if len(either) == 1 else "(" + " || ".join(either) + ")")
    # No threshold at all means "always", as etcd-defrag does without --defrag-rule.
    return " && ".join(required) or "true"


def cluster_rule(cluster: ClusterConfig) -> Rule:
    """The rule that decides for this cluster: its expression, its thresholds, or our default."""
    if cluster.rule is not None:
        return parse_rule(cluster.rule)
    return parse_rule(thresholds_expression(cluster.thresholds or DEFAULT_THRESHOLDS))


def rule_variables(status: MemberStatus) -> dict[str, float]:
    """The variables etcd-defrag's rules see, for one member (quota ones only when known)."""
    variables = {
        "dbSize": float(status.db_size_bytes),
        "dbSizeInUse": float(status.db_size_in_use_bytes),
        "dbSizeFree": float(free_bytes(status)),
    }
    usage = quota_usage_ratio(status)
    if usage is not None:
        variables["dbQuota"] = float(status.quota_bytes)
        variables["dbQuotaUsage"] = usage
    return variables


@dataclass(frozen=True)
class Verdict:
    """Whether the rule selects a member, and why (for logs, plans and metrics)."""

    defrag: bool
    reason: str
    error: bool = False


def evaluate(rule: Rule, status: MemberStatus, *, nospace: bool = False) -> Verdict:
    """Apply the rule to one member. A rule that cannot be evaluated never selects the member.

    While a NOSPACE alarm is active the cluster accepts no writes, and defragmenting every member is
    the documented way out (etcd maintenance guide, "space quota"), so the rule is not consulted.
    Its figures may also be stale then: freed pages show as free only after the next write commits.
    """
    if status.is_learner:
        return Verdict(False, "learner: not a voting member, not defragmented")
    if nospace:
        return Verdict(True, "NOSPACE alarm active: defragmenting to recover")
    needs_quota = rule.variables_used() & {"dbQuota", "dbQuotaUsage"}
    if needs_quota and not status.quota_bytes:
        return Verdict(
            False,
            "quota unknown (no dbSizeQuota, no metrics, no configured quota_bytes); the rule needs "
            + ", ".join(sorted(needs_quota)),
            error=True,
        )
    try:
        selected = rule.evaluate(rule_variables(status))
    except RuleEvaluationError as exc:
        return Verdict(False, f"rule could not be evaluated: {exc}", error=True)
    figures = f"size {human_bytes(status.db_size_bytes)}, free {human_bytes(free_bytes(status))}"
    if status.quota_bytes:
        figures += f", quota usage {quota_usage_ratio(status):.1%}"
    return Verdict(selected, f"rule {'matches' if selected else 'does not match'} ({figures})")


# --- health --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """The cluster health gate's answer."""

    healthy: bool
    problems: tuple[str, ...] = ()


def voting_members(members: Iterable[Member]) -> list[Member]:
    """Members that count towards quorum (learners do not)."""
    return [m for m in members if not m.is_learner]


def cluster_health(
    *,
    members: Sequence[Member],
    answers: Mapping[Member, str | None],
    alarms: Sequence[Alarm] | None,
    leaders: Mapping[Member, int] | None = None,
    failure: str = "did not answer",
) -> Health:
    """The one health verdict: the engine's gate, the webhook's skip and `cluster_healthy` all use it.

    Healthy when every voting member answered, no member is CORRUPT, and (when `leaders` is given)
    the voters agree on a leader. `answers` maps member id to the error of its read (`failure` says
    which read, e.g. "failed a linearizable read"), or None when it answered; a voter missing from
    it counts as unchecked. `alarms` is None when no member could list them: then CORRUPT cannot be
    ruled out. `leaders` maps member id to the leader it reports (0: none); the engine leaves it
    out, because it moves leadership itself and its linearizable reads already prove a leader.
    NOSPACE does not block: defragmenting is how it ends. A cluster with a voting member down is
    refused outright: defragmenting one of the others would block a second member and can cost the
    quorum (etcd FAQ, "should I defragment...").
    """
    problems = []
    voters = voting_members(members)
    if not voters:
        problems.append("no voting members in the member list")
    for member in voters:
        if member not in answers:
            problems.append(f"member {label(member)} was not checked (no client URL?)")
        elif (error := answers[member]) is not None:
            problems.append(f"member {label(member)} {failure}: {error}")
    if not problems and leaders is not None:
        seen = {leaders.get(m, 0) for m in voters}
        if seen == {0}:
            problems.append("no leader")
        elif len(seen) > 1:
            problems.append("members disagree about the leader")
    if alarms is None:
        problems.append("the alarm list could not be read from any member")
    for alarm in alarms or ():
        if alarm.kind is AlarmKind.CORRUPT:
            problems.append(f"CORRUPT alarm raised by member {alarm.member_id:x}")
    return Health(not problems, tuple(problems))


def label(member: Member) -> str:
    """How a member is named in messages: its name, or its hex id before it has one."""
    return member.name or f"{member.id:x}"


# --- the safety gates: what a defrag costs, and whether the cluster is changing ------------------
#
# etcd blocks a member's reads and writes, and its raft apply, for the whole defragmentation (etcd
# maintenance guide, "Defragmentation"). While it runs, that member cannot acknowledge proposals, so
# the others must still form a quorum (more than half of the voting members) on their own.


class QuorumCost(StrEnum):
    """What defragmenting one voting member costs the cluster; also shown by `status`."""

    NONE = "none"  # the other healthy voting members still form a quorum
    CLUSTER_UNAVAILABLE = "cluster_unavailable"  # the only voting member: the whole cluster stops
    QUORUM_LOST = "quorum_lost"  # the others are fewer than a quorum: writes (and quorum reads) stop


def quorum_size(voting: int) -> int:
    """Votes a raft decision needs among `voting` members."""
    return voting // 2 + 1


def quorum_cost(*, voting: int, healthy_voting: int) -> tuple[QuorumCost, str]:
    """What defragmenting one of the healthy voting members costs, with the reason in words."""
    if voting <= 1:
        return QuorumCost.CLUSTER_UNAVAILABLE, (
            "a single voting member: the whole cluster stops answering while it is defragmented "
            "(seconds to minutes, with any API server on top of it)"
        )
    left, needed = healthy_voting - 1, quorum_size(voting)
    if left < needed:
        return QuorumCost.QUORUM_LOST, (
            f"{healthy_voting} of {voting} voting members healthy: defragmenting one leaves {left}, "
            f"fewer than the quorum of {needed}, so the cluster stops accepting writes meanwhile"
        )
    return QuorumCost.NONE, (
        f"defragmenting one member leaves {left} of {voting} voting members, a quorum of {needed} or more"
    )


class Gate(StrEnum):
    """Whether a run may defragment the next member; also the log's and the report's reason."""

    PROCEED = "proceed"
    REFUSE_UNAVAILABLE = "refuse_unavailable"  # a defrag would take the cluster or its quorum down
    DEFER_RECENT_START = "defer_recent_start"  # a member restarted within settle_seconds
    DEFER_LEARNER = "defer_learner"  # a member is being added
    DEFER_MEMBERS_CHANGED = "defer_members_changed"  # the member list is not the one planned with
    DEFER_ROLLOUT = "defer_rollout"  # the StatefulSet of the members is rolling out (kamaji)


@dataclass(frozen=True)
class GateDecision:
    """A gate's answer with the reason a person reads."""

    gate: Gate
    reason: str = ""

    @property
    def proceed(self) -> bool:
        """The run may go on."""
        return self.gate is Gate.PROCEED

    @property
    def deferred(self) -> bool:
        """The cluster is changing: try again later (not a failure, no cooldown)."""
        return self.gate.value.startswith("defer_")


def quorum_gate(*, voting: int, healthy_voting: int, allow_unavailable: bool) -> GateDecision:
    """Refuse a defrag that would take the cluster or its quorum down, unless downtime is accepted.

    Performed by `exporter.defrag.engine` before the first member and again before each one. Automation
    (the webhook's Jobs, CronJobs) must not stop a cluster as a side effect: a one-member cluster
    (kind, single-master kubeadm, a small Kamaji datastore) or a two-member one is refused unless
    its configuration says `allow_unavailable_defrag: true` (the CLI: `--allow-unavailable`).
    """
    cost, why = quorum_cost(voting=voting, healthy_voting=healthy_voting)
    if cost is QuorumCost.NONE:
        return GateDecision(Gate.PROCEED, why)
    if allow_unavailable:
        return GateDecision(Gate.PROCEED, f"{why}; accepted (allow_unavailable_defrag)")
    return GateDecision(
        Gate.REFUSE_UNAVAILABLE,
        f"{why}; set allow_unavailable_defrag: true for this cluster (or pass --allow-unavailable) "
        "to accept that",
    )


def membership(members: Iterable[Member]) -> frozenset[tuple[int, bool, tuple[str, ...]]]:
    """What identifies a member list for the rollout gate: ids, learner flags and peer URLs."""
    return frozenset((m.id, m.is_learner, tuple(sorted(m.peer_urls))) for m in members)


def rollout_gate(
    *,
    members: Sequence[Member],
    planned_members: Sequence[Member],
    started_at_seconds: Mapping[int, float],
    now_seconds: float,
    settle_seconds: float,
) -> GateDecision:
    """Defer while the cluster is changing: a learner, a changed member list, a member just started.

    Performed by `exporter.defrag.engine` before the plan (with `planned_members` the same list) and again
    before each member. `started_at_seconds` maps member id to its `process_start_time_seconds`
    (Unix time, from its /metrics page); a member missing from it cannot be judged and does not
    defer. Cluster API's automatic defrag for KubeadmControlPlane skips rollouts for the same
    reasons: a restarted member may still be catching up, and the next one is about to restart.
    """
    if membership(members) != membership(planned_members):
        before = {m.id for m in planned_members}
        after = {m.id for m in members}
        what = [f"added {label(m)}" for m in members if m.id not in before]
        what += [f"removed {label(m)}" for m in planned_members if m.id not in after]
        return GateDecision(
            Gate.DEFER_MEMBERS_CHANGED,
            "the member list changed since the plan"
            + (f" ({', '.join(what)})" if what else " (a learner promoted or a peer URL changed)"),
        )
    if learners := [m for m in members if m.is_learner]:
        return GateDecision(
            Gate.DEFER_LEARNER,
            f"learner {', '.join(label(m) for m in learners)} present: a member is being added",
        )
    if settle_seconds > 0:
        for member in members:
            started = started_at_seconds.get(member.id)
            if started is not None and (age := now_seconds - started) < settle_seconds:
                return GateDecision(
                    Gate.DEFER_RECENT_START,
                    f"member {label(member)} started {max(age, 0):.0f}s ago (settle_seconds "
                    f"{settle_seconds:g}): a restart or rolling update may be in progress",
                )
    return GateDecision(Gate.PROCEED)


def statefulset_rollout_gate(statefulset: Mapping[str, Any]) -> GateDecision:
    """Defer while a StatefulSet (kamaji-etcd's members) is not fully rolled out.

    The checks of `kubectl rollout status statefulset`: the controller has seen the latest spec,
    every replica is ready, and every replica runs the update revision (with a partition: the
    replicas above it do). Performed by the Kubernetes executor before it creates a Job.
    """
    metadata = statefulset.get("metadata") or {}
    spec = statefulset.get("spec") or {}
    status = statefulset.get("status") or {}
    name = metadata.get("name", "?")
    replicas = 1 if spec.get("replicas") is None else int(spec["replicas"])
    observed, generation = int(status.get("observedGeneration") or 0), int(metadata.get("generation") or 0)
    if observed == 0 or generation > observed:
        return GateDecision(
            Gate.DEFER_ROLLOUT, f"StatefulSet {name}: the controller has not yet seen its latest spec"
        )
    ready = int(status.get("readyReplicas") or 0)
    if ready < replicas:
        return GateDecision(Gate.DEFER_ROLLOUT, f"StatefulSet {name}: {ready} of {replicas} replicas ready")
    updated = int(status.get("updatedReplicas") or 0)
    partition = int(((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition") or 0)
    if partition > 0:
        if updated < replicas - partition:
            return GateDecision(
                Gate.DEFER_ROLLOUT,
                f"StatefulSet {name}: {updated} of the {replicas - partition} replicas above the "
                "partition updated",
            )
        return GateDecision(Gate.PROCEED)
    current, update = status.get("currentRevision"), status.get("updateRevision")
    if updated < replicas or current != update:
        return GateDecision(
            Gate.DEFER_ROLLOUT,
            f"StatefulSet {name}: rolling update in progress ({updated} of {replicas} replicas at "
            f"revision {update or '?'})",
        )
    return GateDecision(Gate.PROCEED)


# --- the plan ------------------------------------------------------------------------------------


class Step(StrEnum):
    """What the plan says about one member."""

    DEFRAG = "defrag"
    SKIP_LEARNER = "skip_learner"
    SKIP_BELOW_THRESHOLD = "skip_below_threshold"
    SKIP_RULE_ERROR = "skip_rule_error"
    SKIP_NOT_TARGETED = "skip_not_targeted"


@dataclass(frozen=True)
class PlannedMember:
    """One member in the order the engine will visit it, with the reason for its step."""

    member: Member
    endpoint: str
    step: Step
    reason: str
    is_leader: bool = False


@dataclass(frozen=True)
class Plan:
    """Members in visiting order: followers first, the leader last."""

    leader_id: int
    members: tuple[PlannedMember, ...]

    @property
    def to_defrag(self) -> list[PlannedMember]:
        """The members the plan will defragment, in order."""
        return [p for p in self.members if p.step is Step.DEFRAG]


def leader_of(statuses: Iterable[MemberStatus]) -> int:
    """The leader most members agree on, in the highest raft term any of them reports (0 if none)."""
    answers = [s for s in statuses if s.leader_id]
    if not answers:
        return 0
    term = max(s.raft_term for s in answers)
    votes = Counter(s.leader_id for s in answers if s.raft_term == term)
    return votes.most_common(1)[0][0]


def endpoint_for(member: Member, configured: Sequence[str]) -> str | None:
    """The URL to reach a member: a configured endpoint that is one of its client URLs, else its first."""
    for endpoint in configured:
        if endpoint in member.client_urls:
            return endpoint
    return member.client_urls[0] if member.client_urls else None


def make_plan(
    *,
    rule: Rule,
    members: Sequence[Member],
    statuses: Mapping[int, MemberStatus],
    targets: frozenset[int] | None = None,
    endpoints: Mapping[int, str],
    nospace: bool = False,
) -> Plan:
    """Order the members (learners skipped, each member once, leader last) and evaluate the rule.

    `statuses` maps member id to its fresh status; `targets` limits defragmentation to some member
    ids (None: all); `endpoints` maps member id to the URL to use. Members without a status or
    endpoint cannot be planned: the health gate refuses such a cluster before we get here.
    """
    leader_id = leader_of(statuses.values())
    planned = []
    seen: set[int] = set()
    for member in members:
        if member.id in seen:
            continue  # one member reached through several configured endpoints: visit it once
        seen.add(member.id)
        endpoint = endpoints.get(member.id, "")
        is_leader = member.id == leader_id
        if member.is_learner:
            step, reason = Step.SKIP_LEARNER, "learner: not a voting member, not defragmented"
        elif targets is not None and member.id not in targets:
            step, reason = Step.SKIP_NOT_TARGETED, "not among the configured endpoints"
        else:
            verdict = evaluate(rule, statuses[member.id], nospace=nospace)
            step = (
                Step.DEFRAG
                if verdict.defrag
                else Step.SKIP_RULE_ERROR
                if verdict.error
                else Step.SKIP_BELOW_THRESHOLD
            )
            reason = verdict.reason
        planned.append(PlannedMember(member, endpoint, step, reason, is_leader))
    return Plan(leader_id, tuple(leader_last(planned, leader_id)))


def leader_last(planned: Sequence[PlannedMember], leader_id: int) -> list[PlannedMember]:
    """Followers in a stable order (by name, then id), the current leader at the end.

    The engine calls this again on the members it has not visited yet whenever leadership
    moves, so the member that is leader *now* is always the one defragmented last.
    """
    ordered = sorted(planned, key=lambda p: (p.member.id == leader_id, p.member.name, p.member.id))
    return [replace(p, is_leader=p.member.id == leader_id) for p in ordered]


# --- after the run -------------------------------------------------------------------------------


def alarms_to_disarm(
    *, alarms: Sequence[Alarm], statuses: Sequence[MemberStatus], below_ratio: float
) -> tuple[list[Alarm], str]:
    """NOSPACE alarms that may be cleared: only once every member is below `below_ratio` of its quota.

    Disarming earlier would let writes resume only for etcd to raise the alarm again at once.
    """
    nospace = [a for a in alarms if a.kind is AlarmKind.NOSPACE]
    if not nospace:
        return [], "no NOSPACE alarm"
    for status in statuses:
        usage = quota_usage_ratio(status)
        if usage is None:
            return [], f"quota of member {status.member_id:x} unknown; alarm left for an operator"
        if usage >= below_ratio:
            return [], (
                f"member {status.member_id:x} still at {usage:.1%} of its quota "
                f"(needs < {below_ratio:.0%}); compact more or raise the quota"
            )
    return nospace, f"every member below {below_ratio:.0%} of its quota"
