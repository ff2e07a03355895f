"""A fake Kubernetes API server over real loopback HTTP, for the tests of exporter/kubernetes/api.py.

It serves exactly the calls exporter.kubernetes.api makes, with Kubernetes' JSON shapes and status codes
(Status objects for errors, JSON lines for watches, 410 for an expired resourceVersion; for the
CronJobs of `render cronjob --apply`, 409 AlreadyExists on a create and 409 Conflict on a replace
with a stale resourceVersion). `received` keeps every create and replace body exactly as sent. Any other
request is answered 404 and recorded in `unexpected`; the `fake_kube` fixture fails a test that
leaves anything there. Faults are queued for the next matching requests: a status (500, 429,
403, ...), a hang (no answer until the server closes) or a delay.

It runs on the test's event loop and a create checks and inserts the name with no `await` in
between, so names are unique the way the API server's are: of any number of concurrent creates of
one name, exactly one gets 201.

The "controller" is the test: `start_job` and `finish_job` do what the Job controller and kubelet
would (a pod with the Job's labels and owner, its container's termination message, the Job's
conditions).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

Json = dict[str, Any]

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "AlreadyExists",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, message: str, *, reason: str | None = None, details: Json | None = None) -> Json:
    """A metav1.Status, as the API server sends with every error."""
    status: Json = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details is not None:
        status["details"] = details
    return status


@dataclass
class Fault:
    """What the next `count` requests matching `match` ("METHOD /path") get instead of an answer."""

    kind: str  # "status", "hang" or "delay"
    count: int = 1
    status: int = 500
    message: str = ""
    retry_after: str | None = None
    seconds: float = 0.0
    match: str | None = None
    reason: str | None = None  # the Status reason when it is not the usual one for `status` (Conflict)

    def matches(self, request: web.Request) -> bool:
        return self.match is None or self.match in f"{request.method} {request.path}"


@dataclass(frozen=True)
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None = None

    def rbac(self) -> tuple[str, str, str] | None:
        """(apiGroup, resource, verb) as RBAC sees this request; None for an unknown path."""
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            return None
        if len(rest) >= 3 and rest[0] == "namespaces":
            rest = rest[2:]
        if not rest:
            return None
        resource, named = rest[0], len(rest) > 1
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(self.method)
        if verb is None:
            verb = "get" if named else "watch" if _truthy(self.query.get("watch")) else "list"
        return group, resource, verb


@dataclass
class _Watchers:
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0


class FakeKube:
    """The fake API server; `await start()` gives its URL."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], Json] = {}
        self.pods: dict[tuple[str, str], Json] = {}
        self.statefulsets: dict[tuple[str, str], Json] = {}
        # Never served: nothing of ours may read Secrets (a read would land in `unexpected`). They
        # are what kubelet would find when it mounts a pod's Secret volumes (missing_secrets).
        self.secrets: dict[tuple[str, str], Json] = {}
        self.cronjobs: dict[tuple[str, str], Json] = {}
        self.received: list[Json] = []  # the bodies of creates and replaces, exactly as sent
        self.events: list[Json] = []
        self.requests: list[Recorded] = []
        self.unexpected: list[str] = []
        self.faults: deque[Fault] = deque()
        self.resource_version = 1000
        self._history: list[tuple[int, str, Json]] = []  # (resourceVersion, type, Job) for watches
        self._compacted = 0  # watches from below this get 410 Gone
        self._watchers = _Watchers()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        batch = "/apis/batch/v1/namespaces/{ns}/jobs"
        app.router.add_post(batch, self._create_job)
        app.router.add_get(batch, self._list_jobs)
        app.router.add_get(batch + "/{name}", self._read_job)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_pods)
        app.router.add_post("/api/v1/namespaces/{ns}/events", self._create_event)
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}", self._read_statefulset)
        cronjobs = "/apis/batch/v1/namespaces/{ns}/cronjobs"
        app.router.add_post(cronjobs, self._create_cronjob)
        app.router.add_get(cronjobs + "/{name}", self._read_cronjob)
        app.router.add_put(cronjobs + "/{name}", self._replace_cronjob)
        app.router.add_route("*", "/{tail:.*}", self._unexpected)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        self._closing.set()
        self._wake(new_generation=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # --- knobs ------------------------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        message: str = "",
        retry_after: str | None = None,
        match: str | None = None,
        reason: str | None = None,
    ) -> None:
        """The next `count` matching requests are answered `status` with a Status object."""
        self.faults.append(Fault("status", count, status, message, retry_after, match=match, reason=reason))

    def hang_next(self, count: int = 1, *, match: str | None = None) -> None:
        """The next `count` matching requests get no answer at all (until the server closes)."""
        self.faults.append(Fault("hang", count, match=match))

    def delay_next(self, count: int, seconds: float, *, match: str | None = None) -> None:
        """The next `count` matching requests are answered normally, `seconds` late."""
        self.faults.append(Fault("delay", count, seconds=seconds, match=match))

    def expire_watches(self) -> None:
        """Compact history (as etcd does) and end every open watch: resuming one gets 410 Gone."""
        self.resource_version += 1
        self._compacted = self.resource_version
        self._history = [h for h in self._history if h[0] >= self._compacted]
        self._wake(new_generation=True)

    def add_statefulset(
        self, namespace: str, name: str, replicas: int | None, *, layout: str | None = "self-signed"
    ) -> Json:
        """A kamaji-etcd StatefulSet as its chart renders it, with the Secrets of its certificate
        layout ("self-signed" or "cert-manager"; None: a StatefulSet that mounts no Secret)."""
        spec: Json = {"serviceName": name, "selector": {"matchLabels": {"app": name}}}
        volumes: list[Json] = []
        if layout == "self-signed":  # templates/etcd_sts.yaml, the Secret the cfssl Jobs write
            volumes = [{"name": "certs", "secret": {"secretName": f"{name}-certs"}}]
            self.add_secret(namespace, f"{name}-certs", "ca.crt", "ca.key", "server.pem", "server-key.pem")
            self.add_secret(namespace, f"{name}-root-client-certs", "tls.crt", "tls.key")
        elif layout == "cert-manager":  # certManager.enabled: one Certificate per Secret
            sources = [
                {
                    "secret": {
                        "name": f"{name}-server-certs",
                        "items": [{"key": "tls.crt", "path": "server.pem"}],
                    }
                },
                {"secret": {"name": f"{name}-peer-certs", "items": [{"key": "tls.crt", "path": "peer.pem"}]}},
            ]
            volumes = [{"name": "certs", "projected": {"sources": sources}}]
            for suffix in ("ca", "server-certs", "peer-certs", "client-certs"):
                self.add_secret(namespace, f"{name}-{suffix}", "ca.crt", "tls.crt", "tls.key")
        elif layout is not None:
            raise ValueError(f"unknown layout {layout!r}")
        spec["template"] = {"spec": {"containers": [{"name": "etcd"}], "volumes": volumes}}
        if replicas is not None:
            spec["replicas"] = replicas
        count = 1 if replicas is None else replicas
        # Rolled out: what the StatefulSet controller reports once every replica runs the current spec.
        sts = {
            "kind": "StatefulSet",
            "apiVersion": "apps/v1",
            "metadata": {**self._new_metadata(namespace, name), "generation": 1},
            "spec": spec,
            "status": {
                "observedGeneration": 1,
                "replicas": count,
                "readyReplicas": count,
                "currentReplicas": count,
                "updatedReplicas": count,
                "currentRevision": f"{name}-1",
                "updateRevision": f"{name}-1",
            },
        }
        self.statefulsets[(namespace, name)] = sts
        return sts

    def add_secret(self, namespace: str, name: str, *keys: str) -> Json:
        secret = {
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": self._new_metadata(namespace, name),
            "data": dict.fromkeys(keys, "Zm9v"),
        }
        self.secrets[(namespace, name)] = secret
        return secret

    def missing_secrets(self, namespace: str, pod_spec: Json) -> list[str]:
        """What kubelet could not mount of the pod's Secret volumes: `name` or `name/key` ([] = starts)."""
        wanted: list[tuple[str, list[Json]]] = []
        for volume in pod_spec.get("volumes") or []:
            if "secret" in volume:
                wanted.append((volume["secret"]["secretName"], volume["secret"].get("items") or []))
            for source in (volume.get("projected") or {}).get("sources") or []:
                if "secret" in source:
                    wanted.append((source["secret"]["name"], source["secret"].get("items") or []))
        missing = []
        for name, items in wanted:
            secret = self.secrets.get((namespace, name))
            if secret is None:
                missing.append(name)
                continue
            missing += [f"{name}/{i['key']}" for i in items if i["key"] not in secret["data"]]
        return missing

    def add_pod(self, pod: Json) -> Json:
        metadata = pod["metadata"]
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("resourceVersion", self._next_rv())
        self.pods[(metadata["namespace"], metadata["name"])] = pod
        return pod

    def job(self, namespace: str, name: str) -> Json:
        return self.jobs[(namespace, name)]

    def start_job(self, namespace: str, name: str) -> Json:
        """What the Job controller does next: one pod, `active: 1`, a startTime."""
        job = self.jobs[(namespace, name)]
        uid = job["metadata"]["uid"]
        template = job["spec"]["template"]
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        pod = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": dict(template["metadata"]["labels"]),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "creationTimestamp": now_rfc3339(),
            },
            "spec": copy.deepcopy(template["spec"]),
            "status": {
                "phase": "Running",
                "startTime": now_rfc3339(),
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "started": True,
                        "state": {"running": {"startedAt": now_rfc3339()}},
                    }
                    for c in template["spec"]["containers"]
                ],
            },
        }
        self.add_pod(pod)
        job["status"] = {"active": 1, "ready": 1, "startTime": now_rfc3339(), "uncountedTerminatedPods": {}}
        self._changed("MODIFIED", job)
        return pod

    def finish_job(
        self, namespace: str, name: str, *, succeeded: bool = True, message: str | None = None
    ) -> Json:
        """The pod's container ends (leaving `message`) and the Job gets Complete or Failed."""
        job = self.jobs[(namespace, name)]
        uid = job["metadata"]["uid"]
        pods = [
            p for p in self.pods.values() if any(r["uid"] == uid for r in p["metadata"]["ownerReferences"])
        ]
        if not pods:
            pods = [self.start_job(namespace, name)]
        ended = now_rfc3339()
        for pod in pods:
            pod["status"]["phase"] = "Succeeded" if succeeded else "Failed"
            for status in pod["status"]["containerStatuses"]:
                terminated: Json = {
                    "exitCode": 0 if succeeded else 1,
                    "reason": "Completed" if succeeded else "Error",
                    "startedAt": status["state"].get("running", {}).get("startedAt", ended),
                    "finishedAt": ended,
                    "containerID": f"containerd://{uuid.uuid4().hex}",
                }
                if message is not None:
                    terminated["message"] = message
                status["state"] = {"terminated": terminated}
                status["ready"] = False
        start = job["status"].get("startTime", ended)
        if succeeded:
            job["status"] = {
                "startTime": start,
                "completionTime": ended,
                "succeeded": 1,
                "ready": 0,
                "terminating": 0,
                "uncountedTerminatedPods": {},
                "conditions": [
                    _condition(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                        ended,
                    ),
                    _condition(
                        "Complete", "CompletionsReached", "Reached expected number of succeeded pods", ended
                    ),
                ],
            }
        else:
            job["status"] = {
                "startTime": start,
                "failed": 1,
                "ready": 0,
                "terminating": 0,
                "uncountedTerminatedPods": {},
                "conditions": [
                    _condition(
                        "FailureTarget",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                        ended,
                    ),
                    _condition(
                        "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit", ended
                    ),
                ],
            }
        self._changed("MODIFIED", job)
        return job

    def delete_job(self, namespace: str, name: str) -> None:
        """What the TTL controller does when the cooldown ends (pods go with the Job)."""
        job = self.jobs.pop((namespace, name))
        uid = job["metadata"]["uid"]
        for key, pod in list(self.pods.items()):
            if any(r["uid"] == uid for r in pod["metadata"].get("ownerReferences", [])):
                del self.pods[key]
        self._changed("DELETED", job)

    # --- the server ---------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        recorded = Recorded(
            request.method, request.path, dict(request.query), request.headers.get("Authorization")
        )
        self.requests.append(recorded)
        for fault in self.faults:
            if fault.matches(request):
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
                if fault.kind == "hang":
                    await self._closing.wait()
                    raise web.HTTPServiceUnavailable
                if fault.kind == "delay":
                    # Received in full first, as by the API server: the answer is late, not the
                    # request, so a client that gives up meanwhile still gets its object created.
                    await request.read()
                    await asyncio.sleep(fault.seconds)
                    break
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                message = fault.message or f"injected {fault.status}"
                status = status_object(fault.status, message, reason=fault.reason)
                return _json(status, fault.status, headers)
        return await handler(request)

    async def _unexpected(self, request: web.Request) -> web.Response:
        self.unexpected.append(f"{request.method} {request.path_qs}")
        return _json(status_object(404, "the server could not find the requested resource"), 404)

    async def _create_job(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        dry_run = request.query.get("dryRun")
        if dry_run not in (None, "All"):
            return _json(status_object(400, f"invalid dry run option: {dry_run}"), 400)
        body = await request.json()
        self.received.append(copy.deepcopy(body))
        # From here to the insert there is no await: the name check and the insert are atomic.
        metadata = body.get("metadata") or {}
        name = metadata.get("name", "")
        problems = []
        if body.get("apiVersion") != "batch/v1" or body.get("kind") != "Job":
            problems.append("kind/apiVersion: must be batch/v1 Job")
        if not _DNS_LABEL.match(name) or len(name) > 63:
            problems.append(f"metadata.name: Invalid value: {name!r}")
        if metadata.get("namespace", namespace) != namespace:
            return _json(
                status_object(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                ),
                400,
            )
        if problems:
            details = {"name": name, "group": "batch", "kind": "Job"}
            message = f'Job.batch "{name}" is invalid: ' + "; ".join(problems)
            return _json(status_object(422, message, details=details), 422)
        if (namespace, name) in self.jobs:
            details = {"name": name, "group": "batch", "kind": "jobs"}
            return _json(status_object(409, f'jobs.batch "{name}" already exists', details=details), 409)
        job = copy.deepcopy(body)
        uid = str(uuid.uuid4())
        job["metadata"] = {
            **metadata,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": str(self.resource_version + 1),
            "generation": 1,
            "creationTimestamp": now_rfc3339(),
        }
        spec = job["spec"]
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "controller-uid": uid,
                "job-name": name,
            }
        )
        job["status"] = {}
        if dry_run == "All":
            return _json(job, 201)
        self.jobs[(namespace, name)] = job
        self._changed("ADDED", job)
        return _json(job, 201)

    def _read(
        self, store: dict[tuple[str, str], Json], request: web.Request, group: str, kind: str
    ) -> web.Response:
        """GET of one object: the object, or 404 NotFound as the API server words it."""
        namespace, name = request.match_info["ns"], request.match_info["name"]
        found = store.get((namespace, name))
        if found is None:
            details = {"name": name, "group": group, "kind": kind}
            return _json(status_object(404, f'{kind}.{group} "{name}" not found', details=details), 404)
        return _json(found, 200)

    async def _read_job(self, request: web.Request) -> web.Response:
        return self._read(self.jobs, request, "batch", "jobs")

    async def _list_jobs(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["ns"]
        selector = _parse_selector(request.query.get("labelSelector", ""))
        if selector is None:
            self.unexpected.append(f"unsupported labelSelector: {request.query['labelSelector']}")
            return _json(status_object(400, "unable to parse requirement"), 400)
        if _truthy(request.query.get("watch")):
            return await self._watch_jobs(request, namespace, selector)
        items = [
            _without_type(j)
            for (ns, _), j in sorted(self.jobs.items())
            if ns == namespace and _matches(selector, j)
        ]
        metadata = {"resourceVersion": str(self.resource_version)}
        return _json({"kind": "JobList", "apiVersion": "batch/v1", "metadata": metadata, "items": items}, 200)

    async def _watch_jobs(
        self, request: web.Request, namespace: str, selector: list[tuple[str, str, str]]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        if since and since < self._compacted:
            expired = status_object(
                410, f"too old resource version: {since} ({self._compacted})", reason="Expired"
            )
            await response.write(json.dumps({"type": "ERROR", "object": expired}).encode() + b"\n")
            return response
        if not since:  # "any": synthetic ADDED for what exists, then changes
            for (ns, _), job in sorted(self.jobs.items()):
                if ns == namespace and _matches(selector, job):
                    await response.write(json.dumps({"type": "ADDED", "object": job}).encode() + b"\n")
            since = self.resource_version
        generation = self._watchers.generation
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while not self._closing.is_set() and generation == self._watchers.generation:
                # Taken before the scan: a change while a write awaits wakes the next wait at once.
                wakeup = self._watchers.wakeup
                for version, kind, job in list(self._history):
                    if version > since:
                        since = version
                        if job["metadata"]["namespace"] == namespace and _matches(selector, job):
                            await response.write(json.dumps({"type": kind, "object": job}).encode() + b"\n")
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except TimeoutError:
                    break
        except ConnectionResetError:
            pass  # the watcher went away (its task was cancelled): nobody to tell
        return response

    async def _list_pods(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        selector = _parse_selector(request.query.get("labelSelector", ""))
        if selector is None or _truthy(request.query.get("watch")):
            self.unexpected.append(f"unsupported pod list: {request.path_qs}")
            return _json(status_object(400, "unsupported"), 400)
        items = [
            _without_type(p)
            for (ns, _), p in sorted(self.pods.items())
            if ns == namespace and _matches(selector, p)
        ]
        metadata = {"resourceVersion": str(self.resource_version)}
        return _json({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}, 200)

    async def _create_event(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        event = await request.json()
        metadata = event.setdefault("metadata", {})
        if (
            event.get("kind") != "Event"
            or not event.get("involvedObject")
            or event.get("type")
            not in (
                "Normal",
                "Warning",
            )
        ):
            return _json(status_object(422, "Event is invalid"), 422)
        if "name" not in metadata:
            metadata["name"] = metadata.get("generateName", "") + uuid.uuid4().hex[:5]
        metadata.update(namespace=namespace, uid=str(uuid.uuid4()), resourceVersion=self._next_rv())
        metadata["creationTimestamp"] = now_rfc3339()
        self.events.append(event)
        return _json(event, 201)

    async def _read_statefulset(self, request: web.Request) -> web.Response:
        return self._read(self.statefulsets, request, "apps", "statefulsets")

    # --- CronJobs (render cronjob --apply) ---------------------------------------------------------

    def add_cronjob(self, manifest: Json) -> Json:
        """A CronJob that already exists (say, the one kamaji-etcd's defrag.sh applied)."""
        cronjob = copy.deepcopy(manifest)
        metadata = cronjob["metadata"]
        cronjob["metadata"] = {**metadata, **self._new_metadata(metadata["namespace"], metadata["name"])}
        cronjob["metadata"]["generation"] = 1
        cronjob.setdefault("status", {})
        self.cronjobs[(metadata["namespace"], metadata["name"])] = cronjob
        return cronjob

    def _cronjob_problems(self, body: Json, namespace: str) -> web.Response | None:
        """The API server's answer to a CronJob body it refuses; None for one it accepts."""
        metadata = body.get("metadata") or {}
        name = metadata.get("name", "")
        if metadata.get("namespace", namespace) != namespace:
            message = "the namespace of the provided object does not match the namespace sent on the request"
            return _json(status_object(400, message), 400)
        problems = []
        if body.get("apiVersion") != "batch/v1" or body.get("kind") != "CronJob":
            problems.append("kind/apiVersion: must be batch/v1 CronJob")
        if not _DNS_LABEL.match(name) or len(name) > 52:
            problems.append(f"metadata.name: Invalid value: {name!r}: must be no more than 52 characters")
        if not (body.get("spec") or {}).get("schedule"):
            problems.append("spec.schedule: Required value")
        if not problems:
            return None
        details = {"name": name, "group": "batch", "kind": "CronJob"}
        message = f'CronJob.batch "{name}" is invalid: ' + "; ".join(problems)
        return _json(status_object(422, message, details=details), 422)

    async def _create_cronjob(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        body = await request.json()
        self.received.append(copy.deepcopy(body))
        if (refused := self._cronjob_problems(body, namespace)) is not None:
            return refused
        name = body["metadata"]["name"]
        if (namespace, name) in self.cronjobs:
            details = {"name": name, "group": "batch", "kind": "cronjobs"}
            return _json(status_object(409, f'cronjobs.batch "{name}" already exists', details=details), 409)
        cronjob = copy.deepcopy(body)
        cronjob["metadata"] = {**body["metadata"], **self._new_metadata(namespace, name), "generation": 1}
        cronjob["spec"].setdefault("suspend", False)
        cronjob["status"] = {}
        self.cronjobs[(namespace, name)] = cronjob
        return _json(cronjob, 201)

    async def _read_cronjob(self, request: web.Request) -> web.Response:
        return self._read(self.cronjobs, request, "batch", "cronjobs")

    async def _replace_cronjob(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["ns"], request.match_info["name"]
        body = await request.json()
        self.received.append(copy.deepcopy(body))
        if (refused := self._cronjob_problems(body, namespace)) is not None:
            return refused
        if body["metadata"]["name"] != name:
            given = body["metadata"]["name"]
            message = f"the name of the object ({given}) does not match the name on the URL ({name})"
            return _json(status_object(400, message), 400)
        existing = self.cronjobs.get((namespace, name))
        if existing is None:
            details = {"name": name, "group": "batch", "kind": "cronjobs"}
            return _json(status_object(404, f'cronjobs.batch "{name}" not found', details=details), 404)
        version = body["metadata"].get("resourceVersion")
        if not version:
            message = (
                f'CronJob.batch "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                "must be specified for an update"
            )
            return _json(status_object(422, message), 422)
        if version != existing["metadata"]["resourceVersion"]:
            message = (
                f'Operation cannot be fulfilled on cronjobs.batch "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )
            details = {"name": name, "group": "batch", "kind": "cronjobs"}
            return _json(status_object(409, message, reason="Conflict", details=details), 409)
        cronjob = copy.deepcopy(body)
        old = existing["metadata"]
        cronjob["metadata"] = {
            **body["metadata"],
            "uid": old["uid"],
            "creationTimestamp": old["creationTimestamp"],
            "resourceVersion": self._next_rv(),
            "generation": old.get("generation", 1) + 1,
        }
        cronjob["spec"].setdefault("suspend", False)
        cronjob["status"] = existing.get("status", {})
        self.cronjobs[(namespace, name)] = cronjob
        return _json(cronjob, 200)

    # --- helpers ----------------------------------------------------------------------------------

    def _new_metadata(self, namespace: str, name: str) -> Json:
        return {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": self._next_rv(),
            "creationTimestamp": now_rfc3339(),
        }

    def _next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _changed(self, kind: str, job: Json) -> None:
        job["metadata"]["resourceVersion"] = self._next_rv()
        self._history.append((self.resource_version, kind, copy.deepcopy(job)))
        self._wake()

    def _wake(self, *, new_generation: bool = False) -> None:
        old = self._watchers
        self._watchers = _Watchers(generation=old.generation + (1 if new_generation else 0))
        old.wakeup.set()


def _condition(kind: str, reason: str, message: str, at: str) -> Json:
    return {
        "type": kind,
        "status": "True",
        "lastProbeTime": at,
        "lastTransitionTime": at,
        "reason": reason,
        "message": message,
    }


def _json(data: Json, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _without_type(obj: Json) -> Json:
    """List items carry no kind/apiVersion, as the API server sends them."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _truthy(value: str | None) -> bool:
    """A query flag as the API server reads it (Go's strconv.ParseBool; kubernetes_asyncio sends True)."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _parse_selector(text: str) -> list[tuple[str, str, str]] | None:
    """`a=b,c!=d,e,!f` as (key, op, value); None for syntax the fake does not support (set-based)."""
    terms = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if match := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", part):
            key, op, value = match.groups()
            terms.append((key, "!=" if op == "!=" else "=", value))
        elif match := re.fullmatch(r"(!?)([\w./-]+)", part):
            terms.append((match.group(2), "!" if match.group(1) else "exists", ""))
        else:
            return None
    return terms


def _matches(selector: list[tuple[str, str, str]], obj: Json) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, value in selector:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!" and key in labels:
            return False
    return True
