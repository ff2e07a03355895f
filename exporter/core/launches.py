"""Launching a run: why (the trigger), what the attempt did, and what is known of a cluster's runs.

Shared by the webhook (which decides), the executors (which launch) and the Kubernetes Job
manifests (which record the trigger). Pure: no I/O.
"""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


@dataclass(frozen=True, kw_only=True)
class Trigger:
    """Why a Job is launched; recorded on the Job, never used for its namespace, image or command.

    Everything but `dry_run` comes from the alert and is untrusted text: it only ever lands in
    sanitized label values and annotations.
    """

    alertname: str
    group_key: str = ""
    fingerprint: str = ""
    receiver: str = ""
    fired_at: datetime | None = None
    dry_run: bool = False  # the Job runs `defrag --dry-run`: gates and evaluation, no change


class LaunchOutcome(StrEnum):
    """What a launch attempt did; also a metric label."""

    CREATED = "created"
    DRY_RUN = "dry_run"  # the API server accepted it with dryRun=All; nothing was stored
    ALREADY_RUNNING = "already_running"
    COOLING_DOWN = "cooling_down"
    NAME_TAKEN = "name_taken"  # a Job of that name that we did not create blocks the cluster
    DEFERRED = "deferred"  # the cluster is changing (its StatefulSet rolls out): no Job, no cooldown


@dataclass(frozen=True)
class LaunchResult:
    """The answer to "launch a defrag Job for this cluster"."""

    created: bool
    job_name: str
    reason: str
    outcome: LaunchOutcome | None = None  # None from launchers that do not classify (a local run)
    uid: str = ""  # of the Job the API server created: Events name it, or `kubectl describe` omits them


@dataclass(frozen=True)
class RunState:
    """A cluster's defrag runs as the executor knows them."""

    running: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: str = ""
