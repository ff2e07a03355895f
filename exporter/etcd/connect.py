"""The one way to get an etcd client for a configured cluster, for the CLI and the service alike.

`connection(cluster)` reads the cluster's TLS files (TlsFileError names the cluster, the setting and
the file: the CLI exits 2 with it, the service refuses to start or to reload); the Connection then
makes clients on any aiohttp session without touching a file again.
"""

import ssl
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from exporter.config.settings import ClusterConfig, ConfigError
from exporter.etcd.client import EtcdApi, EtcdClient
from exporter.etcd.tls import TlsFileError, make_ssl_context

__all__ = ["Connection", "TlsFileError", "checked_connection", "client_factory", "connection"]


@dataclass(frozen=True)
class Connection:
    """How to reach one cluster: its TLS context (files already read) and its request timeout."""

    cluster: ClusterConfig
    ssl_context: ssl.SSLContext | None

    def client(
        self, session: aiohttp.ClientSession, *, max_timeout_seconds: float | None = None
    ) -> EtcdClient:
        """A client on `session`; `max_timeout_seconds` caps the cluster's request timeout (scrape budget)."""
        timeout = self.cluster.request_timeout_seconds
        if max_timeout_seconds is not None:
            timeout = min(timeout, max_timeout_seconds)
        return EtcdClient(
            session,
            ssl_context=self.ssl_context,
            server_name=self.cluster.tls.server_name if self.cluster.tls else None,
            timeout_seconds=timeout,
        )


def connection(cluster: ClusterConfig) -> Connection:
    """The cluster's connection, its TLS files read now; TlsFileError when one cannot be used."""
    context = make_ssl_context(cluster.tls, cluster=cluster.name) if cluster.tls is not None else None
    return Connection(cluster, context)


def checked_connection(cluster: ClusterConfig) -> Connection:
    """connection(), with a TLS file that cannot be used as the ConfigError a user sees (exit 2)."""
    try:
        return connection(cluster)
    except TlsFileError as exc:
        raise ConfigError(str(exc)) from None


def client_factory(
    session: aiohttp.ClientSession, *, max_timeout_seconds: float | None = None
) -> Callable[[ClusterConfig], EtcdApi]:
    """Clients per cluster on one shared session (the service's refresher makes one per cluster)."""

    def make(cluster: ClusterConfig) -> EtcdApi:
        return connection(cluster).client(session, max_timeout_seconds=max_timeout_seconds)

    return make
