"""The Kubernetes executor: a defrag run as a one-shot Job in the cluster's namespace.

A Job's name is the lock across replicas and restarts (the API refuses a second object of that
name), and its ttlSecondsAfterFinished the cooldown; a watch on our Jobs reports each run's end.
"""

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from exporter.config.settings import (
    ClusterConfig,
    Settings,
)
from exporter.core import clock
from exporter.core.handoff import DEFAULT_RUN_SETTINGS, RunSettings
from exporter.core.launches import LaunchOutcome, LaunchResult, RunState, Trigger
from exporter.core.policy import statefulset_rollout_gate
from exporter.core.report import RunOutcome, RunResult, outcome_from_report
from exporter.core.units import human_bytes
from exporter.kubernetes import api as kube
from exporter.kubernetes import jobs
from exporter.kubernetes.jobs import JobOutcome, RunningJob
from exporter.kubernetes.variants import Members, spec_of
from exporter.launch.executor import (
    DryRuns,
    ExecutorRejected,
    ExecutorUnavailable,
    OnFinished,
    refused_launch,
)

log = logging.getLogger(__name__)


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
