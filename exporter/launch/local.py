"""The local executor: a defrag run as a child process of the service (etcd outside Kubernetes).

A local run holds an flock on `<state_dir>/<cluster>.lock` for as long as it runs, and its start,
end and result are kept in `<state_dir>/<cluster>.json`, so that a restarted service, or a second
service on the same host, still sees it running or cooling down.
"""

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from exporter.config.settings import (
    ENV_PREFIX,
    ClusterConfig,
    Settings,
)
from exporter.core import clock
from exporter.core.handoff import DEFAULT_RUN_SETTINGS, RunSettings, run_args
from exporter.core.launches import LaunchOutcome, LaunchResult, RunState, Trigger
from exporter.core.report import RunOutcome, RunResult, outcome_from_report, parse_report
from exporter.launch.executor import (
    DRY_RUN_REASON,
    DryRuns,
    ExecutorUnavailable,
    OnFinished,
    refused_launch,
)

log = logging.getLogger(__name__)

# How often a local executor looks at runs it does not own (started by a previous or another
# service) to record their end: a poll, because another process's child cannot be waited for.
RECONCILE_INTERVAL_SECONDS = 5.0


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


def local_executor(settings: Settings, *, environ: Mapping[str, str] = os.environ) -> LocalExecutor:
    """The local executor the settings describe."""
    return LocalExecutor(
        state_dir=settings.executor.state_dir or default_state_dir(environ),
        cooldown_seconds=settings.executor.cooldown_seconds,
        dry_run=settings.executor.dry_run,
        run_settings=RunSettings.from_settings(settings),
    )
