"""How a defrag run ended: the one result enum, the run report, and a run's outcome as the service sees it.

Everything that reports a run speaks `RunResult`: the engine's report (and so the CLI's exit code
and JSON), the executors' outcomes (a run that left no report is `job_failed`), the run metrics'
`result` label and the cooldown. Pure: no I/O.
"""

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from exporter.core.units import human_bytes


class RunResult(StrEnum):
    """How a run ended; also the `result` label of the run metrics."""

    SUCCESS = "success"
    NOTHING_TO_DO = "nothing_to_do"
    DRY_RUN = "dry_run"
    FAILED = "failed"
    REFUSED = "refused"
    DEFERRED = "deferred"  # the cluster is changing (rollout gate): not a failure, try again later
    # Only from an executor: the run ended without a report (killed, crashed, image missing, ...).
    # The engine never reports it, so it has no exit code and is not in the report's JSON Schema.
    JOB_FAILED = "job_failed"

    @property
    def succeeded(self) -> bool:
        """Whether the run did what it was asked (including finding nothing to do)."""
        return self in _SUCCEEDED


_SUCCEEDED = frozenset({RunResult.SUCCESS, RunResult.NOTHING_TO_DO, RunResult.DRY_RUN})


# Documented in docs/cli.md ("Exit codes"); 2 (bad usage or config) is the CLI's own. Deferred is
# sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry": a CronJob or a
# script sees a non-zero code it can tell apart from a failure.
EXIT_DEFERRED = 75
EXIT_CODES = {
    RunResult.SUCCESS: 0,
    RunResult.NOTHING_TO_DO: 0,
    RunResult.DRY_RUN: 0,
    RunResult.FAILED: 1,
    RunResult.REFUSED: 3,
    RunResult.DEFERRED: EXIT_DEFERRED,
}


class MemberOutcome(StrEnum):
    """What happened to one member."""

    DEFRAGMENTED = "defragmented"
    WOULD_DEFRAG = "would_defrag"
    SKIPPED = "skipped"
    FAILED = "failed"
    NOT_REACHED = "not_reached"


@dataclass
class MemberReport:
    """One member's line in the final report (exporter/schemas/run-report.schema.json).

    A size nobody measured is None (JSON null), never 0: the `after` sizes and the duration exist
    only for a member that was defragmented, the `before` sizes only for one whose status was read.
    """

    name: str
    id: str
    endpoint: str
    leader: bool
    outcome: MemberOutcome = MemberOutcome.NOT_REACHED
    reason: str = ""
    size_before_bytes: int | None = None
    in_use_before_bytes: int | None = None
    size_after_bytes: int | None = None
    in_use_after_bytes: int | None = None
    reclaimed_bytes: int = 0
    duration_seconds: float | None = None

    @property
    def reclaimable_bytes(self) -> int | None:
        """What a defrag would give back now: the free pages at the last status."""
        if self.size_before_bytes is None or self.in_use_before_bytes is None:
            return None
        return max(self.size_before_bytes - self.in_use_before_bytes, 0)


@dataclass
class RunReport:
    """The outcome of one run, printed with `--output json` and turned into metrics by the service."""

    cluster: str
    result: RunResult = RunResult.NOTHING_TO_DO
    reason: str = ""
    dry_run: bool = False
    started_at: str = ""
    duration_seconds: float = 0.0
    compacted_revision: int | None = None  # None: not compacted
    disarmed_alarms: list[str] = field(default_factory=list)
    members: list[MemberReport] = field(default_factory=list)
    down_members: list[str] = field(default_factory=list)  # stopped answering after their defrag

    @property
    def exit_code(self) -> int:
        """The process exit code for this result."""
        return EXIT_CODES[self.result]

    @property
    def reclaimed_bytes(self) -> int:
        """Bytes given back to the disks over all members."""
        return sum(m.reclaimed_bytes for m in self.members)

    def to_json(self) -> str:
        """The report as one JSON document (also the Job's termination message)."""
        data: dict[str, Any] = asdict(self)
        data["reclaimed_bytes"] = self.reclaimed_bytes
        data["exit_code"] = self.exit_code
        return json.dumps(data, separators=(",", ":"))

    def summary_json(self, max_bytes: int = 4096) -> str:
        """to_json() if it fits in max_bytes, else a compact summary that does (marked `"summary":true`).

        4096 bytes is what Kubernetes keeps of a container's termination message, the Job's report.
        """
        full = self.to_json()
        if len(full) <= max_bytes:  # ASCII: json.dumps escapes everything else
            return full
        members = [
            {"name": m.name, "outcome": m.outcome.value, "reclaimed_bytes": m.reclaimed_bytes}
            for m in self.members
        ]
        summary: dict[str, Any] = {
            "cluster": self.cluster,
            "result": self.result.value,
            "exit_code": self.exit_code,
            "reclaimed_bytes": self.reclaimed_bytes,
            "dry_run": self.dry_run,
            "started_at": self.started_at,
            "duration_seconds": self.duration_seconds,
            "summary": True,
            "reason": self.reason[:500],
            "members": members,
        }
        while len(text := json.dumps(summary, separators=(",", ":"))) > max_bytes:
            if summary["members"]:
                summary["members"] = summary["members"][:-1]
                summary["members_omitted"] = len(members) - len(summary["members"])
            elif summary["reason"]:
                summary["reason"] = ""
            else:  # nothing left to drop: the bare minimum (a cluster name is at most 40 characters)
                minimal = {"cluster": self.cluster[:40], "result": self.result.value, "summary": True}
                return json.dumps(minimal, separators=(",", ":"))
        return text


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended, for the run metrics and the log."""

    cluster: str
    result: RunResult
    started_at: datetime | None
    finished_at: datetime
    reclaimed_bytes: int = 0
    reason: str = ""

    @property
    def duration_seconds(self) -> float:
        """Start to end; 0 when the start is unknown."""
        return (self.finished_at - self.started_at).total_seconds() if self.started_at else 0.0


def outcome_from_report(
    *, cluster: str, report: Mapping[str, Any] | None, started_at: datetime | None, finished_at: datetime
) -> RunOutcome:
    """A RunOutcome from the engine's JSON report (`defrag --output json`), or job_failed without one."""
    results = {r.value for r in RunResult}
    if report is None or report.get("result") not in results:
        return RunOutcome(
            cluster, RunResult.JOB_FAILED, started_at, finished_at, reason="the run left no report"
        )
    reclaimed = report.get("reclaimed_bytes")
    return RunOutcome(
        cluster,
        RunResult(report["result"]),
        started_at,
        finished_at,
        reclaimed_bytes=reclaimed if isinstance(reclaimed, int) else 0,
        reason=str(report.get("reason") or ""),
    )


def parse_report(stdout: str) -> dict[str, Any] | None:
    """The JSON report: the last line of the child's stdout that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def iter_lines(report: RunReport) -> Iterator[str]:
    """The final report as a small text table and one line for the result (and why)."""
    dry_run = report.result is RunResult.DRY_RUN
    if report.members:
        reclaimed = "WOULD RECLAIM" if dry_run else "RECLAIMED"
        yield f"{'MEMBER':<16} {'LEADER':<6} {'OUTCOME':<13} {'BEFORE':>10} {'AFTER':>10} {reclaimed:>13}"
        for m in report.members:
            if m.outcome is MemberOutcome.WOULD_DEFRAG:
                gain = m.reclaimable_bytes  # the free pages now: what the defrag would give back
            elif m.outcome is MemberOutcome.DEFRAGMENTED:
                gain = m.reclaimed_bytes
            else:
                gain = None
            yield (
                f"{m.name:<16} {'yes' if m.leader else '':<6} {m.outcome.value:<13} "
                f"{_size(m.size_before_bytes):>10} {_size(m.size_after_bytes):>10} {_size(gain):>13}"
            )
    total = sum(m.reclaimable_bytes or 0 for m in report.members if m.outcome is MemberOutcome.WOULD_DEFRAG)
    gained = (
        f"would reclaim {human_bytes(total)}"
        if dry_run
        else f"reclaimed {human_bytes(report.reclaimed_bytes)}"
    )
    why = f": {report.reason}" if report.reason else ""
    yield f"{report.result.value}{why} ({gained})" if report.members else f"{report.result.value}{why}"


def _size(value: int | None) -> str:
    return human_bytes(value) if value is not None else "-"
