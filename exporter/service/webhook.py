"""The Alertmanager webhook: `POST /webhook/alertmanager`.

Thin on purpose: authenticate, bound and parse the body, then `routing.iter_decisions` decides and an
executor launches. Alertmanager retries 5xx and network errors and never 4xx, and re-sends a
group every `repeat_interval` (Alertmanager docs, "webhook_config"; notify/webhook). So:

- 2xx once every launch is durably recorded (created, or found in flight or cooling down), and for
  alerts that launch nothing (resolved, unrouted, ambiguous...): retrying would not change that;
- 503 when the executor cannot be reached (Kubernetes API down): Alertmanager retries;
- 422 when the executor refuses for good (e.g. the API rejects the Job); 400/401/405/413/415 for
  bad requests. Never a 500 for bad input: whatever the JSON parser or the payload model raises
  on a body is a 400.

No defrag work happens inside the request: launching creates a Job or starts a process. What a
sender can repeat at will is bounded: the body (`max_body_bytes`), the alerts per notification
(`max_alerts`, checked before the payload is validated), the reply (counts per outcome, not an
entry per alert) and the log (one line per cause and source a minute, `logs.LogThrottle`; every
event is still counted in `etcd_autodefrag_alerts_total`). Parsing and deciding, the CPU-bound
part, run one notification at a time and a slice of alerts at a time, yielding to the event loop
in between: however many notifications arrive at once, `/healthz` and `/metrics` wait at most one
slice (docs/reliability.md measures it).
"""

import asyncio
import contextlib
import gc
import logging
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from enum import StrEnum
from itertools import islice
from typing import Any, Protocol

import pydantic_core
from aiohttp import web
from aiohttp.http_exceptions import (
    ContentEncodingError,
    ContentLengthError,
    DecompressSizeError,
    TransferEncodingError,
)
from pydantic import ValidationError

from exporter.config.settings import ClusterConfig, ConfigError, Settings
from exporter.core import clock
from exporter.core.alertmanager import AlertmanagerAlert, AlertmanagerPayload
from exporter.core.launches import LaunchOutcome, LaunchResult, Trigger
from exporter.core.routing import (
    ActingFilter,
    AlertDecision,
    ClusterHealth,
    ClusterIndex,
    Decision,
    Policy,
    decide,
    iter_decisions,
    snapshot_wanted,
)
from exporter.core.snapshot import ClusterSnapshot
from exporter.launch.executor import Executor, ExecutorRejected, ExecutorUnavailable
from exporter.logs import LogThrottle, held_note
from exporter.service.auth import (
    SECRET_CHECK_SECONDS,
    Credentials,
    authorized,
    load_credentials,
    secret_stamps,
)
from exporter.service.metrics import RunMetrics

log = logging.getLogger(__name__)

PATH = "/webhook/alertmanager"
_READ_CHUNK = 64 * 1024
_MAX_REASON = 300  # characters of a parse error (or of any reason) quoted back to the sender
# Alerts decided between two yields to the event loop: ~20 us each, so a slice takes a few ms.
DECIDE_SLICE_ALERTS = 200


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a body is loaded and validated.

    A 4 MiB body can hold ~10^6 JSON values; allocating them overflows the young generation over
    and over, and the collections that follow traverse the whole heap: `json.loads` of ~50,000
    minimal alerts took ~1 s on a busy 2-CPU machine instead of ~0.1 s without them (measured;
    what kept /healthz waiting). A JSON tree has no reference cycles, so there is nothing for them
    to find; reference counting frees a counted body at once.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RequestOutcome(StrEnum):
    """Outcomes of a whole request, counted next to the per-alert `Decision`s."""

    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOO_MANY_ALERTS = "too_many_alerts"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    DRY_RUN = "dry_run"
    LAUNCH_UNAVAILABLE = "launch_unavailable"
    LAUNCH_REJECTED = "launch_rejected"


ALERT_OUTCOMES = [*(d.value for d in Decision), *(o.value for o in RequestOutcome)]
Refusal = tuple[RequestOutcome, int, str]  # outcome, HTTP status, reason


# --- the handler ---------------------------------------------------------------------------------


class SnapshotSource(Protocol):
    """What the webhook needs of whatever observes the clusters (the service's Refresher).

    Routing and deciding depend on this and nothing else of etcd, so their tests can hand in
    snapshots built in memory (tests/test_webhook.py); real-etcd tests prove the Refresher's wiring.
    """

    @property
    def clusters(self) -> Mapping[str, ClusterConfig]:
        """The configured clusters by name; a new mapping whenever the set changes (a reload)."""

    def latest(self, name: str) -> ClusterSnapshot | None:
        """The latest snapshot of a cluster, None before the first or for an unknown name."""

    async def refresh(self, *, max_age_seconds: float, names: Collection[str] | None = None) -> None:
        """Make snapshots at most this old (sharing a refresh in flight), within a bounded time.

        `names`: only these clusters' are needed, whatever shard observes them (docs/sharding.md).
        """


HealthCache = dict[str, tuple[ClusterSnapshot, ClusterHealth]]


def health_of(
    source: SnapshotSource, cache: HealthCache | None = None, *, names: Iterable[str] | None = None
) -> dict[str, ClusterHealth]:
    """What the latest snapshots say about each cluster's health (core.snapshot's one verdict).

    With `cache`, a snapshot already judged is not judged again. Snapshots are immutable and every
    refresh makes new ones, so an entry holds exactly while its snapshot is the latest; a storm of
    notifications then costs a lookup per cluster, not a check of every member of every cluster
    per request (bench/webhook_storm.py: a third of the handler's CPU with 50 clusters).
    """
    clusters = source.clusters
    out = {}
    for name in clusters if names is None else names:
        config = clusters.get(name)
        snapshot = source.latest(name) if config is not None else None
        if config is None or snapshot is None:
            continue
        known = cache.get(name) if cache is not None else None
        if known is None or known[0] is not snapshot:
            health = snapshot.health()
            # Without discovery the snapshot holds the configured members only, not the voters.
            voting = (
                sum(not m.member.is_learner for m in snapshot.members) if config.discover_members else None
            )
            known = (
                snapshot,
                ClusterHealth(snapshot.taken_at, health.healthy, "; ".join(health.problems), voting),
            )
            if cache is not None:
                cache[name] = known
        out[name] = known[1]
    if cache is not None and len(cache) > len(clusters):  # clusters removed by a reload
        for name in set(cache) - set(clusters):
            del cache[name]
    return out


def trigger_for(alert: AlertmanagerAlert, payload: AlertmanagerPayload) -> Trigger:
    """Why a run starts, recorded on the Job and in the log."""
    return Trigger(
        alertname=alert.name,
        group_key=payload.group_key,
        fingerprint=alert.fingerprint,
        receiver=payload.receiver,
        fired_at=alert.starts_at,
    )


def _reply(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.json_response(body, status=status, headers=headers or None)


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "(body)"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "invalid payload: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class Webhook:
    """The request handler, with its collaborators passed in."""

    def __init__(
        self,
        *,
        settings: Settings,
        credentials: Credentials,
        executor: Executor,
        metrics: RunMetrics,
        snapshots: SnapshotSource,
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.executor = executor
        self.metrics = metrics
        self.snapshots = snapshots
        self.policy = Policy(
            acting=ActingFilter.from_settings(settings.webhook),
            cooldown_seconds=settings.executor.cooldown_seconds,
            max_snapshot_age_seconds=settings.webhook.max_snapshot_age_seconds,
        )
        # Serialises deciding-and-launching per cluster inside this process, so concurrent
        # notifications for one cluster launch once; executors guard across processes.
        self._launching: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._health: HealthCache = {}
        self._index: tuple[object, ClusterIndex] | None = None
        # Which repeats to log above DEBUG: skips by (decision, cluster), cluster names from the
        # configuration (so no bound is needed); refusals by (outcome, peer address), which a
        # sender chooses (so the throttle's bound applies).
        self._skips = LogThrottle(max_keys=None)
        self._refusals = LogThrottle()
        # Parsing and deciding are CPU work without an await inside: one notification at a time,
        # so that N concurrent notifications hold the loop for one slice at a time, not N.
        self._cpu = asyncio.Lock()
        webhook = settings.webhook
        self._secret_files = [p for p in (webhook.token_file, webhook.basic_auth_password_file) if p]
        self._secret_stamp = secret_stamps(self._secret_files)
        self._secrets_checked_at = clock.monotonic()

    def _reread_secrets(self) -> None:
        """Follow a rotated token or password file (a Kubernetes Secret volume is updated in place).

        Looks at most every SECRET_CHECK_SECONDS; a file that changed but is unusable (empty, gone)
        keeps the current credentials and is logged.
        """
        now = clock.monotonic()
        if not self._secret_files or now - self._secrets_checked_at < SECRET_CHECK_SECONDS:
            return
        self._secrets_checked_at = now
        stamp = secret_stamps(self._secret_files)
        if stamp == self._secret_stamp:
            return
        self._secret_stamp = stamp
        try:
            self.credentials = load_credentials(self.settings)
        except ConfigError as exc:
            log.warning(
                "webhook: a secret file changed but is unusable, keeping the current credentials: %s", exc
            )
            return
        log.info("webhook: credentials read again from %s", ", ".join(str(p) for p in self._secret_files))

    def _cluster_index(self) -> ClusterIndex:
        """The routing index of the configured clusters, rebuilt when a reload replaced them."""
        clusters = self.snapshots.clusters  # a new mapping on every reconfigure
        if self._index is None or self._index[0] is not clusters:
            self._index = (clusters, ClusterIndex(list(clusters.values())))
        return self._index[1]

    def _refuse(
        self, request: web.Request, outcome: RequestOutcome, status: int, reason: str, **headers: str
    ) -> web.Response:
        """Answer a bad request: counted every time, logged once per cause and peer a minute."""
        self.metrics.count_alert(outcome.value)
        peer = request.remote or "an unknown peer"
        held = self._refusals.admit((outcome, peer), clock.monotonic())
        if held is not None:
            # The reason only: never the body or the Authorization header (it may hold a near
            # miss of the real token). The formatter escapes what the sender chose.
            log.warning(
                "webhook: refused a request from %s: %d %s: %s%s",
                peer,
                status,
                outcome.value,
                reason,
                held_note(held),
            )
        return _reply(status, {"status": "error", "error": reason}, **headers)

    async def __call__(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return self._refuse(request, RequestOutcome.METHOD_NOT_ALLOWED, 405, "use POST", Allow="POST")
        self._reread_secrets()
        if not authorized(request.headers.get("Authorization"), self.credentials):
            return self._refuse(
                request,
                RequestOutcome.UNAUTHORIZED,
                401,
                "missing or wrong credentials",
                **{"WWW-Authenticate": 'Bearer realm="etcd-autodefrag"'},
            )
        if request.content_type != "application/json":
            return self._refuse(
                request,
                RequestOutcome.UNSUPPORTED_MEDIA_TYPE,
                415,
                f"Content-Type must be application/json, not {request.content_type}"[:_MAX_REASON],
            )
        limit = int(self.settings.webhook.max_body_bytes)
        try:
            body = await _read_limited(request, limit)
        except web.RequestPayloadError as exc:  # a broken chunked or Content-Encoding body
            refusal = self._refuse(request, RequestOutcome.BAD_REQUEST, 400, _payload_error_reason(exc))
            refusal.force_close()  # what follows on the connection cannot be read either
            return refusal
        if body is None:
            return self._refuse(
                request,
                RequestOutcome.PAYLOAD_TOO_LARGE,
                413,
                f"body larger than {limit} bytes: raise webhook.max_body_bytes or set max_alerts in "
                "the Alertmanager receiver",
            )
        async with self._cpu:
            parsed = await self._parse(body)
        if isinstance(parsed, tuple):
            return self._refuse(request, *parsed)
        return await self.handle(parsed)

    async def _parse(self, body: bytes) -> AlertmanagerPayload | Refusal:
        """The payload, or why not; yields to the loop between counting and validating.

        Parsed twice, both times in pydantic-core (Rust; a 4 MiB body in ~10-40 ms, four times
        faster than `json.loads`): once into plain values to count the alerts, so that too many
        are refused before the costlier validation, and once validated straight from the JSON.
        """
        with _collector_paused():
            try:
                data = pydantic_core.from_json(body)
            except Exception as exc:  # any parser failure is the body's (invalid UTF-8, nesting...)
                return RequestOutcome.BAD_REQUEST, 400, f"malformed JSON: {exc}"[:_MAX_REASON]
            alerts = data.get("alerts") if isinstance(data, dict) else None
            count = len(alerts) if isinstance(alerts, list) else 0
            del data, alerts  # freed by reference counting, with the collector still paused
        cap = self.settings.webhook.max_alerts
        if count > cap:
            return (
                RequestOutcome.TOO_MANY_ALERTS,
                413,
                f"{count} alerts in one notification, more than webhook.max_alerts ({cap}): set "
                f"max_alerts: {cap} (or less) in the Alertmanager receiver's webhook_config",
            )
        await asyncio.sleep(0)
        with _collector_paused():
            try:
                return AlertmanagerPayload.model_validate_json(body)
            except ValidationError as exc:
                return RequestOutcome.BAD_REQUEST, 400, _validation_reason(exc)[:_MAX_REASON]
            except Exception as exc:  # whatever else the model raises on a body is still a 400
                return RequestOutcome.BAD_REQUEST, 400, f"invalid payload: {type(exc).__name__}"

    async def handle(self, payload: AlertmanagerPayload) -> web.Response:
        """Decide for every alert, launch what is to be launched, answer per the retry contract."""
        known = self._cluster_index()
        # Each alert routed once: for the snapshots to read and for the decisions. Only the clusters
        # the alerts route to are looked at: a storm costs O(alerts), not O(alerts x configured
        # clusters) (bench/webhook_storm.py).
        routes = [known.route(alert.labels) for alert in payload.alerts]
        await self._fresh_snapshots(payload, routes)
        async with self._cpu:
            decisions = await self._decide(payload, known, routes)
        launches = {
            index: self._launch(d, known.by_name[d.cluster], payload.alerts[index], payload)
            for index, d in enumerate(decisions)
            if d.launch and d.cluster is not None
        }
        launched = dict(zip(launches, await asyncio.gather(*launches.values()), strict=True))
        outcomes = [launched.get(i) or self._skipped(d) for i, d in enumerate(decisions)]
        counts = Counter(outcome for _, outcome in outcomes)
        for outcome, count in counts.items():
            self.metrics.count_alert(outcome, count)
        body = {"status": "ok", "alerts": len(outcomes), "outcomes": _summary(outcomes)}
        if RequestOutcome.LAUNCH_UNAVAILABLE in counts:
            return _reply(503, {**body, "status": "retry"})
        if RequestOutcome.LAUNCH_REJECTED in counts:
            return _reply(422, {**body, "status": "rejected"})
        return _reply(200, body)

    async def _fresh_snapshots(
        self, payload: AlertmanagerPayload, routes: Sequence[Sequence[ClusterConfig]]
    ) -> None:
        """Snapshots no older than max_snapshot_age_seconds of the clusters the alerts may launch on.

        This shard's clusters: the background refresh keeps them about that fresh already; this
        only waits (at most the scrape budget) when it fell behind, and concurrent notifications
        share one refresh. Another shard's cluster (docs/sharding.md) is read now, once per cluster
        however many notifications ask at once, and the read is reused while it is fresh enough.
        """
        wanted = snapshot_wanted(alerts=payload.alerts, routes=routes, policy=self.policy)
        if wanted:  # else no alert gets as far as looking at a snapshot
            max_age = self.settings.webhook.max_snapshot_age_seconds
            await self.snapshots.refresh(max_age_seconds=max_age, names=sorted(wanted))

    async def _decide(
        self,
        payload: AlertmanagerPayload,
        known: ClusterIndex,
        routes: Sequence[Sequence[ClusterConfig]],
    ) -> list[AlertDecision]:
        """`routing.iter_decisions` over the alerts, a slice at a time with a yield in between."""
        routed = sorted({c.name for matched in routes for c in matched})
        deciding = iter_decisions(
            alerts=payload.alerts,
            routes=routes,
            clusters=known,
            snapshots=health_of(self.snapshots, self._health, names=routed),
            runs=self.executor.runs(routed),
            now=clock.utcnow(),
            policy=self.policy,
        )
        decisions: list[AlertDecision] = []
        while len(decisions) < len(payload.alerts):
            await asyncio.sleep(0)
            decisions.extend(islice(deciding, DECIDE_SLICE_ALERTS))
        return decisions

    async def _launch(
        self,
        decision: AlertDecision,
        cluster: ClusterConfig,
        alert: AlertmanagerAlert,
        payload: AlertmanagerPayload,
    ) -> tuple[AlertDecision, str]:
        """Decide again under the cluster's lock with fresh run states, then launch."""
        async with self._launching[cluster.name]:
            fresh = decide(
                alert=alert,
                clusters=[cluster],
                snapshots=health_of(self.snapshots, self._health, names=[cluster.name]),
                runs=self.executor.runs([cluster.name]),
                now=clock.utcnow(),
                policy=self.policy,
            )
            if not fresh.launch:  # a concurrent notification launched it meanwhile
                return self._skipped(fresh)
            try:
                result = await self.executor.launch(cluster, trigger_for(alert, payload))
            except ExecutorUnavailable as exc:
                log.error("cluster %s: launch failed, Alertmanager will retry: %s", cluster.name, exc)
                return replace(decision, reason=str(exc)), RequestOutcome.LAUNCH_UNAVAILABLE.value
            except ExecutorRejected as exc:
                log.error("cluster %s: launch refused: %s", cluster.name, exc)
                return replace(decision, reason=str(exc)), RequestOutcome.LAUNCH_REJECTED.value
        return self._launched(decision, result)

    def _launched(self, decision: AlertDecision, result: LaunchResult) -> tuple[AlertDecision, str]:
        """The outcome of a launch the executor answered."""
        cluster = decision.cluster
        if result.outcome is LaunchOutcome.CREATED:
            log.info(
                "cluster %s: launched %s: %s",
                cluster,
                result.job_name,
                decision.reason,
                extra={"etcd_cluster": cluster},
            )
            return decision, Decision.LAUNCH.value
        if result.outcome is LaunchOutcome.DRY_RUN:
            return replace(decision, reason=result.reason), RequestOutcome.DRY_RUN.value
        if result.outcome is LaunchOutcome.DEFERRED:  # nothing recorded: the next notification retries
            return self._skipped(replace(decision, decision=Decision.SKIP_DEFERRED, reason=result.reason))
        if result.outcome is LaunchOutcome.NAME_TAKEN:
            log.error("cluster %s: cannot launch: %s", cluster, result.reason)
            return replace(decision, reason=result.reason), RequestOutcome.LAUNCH_REJECTED.value
        # A run recorded that our view of run states did not show yet (another replica or service
        # launched it): the launch is durably recorded, which is all Alertmanager needs to know.
        skip = (
            Decision.SKIP_COOLDOWN
            if result.outcome is LaunchOutcome.COOLING_DOWN
            else Decision.SKIP_ALREADY_RUNNING
        )
        return self._skipped(replace(decision, decision=skip, reason=result.reason))

    def _skipped(self, decision: AlertDecision) -> tuple[AlertDecision, str]:
        level = _LOG_LEVELS.get(decision.decision, logging.INFO)
        note = ""
        if level > logging.DEBUG:
            # Alertmanager re-sends firing alerts, and a storm repeats them: the first skip of a
            # cluster for one reason within the window is logged at its level, the repeats at DEBUG
            # (etcd_autodefrag_alerts_total counts them all). Alerts that reach no cluster
            # (unrouted, ambiguous) share one key per reason: their labels are the sender's.
            held = self._skips.admit((decision.decision, decision.cluster), clock.monotonic())
            if held is None:
                level = logging.DEBUG
            else:
                note = held_note(held)
        _log_decision(decision, level, note)
        return decision, decision.decision.value


_LOG_LEVELS = {
    Decision.SKIP_RESOLVED: logging.DEBUG,
    Decision.SKIP_NOT_ACTING: logging.DEBUG,
    Decision.SKIP_DUPLICATE: logging.DEBUG,
    Decision.SKIP_UNROUTED: logging.WARNING,
    Decision.SKIP_AMBIGUOUS: logging.WARNING,
    Decision.SKIP_UNHEALTHY: logging.WARNING,
    Decision.SKIP_UNAVAILABLE: logging.WARNING,  # a configuration choice is missing, said once a minute
    Decision.SKIP_NO_SNAPSHOT: logging.WARNING,
    Decision.SKIP_STALE_SNAPSHOT: logging.WARNING,
}


def _log_decision(decision: AlertDecision, level: int, note: str = "") -> None:
    log.log(
        level,
        "alert %s (%s): %s: %s%s",
        decision.alertname or "(no alertname)",
        decision.fingerprint or "no fingerprint",
        decision.decision.value,
        decision.reason,
        note,
        extra={"etcd_cluster": decision.cluster} if decision.cluster else None,
    )


def _summary(outcomes: Sequence[tuple[AlertDecision, str]]) -> dict[str, dict[str, Any]]:
    """The reply's account of a notification: per outcome, how many alerts, which clusters, and
    the first alert's reason; its size grows with the configured clusters, not with the alerts."""
    summary: dict[str, dict[str, Any]] = {}
    clusters: dict[str, set[str]] = defaultdict(set)
    for decision, outcome in outcomes:
        entry = summary.get(outcome)
        if entry is None:
            entry = summary[outcome] = {"alerts": 0, "clusters": [], "reason": decision.reason[:_MAX_REASON]}
        entry["alerts"] += 1
        if decision.cluster is not None:
            clusters[outcome].add(decision.cluster)
    for outcome, names in clusters.items():
        summary[outcome]["clusters"] = sorted(names)
    return summary


_PAYLOAD_ERRORS = (
    (ContentEncodingError, "its Content-Encoding does not decode"),
    (DecompressSizeError, "it decompresses to more than allowed"),
    (ContentLengthError, "it is shorter than its Content-Length"),
    (TransferEncodingError, "its chunked transfer encoding is broken"),
)


def _payload_error_reason(exc: web.RequestPayloadError) -> str:
    """Why aiohttp could not read a body, in our words (its messages may quote the body)."""
    cause = exc.__cause__
    detail = next((text for kind, text in _PAYLOAD_ERRORS if isinstance(cause, kind)), "it is malformed")
    return f"the body cannot be read: {detail}"


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it exceeds `limit` bytes (announced or actually sent)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
