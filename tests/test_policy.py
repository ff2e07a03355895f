"""The pure policy: derived figures, the rule per cluster, the health gate, the plan, disarming."""

import pytest

from exporter.config.settings import ClusterConfig, Thresholds
from exporter.core.model import Alarm, AlarmKind, Member, MemberStatus
from exporter.core.policy import (
    Gate,
    Health,
    QuorumCost,
    Step,
    alarms_to_disarm,
    cluster_health,
    cluster_rule,
    endpoint_for,
    evaluate,
    fragmentation_ratio,
    free_bytes,
    leader_last,
    leader_of,
    make_plan,
    quorum_cost,
    quorum_gate,
    quota_usage_ratio,
    rollout_gate,
    statefulset_rollout_gate,
    thresholds_expression,
    with_quota,
)
from exporter.core.rule import parse_rule
from exporter.core.units import human_bytes

MiB = 1024 * 1024


def status(
    member_id: int = 1,
    *,
    size: int = 100 * MiB,
    in_use: int = 40 * MiB,
    quota: int = 0,
    leader: int = 1,
    term: int = 2,
    learner: bool = False,
) -> MemberStatus:
    return MemberStatus(
        endpoint=f"http://m{member_id}:2379",
        member_id=member_id,
        leader_id=leader,
        cluster_id=99,
        version="3.4.23",
        db_size_bytes=size,
        db_size_in_use_bytes=in_use,
        raft_index=10,
        raft_applied_index=10,
        raft_term=term,
        is_learner=learner,
        quota_bytes=quota,
    )


def member(member_id: int, name: str = "", *, learner: bool = False, urls: tuple[str, ...] = ()) -> Member:
    return Member(
        id=member_id,
        name=name or f"m{member_id}",
        peer_urls=(),
        client_urls=urls or (f"http://m{member_id}:2379",),
        is_learner=learner,
    )


def test_derived_figures() -> None:
    s = status(size=100 * MiB, in_use=40 * MiB, quota=200 * MiB)
    assert free_bytes(s) == 60 * MiB
    assert fragmentation_ratio(s) == pytest.approx(0.6)
    assert quota_usage_ratio(s) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("size", "in_use", "free", "ratio"),
    [(0, 0, 0, 0.0), (4096, 8192, 0, 0.0), (10, 10, 0, 0.0)],
    ids=["empty", "in-use-above-size", "full"],
)
def test_derived_figures_edge_cases(size: int, in_use: int, free: int, ratio: float) -> None:
    s = status(size=size, in_use=in_use)
    assert free_bytes(s) == free
    assert fragmentation_ratio(s) == ratio
    assert quota_usage_ratio(s) is None  # quota unknown


@pytest.mark.parametrize(
    ("reported", "metrics", "configured", "expected"),
    [
        (8 * 1024 * MiB, 2048 * MiB, 1, 8 * 1024 * MiB),  # etcd >= 3.6 reports it in status
        (0, 8 * 1024 * MiB, 2048 * MiB, 8 * 1024 * MiB),  # metrics beat the configured fallback
        (0, None, 2048 * MiB, 2048 * MiB),
        (0, None, None, 0),  # unknown stays unknown: no 2 GiB guess
    ],
)
def test_quota_sources_in_order_of_trust(
    reported: int, metrics: int | None, configured: int | None, expected: int
) -> None:
    got = with_quota(status(quota=reported), metrics_quota=metrics, configured_quota=configured)
    assert got.quota_bytes == expected


@pytest.mark.parametrize(
    ("thresholds", "expression"),
    [
        (Thresholds(), "true"),
        (Thresholds(min_free_bytes=100 * MiB), "dbSizeFree >= 104857600"),
        (
            Thresholds(min_free_bytes=1, min_fragmentation_ratio=0.5, quota_usage_above=0.8),
            "dbSizeFree >= 1 && (dbSizeFree >= 0.5 * dbSize || dbQuotaUsage > 0.8)",
        ),
        (
            Thresholds(min_db_size_bytes=10, quota_usage_above=0.9),
            "dbSize >= 10 && dbQuotaUsage > 0.9",
        ),
    ],
)
def test_thresholds_become_an_expression(thresholds: Thresholds, expression: str) -> None:
    assert thresholds_expression(thresholds) == expression
    parse_rule(expression)  # and it is a valid rule


def test_cluster_rule_default_needs_100MiB_free() -> None:
    rule = cluster_rule(ClusterConfig(name="a", endpoints=["http://x:2379"]))
    # 99 MiB free in a 100% fragmented file: below the floor.
    assert not evaluate(rule, status(size=99 * MiB, in_use=0, quota=8192 * MiB)).defrag
    assert evaluate(rule, status(size=300 * MiB, in_use=100 * MiB, quota=8192 * MiB)).defrag
    # Little fragmentation but close to the quota, with 100 MiB to gain: defrag.
    near_full = status(size=900 * MiB, in_use=790 * MiB, quota=1024 * MiB)
    assert evaluate(rule, near_full).defrag


@pytest.mark.parametrize(
    ("rule", "status_kwargs", "defrag", "error", "reason_part"),
    [
        ("dbSizeFree > 50*1024*1024", {"size": 100 * MiB, "in_use": 40 * MiB}, True, False, "matches"),
        ("dbSizeFree > 70*1024*1024", {"size": 100 * MiB, "in_use": 40 * MiB}, False, False, "does not"),
        ("dbQuotaUsage > 0.8", {"quota": 0}, False, True, "quota unknown"),
        ("dbQuotaUsage > 0.4", {"quota": 200 * MiB}, True, False, "quota usage 50.0%"),
        ("dbSize / dbSizeInUse > 2", {"in_use": 0}, False, True, "could not be evaluated"),
        ("true", {"learner": True}, False, False, "learner"),
    ],
)
def test_evaluate(
    rule: str, status_kwargs: dict[str, int], defrag: bool, error: bool, reason_part: str
) -> None:
    verdict = evaluate(parse_rule(rule), status(**status_kwargs))  # type: ignore[arg-type]
    assert (verdict.defrag, verdict.error) == (defrag, error)
    assert reason_part in verdict.reason


def test_nospace_overrides_the_rule_but_not_for_learners() -> None:
    never = parse_rule("false")
    assert evaluate(never, status(), nospace=True).defrag
    assert "NOSPACE" in evaluate(never, status(), nospace=True).reason
    assert not evaluate(never, status(learner=True), nospace=True).defrag


def _health(
    members: list[Member],
    errors: dict[int, str | None],
    alarms: list[Alarm] | None,
    leaders: dict[int, int] | None = None,
) -> Health:
    by_id = {m.id: m for m in members}
    return cluster_health(
        members=members,
        answers={by_id[i]: e for i, e in errors.items() if i in by_id},
        alarms=alarms,
        leaders=None if leaders is None else {by_id[i]: lead for i, lead in leaders.items()},
        failure="failed a linearizable read",
    )


def test_cluster_health_healthy() -> None:
    members = [member(1), member(2), member(3, learner=True)]
    health = _health(members, {1: None, 2: None}, [])
    assert health.healthy
    assert health.problems == ()


@pytest.mark.parametrize(
    ("errors", "alarms", "leaders", "problem"),
    [
        ({1: None, 2: "connection refused", 3: None}, [], None, "m2 failed a linearizable read"),
        ({1: None, 3: None}, [], None, "m2 was not checked"),
        ({1: None, 2: None, 3: None}, [Alarm(2, AlarmKind.CORRUPT)], None, "CORRUPT"),
        ({1: None, 2: None, 3: None}, None, None, "alarm list could not be read"),
        ({1: None, 2: None, 3: None}, [], {1: 0, 2: 0, 3: 0}, "no leader"),
        ({1: None, 2: None, 3: None}, [], {1: 1, 2: 1, 3: 2}, "members disagree about the leader"),
    ],
)
def test_cluster_health_refuses(
    errors: dict[int, str | None],
    alarms: list[Alarm] | None,
    leaders: dict[int, int] | None,
    problem: str,
) -> None:
    members = [member(1), member(2), member(3)]
    health = _health(members, errors, alarms, leaders)
    assert not health.healthy
    assert any(problem in p for p in health.problems), health.problems


def test_cluster_health_agreeing_leaders_and_a_learner_that_follows_none() -> None:
    members = [member(1), member(2), member(3, learner=True)]
    assert _health(members, {1: None, 2: None, 3: "down"}, [], {1: 2, 2: 2}).healthy


def test_cluster_health_nospace_does_not_block() -> None:
    members = [member(1), member(2)]
    assert _health(members, {1: None, 2: None}, [Alarm(1, AlarmKind.NOSPACE)]).healthy


def test_cluster_health_refuses_an_empty_member_list() -> None:
    assert not _health([], {}, []).healthy


@pytest.mark.parametrize(
    ("statuses", "leader"),
    [
        ([], 0),
        ([status(1, leader=0)], 0),
        ([status(1, leader=2), status(2, leader=2), status(3, leader=2)], 2),
        # a member still in an old term must not outvote the new one
        ([status(1, leader=1, term=2), status(2, leader=3, term=3), status(3, leader=3, term=3)], 3),
    ],
)
def test_leader_of(statuses: list[MemberStatus], leader: int) -> None:
    assert leader_of(statuses) == leader


def test_endpoint_for_prefers_configured_url() -> None:
    m = member(1, urls=("http://10.0.0.1:2379", "http://node1:2379"))
    assert endpoint_for(m, ["http://node1:2379"]) == "http://node1:2379"
    assert endpoint_for(m, []) == "http://10.0.0.1:2379"
    assert endpoint_for(Member(4, "", (), ()), []) is None


def plan_for(members: list[Member], statuses: dict[int, MemberStatus], **kwargs: object):  # type: ignore[no-untyped-def]
    return make_plan(
        rule=parse_rule("dbSizeFree > 0"),
        members=members,
        statuses=statuses,
        endpoints={m.id: m.client_urls[0] for m in members},
        **kwargs,  # type: ignore[arg-type]
    )


def test_plan_followers_first_leader_last_learner_skipped() -> None:
    members = [member(1, "a"), member(2, "b"), member(3, "c"), member(4, "d", learner=True)]
    statuses = {i: status(i, leader=1) for i in (1, 2, 3)}
    plan = plan_for(members, statuses)
    assert [p.member.name for p in plan.members] == ["b", "c", "d", "a"]
    assert [p.step for p in plan.members] == [Step.DEFRAG, Step.DEFRAG, Step.SKIP_LEARNER, Step.DEFRAG]
    assert plan.members[-1].is_leader
    assert [p.member.name for p in plan.to_defrag] == ["b", "c", "a"]


def test_plan_collapses_duplicate_members() -> None:
    members = [member(1, "a"), member(2, "b"), member(1, "a")]
    plan = plan_for(members, {1: status(1, leader=2), 2: status(2, leader=2)})
    assert [p.member.id for p in plan.members] == [1, 2]


def test_plan_reasons_for_each_step() -> None:
    members = [member(1, "a"), member(2, "b"), member(3, "c")]
    statuses = {1: status(1, in_use=100 * MiB), 2: status(2), 3: status(3)}
    plan = plan_for(members, statuses, targets=frozenset({1, 2}))
    steps = {p.member.name: (p.step, p.reason) for p in plan.members}
    assert steps["a"][0] is Step.SKIP_BELOW_THRESHOLD
    assert "does not match" in steps["a"][1]
    assert steps["b"][0] is Step.DEFRAG
    assert steps["c"][0] is Step.SKIP_NOT_TARGETED


def test_plan_rule_error_is_a_skip() -> None:
    plan = make_plan(
        rule=parse_rule("dbQuotaUsage > 0.5"),
        members=[member(1)],
        statuses={1: status(1)},
        endpoints={1: "http://m1:2379"},
    )
    assert plan.members[0].step is Step.SKIP_RULE_ERROR


def test_leader_last_replans_when_leadership_moves() -> None:
    members = [member(1, "a"), member(2, "b"), member(3, "c")]
    plan = plan_for(members, {i: status(i, leader=3) for i in (1, 2, 3)})
    assert [p.member.name for p in plan.members] == ["a", "b", "c"]
    moved = leader_last(plan.members, 1)
    assert [p.member.name for p in moved] == ["b", "c", "a"]
    assert [p.is_leader for p in moved] == [False, False, True]


@pytest.mark.parametrize(
    ("usages", "below", "disarm", "why"),
    [
        ([0.5, 0.6], 0.9, True, "below 90%"),
        ([0.5, 0.95], 0.9, False, "still at 95.0%"),
        ([0.5, None], 0.9, False, "unknown"),
    ],
)
def test_alarms_to_disarm(usages: list[float | None], below: float, disarm: bool, why: str) -> None:
    statuses = [
        status(i, size=int(u * 100 * MiB) if u is not None else MiB, quota=100 * MiB if u is not None else 0)
        for i, u in enumerate(usages, 1)
    ]
    alarms = [Alarm(1, AlarmKind.NOSPACE), Alarm(2, AlarmKind.CORRUPT)]
    chosen, reason = alarms_to_disarm(alarms=alarms, statuses=statuses, below_ratio=below)
    assert chosen == ([Alarm(1, AlarmKind.NOSPACE)] if disarm else [])
    assert why in reason


def test_no_nospace_alarm_nothing_to_disarm() -> None:
    chosen, reason = alarms_to_disarm(alarms=[], statuses=[status()], below_ratio=0.9)
    assert (chosen, reason) == ([], "no NOSPACE alarm")


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (100 * MiB, "100.0 MiB"), (3 * 1024**4, "3.0 TiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


# --- the safety gates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("voting", "healthy", "cost"),
    [
        (1, 1, QuorumCost.CLUSTER_UNAVAILABLE),  # kind, single-master kubeadm, a small Kamaji datastore
        (2, 2, QuorumCost.QUORUM_LOST),  # one defrag blocks half the votes
        (3, 3, QuorumCost.NONE),
        (3, 2, QuorumCost.QUORUM_LOST),
        (4, 4, QuorumCost.NONE),
        (4, 3, QuorumCost.QUORUM_LOST),
        (5, 4, QuorumCost.NONE),
        (5, 3, QuorumCost.QUORUM_LOST),
    ],
)
def test_quorum_cost(voting: int, healthy: int, cost: QuorumCost) -> None:
    assert quorum_cost(voting=voting, healthy_voting=healthy)[0] is cost


@pytest.mark.parametrize(
    ("voting", "allow", "gate", "reason_part"),
    [
        (1, False, Gate.REFUSE_UNAVAILABLE, "a single voting member: the whole cluster stops answering"),
        (1, True, Gate.PROCEED, "accepted (allow_unavailable_defrag)"),
        (2, False, Gate.REFUSE_UNAVAILABLE, "defragmenting one leaves 1, fewer than the quorum of 2"),
        (2, True, Gate.PROCEED, "accepted"),
        (3, False, Gate.PROCEED, "leaves 2 of 3 voting members"),
    ],
)
def test_quorum_gate(voting: int, allow: bool, gate: Gate, reason_part: str) -> None:
    decision = quorum_gate(voting=voting, healthy_voting=voting, allow_unavailable=allow)
    assert decision.gate is gate
    assert reason_part in decision.reason
    assert not decision.deferred  # a refusal is not "try again later"
    if gate is Gate.REFUSE_UNAVAILABLE:
        assert "allow_unavailable_defrag: true" in decision.reason  # says how to accept it


NOW = 1_800_000_000.0
PLANNED = [member(1), member(2), member(3)]


@pytest.mark.parametrize(
    ("members", "started", "settle", "gate", "reason_part"),
    [
        (PLANNED, {1: NOW - 3600, 2: NOW - 3600, 3: NOW - 3600}, 180, Gate.PROCEED, ""),
        (
            PLANNED,
            {1: NOW - 3600, 2: NOW - 30, 3: NOW - 3600},
            180,
            Gate.DEFER_RECENT_START,
            "m2 started 30s ago",
        ),
        (PLANNED, {2: NOW - 180}, 180, Gate.PROCEED, ""),  # exactly settled
        (PLANNED, {2: NOW - 30}, 0, Gate.PROCEED, ""),  # 0 turns the check off
        (PLANNED, {}, 180, Gate.PROCEED, ""),  # no metrics page: cannot judge, does not defer
        (PLANNED, {2: NOW + 5}, 180, Gate.DEFER_RECENT_START, "started 0s ago"),  # its clock ahead
        ([*PLANNED, member(4, learner=True)], {}, 0, Gate.DEFER_MEMBERS_CHANGED, "added m4"),
        (PLANNED[:2], {}, 0, Gate.DEFER_MEMBERS_CHANGED, "removed m3"),
        ([member(1), member(2), member(3, learner=True)], {}, 0, Gate.DEFER_MEMBERS_CHANGED, "promoted"),
    ],
)
def test_rollout_gate(
    members: list[Member], started: dict[int, float], settle: float, gate: Gate, reason_part: str
) -> None:
    decision = rollout_gate(
        members=members,
        planned_members=PLANNED,
        started_at_seconds=started,
        now_seconds=NOW,
        settle_seconds=settle,
    )
    assert decision.gate is gate
    assert reason_part in decision.reason
    assert decision.deferred is (gate is not Gate.PROCEED)


def test_rollout_gate_defers_while_a_learner_is_present() -> None:
    members = [*PLANNED, member(4, "joining", learner=True)]
    decision = rollout_gate(
        members=members, planned_members=members, started_at_seconds={}, now_seconds=NOW, settle_seconds=0
    )
    assert decision.gate is Gate.DEFER_LEARNER
    assert "learner joining present" in decision.reason


def statefulset(
    *,
    replicas: int = 3,
    generation: int = 2,
    observed: int = 2,
    ready: int = 3,
    updated: int = 3,
    current: str = "etcd-2",
    update: str = "etcd-2",
    partition: int | None = None,
) -> dict[str, object]:
    strategy: dict[str, object] = {"type": "RollingUpdate"}
    if partition is not None:
        strategy["rollingUpdate"] = {"partition": partition}
    return {
        "metadata": {"name": "etcd", "generation": generation},
        "spec": {"replicas": replicas, "updateStrategy": strategy},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": update,
        },
    }


@pytest.mark.parametrize(
    ("sts", "gate", "reason_part"),
    [
        (statefulset(), Gate.PROCEED, ""),
        (statefulset(generation=3), Gate.DEFER_ROLLOUT, "has not yet seen its latest spec"),
        (statefulset(ready=2), Gate.DEFER_ROLLOUT, "2 of 3 replicas ready"),
        (statefulset(updated=1, update="etcd-3"), Gate.DEFER_ROLLOUT, "1 of 3 replicas at revision etcd-3"),
        # The last Pod updated, the controller not yet done: revisions still differ.
        (statefulset(update="etcd-3"), Gate.DEFER_ROLLOUT, "rolling update in progress"),
        (statefulset(partition=2, updated=1, update="etcd-3"), Gate.PROCEED, ""),  # partitioned: done
        (statefulset(partition=1, updated=1, update="etcd-3"), Gate.DEFER_ROLLOUT, "above the partition"),
    ],
)
def test_statefulset_rollout_gate(sts: dict[str, object], gate: Gate, reason_part: str) -> None:
    decision = statefulset_rollout_gate(sts)
    assert decision.gate is gate
    assert reason_part in decision.reason
