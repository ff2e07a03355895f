"""The policy: pure decisions about one etcd cluster, over facts the I/O edges collected.

Nothing here performs I/O. `exporter.engine` gathers statuses and carries out the plan these
functions return; `exporter.collector` exports the same derived figures and rule verdicts, so the
gauges and the engine can never disagree about what "defrag recommended" means.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from exporter.model import Alarm, AlarmKind, Member, MemberStatus
from exporter.rule import Rule, RuleEvaluationError, parse_rule
from exporter.settings import DEFAULT_THRESHOLDS, ClusterConfig, Thresholds

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


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


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


def health_gate(
    *,
    members: Sequence[Member],
    read_errors: Mapping[int, str | None],
    alarms: Sequence[Alarm] | None,
) -> Health:
    """Healthy when every voting member answered a linearizable read and no member is CORRUPT.

    `read_errors` maps member id to the error of its read, or None when it answered. A member
    missing from it counts as unanswered. `alarms` is None when no member could list them: then
    CORRUPT cannot be ruled out. NOSPACE does not block: defragmenting is how it ends.
    A cluster with a voting member down is refused outright: defragmenting one of the others
    would block a second member and can cost the quorum (etcd FAQ, "should I defragment...").
    """
    problems = []
    voters = voting_members(members)
    if not voters:
        problems.append("no voting members in the member list")
    for member in voters:
        if member.id not in read_errors:
            problems.append(f"member {label(member)} was not checked (no client URL?)")
        elif (error := read_errors[member.id]) is not None:
            problems.append(f"member {label(member)} failed a linearizable read: {error}")
    if alarms is None:
        problems.append("the alarm list could not be read from any member")
    for alarm in alarms or ():
        if alarm.kind is AlarmKind.CORRUPT:
            problems.append(f"CORRUPT alarm raised by member {alarm.member_id:x}")
    return Health(not problems, tuple(problems))


def label(member: Member) -> str:
    """How a member is named in messages: its name, or its hex id before it has one."""
    return member.name or f"{member.id:x}"


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
