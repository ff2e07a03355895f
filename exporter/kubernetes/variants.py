"""How etcd is deployed (the `kubernetes.variant` of a cluster), one spec per variant, in one table.

Everything that differs by variant is a field of its VariantSpec: where the members run (and so how
the Kubernetes API can list them), where a defrag Pod finds the client certificate, where that Pod
is placed, and what the service reads from the API for it. The settings' checks, the Job's pod
(exporter/kubernetes/jobs.py), discovery (exporter/kubernetes/api.py), the rollout gate
(exporter/launch/kubernetes.py) and the shipped Roles (deploy/overlays/*/rbac.yaml, compared by
tests/test_deploy.py) all read this table, and tests/test_variants.py fails when a Variant has no
entry: a new variant cannot silently fall into another's behaviour. Callers `match` on the small
enums below with `assert_never`, so mypy also names every place a new kind of member or certificate
must be handled. Pure: no I/O.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class Variant(StrEnum):
    """How etcd is deployed, which says where the Job finds the client certificate."""

    KAMAJI = "kamaji"
    TALOS = "talos"
    KUBEADM = "kubeadm"
    PLAIN = "plain"


class Members(StrEnum):
    """Where the etcd members run, which says whether and how the Kubernetes API lists them."""

    STATEFULSET = "statefulset"  # kamaji-etcd: one member per replica of the StatefulSet `etcd_name`
    STATIC_PODS = "static_pods"  # kubeadm: static pods labelled component=etcd in kube-system
    CONFIGURED = "configured"  # outside the API's view (Talos nodes, anything else): `endpoints` only


class TlsSource(StrEnum):
    """Where a defrag Pod finds the etcd client certificate."""

    KAMAJI_SECRETS = "kamaji_secrets"  # the kamaji-etcd chart's Secrets, by secret_layout (kamaji.py)
    TLS_SECRET = "tls_secret"  # one Secret `tls_secret`, if set (else plain http, no TLS at all)
    NODE_PKI = "node_pki"  # kubeadm's files on the control-plane node (hostPath)

    @property
    def always_mounted(self) -> bool:
        """Whether the Pod always mounts client TLS (so the endpoints must be https)."""
        return self is not TlsSource.TLS_SECRET


@dataclass(frozen=True)
class Placement:
    """Where and as whom a defrag Pod runs."""

    # kubeadm writes its etcd client key root-owned 0600: only uid 0 can read it (no capability
    # needed, so none is granted). Everyone else runs as the image's non-root user.
    run_as_root: bool = False
    # kubeadm's etcd listens on the node addresses, reachable from the host network.
    host_network: bool = False
    # The certificate is a file on control-plane nodes: the Pod must run on one.
    control_plane_nodes: bool = False


Rule = Mapping[str, list[str]]  # one Role rule: apiGroups, resources, verbs

# What the service calls in every namespace where it creates defrag Jobs, whatever the variant:
# create the Job (its name is the lock), read it back on a 409, list and watch how Jobs end; list
# the pods of a finished Job (their termination message is the report); record Events on the Job.
JOB_RBAC_RULES: tuple[Rule, ...] = (
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
)


@dataclass(frozen=True)
class VariantSpec:
    """Everything that differs between variants."""

    variant: Variant
    members: Members
    tls: TlsSource
    placement: Placement
    # What the service reads from the API for a cluster of this variant, beyond JOB_RBAC_RULES:
    # discovery, the certificate layout, the rollout gate.
    api_rules: tuple[Rule, ...] = ()
    # Where those reads go; None: the Job's own namespace (`kubernetes.namespace`).
    api_namespace: str | None = None

    @property
    def discovers_endpoints(self) -> bool:
        """Whether `kubernetes.discover_endpoints` can read this variant's members from the API."""
        return self.members is not Members.CONFIGURED


KUBEADM_NAMESPACE = "kube-system"

VARIANTS: Mapping[Variant, VariantSpec] = MappingProxyType(
    {
        Variant.KAMAJI: VariantSpec(
            Variant.KAMAJI,
            members=Members.STATEFULSET,
            tls=TlsSource.KAMAJI_SECRETS,
            placement=Placement(),
            # The StatefulSet: its replicas (discovery), the Secrets it mounts (secret_layout auto)
            # and its rollout (the gate). Never the Secrets themselves: they hold the CA's key.
            api_rules=({"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get"]},),
        ),
        Variant.TALOS: VariantSpec(
            Variant.TALOS, members=Members.CONFIGURED, tls=TlsSource.TLS_SECRET, placement=Placement()
        ),
        Variant.KUBEADM: VariantSpec(
            Variant.KUBEADM,
            members=Members.STATIC_PODS,
            tls=TlsSource.NODE_PKI,
            placement=Placement(run_as_root=True, host_network=True, control_plane_nodes=True),
            api_rules=({"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},),
            api_namespace=KUBEADM_NAMESPACE,
        ),
        Variant.PLAIN: VariantSpec(
            Variant.PLAIN, members=Members.CONFIGURED, tls=TlsSource.TLS_SECRET, placement=Placement()
        ),
    }
)


def spec_of(variant: Variant) -> VariantSpec:
    """The spec of `variant` (every Variant has one: tests/test_variants.py)."""
    return VARIANTS[variant]


def variants_where(predicate: Callable[[VariantSpec], bool]) -> str:
    """The variants whose spec satisfies `predicate`, for messages: "variants kamaji and kubeadm"."""
    names = [spec.variant.value for spec in VARIANTS.values() if predicate(spec)]
    if len(names) == 1:
        return f"variant {names[0]}"
    return f"variants {', '.join(names[:-1])} and {names[-1]}"


def service_rbac_rules() -> list[dict[str, list[str]]]:
    """Every rule the service may need in some namespace: JOB_RBAC_RULES and each variant's reads."""
    rules: list[dict[str, list[str]]] = []
    for rule in [*JOB_RBAC_RULES, *(r for spec in VARIANTS.values() for r in spec.api_rules)]:
        if rule not in rules:
            rules.append({key: list(values) for key, values in rule.items()})
    return rules
