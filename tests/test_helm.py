"""The Helm chart, deploy/helm/etcd-autodefrag: lint, what each set of values renders, that the
kustomizations generated from it build the very same objects, and (marker `kube`) that the API server
from the control-plane fixture accepts every rendering and that `helm install`/`uninstall` work on it.

helm is the release tools/helm pins, built by scripts/build-helm (`make kube-builds`); without it
these tests skip, saying so.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_control_plane import ControlPlane
from test_deploy import (
    DASHBOARD,
    JOB_PERMISSIONS,
    KAMAJI_DISCOVERY,
    KUSTOMIZATIONS,
    RULES,
    SERVICE_JOB,
    find,
    kustomize,
    load_generator,
    needs_kubectl,
    one,
    permissions,
    scrape_job,
)

from exporter import __version__
from exporter.config.settings import ENV_PREFIX, load_settings
from exporter.kubernetes.api import DATASTORE_CLUSTER_RBAC_RULES, DATASTORE_NAMESPACE_RBAC_RULES, RBAC_RULES

GENERATOR = load_generator()
CHART: Path = GENERATOR.CHART
HELM = GENERATOR.helm_binary()
_REASON = GENERATOR.helm_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

NAMESPACE = "etcd-autodefrag"
IMAGE = "registry.example.com/etcd-autodefrag"
Json = dict[str, Any]

# A talos cluster and a plain one, as users list them (the talos and plain variants have no default).
TALOS_CLUSTER = {
    "name": "talos",
    "endpoints": ["https://10.0.0.21:2379"],
    "tls": {
        "ca_file": "/etc/etcd-autodefrag/tls/ca.crt",
        "cert_file": "/etc/etcd-autodefrag/tls/tls.crt",
        "key_file": "/etc/etcd-autodefrag/tls/tls.key",
    },
    "kubernetes": {"namespace": "etcd-talos", "variant": "talos", "tls_secret": "talos-etcd-client"},
}
PLAIN_CLUSTER = {
    "name": "plain",
    "endpoints": ["http://etcd.etcd-plain.svc:2379"],
    "kubernetes": {"namespace": "etcd-plain", "variant": "plain"},
}
# The values of each variant (plain and talos with a cluster: they have no default one).
VARIANTS: dict[str, Json] = {
    "plain": {"variant": "plain", "clusters": [PLAIN_CLUSTER]},
    "talos": {"variant": "talos", "clusters": [TALOS_CLUSTER]},
    "kamaji": {"variant": "kamaji"},
    "kubeadm": {"variant": "kubeadm"},
}
SHARDED: Json = {"variant": "kamaji", "sharding": {"enabled": True, "totalShards": 3}}
DISCOVERY: Json = {
    "variant": "kamaji",
    "discovery": {
        "kamajiDataStores": {
            "enabled": True,
            "labelSelector": "tier=prod",
            "secretNamespaces": ["kamaji-system", "tenants-etcd"],
        }
    },
}
# Every rendering the server-side dry run checks.
RENDERINGS: dict[str, Json] = {**VARIANTS, "sharded": SHARDED, "discovery": DISCOVERY}


def helm(
    *args: str, kubeconfig: Path | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    if home is not None:  # helm's cache, config and data (repositories, registry logins) under the test's dir
        for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[name] = str(home / name.lower())
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=180, check=False, env=env
    )


def template_text(values: Json, *, release: str = "etcd-autodefrag", namespace: str = NAMESPACE) -> str:
    """`helm template` of the chart with these values (a values file on stdin, as users pass them)."""
    command = [str(HELM), "template", release, str(CHART), "--namespace", namespace, "--values", "-"]
    result = subprocess.run(
        command, input=json.dumps(values), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def template(values: Json, **options: str) -> list[Json]:
    return [doc for doc in yaml.safe_load_all(template_text(values, **options)) if doc]


def template_error(values: Json) -> str:
    """helm's error for values the chart refuses (the test fails if it renders them)."""
    command = [str(HELM), "template", "x", str(CHART), "--values", "-"]
    result = subprocess.run(
        command, input=json.dumps(values), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0, f"rendered what it should refuse:\n{result.stdout[:2000]}"
    assert "Traceback" not in result.stderr
    assert "panic" not in result.stderr
    return result.stderr


def workload(objects: list[Json]) -> Json:
    (found,) = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    return found


def pod(objects: list[Json]) -> Json:
    spec: Json = workload(objects)["spec"]["template"]["spec"]
    return spec


def container(objects: list[Json]) -> Json:
    (box,) = pod(objects)["containers"]
    return box


def env(objects: list[Json]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


def config_of(objects: list[Json]) -> Json:
    config_map = one(objects, "ConfigMap", "etcd-autodefrag-config", NAMESPACE)
    config: Json = yaml.safe_load(config_map["data"]["config.yaml"])
    return config


# --- lint and metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["defaults", *RENDERINGS])
def test_helm_lint_strict(name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(RENDERINGS.get(name, {})))
    result = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def _leaves(values: Any, prefix: str = "") -> set[str]:
    if isinstance(values, dict) and values:
        return {leaf for key, value in values.items() for leaf in _leaves(value, f"{prefix}{key}.")}
    return {prefix.rstrip(".")}


def test_every_value_is_in_the_values_table_of_docs_helm_md() -> None:
    """A value without its `# --` comment would be missing from docs/helm.md (generated from them)."""
    documented = set(
        re.findall(r"^\| `([^`]+)` \|", GENERATOR.values_table((CHART / "values.yaml").read_text()), re.M)
    )
    for leaf in _leaves(yaml.safe_load((CHART / "values.yaml").read_text())):
        parts = leaf.split(".")
        assert any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)), (
            f"{leaf} undocumented"
        )
    assert (GENERATOR.VALUES_BEGIN + "\n" + GENERATOR.values_table((CHART / "values.yaml").read_text())) in (
        GENERATOR.HELM_DOC.read_text()
    )


def test_the_charts_version_is_the_services() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__


def test_the_chart_carries_the_alert_rules_and_the_dashboard() -> None:
    objects = template({})
    rule = one(objects, "PrometheusRule", "etcd-autodefrag", NAMESPACE)
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    dashboard = one(objects, "ConfigMap", "etcd-autodefrag-dashboard", NAMESPACE)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["etcd-autodefrag.json"]) == json.loads(DASHBOARD.read_text())
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(objects, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    relabelled = template({"monitoring": {"release": "prometheus"}})
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(relabelled, kind)["metadata"]["labels"]["release"] == "prometheus"
    off = {"monitoring": {k: {"enabled": False} for k in ("serviceMonitor", "prometheusRule", "dashboard")}}
    kinds = {(o["kind"], o["metadata"]["name"]) for o in template(off)}
    assert not kinds & {("ServiceMonitor", "etcd-autodefrag"), ("PrometheusRule", "etcd-autodefrag")}
    assert ("ConfigMap", "etcd-autodefrag-dashboard") not in kinds


# --- one source of truth ---------------------------------------------------------------------------


def _normalized(value: Any, field_name: str = "") -> Any:
    """Nulls dropped (a patch's null removes a key), and the lists a strategic merge patch merges by
    key sorted by it: kustomize puts a patch's new items first, the chart appends them. (An env
    list's order matters for $(VAR) references: tests/test_deploy.py expands them in order.)"""
    if isinstance(value, dict):
        return {k: _normalized(v, k) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        items = [_normalized(v) for v in value]
        if merge_key := GENERATOR.MERGE_KEYS.get(field_name):
            items.sort(key=lambda item: item[merge_key])
        return items
    return value


def by_identity(objects: list[Json]) -> dict[tuple[str, str, str], Json]:
    """Objects by (kind, namespace, name), kustomize's hashed ConfigMap names back to the chart's."""
    text = json.dumps(objects)
    for o in objects:
        name = o["metadata"]["name"]
        if o["kind"] == "ConfigMap" and (
            match := re.fullmatch(r"(etcd-autodefrag-config)-[a-z0-9]{10}", name)
        ):
            text = text.replace(f'"{name}"', f'"{match.group(1)}"')
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): _normalized(o)
        for o in json.loads(text)
    }


@needs_kubectl
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_kustomization_builds_what_the_chart_renders_for_its_values(name: str) -> None:
    """`kubectl kustomize deploy/<x>` == `helm template` with deploy/<x>/values.yaml, object by object."""
    directory = KUSTOMIZATIONS[name]
    built = by_identity(kustomize(directory))
    settings = {"image.repository": GENERATOR.IMAGE_PLACEHOLDER}  # what base's `images:` makes of it
    rendered = by_identity([r.object for r in GENERATOR.render(directory, settings)])
    assert sorted(built) == sorted(rendered)
    for key, wanted in rendered.items():
        assert built[key] == wanted, f"{name}: {key} differs between kustomize and helm"


# --- the variants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variants_config_loads_and_its_roles_grant_what_the_code_calls(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = template(VARIANTS[variant])
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_of(objects)))
    settings = load_settings(path)
    assert [c.kubernetes.variant.value for c in settings.clusters if c.kubernetes] == [variant]
    (cluster,) = settings.clusters
    assert cluster.kubernetes is not None
    role = one(objects, "Role", "etcd-autodefrag", cluster.kubernetes.namespace)
    granted = permissions(role["rules"])
    assert JOB_PERMISSIONS <= granted <= permissions(RBAC_RULES)
    assert bool(granted & KAMAJI_DISCOVERY) is (variant == "kamaji")
    binding = one(objects, "RoleBinding", "etcd-autodefrag", cluster.kubernetes.namespace)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "etcd-autodefrag", "namespace": NAMESPACE}
    ]
    assert not find(objects, "ClusterRole")  # only DataStore discovery needs one


@pytest.mark.parametrize(
    ("variant", "keys"),
    [
        ("talos", ["ca", "crt", "key"]),  # talosctl's names
        ("kamaji", ["ca.crt", "tls.crt", "tls.key"]),
    ],
)
def test_the_service_mounts_its_client_certificate_from_the_variants_keys(
    variant: str, keys: list[str]
) -> None:
    objects = template(VARIANTS[variant])
    (volume,) = [v for v in pod(objects)["volumes"] if v["name"] == "etcd-client-tls"]
    assert volume["secret"]["secretName"] == "etcd-autodefrag-etcd-client"
    assert volume["secret"]["optional"] is False
    assert [i["key"] for i in volume["secret"]["items"]] == keys
    assert [i["path"] for i in volume["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    renamed = template(
        {**VARIANTS[variant], "etcdClient": {"secretName": "mine", "keys": {"ca": "root.pem"}}}
    )
    (volume,) = [v for v in pod(renamed)["volumes"] if v["name"] == "etcd-client-tls"]
    assert volume["secret"]["secretName"] == "mine"
    assert volume["secret"]["items"][0]["key"] == "root.pem"


def test_plain_mounts_no_client_certificate_unless_named() -> None:
    assert "etcd-client-tls" not in {v["name"] for v in pod(template(VARIANTS["plain"]))["volumes"]}


def test_kubeadm_runs_on_a_control_plane_node_reading_its_certificate() -> None:
    objects = template(VARIANTS["kubeadm"])
    spec = pod(objects)
    assert spec["hostNetwork"] is True
    assert spec["securityContext"]["runAsUser"] == 0
    assert spec["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert workload(objects)["spec"]["strategy"] == {"type": "Recreate"}
    assert sorted(v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v) == [
        "/etc/kubernetes/pki/etcd/ca.crt",
        "/etc/kubernetes/pki/etcd/healthcheck-client.crt",
        "/etc/kubernetes/pki/etcd/healthcheck-client.key",
    ]
    assert config_of(objects)["clusters"][0]["kubernetes"]["namespace"] == "kube-system"
    # The Jobs are handed their cluster in their args (docs/run-handoff.md): no copy of the config
    # file in their namespace, whatever the variant.
    assert find(objects, "ConfigMap", namespace="kube-system") == []


@pytest.mark.parametrize("values", [{}, VARIANTS["kamaji"], SHARDED], ids=["deployment", "kamaji", "sharded"])
def test_one_value_sets_the_image_of_the_service_and_its_jobs(values: Json) -> None:
    objects = template({**values, "image": {"repository": IMAGE, "tag": "9.9"}})
    assert container(objects)["image"] == f"{IMAGE}:9.9"
    assert env(objects)[f"{ENV_PREFIX}EXECUTOR__IMAGE"] == f"{IMAGE}:9.9"
    # Without a tag: the chart's appVersion, the service's version.
    assert (
        container(template({**values, "image": {"repository": IMAGE}}))["image"] == f"{IMAGE}:{__version__}"
    )


def test_the_placeholder_image_says_where_to_set_it() -> None:
    image = container(template({}))["image"]
    assert image.startswith("set-your-registry-in.values-image-repository.invalid/")


def test_another_release_name_keeps_the_scrape_job_the_alerts_select() -> None:
    objects = template({}, release="fleet", namespace="monitoring-tools")
    service = one(objects, "Service", "fleet-etcd-autodefrag", "monitoring-tools")
    monitor = one(objects, "ServiceMonitor", "fleet-etcd-autodefrag", "monitoring-tools")
    assert scrape_job(service, monitor) == SERVICE_JOB
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["monitoring-tools"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


# --- the webhook Secret -----------------------------------------------------------------------------


def webhook_volume(objects: list[Json]) -> Json:
    (volume,) = [v for v in pod(objects)["volumes"] if v["name"] == "webhook-token"]
    return volume


def test_the_webhook_token_from_a_value_becomes_the_mounted_secret() -> None:
    objects = template({"webhook": {"token": "s3cret"}})
    secret = one(objects, "Secret", "etcd-autodefrag-webhook", NAMESPACE)
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cret"
    assert webhook_volume(objects)["secret"]["secretName"] == "etcd-autodefrag-webhook"
    assert config_of(objects)["webhook"]["token_file"] == "/etc/etcd-autodefrag/webhook/token"


def test_an_existing_webhook_secret_is_mounted_and_none_is_created() -> None:
    objects = template({"webhook": {"existingSecret": "am-token", "secretKey": "bearer"}})
    assert not find(objects, "Secret")
    secret = webhook_volume(objects)["secret"]
    assert (secret["secretName"], secret["items"], secret["optional"]) == (
        "am-token",
        [{"key": "bearer", "path": "token"}],
        False,
    )
    # Neither: the Secret the kustomizations also expect, created by the user.
    assert webhook_volume(template({}))["secret"]["secretName"] == "etcd-autodefrag-webhook"
    assert not find(template({}), "Secret")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webhook": {"token": "a", "existingSecret": "b"}}, "webhook: set token"),
        ({"variant": "talso"}, 'variant "talso": must be one of plain, talos, kamaji, kubeadm'),
        ({"sharding": {"enabled": True, "totalShards": 0}}, "sharding.totalShards 0: must be at least 1"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_value(values: Json, message: str) -> None:
    assert message in template_error(values)


# --- sharding and discovery ---------------------------------------------------------------------------


def test_sharding_runs_one_statefulset_pod_per_shard_behind_one_service() -> None:
    objects = template(SHARDED)
    assert not find(objects, "Deployment")
    stateful = one(objects, "StatefulSet", "etcd-autodefrag", NAMESPACE)
    assert stateful["spec"]["replicas"] == 3
    assert stateful["spec"]["serviceName"] == "etcd-autodefrag"
    variables = env(objects)
    assert variables[f"{ENV_PREFIX}SHARDING__TOTAL_SHARDS"] == "3"
    assert variables["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Every shard's Pod is behind the Service (webhooks to any) and so scraped by the ServiceMonitor.
    labels = stateful["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", "etcd-autodefrag", NAMESPACE)
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = one(objects, "ServiceMonitor", "etcd-autodefrag", NAMESPACE)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    unsharded = env(template(VARIANTS["kamaji"]))
    assert "POD_NAME" not in unsharded
    assert f"{ENV_PREFIX}SHARDING__TOTAL_SHARDS" not in unsharded


def test_datastore_discovery_is_configured_with_only_the_rights_it_needs() -> None:
    objects = template(DISCOVERY)
    assert config_of(objects)["discover"] == {
        "kamaji_datastores": {"enabled": True, "label_selector": "tier=prod"}
    }
    cluster_role = one(objects, "ClusterRole", "etcd-autodefrag-kamaji-datastores")
    # Exactly what the code calls (exporter.kubernetes.api), nothing more.
    assert permissions(cluster_role["rules"]) == permissions(DATASTORE_CLUSTER_RBAC_RULES)
    binding = one(objects, "ClusterRoleBinding", "etcd-autodefrag-kamaji-datastores")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "etcd-autodefrag", "namespace": NAMESPACE}
    ]
    for namespace in ("kamaji-system", "tenants-etcd"):
        role = one(objects, "Role", "etcd-autodefrag-kamaji-datastores", namespace)
        granted = permissions(role["rules"])
        assert {p for p in granted if p[1] == "secrets"} == {("", "secrets", "get")}  # never list or watch
        assert granted == permissions(DATASTORE_NAMESPACE_RBAC_RULES)
        assert granted >= JOB_PERMISSIONS
        one(objects, "RoleBinding", "etcd-autodefrag-kamaji-datastores", namespace)
    assert "discover" not in config_of(template(VARIANTS["kamaji"]))
    assert (
        "label_selector"
        not in config_of(template({"discovery": {"kamajiDataStores": {"enabled": True}}}))["discover"][
            "kamaji_datastores"
        ]
    )


# --- against the real API server ------------------------------------------------------------------


def crds_installed(plane: ControlPlane) -> None:
    from test_kube_real import install_crds

    install_crds(plane)


@pytest.fixture(scope="module")
def api_server(kube_control_plane: ControlPlane) -> ControlPlane:
    """The control plane with prometheus-operator's CRDs and every namespace the renderings use."""
    plane = kube_control_plane
    crds_installed(plane)
    for namespace in (NAMESPACE, "kamaji-system", "kube-system", "tenants-etcd", "etcd-talos", "etcd-plain"):
        # Only when missing: an apply without labels would take back the Pod Security labels that
        # tests/test_kube_real.py gives some of these namespaces through the same field manager.
        if plane.get(f"/api/v1/namespaces/{namespace}", missing_ok=True) is None:
            plane.ensure_namespace(namespace)
    return plane


@pytest.mark.kube
@pytest.mark.parametrize("name", RENDERINGS)
def test_every_rendering_passes_a_server_side_dry_run(name: str, api_server: ControlPlane) -> None:
    text = template_text({**RENDERINGS[name], "webhook": {"token": "t"}, "namespace": {"create": True}})
    # --force-conflicts: the deploy tests may have applied the same objects under their own field
    # manager; a dry run checks what the API accepts, not who owns a field.
    result = api_server.kubectl(
        "apply", "--server-side", "--dry-run=server", "--validate=strict", "--force-conflicts",
        "--field-manager=etcd-autodefrag-helm-tests", "-f", "-",
        input=text, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kinds = {
        line.split()[0].split("/")[0] for line in result.stdout.splitlines() if "(server dry run)" in line
    }
    assert {"deployment.apps", "statefulset.apps"} & kinds, result.stdout
    assert {"servicemonitor.monitoring.coreos.com", "prometheusrule.monitoring.coreos.com"} <= kinds


@pytest.fixture
def helm_home(tmp_path: Path) -> Path:
    return tmp_path / "helm-home"


@pytest.mark.kube
def test_helm_install_creates_the_objects_and_uninstall_removes_them(
    api_server: ControlPlane, helm_home: Path, tmp_path: Path
) -> None:
    """The talos variant as release `fleet` in its own namespace (the kube tests' overlays keep theirs)."""
    plane = api_server
    namespace = "helm-fleet"
    jobs = "etcd-talos"
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump({**VARIANTS["talos"], "webhook": {"token": "t"}, "namespace": {"create": False}})
    )
    result = helm(
        "install", "fleet", str(CHART), "--namespace", namespace, "--create-namespace",
        "--values", str(values), kubeconfig=plane.admin_kubeconfig, home=helm_home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "STATUS: deployed" in result.stdout
    paths = [
        f"/apis/apps/v1/namespaces/{namespace}/deployments/fleet-etcd-autodefrag",
        f"/api/v1/namespaces/{namespace}/services/fleet-etcd-autodefrag",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/fleet-etcd-autodefrag",
        f"/api/v1/namespaces/{namespace}/configmaps/fleet-etcd-autodefrag-config",
        f"/api/v1/namespaces/{namespace}/configmaps/fleet-etcd-autodefrag-dashboard",
        f"/api/v1/namespaces/{namespace}/secrets/fleet-etcd-autodefrag-webhook",
        f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/servicemonitors/fleet-etcd-autodefrag",
        f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/prometheusrules/fleet-etcd-autodefrag",
        f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/fleet-etcd-autodefrag",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{jobs}/roles/fleet-etcd-autodefrag",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{jobs}/rolebindings/fleet-etcd-autodefrag",
    ]
    for path in paths:
        found = plane.get(path)
        assert found is not None
        assert found["metadata"]["annotations"]["meta.helm.sh/release-name"] == "fleet"
    deployment = plane.get(paths[0])
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{__version__}")
    listed = helm(
        "list",
        "--namespace",
        namespace,
        "--output",
        "json",
        kubeconfig=plane.admin_kubeconfig,
        home=helm_home,
    )
    assert [(r["name"], r["status"]) for r in json.loads(listed.stdout)] == [("fleet", "deployed")]

    result = helm(
        "uninstall", "fleet", "--namespace", namespace, kubeconfig=plane.admin_kubeconfig, home=helm_home
    )
    assert result.returncode == 0, result.stderr
    for path in paths:
        plane.wait(
            lambda path=path: plane.get(path, missing_ok=True) is None, timeout=60, what=f"{path} deleted"
        )
