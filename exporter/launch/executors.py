"""Executors: carrying out a launch the webhook decided on, as a Kubernetes Job or a local process.

Both are single-flight per cluster on their own, whatever the webhook decided: a Kubernetes Job's
name is the lock across replicas and restarts (the API refuses a second object of that name); a
local run holds an flock on `<state_dir>/<cluster>.lock` for as long as it runs, and its start,
end and result are kept in `<state_dir>/<cluster>.json`, so that a restarted service, or a second
service on the same host, still sees it running or cooling down.

Dry-run is threaded down to the one call that would create something, which logs
`DRY-RUN: would ...` instead. It goes through the same single-flight and cooldown bookkeeping as a
real launch (`DryRuns`), so that its log and metrics predict what the service would do for real:
a storm of alerts for one cluster makes one "would launch", and the rest are skipped as cooling down.
"""

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from exporter.config.settings import (
    ENV_PREFIX,
    ClusterConfig,
    ExecutorSettings,
    Settings,
)
from exporter.core import clock
from exporter.core.cooldown import cluster_cooldown
from exporter.core.handoff import DEFAULT_RUN_SETTINGS, RunSettings, run_args
from exporter.core.launches import LaunchOutcome, LaunchResult, RunState, Trigger
from exporter.core.policy import statefulset_rollout_gate
from exporter.core.report import RunOutcome, RunResult, outcome_from_report, parse_report
from exporter.core.units import human_bytes
from exporter.kubernetes import api as kube
from exporter.kubernetes import jobs
from exporter.kubernetes.jobs import JobOutcome, RunningJob
from exporter.kubernetes.variants import Members, spec_of

log = logging.getLogger(__name__)

# How often a local executor looks at runs it does not own (started by a previous or another
# service) to record their end: a poll, because another process's child cannot be waited for.
RECONCILE_INTERVAL_SECONDS = 5.0


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


# --- local -----------------------------------------------------------------------------------------


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME or ~/.local/state, plus /etcd-autodefrag."""
    if systemd := environ.get("STATE_DIRECTORY"):
        return Path(systemd.split(":")[0])
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "/")) / ".local" / "state")
    return Path(base) / "etcd-autodefrag"


@dataclass(frozen=True)
class _State:
    """The JSON state file of one cluster."""

    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: str = ""
    pid: int = 0

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.finished_at is None

    def to_json(self) -> str:
        return json.dumps(
            {
                "started_at": self.started_at.isoformat() if self.started_at else None,
                "finished_at": self.finished_at.isoformat() if self.finished_at else None,
                "result": self.result,
                "pid": self.pid,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "_State":
        data = json.loads(text)
        return cls(
            started_at=datetime.fromisoformat(data["started_at"]) if data.get("started_at") else None,
            finished_at=datetime.fromisoformat(data["finished_at"]) if data.get("finished_at") else None,
            result=str(data.get("result") or ""),
            pid=int(data.get("pid") or 0),
        )


class LocalExecutor:
    """Runs `python -m exporter defrag --cluster-json CLUSTER --output json` as a child process.

    The child inherits the lock file's descriptor, so the lock lives exactly as long as the run,
    even when this service stops or dies first. The child's stdout (the JSON report) goes to
    `<cluster>.report.json`, so a run that outlives its service still leaves its result on disk.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        cooldown_seconds: float,
        dry_run: bool = False,
        command: Sequence[str] = (sys.executable, "-m", "exporter"),
        run_settings: RunSettings = DEFAULT_RUN_SETTINGS,
        reconcile_interval_seconds: float = RECONCILE_INTERVAL_SECONDS,
    ) -> None:
        self.state_dir = state_dir
        self.cooldown_seconds = cooldown_seconds
        self.dry_run = dry_run
        self.command = list(command)
        self.run_settings = run_settings
        self.reconcile_interval_seconds = reconcile_interval_seconds
        self._on_finished: OnFinished = lambda _outcome: None
        self._children: dict[str, asyncio.Task[None]] = {}
        self._reconciler: asyncio.Task[None] | None = None
        self._dry = DryRuns()

    # --- files ---

    def _path(self, cluster: str, suffix: str) -> Path:
        return self.state_dir / f"{cluster}{suffix}"

    def _read_state(self, cluster: str) -> _State:
        try:
            return _State.from_json(self._path(cluster, ".json").read_text())
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable state must not block a cluster forever: the lock still guards against
            # a concurrent run, only the cooldown is lost.
            log.warning("cluster %s: ignoring unreadable run state: %s", cluster, exc)
            return _State()

    def _write_state(self, cluster: str, state: _State) -> None:
        path = self._path(cluster, ".json")
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(state.to_json())
        os.replace(temporary, path)  # readers see the old or the new state, never half of one

    def _try_lock(self, cluster: str) -> int | None:
        """The lock file's descriptor with the lock held, or None when a run holds it."""
        fd = os.open(self._path(cluster, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def child_command(self, cluster: ClusterConfig) -> list[str]:
        """The command line of a run: the same engine as `etcd-autodefrag defrag`, handed the cluster
        as the service resolved it (exporter/core/handoff.py), so it reads no config file."""
        return [*self.command, *run_args(cluster, self.run_settings), "--output", "json"]

    # --- the Executor protocol ---

    async def start(self, on_finished: OnFinished) -> None:
        """Record runs that ended while no service watched them, then keep watching for more."""
        self._on_finished = on_finished
        self._reconcile()
        self._reconciler = asyncio.create_task(self._reconcile_forever())

    async def stop(self) -> None:
        """Stop watching. Children keep running and keep their lock: a restart never cuts a run short."""
        tasks = [*self._children.values(), *([self._reconciler] if self._reconciler else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._children.clear()
        self._reconciler = None

    def runs(self, clusters: Sequence[str]) -> dict[str, RunState]:
        """Run states from the state files (shared with other services on this host)."""
        out = {}
        for cluster in clusters:
            state = self._read_state(cluster)
            real = RunState(
                running=state.running or cluster in self._children,
                started_at=state.started_at,
                finished_at=state.finished_at,
                result=state.result,
            )
            out[cluster] = self._dry.merged(cluster, real) if self.dry_run else real
        return out

    async def launch(self, cluster: ClusterConfig, trigger: Trigger) -> LaunchResult:
        """Start the child unless the lock is held or the cluster cools down (checked under the lock)."""
        name = cluster.name
        job = f"local run of {name}"
        command = self.child_command(cluster)
        if self.dry_run:
            # What a real launch would check, from the state files (read only: a dry run takes
            # no lock and writes nothing) and the dry runs before this one.
            now = clock.utcnow()
            known = self.runs([name])[name]
            refused = refused_launch(
                cluster, known, job=job, default_cooldown_seconds=self.cooldown_seconds, now=now
            )
            if refused is not None:
                return refused
            log.info("DRY-RUN: would run %s (alert %s)", shlex.join(command), trigger.alertname)
            self._report(self._dry.record(name, now))
            return LaunchResult(False, job, DRY_RUN_REASON, LaunchOutcome.DRY_RUN)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = self._try_lock(name)
        except OSError as exc:
            raise ExecutorUnavailable(f"state directory {self.state_dir}: {exc.strerror}") from None
        if fd is None:
            reason = f"already running: a run on cluster {name} holds {self._path(name, '.lock')}"
            return LaunchResult(False, job, reason, LaunchOutcome.ALREADY_RUNNING)
        try:
            state = self._read_state(name)
            if state.running:  # its process ended while no service watched: record it first
                self._record_orphan(name, state)
                state = self._read_state(name)
            now = clock.utcnow()
            ended = RunState(False, state.started_at, state.finished_at, state.result)  # we hold the lock
            refused = refused_launch(
                cluster, ended, job=job, default_cooldown_seconds=self.cooldown_seconds, now=now
            )
            if refused is not None:
                os.close(fd)
                return refused
            process = await self._spawn(name, command, fd)
        except OSError as exc:
            os.close(fd)
            raise ExecutorUnavailable(f"cannot start {shlex.join(command)}: {exc.strerror}") from None
        try:
            self._write_state(name, _State(started_at=now, pid=process.pid))
        except OSError as exc:  # the child runs and holds the lock regardless: only the record is lost
            log.error("cluster %s: cannot record the run's start in %s: %s", name, self.state_dir, exc)
        log.info(
            "cluster %s: started local run (pid %d) for alert %s: %s",
            name,
            process.pid,
            trigger.alertname,
            shlex.join(command),
        )
        self._children[name] = asyncio.create_task(self._watch(name, process, fd, now))
        return LaunchResult(True, f"{job} (pid {process.pid})", "started", LaunchOutcome.CREATED)

    # --- children ---

    async def _spawn(self, cluster: str, command: list[str], lock_fd: int) -> asyncio.subprocess.Process:
        report = os.open(
            self._path(cluster, ".report.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            return await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=report,
                env=child_environment(os.environ),
                pass_fds=(lock_fd,),  # the child holds the lock until it exits
                start_new_session=True,  # a Ctrl-C or SIGTERM aimed at the service does not cut it short
            )
        finally:
            os.close(report)

    async def _watch(
        self, cluster: str, process: asyncio.subprocess.Process, fd: int, started: datetime
    ) -> None:
        """Wait for the child; record its end while still holding the lock, so no one starts in between."""
        try:
            code = await process.wait()
            finished = clock.utcnow()
            report = parse_report(self._path(cluster, ".report.json").read_text())
            outcome = outcome_from_report(
                cluster=cluster, report=report, started_at=started, finished_at=finished
            )
            if report is None:
                outcome = RunOutcome(
                    cluster,
                    RunResult.JOB_FAILED,
                    started,
                    finished,
                    reason=f"exited with code {code} and no report",
                )
            self._finish(cluster, outcome, pid=process.pid)
        finally:
            os.close(fd)
            self._children.pop(cluster, None)

    def _finish(self, cluster: str, outcome: RunOutcome, *, pid: int = 0) -> None:
        try:
            self._write_state(cluster, _State(outcome.started_at, outcome.finished_at, outcome.result, pid))
        except OSError as exc:  # the cooldown is lost, the outcome is still counted
            log.error("cluster %s: cannot record the run's end in %s: %s", cluster, self.state_dir, exc)
        self._report(outcome)

    def _report(self, outcome: RunOutcome) -> None:
        try:
            self._on_finished(outcome)
        except Exception:  # metrics or logging must not lose the state we just wrote
            log.exception("cluster %s: recording the run's outcome failed", outcome.cluster)

    def _record_orphan(self, cluster: str, state: _State) -> None:
        """A run started by an earlier (or another) service ended: its report file says how."""
        report_path = self._path(cluster, ".report.json")
        # The report file is written when the run ends; without a report its time is the start's.
        try:
            finished = datetime.fromtimestamp(report_path.stat().st_mtime, tz=clock.utcnow().tzinfo)
            report = parse_report(report_path.read_text())
        except OSError:
            finished, report = clock.utcnow(), None
        started = state.started_at
        if started is not None and finished < started:
            finished = started
        outcome = outcome_from_report(
            cluster=cluster, report=report, started_at=started, finished_at=finished
        )
        log.info(
            "cluster %s: a run started at %s by an earlier service ended: %s",
            cluster,
            started,
            outcome.result,
        )
        self._finish(cluster, outcome, pid=state.pid)

    def _reconcile(self) -> None:
        """Record the end of every run this service does not own whose lock is free."""
        if not self.state_dir.is_dir():
            return
        for path in self.state_dir.glob("*.json"):
            cluster = path.name.removesuffix(".json")
            if cluster.endswith(".report") or cluster in self._children:
                continue
            if not self._read_state(cluster).running:
                continue
            fd = self._try_lock(cluster)
            if fd is None:
                continue  # still running, in a child of an earlier or another service
            try:
                state = self._read_state(cluster)  # read again under the lock
                if state.running:
                    self._record_orphan(cluster, state)
            finally:
                os.close(fd)

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval_seconds)
            try:
                self._reconcile()
            except Exception:  # a bug must not stop the loop silently
                log.exception("reconciling local runs failed")


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's environment without the webhook's secrets, which a defrag run never needs."""
    return {k: v for k, v in environ.items() if not k.startswith(f"{ENV_PREFIX}WEBHOOK__")}


# --- kubernetes ----------------------------------------------------------------------------------


class KubernetesExecutor:
    """Creates the defrag Job (kubernetes.jobs builds it, kubernetes.api sends it) and watches Jobs end.

    The Job name is the lock and its ttlSecondsAfterFinished the cooldown, both kept by the API
    server, so replicas and restarts agree. What this object remembers (runs in flight, the last
    end) only sharpens the webhook's reasons and the in-flight gauge; losing it loses no guarantee.
    It is rebuilt from the API: the watch reports Jobs still running as well as finished ones, so a
    restarted service sees its run in flight (and counts its end).
    """

    def __init__(
        self,
        *,
        api_client: Any | None = None,
        image: str,
        cooldown_seconds: float,
        timeout_seconds: float,
        dry_run: bool = False,
        namespaces: Sequence[str] = (),
        run_settings: RunSettings = DEFAULT_RUN_SETTINGS,
    ) -> None:
        self.image = image
        self.run_settings = run_settings
        self.cooldown_seconds = cooldown_seconds
        self.timeout_seconds = timeout_seconds
        self.dry_run = dry_run
        self._api = api_client
        self._own_api = api_client is None
        self._namespaces = list(dict.fromkeys(namespaces))
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._runs: dict[str, RunState] = {}
        self._dry = DryRuns()
        self._running_uids: dict[str, str] = {}  # cluster -> uid of its running Job, as the watch saw it
        self._on_finished: OnFinished = lambda _outcome: None
        self._started_at = clock.utcnow()

    async def start(self, on_finished: OnFinished) -> None:
        """Connect (in-cluster or kubeconfig, unless a client was given) and watch each namespace."""
        self._on_finished = on_finished
        self._started_at = clock.utcnow()
        if self._api is None:
            self._api = await kube.kube_api_client()
        for namespace in self._namespaces:
            self._watch(namespace)

    async def stop(self) -> None:
        """Stop watching; Jobs run on (the API server keeps them), and the next start finds them."""
        tasks = [*self._watches.values(), *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watches.clear()
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    @property
    def api(self) -> Any:
        """The API client (set by start)."""
        if self._api is None:
            raise RuntimeError("KubernetesExecutor used before start()")
        return self._api

    def runs(self, clusters: Sequence[str]) -> dict[str, RunState]:
        """What this replica saw: Jobs it created or found running, and Jobs it saw end."""
        if self.dry_run:
            return {name: self._dry.merged(name, self._runs.get(name, RunState())) for name in clusters}
        return {name: self._runs.get(name, RunState()) for name in clusters}

    async def launch(self, cluster: ClusterConfig, trigger: Trigger) -> LaunchResult:
        """Create the cluster's Job; a 409 says it is running or cooling down (no error)."""
        try:
            manifest = jobs.build_job(
                cluster,
                image=self.image,
                trigger=trigger,
                cooldown_seconds=self.cooldown_seconds,
                run_settings=self.run_settings,
            )
        except (jobs.JobConfigError, ValueError) as exc:
            raise ExecutorRejected(str(exc)) from None
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        if (deferred := await self._rollout_gate(cluster, name)) is not None:
            return deferred
        now = clock.utcnow()
        if self.dry_run:
            # The API server keeps the real lock and cooldown (the Job); a dry run creates no Job,
            # so its own runs are checked here, as the Job would be.
            state = self.runs([cluster.name])[cluster.name]
            refused = refused_launch(
                cluster, state, job=f"Job {name}", default_cooldown_seconds=self.cooldown_seconds, now=now
            )
            if refused is not None:
                return refused
            log.info(
                "DRY-RUN: would create Job %s in namespace %s (alert %s)", name, namespace, trigger.alertname
            )
        try:
            result = await kube.create_job(
                self.api, manifest, timeout=self.timeout_seconds, dry_run=self.dry_run
            )
        except kube.KubeUnavailable as exc:
            raise ExecutorUnavailable(str(exc)) from None
        except kube.KubeRejected as exc:
            raise ExecutorRejected(str(exc)) from None
        if result.outcome in (LaunchOutcome.CREATED, LaunchOutcome.ALREADY_RUNNING):
            previous = self._runs.get(cluster.name, RunState())
            started = clock.utcnow() if result.created else previous.started_at
            self._runs[cluster.name] = replace(previous, running=True, started_at=started)
        if result.outcome is LaunchOutcome.DRY_RUN:
            try:
                self._on_finished(self._dry.record(cluster.name, now))
            except Exception:  # metrics or logging must not fail a launch that was answered
                log.exception("cluster %s: recording the dry run failed", cluster.name)
        if namespace not in self._watches:
            self._watch(namespace)
        if result.created:
            message = f"alert {trigger.alertname} ({trigger.fingerprint or 'no fingerprint'}) fired"
            # With the uid the API server gave the Job: `kubectl describe job` selects Events by it.
            created = {**manifest, "metadata": {**manifest["metadata"], "uid": result.uid}}
            self._best_effort_event(created, "DefragTriggered", message, "Normal")
        return result

    async def _rollout_gate(self, cluster: ClusterConfig, job_name: str) -> LaunchResult | None:
        """A deferral while the cluster's etcd StatefulSet (kamaji) rolls out, else None (launch).

        The Job cannot look itself (its token is not mounted), so the service does, right before it
        creates the Job: a rolling update restarts the members one after the other (docs/safety.md).
        """
        target = cluster.kubernetes
        if target is None or spec_of(target.variant).members is not Members.STATEFULSET:
            return None
        assert target.etcd_name is not None  # the settings require it for a StatefulSet
        try:
            statefulset = await kube.read_statefulset(
                self.api, target.namespace, target.etcd_name, timeout=self.timeout_seconds
            )
        except kube.KubeUnavailable as exc:
            raise ExecutorUnavailable(str(exc)) from None
        except kube.KubeRejected as exc:
            raise ExecutorRejected(
                f"cannot read StatefulSet {target.namespace}/{target.etcd_name} for the rollout gate: {exc}"
            ) from None
        gate = statefulset_rollout_gate(statefulset)
        if gate.proceed:
            return None
        log.info("cluster %s: deferred, no Job created: %s", cluster.name, gate.reason)
        return LaunchResult(False, job_name, f"deferred: {gate.reason}", LaunchOutcome.DEFERRED)

    def watch_namespace(self, namespace: str) -> None:
        """Follow the Jobs of one more namespace (a discovered cluster's), from now or from start()."""
        if self._api is None:
            self._namespaces = list(dict.fromkeys([*self._namespaces, namespace]))
        elif namespace not in self._watches:
            self._watch(namespace)

    def _watch(self, namespace: str) -> None:
        self._watches[namespace] = asyncio.create_task(
            kube.watch_jobs(
                self.api,
                namespace,
                self._job_finished,
                on_running=self._job_running,
                on_gone=self._job_gone,
                request_timeout=self.timeout_seconds,
            )
        )

    def _job_running(self, job: RunningJob) -> None:
        """A Job of ours runs (just created, or found by the first list after a restart)."""
        known = self._runs.get(job.cluster, RunState())
        self._running_uids[job.cluster] = job.uid
        self._runs[job.cluster] = replace(known, running=True, started_at=job.started_at or known.started_at)

    def _job_gone(self, job: RunningJob) -> None:
        """The running Job was deleted before it finished: no run is in flight, and no outcome is known."""
        if self._running_uids.get(job.cluster) != job.uid:
            return  # a newer Job of that cluster runs
        del self._running_uids[job.cluster]
        self._runs[job.cluster] = replace(self._runs.get(job.cluster, RunState()), running=False)
        log.warning(
            "Job %s of cluster %s was deleted before it finished: its run's outcome is unknown",
            job.job_name,
            job.cluster,
        )

    def _job_finished(self, job: JobOutcome) -> None:
        finished = job.finished_at or clock.utcnow()
        outcome = outcome_from_report(
            cluster=job.cluster, report=job.report, started_at=job.started_at, finished_at=finished
        )
        if outcome.result is RunResult.JOB_FAILED and job.reason:
            outcome = replace(outcome, reason=f"Job {job.job_name} failed ({job.reason}) without a report")
        known = self._runs.get(job.cluster, RunState())
        if self._running_uids.get(job.cluster) == job.uid:
            del self._running_uids[job.cluster]
        if known.finished_at is None or finished >= known.finished_at:
            self._runs[job.cluster] = RunState(False, job.started_at, finished, outcome.result)
        # After a restart the watch lists the finished Jobs still kept for their TTL: the previous
        # service counted those. Count a Job we knew running, or one that ended after we started
        # (Kubernetes times have whole seconds: one ending in our first second is not counted).
        if not known.running and finished <= self._started_at:
            log.debug("Job %s ended at %s, before this service started: not counted", job.job_name, finished)
            return
        self._on_finished(outcome)
        self._best_effort_event(*finished_event(job, outcome))

    def _best_effort_event(self, manifest: dict[str, Any], reason: str, message: str, kind: str) -> None:
        async def send() -> None:
            try:
                await kube.record_event(
                    self.api,
                    manifest,
                    reason,
                    message,
                    "Warning" if kind == "Warning" else "Normal",
                    timeout=self.timeout_seconds,
                )
            except kube.KubeError as exc:
                log.warning("Event about Job %s not recorded: %s", manifest["metadata"]["name"], exc)

        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def finished_event(job: JobOutcome, outcome: RunOutcome) -> tuple[dict[str, Any], str, str, str]:
    """The Event about a finished Job (`kubectl describe job`): manifest, reason, message, type."""
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job.job_name, "namespace": job.namespace, "uid": job.uid},
    }
    took = f" in {outcome.duration_seconds:.0f} s" if outcome.started_at else ""
    if outcome.result in (RunResult.SUCCESS, RunResult.NOTHING_TO_DO, RunResult.DRY_RUN):
        message = f"{outcome.result}: reclaimed {human_bytes(outcome.reclaimed_bytes)}{took}"
        return manifest, "DefragSucceeded", message, "Normal"
    if outcome.result == RunResult.DEFERRED:
        return manifest, "DefragDeferred", f"deferred{took}: {outcome.reason}", "Normal"
    message = f"{outcome.result}{took}: {outcome.reason or 'see the log of the Job pod'}"
    return manifest, "DefragFailed", message, "Warning"


# --- choosing ------------------------------------------------------------------------------------


def resolve_kind(executor: ExecutorSettings, environ: Mapping[str, str]) -> ExecutorSettings.Kind:
    """`auto` means kubernetes inside a Pod (KUBERNETES_SERVICE_HOST set), local elsewhere."""
    if executor.kind is not ExecutorSettings.Kind.AUTO:
        return executor.kind
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return ExecutorSettings.Kind.KUBERNETES
    return ExecutorSettings.Kind.LOCAL


def local_executor(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> LocalExecutor:
    """The local executor the settings describe."""
    return LocalExecutor(
        state_dir=settings.executor.state_dir or default_state_dir(environ),
        cooldown_seconds=settings.executor.cooldown_seconds,
        dry_run=settings.executor.dry_run,
        run_settings=RunSettings.from_settings(settings),
    )


def executor_from_settings(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> Executor:
    """The executor the settings describe (`auto`: kubernetes in a Pod, local elsewhere)."""
    if resolve_kind(settings.executor, environ) is ExecutorSettings.Kind.KUBERNETES:
        return kubernetes_executor(settings)
    return local_executor(settings, environ=environ)


def kubernetes_executor(settings: Settings, *, api_client: Any | None = None) -> KubernetesExecutor:
    """The Kubernetes executor the settings describe; it connects when started."""
    without = [c.name for c in settings.clusters if c.kubernetes is None]
    if without:
        log.warning(
            "clusters without a kubernetes section cannot be defragmented by a Job: %s", ", ".join(without)
        )
    targets = {c.name: c.kubernetes for c in settings.clusters if c.kubernetes is not None}
    if stale := [name for name, target in targets.items() if "config_map" in target.model_fields_set]:
        log.warning(
            "kubernetes.config_map is ignored: a Job is handed its cluster in its args and reads no "
            "ConfigMap (docs/run-handoff.md); remove it from clusters %s",
            ", ".join(stale),
        )
    return KubernetesExecutor(
        api_client=api_client,
        image=settings.executor.image or jobs.DEFAULT_IMAGE,
        cooldown_seconds=settings.executor.cooldown_seconds,
        timeout_seconds=settings.executor.kubernetes_timeout_seconds,
        dry_run=settings.executor.dry_run,
        namespaces=[c.kubernetes.namespace for c in settings.clusters if c.kubernetes is not None],
        run_settings=RunSettings.from_settings(settings),
    )
