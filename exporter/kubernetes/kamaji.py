"""kamaji-etcd as the `kamaji` variant sees it: where its client certificate lives, how to tell, and
its members' client URLs. Pure: the one read it needs (the StatefulSet) is exporter.kubernetes.api's.

The kamaji-etcd chart (clastix/kamaji-etcd, charts/kamaji-etcd) issues its certificates one of two
ways, chosen by values that are mutually exclusive (templates/_helpers.tpl fails on both):

- `selfSignedCertificates.enabled` (the chart's default, and a standalone install's): Jobs run cfssl
  and store Secret `<name>-certs` (`ca.crt`, `ca.key`, server and peer files) and Secret
  `<name>-root-client-certs` (`tls.crt`, `tls.key`). The StatefulSet mounts `<name>-certs`.
- `certManager.enabled` (what Kamaji's own chart sets since it installs kamaji-etcd with
  `selfSignedCertificates.enabled: false`): cert-manager Certificates `<name>-ca`,
  `<name>-server-certs`, `<name>-peer-certs` and `<name>-client-certs`, each a Secret with `ca.crt`,
  `tls.crt`, `tls.key`. The StatefulSet mounts `<name>-server-certs` and `<name>-peer-certs`.

For cert-manager we take all three files from `<name>-client-certs`: its `ca.crt` is the CA of the
Issuer that signed it, the Issuer that signed the servers' certificates too (etcd's own
`--trusted-ca-file` is `ca.crt` of `<name>-server-certs`, from that same Issuer). Mounting
`<name>-ca` would put the Secret that holds the CA's private key into every defrag Pod for nothing.

Which layout a cluster uses is read from the StatefulSet's Pod template (the Secrets its etcd
mounts), the object Kamaji discovery reads anyway: no access to Secrets (which would include the
CA keys) and no cluster-wide read of Kamaji's DataStores is needed. docs/kamaji.md has the detail.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Json = dict[str, Any]

DEFAULT_CLUSTER_DOMAIN = "cluster.local"  # the chart's clusterDomain
DEFAULT_CLIENT_PORT = 2379  # the chart's clientPort


class SecretLayout(StrEnum):
    """Which Secrets hold kamaji-etcd's CA and client certificate."""

    AUTO = "auto"  # read from the StatefulSet when the service starts (detect_layout)
    SELF_SIGNED = "self-signed"  # selfSignedCertificates.enabled: <name>-certs, <name>-root-client-certs
    CERT_MANAGER = "cert-manager"  # certManager.enabled: <name>-client-certs


@dataclass(frozen=True)
class ClientSecrets:
    """Where a defrag Pod finds the CA (`ca_secret`/`ca_key`) and the client's `tls.crt`/`tls.key`."""

    ca_secret: str
    ca_key: str
    client_secret: str
    cert_key: str = "tls.crt"
    key_key: str = "tls.key"

    @property
    def names(self) -> list[str]:
        """The Secrets, each once, in mount order."""
        return list(dict.fromkeys([self.ca_secret, self.client_secret]))

    def describe(self) -> str:
        """`Secret a (ca.crt), Secret b (tls.crt, tls.key)`, for notes and messages."""
        if self.ca_secret == self.client_secret:
            return f"Secret {self.client_secret} ({self.ca_key}, {self.cert_key}, {self.key_key})"
        return (
            f"Secret {self.ca_secret} ({self.ca_key}), "
            f"Secret {self.client_secret} ({self.cert_key}, {self.key_key})"
        )


def client_secrets(layout: SecretLayout, etcd_name: str) -> ClientSecrets:
    """The Secrets of a layout; ValueError for AUTO, which must be resolved first (detect_layout)."""
    match layout:
        case SecretLayout.SELF_SIGNED:
            return ClientSecrets(f"{etcd_name}-certs", "ca.crt", f"{etcd_name}-root-client-certs")
        case SecretLayout.CERT_MANAGER:
            return ClientSecrets(f"{etcd_name}-client-certs", "ca.crt", f"{etcd_name}-client-certs")
        case _:
            raise ValueError(f"kamaji-etcd {etcd_name}: secret_layout {layout.value} is not resolved yet")


def detect_layout(statefulset: Json) -> SecretLayout | None:
    """The layout whose Secrets the StatefulSet's etcd mounts; None when it is neither of the chart's."""
    name = statefulset.get("metadata", {}).get("name", "")
    mounted = set(_pod_secret_names(statefulset))
    if f"{name}-certs" in mounted:
        return SecretLayout.SELF_SIGNED
    if f"{name}-server-certs" in mounted:
        return SecretLayout.CERT_MANAGER
    return None


def _pod_secret_names(statefulset: Json) -> Iterator[str]:
    """Every Secret the Pod template mounts, as a volume or a projected source."""
    pod = statefulset.get("spec", {}).get("template", {}).get("spec", {})
    for volume in pod.get("volumes") or []:
        if name := (volume.get("secret") or {}).get("secretName"):
            yield name
        for source in (volume.get("projected") or {}).get("sources") or []:
            if name := (source.get("secret") or {}).get("name"):
                yield name


def member_endpoints(
    statefulset: Json,
    service_name: str,
    namespace: str,
    *,
    port: int = DEFAULT_CLIENT_PORT,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    scheme: str = "https",
) -> list[str]:
    """One client URL per replica, by its stable name under the headless Service.

    The chart's own `--advertise-client-urls`:
    `https://$(POD_NAME).<service>.$(POD_NAMESPACE).svc.<clusterDomain>:<clientPort>`.
    """
    name = statefulset["metadata"]["name"]
    host = f"{service_name}.{namespace}.svc.{cluster_domain}"
    return [f"{scheme}://{name}-{i}.{host}:{port}" for i in range(statefulset_replicas(statefulset))]


def statefulset_replicas(statefulset: Json) -> int:
    """spec.replicas of a StatefulSet as the API returns it; 1, Kubernetes' default, when unset."""
    replicas = statefulset.get("spec", {}).get("replicas")
    return 1 if replicas is None else int(replicas)
