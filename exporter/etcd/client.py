"""Talking to etcd: a thin client for the v3 JSON gateway (grpc-gateway) over aiohttp.

Every call is a POST of JSON to `/v3/...` on a member's client URL. grpc-gateway encodes 64-bit
integers as JSON strings and omits fields holding their zero value, so every reader below parses
with a default (etcd docs: dev-guide/api_grpc_gateway).
We never shell out to etcdctl: one HTTP session serves hundreds of clusters.
"""

import asyncio
import base64
import contextlib
import functools
import re
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp

from exporter.core.model import Alarm, AlarmKind, Member, MemberStatus

QUOTA_METRIC = "etcd_server_quota_backend_bytes"
START_TIME_METRIC = "process_start_time_seconds"  # client_golang's process collector, on every member
# etcd's grpc status codes that matter here (google.golang.org/grpc/codes).
_GRPC_OUT_OF_RANGE = 11


class EtcdError(Exception):
    """A call to one etcd endpoint failed."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(f"{endpoint}: {message}")
        self.endpoint = endpoint
        self.message = message


class EtcdUnavailable(EtcdError):
    """The endpoint could not be reached or did not answer in time.

    `reached` is False only when the request cannot have reached the member (the connection was
    never made); after a timeout or a dropped connection the member may still be carrying it out.
    """

    def __init__(self, endpoint: str, message: str, *, reached: bool = True) -> None:
        super().__init__(endpoint, message)
        self.reached = reached


class NoEndpointAnswered(Exception):
    """`first_answer` tried every endpoint; `errors` says what each one did, in order."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


T = TypeVar("T")


async def first_answer(endpoints: Iterable[str], call: Callable[[str], Awaitable[T]]) -> tuple[str, T]:
    """`call(endpoint)` on each endpoint in turn until one answers: (that endpoint, its answer).

    An endpoint whose call raises EtcdError is passed over; when none answers, NoEndpointAnswered.
    """
    errors = []
    for endpoint in endpoints:
        try:
            return endpoint, await call(endpoint)
        except EtcdError as exc:
            errors.append(str(exc))
    raise NoEndpointAnswered(errors)


class EtcdApiError(EtcdError):
    """The endpoint answered with an error (grpc code and message from etcd)."""

    def __init__(self, endpoint: str, message: str, code: int = 0, http_status: int = 0) -> None:
        super().__init__(endpoint, message)
        self.code = code
        self.http_status = http_status


_CLIENT_CERT_REFUSED = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")


def plain_words(exc: aiohttp.ClientError, endpoint: str) -> str:
    """What went wrong with a request, in words a person can act on (no library repr)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        verify = exc.certificate_error
        why = getattr(verify, "verify_message", None) or getattr(verify, "reason", None) or str(verify)
        hint = "the server name: --server-name, tls.server_name" if "mismatch" in why.lower() else "the CA"
        return f"TLS: the member's certificate is not trusted: {why} (check {hint})"
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc.__cause__
    if isinstance(cause, ssl.SSLError) and any(a in str(cause).upper() for a in _CLIENT_CERT_REFUSED):
        # etcd answers a missing or foreign client certificate with a TLS alert, after the handshake.
        return (
            "TLS: the member did not accept our client certificate (none given, or not signed by its "
            "CA): check --cert and --key (tls.cert_file, tls.key_file)"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        tls = endpoint.startswith("https://")
        if tls and isinstance(error, ssl.SSLError | ConnectionResetError | ConnectionAbortedError):
            return "TLS handshake failed (is the member serving plain HTTP? then use http://)"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return f"cannot resolve host {exc.host}"
        return error.strerror.lower() if error.strerror else str(error) or type(error).__name__
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        if endpoint.startswith("http://"):
            return "the member closed the connection without an answer (does it serve TLS? then use https://)"
        return "the member closed the connection without an answer"
    return str(exc) or type(exc).__name__


def _int(value: Any) -> int:
    """An int from grpc-gateway JSON, where 64-bit values are strings and zero is omitted."""
    return int(value) if value not in (None, "") else 0


def parse_status(endpoint: str, body: Mapping[str, Any]) -> MemberStatus:
    """A MemberStatus from a `/v3/maintenance/status` reply."""
    header = body.get("header") or {}
    errors = tuple(str(e) for e in body.get("errors") or ())
    return MemberStatus(
        endpoint=endpoint,
        member_id=_int(header.get("member_id")),
        leader_id=_int(body.get("leader")),
        cluster_id=_int(header.get("cluster_id")),
        version=str(body.get("version", "")),
        db_size_bytes=_int(body.get("dbSize")),
        # etcd < 3.4 has no dbSizeInUse; treat the whole file as in use rather than invent free space.
        db_size_in_use_bytes=_int(body.get("dbSizeInUse", body.get("dbSize"))),
        raft_index=_int(body.get("raftIndex")),
        raft_applied_index=_int(body.get("raftAppliedIndex")),
        raft_term=_int(body.get("raftTerm")),
        is_learner=bool(body.get("isLearner", False)),
        quota_bytes=_int(body.get("dbSizeQuota")),  # etcd >= 3.6
        errors=errors,
        alarms=tuple(a for a in map(parse_alarm_error, errors) if a is not None),
    )


# etcd's Status adds one `AlarmMember.String()` per active alarm to `errors`, e.g.
# "memberID:5925017834310168007 alarm:NOSPACE " (server/etcdserver/api/v3rpc/maintenance.go).
_ALARM_ERROR = re.compile(r"memberID:(\d+)\s+alarm:([A-Z]+)")


def parse_alarm_error(error: str) -> Alarm | None:
    """An alarm from one entry of a status reply's `errors`, if it is one."""
    match = _ALARM_ERROR.search(error)
    if match is None or match.group(2) not in AlarmKind.__members__:
        return None
    return Alarm(member_id=int(match.group(1)), kind=AlarmKind(match.group(2)))


def parse_members(body: Mapping[str, Any]) -> list[Member]:
    """Members from a `/v3/cluster/member/list` reply."""
    return [
        Member(
            id=_int(m.get("ID")),
            name=str(m.get("name", "")),
            peer_urls=tuple(m.get("peerURLs") or ()),
            client_urls=tuple(m.get("clientURLs") or ()),
            is_learner=bool(m.get("isLearner", False)),
        )
        for m in body.get("members") or ()
    ]


def parse_alarms(body: Mapping[str, Any]) -> list[Alarm]:
    """Active alarms from a `/v3/maintenance/alarm` reply."""
    alarms = []
    for a in body.get("alarms") or ():
        kind = str(a.get("alarm", "NONE"))
        alarms.append(
            Alarm(
                member_id=_int(a.get("memberID")),
                kind=AlarmKind(kind) if kind in AlarmKind.__members__ else AlarmKind.NONE,
            )
        )
    return [a for a in alarms if a.kind is not AlarmKind.NONE]


def parse_quota_line(line: str) -> int | None:
    """The quota from one exposition line, if it is the quota gauge (value may be `1.6777216e+07`)."""
    value = parse_gauge_line(line, QUOTA_METRIC)
    return int(value) if value is not None else None


def parse_gauge_line(line: str, metric: str) -> float | None:
    """The value of one exposition line if it is a sample of `metric` (not of a longer-named one)."""
    if not line.startswith(metric):
        return None
    rest = line[len(metric) :]
    if rest[:1] not in (" ", "{"):
        return None  # another metric sharing the prefix
    try:
        return float(rest.rsplit("}", 1)[-1].split()[0])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class MetricsFacts:
    """What the engine reads from a member's /metrics page; None where the page does not say."""

    quota_bytes: int | None = None
    # When the member's etcd process started (Unix time): the rollout gate's "just restarted".
    process_start_time_seconds: float | None = None


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd returns it."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def b64(data: bytes) -> str:
    """Bytes as the gateway takes them."""
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The `range_end` that selects every key starting with `prefix` (etcd's GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def parse_kv(kv: Mapping[str, Any]) -> KeyValue:
    """A KeyValue from one entry of a range reply's `kvs`."""
    return KeyValue(
        key=base64.b64decode(kv.get("key") or ""),
        value=base64.b64decode(kv.get("value") or ""),
        mod_revision=_int(kv.get("mod_revision")),
        lease=_int(kv.get("lease")),
    )


class EtcdApi(Protocol):
    """What the engine needs from an etcd client (`exporter.etcd.client.EtcdClient` provides it)."""

    async def status(self, endpoint: str, *, timeout: float | None = None) -> MemberStatus: ...
    async def members(self, endpoint: str, *, timeout: float | None = None) -> list[Member]: ...
    async def alarms(self, endpoint: str, *, timeout: float | None = None) -> list[Alarm]: ...
    async def disarm(self, endpoint: str, alarm: Alarm, *, timeout: float | None = None) -> None: ...
    async def linearizable_read(self, endpoint: str, *, timeout: float | None = None) -> int: ...
    async def compact(
        self, endpoint: str, revision: int, *, physical: bool = True, timeout: float | None = None
    ) -> bool: ...
    async def defragment(self, endpoint: str, *, timeout: float) -> None: ...
    async def lease_grant(self, endpoint: str, ttl_seconds: int, *, timeout: float | None = None) -> int: ...
    async def lease_revoke(self, endpoint: str, lease_id: int, *, timeout: float | None = None) -> None: ...
    async def txn(
        self, endpoint: str, request: Mapping[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]: ...
    async def range_prefix(
        self, endpoint: str, prefix: bytes, *, timeout: float | None = None
    ) -> dict[bytes, KeyValue]: ...
    async def move_leader(self, endpoint: str, target_id: int, *, timeout: float | None = None) -> None: ...
    async def read_metrics(self, endpoint: str, *, timeout: float | None = None) -> MetricsFacts: ...


def find_quota(page: bytes) -> int | None:
    """The quota from a whole exposition page, or None when the page has no quota gauge."""
    value = find_gauge(page, QUOTA_METRIC)
    return int(value) if value is not None else None


def find_gauge(page: bytes, metric: str) -> float | None:
    """The first sample of `metric` on a whole exposition page, or None when it has none."""
    start = 0
    needle = metric.encode()
    while (at := page.find(needle, start)) >= 0:
        end = page.find(b"\n", at)
        line_start = at == 0 or page[at - 1 : at] == b"\n"
        if (
            line_start
            and (value := parse_gauge_line(page[at : end if end >= 0 else None].decode(), metric)) is not None
        ):
            return value
        start = at + len(needle)
    return None


def metrics_facts(page: bytes) -> MetricsFacts:
    """The quota and the process start time from a whole exposition page."""
    return MetricsFacts(find_quota(page), find_gauge(page, START_TIME_METRIC))


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    """Socket timeouts; the whole request is bounded by `_bounded`, which starts after the pool wait.

    aiohttp's `total` timeout also counts the time a request queues for one of the connector's
    connections, so a large refresh reported healthy members as down; the refresh's own budget
    bounds that wait instead.
    """
    return aiohttp.ClientTimeout(sock_connect=seconds, sock_read=seconds)


# One semaphore per session, as wide as its connector: a request holds a slot before its clock starts,
# so aiohttp never queues it internally and `_bounded` times the request alone, not the queue.
_SLOTS: "weakref.WeakKeyDictionary[aiohttp.ClientSession, asyncio.Semaphore]" = weakref.WeakKeyDictionary()


def _slots(session: aiohttp.ClientSession) -> asyncio.Semaphore | None:
    limit = session.connector.limit if session.connector is not None else 0
    if not limit:
        return None
    if (slots := _SLOTS.get(session)) is None:
        slots = _SLOTS[session] = asyncio.Semaphore(limit)
    return slots


@contextlib.asynccontextmanager
async def _bounded(
    session: aiohttp.ClientSession, endpoint: str, what: str, seconds: float
) -> AsyncIterator[None]:
    """One whole request (connect, send, the complete reply) within `seconds`, in etcd's words.

    Socket timeouts alone restart at every byte: a member that dribbles one byte a second would
    hold a health check, a status or a discovery for as long as it likes.
    """
    slots = _slots(session)
    async with slots if slots is not None else contextlib.nullcontext():
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError as exc:
            raise EtcdUnavailable(endpoint, f"{what}: no answer within {seconds:g}s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise EtcdUnavailable(endpoint, f"{what}: {plain_words(exc, endpoint)}", reached=False) from exc
        except aiohttp.ClientError as exc:
            raise EtcdUnavailable(endpoint, f"{what}: {plain_words(exc, endpoint)}") from exc


class EtcdClient:
    """Calls the etcd v3 JSON gateway of any member of one cluster.

    One shared `aiohttp.ClientSession` serves every cluster (its connector bounds concurrency); this
    object only carries the cluster's TLS context and default timeout.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        self._session = session
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._server_name = server_name
        self.timeout_seconds = timeout_seconds

    async def _post(
        self, endpoint: str, path: str, payload: Mapping[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        url = endpoint.rstrip("/") + path
        seconds = timeout if timeout is not None else self.timeout_seconds
        async with (
            _bounded(self._session, endpoint, path, seconds),
            self._session.post(
                url,
                json=payload,
                ssl=self._ssl,
                server_hostname=self._server_name,
                timeout=_timeout(seconds),
            ) as response,
        ):
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise EtcdApiError(
                    endpoint,
                    f"{path}: HTTP {response.status}, not a JSON object",
                    http_status=response.status,
                )
            if response.status != 200 or "error" in body:
                message = str(body.get("message") or body.get("error") or response.reason)
                raise EtcdApiError(
                    endpoint,
                    f"{path}: {message}",
                    code=_int(body.get("code")),
                    http_status=response.status,
                )
            return body

    async def status(self, endpoint: str, *, timeout: float | None = None) -> MemberStatus:
        """The member's status: its id, the leader it follows, database sizes, raft indexes."""
        return parse_status(endpoint, await self._post(endpoint, "/v3/maintenance/status", {}, timeout))

    async def members(self, endpoint: str, *, timeout: float | None = None) -> list[Member]:
        """The member list as this member sees it."""
        # linearizable=true so a partitioned member cannot hand us a stale list (etcd >= 3.5; 3.4 ignores it).
        body = await self._post(endpoint, "/v3/cluster/member/list", {"linearizable": True}, timeout)
        return parse_members(body)

    async def alarms(self, endpoint: str, *, timeout: float | None = None) -> list[Alarm]:
        """Active alarms of the whole cluster (any member answers for all)."""
        body = await self._post(endpoint, "/v3/maintenance/alarm", {"action": "GET"}, timeout)
        return parse_alarms(body)

    async def disarm(self, endpoint: str, alarm: Alarm, *, timeout: float | None = None) -> None:
        """Deactivate one alarm (etcd then re-raises NOSPACE by itself if the member is still full)."""
        payload = {
            "action": "DEACTIVATE",
            "memberID": str(alarm.member_id),
            "alarm": alarm.kind.value,
        }
        await self._post(endpoint, "/v3/maintenance/alarm", payload, timeout)

    async def linearizable_read(self, endpoint: str, *, timeout: float | None = None) -> int:
        """A quorum read through this member; returns the cluster's current revision.

        It succeeds only when the member is connected to a leader with a quorum, which is what
        `etcdctl endpoint health` checks too.
        """
        payload = {"key": base64.b64encode(b"health").decode(), "limit": 1, "count_only": True}
        body = await self._post(endpoint, "/v3/kv/range", payload, timeout)
        return _int((body.get("header") or {}).get("revision"))

    async def compact(
        self, endpoint: str, revision: int, *, physical: bool = True, timeout: float | None = None
    ) -> bool:
        """Compact history up to `revision`; False when it was already compacted that far."""
        payload = {"revision": str(revision), "physical": physical}
        try:
            await self._post(endpoint, "/v3/kv/compaction", payload, timeout)
        except EtcdApiError as exc:
            if exc.code == _GRPC_OUT_OF_RANGE and "compacted" in exc.message:
                return False
            raise
        return True

    async def lease_grant(self, endpoint: str, ttl_seconds: int, *, timeout: float | None = None) -> int:
        """A new lease of `ttl_seconds`; returns its id. Refused (NOSPACE) while the quota alarm is on."""
        body = await self._post(endpoint, "/v3/lease/grant", {"TTL": str(ttl_seconds)}, timeout)
        return _int(body.get("ID"))

    async def lease_revoke(self, endpoint: str, lease_id: int, *, timeout: float | None = None) -> None:
        """End the lease now; etcd deletes the keys attached to it."""
        await self._post(endpoint, "/v3/lease/revoke", {"ID": str(lease_id)}, timeout)

    async def put_if_absent(
        self, endpoint: str, key: bytes, value: bytes, lease_id: int, *, timeout: float | None = None
    ) -> bytes | None:
        """Create `key` bound to the lease unless it exists, in one transaction.

        Returns None when it was created, else the value the key holds.
        """
        encoded = base64.b64encode(key).decode()
        put = {"key": encoded, "value": base64.b64encode(value).decode(), "lease": str(lease_id)}
        payload = {
            "compare": [{"key": encoded, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": encoded}}],
        }
        body = await self._post(endpoint, "/v3/kv/txn", payload, timeout)
        if body.get("succeeded"):
            return None
        for response in body.get("responses") or []:
            for kv in (response.get("response_range") or {}).get("kvs") or []:
                return base64.b64decode(kv.get("value") or "")
        return b""  # deleted between the compare and the read: still not ours

    async def txn(
        self, endpoint: str, request: Mapping[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """One transaction, as the gateway takes it (`compare`, `success`, `failure`); its raw reply."""
        return await self._post(endpoint, "/v3/kv/txn", request, timeout)

    async def range_prefix(
        self, endpoint: str, prefix: bytes, *, timeout: float | None = None
    ) -> dict[bytes, KeyValue]:
        """Every key under `prefix` (a linearizable read), with its value and revisions."""
        payload = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        body = await self._post(endpoint, "/v3/kv/range", payload, timeout)
        return {kv.key: kv for kv in map(parse_kv, body.get("kvs") or ())}

    async def defragment(self, endpoint: str, *, timeout: float) -> None:
        """Defragment this one member; it blocks the member's reads and writes while it runs."""
        await self._post(endpoint, "/v3/maintenance/defragment", {}, timeout)

    async def move_leader(self, endpoint: str, target_id: int, *, timeout: float | None = None) -> None:
        """Ask the leader (`endpoint` must be the leader) to hand leadership to `target_id`."""
        payload = {"targetID": str(target_id)}
        await self._post(endpoint, "/v3/maintenance/transfer-leadership", payload, timeout)

    async def read_metrics(self, endpoint: str, *, timeout: float | None = None) -> MetricsFacts:
        """The backend quota and the process start time from the member's `/metrics` page."""
        url = endpoint.rstrip("/") + "/metrics"
        seconds = timeout if timeout is not None else self.timeout_seconds
        async with (
            _bounded(self._session, endpoint, "/metrics", seconds),
            self._session.get(
                url,
                ssl=self._ssl,
                server_hostname=self._server_name,
                timeout=_timeout(seconds),
            ) as response,
        ):
            if response.status != 200:
                raise EtcdApiError(endpoint, f"/metrics: HTTP {response.status}", http_status=response.status)
            # One read and a C-level search per figure: line-by-line reading of the ~150 kB page
            # cost more than everything else in a cold refresh of 1,000 members (bench/exporter.py).
            return metrics_facts(await response.read())
