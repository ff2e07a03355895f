"""Talking to Kubernetes: create the defrag Job, watch how Jobs end, record Events, discover etcd,
and apply the CronJob of `render cronjob --apply`.

Thin I/O over kubernetes_asyncio. What to send and what an answer means (the manifest, a 409's
meaning, how a Job ended, endpoints from a StatefulSet or static pods) are pure functions in
exporter.kubernetes.jobs. Every call asks for the raw JSON (`_preload_content=False`), so the pure layer reads
Kubernetes' own JSON shapes and nothing is converted through the generated models.

Errors, and what the webhook should answer. Alertmanager retries a webhook that answers 5xx and
gives up on any other status (notify/util.go, `Retrier`):
- KubeUnavailable: no answer, a timeout, 5xx or 429. A retry may well succeed, so the webhook
  answers 503 and Alertmanager retries (a 429's Retry-After is kept in `retry_after_seconds`).
- KubeRejected: any other 4xx but a create's 409 - 403 Forbidden (RBAC), 422 Invalid, 404 (the
  namespace does not exist), 400, 401. Asking again cannot help until a person fixes RBAC or the
  configuration, so the webhook must not answer 5xx (Alertmanager would repeat the doomed request
  until its notification times out): it logs an error, counts it and answers without a 5xx
  (launch/kubernetes.py turns it into ExecutorRejected). The still-firing alert is sent again after the
  route's repeat_interval, which picks up a fix.
- 409 AlreadyExists on a create is no error: it is the lock (LaunchResult with created=False).

RBAC: RBAC_RULES lists every verb on every resource the service calls, so the shipped Role can be
compared with it; tests/test_kube.py checks that the calls the tests make stay within it.
`render cronjob --apply` (read_statefulset, the same read as Kamaji discovery, and apply_cronjob)
runs with the user's own credentials; its calls are listed apart, in RENDER_APPLY_RBAC_RULES: the
service never needs the CronJob ones.
"""

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, assert_never

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from exporter.config.settings import ClusterConfig, ConfigError, KubernetesTarget
from exporter.core import clock
from exporter.core.launches import LaunchOutcome, LaunchResult
from exporter.kubernetes.datastores import DATASTORE_GROUP, DATASTORE_PLURAL, DATASTORE_VERSION
from exporter.kubernetes.jobs import (
    JOB_SELECTOR,
    JobOutcome,
    RunningJob,
    build_event,
    existing_job_launch,
    finished_condition,
    job_outcome,
    kubeadm_endpoints,
    running_job,
)
from exporter.kubernetes.kamaji import SecretLayout, detect_layout, member_endpoints
from exporter.kubernetes.variants import (
    JOB_RBAC_RULES,
    KUBEADM_NAMESPACE,
    Members,
    TlsSource,
    service_rbac_rules,
    spec_of,
)

__all__ = [
    "DATASTORE_CLUSTER_RBAC_RULES",
    "DATASTORE_NAMESPACE_RBAC_RULES",
    "KUBEADM_ETCD_SELECTOR",
    "RBAC_RULES",
    "RENDER_APPLY_RBAC_RULES",
    "AppliedCronJob",
    "JobOutcome",
    "KubeError",
    "KubeRejected",
    "KubeUnavailable",
    "LaunchOutcome",
    "LaunchResult",
    "RunningJob",
    "apply_cronjob",
    "create_job",
    "discover",
    "discover_endpoints",
    "discover_kamaji",
    "discover_kubeadm",
    "kube_api_client",
    "read_secret",
    "read_statefulset",
    "record_event",
    "watch_datastores",
    "watch_jobs",
]

log = logging.getLogger(__name__)

Json = dict[str, Any]
OnFinished = Callable[[JobOutcome], Awaitable[None] | None]
OnRunning = Callable[[RunningJob], Awaitable[None] | None]

KUBEADM_ETCD_SELECTOR = "component=etcd,tier=control-plane"
MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner is restarted after a backoff, not at once

# Every call below, as Role rules. Jobs, their pods and Events live in each cluster's
# `kubernetes.namespace`; statefulsets in the kamaji etcd's namespace; the kubeadm pods in kube-system.
# The union over every variant (exporter/kubernetes/variants.py says which needs what, and where).
RBAC_RULES: list[dict[str, list[str]]] = service_rbac_rules()
# Kamaji DataStore discovery (discover.kamaji_datastores; docs/kamaji.md has the manifests): a
# ClusterRole on the cluster-scoped DataStores, and in each namespace that holds Secrets the
# DataStores reference a Role with `get` on Secrets (RBAC cannot name Secrets that do not exist yet,
# and no list or watch: the service reads only the Secrets it is pointed at) plus the Job rules above
# where client certificates live, since the Jobs run there. No statefulsets: a DataStore's endpoints
# are its own.
DATASTORE_CLUSTER_RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kamaji.clastix.io"], "resources": ["datastores"], "verbs": ["get", "list", "watch"]},
]
DATASTORE_NAMESPACE_RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    *({key: list(values) for key, values in rule.items()} for rule in JOB_RBAC_RULES),
]
# What `etcd-autodefrag render cronjob --apply` calls, with the user's own kubeconfig (or the pod's
# service account where it runs): never part of the service's Role above, which stays as narrow.
RENDER_APPLY_RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["create", "get", "update"]},
    {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get"]},
]


class KubeError(Exception):
    """A Kubernetes API call failed; `status` is the HTTP status (0: no answer)."""

    def __init__(
        self, message: str, *, status: int = 0, reason: str = "", retry_after_seconds: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason  # the Status object's reason, e.g. Forbidden, AlreadyExists
        self.retry_after_seconds = retry_after_seconds


class KubeUnavailable(KubeError):
    """The API could not be reached, timed out, or answered 5xx or 429: retrying may help."""


class KubeRejected(KubeError):
    """The API refused the request (4xx other than a create's 409): retrying will not help."""


async def kube_api_client(
    *,
    host: str | None = None,
    kubeconfig: Path | None = None,
    context: str | None = None,
    connection_pool_maxsize: int = 100,
) -> k8s.ApiClient:
    """An API client: `host` as given (tests), else in-cluster in a Pod, else the kubeconfig.

    Use it as `async with await kube_api_client() as api:`. Raises ConfigError when no
    configuration can be found.
    """
    configuration = k8s.Configuration()
    try:
        if host is not None:
            configuration.host = host
        elif kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
    except (k8s_config.ConfigException, OSError) as exc:
        raise ConfigError(f"no usable Kubernetes configuration (in-cluster or kubeconfig): {exc}") from None
    configuration.connection_pool_maxsize = connection_pool_maxsize
    return k8s.ApiClient(configuration)


# --- one request --------------------------------------------------------------------------------------


async def _call(method: Callable[..., Awaitable[Any]], *args: Any, timeout: float, **kwargs: Any) -> Json:
    """One API call's JSON answer; KubeUnavailable or KubeRejected when it has none."""
    try:
        async with asyncio.timeout(timeout):
            response = await method(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
            try:
                body = await response.read()
            finally:
                response.release()
    except TimeoutError:
        raise KubeUnavailable(f"Kubernetes API: no answer within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise KubeUnavailable(f"Kubernetes API unreachable: {exc or type(exc).__name__}") from None
    if not 200 <= response.status < 300:
        raise _error(response.status, body, response.headers.get("Retry-After"))
    try:
        data = json.loads(body)
    except ValueError:
        raise KubeUnavailable("Kubernetes API answered with something other than JSON") from None
    if not isinstance(data, dict):
        raise KubeUnavailable("Kubernetes API answered with JSON that is not an object")
    return data


def _error(status: int, body: bytes, retry_after: str | None = None) -> KubeError:
    """The exception for a non-2xx answer, with the message of its Status object."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {}
    message = str(data.get("message") or body[:200].decode("utf-8", "replace") or f"HTTP {status}")
    reason = str(data.get("reason") or "")
    seconds = None
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    text = (
        f"Kubernetes API: {status} {reason}: {message}" if reason else f"Kubernetes API: {status}: {message}"
    )
    if status == 429 or status >= 500:
        return KubeUnavailable(text, status=status, reason=reason, retry_after_seconds=seconds)
    return KubeRejected(text, status=status, reason=reason)


def _already_exists(exc: KubeError) -> bool:
    return exc.status == 409 and exc.reason == "AlreadyExists"


# --- launching ----------------------------------------------------------------------------------------


async def create_job(
    api_client: k8s.ApiClient, manifest: Json, *, timeout: float, dry_run: bool = False
) -> LaunchResult:
    """Create the Job, or say why not: a Job of that name is running or cooling down (409).

    `dry_run` asks the API server to check everything (RBAC, admission, the name) and store nothing.
    Raises KubeUnavailable (retry) or KubeRejected (do not).
    """
    batch = k8s.BatchV1Api(api_client)
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    extra = {"dry_run": "All"} if dry_run else {}
    deadline = clock.monotonic() + timeout  # for the create and the read after a 409 together

    def left() -> float:
        return max(deadline - clock.monotonic(), 0.001)

    for _attempt in range(2):
        try:
            created = await _call(batch.create_namespaced_job, namespace, manifest, timeout=left(), **extra)
        except KubeError as exc:
            if not _already_exists(exc):
                raise
        else:
            if dry_run:
                log.info("DRY-RUN: would create Job %s/%s (the API server accepts it)", namespace, name)
                return LaunchResult(
                    False, name, "dry run: the API server accepts the Job", LaunchOutcome.DRY_RUN
                )
            log.info("created Job %s/%s", namespace, name)
            uid = str(created.get("metadata", {}).get("uid") or "")
            return LaunchResult(True, name, "created", LaunchOutcome.CREATED, uid=uid)
        try:
            existing = await _call(batch.read_namespaced_job, name, namespace, timeout=left())
        except KubeRejected as exc:
            if exc.status == 404:  # deleted (its cooldown ended) between our create and this read
                continue
            raise
        return existing_job_launch(existing)
    raise KubeUnavailable(f"Job {namespace}/{name} kept appearing and disappearing; try again")


# --- watching -----------------------------------------------------------------------------------------


class _Expired(Exception):
    """410 Gone: the resource version we watch from is too old; list again."""


@dataclass
class _Backoff:
    initial_seconds: float
    max_seconds: float
    current: float = 0.0

    def next_delay(self) -> float:
        self.current = min(self.current * 2, self.max_seconds) if self.current else self.initial_seconds
        return self.current * random.uniform(0.8, 1.2)  # jitter: replicas do not retry in step

    def reset(self) -> None:
        self.current = 0.0


async def watch_jobs(
    api_client: k8s.ApiClient,
    namespace: str,
    on_finished: OnFinished,
    *,
    on_running: OnRunning | None = None,
    on_gone: OnRunning | None = None,
    request_timeout: float = 30.0,
    watch_timeout_seconds: int = 300,
    backoff_initial_seconds: float = 1.0,
    backoff_max_seconds: float = 60.0,
) -> NoReturn:
    """Call `on_finished` once for every defrag Job in `namespace` that ends; runs until cancelled.

    List, then watch from the list's resourceVersion; a watch that expires (410 Gone) lists again,
    any other error backs off and lists again. Each Job is reported once per uid by this process
    (a restarted service reports the finished Jobs that still exist once more: outcomes carry
    `finished_at` for a caller that wants to skip old ones).

    Jobs still running are reported too, so that a restarted service knows its run is in flight:
    `on_running` once per uid when a running Job is first seen (listed or added), `on_gone` when
    such a Job disappears without having finished (deleted, or missing from a new list).
    Callbacks may be sync or async; an exception in one is logged and the watch goes on.
    """
    watcher = _JobWatcher(
        api_client,
        namespace,
        on_finished,
        on_running=on_running,
        on_gone=on_gone,
        request_timeout=request_timeout,
        watch_timeout_seconds=watch_timeout_seconds,
    )
    backoff = _Backoff(backoff_initial_seconds, backoff_max_seconds)
    resource_version: str | None = None
    while True:
        try:
            if resource_version is None:
                resource_version = await watcher.list()
            started = clock.monotonic()
            resource_version = await watcher.watch(resource_version)
            # The server ended the watch normally: carry on from where it stopped, at once unless it
            # keeps ending watches right away (a proxy cutting them, a server that will not stream).
            if clock.monotonic() - started >= min(MIN_WATCH_SECONDS, watch_timeout_seconds):
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next_delay())
        except _Expired:
            log.info("watch of Jobs in %s expired (410 Gone): listing again", namespace)
            resource_version = None
        except KubeError as exc:
            delay = backoff.next_delay()
            log.warning("watching Jobs in %s: %s; again in %.1fs", namespace, exc, delay)
            resource_version = None
            await asyncio.sleep(delay)


async def _watch_events(
    list_call: Callable[..., Awaitable[Any]],
    *args: Any,
    what: str,
    label_selector: str,
    resource_version: str,
    request_timeout: float,
    watch_timeout_seconds: int,
) -> AsyncGenerator[Json, None]:
    """The events of one watch (`list_call` with watch=True) until the server ends it.

    410 Gone raises _Expired (list again); another status raises its KubeError; a broken or garbled
    stream raises KubeUnavailable. No total timeout: the server ends the watch after
    timeoutSeconds, and a silent connection is caught by sock_read (bookmarks and the server's own
    end come well within it).
    """
    timeout = aiohttp.ClientTimeout(
        sock_connect=request_timeout, sock_read=watch_timeout_seconds + request_timeout
    )
    try:
        response: Any = await list_call(
            *args,
            label_selector=label_selector,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=watch_timeout_seconds,
            _preload_content=False,
            _request_timeout=timeout,
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise KubeUnavailable(f"Kubernetes API unreachable: {exc or type(exc).__name__}") from None
    try:
        if response.status == 410:
            raise _Expired
        if response.status != 200:
            raise _error(response.status, await response.read(), response.headers.get("Retry-After"))
        while line := await response.content.readline():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                raise KubeUnavailable(f"watch of {what} sent a line that is not JSON") from None
            yield event
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise KubeUnavailable(f"watch of {what} broke off: {exc or type(exc).__name__}") from None
    finally:
        response.release()


class _JobWatcher:
    """The list and watch calls of watch_jobs, and the uids already reported."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        namespace: str,
        on_finished: OnFinished,
        *,
        on_running: OnRunning | None = None,
        on_gone: OnRunning | None = None,
        request_timeout: float,
        watch_timeout_seconds: int,
    ) -> None:
        self.batch = k8s.BatchV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.namespace = namespace
        self.on_finished = on_finished
        self.on_running = on_running
        self.on_gone = on_gone
        self.request_timeout = request_timeout
        self.watch_timeout_seconds = watch_timeout_seconds
        self.reported: set[str] = set()
        self.running: dict[str, RunningJob] = {}  # uid -> the running Job reported to on_running

    async def list(self) -> str:
        """Consider every Job there is; return the list's resourceVersion to watch from."""
        job_list = await _call(
            self.batch.list_namespaced_job,
            self.namespace,
            label_selector=JOB_SELECTOR,
            timeout=self.request_timeout,
        )
        jobs = job_list.get("items") or []
        uids = {job.get("metadata", {}).get("uid") for job in jobs}
        # A Job that is gone cannot come back under the same uid: forget it (memory stays bounded).
        self.reported &= uids
        for uid in [uid for uid in self.running if uid not in uids]:  # deleted while we did not watch
            await self._gone(uid)
        for job in jobs:
            await self.consider(job)
        return str(job_list.get("metadata", {}).get("resourceVersion", ""))

    async def watch(self, resource_version: str) -> str:
        """Follow changes until the server ends the watch; return the last resourceVersion seen."""
        events = _watch_events(
            self.batch.list_namespaced_job,
            self.namespace,
            what="Jobs",
            label_selector=JOB_SELECTOR,
            resource_version=resource_version,
            request_timeout=self.request_timeout,
            watch_timeout_seconds=self.watch_timeout_seconds,
        )
        async with contextlib.aclosing(events):  # the response is released even when _event raises
            async for event in events:
                resource_version = await self._event(event, resource_version)
        return resource_version

    async def _event(self, event: Json, resource_version: str) -> str:
        kind, job = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if job.get("code") == 410:
                raise _Expired
            raise _error(int(job.get("code") or 500), json.dumps(job).encode())
        metadata = job.get("metadata", {})
        if kind == "DELETED":
            self.reported.discard(metadata.get("uid", ""))
            await self._gone(metadata.get("uid", ""))
        elif kind in ("ADDED", "MODIFIED"):
            await self.consider(job)
        return str(metadata.get("resourceVersion") or resource_version)

    async def consider(self, job: Json) -> None:
        """Report the Job if it has finished and was not reported yet, or if it newly runs."""
        uid = job.get("metadata", {}).get("uid", "")
        if finished_condition(job) is None:
            if (running := running_job(job)) is None:  # being deleted before it finished
                await self._gone(uid)
            elif uid not in self.running:
                self.running[uid] = running
                await self._notify(self.on_running, running)
            return
        self.running.pop(uid, None)  # it finished: on_finished says so
        if uid in self.reported:
            return
        name = job["metadata"]["name"]
        try:
            pods = await _call(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=f"job-name={name}",
                timeout=self.request_timeout,
            )
        except KubeRejected as exc:
            # It will not get better by retrying: report the end without the report.
            log.error("Job %s/%s ended, but its pods cannot be read: %s", self.namespace, name, exc)
            pods = {}
        outcome = job_outcome(job, pods.get("items") or [])
        if outcome is None:
            return
        self.reported.add(uid)
        await self._notify(self.on_finished, outcome)

    async def _gone(self, uid: str) -> None:
        """A Job reported running disappeared (or is being deleted) before it finished."""
        if (running := self.running.pop(uid, None)) is not None:
            await self._notify(self.on_gone, running)

    async def _notify(self, callback: Callable[[Any], Awaitable[None] | None] | None, what: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(what)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a bug in the callback must not stop the watch
            log.exception("handling a change of Job %s/%s failed", self.namespace, what.job_name)


# --- events and discovery --------------------------------------------------------------------------


async def record_event(
    api_client: k8s.ApiClient,
    job: Json,
    reason: str,
    message: str,
    type: Literal["Normal", "Warning"] = "Normal",
    *,
    timeout: float = 10.0,
    now: datetime | None = None,
) -> Json:
    """Create a core/v1 Event about the Job (shown by `kubectl describe job`); return it.

    Events are best effort: callers log a KubeError and go on.
    """
    event = build_event(
        job,
        reason=reason,
        message=message,
        type=type,
        now=now or clock.utcnow(),
        reporting_instance=socket.gethostname(),  # the pod name, in a Pod
    )
    core = k8s.CoreV1Api(api_client)
    return await _call(core.create_namespaced_event, event["metadata"]["namespace"], event, timeout=timeout)


async def read_statefulset(
    api_client: k8s.ApiClient, namespace: str, name: str, *, timeout: float = 10.0
) -> Json:
    """The StatefulSet as the API returns it (404 and 403 raise KubeRejected)."""
    apps = k8s.AppsV1Api(api_client)
    return await _call(apps.read_namespaced_stateful_set, name, namespace, timeout=timeout)


async def discover_kamaji(
    api_client: k8s.ApiClient,
    namespace: str,
    statefulset: str,
    service: str,
    *,
    port: int = 2379,
    cluster_domain: str = "cluster.local",
    timeout: float = 10.0,
) -> list[str]:
    """Client URLs of a kamaji-etcd cluster, one per replica of its StatefulSet."""
    found = await read_statefulset(api_client, namespace, statefulset, timeout=timeout)
    return member_endpoints(found, service, namespace, port=port, cluster_domain=cluster_domain)


async def discover_kubeadm(api_client: k8s.ApiClient, *, timeout: float = 10.0) -> list[str]:
    """Client URLs of kubeadm's etcd, from its static pods in kube-system."""
    core = k8s.CoreV1Api(api_client)
    pods = await _call(
        core.list_namespaced_pod, KUBEADM_NAMESPACE, label_selector=KUBEADM_ETCD_SELECTOR, timeout=timeout
    )
    return kubeadm_endpoints(pods)


async def discover_endpoints(
    cluster: ClusterConfig, api_client: k8s.ApiClient, *, timeout: float = 10.0
) -> list[str]:
    """The client URLs of a cluster with `kubernetes.discover_endpoints`, as its variant lists them."""
    target = cluster.kubernetes
    if target is None or not target.discover_endpoints:
        raise ValueError(f"cluster {cluster.name} does not discover its endpoints")
    return (await _read_members(cluster, target, api_client, timeout=timeout)).endpoints


async def discover(
    cluster: ClusterConfig, api_client: k8s.ApiClient, *, timeout: float = 10.0
) -> ClusterConfig:
    """The cluster with what start-up reads from the API filled in (`reads_kubernetes_api`).

    Its endpoints (kubernetes.discover_endpoints), and for kamaji with `secret_layout: auto` the
    layout of the Secrets its StatefulSet mounts, from one read of that StatefulSet. Raises
    KubeError, or ValueError when what was read does not fit the configuration (e.g. a layout
    that is neither of the chart's).
    """
    target = cluster.kubernetes
    if target is None or not cluster.reads_kubernetes_api:
        return cluster
    found = await _read_members(cluster, target, api_client, timeout=timeout)
    if target.discover_endpoints:
        cluster = cluster.with_endpoints(found.endpoints)
    if spec_of(target.variant).tls is TlsSource.KAMAJI_SECRETS and target.secret_layout is SecretLayout.AUTO:
        assert found.statefulset is not None  # kamaji-etcd's Secrets are named after its StatefulSet
        layout = detect_layout(found.statefulset)
        if layout is None:
            raise ValueError(
                f"StatefulSet {target.namespace}/{target.etcd_name} mounts neither {target.etcd_name}-certs "
                f"(self-signed) nor {target.etcd_name}-server-certs (cert-manager); set "
                "kubernetes.secret_layout (docs/kamaji.md)"
            )
        cluster = cluster.with_secret_layout(layout)
    return cluster


@dataclass(frozen=True)
class _Members:
    endpoints: list[str]
    statefulset: Json | None = None  # the StatefulSet read for them (kamaji), for its Secret layout


async def _read_members(
    cluster: ClusterConfig, target: KubernetesTarget, api_client: k8s.ApiClient, *, timeout: float
) -> _Members:
    """One read of where the variant's members run (exporter/kubernetes/variants.py)."""
    members = spec_of(target.variant).members
    match members:
        case Members.STATEFULSET:
            assert target.etcd_name is not None  # the settings require it for a StatefulSet
            statefulset = await read_statefulset(
                api_client, target.namespace, target.etcd_name, timeout=timeout
            )
            found = _Members(_kamaji_members(target, statefulset), statefulset)
        case Members.STATIC_PODS:
            found = _Members(await discover_kubeadm(api_client, timeout=timeout))
        case Members.CONFIGURED:
            # The settings refuse discover_endpoints for such a variant; say so rather than guess.
            raise ValueError(
                f"cluster {cluster.name}: variant {target.variant.value} runs etcd where the Kubernetes "
                "API does not list it: give endpoints"
            )
        case _ as unreachable:
            assert_never(unreachable)
    if target.discover_endpoints and not found.endpoints:
        raise KubeRejected(f"cluster {cluster.name}: the Kubernetes API lists no etcd member", status=404)
    return found


def _kamaji_members(target: KubernetesTarget, statefulset: Json) -> list[str]:
    service = target.etcd_service or target.etcd_name or ""
    return member_endpoints(
        statefulset, service, target.namespace, port=target.client_port, cluster_domain=target.cluster_domain
    )


# --- Kamaji DataStores ------------------------------------------------------------------------------

OnDataStores = Callable[[list[Json]], Awaitable[None]]
OnDataStoreEvent = Callable[[str, Json], Awaitable[None]]


async def read_secret(api_client: k8s.ApiClient, namespace: str, name: str, *, timeout: float = 10.0) -> Json:
    """The Secret as the API returns it (`data` base64); 404 and 403 raise KubeRejected."""
    core = k8s.CoreV1Api(api_client)
    return await _call(core.read_namespaced_secret, name, namespace, timeout=timeout)


async def watch_datastores(
    api_client: k8s.ApiClient,
    on_list: OnDataStores,
    on_event: OnDataStoreEvent,
    *,
    label_selector: str = "",
    request_timeout: float = 30.0,
    watch_timeout_seconds: int = 300,
    backoff_initial_seconds: float = 1.0,
    backoff_max_seconds: float = 60.0,
) -> NoReturn:
    """Follow Kamaji's DataStores until cancelled: `on_list` with every one, then `on_event`.

    As watch_jobs: list, watch from the list's resourceVersion, list again when the watch expires
    (410 Gone); any other failure (the CRD not installed yet: 404; RBAC: 403) is logged and retried
    after a bounded, jittered backoff. `on_event(type, object)` gets ADDED, MODIFIED and DELETED.
    Exceptions of the callbacks propagate: they are the caller's bugs.
    """
    custom = k8s.CustomObjectsApi(api_client)
    group, version, plural = DATASTORE_GROUP, DATASTORE_VERSION, DATASTORE_PLURAL
    backoff = _Backoff(backoff_initial_seconds, backoff_max_seconds)
    resource_version: str | None = None
    while True:
        try:
            if resource_version is None:
                listed = await _call(
                    custom.list_cluster_custom_object,
                    group,
                    version,
                    plural,
                    label_selector=label_selector,
                    timeout=request_timeout,
                )
                await on_list(list(listed.get("items") or []))
                resource_version = str(listed.get("metadata", {}).get("resourceVersion", ""))
            started = clock.monotonic()
            events = _watch_events(
                custom.list_cluster_custom_object,
                group,
                version,
                plural,
                what="DataStores",
                label_selector=label_selector,
                resource_version=resource_version,
                request_timeout=request_timeout,
                watch_timeout_seconds=watch_timeout_seconds,
            )
            async with contextlib.aclosing(events):  # the response is released whatever raises
                async for event in events:
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise _Expired
                        raise _error(int(obj.get("code") or 500), json.dumps(obj).encode())
                    resource_version = str(obj.get("metadata", {}).get("resourceVersion") or resource_version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        await on_event(kind, obj)
            if clock.monotonic() - started >= min(MIN_WATCH_SECONDS, watch_timeout_seconds):
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next_delay())
        except _Expired:
            log.info("watch of DataStores expired (410 Gone): listing again")
            resource_version = None
        except KubeError as exc:
            delay = backoff.next_delay()
            hint = " (is Kamaji's DataStore CRD installed?)" if exc.status == 404 else ""
            log.warning("watching DataStores: %s%s; again in %.1fs", exc, hint, delay)
            resource_version = None
            await asyncio.sleep(delay)


# --- render cronjob --apply -------------------------------------------------------------------------


@dataclass(frozen=True)
class AppliedCronJob:
    """What apply_cronjob did: created the CronJob, or replaced the one of that name."""

    created: bool
    cronjob: Json  # as the API server stored it
    previous_images: list[str]  # the images the replaced CronJob ran ([] when created)
    previous_labels: dict[str, str]


async def apply_cronjob(
    api_client: k8s.ApiClient, manifest: Json, *, timeout: float = 10.0
) -> AppliedCronJob:
    """Create the CronJob, or replace the existing one of that name (e.g. defrag.sh's) with it.

    Replace, not merge: nothing of the old CronJob (its image, args, volumes, restartPolicy) survives.
    The replace carries the resourceVersion just read, so a concurrent change answers 409 Conflict
    and is retried from the read. Raises KubeUnavailable or KubeRejected (e.g. 403 Forbidden).
    """
    batch = k8s.BatchV1Api(api_client)
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    deadline = clock.monotonic() + timeout

    def left() -> float:
        return max(deadline - clock.monotonic(), 0.001)

    for _attempt in range(3):
        try:
            stored = await _call(batch.create_namespaced_cron_job, namespace, manifest, timeout=left())
        except KubeError as exc:
            if not _already_exists(exc):
                raise
        else:
            log.info("created CronJob %s/%s", namespace, name)
            return AppliedCronJob(True, stored, [], {})
        try:
            existing = await _call(batch.read_namespaced_cron_job, name, namespace, timeout=left())
        except KubeRejected as exc:
            if exc.status == 404:  # deleted between our create and this read: create again
                continue
            raise
        metadata = existing.get("metadata", {})
        body = {
            **manifest,
            "metadata": {**manifest["metadata"], "resourceVersion": metadata.get("resourceVersion")},
        }
        try:
            stored = await _call(batch.replace_namespaced_cron_job, name, namespace, body, timeout=left())
        except KubeError as exc:
            if exc.status in (404, 409):  # deleted or changed since our read: start over
                continue
            raise
        pod_spec = existing.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
        containers = pod_spec.get("spec", {}).get("containers") or []
        log.info("replaced CronJob %s/%s", namespace, name)
        return AppliedCronJob(
            False, stored, [str(c.get("image", "")) for c in containers], dict(metadata.get("labels") or {})
        )
    raise KubeUnavailable(f"CronJob {namespace}/{name} kept changing under us; try again")
