"""What the webhook needs of whatever carries out a launch, and what both executors share.

Both executors (launch/local.py, launch/kubernetes.py) are single-flight per cluster on their own,
whatever the webhook decided, and go through the one cooldown (core/cooldown.py). Dry-run is
threaded down to the one call that would create something, which logs `DRY-RUN: would ...`
instead. It goes through the same single-flight and cooldown bookkeeping as a real launch
(`DryRuns`), so that its log and metrics predict what the service would do for real: a storm of
alerts for one cluster makes one "would launch", and the rest are skipped as cooling down.
"""

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from exporter.config.settings import (
    ClusterConfig,
)
from exporter.core.cooldown import cluster_cooldown
from exporter.core.launches import LaunchOutcome, LaunchResult, RunState, Trigger
from exporter.core.report import RunOutcome, RunResult

log = logging.getLogger(__name__)


class ExecutorUnavailable(Exception):
    """The launch could not be recorded now but may succeed later (webhook answers 503)."""


class ExecutorRejected(Exception):
    """The launch was refused for a reason a retry will not fix (webhook answers 422)."""


OnFinished = Callable[[RunOutcome], None]


class Executor(Protocol):
    """What the webhook needs from whatever runs the defrag."""

    async def start(self, on_finished: OnFinished) -> None:
        """Start background watchers; `on_finished` is called once per run that ends."""

    async def stop(self) -> None:
        """Stop watching; runs in flight go on and are picked up by the next start."""

    async def launch(self, cluster: ClusterConfig, trigger: Trigger) -> LaunchResult:
        """Start a run unless one is in flight or cooling down; raise ExecutorUnavailable/Rejected."""

    def runs(self, clusters: Sequence[str]) -> dict[str, RunState]:
        """What is known about each cluster's runs, for `routing.decide`."""


DRY_RUN_REASON = "dry run: nothing started"


class DryRuns:
    """The runs a dry-run executor would have launched, marked dry and kept in memory only.

    A would-be run counts as started and ended at the same moment, with the result `dry_run`: the
    cluster then cools down as after a real run, which is all a dry run can predict (how long a
    real run would take, it cannot know). In memory, so that neither a real service sharing the
    state directory (or the API server) nor this service after a restart mistakes one for a run.
    """

    def __init__(self) -> None:
        self._ended: dict[str, datetime] = {}

    def record(self, cluster: str, now: datetime) -> RunOutcome:
        """A would-be run of `cluster` at `now`; its outcome for the run metrics."""
        self._ended[cluster] = now
        return RunOutcome(cluster, RunResult.DRY_RUN, now, now, reason=DRY_RUN_REASON)

    def merged(self, cluster: str, real: RunState) -> RunState:
        """The cluster's run state: the real one, unless a dry run ended after it."""
        ended = self._ended.get(cluster)
        if ended is None or real.running or (real.finished_at is not None and real.finished_at >= ended):
            return real
        return RunState(running=False, started_at=ended, finished_at=ended, result=RunResult.DRY_RUN.value)


def refused_launch(
    cluster: ClusterConfig, state: RunState, *, job: str, default_cooldown_seconds: float, now: datetime
) -> LaunchResult | None:
    """Why a launch would not start now by this run state (in flight, cooling down), else None."""
    if state.running:
        return LaunchResult(False, job, f"already running: {job}", LaunchOutcome.ALREADY_RUNNING)
    cooldown = cluster_cooldown(cluster, state, default_seconds=default_cooldown_seconds, now=now)
    if cooldown.active:
        return LaunchResult(False, job, f"cooling down {cooldown.reason}", LaunchOutcome.COOLING_DOWN)
    return None
