"""The engine: defragment the members of one etcd cluster, one at a time, leader last.

The safety order follows ahrtr/etcd-defrag, with the decisions moved into `exporter.core.policy`:

    discover members -> health gate -> (compact) -> statuses -> plan -> for each member:
        health gate again, fresh status, evaluate the rule, (move leadership away),
        defragment, wait until healthy and caught up, status again
    -> disarm NOSPACE when every member is below the threshold -> report

A failure stops the run (unless continue_on_error) and nothing after it is touched. Dry-run runs the
gates and the evaluation and changes nothing: `_defragment`, `_compact`, `_move_leader` and
`_disarm` are the only calls that mutate the cluster and each checks `dry_run` first.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, AsyncExitStack, nullcontext

from exporter.config.settings import ClusterConfig
from exporter.core import clock
from exporter.core.model import Alarm, AlarmKind, Member, MemberStatus
from exporter.core.policy import (
    GateDecision,
    Health,
    PlannedMember,
    Step,
    alarms_to_disarm,
    cluster_health,
    cluster_rule,
    evaluate,
    free_bytes,
    label,
    leader_last,
    leader_of,
    make_plan,
    quorum_gate,
    rollout_gate,
    voting_members,
)
from exporter.core.report import MemberOutcome, MemberReport, RunReport, RunResult
from exporter.core.units import human_bytes
from exporter.defrag.lock import BREAK_HINT, ClusterLock, Hold, LockUnavailable, token_key
from exporter.etcd.client import EtcdApi, EtcdError, EtcdUnavailable, NoEndpointAnswered, first_answer
from exporter.etcd.observe import QuotaCache, member_status
from exporter.etcd.topology import Topology, discover

log = logging.getLogger(__name__)


# How much later than the run's deadline a defragment request capped by it times out.
DEADLINE_GRACE_SECONDS = 1.0


class RunStopped(Exception):
    """Ends a run early; the report already says why."""


class DefragEngine:
    """Carries out one defragmentation run on one cluster."""

    def __init__(
        self,
        client: EtcdApi,
        cluster: ClusterConfig,
        *,
        dry_run: bool = False,
        lock: Callable[[int], AbstractContextManager[object]] | None = None,
        break_lock: bool = False,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.dry_run = dry_run
        self.rule = cluster_rule(cluster)
        self._lock = lock or (lambda _cluster_id: nullcontext())
        self.break_lock = break_lock  # the operator says no other run is going on (docs/locking.md)
        # Each status reads the member's metrics page again: the rollout gate must see a member that
        # restarted between two steps of the run (one ~150 kB page per member and step).
        self._quotas = QuotaCache(max_age_seconds=0.0)
        self._started = 0.0
        self._in_progress: MemberReport | None = None
        self._defrag_in_flight: str | None = None  # a member whose defragment call got no answer
        self._nospace = False  # a NOSPACE alarm was active at the last health check
        self.report = RunReport(cluster=cluster.name, dry_run=dry_run)

    # --- progress: one human line per step ----------------------------------------------------

    def _say(self, message: str, *args: object, level: int = logging.INFO) -> None:
        log.log(level, message, *args, extra={"etcd_cluster": self.cluster.name})

    def _stop(self, result: RunResult, reason: str) -> RunStopped:
        self.report.result = result
        self.report.reason = reason
        return RunStopped(reason)

    def _seconds_left(self) -> float:
        return self.cluster.deadline_seconds - (clock.monotonic() - self._started)

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> RunReport:
        """Run to the end and return the report; never raises for etcd failures."""
        self._started = clock.monotonic()
        self.report.started_at = clock.utcnow().isoformat(timespec="seconds")
        mode = " (dry run: nothing will be changed)" if self.dry_run else ""
        self._say("cluster %s: starting%s; rule: %s", self.cluster.name, mode, self.rule)
        try:
            async with asyncio.timeout(self.cluster.deadline_seconds):
                await self._run()
        except RunStopped:
            pass
        except EtcdError as exc:  # a step outside the per-member loop (compaction, alarm list)
            self.report.result = RunResult.FAILED
            self.report.reason = str(exc)
        except TimeoutError:
            self.report.result = RunResult.FAILED
            if self._in_progress is not None:
                self._in_progress.outcome = MemberOutcome.FAILED
                self._in_progress.reason = (
                    "deadline exceeded while defragmenting (it may still be running on the member)"
                )
            self.report.reason = (
                f"deadline of {self.cluster.deadline_seconds:g}s exceeded; stopped before "
                "touching any further member"
            )
            for member in self.report.members:
                if member.outcome is MemberOutcome.NOT_REACHED and not member.reason:
                    member.reason = "deadline exceeded"
        self.report.duration_seconds = round(clock.monotonic() - self._started, 3)
        self._say(
            "cluster %s: %s%s (reclaimed %s in %.1fs)",
            self.cluster.name,
            self.report.result.value,
            f": {self.report.reason}" if self.report.reason else "",
            human_bytes(self.report.reclaimed_bytes),
            self.report.duration_seconds,
            level=(
                logging.WARNING
                if self.report.result is RunResult.DEFERRED
                else logging.ERROR
                if self.report.exit_code
                else logging.INFO
            ),
        )
        return self.report

    async def _run(self) -> None:
        topology = await self._discover()
        health, statuses = await self._check_health(topology)
        if not health.healthy:
            raise self._stop(RunResult.REFUSED, "cluster unhealthy: " + "; ".join(health.problems))
        cluster_id = next(iter(statuses.values())).cluster_id
        async with AsyncExitStack() as held:
            try:
                held.enter_context(self._lock(cluster_id))
            except LockUnavailable as exc:
                raise self._stop(RunResult.REFUSED, str(exc)) from None
            if self.cluster.compact:
                # Compaction changes the cluster too: a run the gates would stop must not do it first.
                self._gate(self._gates(topology, topology.members, statuses))
                await self._compact(topology, statuses)
                statuses = await self._statuses(topology)
            plan = make_plan(
                rule=self.rule,
                members=topology.members,
                statuses=statuses,
                targets=topology.targets,
                endpoints=topology.endpoints,
                nospace=self._nospace,
            )
            self._log_plan(plan.members)
            self.report.members = [_member_report(p, statuses.get(p.member.id)) for p in plan.members]
            for planned in plan.members:
                if planned.step is not Step.DEFRAG:
                    self._member(planned.member.id).outcome = MemberOutcome.SKIPPED
            if any(planned.step is Step.DEFRAG for planned in plan.members):
                # Only a run that would defragment is gated: one with nothing to do says so.
                self._gate(self._gates(topology, topology.members, statuses), plan.members)
                await self._take_cluster_lock(topology, held)
            else:
                await self._write_nospace_tokens(topology)
            await self._execute(topology, list(plan.members))
            await self._disarm_if_recovered(topology)
        failed = [m for m in self.report.members if m.outcome is MemberOutcome.FAILED]
        if failed:
            names = ", ".join(m.name for m in failed)
            down = f"; down now: {', '.join(self.report.down_members)}" if self.report.down_members else ""
            raise self._stop(RunResult.FAILED, f"defragmentation failed on {names}{down}")
        if self.dry_run:
            self.report.result = RunResult.DRY_RUN
        elif (
            any(m.outcome is MemberOutcome.DEFRAGMENTED for m in self.report.members)
            or self.report.disarmed_alarms
        ):
            self.report.result = RunResult.SUCCESS
        else:
            self.report.result = RunResult.NOTHING_TO_DO
            self.report.reason = "no member matches the rule"

    # --- the safety gates: quorum and rollout (exporter.core.policy) ---------------------------------

    def _gates(
        self, topology: Topology, members: Sequence[Member], statuses: dict[int, MemberStatus]
    ) -> GateDecision:
        """The quorum gate, then the rollout gate, over the members as they are now."""
        voters = voting_members(members)
        quorum = quorum_gate(
            voting=len(voters),
            healthy_voting=sum(m.id in statuses for m in voters),
            allow_unavailable=self.cluster.allow_unavailable_defrag,
        )
        if not quorum.proceed:
            return quorum
        return rollout_gate(
            members=members,
            planned_members=topology.members,
            started_at_seconds={
                i: s.process_start_time_seconds for i, s in statuses.items() if s.process_start_time_seconds
            },
            now_seconds=clock.utcnow().timestamp(),  # wall clock: the members report Unix time
            settle_seconds=self.cluster.settle_seconds,
        )

    def _gate(self, decision: GateDecision, remaining: Sequence[PlannedMember] = ()) -> None:
        """Stop the run as refused or deferred unless the gate says proceed."""
        if decision.proceed:
            return
        for p in remaining:
            if p.step is Step.DEFRAG:
                self._member(p.member.id).reason = f"not reached: {decision.gate.value}"
        if decision.deferred:
            raise self._stop(RunResult.DEFERRED, f"the cluster is changing: {decision.reason}")
        raise self._stop(RunResult.REFUSED, decision.reason)

    async def _current_members(self, topology: Topology) -> list[Member]:
        """The member list now, from the first member that answers (to compare with the plan's)."""
        try:
            _, members = await first_answer(list(topology.endpoints.values()), self.client.members)
        except NoEndpointAnswered as exc:
            raise self._stop(RunResult.FAILED, f"the member list could not be read: {exc}") from None
        return members

    # --- the lock in etcd -------------------------------------------------------------------------

    async def _take_cluster_lock(self, topology: Topology, held: AsyncExitStack) -> None:
        """Take the cluster's lock in etcd (exporter.defrag.lock) or refuse the run.

        Taken once the plan has a member to defragment: a dry run or a run with nothing to do takes
        none. Compaction, before it, is harmless twice over.
        """
        if self.dry_run:
            return
        lock = ClusterLock(self.client, list(topology.endpoints.values()), cluster=self.cluster.name)
        try:
            hold = await lock.take(
                nospace=self._nospace,
                deadline_seconds=self.cluster.deadline_seconds,
                break_lock=self.break_lock,
            )
        except LockUnavailable as exc:
            raise self._stop(RunResult.REFUSED, str(exc)) from None
        if hold.token is not None:
            self._say(
                "cluster %s: NOSPACE refuses writes, so this run holds the lock by a deleted token (%s)",
                self.cluster.name,
                token_key(hold.token).decode(),
            )
        held.push_async_callback(self._give_back_cluster_lock, lock, hold)

    async def _give_back_cluster_lock(self, lock: ClusterLock, hold: Hold) -> None:
        if not hold.guarded:
            return
        if self._defrag_in_flight is not None:
            until = (
                f"until its lease expires (within {hold.ttl_seconds}s)"
                if hold.lease
                else f"under NOSPACE nothing in etcd expires, so until it is broken: {BREAK_HINT}"
            )
            self._say(
                "cluster %s: keeping the lock, %s: %s may still be defragmenting",
                self.cluster.name,
                until,
                self._defrag_in_flight,
                level=logging.WARNING,
            )
            return
        try:
            await lock.give_back(hold)
        except LockUnavailable as exc:
            until = (
                f"it expires with its lease within {hold.ttl_seconds}s"
                if hold.lease
                else f"until then other runs are refused; {BREAK_HINT}"
            )
            self._say(
                "cluster %s: could not give the lock back (%s); %s",
                self.cluster.name,
                exc,
                until,
                level=logging.WARNING,
            )

    async def _write_nospace_tokens(self, topology: Topology) -> None:
        """Make sure a later run under NOSPACE finds its lock tokens (no-op when they exist)."""
        if self.dry_run or self._nospace:
            return
        lock = ClusterLock(self.client, list(topology.endpoints.values()), cluster=self.cluster.name)
        with contextlib.suppress(LockUnavailable):
            if await lock.write_tokens():
                self._say("cluster %s: wrote the NOSPACE lock tokens", self.cluster.name, level=logging.DEBUG)

    # --- discovery and health ----------------------------------------------------------------

    async def _discover(self) -> Topology:
        """The topology (exporter.etcd.topology); refused unless every configured member is known."""
        try:
            topology = await discover(self.client, self.cluster)
        except EtcdError as exc:
            raise self._stop(RunResult.REFUSED, exc.message) from None
        if topology.unanswered:
            url, error = next(iter(topology.unanswered.items()))
            raise self._stop(RunResult.REFUSED, f"cluster unhealthy: {url}: {error}")
        if topology.unmatched:
            raise self._stop(
                RunResult.REFUSED,
                f"configured endpoint {', '.join(topology.unmatched)} is none of the members in the "
                "cluster's member list (another cluster's member, or one being removed?)",
            )
        self._say(
            "cluster %s: %d members: %s",
            self.cluster.name,
            len(topology.members),
            ", ".join(
                f"{label(m)}{' (learner)' if m.is_learner else ''} {topology.endpoints.get(m.id, 'no URL')}"
                for m in topology.members
            ),
        )
        return topology

    async def _check_health(self, topology: Topology) -> tuple[Health, dict[int, MemberStatus]]:
        """The health gate, plus the fresh statuses of the voting members (with their quota)."""
        voters = voting_members(topology.members)
        reachable = [m for m in voters if m.id in topology.endpoints]

        async def probe(member: Member) -> tuple[int, str | None, MemberStatus | None]:
            endpoint = topology.endpoints[member.id]
            try:
                await self.client.linearizable_read(endpoint)
                return member.id, None, await self._status(endpoint)
            except EtcdError as exc:
                return member.id, exc.message, None

        results = await asyncio.gather(*(probe(m) for m in reachable))
        alarms: list[Alarm] | None = None
        for member in reachable:
            try:
                alarms = await self.client.alarms(topology.endpoints[member.id])
                break
            except EtcdError:
                continue
        self._nospace = any(a.kind is AlarmKind.NOSPACE for a in alarms or ())
        errors = {member_id: error for member_id, error, _ in results}
        health = cluster_health(
            members=topology.members,
            answers={m: errors[m.id] for m in topology.members if m.id in errors},
            alarms=alarms,
            failure="failed a linearizable read",
        )
        return health, {member_id: s for member_id, _, s in results if s is not None}

    async def _statuses(self, topology: Topology) -> dict[int, MemberStatus]:
        health, statuses = await self._check_health(topology)
        if not health.healthy:
            raise self._stop(RunResult.FAILED, "cluster became unhealthy: " + "; ".join(health.problems))
        return statuses

    async def _status(self, endpoint: str) -> MemberStatus:
        """A member's status with the quota it runs with (read once per run from its metrics)."""
        return await member_status(self.client, self.cluster, endpoint, self._quotas)

    # --- the plan and its execution -----------------------------------------------------------

    def _log_plan(self, planned: Sequence[PlannedMember]) -> None:
        for position, p in enumerate(planned, 1):
            self._say(
                "plan %d/%d: %s%s -> %s: %s",
                position,
                len(planned),
                label(p.member),
                " (leader)" if p.is_leader else "",
                p.step.value,
                p.reason,
            )

    def _member(self, member_id: int) -> MemberReport:
        return next(m for m in self.report.members if m.id == f"{member_id:x}")

    async def _execute(self, topology: Topology, remaining: list[PlannedMember]) -> None:
        done: list[int] = []
        while remaining:
            statuses = await self._statuses(topology)
            leader_id = leader_of(statuses.values())
            pending = [p for p in remaining if p.step is Step.DEFRAG]
            if not pending:
                return
            self._gate(self._gates(topology, await self._current_members(topology), statuses), remaining)
            if pending[-1].member.id != leader_id and any(p.member.id == leader_id for p in pending):
                # Leadership moved to a member we have not visited yet: it must still go last.
                remaining = leader_last(remaining, leader_id)
                new_leader = next(p for p in remaining if p.member.id == leader_id)
                self._say("leadership moved to %s: re-planned so it goes last", label(new_leader.member))
                pending = [p for p in remaining if p.step is Step.DEFRAG]
            planned = pending[0]
            remaining.remove(planned)
            try:
                await self._visit(topology, planned, statuses, leader_id, done)
            except RunStopped:
                raise
            except (EtcdError, TimeoutError) as exc:
                report = self._member(planned.member.id)
                report.outcome = MemberOutcome.FAILED
                report.reason = str(exc) or type(exc).__name__
                self._say("%s: FAILED: %s", label(planned.member), report.reason, level=logging.ERROR)
                if not self.cluster.continue_on_error:
                    for p in remaining:
                        if p.step is Step.DEFRAG:
                            self._member(p.member.id).reason = "not reached: the run stopped after a failure"
                    return
            done.append(planned.member.id)

    async def _visit(
        self,
        topology: Topology,
        planned: PlannedMember,
        statuses: dict[int, MemberStatus],
        leader_id: int,
        done: list[int],
    ) -> None:
        member, endpoint = planned.member, planned.endpoint
        report = self._member(member.id)
        before = statuses[member.id]
        verdict = evaluate(self.rule, before, nospace=self._nospace)
        report.size_before_bytes = before.db_size_bytes
        report.in_use_before_bytes = before.db_size_in_use_bytes
        report.leader = member.id == leader_id
        if not verdict.defrag:
            report.outcome, report.reason = MemberOutcome.SKIPPED, verdict.reason
            self._say("%s: skipped: %s", label(member), verdict.reason)
            return
        if self.dry_run:
            report.outcome, report.reason = MemberOutcome.WOULD_DEFRAG, verdict.reason
            self._say("DRY-RUN: would defragment %s (%s)", label(member), verdict.reason)
            return
        if report.leader and self.cluster.move_leader:
            await self._move_leader(topology, member, endpoint, statuses, done)
        # The run's deadline, when it comes first, must be what ends the wait: a request timeout equal
        # to the time left raced it, and the run was reported as a failed member instead.
        left = max(self._seconds_left(), 0.001)
        member_timeout = self.cluster.member_timeout_seconds
        timeout = member_timeout if member_timeout < left else left + DEADLINE_GRACE_SECONDS
        self._say(
            "%s%s: defragmenting (size %s, in use %s, %s to reclaim)",
            label(member),
            " (leader)" if report.leader else "",
            human_bytes(before.db_size_bytes),
            human_bytes(before.db_size_in_use_bytes),
            human_bytes(free_bytes(before)),
        )
        started = clock.monotonic()
        self._in_progress = report
        self._defrag_in_flight = label(member)  # until etcd answers: the lock stays while it may run
        try:
            await self.client.defragment(endpoint, timeout=timeout)
        except EtcdError as exc:
            raise await self._defrag_failed(member, endpoint, exc, timeout) from exc
        self._defrag_in_flight = None
        await self._wait_recovered(topology, member, endpoint)
        self._in_progress = None
        after = await self._status(endpoint)
        report.duration_seconds = round(clock.monotonic() - started, 3)
        report.size_after_bytes = after.db_size_bytes
        report.in_use_after_bytes = after.db_size_in_use_bytes
        report.reclaimed_bytes = max(before.db_size_bytes - after.db_size_bytes, 0)
        report.outcome, report.reason = MemberOutcome.DEFRAGMENTED, verdict.reason
        self._say(
            "%s%s: defragmented in %.1fs: %s -> %s, reclaimed %s",
            label(member),
            " (leader)" if report.leader else "",
            report.duration_seconds,
            human_bytes(before.db_size_bytes),
            human_bytes(after.db_size_bytes),
            human_bytes(report.reclaimed_bytes),
        )

    async def _defrag_failed(
        self, member: Member, endpoint: str, exc: EtcdError, timeout: float
    ) -> EtcdError:
        """The error to report for a defragment call that failed, after a look at the member.

        The lock stays (`_defrag_in_flight`) unless the defrag cannot be running: etcd answered with
        an error, the request never reached the member, or the member is down now.
        """
        if not isinstance(exc, EtcdUnavailable) or not exc.reached:
            self._defrag_in_flight = None
            return exc
        what = (
            f"defragment did not finish within {timeout:g}s"
            if "no answer within" in exc.message
            else f"the connection failed during the defragment ({exc.message})"
        )
        # Twice: the first probe may go out on a pooled connection the dead member had left open.
        for _ in range(2):
            try:
                await self.client.status(endpoint, timeout=min(self.cluster.health_timeout_seconds, 5.0))
            except EtcdUnavailable as probe:
                if not probe.reached:  # nothing listens: the process is gone, and its defrag with it
                    self._defrag_in_flight = None
                    self.report.down_members.append(label(member))
                    return EtcdError(endpoint, f"{what}; {label(member)} is down now: {probe.message}")
                continue
            except EtcdError:
                pass
            return EtcdError(endpoint, f"{what} (it may still be running on the member)")
        return EtcdError(
            endpoint, f"{what}; {label(member)} does not answer now: down or still defragmenting"
        )

    async def _wait_recovered(self, topology: Topology, member: Member, endpoint: str) -> None:
        """Until the member serves a linearizable read and has applied what the leader had committed."""
        deadline = clock.monotonic() + self.cluster.health_timeout_seconds
        target_index = 0
        last_error = ""
        while True:
            try:
                await self.client.linearizable_read(endpoint)
                if not target_index:
                    _, statuses = await self._check_health(topology)
                    leader = statuses.get(leader_of(statuses.values()))
                    target_index = leader.raft_index if leader else 0
                status = await self.client.status(endpoint)
                if target_index and status.raft_applied_index >= target_index:
                    return
                last_error = f"applied index {status.raft_applied_index} < leader's {target_index}"
            except EtcdError as exc:
                last_error = exc.message
            if clock.monotonic() >= deadline:
                raise EtcdError(
                    endpoint,
                    f"not healthy {self.cluster.health_timeout_seconds:g}s after defragmenting: {last_error}",
                )
            await asyncio.sleep(0.1)  # the poll interval of a condition that has a deadline

    async def _move_leader(
        self,
        topology: Topology,
        member: Member,
        endpoint: str,
        statuses: dict[int, MemberStatus],
        done: list[int],
    ) -> None:
        followers = [m.id for m in voting_members(topology.members) if m.id != member.id]
        candidates = [i for i in done if i in followers] or followers
        if not candidates:
            self._say("%s: no other voting member to hand leadership to", label(member))
            return
        target = max(candidates, key=lambda i: statuses[i].raft_applied_index if i in statuses else 0)
        self._say("%s (leader): moving leadership to %x before defragmenting", label(member), target)
        await self.client.move_leader(endpoint, target)
        deadline = clock.monotonic() + self.cluster.health_timeout_seconds
        while clock.monotonic() < deadline:
            if (await self.client.status(endpoint)).leader_id == target:
                self._member(member.id).leader = False
                return
            await asyncio.sleep(0.1)
        raise EtcdError(endpoint, f"leadership did not move to {target:x}")

    async def _compact(self, topology: Topology, statuses: dict[int, MemberStatus]) -> None:
        endpoint = topology.endpoints[leader_of(statuses.values())]
        revision = await self.client.linearizable_read(endpoint)
        if self.dry_run:
            self._say("DRY-RUN: would compact history up to revision %d", revision)
            return
        compacted = await self.client.compact(endpoint, revision, physical=True)
        self.report.compacted_revision = revision
        self._say("compacted history up to revision %d%s", revision, "" if compacted else " (already)")

    async def _disarm_if_recovered(self, topology: Topology) -> None:
        # Every health check lists the alarms, the last one just before the last member: without
        # NOSPACE then, there is nothing to disarm and no reason for another round of requests.
        if not self._nospace or any(m.outcome is MemberOutcome.FAILED for m in self.report.members):
            return
        statuses = await self._statuses(topology)
        endpoint = topology.endpoints[leader_of(statuses.values())]
        alarms = await self.client.alarms(endpoint)
        to_disarm, why = alarms_to_disarm(
            alarms=alarms,
            statuses=list(statuses.values()),
            below_ratio=self.cluster.disarm_below_ratio,
        )
        if not any(a.kind is AlarmKind.NOSPACE for a in alarms):
            return
        if not to_disarm:
            self._say("NOSPACE alarm left active: %s", why, level=logging.WARNING)
            return
        for alarm in to_disarm:
            if self.dry_run:
                self._say("DRY-RUN: would disarm NOSPACE of member %x (%s)", alarm.member_id, why)
                continue
            await self.client.disarm(endpoint, alarm)
            self.report.disarmed_alarms.append(f"{alarm.kind.value}:{alarm.member_id:x}")
            self._say("disarmed NOSPACE alarm of member %x: %s", alarm.member_id, why)


def _member_report(planned: PlannedMember, status: MemberStatus | None) -> MemberReport:
    return MemberReport(
        name=label(planned.member),
        id=f"{planned.member.id:x}",
        endpoint=planned.endpoint,
        leader=planned.is_leader,
        reason=planned.reason,
        size_before_bytes=status.db_size_bytes if status else None,
        in_use_before_bytes=status.db_size_in_use_bytes if status else None,
    )
