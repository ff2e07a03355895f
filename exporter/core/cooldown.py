"""Cooldown: after a run ends, a cluster's alerts launch nothing for a while. The one definition.

The webhook's decision (core/routing.decide), both executors (launch/local.py and
launch/kubernetes.py) and the Job's `ttlSecondsAfterFinished` (kubernetes/jobs.build_job:
Kubernetes keeps the finished Job, whose name is the lock, exactly that long) all ask here, so
that routing never says "launch" where an executor says "cooling down" for the same cluster and
run state. Pure: no I/O.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from exporter.config.settings import ClusterConfig
from exporter.core.launches import RunState
from exporter.core.report import RunResult


class CooldownState(StrEnum):
    """Whether a cluster cools down now, and why (also a reason in logs)."""

    NO_RUN_ENDED = "no_run_ended"  # nothing to cool down from (no run, or one in flight)
    NOT_STARTED = "not_started"  # the last run ended with a result that starts no cooldown (deferred)
    COOLING_DOWN = "cooling_down"
    OVER = "over"


@dataclass(frozen=True)
class Cooldown:
    """A cluster's cooldown at one moment: its state, until when, after which result."""

    state: CooldownState
    until: datetime | None = None
    result: str = ""

    @property
    def active(self) -> bool:
        """True while alerts for the cluster launch nothing."""
        return self.state is CooldownState.COOLING_DOWN

    @property
    def reason(self) -> str:
        """`until 2026-01-01T10:00:00+00:00 after its last run (success)`, for a reason to give."""
        when = self.until.isoformat(timespec="seconds") if self.until is not None else "?"
        return f"until {when} after its last run ({self.result or 'unknown result'})"


def cooldown_seconds(cluster: ClusterConfig, default_seconds: float) -> float:
    """The cluster's cooldown: its own `kubernetes.cooldown_seconds` when set, else the service's default."""
    target = cluster.kubernetes
    if target is not None and target.cooldown_seconds is not None:
        return float(target.cooldown_seconds)
    return default_seconds


def starts_cooldown(result: str) -> bool:
    """Whether a run that ended with this result starts a cooldown.

    A deferred run found the cluster changing (a rollout) and touched nothing: the next notification
    may launch again at once (docs/safety.md).
    """
    return result != RunResult.DEFERRED


def cooldown_at(run: RunState, *, seconds: float, now: datetime) -> Cooldown:
    """The cooldown after `run`'s last end, `seconds` long, as it stands at `now`."""
    if run.running or run.finished_at is None:
        return Cooldown(CooldownState.NO_RUN_ENDED, result=run.result)
    if not starts_cooldown(run.result):
        return Cooldown(CooldownState.NOT_STARTED, result=run.result)
    until = run.finished_at + timedelta(seconds=seconds)
    state = CooldownState.COOLING_DOWN if now < until else CooldownState.OVER
    return Cooldown(state, until, run.result)


def cluster_cooldown(
    cluster: ClusterConfig, run: RunState, *, default_seconds: float, now: datetime
) -> Cooldown:
    """The cluster's cooldown at `now`: `cooldown_at` with the cluster's own length."""
    return cooldown_at(run, seconds=cooldown_seconds(cluster, default_seconds), now=now)
