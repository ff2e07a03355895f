"""Starting the service and reloading it: what `etcd-autodefrag serve` runs.

Start-up checks everything a user configured before anything is served (TLS files per cluster,
the webhook's credentials, the clusters the Kubernetes API resolves, the listen address), so a
mistake is an error message and an exit code, not a service that half works. SIGHUP re-reads the
cluster list; other settings need a restart, and the log says which changed.
"""

import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from exporter.config.settings import (
    DEFAULT_ENDPOINT,
    ConfigError,
    Settings,
    default_cluster,
    load_settings,
)
from exporter.etcd.connect import checked_connection
from exporter.kubernetes.discovery import DiscoveryError, discovered
from exporter.service.app import create_app, reconfigure, shard_from_settings

log = logging.getLogger(__name__)


class CannotListen(Exception):
    """The listen address cannot be bound (in use, not an address of this host)."""


def needs_restart(running: Settings, fresh: Settings) -> list[str]:
    """The settings other than `clusters` that differ: a reload does not apply them."""
    return [
        name
        for name in type(running).model_fields
        if name != "clusters" and getattr(running, name) != getattr(fresh, name)
    ]


def run(settings: Settings, config_file: Path | None, overrides: dict[str, Any] | None = None) -> None:
    """Run the service until SIGTERM/SIGINT; SIGHUP re-reads the cluster list from the config file.

    `overrides` are the command-line values that beat the file (`--listen`), applied on reload too.
    Raises ConfigError (bad TLS files, an open webhook beyond loopback, unreadable secrets),
    DiscoveryError (the Kubernetes API could not resolve a cluster) or CannotListen, each before
    anything is served.
    """
    shard = shard_from_settings(settings)  # ConfigError before any cluster is contacted
    clusters = settings.clusters
    discovering = settings.discover.kamaji_datastores.enabled
    if discovering:
        selector = settings.discover.kamaji_datastores.label_selector
        log.info(
            "following Kamaji DataStores%s: every etcd DataStore becomes a cluster",
            f" with labels {selector}" if selector else "",
        )
    elif not clusters:
        clusters = [default_cluster()]
        log.info(
            "no clusters configured: watching one cluster 'local' at %s (give --config to change)",
            DEFAULT_ENDPOINT,
        )
    for cluster in clusters:
        checked_connection(cluster)  # ConfigError naming the cluster, setting and file
    clusters = asyncio.run(discovered(clusters))
    # Raises ConfigError (exit 2 in main) for an open webhook beyond loopback or unreadable secrets.
    app = create_app(settings, clusters=clusters, shard=shard)
    reloading: set[asyncio.Task[None]] = set()

    async def reload_on_sighup(app: web.Application) -> None:
        async def reload() -> None:
            try:
                fresh = load_settings(config_file, **(overrides or {}))
                clusters = await discovered(fresh.clusters or ([] if discovering else [default_cluster()]))
                for cluster in clusters:
                    checked_connection(cluster)
            except (ConfigError, DiscoveryError) as exc:
                log.error("SIGHUP: configuration not reloaded, keeping the current one: %s", exc)
                return
            reconfigure(app, clusters)
            log.info("SIGHUP: reloaded %d clusters from %s", len(fresh.clusters), config_file)
            if changed := needs_restart(settings, fresh):
                log.warning(
                    "SIGHUP: %s changed in %s but only the cluster list is reloaded: restart the "
                    "service to apply them",
                    ", ".join(changed),
                    config_file,
                )

        def start_reload() -> None:
            task = asyncio.get_running_loop().create_task(reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        if config_file is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, start_reload)

    app.on_startup.append(reload_on_sighup)
    # Bind before saying "serving": a port in use is then the only thing "cannot listen" can mean,
    # and any other failure at start-up keeps its own message.
    try:
        sockets = bind(settings.listen_host, settings.listen_port)
    except OSError as exc:
        raise CannotListen(f"cannot listen on {settings.listen_address}: {exc.strerror or exc}") from None
    observed = [c.name for c in clusters if shard.owns(c.name)]
    log.info(
        "serving /metrics for %d clusters (%s)%s%s and the webhook /webhook/alertmanager for %s on "
        "http://%s:%d",
        len(observed),
        ", ".join(observed),
        " and the Kamaji DataStores" if discovering else "",
        f", {shard}" if shard.sharded else "",
        f"all {len(clusters)}" if shard.sharded else "them",
        settings.listen_host,
        settings.listen_port,
    )
    with contextlib.ExitStack() as bound:
        for sock in sockets:
            bound.enter_context(sock)
        # One site per socket; any start-up error of the app itself keeps its own words.
        web.run_app(app, sock=sockets, print=None, access_log=None)


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port (both families for a name like `localhost`), as aiohttp would."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # once each, in order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
