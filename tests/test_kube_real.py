"""The Kubernetes side against a real kube-apiserver and kube-controller-manager.

The control plane is tests/kube_control_plane.py's.

The service runs as users run it: `etcd-autodefrag serve --config FILE` in its own process, with the
kubernetes executor, authenticating as its own ServiceAccount (a token from the TokenRequest API)
bound by the Roles the overlays ship. Alerts are posted to its webhook as Alertmanager posts them.
The test acts as the kubelet (StandInKubelet); the Job, TTL-after-finished and garbage-collector
controllers are the real ones. tests/fake_kube.py keeps the faults a real server cannot be made to
produce on demand (500s, 429s, hangs, dropped watches); tests/test_kube.py uses it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_harness import EtcdCluster
from kube_control_plane import ControlPlane, StandInKubelet, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from exporter.config.settings import ClusterConfig
from exporter.core.handoff import cluster_from_json
from exporter.core.launches import LaunchOutcome, Trigger
from exporter.kubernetes import api as kube
from exporter.kubernetes.jobs import build_job

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = sorted(p for p in (ROOT / "deploy" / "overlays").iterdir() if (p / "kustomization.yaml").exists())
SERVICE_NAMESPACE = "etcd-autodefrag"
SERVICE_ACCOUNT = "etcd-autodefrag"
TOKEN = "kube-real-webhook-token"
COOLDOWN_SECONDS = 3  # ttlSecondsAfterFinished of the test clusters' Jobs, and the service's cooldown
TIMEOUT = 60.0  # for anything the controllers do; generous for a busy 2-CPU machine
IMAGE = "registry.invalid/etcd-autodefrag:test"  # never pulled: no kubelet runs
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}
# Namespaces that the plain and talos variants' Jobs run in; they get the shipped Role (the kamaji
# overlay's, moved there), as a user of those variants would.
PLAIN_NAMESPACE = "etcd-plain"
TALOS_NAMESPACE = "etcd-talos"


def report(result: str = "success", reclaimed: int = 5 * 1024 * 1024, reason: str = "") -> str:
    """The termination message a defrag run leaves (RunReport.summary_json's shape)."""
    return json.dumps({"result": result, "reclaimed_bytes": reclaimed, "reason": reason, "members": []})


# --- the deployment -------------------------------------------------------------------------------


def shipped_role(namespace: str) -> dict[str, Any]:
    """The Role of deploy/overlays/kamaji/rbac.yaml (the one the service is bound by), in `namespace`."""
    documents = list(yaml.safe_load_all((ROOT / "deploy/overlays/kamaji/rbac.yaml").read_text()))
    (role,) = [d for d in documents if d["kind"] == "Role"]
    (binding,) = [d for d in documents if d["kind"] == "RoleBinding"]
    role, binding = copy.deepcopy(role), copy.deepcopy(binding)
    role["metadata"]["namespace"] = binding["metadata"]["namespace"] = namespace
    return {"role": role, "binding": binding}


def kustomize_apply(plane: ControlPlane, overlay: Path) -> subprocess.CompletedProcess[str]:
    """`kubectl apply --server-side -k overlay`, as on a cluster where no other overlay was applied.

    The real server refuses to turn the other overlay's Deployment into kubeadm's: the strategy's
    `rollingUpdate` that defaulting added at creation belongs to no field manager, so a server-side
    apply of `type: Recreate` keeps it and validation answers 422 ("may not be specified when
    strategy `type` is 'Recreate'"). Switching overlays therefore starts without the Deployment.
    """
    plane.delete(f"/apis/apps/v1/namespaces/{SERVICE_NAMESPACE}/deployments/etcd-autodefrag")
    plane.wait(
        lambda: (
            plane.get(
                f"/apis/apps/v1/namespaces/{SERVICE_NAMESPACE}/deployments/etcd-autodefrag", missing_ok=True
            )
            is None
        ),
        timeout=TIMEOUT,
        what="the Deployment deleted",
    )
    return plane.kubectl(
        "apply",
        "--server-side",
        "--field-manager=etcd-autodefrag-tests",
        "--validate=strict",
        "-k",
        str(overlay),
        check=False,
    )


@pytest.fixture(scope="module")
def deployed(kube_control_plane: ControlPlane) -> ControlPlane:
    """The overlays applied (CRDs first), and the Job namespaces of every variant with their Role."""
    plane = kube_control_plane
    install_crds(plane)
    # Kamaji's namespace exists before our overlay puts a Role into it; the test labels it
    # restricted to show that the kamaji Jobs meet that level.
    plane.ensure_namespace("kamaji-system", RESTRICTED)
    for overlay in OVERLAYS:
        result = kustomize_apply(plane, overlay)
        assert result.returncode == 0, f"{overlay.name}: {result.stderr}"
    for namespace in (PLAIN_NAMESPACE, TALOS_NAMESPACE):
        plane.ensure_namespace(namespace, RESTRICTED)
        for manifest in shipped_role(namespace).values():
            plane.apply(manifest)
    plane.ensure_namespace("kube-system")
    return plane


def install_crds(plane: ControlPlane) -> None:
    crds = crd_files()
    for crd in crds:
        plane.kubectl("apply", "--server-side", "--field-manager=etcd-autodefrag-tests", "-f", str(crd))
    for crd in crds:
        name = yaml.safe_load(crd.read_text())["metadata"]["name"]
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


def crd_files() -> list[Path]:
    """ServiceMonitor and PrometheusRule CRDs as prometheus-operator publishes them.

    scripts/build-kubernetes copies them from the pinned prometheus-operator module.
    """
    from kube_control_plane import binary_dir

    directory = binary_dir() / "crds"
    files = sorted(directory.glob("monitoring.coreos.com_*.yaml"))
    if not files:
        pytest.skip(f"no prometheus-operator CRDs in {directory}: run scripts/build-kubernetes")
    return files


# --- the service, as users run it -------------------------------------------------------------------


class Service:
    """`etcd-autodefrag serve --config FILE` in its own process, with the ServiceAccount's kubeconfig."""

    def __init__(self, directory: Path, config: dict[str, Any], kubeconfig: Path) -> None:
        self.directory = directory
        self.config_file = directory / "config.yaml"
        self.log_path = directory / "service.log"
        self.kubeconfig = kubeconfig
        self.port = free_port()
        token_file = directory / "webhook-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.config = {
            "log_format": "json",
            "listen_address": f"127.0.0.1:{self.port}",
            "scrape_budget_seconds": 3,
            "background_refresh_seconds": 1,
            "webhook": {"token_file": str(token_file)},
            **config,
        }
        self.write_config()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self) -> Service:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_AUTODEFRAG_", "KUBERNETES_"))}
        env["KUBECONFIG"] = str(self.kubeconfig)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "exporter", "serve", "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"the service exited with {self.popen.returncode}\n{self.tail()}")
            try:
                return self._get("/readyz")[0] == 200
            except OSError:
                return False

        self.wait(ready, "the service's /readyz")
        return self

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def reload(self) -> None:
        """SIGHUP: the service re-reads its cluster list (and discovers endpoints again)."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGHUP)

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "--- service log:\n" + "\n".join(text.splitlines()[-lines:])

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def wait(self, predicate: Any, what: str, timeout: float = TIMEOUT) -> Any:
        try:
            return wait_until(predicate, timeout=timeout, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def _get(self, path: str) -> tuple[int, str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sample's value (0 when absent)."""
        status, text = self._get("/metrics")
        assert status == 200, text
        found = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()
        ]
        assert len(found) <= 1, f"{name}{labels}: {found}"
        return found[0] if found else 0.0

    def wait_metric(self, name: str, value: float, timeout: float = TIMEOUT, **labels: str) -> None:
        self.wait(lambda: self.metric(name, **labels) == value, f"{name}{labels} == {value}", timeout)

    def alert(self, cluster: str, name: str = "EtcdDefragRecommended") -> tuple[int, dict[str, Any]]:
        """Post one firing alert for the cluster as Alertmanager does; (status, answer)."""
        labels = {"alertname": name, "severity": "warning", "etcd_cluster": cluster}
        body = {
            "version": "4",
            "status": "firing",
            "receiver": "etcd-autodefrag",
            "groupKey": f'{{}}:{{etcd_cluster="{cluster}"}}',
            "groupLabels": {"alertname": name},
            "commonLabels": labels,
            "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093",
            "truncatedAlerts": 0,
            "alerts": [
                {
                    "status": "firing",
                    "labels": labels,
                    "annotations": {},
                    "startsAt": "2026-11-22T11:55:00Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus:9090/graph",
                    "fingerprint": f"{abs(hash(cluster)):016x}"[:16],
                }
            ],
        }
        request = urllib.request.Request(
            self.url + "/webhook/alertmanager",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
            method="POST",
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def outcome(self, cluster: str) -> str:
        status, answer = self.alert(cluster)
        assert status == 200, (status, answer)
        (outcome,) = answer["outcomes"]  # one alert: one outcome in the compact reply
        return str(outcome)


def tls_of(etcd: EtcdCluster) -> dict[str, str]:
    assert etcd.tls is not None
    return {
        "ca_file": str(etcd.tls.ca_file),
        "cert_file": str(etcd.tls.cert_file),
        "key_file": str(etcd.tls.key_file),
    }


def variant_clusters(etcd: EtcdCluster) -> list[dict[str, Any]]:
    """One configured cluster per variant, each observing the harness's TLS etcd."""
    common = {"endpoints": etcd.endpoints, "tls": tls_of(etcd)}
    kubernetes = {"cooldown_seconds": COOLDOWN_SECONDS}
    return [
        {
            "name": "plain",
            **common,
            "kubernetes": {
                "namespace": PLAIN_NAMESPACE,
                "variant": "plain",
                "tls_secret": "etcd-client",
                "ca_key": "ca.crt",
                "cert_key": "tls.crt",
                "key_key": "tls.key",
                **kubernetes,
            },
        },
        {
            "name": "talos",
            **common,
            "kubernetes": {
                "namespace": TALOS_NAMESPACE,
                "variant": "talos",
                "tls_secret": "talos-etcd-client",
                **kubernetes,
            },
        },
        {
            "name": "kamaji",
            **common,
            "kubernetes": {
                "namespace": "kamaji-system",
                "variant": "kamaji",
                "etcd_name": "kamaji-etcd",
                "secret_layout": "self-signed",  # no StatefulSet to read it from in this test
                **kubernetes,
            },
        },
        {
            "name": "kubeadm",
            **common,
            "kubernetes": {"namespace": "kube-system", "variant": "kubeadm", **kubernetes},
        },
    ]


def failure_clusters(etcd: EtcdCluster) -> list[dict[str, Any]]:
    """Clusters for the failure and restart tests (plain variant, each its own Job)."""
    base = variant_clusters(etcd)[0]
    out = []
    for name in ("failing", "silent", "restart", "outage", "probe"):
        out.append({**copy.deepcopy(base), "name": name})
    slow = {
        **copy.deepcopy(base),
        "name": "slow",
        "deadline_seconds": 2,
        "member_timeout_seconds": 1,
        "health_timeout_seconds": 1,
    }
    slow["kubernetes"]["active_deadline_seconds"] = 3
    out.append(slow)
    # Kept 10 minutes after it ends: outlives an API server restart, so a relist sees it again.
    (outage,) = [c for c in out if c["name"] == "outage"]
    outage["kubernetes"]["cooldown_seconds"] = 600
    return out


ALL_VARIANTS = ["plain", "talos", "kamaji", "kubeadm"]


@pytest.fixture(scope="module")
def service_kubeconfig(deployed: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig holding a TokenRequest token of the service's own ServiceAccount."""
    token = deployed.service_account_token(SERVICE_NAMESPACE, SERVICE_ACCOUNT)
    return deployed.token_kubeconfig(tmp_path_factory.mktemp("sa") / "kubeconfig", token)


@pytest.fixture(scope="module")
def service(
    deployed: ControlPlane,
    service_kubeconfig: Path,
    tls_etcd_cluster: EtcdCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    config = {
        "executor": {"kind": "kubernetes", "cooldown_seconds": COOLDOWN_SECONDS, "image": IMAGE},
        "clusters": variant_clusters(tls_etcd_cluster) + failure_clusters(tls_etcd_cluster),
    }
    apply_rolled_out_kamaji_statefulset(deployed, 3)  # the kamaji variant's rollout gate reads it
    running = Service(tmp_path_factory.mktemp("service"), config, service_kubeconfig).start()
    try:
        yield running
    finally:
        running.stop()


def namespace_of(service: Service, cluster: str) -> str:
    (found,) = [c for c in service.config["clusters"] if c["name"] == cluster]
    return str(found["kubernetes"]["namespace"])


def job_path(namespace: str, cluster: str) -> str:
    return f"/apis/batch/v1/namespaces/{namespace}/jobs/etcd-autodefrag-{cluster}"


def events_of(plane: ControlPlane, namespace: str, job: str) -> list[dict[str, Any]]:
    selector = urllib.parse.quote(f"involvedObject.name={job},involvedObject.kind=Job")
    answer = plane.request("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector={selector}")
    return list(answer.get("items") or [])


def wait_event(plane: ControlPlane, namespace: str, job: str, reason: str, uid: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        matching = [
            e
            for e in events_of(plane, namespace, job)
            if e["reason"] == reason and e["involvedObject"].get("uid") == uid
        ]
        return matching[0] if matching else None

    return plane.wait(found, timeout=TIMEOUT, what=f"Event {reason} on Job {namespace}/{job}")


def wait_gone(plane: ControlPlane, path: str) -> None:
    plane.wait(lambda: plane.get(path, missing_ok=True) is None, timeout=TIMEOUT, what=f"{path} deleted")


def wait_condition(plane: ControlPlane, path: str, kind: str) -> dict[str, Any]:
    def condition() -> dict[str, Any] | None:
        job = plane.get(path, missing_ok=True) or {}
        for c in job.get("status", {}).get("conditions") or []:
            if c["type"] == kind and c["status"] == "True":
                return dict(c)
        return None

    return plane.wait(condition, timeout=TIMEOUT, what=f"{path} condition {kind}")


# --- the alert -> Job flow, every variant ------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_alert_launches_a_job_that_the_watch_turns_into_metrics_and_events(
    service: Service, kubelet: StandInKubelet, variant: str
) -> None:
    plane = kubelet.plane
    namespace = namespace_of(service, variant)
    path = job_path(namespace, variant)
    job_name = f"etcd-autodefrag-{variant}"
    runs_before = service.metric("etcd_autodefrag_runs_total", etcd_cluster=variant, result="success")

    assert service.outcome(variant) == "launch"
    job = plane.request("GET", path)
    # The Job controller created its Pod: admission (PodSecurity of the namespace included) let it in.
    pod = kubelet.wait_pod(namespace, job_name)
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    service.wait_metric("etcd_autodefrag_runs_in_flight", 1, etcd_cluster=variant)
    wait_event(plane, namespace, job_name, "DefragTriggered", job["metadata"]["uid"])

    # A second alert finds the run in flight.
    assert service.outcome(variant) == "skip_already_running"

    kubelet.run(pod)
    kubelet.finish(pod, exit_code=0, message=report("success"))
    wait_condition(plane, path, "Complete")
    service.wait_metric("etcd_autodefrag_runs_total", runs_before + 1, etcd_cluster=variant, result="success")
    assert service.metric("etcd_autodefrag_runs_in_flight", etcd_cluster=variant) == 0
    event = wait_event(plane, namespace, job_name, "DefragSucceeded", job["metadata"]["uid"])
    assert event["type"] == "Normal"
    assert event["message"].startswith("success: reclaimed 5.0 MiB"), event["message"]

    # The TTL controller deletes the finished Job after ttlSecondsAfterFinished; the cooldown ends
    # with it and the next alert launches a new Job.
    assert job["spec"]["ttlSecondsAfterFinished"] == COOLDOWN_SECONDS
    wait_gone(plane, path)
    outcomes: list[str] = []
    service.wait(
        lambda: outcomes.append(service.outcome(variant)) or outcomes[-1] != "skip_cooldown",
        "the cooldown to end",
    )
    assert outcomes[-1] == "launch", outcomes
    second = plane.request("GET", path)
    assert second["metadata"]["uid"] != job["metadata"]["uid"]

    # This one fails with a report: DefragFailed, counted under its result.
    pod = kubelet.wait_pod(namespace, job_name)
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=1, message=report("failed", 0, "member etcd-1 did not answer"))
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster=variant, result="failed")
    event = wait_event(plane, namespace, job_name, "DefragFailed", second["metadata"]["uid"])
    assert event["type"] == "Warning"
    assert "member etcd-1 did not answer" in event["message"]
    wait_gone(plane, path)


def test_the_job_name_is_the_lock_on_the_real_api_server(
    service: Service, kubelet: StandInKubelet, service_kubeconfig: Path, tls_etcd_cluster: EtcdCluster
) -> None:
    """A create of a second Job of that name answers 409, which the service reads as already running."""
    plane = kubelet.plane
    assert service.outcome("plain") == "launch"
    cluster = ClusterConfig.model_validate(variant_clusters(tls_etcd_cluster)[0])

    async def second_launch() -> kube.LaunchResult:
        async with await kube.kube_api_client(kubeconfig=service_kubeconfig) as api:
            manifest = build_job(
                cluster, image=IMAGE, trigger=Trigger(alertname="second"), cooldown_seconds=3
            )
            return await kube.create_job(api, manifest, timeout=10)

    result = asyncio.run(second_launch())
    assert result.outcome is LaunchOutcome.ALREADY_RUNNING, result
    assert result.reason.startswith("already running: Job etcd-autodefrag-plain"), result.reason
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-plain")
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=0, message=report("nothing_to_do", 0))
    wait_condition(plane, job_path(PLAIN_NAMESPACE, "plain"), "Complete")
    wait_gone(plane, job_path(PLAIN_NAMESPACE, "plain"))


def launch(service: Service, cluster: str) -> None:
    """Post alerts until one is past the cluster's cooldown; it must launch."""
    outcomes: list[str] = []

    def decided() -> bool:
        outcomes.append(service.outcome(cluster))
        return outcomes[-1] != "skip_cooldown"

    service.wait(decided, f"an alert for {cluster} past its cooldown")
    assert outcomes[-1] == "launch", outcomes


# --- how runs end badly ------------------------------------------------------------------------------


def test_failed_pod_with_a_report(service: Service, kubelet: StandInKubelet) -> None:
    plane = kubelet.plane
    launch(service, "failing")
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-failing")
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=2, message=report("refused", 0, "cluster is unhealthy"))
    condition = wait_condition(plane, job_path(PLAIN_NAMESPACE, "failing"), "Failed")
    assert condition["reason"] == "BackoffLimitExceeded"  # backoffLimit 0: one attempt
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="failing", result="refused")
    job = pod["metadata"]["ownerReferences"][0]
    event = wait_event(plane, PLAIN_NAMESPACE, job["name"], "DefragFailed", job["uid"])
    assert event["message"].startswith("refused"), event["message"]


def test_failed_pod_without_a_termination_message(service: Service, kubelet: StandInKubelet) -> None:
    plane = kubelet.plane
    launch(service, "silent")
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-silent")
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=137, message=None, reason="OOMKilled")
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="silent", result="job_failed")
    job = pod["metadata"]["ownerReferences"][0]
    event = wait_event(plane, PLAIN_NAMESPACE, job["name"], "DefragFailed", job["uid"])
    assert "failed (BackoffLimitExceeded) without a report" in event["message"], event["message"]


def test_job_that_hits_its_active_deadline(service: Service, kubelet: StandInKubelet) -> None:
    """The Job controller ends it (DeadlineExceeded) and deletes the Pod; the kubelet stops it."""
    plane = kubelet.plane
    launch(service, "slow")
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-slow")
    kubelet.run(pod)
    path = f"/api/v1/namespaces/{PLAIN_NAMESPACE}/pods/{pod['metadata']['name']}"
    # activeDeadlineSeconds is 3: the Job controller deletes the running Pod, gracefully.
    plane.wait(
        lambda: (plane.get(path, missing_ok=True) or {"metadata": {"deletionTimestamp": "gone"}})[
            "metadata"
        ].get("deletionTimestamp"),
        timeout=TIMEOUT,
        what="the Job controller to delete the Pod past the deadline",
    )
    if plane.get(path, missing_ok=True) is not None:
        kubelet.kill(pod)
    condition = wait_condition(plane, job_path(PLAIN_NAMESPACE, "slow"), "Failed")
    assert condition["reason"] == "DeadlineExceeded"
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="slow", result="job_failed")
    job = pod["metadata"]["ownerReferences"][0]
    event = wait_event(plane, PLAIN_NAMESPACE, job["name"], "DefragFailed", job["uid"])
    assert "failed (DeadlineExceeded) without a report" in event["message"], event["message"]


# --- a restart while the Job runs ----------------------------------------------------------------------


def test_a_restarted_service_sees_its_job_running(service: Service, kubelet: StandInKubelet) -> None:
    """Before the fix, the watch reported finished Jobs only: after a restart runs_in_flight was 0 and
    an alert was only held back by the 409 on the Job name."""
    plane = kubelet.plane
    launch(service, "restart")
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-restart")
    kubelet.run(pod)
    service.stop()
    service.start()
    service.wait_metric("etcd_autodefrag_runs_in_flight", 1, etcd_cluster="restart")
    status, answer = service.alert("restart")
    assert status == 200
    assert list(answer["outcomes"]) == ["skip_already_running"]
    # Decided from the watch's view, not from a 409 of a create attempt.
    text = answer["outcomes"]["skip_already_running"]["reason"]
    assert "is in flight since" in text, text
    kubelet.finish(pod, exit_code=0, message=report("success"))
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="restart", result="success")
    assert service.metric("etcd_autodefrag_runs_in_flight", etcd_cluster="restart") == 0
    wait_gone(plane, job_path(PLAIN_NAMESPACE, "restart"))
    assert service.metric("etcd_autodefrag_runs_total", etcd_cluster="restart", result="success") == 1


# --- least privilege: the shipped Role, one rule at a time ---------------------------------------------

RBAC_NAMESPACE = "rbac-check"
# The Jobs there stay for the whole test (ttlSecondsAfterFinished one hour).
RBAC_TARGET = {"namespace": RBAC_NAMESPACE, "cooldown_seconds": 3600}
Permission = tuple[str, str, str]  # (apiGroup, resource, verb)
# Each call the service makes, and the permissions it needs (a create that meets an existing Job
# reads it back, so it needs both).
CALLS: dict[str, set[Permission]] = {
    "create_job": {("batch", "jobs", "create")},
    "create_job over an existing Job": {("batch", "jobs", "create"), ("batch", "jobs", "get")},
    "watch_jobs: list": {("batch", "jobs", "list")},
    "watch_jobs: watch": {("batch", "jobs", "watch")},
    "watch_jobs: the finished Job's pods": {("", "pods", "list")},
    "record_event": {("", "events", "create")},
    "discover_kamaji": {("apps", "statefulsets", "get")},
}


def role_permissions(role: dict[str, Any]) -> set[Permission]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def role_without(role: dict[str, Any], removed: Permission | None) -> dict[str, Any]:
    """The Role with one verb taken out of the rule that grants it (a rule left empty goes)."""
    changed = copy.deepcopy(role)
    rules = []
    for rule in changed["rules"]:
        if removed is not None and removed[0] in rule["apiGroups"] and removed[1] in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != removed[2]]
        if rule["verbs"]:
            rules.append(rule)
    changed["rules"] = rules
    return changed


def allowed(plane: ControlPlane, permission: Permission) -> bool:
    """What the RBAC authorizer decides now for the service's ServiceAccount (SubjectAccessReview)."""
    group, resource, verb = permission
    answer = plane.create(
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{SERVICE_NAMESPACE}:{SERVICE_ACCOUNT}",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{SERVICE_NAMESPACE}",
                    "system:authenticated",
                ],
                "resourceAttributes": {
                    "namespace": RBAC_NAMESPACE,
                    "group": group,
                    "resource": resource,
                    "verb": verb,
                },
            },
        },
    )
    return bool(answer["status"].get("allowed"))


@pytest.fixture(scope="module")
def rbac_namespace(deployed: ControlPlane, tls_etcd_cluster: EtcdCluster) -> dict[str, Any]:
    """A namespace with the shipped Role, a running Job, a finished one with its report, a StatefulSet."""
    plane = deployed
    plane.ensure_namespace(RBAC_NAMESPACE)
    manifests = shipped_role(RBAC_NAMESPACE)
    plane.apply(manifests["binding"])
    kubelet = StandInKubelet(plane)
    jobs = {}
    base = variant_clusters(tls_etcd_cluster)[0]
    for name in ("rbac-held", "rbac-done"):
        cluster = ClusterConfig.model_validate(
            {**base, "name": name, "kubernetes": {**base["kubernetes"], **RBAC_TARGET}}
        )
        manifest = build_job(cluster, image=IMAGE, trigger=Trigger(alertname="rbac"), cooldown_seconds=3600)
        jobs[name] = plane.create(f"/apis/batch/v1/namespaces/{RBAC_NAMESPACE}/jobs", manifest)
    pod = kubelet.wait_pod(RBAC_NAMESPACE, "etcd-autodefrag-rbac-done")
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=0, message=report("success"))
    finished = wait_condition(
        plane, f"/apis/batch/v1/namespaces/{RBAC_NAMESPACE}/jobs/etcd-autodefrag-rbac-done", "Complete"
    )
    assert finished
    plane.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "kamaji-etcd", "namespace": RBAC_NAMESPACE},
            "spec": kamaji_statefulset_spec(3),
        }
    )
    return {
        "role": manifests["role"],
        "done": plane.request(
            "GET", f"/apis/batch/v1/namespaces/{RBAC_NAMESPACE}/jobs/etcd-autodefrag-rbac-done"
        ),
    }


async def service_calls(
    kubeconfig: Path, done_job: dict[str, Any], tls: EtcdCluster, attempt: int
) -> dict[str, str]:
    """Every call of CALLS as the service makes it; "ok" or what refused it."""
    results: dict[str, str] = {}
    base = variant_clusters(tls)[0]

    def cluster(name: str) -> ClusterConfig:
        return ClusterConfig.model_validate(
            {**base, "name": name, "kubernetes": {**base["kubernetes"], **RBAC_TARGET}}
        )

    async with await kube.kube_api_client(kubeconfig=kubeconfig) as api:

        async def run(name: str, call: Any) -> None:
            try:
                outcome = await call
            except kube.KubeRejected as exc:
                results[name] = f"{exc.status} {exc.reason}"
            else:
                results[name] = outcome or "ok"

        trigger = Trigger(alertname="rbac")

        async def create_new() -> None:
            manifest = build_job(
                cluster(f"rbac-new-{attempt}"), image=IMAGE, trigger=trigger, cooldown_seconds=5
            )
            result = await kube.create_job(api, manifest, timeout=10)
            assert result.outcome is LaunchOutcome.CREATED

        async def create_existing() -> None:
            manifest = build_job(cluster("rbac-held"), image=IMAGE, trigger=trigger, cooldown_seconds=3600)
            result = await kube.create_job(api, manifest, timeout=10)
            assert result.outcome is LaunchOutcome.ALREADY_RUNNING, result

        watcher = kube._JobWatcher(
            api, RBAC_NAMESPACE, lambda _o: None, request_timeout=10, watch_timeout_seconds=1
        )

        async def listed() -> None:
            await watcher.list()

        async def watched() -> None:
            await watcher.watch(str(done_job["metadata"]["resourceVersion"]))

        async def pods_read() -> str | None:
            seen: list[Any] = []
            reader = kube._JobWatcher(
                api, RBAC_NAMESPACE, seen.append, request_timeout=10, watch_timeout_seconds=1
            )
            await reader.consider(done_job)
            (outcome,) = seen
            # A refused pods list is logged and the end reported without the report.
            return (
                None if outcome.report is not None else "403 Forbidden (the end reported without its report)"
            )

        async def event() -> None:
            await kube.record_event(api, done_job, "RbacCheck", "least privilege", timeout=10)

        async def discovered() -> None:
            assert len(await kube.discover_kamaji(api, RBAC_NAMESPACE, "kamaji-etcd", "kamaji-etcd")) == 3

        await run("create_job", create_new())
        await run("create_job over an existing Job", create_existing())
        await run("watch_jobs: list", listed())
        await run("watch_jobs: watch", watched())
        await run("watch_jobs: the finished Job's pods", pods_read())
        await run("record_event", event())
        await run("discover_kamaji", discovered())
    return results


def test_every_rule_of_the_shipped_role_is_needed_by_a_named_call(
    deployed: ControlPlane,
    rbac_namespace: dict[str, Any],
    service_kubeconfig: Path,
    tls_etcd_cluster: EtcdCluster,
) -> None:
    plane = deployed
    shipped = rbac_namespace["role"]
    permissions = role_permissions(shipped)
    assert permissions == set().union(*CALLS.values()), (
        "a rule without a call that needs it, or a call without a rule"
    )
    try:
        for attempt, removed in enumerate([None, *sorted(permissions)]):
            role = role_without(shipped, removed)
            plane.apply(role)
            # RBAC reads Roles from an informer: wait until it decides with the new one.
            plane.wait(
                lambda removed=removed: all(allowed(plane, p) == (p != removed) for p in permissions),
                timeout=TIMEOUT,
                what=f"RBAC to see the Role without {removed}",
            )
            results = asyncio.run(
                service_calls(service_kubeconfig, rbac_namespace["done"], tls_etcd_cluster, attempt)
            )
            expected_broken = {name for name, needs in CALLS.items() if removed in needs}
            broken = {name for name, result in results.items() if result != "ok"}
            assert broken == expected_broken, (removed, results)
            assert all("403" in results[name] for name in broken), results
    finally:
        plane.apply(shipped)


def apply_rolled_out_kamaji_statefulset(plane: ControlPlane, replicas: int) -> None:
    """kamaji-etcd's StatefulSet, with the status its controller reports once a rollout is complete.

    No StatefulSet controller runs here, so the status is written as that controller would; the
    rollout gate reads it before every Job (exporter.core.policy.statefulset_rollout_gate).
    """
    path = "/apis/apps/v1/namespaces/kamaji-system/statefulsets/kamaji-etcd"
    applied = plane.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "kamaji-etcd", "namespace": "kamaji-system"},
            "spec": kamaji_statefulset_spec(replicas),
        }
    )
    revision = "kamaji-etcd-1"
    status = {
        "observedGeneration": applied["metadata"]["generation"],
        "replicas": replicas,
        "readyReplicas": replicas,
        "currentReplicas": replicas,
        "updatedReplicas": replicas,
        "availableReplicas": replicas,
        "currentRevision": revision,
        "updateRevision": revision,
    }
    plane.request("PATCH", f"{path}/status", {"status": status}, content_type="application/merge-patch+json")


def kamaji_statefulset_spec(replicas: int) -> dict[str, Any]:
    """A StatefulSet spec shaped like the kamaji-etcd chart's: what discovery reads, and a valid rest."""
    labels = {"app.kubernetes.io/name": "etcd", "app.kubernetes.io/instance": "kamaji-etcd"}
    return {
        "serviceName": "kamaji-etcd",
        "replicas": replicas,
        "podManagementPolicy": "OrderedReady",
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "etcd",
                        "image": "quay.io/coreos/etcd:v3.5.6",
                        "command": [
                            "etcd",
                            "--data-dir=/var/run/etcd",
                            "--listen-client-urls=https://0.0.0.0:2379",
                        ],
                        "ports": [
                            {"containerPort": 2379, "name": "client"},
                            {"containerPort": 2380, "name": "peer"},
                        ],
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/var/run/etcd"},
                            {"name": "certs", "mountPath": "/etc/etcd/pki"},
                        ],
                    }
                ],
                # The chart's self-signed layout: what the service reads the Secret layout from.
                "volumes": [{"name": "certs", "secret": {"secretName": "kamaji-etcd-certs"}}],
            },
        },
        "volumeClaimTemplates": [
            {
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }
        ],
    }


# --- the overlays and Pod Security ---------------------------------------------------------------------

# The level each overlay gives namespace etcd-autodefrag (docs/deploy.md).
OVERLAY_LEVELS = {"kamaji": "restricted", "kubeadm": "privileged"}


def pod_from_template(template: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "admission-check-",
            "namespace": namespace,
            **template.get("metadata", {}),
        },
        "spec": template["spec"],
    }


def admitted(plane: ControlPlane, pod: dict[str, Any]) -> str:
    """ "ok" when the API server (admission included) would create the Pod, else its message."""
    namespace = pod["metadata"]["namespace"]
    status, answer = plane.raw("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)
    return "ok" if status == 201 else f"{status}: {answer.get('message')}"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_overlay_applies_server_side_with_strict_field_validation(
    deployed: ControlPlane, overlay: Path
) -> None:
    plane = deployed
    result = kustomize_apply(plane, overlay)
    assert result.returncode == 0, result.stderr
    assert "would violate PodSecurity" not in result.stderr, result.stderr
    assert "unknown field" not in result.stderr, result.stderr
    namespace = plane.request("GET", f"/api/v1/namespaces/{SERVICE_NAMESPACE}")
    level = OVERLAY_LEVELS[overlay.name]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == level
    # The service's Pod, as the Deployment would create it, is admitted at that level.
    deployment = plane.request(
        "GET", f"/apis/apps/v1/namespaces/{SERVICE_NAMESPACE}/deployments/etcd-autodefrag"
    )
    pod = pod_from_template(deployment["spec"]["template"], SERVICE_NAMESPACE)
    assert admitted(plane, pod) == "ok"
    for kind in ("servicemonitors", "prometheusrules"):
        found = plane.request("GET", f"/apis/monitoring.coreos.com/v1/namespaces/{SERVICE_NAMESPACE}/{kind}")
        assert [o["metadata"]["name"] for o in found["items"]] == ["etcd-autodefrag"]


def test_the_kubeadm_service_pod_needs_the_privileged_level(deployed: ControlPlane) -> None:
    """docs/executors.md and docs/deploy.md: hostPath and hostNetwork are refused below `privileged`."""
    plane = deployed
    for level in ("baseline", "restricted"):
        plane.ensure_namespace(f"psa-{level}", {"pod-security.kubernetes.io/enforce": level})
        # The Pod names the service's account; the ServiceAccount admission plugin wants it to exist.
        plane.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": SERVICE_ACCOUNT, "namespace": f"psa-{level}"},
            }
        )
    rendered = plane.kubectl("kustomize", str(ROOT / "deploy/overlays/kubeadm")).stdout
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    for level in ("baseline", "restricted"):
        verdict = admitted(plane, pod_from_template(deployment["spec"]["template"], f"psa-{level}"))
        assert verdict.startswith("403"), verdict
        assert "violates PodSecurity" in verdict, verdict
        assert "hostPath" in verdict or "host namespaces" in verdict, verdict


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_job_pods_meet_the_pod_security_level_the_readme_promises(
    deployed: ControlPlane, tls_etcd_cluster: EtcdCluster, variant: str
) -> None:
    plane = deployed
    for level in ("baseline", "restricted"):
        plane.ensure_namespace(f"psa-{level}", {"pod-security.kubernetes.io/enforce": level})
    (config,) = [c for c in variant_clusters(tls_etcd_cluster) if c["name"] == variant]
    job = build_job(ClusterConfig.model_validate(config), image=IMAGE, trigger=Trigger(alertname="A"))
    verdicts = {
        level: admitted(plane, pod_from_template(job["spec"]["template"], f"psa-{level}"))
        for level in ("baseline", "restricted")
    }
    if variant == "kubeadm":  # root, host network, hostPath: privileged only (docs/executors.md)
        assert all("violates PodSecurity" in v for v in verdicts.values()), verdicts
    else:
        assert verdicts == {"baseline": "ok", "restricted": "ok"}


# --- discovery from the API, and a reload -------------------------------------------------------------


def mirror_pod(node: str, client_url: str) -> dict[str, Any]:
    """kubeadm's etcd static pod as its kubelet mirrors it into the API."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"etcd-{node}",
            "namespace": "kube-system",
            "labels": {"component": "etcd", "tier": "control-plane"},
            "annotations": {
                "kubeadm.kubernetes.io/etcd.advertise-client-urls": client_url,
                "kubernetes.io/config.mirror": "0123456789abcdef",
                "kubernetes.io/config.source": "file",
            },
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "priorityClassName": "system-node-critical",
            "containers": [
                {
                    "name": "etcd",
                    "image": "registry.k8s.io/etcd:3.5.21-0",
                    "command": [
                        "etcd",
                        f"--advertise-client-urls={client_url}",
                        "--cert-file=/etc/kubernetes/pki/etcd/server.crt",
                        "--client-cert-auth=true",
                        "--data-dir=/var/lib/etcd",
                        f"--listen-client-urls=https://127.0.0.1:2379,{client_url}",
                        f"--name={node}",
                    ],
                }
            ],
        },
    }


def discovery_records(service: Service, cluster: str) -> list[str]:
    return [
        r["message"]
        for r in service.records()
        if r.get("message", "").startswith(f"cluster {cluster}: ")
        and "endpoints from the Kubernetes API" in r["message"]
    ]


def test_discovery_from_a_statefulset_and_static_pods_and_a_scale_on_sighup(
    deployed: ControlPlane,
    kubelet: StandInKubelet,
    service_kubeconfig: Path,
    tls_etcd_cluster: EtcdCluster,
    tmp_path: Path,
) -> None:
    plane = deployed
    apply_rolled_out_kamaji_statefulset(plane, 3)
    for i, endpoint in enumerate(tls_etcd_cluster.endpoints):
        node = f"control-plane-{i}"
        plane.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
        if plane.get(f"/api/v1/namespaces/kube-system/pods/etcd-{node}", missing_ok=True) is None:
            plane.create("/api/v1/namespaces/kube-system/pods", mirror_pod(node, endpoint))
    tls = tls_of(tls_etcd_cluster)
    config = {
        "executor": {"kind": "kubernetes", "cooldown_seconds": COOLDOWN_SECONDS, "image": IMAGE},
        "clusters": [
            {
                "name": "kamaji-found",
                "tls": tls,
                "kubernetes": {
                    "namespace": "kamaji-system",
                    "variant": "kamaji",
                    "etcd_name": "kamaji-etcd",
                    "discover_endpoints": True,
                },
            },
            {
                "name": "kubeadm-found",
                "tls": tls,
                "kubernetes": {"namespace": "kube-system", "variant": "kubeadm", "discover_endpoints": True},
            },
        ],
    }
    service = Service(tmp_path, config, service_kubeconfig).start()
    try:
        host = "kamaji-etcd.kamaji-system.svc.cluster.local:2379"
        (found,) = discovery_records(service, "kamaji-found")
        assert found.endswith(", ".join(f"https://kamaji-etcd-{i}.{host}" for i in range(3))), found
        (found,) = discovery_records(service, "kubeadm-found")
        assert found.endswith(", ".join(tls_etcd_cluster.endpoints)), found

        # kubectl scale, then SIGHUP: the service reads the StatefulSet again.
        plane.kubectl("scale", "statefulset/kamaji-etcd", "-n", "kamaji-system", "--replicas=5")
        service.reload()
        found = service.wait(
            lambda: (r := discovery_records(service, "kamaji-found")) and len(r) == 2 and r[-1],
            "the reload's discovery",
        )
        assert found.endswith(", ".join(f"https://kamaji-etcd-{i}.{host}" for i in range(5))), found

        # The Job of a discovered cluster is handed the URLs the service read (it has no API access).
        launch(service, "kubeadm-found")
        job = plane.request("GET", job_path("kube-system", "kubeadm-found"))
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        handed = cluster_from_json(args[args.index("--cluster-json") + 1])
        assert handed.endpoints == tls_etcd_cluster.endpoints
        pod = kubelet.wait_pod("kube-system", "etcd-autodefrag-kubeadm-found")
        kubelet.run(pod)
        kubelet.finish(pod, exit_code=0, message=report("success"))
        service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="kubeadm-found", result="success")
    finally:
        service.stop()
        plane.kubectl("scale", "statefulset/kamaji-etcd", "-n", "kamaji-system", "--replicas=3")


# --- render: what the API server accepts ----------------------------------------------------------


def render(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "render", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["cronjob", "--variant", "kamaji", "-e", "kamaji-etcd", "-n", "kamaji-system", "--replicas", "3"],
        [
            "cronjob",
            "--variant",
            "talos",
            "--secret",
            "talos-etcd-client",
            "--endpoints",
            "https://10.0.0.1:2379",
        ],
    ],
    ids=["kamaji", "talos"],
)
def test_rendered_cronjob_is_accepted_by_the_api_server(deployed: ControlPlane, args: list[str]) -> None:
    plane = deployed
    plane.ensure_namespace("psa-restricted", {"pod-security.kubernetes.io/enforce": "restricted"})
    manifest = yaml.safe_load(render(*args))
    namespace = manifest["metadata"]["namespace"]
    stored = plane.request(
        "POST", f"/apis/batch/v1/namespaces/{namespace}/cronjobs?dryRun=All&fieldValidation=Strict", manifest
    )
    # What the CronJob controller acts on, after the server's defaulting.
    assert stored["spec"]["concurrencyPolicy"] == "Forbid"
    assert stored["spec"]["suspend"] is False
    template = stored["spec"]["jobTemplate"]["spec"]["template"]
    assert admitted(plane, pod_from_template(template, "psa-restricted")) == "ok"


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rendered_job_is_accepted_by_the_api_server(
    service: Service, deployed: ControlPlane, variant: str
) -> None:
    manifest = yaml.safe_load(render("job", "--config", str(service.config_file), "--cluster", variant))
    namespace = manifest["metadata"]["namespace"]
    stored = deployed.request(
        "POST", f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All&fieldValidation=Strict", manifest
    )
    assert stored["metadata"]["name"] == f"etcd-autodefrag-{variant}"
    assert stored["spec"]["backoffLimit"] == 0


# --- an API server outage, for real --------------------------------------------------------------------


def test_the_watch_comes_back_after_the_api_server_restarts_without_counting_twice(
    service: Service, kubelet: StandInKubelet
) -> None:
    plane = kubelet.plane
    launch(service, "outage")
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-outage")
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=0, message=report("success"))
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="outage", result="success")

    assert plane.apiserver is not None
    logged = len(service.records())
    plane.apiserver.stop()
    try:
        # The watch broke off and the service backs off and retries (the Job outlives the outage: TTL 600 s).
        service.wait(
            lambda: any(
                "watching Jobs in etcd-plain" in r.get("message", "") for r in service.records()[logged:]
            ),
            "the service to notice the broken watch",
        )
    finally:
        plane.apiserver.start()
        plane.wait_apiserver_ready()

    # The watch is back once a new Job's end is counted; the finished Job, listed again, is not.
    launch(service, "probe")
    pod = kubelet.wait_pod(PLAIN_NAMESPACE, "etcd-autodefrag-probe")
    kubelet.run(pod)
    kubelet.finish(pod, exit_code=0, message=report("success"))
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster="probe", result="success")
    assert plane.get(job_path(PLAIN_NAMESPACE, "outage"), missing_ok=True) is not None
    assert service.metric("etcd_autodefrag_runs_total", etcd_cluster="outage", result="success") == 1


def test_the_cronjob_controller_keeps_one_scheduled_run_at_a_time(deployed: ControlPlane) -> None:
    """`render cronjob` on a one-minute schedule: the controller starts a Job, then skips the next
    minute's run while that one is active (concurrencyPolicy Forbid). Takes one to two minutes."""
    plane = deployed
    namespace = "cron-check"
    plane.ensure_namespace(namespace, RESTRICTED)
    manifest = yaml.safe_load(
        render(
            "cronjob",
            "--variant",
            "kamaji",
            "-e",
            "kamaji-etcd",
            "-n",
            namespace,
            "--replicas",
            "3",
            "-j",
            "* * * * *",
        )
    )
    name = manifest["metadata"]["name"]
    cronjob = plane.create(f"/apis/batch/v1/namespaces/{namespace}/cronjobs?fieldValidation=Strict", manifest)
    try:

        def jobs() -> list[dict[str, Any]]:
            found = plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs").get("items") or []
            return [
                j for j in found if j["metadata"]["ownerReferences"][0]["uid"] == cronjob["metadata"]["uid"]
            ]

        plane.wait(jobs, timeout=90, what="the CronJob controller's first Job")
        # Its Pod was admitted at `restricted`; no kubelet runs it, so the Job stays active.
        selector = urllib.parse.quote(f"involvedObject.name={name},reason=JobAlreadyActive")
        plane.wait(
            lambda: plane.request("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector={selector}")[
                "items"
            ],
            timeout=90,
            what="the next scheduled run skipped (JobAlreadyActive)",
        )
        assert len(jobs()) == 1
    finally:
        plane.delete(f"/apis/batch/v1/namespaces/{namespace}/cronjobs/{name}")
