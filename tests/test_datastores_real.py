"""Kamaji DataStore discovery against a real kube-apiserver, with Kamaji's own DataStore CRD.

The CRD comes from the Kamaji Go module pinned in scripts/build-kubernetes. The service runs as
users run it (`serve --config`, its own process), authenticating as a ServiceAccount bound to exactly
the rules docs/kamaji.md documents (kube.DATASTORE_*_RBAC_RULES), and follows DataStores that point
at the harness's TLS etcd cluster while the test adds, changes, rotates and deletes them.
"""

from __future__ import annotations

import base64
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from etcd_harness import EtcdCluster
from kube_control_plane import ControlPlane, StandInKubelet, binary_dir, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_datastores import etcd_datastore
from test_kube_real import IMAGE, RESTRICTED, Service, report, tls_of, wait_condition

from exporter.core.handoff import CLUSTER_JSON_FLAG, cluster_from_json
from exporter.kubernetes import api as kube

pytestmark = pytest.mark.kube

SERVICE_NAMESPACE = "ds-service"
SERVICE_ACCOUNT = "etcd-autodefrag-datastores"
ETCD_NAMESPACE = "ds-etcd"  # where the DataStores' Secrets are, and so where their Jobs run
DATASTORES = "/apis/kamaji.clastix.io/v1alpha1/datastores"
NAME = "tenant-etcd"
TIMEOUT = 60.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def datastore(name: str, endpoints: list[str], driver: str = "etcd") -> dict[str, Any]:
    """A DataStore as Kamaji's chart writes one for kamaji-etcd, its Secrets in ETCD_NAMESPACE."""
    return etcd_datastore(name, endpoints, namespace=ETCD_NAMESPACE, driver=driver)


def secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ETCD_NAMESPACE},
        "data": {key: b64(value) for key, value in data.items()},
    }


def patch(plane: ControlPlane, path: str, body: dict[str, Any]) -> None:
    plane.request("PATCH", path, body, content_type="application/merge-patch+json")


def host_port(url: str) -> str:
    return url.split("://", 1)[1]


def samples(service: Service, cluster: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample labelled etcd_cluster=<cluster>, by name."""
    status, text = service._get("/metrics")
    assert status == 200, text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("etcd_cluster") == cluster:
                found.setdefault(s.name, []).append((s.labels, s.value))
    return found


def healthy(service: Service, cluster: str) -> float | None:
    """etcd_autodefrag_cluster_healthy of the cluster, None while it is not exported."""
    found = samples(service, cluster).get("etcd_autodefrag_cluster_healthy")
    return found[0][1] if found else None


def tenants(service: Service, cluster: str) -> set[str]:
    return {
        labels["tenant"]
        for labels, _ in samples(service, cluster).get("etcd_autodefrag_datastore_tenant_info", [])
    }


@pytest.fixture(scope="module")
def kamaji_crd(kube_control_plane: ControlPlane) -> ControlPlane:
    plane = kube_control_plane
    crd = binary_dir() / "crds" / "kamaji.clastix.io_datastores.yaml"
    if not crd.exists():
        pytest.skip(f"no Kamaji DataStore CRD at {crd}: run scripts/build-kubernetes")
    plane.kubectl("apply", "--server-side", "--field-manager=etcd-autodefrag-tests", "-f", str(crd))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/datastores.kamaji.clastix.io")
    return plane


@pytest.fixture(scope="module")
def discovery_kubeconfig(kamaji_crd: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token of a ServiceAccount that holds exactly the documented rules, and nothing else."""
    plane = kamaji_crd
    plane.ensure_namespace(SERVICE_NAMESPACE)
    plane.ensure_namespace(ETCD_NAMESPACE, RESTRICTED)
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": SERVICE_NAMESPACE}]
    rbac = "rbac.authorization.k8s.io/v1"
    for manifest in (
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": SERVICE_NAMESPACE},
        },
        {
            "apiVersion": rbac,
            "kind": "ClusterRole",
            "metadata": {"name": SERVICE_ACCOUNT},
            "rules": kube.DATASTORE_CLUSTER_RBAC_RULES,
        },
        {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": SERVICE_ACCOUNT},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": SERVICE_ACCOUNT,
            },
            "subjects": subject,
        },
        {
            "apiVersion": rbac,
            "kind": "Role",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": ETCD_NAMESPACE},
            "rules": kube.DATASTORE_NAMESPACE_RBAC_RULES,
        },
        {
            "apiVersion": rbac,
            "kind": "RoleBinding",
            "metadata": {"name": SERVICE_ACCOUNT, "namespace": ETCD_NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
            "subjects": subject,
        },
    ):
        plane.apply(manifest)
    token = plane.service_account_token(SERVICE_NAMESPACE, SERVICE_ACCOUNT)
    return plane.token_kubeconfig(tmp_path_factory.mktemp("ds-sa") / "kubeconfig", token)


@pytest.fixture
def service(
    kamaji_crd: ControlPlane,
    discovery_kubeconfig: Path,
    tls_etcd_cluster: EtcdCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Service]:
    plane = kamaji_crd
    etcd = tls_etcd_cluster
    assert etcd.tls is not None
    # The service's private TLS files go under TMPDIR (tempfile.mkdtemp), where the test can look.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    # The Secrets as kamaji-etcd's chart makes them, except that the CA starts out wrong: a
    # certificate renewal (the rotation below) has to reach the service without a restart.
    plane.apply(secret("etcd-certs", {"ca.crt": trustme.CA().cert_pem.bytes(), "ca.key": b"never read"}))
    plane.apply(
        secret(
            "root-client-certs",
            {"tls.crt": etcd.tls.cert_file.read_bytes(), "tls.key": etcd.tls.key_file.read_bytes()},
        )
    )
    config = {
        "executor": {"kind": "kubernetes", "cooldown_seconds": 3, "image": IMAGE},
        "discover": {
            "kamaji_datastores": {
                "enabled": True,
                "secret_refresh_seconds": 1,
                "defaults": {"kubernetes": {"cooldown_seconds": 3}},
            }
        },
        # A configured cluster overrides the DataStore of its name (which points nowhere).
        "clusters": [{"name": "override", "endpoints": etcd.endpoints, "tls": tls_of(etcd)}],
    }
    (tmp_path / "service").mkdir()
    running = Service(tmp_path / "service", config, discovery_kubeconfig)
    running.start()
    try:
        yield running
    finally:
        running.stop()
        for name in (NAME, "override", "mysql", "inline"):
            plane.delete(f"{DATASTORES}/{name}")


def test_the_service_account_may_get_secrets_but_not_list_them(
    discovery_kubeconfig: Path, kamaji_crd: ControlPlane
) -> None:
    def can(*args: str) -> str:
        result = kamaji_crd.kubectl("auth", "can-i", *args, kubeconfig=discovery_kubeconfig, check=False)
        return result.stdout.strip()

    assert can("get", "secrets", "-n", ETCD_NAMESPACE) == "yes"
    assert can("list", "secrets", "-n", ETCD_NAMESPACE) == "no"
    assert can("get", "secrets", "-n", "kube-system") == "no"
    assert can("watch", "datastores.kamaji.clastix.io") == "yes"
    assert can("create", "jobs", "-n", ETCD_NAMESPACE) == "yes"
    assert can("create", "jobs", "-n", "default") == "no"


def test_datastores_added_rotated_changed_and_deleted_while_the_service_runs(
    service: Service,
    kamaji_crd: ControlPlane,
    kubelet: StandInKubelet,
    tls_etcd_cluster: EtcdCluster,
    tmp_path: Path,
) -> None:
    plane = kamaji_crd
    etcd = tls_etcd_cluster
    dead = f"127.0.0.1:{free_port()}"
    plane.create(DATASTORES, datastore("mysql", ["127.0.0.1:3306"], driver="MySQL"))
    plane.create(DATASTORES, datastore("override", [dead]))

    # Added: its series appear; the wrong CA fails verification, so the cluster is unhealthy.
    plane.create(DATASTORES, datastore(NAME, [host_port(etcd.endpoints[0])]))
    service.wait(lambda: healthy(service, NAME) == 0, "the DataStore's cluster exported, unhealthy")
    # The renewed Secret is read again (secret_refresh_seconds) and used: no restart, no copy.
    assert etcd.tls is not None
    plane.apply(secret("etcd-certs", {"ca.crt": etcd.tls.ca_file.read_bytes(), "ca.key": b"never read"}))
    service.wait(lambda: healthy(service, NAME) == 1, "the rotated CA used")
    found = samples(service, NAME)
    assert found["etcd_autodefrag_cluster_members"][0][1] == 3
    # Only our private copies of the material, mode 0700 above them.
    (root,) = (tmp_path / "tmp").glob("etcd-autodefrag-tls-*")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert sorted(p.name for p in root.iterdir()) == ["override", NAME]
    (version,) = (root / NAME).iterdir()
    assert (version / "ca.crt").read_bytes() == etcd.tls.ca_file.read_bytes()

    # The configured cluster of that name wins over the DataStore that points nowhere.
    assert healthy(service, "override") == 1
    # Not etcd: not a cluster.
    assert samples(service, "mysql") == {}

    # Tenants from status.usedBy, following it.
    patch(plane, f"{DATASTORES}/{NAME}/status", {"status": {"usedBy": ["tenant-a/tcp-1", "tenant-b/tcp-2"]}})
    service.wait(lambda: tenants(service, NAME) == {"tenant-a/tcp-1", "tenant-b/tcp-2"}, "both tenants")
    patch(plane, f"{DATASTORES}/{NAME}/status", {"status": {"usedBy": ["tenant-b/tcp-2"]}})
    service.wait(lambda: tenants(service, NAME) == {"tenant-b/tcp-2"}, "tenant-a gone")

    # Changed endpoints: to a port nobody listens on, then to another member.
    patch(plane, f"{DATASTORES}/{NAME}", {"spec": {"endpoints": [dead]}})
    service.wait(lambda: healthy(service, NAME) == 0, "the dead endpoint used")
    patch(plane, f"{DATASTORES}/{NAME}", {"spec": {"endpoints": [host_port(etcd.endpoints[1])]}})
    service.wait(lambda: healthy(service, NAME) == 1, "the new endpoint used")

    # An alert launches a Job in the client Secret's namespace that mounts the Secrets themselves,
    # admitted under the namespace's restricted Pod Security level.
    assert service.outcome(NAME) == "launch"
    job_path = f"/apis/batch/v1/namespaces/{ETCD_NAMESPACE}/jobs/etcd-autodefrag-{NAME}"
    job = plane.request("GET", job_path)
    pod_spec = job["spec"]["template"]["spec"]
    (tls_volume,) = [v for v in pod_spec["volumes"] if v["name"] == "tls"]
    assert [s["secret"]["name"] for s in tls_volume["projected"]["sources"]] == [
        "etcd-certs",
        "root-client-certs",
    ]
    args = pod_spec["containers"][0]["args"]
    handed = cluster_from_json(args[args.index(CLUSTER_JSON_FLAG) + 1])
    assert handed.endpoints == [f"https://{host_port(etcd.endpoints[1])}"]
    pod = kubelet.wait_pod(ETCD_NAMESPACE, f"etcd-autodefrag-{NAME}")
    kubelet.run(pod)
    # A restarted service finds the DataStore again, watches its Jobs' namespace at once (no
    # launch needed) and so sees the run in flight and counts its end.
    service.stop()
    service.start()
    service.wait_metric("etcd_autodefrag_runs_in_flight", 1, etcd_cluster=NAME)
    kubelet.finish(pod, exit_code=0, message=report("success"))
    wait_condition(plane, job_path, "Complete")
    service.wait_metric("etcd_autodefrag_runs_total", 1, etcd_cluster=NAME, result="success")

    # Inline client material: the service reads it from the DataStore itself, but no Pod can mount
    # it, so an alert is refused (422: Alertmanager does not retry) and nothing is created.
    inline = datastore("inline", [host_port(etcd.endpoints[2])])
    inline["spec"]["tlsConfig"]["clientCertificate"] = {
        "certificate": {"content": b64(etcd.tls.cert_file.read_bytes())},
        "privateKey": {"content": b64(etcd.tls.key_file.read_bytes())},
    }
    plane.create(DATASTORES, inline)
    service.wait(lambda: healthy(service, "inline") == 1, "the inline DataStore observed")
    status, answer = service.alert("inline")
    assert status == 422, (status, answer)
    assert (
        plane.get(f"/apis/batch/v1/namespaces/{ETCD_NAMESPACE}/jobs/etcd-autodefrag-inline", missing_ok=True)
        is None
    )
    (refusal,) = [
        r
        for r in service.records()
        if r.get("logger") == "exporter.service.datastores" and "no defrag Job" in str(r.get("message", ""))
    ]
    assert "inline content, which a Pod cannot mount" in refusal["message"]

    # Deleted: every series of the cluster goes, its TLS files with it.
    plane.delete(f"{DATASTORES}/{NAME}")
    service.wait(lambda: samples(service, NAME) == {}, "no series of the deleted DataStore")
    service.wait(lambda: not (root / NAME).exists(), "its TLS files removed")
    assert healthy(service, "override") == 1

    records = service.records()
    skipped = [r for r in records if "driver MySQL, not etcd" in str(r.get("message", ""))]
    # One line per start of the service (it restarted once), however often the Secrets are read again.
    assert len(skipped) == 2, skipped
    errors = [r for r in records if r.get("level") == "error" or "Traceback" in str(r)]
    assert [r["message"] for r in errors] == [
        "cluster inline: launch refused: cluster inline: DataStore inline: no defrag Job can run it: its TLS "
        "material (tls.crt, tls.key) is inline content, which a Pod cannot mount: reference Secrets in the "
        "DataStore, or add a clusters: entry of that name"
    ]
