"""One spec per variant behind one table (exporter/kubernetes/variants.py), and its callers following it."""

from typing import Any

import pytest
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient
from test_deploy import kubeadm_static_pod, permissions
from test_jobs import validate

from exporter.config.settings import ClusterConfig
from exporter.core.launches import Trigger
from exporter.kubernetes.api import RBAC_RULES, discover
from exporter.kubernetes.jobs import CA_FILE, CERT_FILE, KEY_FILE, build_job
from exporter.kubernetes.variants import (
    JOB_RBAC_RULES,
    VARIANTS,
    Members,
    TlsSource,
    Variant,
    spec_of,
    variants_where,
)

# One cluster per variant, each as small as its variant allows (every variant must have one).
EXAMPLES: dict[Variant, dict[str, Any]] = {
    Variant.KAMAJI: {
        "endpoints": ["https://kamaji-etcd-0.kamaji-etcd.kamaji-system.svc.cluster.local:2379"],
        "kubernetes": {
            "namespace": "kamaji-system",
            "variant": "kamaji",
            "etcd_name": "kamaji-etcd",
            "secret_layout": "self-signed",
        },
    },
    Variant.TALOS: {
        "endpoints": ["https://10.0.0.11:2379"],
        "kubernetes": {"namespace": "kube-system", "variant": "talos", "tls_secret": "etcd-client"},
    },
    Variant.KUBEADM: {
        "endpoints": ["https://10.0.0.11:2379"],
        "kubernetes": {"namespace": "kube-system", "variant": "kubeadm"},
    },
    Variant.PLAIN: {"endpoints": ["http://10.0.0.11:2379"], "kubernetes": {"namespace": "etcd"}},
}
TRIGGER = Trigger(alertname="EtcdDefragRecommended")


def example(variant: Variant, **kubernetes: Any) -> ClusterConfig:
    data = EXAMPLES[variant]
    return ClusterConfig.model_validate(
        {"name": "tenant-a", **data, "kubernetes": {**data["kubernetes"], **kubernetes}}
    )


def test_the_table_covers_every_variant_once() -> None:
    """A new Variant without a spec fails here, before it can fall into another variant's behaviour."""
    assert set(VARIANTS) == set(Variant)
    assert all(spec.variant is variant for variant, spec in VARIANTS.items())
    assert set(EXAMPLES) == set(Variant)


@pytest.mark.parametrize("variant", list(Variant))
def test_the_job_pod_follows_the_variants_spec(variant: Variant) -> None:
    spec = spec_of(variant)
    job = build_job(example(variant), image="img:1", trigger=TRIGGER, cooldown_seconds=60)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert (pod["securityContext"]["runAsUser"] == 0) is spec.placement.run_as_root
    assert pod.get("hostNetwork", False) is spec.placement.host_network
    assert ("nodeSelector" in pod) is spec.placement.control_plane_nodes
    volumes = pod["volumes"]
    match spec.tls:
        case TlsSource.KAMAJI_SECRETS:
            assert any("projected" in v for v in volumes)
        case TlsSource.TLS_SECRET:
            assert any(v.get("secret", {}).get("secretName") == "etcd-client" for v in volumes) is (
                variant is Variant.TALOS  # the plain example has no tls_secret: no TLS at all
            )
        case TlsSource.NODE_PKI:
            assert any("hostPath" in v for v in volumes)
    tls_flags = [args[args.index(flag) + 1] for flag in ("--cacert", "--cert", "--key") if flag in args]
    mounted = spec.tls.always_mounted or variant is Variant.TALOS
    assert tls_flags == ([CA_FILE, CERT_FILE, KEY_FILE] if mounted else [])


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if not s.tls.always_mounted])
def test_a_variant_that_mounts_tls_only_from_its_secret_needs_https_then(variant: Variant) -> None:
    with pytest.raises(ValueError, match=r"kubernetes\.tls_secret is required"):
        ClusterConfig.model_validate(
            {
                "name": "a",
                "endpoints": ["https://10.0.0.1:2379"],
                "kubernetes": {"namespace": "e", "variant": variant},
            }
        )


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if s.tls.always_mounted])
def test_a_variant_that_always_mounts_tls_refuses_plain_http(variant: Variant) -> None:
    data = EXAMPLES[variant]
    with pytest.raises(ValueError, match="is plain http"):
        ClusterConfig.model_validate({"name": "a", **data, "endpoints": ["http://10.0.0.1:2379"]})


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if not s.discovers_endpoints])
def test_discover_endpoints_is_refused_where_the_api_does_not_list_the_members(variant: Variant) -> None:
    with pytest.raises(ValueError, match=r"discover_endpoints works with variants kamaji and kubeadm, not"):
        example(variant, discover_endpoints=True)


def test_messages_name_the_variants_the_table_says() -> None:
    assert variants_where(lambda s: s.members is Members.STATEFULSET) == "variant kamaji"
    assert variants_where(lambda s: s.tls is TlsSource.TLS_SECRET) == "variants talos and plain"


def _namespace(path: str) -> str:
    parts = path.strip("/").split("/")
    return parts[parts.index("namespaces") + 1]


@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if s.discovers_endpoints])
async def test_discovery_reads_only_what_the_variants_rules_grant_where_they_grant_it(
    variant: Variant, fake_kube: FakeKube, kube_api: ApiClient
) -> None:
    """What discovery calls is the variant's own `api_rules`, in its `api_namespace`: the Roles
    (test_deploy.py) are checked against the same table."""
    spec = spec_of(variant)
    fake_kube.add_statefulset("kamaji-system", "kamaji-etcd", replicas=3)
    for i in (11, 12):
        fake_kube.add_pod(kubeadm_static_pod(f"cp-{i}", f"10.0.0.{i}"))
    configured = example(variant, discover_endpoints=True).model_dump(exclude={"endpoints"})
    cluster = await discover(ClusterConfig.model_validate(configured), kube_api)
    match spec.members:
        case Members.STATEFULSET:
            assert len(cluster.endpoints) == 3
        case Members.STATIC_PODS:
            assert cluster.endpoints == ["https://10.0.0.11:2379", "https://10.0.0.12:2379"]
        case Members.CONFIGURED:
            pytest.fail("a CONFIGURED variant does not discover")
    assert cluster.kubernetes is not None
    where = spec.api_namespace or cluster.kubernetes.namespace
    assert fake_kube.requests
    for request in fake_kube.requests:
        assert request.rbac() in permissions(list(spec.api_rules)), request
        assert _namespace(request.path) == where, request


def test_rbac_rules_are_the_job_rules_and_every_variants_reads() -> None:
    expected = permissions(list(JOB_RBAC_RULES))
    for spec in VARIANTS.values():
        expected |= permissions(list(spec.api_rules))
    assert permissions(RBAC_RULES) == expected
