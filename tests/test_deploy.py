"""deploy/: every kustomization builds with the real `kubectl kustomize`, every object is schema-valid,
the copies of alerts/ and grafana/ agree with their sources, and what the manifests promise (config,
RBAC, probes, security, image) matches what the code does.

kubectl ships kustomize; on this project's machines it is preinstalled (Debian's own
kubernetes-client is 1.20, whose kustomize v2.0.3 is too old for these files). Without kubectl the
kustomize tests skip, saying so; the rest still run.
"""

import copy
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient
from test_jobs import validate

from exporter import __version__
from exporter.config.settings import ENV_PREFIX, Settings, load_settings
from exporter.core.handoff import cluster_from_json
from exporter.core.launches import Trigger
from exporter.kubernetes.api import RBAC_RULES, discover
from exporter.kubernetes.jobs import DEFAULT_IMAGE, JOB_SELECTOR, NONROOT_ID, TLS_DIR, build_job
from exporter.kubernetes.variants import JOB_RBAC_RULES, spec_of

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = sorted(p for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUSTOMIZATIONS = {"base": BASE} | {p.name: p for p in OVERLAYS}
RULES = ROOT / "alerts" / "etcd-autodefrag-rules.yaml"
DASHBOARD = ROOT / "grafana" / "etcd-autodefrag.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

NAMESPACE = "etcd-autodefrag"
NAME = "etcd-autodefrag"
SERVICE_JOB = "etcd-autodefrag"  # the scrape job the alert rules select (alerts/README.md)
PORT = 9479
CRD_GROUP = "monitoring.coreos.com"
RELEASE = "kube-prometheus-stack"
# What the webhook's Job executor needs in a Job namespace, whatever the etcd flavour.
JOB_PERMISSIONS = {("batch", "jobs", v) for v in ("create", "get", "list", "watch")} | {
    ("", "pods", "list"),
    ("", "events", "create"),
}
KAMAJI_DISCOVERY = {("apps", "statefulsets", "get")}
POD_IP = "10.244.1.7"  # what the downward API's status.podIP gives in test_config_*

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH: it builds the kustomizations (`kubectl kustomize`)"
)
Json = dict[str, Any]


def kustomize(path: Path) -> list[Json]:
    """The objects `kubectl kustomize path` prints; a failed build fails the test with kubectl's words."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def _built(name: str) -> tuple[Json, ...]:
    return tuple(kustomize(KUSTOMIZATIONS[name]))


def built(name: str) -> list[Json]:
    """The build of one kustomization (cached: a fresh deep copy for every caller)."""
    return copy.deepcopy(list(_built(name)))


def find(objects: list[Json], kind: str, name: str | None = None, namespace: str | None = None) -> list[Json]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objects: list[Json], kind: str, name: str | None = None, namespace: str | None = None) -> Json:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any namespace'}: {found}"
    return found[0]


def deployment(objects: list[Json]) -> Json:
    return one(objects, "Deployment", NAME, NAMESPACE)


def pod_spec(objects: list[Json]) -> Json:
    spec: Json = deployment(objects)["spec"]["template"]["spec"]
    return spec


def container(objects: list[Json]) -> Json:
    containers: list[Json] = pod_spec(objects)["containers"]
    assert len(containers) == 1
    return containers[0]


def volume(objects: list[Json], name: str) -> Json:
    found: list[Json] = [v for v in pod_spec(objects)["volumes"] if v["name"] == name]
    assert len(found) == 1, f"volume {name}: {found}"
    return found[0]


def service_config(objects: list[Json]) -> str:
    """config.yaml of the ConfigMap the Deployment mounts where `serve --config` reads it."""
    args = container(objects)["args"]
    path = args[args.index("--config") + 1]
    (mount,) = [m for m in container(objects)["volumeMounts"] if m["mountPath"] == path]
    config_map = volume(objects, mount["name"])["configMap"]["name"]
    data: str = one(objects, "ConfigMap", config_map, NAMESPACE)["data"][mount["subPath"]]
    return data


def container_env(objects: list[Json]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: podIP from the downward API, $(VAR) expanded."""
    env: dict[str, str] = {}
    for item in container(objects).get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
        else:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, item
            env[item["name"]] = POD_IP
    return env


def settings_of(objects: list[Json], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the service's container loads: its config file and its environment."""
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in container_env(objects).items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "config.yaml"
    path.write_text(service_config(objects))
    return load_settings(path)


def mounted_path(objects: list[Json], path: PurePosixPath) -> Json | None:
    """The volume that provides `path` in the container (a file mount, or a directory mount above it)."""
    for mount in container(objects)["volumeMounts"]:
        if path == PurePosixPath(mount["mountPath"]) or PurePosixPath(mount["mountPath"]) in path.parents:
            return volume(objects, mount["name"])
    return None


def permissions(rules: list[Json]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a Role's rules grant; a wildcard or resourceNames fails."""
    granted = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    granted.add((group, resource, verb))
    return granted


def scrape_job(service: Json, monitor: Json) -> str:
    """The `job` label of the targets a ServiceMonitor finds behind a Service (prometheus-operator:
    the value of the Service's label named by jobLabel, else the Service's name)."""
    label = monitor["spec"].get("jobLabel")
    job: str = service["metadata"]["labels"][label] if label else service["metadata"]["name"]
    return job


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the generated copies ----------------------------------------------------------------------


def test_the_charts_copies_and_the_values_table_match_their_sources() -> None:
    generator = load_generator()
    stale = [str(path.relative_to(ROOT)) for path in generator.stale_copies()]
    assert not stale, f"{', '.join(stale)} out of date: run .venv/bin/python deploy/generate.py"


def test_base_and_overlays_are_what_the_chart_renders() -> None:
    """deploy/base and deploy/overlays/* are generated from the chart: no hand edit survives."""
    generator = load_generator()
    if reason := generator.helm_unavailable_reason():
        pytest.skip(reason)
    stale = [str(path.relative_to(ROOT)) for path in generator.stale()]
    assert not stale, f"{', '.join(stale)} out of date: run .venv/bin/python deploy/generate.py"


def test_generate_check_mode_reports_a_drifted_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = load_generator()
    drifted = tmp_path / "etcd-autodefrag-rules.yaml"
    drifted.write_text(RULES.read_text().replace("> 0.8", "> 0.7"))
    monkeypatch.setattr(generator, "CHART_RULES", drifted)
    monkeypatch.setattr(generator, "CHART_DASHBOARD", tmp_path / "missing.json")
    assert generator.stale_copies() == [drifted, tmp_path / "missing.json"]
    monkeypatch.setattr(generator, "kustomize_outputs", dict)
    monkeypatch.setattr(generator, "generated_directories", list)
    assert generator.main(["deploy/generate.py", "--check"]) == 1


def test_a_file_left_in_a_generated_directory_is_stale(tmp_path: Path) -> None:
    """A hand-written patch added beside the generated ones is reported, and removed by a write."""
    generator = load_generator()
    (tmp_path / "values.yaml").write_text("variant: plain\n")
    (tmp_path / "kustomization.yaml").write_text("resources: []\n")
    (tmp_path / "my-patch.yaml").write_text("kind: Deployment\n")
    outputs = {tmp_path / "kustomization.yaml": "resources: []\n"}
    assert generator.stale_in(outputs, [tmp_path]) == [tmp_path / "my-patch.yaml"]
    generator.write(outputs, [tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kustomization.yaml", "values.yaml"]


# --- every kustomization -------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_builds_the_whole_service(name: str) -> None:
    objects = built(name)
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
    } <= kinds
    if name != "base":
        assert {"Role", "RoleBinding"} <= kinds
    assert not {"Secret", "ClusterRole", "ClusterRoleBinding"} & kinds  # secrets are never shipped


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_objects_pass_strict_schema_validation(name: str) -> None:
    core = [o for o in built(name) if not o["apiVersion"].startswith(CRD_GROUP + "/")]
    core_kinds = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "NetworkPolicy"}
    assert core_kinds <= {o["kind"] for o in core}
    for manifest in core:
        validate(manifest)


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_service_monitor_scrapes_the_service_as_the_job_the_alerts_select(name: str) -> None:
    objects = built(name)
    service = one(objects, "Service", namespace=NAMESPACE)
    monitor = one(objects, "ServiceMonitor", namespace=NAMESPACE)
    assert scrape_job(service, monitor) == SERVICE_JOB
    assert monitor["apiVersion"] == f"{CRD_GROUP}/v1"
    assert monitor["metadata"]["labels"]["release"] == RELEASE
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    seconds = {key: int(endpoint[key].removesuffix("s")) for key in ("interval", "scrapeTimeout")}
    assert Settings().scrape_budget_seconds < seconds["scrapeTimeout"] <= seconds["interval"]


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_prometheus_rule_is_the_alert_rules_and_passes_promtool(name: str, tmp_path: Path) -> None:
    rule = one(built(name), "PrometheusRule", namespace=NAMESPACE)
    assert rule["apiVersion"] == f"{CRD_GROUP}/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    assert rule["metadata"]["labels"]["release"] == RELEASE
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "the PrometheusRule differs from alerts/: run .venv/bin/python deploy/generate.py"
    )
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus (`make debs` does)", pytrace=False)
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_dashboard_config_map_is_the_grafana_dashboard_for_the_sidecar(name: str) -> None:
    (config_map,) = [
        o
        for o in built(name)
        if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert config_map["metadata"]["name"] == "etcd-autodefrag-dashboard"  # no hash suffix
    (text,) = config_map["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text())


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_config_loads_and_listens_beyond_the_pod(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = built(name)
    settings = settings_of(objects, tmp_path, monkeypatch)
    host = ipaddress.ip_address(settings.listen_host)
    if pod_spec(objects).get("hostNetwork"):
        assert str(host) == POD_IP  # the node's own address, not every interface of the node
    else:
        assert host.is_unspecified, f"{settings.listen_address} is not reachable from outside the pod"
    (port,) = container(objects)["ports"]
    assert (port["name"], port["containerPort"], settings.listen_port) == ("http", PORT, PORT)
    service = one(objects, "Service", SERVICE_JOB, NAMESPACE)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(PORT, "http")]
    assert settings.executor.kind is settings.executor.Kind.KUBERNETES


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_file_the_config_names_is_mounted(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = built(name)
    settings = settings_of(objects, tmp_path, monkeypatch)
    # The webhook token: from the Secret that is not shipped, loudly required.
    assert settings.webhook.token_file is not None
    token = volume(objects, "webhook-token")
    assert mounted_path(objects, PurePosixPath(settings.webhook.token_file)) == token
    assert token["secret"]["secretName"] == "etcd-autodefrag-webhook"
    assert token["secret"]["optional"] is False
    assert token["secret"]["items"] == [{"key": "token", "path": "token"}]
    for cluster in settings.clusters:
        tls = cluster.tls
        files = [tls.ca_file, tls.cert_file, tls.key_file] if tls is not None else []
        for path in filter(None, files):
            source = mounted_path(objects, PurePosixPath(path))
            assert source is not None, f"cluster {cluster.name}: {path} is not mounted"
            assert str(path).startswith(TLS_DIR + "/")  # where the Jobs put them too
            if "secret" in source:
                assert source["secret"]["optional"] is False


def kubeadm_static_pod(node: str, address: str) -> Json:
    """kubeadm's etcd static pod as its mirror pod reads (cmd/kubeadm/app/phases/etcd/local.go)."""
    ipv6 = ":" in address
    host = f"[{address}]" if ipv6 else address
    loopback = "[::1]" if ipv6 else "127.0.0.1"  # "localhost IP family should be the same"
    command = [
        "etcd",
        f"--advertise-client-urls=https://{host}:2379",
        f"--listen-client-urls=https://{loopback}:2379,https://{host}:2379",
        f"--listen-peer-urls=https://{host}:2380",
        f"--name={node}",
    ]
    return {
        "metadata": {
            "name": f"etcd-{node}",
            "namespace": "kube-system",
            "labels": {"component": "etcd", "tier": "control-plane"},
        },
        "spec": {"containers": [{"name": "etcd", "command": command}]},
        "status": {"hostIP": address},
    }


# What each overlay meets in a cluster: (overlay, the install, the endpoints the Jobs must get).
INSTALLS = [
    # Kamaji's own chart: kamaji-etcd with certManager.enabled (its default since mid-2026).
    (
        "kamaji",
        "cert-manager",
        [f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.cluster.local:2379" for i in range(3)],
    ),
    # kamaji-etcd installed on its own: the chart's default, self-signed certificates from Jobs.
    (
        "kamaji",
        "self-signed",
        [f"https://kamaji-etcd-{i}.kamaji-etcd.kamaji-system.svc.cluster.local:2379" for i in range(3)],
    ),
    ("kubeadm", "ipv4", ["https://10.0.0.11:2379", "https://10.0.0.12:2379", "https://10.0.0.13:2379"]),
    (
        "kubeadm",
        "ipv6",
        ["https://[fd00:10::11]:2379", "https://[fd00:10::12]:2379", "https://[fd00:10::13]:2379"],
    ),
]


@needs_kubectl
@pytest.mark.parametrize(("name", "install", "endpoints"), INSTALLS, ids=[f"{o}-{i}" for o, i, _ in INSTALLS])
async def test_overlays_configure_clusters_whose_jobs_can_run(
    name: str,
    install: str,
    endpoints: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_kube: FakeKube,
    kube_api: ApiClient,
) -> None:
    """For each cluster, on the install: what the service reads at start-up gives a valid Job that
    can start (its Secrets exist) and runs the cluster the service resolved, and a Role awaits it in
    its namespace."""
    assert {o for o, _, _ in INSTALLS} == {p.name for p in OVERLAYS}, "an overlay without an install"
    if name == "kamaji":
        fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas=3, layout=install)
    else:
        prefix = "fd00:10::" if install == "ipv6" else "10.0.0."
        for i in (11, 12, 13):
            fake_kube.add_pod(kubeadm_static_pod(f"cp-{i}", f"{prefix}{i}"))
    objects = built(name)
    settings = settings_of(objects, tmp_path, monkeypatch)
    assert settings.clusters, f"overlay {name} configures no cluster"
    account = pod_spec(objects)["serviceAccountName"]
    for configured in settings.clusters:
        assert configured.kubernetes is not None, f"cluster {configured.name}: no kubernetes section"
        cluster = await discover(configured, kube_api)  # what `serve` does before anything else
        assert cluster.endpoints == endpoints
        job = build_job(cluster, image=DEFAULT_IMAGE, trigger=Trigger(alertname="EtcdDefragRecommended"))
        validate(job)
        target = cluster.kubernetes
        assert target is not None
        pod = job["spec"]["template"]["spec"]
        assert fake_kube.missing_secrets(target.namespace, pod) == [], "the Job's Pod could not start"
        # The Job has no API access and reads no config: it is handed what the service resolved.
        args = pod["containers"][0]["args"]
        assert cluster_from_json(args[args.index("--cluster-json") + 1]) == cluster
        assert not [v for v in pod["volumes"] if "configMap" in v]
        # What it read is allowed by the Role in that namespace (the fake fails on anything else).
        role = one(objects, "Role", NAME, target.namespace)
        assert {r.rbac() for r in fake_kube.requests} <= permissions(role["rules"])
        # No copy of the config waits in the Job's namespace to drift from the service's.
        assert not find(objects, "ConfigMap", namespace=target.namespace)
        binding = one(objects, "RoleBinding", NAME, target.namespace)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


@needs_kubectl
@pytest.mark.parametrize("name", [p.name for p in OVERLAYS])
def test_roles_grant_what_the_code_calls_and_nothing_more(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Role grants, in its namespace, what the Jobs there need plus the reads the variants of the
    clusters there make there (exporter/kubernetes/variants.py): no more, no less."""
    objects = built(name)
    settings = settings_of(objects, tmp_path, monkeypatch)
    expected: dict[str, set[tuple[str, str, str]]] = {}
    for cluster in settings.clusters:
        assert cluster.kubernetes is not None
        spec = spec_of(cluster.kubernetes.variant)
        expected.setdefault(cluster.kubernetes.namespace, set()).update(JOB_PERMISSIONS)
        reads = spec.api_namespace or cluster.kubernetes.namespace
        expected.setdefault(reads, set()).update(permissions(list(spec.api_rules)))
    roles = find(objects, "Role")
    assert {role["metadata"]["namespace"] for role in roles} == set(expected)
    for role in roles:
        namespace = role["metadata"]["namespace"]
        assert permissions(role["rules"]) == expected[namespace], f"Role in {namespace}"
        assert permissions(role["rules"]) <= permissions(RBAC_RULES)


def test_the_job_permissions_are_in_rbac_rules() -> None:
    """JOB_PERMISSIONS above stays a part of what the code declares it calls."""
    assert permissions(RBAC_RULES) == JOB_PERMISSIONS | KAMAJI_DISCOVERY
    assert permissions(list(JOB_RBAC_RULES)) == JOB_PERMISSIONS


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_hit_healthz_and_readyz_on_the_named_port(name: str) -> None:
    probes = container(built(name))
    assert probes["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert probes["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert probes["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_container_is_locked_down(name: str) -> None:
    objects = built(name)
    pod = pod_spec(objects)
    box = container(objects)
    assert box["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    assert box["resources"]["requests"].keys() == {"cpu", "memory"}
    assert box["resources"]["limits"].keys() == {"memory"}
    assert mounted_path(objects, PurePosixPath("/tmp/x")) == {
        "name": "tmp",
        "emptyDir": {"sizeLimit": "64Mi"},
    }
    assert deployment(objects)["spec"]["replicas"] == 1
    labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    # The service's pods must never look like defrag Jobs' pods to the Job watch.
    job_labels = dict(term.split("=") for term in JOB_SELECTOR.split(","))
    assert not job_labels.items() <= labels.items()
    assert labels["app.kubernetes.io/name"] == NAME


@needs_kubectl
@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if n != "kubeadm"])
def test_the_service_runs_as_the_images_non_root_user(name: str) -> None:
    objects = built(name)
    pod = pod_spec(objects)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": NONROOT_ID,
        "runAsGroup": NONROOT_ID,
        "fsGroup": NONROOT_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert not any("hostPath" in v for v in pod["volumes"])
    namespace = one(objects, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_kubectl
def test_kubeadm_reads_the_nodes_client_certificate_as_root_without_capabilities() -> None:
    objects = built("kubeadm")
    pod = pod_spec(objects)
    assert pod["securityContext"] == {
        "runAsNonRoot": False,
        "runAsUser": 0,
        "runAsGroup": 0,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    # Port 9479 on the node: a surge Pod could never start beside the old one.
    assert deployment(objects)["spec"]["strategy"] == {"type": "Recreate"}
    host_paths = sorted(v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v)
    assert host_paths == [
        "/etc/kubernetes/pki/etcd/ca.crt",
        "/etc/kubernetes/pki/etcd/healthcheck-client.crt",
        "/etc/kubernetes/pki/etcd/healthcheck-client.key",
    ]
    assert all(v["hostPath"]["type"] == "File" for v in pod["volumes"] if "hostPath" in v)
    # The same files the kubeadm defrag Job mounts.
    settings = load_settings(None, clusters=[yaml.safe_load(service_config(objects))["clusters"][0]])
    cluster = settings.clusters[0].with_endpoints(["https://10.0.0.11:2379"])  # as discovered
    job_pod = build_job(cluster, image=DEFAULT_IMAGE, trigger=Trigger(alertname="x"))
    job_paths = sorted(
        v["hostPath"]["path"] for v in job_pod["spec"]["template"]["spec"]["volumes"] if "hostPath" in v
    )
    assert host_paths == job_paths
    namespace = one(objects, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# The placeholder of `images:` in deploy/base/kustomization.yaml: no official image exists yet.
IMAGE_PLACEHOLDER = "set-your-registry-in.deploy-base-kustomization.invalid/etcd-autodefrag"


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_one_setting_names_the_image_of_the_service_and_its_jobs(name: str) -> None:
    objects = built(name)
    image = container(objects)["image"]
    assert image == f"{IMAGE_PLACEHOLDER}:{__version__}"
    # The service creates its Jobs with executor.image, which the same `images:` entry sets.
    environment = container_env(objects)
    assert environment[f"{ENV_PREFIX}EXECUTOR__IMAGE"] == image
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (entry,) = base["images"]
    assert (entry["name"], f"{entry['newName']}:{entry['newTag']}") == ("etcd-autodefrag", image)


@needs_kubectl
def test_an_overlay_of_your_own_sets_the_image_once(tmp_path: Path) -> None:
    overlay = tmp_path / "mine"
    overlay.mkdir()
    kamaji = os.path.relpath(DEPLOY / "overlays" / "kamaji", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {kamaji}\nimages:\n  - name: {IMAGE_PLACEHOLDER}\n"
        "    newName: registry.example.com/etcd-autodefrag\n    newTag: '9.9'\n"
    )
    objects = kustomize(overlay)
    assert container(objects)["image"] == "registry.example.com/etcd-autodefrag:9.9"
    assert (
        container_env(objects)[f"{ENV_PREFIX}EXECUTOR__IMAGE"] == "registry.example.com/etcd-autodefrag:9.9"
    )


def test_the_docs_say_where_to_set_the_image_and_what_happens_otherwise() -> None:
    install = (ROOT / "docs" / "install.md").read_text()
    assert "ImagePullBackOff" in install
    assert f'Failed to pull image "{IMAGE_PLACEHOLDER}:{__version__}"' in install
    section = (ROOT / "README.md").read_text().split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    # Before the first command: build and push the image; Helm then names it, kustomize's `images:`.
    assert "build and push it first" in " ".join(section.split("```", 1)[0].split())
    helm, kustomize = section.split("Without Helm", 1)
    assert "--set image.repository=" in helm
    words = " ".join(kustomize.split())
    assert "set `images:` in `deploy/base/kustomization.yaml` first" in words
    assert "ImagePullBackOff" in words
    # The base's comment, next to the setting, says it too.
    assert "ImagePullBackOff" in (BASE / "kustomization.yaml").read_text()


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policy_admits_only_monitoring_and_reaches_etcd_dns_and_the_api(name: str) -> None:
    objects = built(name)
    policy = one(objects, "NetworkPolicy", NAME, NAMESPACE)["spec"]
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": PORT, "protocol": "TCP"}]
    (source,) = ingress["from"]
    assert source["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(2379, "TCP"), (53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")}


# The knob README "Deploy on Kubernetes" shows for a Prometheus released under another name.
RELEASE_PATCH = """\
  - target: {group: monitoring.coreos.com}
    patch: |-
      - op: replace
        path: /metadata/labels/release
        value: prometheus
"""


@needs_kubectl
def test_the_release_label_is_one_patch_away(tmp_path: Path) -> None:
    overlay = tmp_path / "my-overlay"
    overlay.mkdir()
    base = os.path.relpath(DEPLOY / "overlays" / "kamaji", overlay)
    (overlay / "kustomization.yaml").write_text(f"resources:\n  - {base}\npatches:\n{RELEASE_PATCH}")
    objects = kustomize(overlay)
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(objects, kind)["metadata"]["labels"]["release"] == "prometheus"
    readme = (ROOT / "README.md").read_text()
    assert RELEASE_PATCH in readme, "README's `release` example differs from the tested one"


# --- the image ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments) per stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def test_image_runs_our_console_script_as_the_deployments_numeric_user() -> None:
    final = dockerfile_stages()[-1]
    instructions = dict(final)
    assert json.loads(instructions["ENTRYPOINT"]) == ["etcd-autodefrag"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'etcd-autodefrag = "exporter.cli.main:main"' in pyproject
    user, _, group = instructions["USER"].partition(":")
    assert user.isdigit(), "runAsNonRoot can only check a numeric USER"
    assert group.isdigit()
    assert int(user) == int(group) == NONROOT_ID
    deployment_yaml = yaml.safe_load((BASE / "deployment.yaml").read_text())
    assert deployment_yaml["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_image_is_a_slim_python_with_nothing_built_in_its_final_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    for stage in stages:
        image = stage[0][1].split()[0]
        match = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", image)
        assert match, f"{image}: not a slim Python image"
        assert int(match[1]) >= 11, image
    final = stages[-1]
    assert not [args for keyword, args in final if keyword == "RUN"], "the final stage must only copy"
    assert ("COPY", "--from=build /opt/etcd-autodefrag /opt/etcd-autodefrag") in final
    environment = dict(final)["ENV"]
    assert "ETCD_AUTODEFRAG_LOCK_DIR=/tmp" in environment  # the emptyDir of the service and the Jobs


def test_build_context_holds_what_pip_install_needs() -> None:
    build = dockerfile_stages()[0]
    copied = [args.split()[:-1] for keyword, args in build if keyword == "COPY"]
    sources = {source.rstrip("/") for group in copied for source in group}
    assert sources == {"pyproject.toml", "README.md", "exporter"}  # pyproject's readme is README.md
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()
    patterns = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*"
    for source in sources:
        assert f"!{source}" in patterns or f"!{source}/" in patterns, f".dockerignore drops {source}"
