"""A real Kubernetes control plane on loopback, for tests: etcd, kube-apiserver, kube-controller-manager.

The binaries come from `scripts/build-kubernetes` (the release pinned in tools/kubernetes/go.mod),
cached in ~/.cache/etcd-autodefrag/kubernetes-<version>/; `unavailable_reason()` says why the tests
that need them are skipped on a machine without them. etcd is the harness's (tests/etcd_harness.py).

- kube-apiserver: secure port only, 127.0.0.1, a port the kernel handed out; client certificates
  (the test's admin is in `system:masters`, the controller manager is `system:kube-controller-manager`)
  and service-account tokens (TokenRequest) authenticate; `Node,RBAC` authorize; the default
  admission plugins run, PodSecurity among them.
- kube-controller-manager: the controllers the service relies on (job, ttl-after-finished,
  garbage-collector, cronjob, serviceaccount, serviceaccount-token), each with its own service
  account's credentials as in a real cluster.
- No scheduler and no kubelet. `StandInKubelet` does their part for the Pods of a Job: it binds the
  Pod to a Node object and reports its status with the same status patches a kubelet sends (Running,
  then Succeeded or Failed with the container's termination message). The Job controller, the TTL
  controller and the garbage collector do the rest, for real.

Everything is stopped by `ControlPlane.stop` (the fixture's finalizer); the processes also get
SIGKILLed by the kernel if pytest dies (PR_SET_PDEATHSIG), as the etcd harness's members do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from etcd_harness import EtcdCluster, start_cluster
from processes import ServerProcess as Server

REPO = Path(__file__).resolve().parent.parent
GO_MOD = REPO / "tools" / "kubernetes" / "go.mod"
LOOPBACK = "127.0.0.1"
BINARIES = ("kube-apiserver", "kube-controller-manager")
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
# The controllers the service's Kubernetes side depends on; `serviceaccount` creates each namespace's
# `default` ServiceAccount, without which the ServiceAccount admission plugin refuses every Pod.
CONTROLLERS = (
    "job-controller",
    "ttl-after-finished-controller",
    "garbage-collector-controller",
    "cronjob-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
)
START_TIMEOUT_SECONDS = 90.0  # a cold kube-apiserver on a busy 2-CPU machine takes 10-30 s
REQUEST_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 40
NODE_NAME = "stand-in-node"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

T = TypeVar("T")
Json = dict[str, Any]


class ControlPlaneError(RuntimeError):
    """The control plane did not start, or a request to it failed; the message carries log tails."""


class ApiError(ControlPlaneError):
    """The API server answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, body: Json) -> None:
        super().__init__(f"{method} {path}: {status} {body.get('reason', '')}: {body.get('message', body)}")
        self.status = status
        self.body = body


def kubernetes_version() -> str:
    """The pinned release, `vX.Y.Z`, from tools/kubernetes/go.mod."""
    match = re.search(r"^\s*k8s\.io/kubernetes (v[0-9][^\s]*)", GO_MOD.read_text(), re.MULTILINE)
    if match is None:
        raise ControlPlaneError(f"{GO_MOD}: no k8s.io/kubernetes requirement")
    return match.group(1)


def binary_dir() -> Path:
    """Where scripts/build-kubernetes puts the binaries ($KUBE_BIN_CACHE as that script reads it)."""
    cache = Path(os.environ.get("KUBE_BIN_CACHE") or Path.home() / ".cache" / "etcd-autodefrag")
    return cache / f"kubernetes-{kubernetes_version()}"


def unavailable_reason() -> str | None:
    """Why a real control plane cannot run here, or None when it can."""
    directory = binary_dir()
    missing = [name for name in BINARIES if not os.access(directory / name, os.X_OK)]
    if not missing:
        if not os.access(KUBECTL, os.X_OK):
            return f"kubectl not found at {KUBECTL}"
        return None
    if shutil.which("go") is None:
        return f"Go is not installed, so {', '.join(missing)} cannot be built (scripts/build-kubernetes)"
    return (
        f"{', '.join(missing)} not built in {directory}: run `make test-kube` (or scripts/build-kubernetes)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Pki:
    """The files of the control plane's PKI (one CA for serving and client certificates)."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    kcm_cert: Path
    kcm_key: Path
    sa_key: Path  # signs service-account tokens
    sa_pub: Path  # verifies them


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="etcd-autodefrag tests")
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))

    def issue(stem: str, *identities: str, **subject: str) -> tuple[Path, Path]:
        cert = ca.issue_cert(*identities, **subject)
        cert.cert_chain_pems[0].write_to_path(str(directory / f"{stem}.crt"))
        cert.private_key_pem.write_to_path(str(directory / f"{stem}.key"))
        return directory / f"{stem}.crt", directory / f"{stem}.key"

    server = issue("apiserver", LOOPBACK, "localhost", "kubernetes", "kubernetes.default.svc")
    # The API server takes the user from the CN and the groups from O (x509 request authenticator).
    admin = issue("admin", "admin", common_name="test-admin", organization_name="system:masters")
    kcm = issue("kcm", "kcm", common_name="system:kube-controller-manager")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "sa.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (directory / "sa.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Pki(directory / "ca.crt", *server, *admin, *kcm, directory / "sa.key", directory / "sa.pub")


def kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str = "",
) -> Path:
    """A kubeconfig with one cluster, one user (a client certificate or a bearer token), one context."""
    user: Json = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager; see the module docstring."""

    def __init__(self, directory: Path, bin_dir: Path) -> None:
        self.directory = directory
        self.bin_dir = bin_dir
        self.etcd: EtcdCluster | None = None
        self.pki = make_pki(directory / "pki")
        self.port = 0
        self.apiserver: Server | None = None
        self.controller_manager: Server | None = None
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    # --- starting and stopping ---

    def start(self) -> ControlPlane:
        try:
            self.etcd = start_cluster(self.directory / "etcd", size=1, quota_bytes=256 * 1024 * 1024)
            self._start_apiserver()
            kubeconfig(
                self.admin_kubeconfig,
                self.url,
                self.pki.ca_file,
                cert=self.pki.admin_cert,
                key=self.pki.admin_key,
            )
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def _apiserver_command(self) -> list[str]:
        assert self.etcd is not None
        pki = self.pki
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={','.join(self.etcd.endpoints)}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki.server_cert}",
            f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_file}",
            "--authorization-mode=Node,RBAC",
            # The defaults (NamespaceLifecycle, ServiceAccount, PodSecurity, ...) plus the ones a
            # kubeadm cluster enables on top.
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.96.0.0/24",
            # The `kubernetes` Service's Endpoints would point at 127.0.0.1, which Endpoints refuse.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.directory / 'apiserver-certs'}",
            "--profiling=false",
            "--v=1",
        ]

    def _start_apiserver(self) -> None:
        log_path = self.directory / "kube-apiserver.log"
        for attempt in range(3):
            self.port = free_port()
            self.apiserver = Server("kube-apiserver", self._apiserver_command(), log_path)
            self.apiserver.start()
            try:
                self.wait_apiserver_ready()
                return
            except ControlPlaneError:
                if attempt < 2 and "address already in use" in self.apiserver.tail():
                    self.apiserver.stop()
                    continue  # another process took the port between our probe and its bind
                raise

    def wait_apiserver_ready(self) -> None:
        """Until /readyz answers ok (RBAC's bootstrap roles included); raises with the log tail."""
        server = self.apiserver
        assert server is not None

        def ready() -> bool:
            if not server.running:
                raise ControlPlaneError(f"kube-apiserver exited\n{server.tail()}")
            try:
                return self.raw("GET", "/readyz", timeout=2.0)[0] == 200
            except OSError:
                return False

        try:
            wait_until(
                ready,
                timeout=START_TIMEOUT_SECONDS,
                what=f"kube-apiserver at {self.url}/readyz",
                interval=0.2,
            )
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}\n{server.tail()}") from None

    def _start_controller_manager(self) -> None:
        pki = self.pki
        config = kubeconfig(
            self.directory / "kcm.kubeconfig", self.url, pki.ca_file, cert=pki.kcm_cert, key=pki.kcm_key
        )
        command = [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={config}",
            f"--authentication-kubeconfig={config}",
            f"--authorization-kubeconfig={config}",
            # The API server has no front-proxy (requestheader) CA to look up.
            "--authentication-skip-lookup=true",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.directory / 'kcm-certs'}",
            "--leader-elect=false",
            f"--controllers={','.join(CONTROLLERS)}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_file}",
            "--profiling=false",
            "--v=1",
        ]
        self.controller_manager = Server("kube-controller-manager", command, self.directory / "kcm.log")
        self.controller_manager.start()
        server = self.controller_manager

        # Up and working once its serviceaccount controller has created namespace default's account.
        def working() -> bool:
            if not server.running:
                raise ControlPlaneError(f"kube-controller-manager exited\n{server.tail()}")
            return self.get("/api/v1/namespaces/default/serviceaccounts/default", missing_ok=True) is not None

        try:
            wait_until(working, timeout=START_TIMEOUT_SECONDS, what="kube-controller-manager", interval=0.2)
        except TimeoutError as exc:
            raise ControlPlaneError(f"{exc}\n{server.tail()}") from None

    def stop(self) -> None:
        """Stop everything, controller manager first; safe to call twice."""
        for server in (self.controller_manager, self.apiserver):
            if server is not None:
                server.stop()
        if self.etcd is not None:
            self.etcd.stop()

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = [s.tail(lines) for s in (self.apiserver, self.controller_manager) if s is not None]
        if self.etcd is not None:
            parts.append(self.etcd.log_tails())
        return "\n".join(parts)

    # --- requests, as the test's admin or with a bearer token ---

    def _context(self, token: str) -> ssl.SSLContext:
        key = (token,)
        if key not in self._contexts:
            context = ssl.create_default_context(cafile=str(self.pki.ca_file))
            if not token:
                context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
            self._contexts[key] = context
        return self._contexts[key]

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        token: str = "",
        timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> tuple[int, Json]:
        """(status, JSON body) of one request; as the admin, or as whoever `token` names."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", content_type)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        https = urllib.request.HTTPSHandler(context=self._context(token))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), https)
        try:
            with opener.open(request, timeout=timeout) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        try:
            parsed = json.loads(text) if text else {}
        except ValueError:
            parsed = {"message": text.decode(errors="replace")}
        return status, parsed if isinstance(parsed, dict) else {"items": parsed}

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> Json:
        status, answer = self.raw(method, path, body, **options)
        if not 200 <= status < 300:
            raise ApiError(method, path, status, answer)
        return answer

    def get(self, path: str, *, missing_ok: bool = False) -> Json | None:
        status, answer = self.raw("GET", path)
        if status == 404 and missing_ok:
            return None
        if status != 200:
            raise ApiError("GET", path, status, answer)
        return answer

    def create(self, path: str, body: Json) -> Json:
        return self.request("POST", path, body)

    def apply(self, manifest: Json) -> Json:
        """Create or update any object by server-side apply, as the test's admin."""
        namespace = manifest["metadata"].get("namespace")
        path = _object_path(manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"], namespace)
        return self.request(
            "PATCH",
            f"{path}?fieldManager=tests&force=true",
            manifest,
            content_type="application/apply-patch+yaml",
        )

    def delete(self, path: str, *, propagation: str = "Background") -> None:
        status, answer = self.raw("DELETE", path, {"propagationPolicy": propagation})
        if status not in (200, 202, 404):
            raise ApiError("DELETE", path, status, answer)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl against this API server (as the admin unless another kubeconfig is given)."""
        result = subprocess.run(
            [KUBECTL, f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        )
        # The ServiceAccount admission plugin refuses Pods until the namespace's `default` account exists.
        wait_until(
            lambda: self.get(f"/api/v1/namespaces/{name}/serviceaccounts/default", missing_ok=True),
            timeout=30,
            what=f"ServiceAccount default in namespace {name}",
        )

    def service_account_token(self, namespace: str, name: str, *, expiration_seconds: int = 3600) -> str:
        """A token for the ServiceAccount from the TokenRequest API, as a projected volume would get."""
        answer = self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        token: str = answer["status"]["token"]
        return token

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        return kubeconfig(path, self.url, self.pki.ca_file, token=token)

    def wait(self, predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """wait_until, with the control plane's log tails in the failure."""
        try:
            return wait_until(predicate, timeout=timeout, what=what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tails(15)}") from None


_RESOURCES = {
    ("v1", "Namespace"): "namespaces",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("batch/v1", "Job"): "jobs",
    ("batch/v1", "CronJob"): "cronjobs",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "clusterroles",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "clusterrolebindings",
}


def _object_path(api_version: str, kind: str, name: str, namespace: str | None) -> str:
    resource = _RESOURCES[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{resource}/{quote(name)}"


# --- the stand-in kubelet ---------------------------------------------------------------------------


class StandInKubelet:
    """Does for a Job's Pods what the scheduler and a kubelet would: bind, run, terminate.

    Status goes up as a kubelet sends it (pkg/kubelet/status: a strategic merge patch of the Pod's
    `status` subresource), with the container's termination message the way the kubelet reads it
    from `terminationMessagePath` (at most 4096 bytes).
    """

    def __init__(self, plane: ControlPlane, node: str = NODE_NAME) -> None:
        self.plane = plane
        self.node = node
        self._registered = False

    def register(self) -> None:
        """A Node object for Pods to be bound to (labelled as a control-plane node, for kubeadm's Jobs)."""
        if self._registered:
            return
        self.plane.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.node,
                    "labels": {
                        "kubernetes.io/hostname": self.node,
                        "node-role.kubernetes.io/control-plane": "",
                    },
                },
            }
        )
        self._registered = True

    def pods_of_job(self, namespace: str, job: str) -> list[Json]:
        answer = self.plane.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={quote('job-name=' + job)}"
        )
        items: list[Json] = answer.get("items") or []
        return items

    def wait_pod(self, namespace: str, job: str, *, timeout: float = 30.0) -> Json:
        """The (one, newest) Pod the Job controller created for the Job."""

        def pod() -> Json | None:
            pods = [p for p in self.pods_of_job(namespace, job) if not p["metadata"].get("deletionTimestamp")]
            return max(pods, key=lambda p: p["metadata"]["creationTimestamp"]) if pods else None

        return self.plane.wait(pod, timeout=timeout, what=f"a Pod of Job {namespace}/{job}")

    def run(self, pod: Json) -> Json:
        """Bind the Pod to the node and report its container running."""
        self.register()
        metadata = pod["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        if not pod["spec"].get("nodeName"):
            self.plane.create(
                f"/api/v1/namespaces/{namespace}/pods/{name}/binding",
                {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name, "namespace": namespace},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                },
            )
        started = now_rfc3339()
        statuses = [
            {
                **self._container(c, pod),
                "ready": True,
                "started": True,
                "state": {"running": {"startedAt": started}},
            }
            for c in pod["spec"]["containers"]
        ]
        return self._patch_status(
            pod,
            {
                "phase": "Running",
                "hostIP": LOOPBACK,
                "hostIPs": [{"ip": LOOPBACK}],
                "podIP": "10.244.0.10",
                "podIPs": [{"ip": "10.244.0.10"}],
                "startTime": started,
                "conditions": self._conditions(ready=True, at=started),
                "containerStatuses": statuses,
            },
        )

    def finish(self, pod: Json, *, exit_code: int, message: str | None, reason: str | None = None) -> Json:
        """Report the container terminated: phase Succeeded (exit 0) or Failed, with its message."""
        current = self.plane.request("GET", _pod_path(pod))
        running = {
            s["name"]: (s.get("state") or {}).get("running", {}).get("startedAt")
            for s in current.get("status", {}).get("containerStatuses") or []
        }
        finished = now_rfc3339()
        statuses = []
        for container in pod["spec"]["containers"]:
            terminated: Json = {
                "exitCode": exit_code,
                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                "startedAt": running.get(container["name"]) or finished,
                "finishedAt": finished,
                "containerID": self._container(container, pod)["containerID"],
            }
            if message:
                # The kubelet reads at most 4096 bytes of the file
                # (kubecontainer.MaxContainerTerminationMessageLength).
                terminated["message"] = message.encode()[:4096].decode(errors="ignore")
            statuses.append(
                {
                    **self._container(container, pod),
                    "ready": False,
                    "started": False,
                    "state": {"terminated": terminated},
                }
            )
        return self._patch_status(
            pod,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": self._conditions(ready=False, at=finished),
                "containerStatuses": statuses,
            },
        )

    def kill(self, pod: Json) -> None:
        """What a kubelet does with a Pod being deleted: stop it (exit 137), report it, remove it."""
        self.finish(pod, exit_code=137, message=None, reason="Error")
        self.plane.delete(_pod_path(pod) + "?gracePeriodSeconds=0")

    def _patch_status(self, pod: Json, status: Json) -> Json:
        return self.plane.request(
            "PATCH",
            _pod_path(pod) + "/status",
            {"status": status},
            content_type="application/strategic-merge-patch+json",
        )

    @staticmethod
    def _container(container: Json, pod: Json) -> Json:
        uid = pod["metadata"]["uid"]
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": f"{container['image']}@sha256:{'0' * 64}",
            "containerID": f"containerd://{uid.replace('-', '')}{container['name']}",
            "restartCount": 0,
        }

    @staticmethod
    def _conditions(*, ready: bool, at: str) -> list[Json]:
        value = "True" if ready else "False"
        reason = {} if ready else {"reason": "PodCompleted"}
        return [
            {"type": "PodReadyToStartContainers", "status": value, "lastTransitionTime": at},
            {"type": "Initialized", "status": "True", "lastTransitionTime": at, **reason},
            {"type": "Ready", "status": value, "lastTransitionTime": at, **reason},
            {"type": "ContainersReady", "status": value, "lastTransitionTime": at, **reason},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": at},
        ]


def _pod_path(pod: Json) -> str:
    metadata = pod["metadata"]
    return f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}"
