"""The defrag Job as data: its name, its manifest, how to read how it ended. Pure: no I/O here.

The Job is the lock. Its name is fixed per cluster (`etcd-autodefrag-<cluster>`), so the API server
lets exactly one exist at a time, across service restarts and replicas: a second create answers
409 AlreadyExists. `ttlSecondsAfterFinished` is the cooldown: Kubernetes deletes the finished Job
that long after it ended, and only then can the next one be created.
https://kubernetes.io/docs/concepts/workloads/controllers/ttlafterfinished/

The Job is handed its cluster as the service resolved it, in its args (`defrag --cluster-json`,
exporter/core/handoff.py): it reads no config file and needs no ConfigMap (docs/run-handoff.md).

Files in the container, the same for every variant (exporter/kubernetes/variants.py says where the
TLS files come from and where the pod runs):

    /etc/etcd-autodefrag/tls/ca.crt    CA bundle          -> --cacert
    /etc/etcd-autodefrag/tls/tls.crt   client certificate -> --cert
    /etc/etcd-autodefrag/tls/tls.key   client key         -> --key
    /tmp                               emptyDir (the root file system is read-only; the host lock lives here)
    /dev/termination-log               the JSON report (--report-file), read back by kube.watch_jobs

The flags override the cluster's `tls` paths (the service's own files), keeping its server name.
One function, `defrag_pod_template`, builds this pod for the webhook's Job and for the CronJob of
`etcd-autodefrag render cronjob` (exporter/kubernetes/cronjob.py), which passes the endpoints and
rule as flags. The report goes out through the container's
termination message
(https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/), which
Kubernetes caps at 4096 bytes; `RunReport.summary_json` keeps it under that.

Security: every variant runs with a read-only root file system, no capabilities, no privilege
escalation, the RuntimeDefault seccomp profile and no service account token (the Job needs no
Kubernetes API access). All but kubeadm run as the non-root user 65532 and meet the "restricted"
Pod Security Standard. kubeadm writes its etcd client key as root-owned mode 0600 on the
control-plane node, so that variant runs as uid 0 - still without any capability, so root can read
files it owns and nothing more (no CAP_DAC_OVERRIDE) - on the host network (kubeadm's etcd listens on
the node addresses) and needs a namespace whose Pod Security level is "privileged" (hostPath,
hostNetwork). It mounts the three files it needs one by one, never the directory that holds the CA key.
"""

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, assert_never
from urllib.parse import urlsplit

from exporter import __version__
from exporter.config.settings import ClusterConfig, ExecutorSettings, KubernetesTarget
from exporter.core.cooldown import cooldown_seconds as cluster_cooldown_seconds
from exporter.core.handoff import DEFAULT_RUN_SETTINGS, RunSettings, run_args
from exporter.core.launches import LaunchOutcome, LaunchResult, Trigger
from exporter.core.names import is_dns_label
from exporter.kubernetes.kamaji import SecretLayout
from exporter.kubernetes.variants import TlsSource, spec_of

DEFAULT_IMAGE = f"ghcr.io/etcd-autodefrag/etcd-autodefrag:{__version__.replace('+', '-')}"
# The service-wide default (executor.cooldown_seconds), for `render job` and tests that build a Job alone.
DEFAULT_COOLDOWN_SECONDS: float = ExecutorSettings.model_fields["cooldown_seconds"].default
# Room for the engine to report its own deadline before Kubernetes kills the pod.
DEADLINE_MARGIN_SECONDS = 120
TERMINATION_MESSAGE_MAX_BYTES = 4096  # kubelet's per-container limit

NAME_PREFIX = "etcd-autodefrag-"
CONTAINER_NAME = "defrag"
APP_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
CLUSTER_LABEL = "etcd-autodefrag.io/cluster"
ALERTNAME_LABEL = "etcd-autodefrag.io/alertname"
DRY_RUN_LABEL = "etcd-autodefrag.io/dry-run"
APP = "etcd-autodefrag"
COMPONENT = "defrag"
JOB_SELECTOR = f"{APP_LABEL}={APP},{COMPONENT_LABEL}={COMPONENT}"

TLS_DIR = "/etc/etcd-autodefrag/tls"
CA_FILE = f"{TLS_DIR}/ca.crt"
CERT_FILE = f"{TLS_DIR}/tls.crt"
KEY_FILE = f"{TLS_DIR}/tls.key"
TERMINATION_LOG = "/dev/termination-log"
KUBEADM_PKI = "/etc/kubernetes/pki/etcd"
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"
NONROOT_ID = 65532
SECRET_FILE_MODE = 0o440  # owner root, group fsGroup: readable by the non-root user through its group
ANNOTATION_MAX_CHARS = 1024

_LABEL_INVALID = re.compile(r"[^A-Za-z0-9._-]+")
_LABEL_EDGES = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")
_DASHES = re.compile(r"-{2,}")

Json = dict[str, Any]


class JobConfigError(ValueError):
    """The cluster's `kubernetes` section cannot make a Job; the message names the field."""


def job_name(cluster_name: str) -> str:
    """The one Job name for a cluster: `etcd-autodefrag-<cluster>` (the lock)."""
    name = NAME_PREFIX + cluster_name
    if not is_dns_label(name):
        raise ValueError(f"cluster name {cluster_name!r} cannot name a Job")
    return name


def sanitize_label_value(text: str, *, fallback: str = "unknown") -> str:
    """`text` as a valid label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    value = _LABEL_EDGES.sub("", _DASHES.sub("-", _LABEL_INVALID.sub("-", ascii_text)))
    value = _LABEL_EDGES.sub("", value[:63])
    return value or fallback


def resolved_image(cluster: ClusterConfig, default: str) -> str:
    """The cluster's own image when it sets one, else the service-wide default."""
    target = cluster.kubernetes
    return target.image if target is not None and target.image else default


def build_job(
    cluster: ClusterConfig,
    *,
    image: str,
    trigger: Trigger,
    cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS,
    run_settings: RunSettings = DEFAULT_RUN_SETTINGS,
) -> Json:
    """The batch/v1 Job that defragments `cluster` once (`image` and `cooldown_seconds` are defaults).

    Its ttlSecondsAfterFinished is the cluster's cooldown (exporter/core/cooldown.py), so the API
    server refuses the next Job for exactly as long as the webhook's decision skips as cooling down.

    Raises JobConfigError when the cluster has no usable `kubernetes` section. The side effect
    (creating it) is kube.create_job's.
    """
    target = cluster.kubernetes
    if target is None:
        raise JobConfigError(f"cluster {cluster.name}: no kubernetes section, so no Job can run it")
    problems = target.problems(endpoints=cluster.endpoints, deadline_seconds=cluster.deadline_seconds)
    if problems:
        raise JobConfigError(f"cluster {cluster.name}: " + "; ".join(problems))
    name = job_name(cluster.name)
    labels = {
        **target.labels,
        APP_LABEL: APP,
        COMPONENT_LABEL: COMPONENT,
        MANAGED_BY_LABEL: APP,
        CLUSTER_LABEL: cluster.name,
        ALERTNAME_LABEL: sanitize_label_value(trigger.alertname),
        DRY_RUN_LABEL: "true" if trigger.dry_run else "false",
    }
    annotations = {**target.annotations, **_trigger_annotations(trigger)}
    ttl = round(cluster_cooldown_seconds(cluster, cooldown_seconds))
    deadline = target.active_deadline_seconds or round(cluster.deadline_seconds) + DEADLINE_MARGIN_SECONDS
    if cluster.discovers_endpoints and not cluster.endpoints:
        # The Job has no API access: it runs on the URLs the service read from the API.
        raise JobConfigError(
            f"cluster {cluster.name}: its endpoints have not been discovered from the Kubernetes API yet"
        )
    if spec_of(target.variant).tls is TlsSource.KAMAJI_SECRETS and target.secret_layout is SecretLayout.AUTO:
        # The pod mounts Secrets by name, so the layout must be known: the service reads it from
        # the StatefulSet at start-up (kube.discover); `render job` takes --secret-layout.
        raise JobConfigError(
            f"cluster {cluster.name}: kamaji-etcd {target.etcd_name}'s certificate layout has not been "
            "read from its StatefulSet yet (kubernetes.secret_layout: auto)"
        )
    # The cluster as the service resolved it (exporter/core/handoff.py): no ConfigMap to drift from it.
    args = [*run_args(cluster, run_settings), "--output", "json", "--report-file", TERMINATION_LOG]
    if cluster.tls is not None and cluster.tls.server_name and _tls(target).flags:
        args += ["--server-name", cluster.tls.server_name]  # the TLS flags replace the whole `tls`
    if trigger.dry_run:
        args.append("--dry-run")
    template = defrag_pod_template(target, image=resolved_image(cluster, image), args=args, labels=labels)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": target.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            # One attempt: a failed defrag needs a person or the next alert, not a blind retry.
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": ttl,
            "template": template,
        },
    }


def defrag_pod_template(
    target: KubernetesTarget,
    *,
    image: str,
    args: Sequence[str],
    labels: Mapping[str, str],
) -> Json:
    """The pod template of one defrag run, `etcd-autodefrag <args> <TLS flags>`, for a Job or a CronJob.

    The TLS flags and files follow `target.variant` (the layout in the module docstring). The args
    carry everything else the run needs (the Job: `--cluster-json`; the CronJob: `--endpoints` and
    `--rule`): the pod mounts no config.
    """
    tls = _tls(target)
    placement = spec_of(target.variant).placement
    container: Json = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["etcd-autodefrag"],
        "args": [*args, *tls.flags],
        "resources": {kind: dict(amounts) for kind, amounts in target.resources.items()},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *tls.mounts],
    }
    pod_spec: Json = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(root=placement.run_as_root),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}, *tls.volumes],
    }
    if target.service_account is not None:
        pod_spec["serviceAccountName"] = target.service_account
    if placement.host_network:  # kubeadm: etcd listens on the node addresses
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if placement.control_plane_nodes:  # kubeadm: the certificate is a file on those nodes
        pod_spec["nodeSelector"] = {CONTROL_PLANE: ""}
        pod_spec["tolerations"] = [{"key": CONTROL_PLANE, "operator": "Exists", "effect": "NoSchedule"}]
    pod_metadata: Json = {"labels": dict(labels)}
    if target.annotations:
        pod_metadata["annotations"] = dict(target.annotations)
    return {"metadata": pod_metadata, "spec": pod_spec}


def _trigger_annotations(trigger: Trigger) -> dict[str, str]:
    values = {
        "etcd-autodefrag.io/alertname": trigger.alertname,
        "etcd-autodefrag.io/group-key": trigger.group_key,
        "etcd-autodefrag.io/fingerprint": trigger.fingerprint,
        "etcd-autodefrag.io/receiver": trigger.receiver,
        "etcd-autodefrag.io/fired-at": trigger.fired_at.isoformat() if trigger.fired_at else "",
    }
    return {key: value[:ANNOTATION_MAX_CHARS] for key, value in values.items() if value}


def _pod_security(*, root: bool) -> Json:
    if root:
        return {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    return {
        "runAsNonRoot": True,
        "runAsUser": NONROOT_ID,
        "runAsGroup": NONROOT_ID,
        "fsGroup": NONROOT_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


@dataclass(frozen=True)
class _Tls:
    volumes: list[Json]
    mounts: list[Json]
    flags: list[str]


def _tls(target: KubernetesTarget) -> _Tls:
    """Volumes that put the client TLS files at TLS_DIR, and the flags that point the CLI there."""
    dir_mount = [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}]
    both = ["--cacert", CA_FILE, "--cert", CERT_FILE, "--key", KEY_FILE]
    match spec_of(target.variant).tls:
        case TlsSource.KAMAJI_SECRETS:
            secrets = target.kamaji_secrets  # exporter/kubernetes/kamaji.py: the chart's two layouts
            files = [
                (secrets.ca_secret, secrets.ca_key, "ca.crt"),
                (secrets.client_secret, secrets.cert_key, "tls.crt"),
                (secrets.client_secret, secrets.key_key, "tls.key"),
            ]
            return _Tls([_projected(files)], dir_mount, both)
        case TlsSource.TLS_SECRET:
            if target.tls_secret is None:
                return _Tls([], [], [])
            ca_secret = target.ca_secret or target.tls_secret
            files = [(ca_secret, target.ca_key, "ca.crt")]
            flags = ["--cacert", CA_FILE]
            if target.cert_key is not None and target.key_key is not None:
                files += [
                    (target.tls_secret, target.cert_key, "tls.crt"),
                    (target.tls_secret, target.key_key, "tls.key"),
                ]
                flags = both
            if ca_secret != target.tls_secret:  # e.g. a Kamaji DataStore's `<etcd>-certs` and client Secret
                return _Tls([_projected(files)], dir_mount, flags)
            items = [{"key": key, "path": path} for _, key, path in files]
            secret = {"secretName": target.tls_secret, "items": items, "defaultMode": SECRET_FILE_MODE}
            return _Tls([{"name": "tls", "secret": secret}], dir_mount, flags)
        case TlsSource.NODE_PKI:
            files = [
                ("etcd-ca", f"{KUBEADM_PKI}/ca.crt", CA_FILE),
                ("etcd-client-cert", f"{KUBEADM_PKI}/healthcheck-client.crt", CERT_FILE),
                ("etcd-client-key", f"{KUBEADM_PKI}/healthcheck-client.key", KEY_FILE),
            ]
            volumes = [{"name": name, "hostPath": {"path": host, "type": "File"}} for name, host, _ in files]
            mounts = [{"name": name, "mountPath": path, "readOnly": True} for name, _, path in files]
            return _Tls(volumes, mounts, both)
        case _ as unreachable:
            assert_never(unreachable)


def _projected(files: Sequence[tuple[str, str, str]]) -> Json:
    """One `tls` volume with each (Secret, key, path), Secrets in first-use order."""
    names = list(dict.fromkeys(secret for secret, _, _ in files))
    sources = [
        {
            "secret": {
                "name": name,
                "items": [{"key": key, "path": path} for secret, key, path in files if secret == name],
            }
        }
        for name in names
    ]
    return {"name": "tls", "projected": {"sources": sources, "defaultMode": SECRET_FILE_MODE}}


def parse_termination_message(text: str | None) -> Json | None:
    """The report a Job's container left as its termination message, or None if there is none."""
    if not text or not text.strip():
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# --- what an existing Job means for a launch --------------------------------------------------


def finished_condition(job: Json) -> tuple[bool, Json] | None:
    """(succeeded, condition) once the Job is Complete or Failed, else None."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"] == "Complete", condition
    return None


def existing_job_launch(job: Json) -> LaunchResult:
    """Why a create answered 409: the Job of that name is running, cooling down, or not ours."""
    metadata = job.get("metadata", {})
    name = metadata.get("name", "")
    labels = metadata.get("labels") or {}
    if labels.get(APP_LABEL) != APP or labels.get(COMPONENT_LABEL) != COMPONENT:
        return LaunchResult(
            False,
            name,
            f"Job {name} exists but etcd-autodefrag did not create it; no run for this cluster "
            "until someone deletes it",
            LaunchOutcome.NAME_TAKEN,
        )
    if metadata.get("deletionTimestamp"):
        return LaunchResult(
            False, name, f"cooling down: Job {name} is being deleted", LaunchOutcome.COOLING_DOWN
        )
    finished = finished_condition(job)
    if finished is None:
        started = job.get("status", {}).get("startTime")
        since = f"started {started}" if started else f"created {metadata.get('creationTimestamp', '?')}"
        return LaunchResult(
            False, name, f"already running: Job {name} ({since})", LaunchOutcome.ALREADY_RUNNING
        )
    succeeded, condition = finished
    ended = condition.get("lastTransitionTime") or job.get("status", {}).get("completionTime")
    ttl = job.get("spec", {}).get("ttlSecondsAfterFinished")
    how = "succeeded" if succeeded else "failed"
    if ttl is None:
        until = "it has no ttlSecondsAfterFinished: delete it to allow the next run"
    elif (ended_at := _parse_time(ended)) is not None:
        until = f"Kubernetes removes it at {_format_time(ended_at + timedelta(seconds=ttl))}"
    else:
        until = f"Kubernetes removes it {ttl}s after it ended"
    return LaunchResult(
        False, name, f"cooling down: Job {name} {how} at {ended}; {until}", LaunchOutcome.COOLING_DOWN
    )


# --- how a finished Job ended --------------------------------------------------------------------


@dataclass(frozen=True)
class JobOutcome:
    """One finished defrag Job: did it succeed, and the report its container left."""

    cluster: str
    job_name: str
    succeeded: bool
    report: Json | None
    started_at: datetime | None
    finished_at: datetime | None
    namespace: str = ""
    uid: str = ""
    reason: str = ""  # the condition's reason, e.g. BackoffLimitExceeded or DeadlineExceeded


def job_outcome(job: Json, pods: Sequence[Json]) -> JobOutcome | None:
    """How a Job ended, with the report from its pod's termination message; None while it runs."""
    finished = finished_condition(job)
    if finished is None:
        return None
    succeeded, condition = finished
    metadata = job.get("metadata", {})
    status = job.get("status", {})
    uid = metadata.get("uid", "")
    message = None
    latest = ""
    for pod in pods:
        owners = {ref.get("uid") for ref in pod.get("metadata", {}).get("ownerReferences") or []}
        if uid and uid not in owners:
            continue  # a pod of an earlier Job of the same name
        for container in pod.get("status", {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if container.get("name") != CONTAINER_NAME or not terminated:
                continue
            if terminated.get("finishedAt", "") >= latest:
                latest = terminated.get("finishedAt", "")
                message = terminated.get("message")
    return JobOutcome(
        cluster=(metadata.get("labels") or {}).get(CLUSTER_LABEL, ""),
        job_name=metadata.get("name", ""),
        succeeded=succeeded,
        report=parse_termination_message(message),
        started_at=_parse_time(status.get("startTime")),
        finished_at=_parse_time(condition.get("lastTransitionTime") or status.get("completionTime")),
        namespace=metadata.get("namespace", ""),
        uid=uid,
        reason=condition.get("reason", ""),
    )


@dataclass(frozen=True)
class RunningJob:
    """A defrag Job that has not finished: its cluster's run is in flight."""

    cluster: str
    job_name: str
    uid: str
    started_at: datetime | None


def running_job(job: Json) -> RunningJob | None:
    """The Job as a run in flight: not finished and not being deleted; None otherwise.

    A Job being deleted (its TTL ran out, or a person deletes it) launches no more Pods: its run
    is over, whether or not it finished.
    """
    metadata = job.get("metadata", {})
    if finished_condition(job) is not None or metadata.get("deletionTimestamp"):
        return None
    status = job.get("status", {})
    return RunningJob(
        cluster=(metadata.get("labels") or {}).get(CLUSTER_LABEL, ""),
        job_name=metadata.get("name", ""),
        uid=metadata.get("uid", ""),
        started_at=_parse_time(status.get("startTime") or metadata.get("creationTimestamp")),
    )


def build_event(
    job: Json,
    *,
    reason: str,
    message: str,
    type: Literal["Normal", "Warning"],
    now: datetime,
    reporting_instance: str,
) -> Json:
    """A core/v1 Event about `job` (a manifest or a Job read from the API)."""
    metadata = job.get("metadata", {})
    involved = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": metadata["name"],
        "namespace": metadata["namespace"],
    }
    if metadata.get("uid"):
        involved["uid"] = metadata["uid"]
    stamp = _format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:ANNOTATION_MAX_CHARS],
        "type": type,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": APP},
        "reportingComponent": APP,
        "reportingInstance": reporting_instance,
    }


# --- discovery --------------------------------------------------------------------------------------


def kubeadm_endpoints(pod_list: Json) -> list[str]:
    """Client URLs of kubeadm's static etcd pods: `--advertise-client-urls`, else https://<hostIP>:2379."""
    endpoints: list[str] = []
    pods = sorted(pod_list.get("items") or [], key=lambda p: p.get("metadata", {}).get("name", ""))
    for pod in pods:
        if (pod.get("metadata", {}).get("labels") or {}).get("component") != "etcd":
            continue
        urls = _advertised_client_urls(pod.get("spec", {}).get("containers") or [])
        if not urls and (host_ip := pod.get("status", {}).get("hostIP")):
            urls = [f"https://[{host_ip}]:2379" if ":" in host_ip else f"https://{host_ip}:2379"]
        endpoints += [url for url in urls if url not in endpoints]
    return endpoints


def _advertised_client_urls(containers: Sequence[Mapping[str, Any]]) -> list[str]:
    flag = "--advertise-client-urls"
    for container in containers:
        words = [*(container.get("command") or []), *(container.get("args") or [])]
        for i, word in enumerate(words):
            value = None
            if word.startswith(flag + "="):
                value = word.removeprefix(flag + "=")
            elif word == flag and i + 1 < len(words):
                value = words[i + 1]
            if value is not None:
                urls = [u.strip().rstrip("/") for u in value.split(",")]
                return [u for u in urls if urlsplit(u).scheme in ("http", "https")]
    return []


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, as Kubernetes writes times (a naive time is taken as UTC)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
