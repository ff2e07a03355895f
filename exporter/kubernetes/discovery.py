"""Resolving clusters with what the Kubernetes API says now, before the service or a run uses them.

The endpoints of a `kubernetes.discover_endpoints` cluster and kamaji-etcd's certificate layout
(`kubernetes.secret_layout: auto`) come from the API (kubernetes.api.discover); the result is the
cluster as data, which is what a run is then handed.
"""

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from exporter.config.settings import ClusterConfig, ConfigError
from exporter.kubernetes import api as kube

log = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """The Kubernetes API could not tell a cluster's endpoints."""


async def discovered(clusters: Sequence[ClusterConfig]) -> list[ClusterConfig]:
    """The clusters with what the API says now: endpoints (`kubernetes.discover_endpoints`) and
    kamaji-etcd's Secret layout (`kubernetes.secret_layout: auto`), by kube.discover.

    The API client is in-cluster in a Pod, else the kubeconfig ($KUBECONFIG, ~/.kube/config).
    """
    if not any(c.reads_kubernetes_api for c in clusters):
        return list(clusters)
    # $KUBECONFIG as the process sees it now (the client library reads it once, at import).
    kubeconfig = Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None
    try:
        api = await kube.kube_api_client(kubeconfig=kubeconfig)
    except ConfigError as exc:
        raise DiscoveryError(f"cannot discover endpoints: {exc}") from None
    out = []
    async with api:
        for cluster in clusters:
            if cluster.reads_kubernetes_api:
                try:
                    found = await kube.discover(cluster, api)
                except kube.KubeError as exc:
                    what = "its endpoints" if cluster.discovers_endpoints else "its certificate layout"
                    raise DiscoveryError(f"cluster {cluster.name}: cannot discover {what}: {exc}") from None
                except ValueError as exc:  # e.g. plain http URLs for a variant that mounts TLS
                    raise DiscoveryError(f"cluster {cluster.name}: discovered: {exc}") from None
                if found.discovers_endpoints:
                    log.info(
                        "cluster %s: %d endpoints from the Kubernetes API: %s",
                        cluster.name,
                        len(found.endpoints),
                        ", ".join(found.endpoints),
                    )
                if found.kubernetes != cluster.kubernetes and found.kubernetes is not None:
                    log.info(
                        "cluster %s: kamaji-etcd certificates from the StatefulSet: %s layout, %s",
                        cluster.name,
                        found.kubernetes.secret_layout.value,
                        found.kubernetes.kamaji_secrets.describe(),
                    )
                cluster = found
            out.append(cluster)
    return out
