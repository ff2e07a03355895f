"""One cooldown (exporter/core/cooldown.py): routing, both executors and the Job's TTL agree."""

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from exporter.config.settings import ClusterConfig
from exporter.core import clock
from exporter.core.cooldown import CooldownState, cluster_cooldown, cooldown_at, cooldown_seconds
from exporter.core.launches import LaunchOutcome, RunState, Trigger
from exporter.core.report import RunOutcome
from exporter.core.routing import (
    DEFAULT_ACTING_ALERTS,
    ActingFilter,
    AlertmanagerAlert,
    ClusterHealth,
    Decision,
    Policy,
    decide,
)
from exporter.kubernetes.jobs import build_job, existing_job_launch
from exporter.launch.local import LocalExecutor

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
TRIGGER = Trigger(alertname="EtcdDefragRecommended")


@pytest.mark.parametrize(
    ("run", "state", "until"),
    [
        (RunState(), CooldownState.NO_RUN_ENDED, None),
        (RunState(running=True, started_at=NOW), CooldownState.NO_RUN_ENDED, None),
        (RunState(finished_at=NOW - timedelta(seconds=59), result="success"), CooldownState.COOLING_DOWN, 1),
        (RunState(finished_at=NOW - timedelta(seconds=60), result="failed"), CooldownState.OVER, 0),
        (
            RunState(finished_at=NOW - timedelta(seconds=1), result="deferred"),
            CooldownState.NOT_STARTED,
            None,
        ),
        (RunState(finished_at=NOW - timedelta(seconds=1), result=""), CooldownState.COOLING_DOWN, 59),
    ],
)
def test_cooldown_at(run: RunState, state: CooldownState, until: int | None) -> None:
    cooldown = cooldown_at(run, seconds=60, now=NOW)
    assert cooldown.state is state
    assert cooldown.active is (state is CooldownState.COOLING_DOWN)
    assert cooldown.until == (None if until is None else NOW + timedelta(seconds=until))


def cluster(kubernetes_cooldown_seconds: int | None) -> ClusterConfig:
    data: dict[str, Any] = {"name": "tenant-a", "endpoints": ["http://127.0.0.1:1"]}
    if kubernetes_cooldown_seconds is not None:
        data["kubernetes"] = {"namespace": "etcd", "cooldown_seconds": kubernetes_cooldown_seconds}
    return ClusterConfig.model_validate(data)


def test_the_clusters_own_cooldown_wins_over_the_default() -> None:
    assert cooldown_seconds(cluster(None), 3600) == 3600
    assert cooldown_seconds(cluster(600), 3600) == 600
    assert cooldown_seconds(cluster(0), 3600) == 0


# (service-wide default, the cluster's kubernetes.cooldown_seconds, the last run ended this long ago,
# its result, cooling down). Margins of 30 s and more: the test takes well under a second.
CASES = [
    # The bug of issue 13: routing honoured kubernetes.cooldown_seconds, a local run did not.
    (60, 600, 120, "success", True),
    (3600, 30, 120, "success", False),
    (60, None, 30, "failed", True),
    (60, None, 120, "success", False),
    (60, None, 1, "deferred", False),  # a deferred run starts no cooldown
]


def routing_says(config: ClusterConfig, run: RunState, *, default: float, now: datetime) -> Decision:
    alert = AlertmanagerAlert.model_validate(
        {
            "status": "firing",
            "labels": {"alertname": "EtcdDefragRecommended", "etcd_cluster": config.name},
            "startsAt": now.isoformat(),
        }
    )
    policy = Policy(ActingFilter(frozenset(DEFAULT_ACTING_ALERTS)), default, max_snapshot_age_seconds=60)
    return decide(
        alert=alert,
        clusters=[config],
        snapshots={config.name: ClusterHealth(taken_at=now, healthy=True)},
        runs={config.name: run},
        now=now,
        policy=policy,
    ).decision


def write_state(state_dir: Path, name: str, *, finished_at: datetime, result: str) -> None:
    started = finished_at - timedelta(seconds=5)
    state = {
        "started_at": started.isoformat(),
        "finished_at": finished_at.isoformat(),
        "result": result,
        "pid": 0,
    }
    (state_dir / f"{name}.json").write_text(json.dumps(state))


@pytest.mark.parametrize(("default", "own", "ago", "result", "cooling"), CASES)
async def test_routing_and_the_local_executor_agree(
    default: int, own: int | None, ago: int, result: str, cooling: bool, tmp_path: Path
) -> None:
    config = cluster(own)
    now = clock.utcnow()
    ended = now - timedelta(seconds=ago)
    run = RunState(started_at=ended - timedelta(seconds=5), finished_at=ended, result=result)
    decision = routing_says(config, run, default=default, now=now)
    assert decision is (Decision.SKIP_COOLDOWN if cooling else Decision.LAUNCH)

    # The real launch, under the lock, from the state file; its child only exits.
    write_state(tmp_path, config.name, finished_at=ended, result=result)
    ended_runs: asyncio.Queue[RunOutcome] = asyncio.Queue()
    local = LocalExecutor(
        state_dir=tmp_path,
        cooldown_seconds=default,
        command=(sys.executable, "-c", "pass"),
        reconcile_interval_seconds=3600,
    )
    await local.start(ended_runs.put_nowait)
    try:
        launched = await local.launch(config, TRIGGER)
        assert launched.outcome is (LaunchOutcome.COOLING_DOWN if cooling else LaunchOutcome.CREATED)
        if launched.created:
            await asyncio.wait_for(ended_runs.get(), timeout=30)
    finally:
        await local.stop()

    # The dry run reads the same state file and decides the same.
    write_state(tmp_path, config.name, finished_at=ended, result=result)
    dry = LocalExecutor(state_dir=tmp_path, cooldown_seconds=default, dry_run=True)
    assert (await dry.launch(config, TRIGGER)).outcome is (
        LaunchOutcome.COOLING_DOWN if cooling else LaunchOutcome.DRY_RUN
    )


@pytest.mark.parametrize(("default", "own", "ago", "result", "cooling"), CASES)
def test_routing_and_the_jobs_ttl_agree(
    default: int, own: int | None, ago: int, result: str, cooling: bool
) -> None:
    """The API server keeps the finished Job (the lock) as long as routing skips as cooling down."""
    kubernetes: dict[str, Any] = {"namespace": "etcd"}  # without cooldown_seconds: the default applies
    if own is not None:
        kubernetes["cooldown_seconds"] = own
    config = ClusterConfig.model_validate(
        {"name": "tenant-a", "endpoints": ["http://127.0.0.1:1"], "kubernetes": kubernetes}
    )
    job = build_job(config, image="img:1", trigger=TRIGGER, cooldown_seconds=default)
    ttl = job["spec"]["ttlSecondsAfterFinished"]
    ended = NOW - timedelta(seconds=ago)
    run = RunState(finished_at=ended, result=result)
    cooldown = cluster_cooldown(config, run, default_seconds=default, now=NOW)
    if result == "deferred":  # routing launches again at once; the Job keeps its name for its TTL
        assert not cooldown.active  # (docs/safety.md: so the service checks such gates before a Job)
        return
    assert cooldown.active is cooling
    assert cooldown.until == ended + timedelta(seconds=ttl)
    # What a 409 says about that Job names the same moment.
    finished = {
        **job,
        "status": {
            "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": f"{ended:%Y-%m-%dT%H:%M:%SZ}"}
            ]
        },
    }
    assert f"removes it at {cooldown.until:%Y-%m-%dT%H:%M:%SZ}" in existing_job_launch(finished).reason
