"""Kamaji DataStores as clusters: what a DataStore says, and the cluster it becomes. Pure: the reads
(list, watch, Secrets) are exporter.kubernetes.api's, and exporter.service.datastores keeps the set.

A DataStore (kamaji.clastix.io/v1alpha1, cluster-scoped; api/v1alpha1/datastore_types.go of the
Kamaji release pinned in scripts/build-kubernetes) names the shared database of many tenant control
planes:

- `spec.driver`: etcd, MySQL, PostgreSQL or NATS; only etcd is ours.
- `spec.endpoints`: bare `host:port` ("No need for protocol").
- `spec.tlsConfig.certificateAuthority.{certificate,privateKey}` and
  `spec.tlsConfig.clientCertificate.{certificate,privateKey}`, each a ContentRef: `content` (base64
  in the JSON, as Go encodes []byte) or `secretReference {name, namespace, keyPath}`; `content`
  has precedence, as in Kamaji. We read the CA's `certificate` only, never its `privateKey`.
- `status.usedBy`: the TenantControlPlanes that use it, as `namespace/name`.

Each etcd DataStore becomes a cluster named after it: endpoints `https://host:port` when it has
TLS, else `http://`; the rest from `discover.kamaji_datastores.defaults`. Its defrag Job runs in
the namespace of the client certificate's Secret and mounts the Secrets themselves (the plain
variant with `tls_secret`, `ca_secret` and the key paths), so a renewed certificate needs no copy.
A Pod mounts only Secrets of its own namespace and never inline content, so a DataStore with inline
material, or with its CA in another namespace, gets no Job (`job_refusal` says why); it is still
watched and exported.
"""

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from exporter.config.settings import (
    ClusterConfig,
    KamajiDataStores,
    TlsConfig,
    format_validation_error,
)

DATASTORE_GROUP = "kamaji.clastix.io"
DATASTORE_VERSION = "v1alpha1"
DATASTORE_PLURAL = "datastores"
ETCD_DRIVER = "etcd"

Json = dict[str, Any]


class DataStoreError(ValueError):
    """The DataStore cannot become a cluster; the message says why (logged once per change)."""


@dataclass(frozen=True, order=True)
class SecretRef:
    """One key of one Secret."""

    namespace: str
    name: str
    key: str

    @property
    def secret(self) -> tuple[str, str]:
        """(namespace, name): the object to read."""
        return self.namespace, self.name


@dataclass(frozen=True)
class Material:
    """One PEM file of the TLS config: inline content, or a key of a Secret."""

    content: bytes | None = None
    ref: SecretRef | None = None

    def describe(self) -> str:
        """`Secret ns/name key k` or `inline content`, for messages."""
        if self.ref is None:
            return "inline content"
        return f"Secret {self.ref.namespace}/{self.ref.name} key {self.ref.key}"


@dataclass(frozen=True)
class DataStoreTls:
    """The CA certificate and, when given, the client certificate and key."""

    ca: Material
    cert: Material | None = None
    key: Material | None = None

    def materials(self) -> dict[str, Material]:
        """By file name: ca.crt, and tls.crt/tls.key when there is a client certificate."""
        files = {"ca.crt": self.ca}
        if self.cert is not None and self.key is not None:
            files |= {"tls.crt": self.cert, "tls.key": self.key}
        return files


@dataclass(frozen=True)
class DataStore:
    """What we use of one DataStore."""

    name: str
    driver: str
    endpoints: tuple[str, ...]
    tls: DataStoreTls | None
    tenants: tuple[str, ...]
    resource_version: str = ""

    @property
    def is_etcd(self) -> bool:
        return self.driver == ETCD_DRIVER

    def secrets(self) -> list[tuple[str, str]]:
        """(namespace, name) of every Secret its TLS material is read from, sorted."""
        if self.tls is None:
            return []
        refs = {m.ref.secret for m in self.tls.materials().values() if m.ref is not None}
        return sorted(refs)


def parse_datastore(obj: Json) -> DataStore:
    """The DataStore as the API returns it; DataStoreError for a shape the CRD would not allow."""
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name") or "")
    if not name:
        raise DataStoreError("a DataStore without a name")
    spec = obj.get("spec") or {}
    endpoints = spec.get("endpoints") or []
    if not isinstance(endpoints, list) or not all(isinstance(e, str) and e for e in endpoints):
        raise DataStoreError(f"DataStore {name}: spec.endpoints must be a list of host:port")
    tls_config = spec.get("tlsConfig")
    tls = None
    if tls_config:
        where = f"DataStore {name}: spec.tlsConfig"
        ca = _material(
            (tls_config.get("certificateAuthority") or {}).get("certificate"),
            f"{where}.certificateAuthority.certificate",
        )
        client = tls_config.get("clientCertificate")
        cert = key = None
        if client:
            cert = _material(client.get("certificate"), f"{where}.clientCertificate.certificate")
            key = _material(client.get("privateKey"), f"{where}.clientCertificate.privateKey")
        tls = DataStoreTls(ca, cert, key)
    used_by = (obj.get("status") or {}).get("usedBy") or []
    return DataStore(
        name=name,
        driver=str(spec.get("driver") or ""),
        endpoints=tuple(endpoints),
        tls=tls,
        tenants=tuple(sorted({str(t) for t in used_by})),
        resource_version=str(metadata.get("resourceVersion") or ""),
    )


def _material(ref: Any, where: str) -> Material:
    """A ContentRef: `content` wins over `secretReference`, as in Kamaji."""
    if not isinstance(ref, dict):
        raise DataStoreError(f"{where} is missing")
    if content := ref.get("content"):
        try:
            return Material(content=base64.b64decode(content, validate=True))
        except (binascii.Error, ValueError, TypeError):
            raise DataStoreError(f"{where}.content is not base64") from None
    secret = ref.get("secretReference")
    if isinstance(secret, dict) and secret.get("name") and secret.get("namespace") and secret.get("keyPath"):
        return Material(ref=SecretRef(str(secret["namespace"]), str(secret["name"]), str(secret["keyPath"])))
    raise DataStoreError(f"{where}: neither content nor a secretReference with name, namespace and keyPath")


def material_bytes(tls: DataStoreTls, secrets: Mapping[tuple[str, str], Json]) -> dict[str, bytes]:
    """The PEM bytes by file name (ca.crt, tls.crt, tls.key), from inline content or the Secrets read.

    DataStoreError when a referenced Secret or key is missing (the Secret may not exist yet).
    """
    out = {}
    for file, material in tls.materials().items():
        if material.content is not None:
            out[file] = material.content
            continue
        assert material.ref is not None
        secret = secrets.get(material.ref.secret)
        if secret is None:
            raise DataStoreError(f"{material.describe()}: the Secret cannot be read")
        value = (secret.get("data") or {}).get(material.ref.key)
        if value is None:
            raise DataStoreError(f"{material.describe()}: no such key in the Secret")
        try:
            out[file] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise DataStoreError(f"{material.describe()}: not base64 in the Secret's data") from None
    return out


def endpoints_of(datastore: DataStore) -> list[str]:
    """Client URLs: `https://host:port` when the DataStore has TLS, else `http://host:port`."""
    scheme = "https" if datastore.tls is not None else "http"
    return [e if "://" in e else f"{scheme}://{e}" for e in datastore.endpoints]


def job_target(datastore: DataStore) -> tuple[dict[str, Any] | None, str | None]:
    """The `kubernetes` section of its Job, or None and why no Job can run it.

    The Job runs in the namespace of the client certificate's Secret and mounts the Secrets there.
    """
    tls = datastore.tls
    if tls is None:
        return None, "it has no tlsConfig, so there is no client Secret to place the Job by"
    if tls.cert is None or tls.key is None:
        return None, "it has no clientCertificate, so there is no client Secret to place the Job by"
    cert, key, ca = tls.cert.ref, tls.key.ref, tls.ca.ref
    if cert is None or key is None or ca is None:
        inline = [f for f, m in tls.materials().items() if m.ref is None]
        return None, (
            f"its TLS material ({', '.join(inline)}) is inline content, which a Pod cannot mount: "
            "reference Secrets in the DataStore, or add a clusters: entry of that name"
        )
    if key.secret != cert.secret:
        return None, (
            f"its client certificate and key are in two Secrets ({cert.namespace}/{cert.name}, "
            f"{key.namespace}/{key.name}); a Job mounts one client Secret"
        )
    if ca.namespace != cert.namespace:
        return None, (
            f"its CA is in namespace {ca.namespace} and its client certificate in {cert.namespace}; "
            "a Pod mounts Secrets of its own namespace only"
        )
    target: dict[str, Any] = {
        "namespace": cert.namespace,
        "tls_secret": cert.name,
        "ca_key": ca.key,
        "cert_key": cert.key,
        "key_key": key.key,
    }
    if ca.name != cert.name:
        target["ca_secret"] = ca.name
    return target, None


@dataclass(frozen=True)
class Translation:
    """The cluster a DataStore becomes, and why it has no Job when it has none."""

    cluster: ClusterConfig
    job_refusal: str | None


def translate(datastore: DataStore, discovery: KamajiDataStores, tls: TlsConfig | None) -> Translation:
    """The cluster for an etcd DataStore; `tls` points at its material's files (None without TLS).

    DataStoreError when it cannot be one (not etcd, or a name or endpoint our config refuses).
    """
    if not datastore.is_etcd:
        raise DataStoreError(f"DataStore {datastore.name}: driver {datastore.driver or '(none)'}, not etcd")
    if (datastore.tls is None) != (tls is None):
        raise ValueError("the TLS files must be given exactly when the DataStore has TLS")
    target, refusal = job_target(datastore)
    try:
        cluster = discovery.cluster(
            name=datastore.name, endpoints=endpoints_of(datastore), tls=tls, kubernetes=target
        )
    except ValidationError as exc:
        problems = format_validation_error(exc).splitlines()[1:]
        reason = "; ".join(p.strip().removeprefix("(top level): ") for p in problems)
        raise DataStoreError(f"DataStore {datastore.name}: {reason}") from None
    return Translation(cluster, refusal)


def merge_clusters(
    configured: Sequence[ClusterConfig], discovered: Iterable[ClusterConfig]
) -> tuple[list[ClusterConfig], list[str]]:
    """Configured clusters, then the discovered ones by name; a configured name overrides (listed)."""
    names = {c.name for c in configured}
    merged = list(configured)
    overridden = []
    for cluster in sorted(discovered, key=lambda c: c.name):
        if cluster.name in names:
            overridden.append(cluster.name)
        else:
            merged.append(cluster)
    return merged, overridden
