"""The service: an aiohttp app factory wiring settings, etcd clients, the refresher and /metrics.

`create_app(settings)` builds everything from one settings object; collaborators live under typed
`web.AppKey`s and the HTTP session's lifetime is a `cleanup_ctx` (as prometheus-aioexporter does).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from exporter.etcd import EtcdApi, EtcdClient, TlsFiles, make_ssl_context
from exporter.metrics import SnapshotCollector
from exporter.refresh import Refresher
from exporter.settings import ClusterConfig, Settings

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REFRESHER = web.AppKey("refresher", Refresher)
REGISTRY = web.AppKey("registry", CollectorRegistry)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def client_factory(session: aiohttp.ClientSession, settings: Settings) -> Callable[[ClusterConfig], EtcdApi]:
    """Clients per cluster on the shared session; request timeouts capped by the scrape budget."""

    def make(cluster: ClusterConfig) -> EtcdApi:
        ssl_context = None
        if cluster.tls is not None:
            tls = cluster.tls
            ssl_context = make_ssl_context(TlsFiles(tls.ca_file, tls.cert_file, tls.key_file))
        return EtcdClient(
            session,
            ssl_context=ssl_context,
            server_name=cluster.tls.server_name if cluster.tls else None,
            timeout_seconds=min(cluster.request_timeout_seconds, settings.scrape_budget_seconds),
        )

    return make


def create_app(settings: Settings, *, clusters: list[ClusterConfig]) -> web.Application:
    """The service for these clusters (the CLI resolves the embedded default before calling)."""
    app = web.Application()
    app[SETTINGS] = settings
    registry = CollectorRegistry(auto_describe=False)
    app[REGISTRY] = registry
    metrics_handler = make_aiohttp_handler(registry)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=settings.max_concurrent_requests, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[SESSION] = session
            refresher = Refresher(
                clusters,
                client_factory(session, settings),
                scrape_budget_seconds=settings.scrape_budget_seconds,
                min_refresh_interval_seconds=settings.min_refresh_interval_seconds,
                member_list_refresh_seconds=settings.member_list_refresh_seconds,
            )
            app[REFRESHER] = refresher
            registry.register(SnapshotCollector(refresher))
            background = asyncio.create_task(_refresh_forever(refresher, settings))
            yield
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background

    async def metrics(request: web.Request) -> web.StreamResponse:
        await request.app[REFRESHER].refresh()
        return await metrics_handler(request)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if request.app[REFRESHER].ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="waiting for the first refresh of every cluster\n")

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _refresh_forever(refresher: Refresher, settings: Settings) -> None:
    """Keep snapshots no older than `background_refresh_seconds` when nobody scrapes."""
    while True:
        try:
            await refresher.refresh(max_age_seconds=settings.background_refresh_seconds)
        except Exception:  # a bug must not stop the loop silently: log it and go on
            log.exception("background refresh failed")
        await asyncio.sleep(settings.background_refresh_seconds / 2)
