"""The service: an aiohttp app factory wiring settings, etcd clients, the refresher and /metrics.

`create_app(settings)` builds everything from one settings object; collaborators live under typed
`web.AppKey`s and the HTTP session's lifetime is a `cleanup_ctx` (as prometheus-aioexporter does).
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from exporter.config.settings import ClusterConfig, ConfigError, Settings
from exporter.core import clock
from exporter.core.report import RunOutcome, RunResult
from exporter.core.shard import Shard, ShardError, resolve_shard
from exporter.core.units import human_bytes
from exporter.etcd.connect import client_factory
from exporter.kubernetes.datastores import merge_clusters
from exporter.launch.choose import executor_from_settings
from exporter.launch.executor import Executor
from exporter.logs import LogThrottle, held_note
from exporter.service.auth import load_credentials
from exporter.service.datastores import DataStoreDiscovery, DataStoreJobs
from exporter.service.metrics import InFlightCollector, RunMetrics, SnapshotCollector, TenantCollector
from exporter.service.refresh import Refresher
from exporter.service.webhook import ALERT_OUTCOMES, PATH, SnapshotSource, Webhook

log = logging.getLogger(__name__)
http_log = logging.getLogger("exporter.http")

SETTINGS = web.AppKey("settings", Settings)
REFRESHER = web.AppKey("refresher", Refresher)
SNAPSHOTS = web.AppKey[SnapshotSource]("snapshots")
REGISTRY = web.AppKey("registry", CollectorRegistry)
SESSION = web.AppKey("session", aiohttp.ClientSession)
EXECUTOR = web.AppKey[Executor]("executor")
RUN_METRICS = web.AppKey("run_metrics", RunMetrics)
WEBHOOK = web.AppKey("webhook", Webhook)
SHARD = web.AppKey("shard", Shard)


# Every `result` a run can end with: the engine's results, or job_failed when no report came back.
RUN_RESULTS = [r.value for r in RunResult]


# What was wrong with a request aiohttp could not parse, in words that quote nothing of it.
_MALFORMED = (
    (BadHttpMethod, "not HTTP (TLS or another protocol sent to this plain-HTTP port?)"),
    (LineTooLong, "a request line or header is too long"),
    (InvalidHeader, "an invalid header"),
    (InvalidURLError, "an invalid URL"),
    (BadStatusLine, "an invalid request line"),
    (PayloadEncodingError, "a body that cannot be read (its chunked, length or content encoding)"),
)


class ServerLog:
    """Stands in for aiohttp's server logger (`web.Application(handler_args={"logger": ...})`).

    aiohttp logs a request it cannot parse as an ERROR with a traceback and the repr of the bytes
    received (`RequestHandler.handle_error`): 100 connections sending 200 KB of garbage each wrote
    ~51 MB of log in a second, without credentials. Here such a request is counted
    (`etcd_autodefrag_http_errors_total{cause="malformed_request"}`) and logged as one short
    WARNING per peer a minute, naming the peer and what was wrong, never what was sent. A handler
    that fails (a bug of ours, answered 500) keeps its traceback, once per exception type a minute.
    """

    def __init__(self, metrics: RunMetrics) -> None:
        self.metrics = metrics
        self.throttle = LogThrottle()

    def debug(self, msg: str, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        """aiohttp's debug lines (timeouts, early disconnects; a first request that is not HTTP)."""
        if _malformed(exc_info) is not None:
            self._malformed(exc_info, args)
        else:
            logging.getLogger("aiohttp.server").debug(msg, *args, exc_info=exc_info, **kwargs)

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        """aiohttp's error lines: a request it could not parse, or a handler that failed."""
        if isinstance(exc_info, web.RequestPayloadError):
            # The rest of a broken body, read by aiohttp after the answer was sent (the webhook
            # refused it with 400 if it read it): counted, and no more than a debug line.
            self.metrics.count_http_error("malformed_request")
            http_log.debug("http: the rest of a request's body cannot be read: %s", _malformed(exc_info))
            return
        if _malformed(exc_info) is not None:
            self._malformed(exc_info, args)
            return
        self.metrics.count_http_error("server_error")
        kind = type(exc_info).__name__ if isinstance(exc_info, BaseException) else msg
        held = self.throttle.admit(("server_error", kind), clock.monotonic())
        if held is not None:
            error = exc_info if isinstance(exc_info, BaseException) else None
            http_log.error(msg + "%s", *args, held_note(held), exc_info=error)

    def _malformed(self, exc: BaseException, args: tuple[Any, ...]) -> None:
        self.metrics.count_http_error("malformed_request")
        peer = str(args[0]) if args else "an unknown peer"  # "Error handling request from %s"
        held = self.throttle.admit(("malformed_request", peer), clock.monotonic())
        if held is not None:
            reason = _malformed(exc)
            http_log.warning("http: refused a malformed request from %s: %s%s", peer, reason, held_note(held))


def _malformed(exc: Any) -> str | None:
    """What was wrong when `exc` says a request was not valid HTTP, else None."""
    if isinstance(exc, web.RequestPayloadError):  # a body aiohttp could not decode
        exc = exc.__cause__
    if not isinstance(exc, HttpProcessingError):
        return None
    return next((text for kind, text in _MALFORMED if isinstance(exc, kind)), "malformed HTTP message")


class ClusterSet:
    """The clusters the service watches: the configured ones, and the discovered DataStores.

    A configured cluster overrides a discovered one of the same name. Every change goes to the
    refresher (and so to /metrics and the webhook's routing) and to the run counters at once.
    """

    def __init__(self, configured: list[ClusterConfig]) -> None:
        self.configured = list(configured)
        self.discovered: list[ClusterConfig] = []
        self._overridden: set[str] = set()

    def merged(self) -> list[ClusterConfig]:
        """Configured clusters, then the discovered ones no configured cluster overrides."""
        clusters, overridden = merge_clusters(self.configured, self.discovered)
        for name in sorted(set(overridden) - self._overridden):
            log.info("DataStore %s: the configured cluster of that name overrides it", name)
        self._overridden = set(overridden)
        return clusters

    def adopt(self, app: web.Application) -> None:
        """Hand the merged set to the refresher and the run counters."""
        clusters = self.merged()
        if REFRESHER in app:  # not when the tests hand in snapshots
            app[REFRESHER].reconfigure(clusters)
        owned = [c.name for c in clusters if app[SHARD].owns(c.name)]
        app[RUN_METRICS].declare_clusters(owned, RUN_RESULTS)


CLUSTER_SET = web.AppKey("cluster_set", ClusterSet)
DISCOVERY = web.AppKey("discovery", DataStoreDiscovery)


def reconfigure(app: web.Application, clusters: list[ClusterConfig]) -> None:
    """Adopt a new cluster list (SIGHUP): a removed cluster leaves no series, an added one starts at 0."""
    app[CLUSTER_SET].configured = list(clusters)
    app[CLUSTER_SET].adopt(app)


def shard_from_settings(settings: Settings, environ: Mapping[str, str] = os.environ) -> Shard:
    """This replica's shard: the settings', else the ordinal in env POD_NAME; ConfigError says why not."""
    try:
        return resolve_shard(
            shard=settings.sharding.shard,
            total_shards=settings.sharding.total_shards,
            pod_name=environ.get("POD_NAME"),
        )
    except ShardError as exc:
        raise ConfigError(str(exc)) from None


def create_app(
    settings: Settings,
    *,
    clusters: list[ClusterConfig],
    executor: Executor | None = None,
    kube_api: Any | None = None,
    snapshots: SnapshotSource | None = None,
    shard: Shard | None = None,
) -> web.Application:
    """The service for these clusters (the CLI resolves the embedded default before calling).

    `executor` carries out the webhook's launches; by default the one the settings describe (its runs
    are handed their cluster as data and read no config file: docs/run-handoff.md). `snapshots`
    replaces the Refresher (real etcd) as what the webhook and /readyz see of the clusters; then
    /metrics has the service's own series only: the tests of routing and deciding use it. `shard`:
    which clusters this replica observes (default: from the settings and env POD_NAME); the webhook
    still serves them all. With `discover.kamaji_datastores.enabled` the DataStores are followed
    through `kube_api` (by default a client of its own: in-cluster, else the kubeconfig). Raises
    ConfigError when the webhook's credentials are unusable or the shard cannot be determined.
    """
    credentials = load_credentials(settings)
    if shard is None:
        shard = shard_from_settings(settings)
    if executor is None:
        executor = executor_from_settings(settings)
    discovery = None
    if settings.discover.kamaji_datastores.enabled:
        discovery = DataStoreDiscovery(
            settings.discover.kamaji_datastores,
            lambda found: _discovered(app, found),
            request_timeout=settings.executor.kubernetes_timeout_seconds,
        )
        executor = DataStoreJobs(executor, discovery)
    registry = CollectorRegistry(auto_describe=False)
    run_metrics = RunMetrics(registry, alert_outcomes=ALERT_OUTCOMES)
    app = web.Application(handler_args={"logger": ServerLog(run_metrics)})
    app[SETTINGS] = settings
    app[EXECUTOR] = executor
    app[REGISTRY] = registry
    app[RUN_METRICS] = run_metrics
    app[CLUSTER_SET] = ClusterSet(clusters)
    if discovery is not None:
        app[DISCOVERY] = discovery
    app[SHARD] = shard
    metrics_handler = make_aiohttp_handler(registry)

    def run_finished(outcome: RunOutcome) -> None:
        if not shard.owns(outcome.cluster):
            # Every replica's Job watch sees every run end; the cluster's shard counts and logs it,
            # so that no run is counted twice in a sum over replicas.
            log.debug("cluster %s: run ended: %s (counted by its own shard)", outcome.cluster, outcome.result)
            return
        run_metrics.record_run(
            cluster=outcome.cluster,
            result=outcome.result,
            duration_seconds=outcome.duration_seconds,
            reclaimed_bytes=outcome.reclaimed_bytes,
            finished_at=outcome.finished_at,
        )
        log.log(
            logging.INFO if outcome.result.succeeded else logging.WARNING,
            "cluster %s: run ended: %s%s (reclaimed %s in %.0fs)",
            outcome.cluster,
            outcome.result,
            f": {outcome.reason}" if outcome.reason else "",
            human_bytes(outcome.reclaimed_bytes),
            outcome.duration_seconds,
            extra={"etcd_cluster": outcome.cluster},
        )

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=settings.max_concurrent_requests, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[SESSION] = session
            source: SnapshotSource
            if snapshots is None:
                refresher = Refresher(
                    [],  # the cluster set's adopt() below hands it the clusters
                    client_factory(session, max_timeout_seconds=settings.scrape_budget_seconds),
                    scrape_budget_seconds=settings.scrape_budget_seconds,
                    min_refresh_interval_seconds=settings.min_refresh_interval_seconds,
                    member_list_refresh_seconds=settings.member_list_refresh_seconds,
                    write_lock_tokens=not settings.executor.dry_run,
                    shard=shard,
                )
                app[REFRESHER] = refresher
                registry.register(SnapshotCollector(refresher))
                source = refresher
            else:
                source = snapshots
            app[SNAPSHOTS] = source
            app[CLUSTER_SET].adopt(app)
            registry.register(
                TenantCollector(
                    lambda: {
                        name: tenants
                        for name, tenants in (app[DISCOVERY].tenants() if DISCOVERY in app else {}).items()
                        if shard.owns(name)
                    }
                )
            )
            registry.register(
                InFlightCollector(
                    lambda: {
                        name: run.running
                        for name, run in executor.runs([c for c in source.clusters if shard.owns(c)]).items()
                    }
                )
            )
            app[WEBHOOK] = Webhook(
                settings=settings,
                credentials=credentials,
                executor=executor,
                metrics=run_metrics,
                snapshots=source,
            )
            await executor.start(run_finished)
            background = asyncio.create_task(_refresh_forever(source, settings))
            try:
                yield
            finally:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
                await executor.stop()

    async def discovery_ctx(app: web.Application) -> AsyncIterator[None]:
        from exporter.kubernetes import api as kube

        assert discovery is not None
        api = kube_api if kube_api is not None else await kube.kube_api_client()
        task = asyncio.create_task(discovery.run(api))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            discovery.close()
            if kube_api is None:
                await api.close()

    async def metrics(request: web.Request) -> web.StreamResponse:
        await request.app[SNAPSHOTS].refresh(max_age_seconds=settings.min_refresh_interval_seconds)
        # Always the classic text format: prometheus_client 0.26 renders OpenMetrics (which
        # Prometheus asks for first) at half the speed, a quarter of a 1,000-member scrape
        # (bench/exporter.py), and Prometheus reads both.
        headers = {k: v for k, v in request.headers.items() if k.lower() != "accept"}
        return await metrics_handler(request.clone(headers=headers))

    async def webhook(request: web.Request) -> web.Response:
        return await request.app[WEBHOOK](request)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if DISCOVERY in request.app and not request.app[DISCOVERY].listed:
            return web.Response(status=503, text="waiting for the first list of Kamaji DataStores\n")
        source = request.app[SNAPSHOTS]
        # Only this shard's clusters: another shard's are read when an alert needs one.
        if all(source.latest(name) is not None for name in source.clusters if shard.owns(name)):
            return web.Response(text="ready\n")
        whose = f" of {shard}" if shard.sharded else ""
        return web.Response(status=503, text=f"waiting for the first refresh of every cluster{whose}\n")

    app.cleanup_ctx.append(session_ctx)
    if discovery is not None:
        app.cleanup_ctx.append(discovery_ctx)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # Every method reaches the handler, so that a wrong one is answered 405 and counted.
    app.router.add_route("*", PATH, webhook)
    return app


def _discovered(app: web.Application, clusters: list[ClusterConfig]) -> None:
    """The DataStores changed: adopt the new set."""
    app[CLUSTER_SET].discovered = clusters
    app[CLUSTER_SET].adopt(app)
    executor = app[EXECUTOR]
    if isinstance(executor, DataStoreJobs):
        executor.follow(clusters)


async def _refresh_forever(refresher: SnapshotSource, settings: Settings) -> None:
    """Keep snapshots no older than `background_refresh_seconds` when nobody scrapes."""
    while True:
        try:
            await refresher.refresh(max_age_seconds=settings.background_refresh_seconds)
        except Exception:  # a bug must not stop the loop silently: log it and go on
            log.exception("background refresh failed")
        await asyncio.sleep(settings.background_refresh_seconds / 2)
