"""Real multi-member etcd clusters on loopback, for tests.

Every cluster lives in its own temporary directory under the root it is given, listens only on
127.0.0.1 on ports the kernel handed out, and is torn down (processes stopped, directory removed) by
`EtcdCluster.stop`, which fixture finalizers call and an `atexit` hook calls again for anything left
over. Members are started with PR_SET_PDEATHSIG so that even a SIGKILLed pytest leaves no etcd behind.

The harness talks to etcd through its v3 JSON gateway
(https://etcd.io/docs/v3.4/dev-guide/api_grpc_gateway/): POST a JSON body, bytes fields
base64-encoded, 64-bit integers as JSON strings, zero values omitted.
It deliberately does not import `exporter`: it is the yardstick the exporter is measured against.

Each cluster runs one etcd release (`EtcdBuild`): by default the etcd installed on the machine
(Debian's 3.4), or a pinned 3.5/3.6 build made by scripts/build-etcd (`find_build`). The suite picks
the releases with ETCD_VERSIONS (`builds_from_env`, used by tests/conftest.py).
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import trustme
from processes import die_with_parent

# The installed etcd (Debian's etcd-server and etcd-client packages): what runs unless told otherwise.
ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BIN = shutil.which("etcdctl") or "/usr/bin/etcdctl"
REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-etcd"
# Which releases the suite runs against, e.g. "3.4,3.5,3.6"; unset: the installed etcd only.
VERSIONS_ENV = "ETCD_VERSIONS"
LOOPBACK = "127.0.0.1"

# Elections within ~0.5 s after a leader is stopped, yet 10 heartbeats per election timeout so a slow
# fsync on a busy CI disk does not trigger a spurious election (etcd's tuning guide asks for >= 5x).
HEARTBEAT_INTERVAL_MS = 50
ELECTION_TIMEOUT_MS = 500
# 'warn' keeps the logs small but still records peer trouble, slow applies and fatal start-up errors,
# which is what a timed-out wait needs to explain itself. etcd 3.4 accepts debug|info|warn|error|...
LOG_LEVEL = "warn"
# Defaults of etcd 3.4 (--max-txn-ops, --max-request-bytes): the bulk writers stay under both.
MAX_TXN_OPS = 128
MAX_TXN_VALUE_BYTES = 1024 * 1024
# How often a start that lost the free-port race (another process bound the port between our probe
# and etcd's bind) is retried with fresh ports.
START_ATTEMPTS = 3
HTTP_TIMEOUT_SECONDS = 5.0
LOG_TAIL_LINES = 15
NOSPACE_ERROR = "etcdserver: mvcc: database space exceeded"
# bbolt's page size is the OS page size: 4 KiB on the Linux machines the tests and the demo run on.
PAGE_BYTES = 4096
# The writes after a compaction (the waits' ticks, etcd's own bookkeeping) take a few of its freed
# pages back: each commit copies the branch and leaf pages it touches, and the old copies become
# free only at a later write transaction. 64 pages are several commits' worth; after the demo's
# compactions, what is in use beyond the live values measures under 0.1 MiB.
COMPACTION_SLACK_BYTES = 64 * PAGE_BYTES
ADDRESS_IN_USE = "address already in use"

T = TypeVar("T")


class EtcdHarnessError(RuntimeError):
    """The harness could not bring etcd into the state a test asked for."""


class EtcdRequestError(EtcdHarnessError):
    """etcd answered a gateway request with an error."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url = url
        self.status = status
        self.message = message


class _MemberExited(EtcdHarnessError):
    """A member process ended while the harness was waiting for it to come up."""

    def __init__(self, member: EtcdMember) -> None:
        super().__init__(f"etcd member {member.name} exited early\n{member.log_tail()}")
        self.member = member


def free_after_compaction_floor_bytes(*, superseded_bytes: int, live_keys: int) -> int:
    """The free bytes (dbSize - dbSizeInUse) every member is sure to show after a compaction.

    Before the compaction every version was in use at once, and a member's dbSize (bbolt's page
    high-water mark, which the file never shrinks below without a defrag) covered them all; after
    it, only the latest versions stay in use. So once bbolt has released the pages the compaction
    freed, the free bytes are at least the superseded versions' bytes, less one page per live key (a
    leaf rewritten around a surviving value may round up by a page) and COMPACTION_SLACK_BYTES.
    Whatever shows above that is bbolt's allocator (how far the file outgrew the data), which
    differs per member and per run: no wait may count on it.
    """
    return superseded_bytes - live_keys * PAGE_BYTES - COMPACTION_SLACK_BYTES


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll `predicate` until it returns something truthy and return that; TimeoutError names `what`.

    Exceptions listed in `ignore` count as "not yet" and the last one is quoted in the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as error:
            last_error = error
        else:
            if result:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(min(interval, remaining))


@dataclass(frozen=True)
class TlsMaterial:
    """CA and a client certificate signed by it, as files etcd, etcdctl and HTTP clients can load."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts the CA and presents the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


@dataclass(frozen=True)
class _ServerTls:
    cert_file: Path
    key_file: Path


def _make_tls(directory: Path) -> tuple[TlsMaterial, _ServerTls]:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    # Kept so that a test can issue more certificates (`trustme.CA.from_pem`), e.g. an expired one.
    ca.private_key_pem.write_to_path(str(directory / "ca-key.pem"))
    # trustme certificates carry both serverAuth and clientAuth usages. etcd needs both on its own
    # certificate: its JSON gateway dials the local gRPC server presenting the server certificate,
    # and --client-cert-auth then checks it for clientAuth.
    server = ca.issue_cert(LOOPBACK, "localhost")
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server-key.pem"))
    client = ca.issue_cert("etcd-harness-client")
    client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client.private_key_pem.write_to_path(str(directory / "client-key.pem"))
    return (
        TlsMaterial(directory / "ca.pem", directory / "client.pem", directory / "client-key.pem"),
        _ServerTls(directory / "server.pem", directory / "server-key.pem"),
    )


@dataclass(frozen=True)
class EtcdBuild:
    """One etcd release: its server and etcdctl binaries and the version the server reports."""

    version: str  # e.g. "3.6.17", as `etcd --version` prints it
    etcd: str
    etcdctl: str

    @property
    def line(self) -> str:
        """The minor version line, e.g. "3.6": what ETCD_VERSIONS names."""
        return ".".join(self.version.split(".")[:2])

    @property
    def release(self) -> tuple[int, int]:
        """(major, minor), for comparisons such as `build.release >= (3, 6)`."""
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def test_id(self) -> str:
        """The id the suite gives tests run against this release, e.g. "etcd3.6"."""
        return f"etcd{self.line}"


_VERSION_LINE = re.compile(r"^etcd Version: (\S+)$", re.MULTILINE)


def etcd_version(etcd: str) -> str:
    """The version an etcd binary reports, e.g. "3.4.23"."""
    _check_binaries(etcd)
    output = subprocess.run([etcd, "--version"], capture_output=True, text=True, timeout=30, check=False)
    match = _VERSION_LINE.search(output.stdout)
    if match is None:
        raise EtcdHarnessError(f"{etcd} --version printed no 'etcd Version:' line: {output.stdout!r}")
    return match.group(1)


@functools.cache
def installed_build() -> EtcdBuild:
    """The etcd on PATH (else /usr/bin), with its etcdctl."""
    _check_binaries(ETCD_BIN, ETCDCTL_BIN)
    return EtcdBuild(etcd_version(ETCD_BIN), ETCD_BIN, ETCDCTL_BIN)


@functools.cache
def find_build(line: str) -> EtcdBuild:
    """The binaries for a version line such as "3.6".

    A line pinned under tools/etcd/ comes from scripts/build-etcd's cache (and must have been built
    from the current pin); any other line is served by the installed etcd if that is its version.
    """
    if (REPO_ROOT / "tools" / "etcd" / f"v{line}").is_dir():
        where = subprocess.run(
            [str(BUILD_SCRIPT), "--where", line], capture_output=True, text=True, timeout=30, check=False
        )
        if where.returncode != 0:
            raise EtcdHarnessError(where.stderr.strip() or f"{BUILD_SCRIPT} --where {line} failed")
        directory = Path(where.stdout.strip())
        etcd, etcdctl = str(directory / "etcd"), str(directory / "etcdctl")
        build = EtcdBuild(etcd_version(etcd), etcd, etcdctl)
    else:
        build = installed_build()
    if build.line != line:
        pinned = sorted(p.name.removeprefix("v") for p in (REPO_ROOT / "tools" / "etcd").glob("v*"))
        raise EtcdHarnessError(
            f"no etcd {line} here: the installed etcd is {build.version} and the pinned builds "
            f"(scripts/build-etcd) are {', '.join(pinned)}"
        )
    return build


def builds_from_env(value: str | None) -> list[EtcdBuild] | None:
    """The builds ETCD_VERSIONS names (e.g. "3.4,3.5,3.6"), in that order; None when it is unset."""
    if value is None or not value.strip():
        return None
    lines = [line.strip() for line in value.split(",") if line.strip()]
    malformed = [line for line in lines if not re.fullmatch(r"3\.\d+", line)]
    if malformed:
        raise EtcdHarnessError(
            f"{VERSIONS_ENV}={value!r}: {malformed} are not version lines like 3.4, 3.5, 3.6"
        )
    if len(set(lines)) != len(lines):
        raise EtcdHarnessError(f"{VERSIONS_ENV}={value!r} names a version twice")
    return [find_build(line) for line in lines]


def _child_environment(prefixes: tuple[str, ...]) -> dict[str, str]:
    """This process's environment without the variables etcd or etcdctl would read as flags.

    Both read every `ETCD_*` / `ETCDCTL_*` variable as a flag, warn about the ones they do not know
    (ETCD_VERSIONS) and exit when one duplicates a flag the harness passes (go.etcd.io/etcd/pkg/flags).
    ETCD_UNSUPPORTED_ARCH stays: etcd 3.4 refuses to start on arm64 without it.
    """
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(prefixes) or name == "ETCD_UNSUPPORTED_ARCH"
    }


class _Http:
    """Tiny JSON-over-HTTP client for the v3 gateway; never goes through a proxy."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, url: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> dict[str, Any]:
        return self._send(urllib.request.Request(url), timeout)

    def get_text(self, url: str, timeout: float = HTTP_TIMEOUT_SECONDS) -> str:
        with self._opener.open(urllib.request.Request(url), timeout=timeout) as response:
            text: str = response.read().decode()
            return text

    def post(
        self, url: str, payload: dict[str, Any], timeout: float = HTTP_TIMEOUT_SECONDS
    ) -> dict[str, Any]:
        request = urllib.request.Request(
            url,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._send(request, timeout)

    def _send(self, request: urllib.request.Request, timeout: float) -> dict[str, Any]:
        try:
            with self._opener.open(request, timeout=timeout) as response:
                result: dict[str, Any] = json.load(response)
                return result
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            try:
                # grpc-gateway v1 (etcd 3.4, 3.5) sends "error", "code" and "message"; v2 (3.6) drops "error".
                parsed = json.loads(body)
                message = parsed.get("error") or parsed.get("message") or body
            except (ValueError, AttributeError):
                message = body
            raise EtcdRequestError(request.full_url, error.code, message) from None


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@dataclass(eq=False)
class EtcdMember:
    """One etcd process; `start` after `stop`/`kill` restarts it on the same data dir and ports."""

    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    log_path: Path
    build: EtcdBuild = field(default_factory=installed_build, repr=False)
    initial_cluster: str = field(default="", repr=False)
    initial_cluster_state: str = field(default="new", repr=False)
    cluster_flags: tuple[str, ...] = field(default=(), repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._http = _Http(self.ssl_context)

    def command(self) -> list[str]:
        """The etcd command line this member runs with."""
        return [
            self.build.etcd,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            # Ignored by etcd once the data dir holds a WAL, so the same flags serve for a restart.
            f"--initial-cluster-state={self.initial_cluster_state}",
            *self.cluster_flags,
        ]

    def start(self) -> None:
        """Start (or restart) the process; does not wait for it to become healthy."""
        if self.running:
            raise EtcdHarnessError(f"etcd member {self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- etcd-harness: starting {self.name} at {time.time():.3f}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                env=_child_environment(("ETCD_",)),
                stdout=log,
                stderr=subprocess.STDOUT,
                # Safe despite threads: the hook only calls prctl(), it takes no locks.
                preexec_fn=die_with_parent(),
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait for the exit (SIGKILL if etcd does not exit within `timeout`).

        A leader hands leadership over before it exits; if no peer can take it (they are down), etcd
        waits for its request timeout, ~6 s with the harness's election timeout.
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL and wait for the exit: a crash, with no chance to flush anything."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit status once the process ended, else None."""
        return None if self._process is None else self._process.poll()

    def status(self, timeout: float = HTTP_TIMEOUT_SECONDS) -> dict[str, Any]:
        """The raw JSON of POST /v3/maintenance/status (ints as strings, zero values omitted)."""
        return self._http.post(f"{self.client_url}/v3/maintenance/status", {}, timeout)

    def metrics_page(self) -> str:
        """The member's own Prometheus exposition (GET /metrics on its client URL)."""
        return self._http.get_text(f"{self.client_url}/metrics")

    def serving_peers(self) -> bool:
        """Whether the peer URL answers GET /version; raises if the process has exited."""
        if not self.running:
            raise _MemberExited(self)
        # Peers talk plain HTTP even in TLS clusters.
        return bool(_Http(None).get(f"{self.peer_url}/version", timeout=1.0))

    def healthy(self) -> bool:
        """Whether GET /health answers {"health": "true"}; False when unreachable."""
        try:
            return self._http.get(f"{self.client_url}/health", 2.0).get("health") == "true"
        except (OSError, EtcdRequestError, ValueError):
            return False

    def defrag_intervals(self) -> list[DefragInterval]:
        """Every defragmentation this member's own log records (it must log at level info)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return parse_defrag_intervals(self.name, text)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the member's log, headed by its name, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = "(no log yet)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} ({self.log_path}), exit code {self.exit_code}:\n{tail}"


_LIVE_CLUSTERS: set[EtcdCluster] = set()


@atexit.register
def _stop_leftover_clusters() -> None:
    for cluster in list(_LIVE_CLUSTERS):
        cluster.stop()


class EtcdCluster:
    """A running etcd cluster in its own directory; a context manager that stops it on exit."""

    def __init__(
        self,
        directory: Path,
        members: list[EtcdMember],
        *,
        quota_bytes: int,
        tls: TlsMaterial | None,
        cluster_flags: tuple[str, ...],
        build: EtcdBuild,
    ) -> None:
        self.directory = directory
        self.build = build
        self.members = members
        self.quota_bytes = quota_bytes
        self.tls = tls
        self._cluster_flags = cluster_flags
        self._ssl_context = tls.client_context() if tls is not None else None
        self._http = _Http(self._ssl_context)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EtcdCluster({self.directory}, members={[m.name for m in self.members]})"

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of all members, running or not, learners included."""
        return [member.client_url for member in self.members]

    def running_members(self) -> list[EtcdMember]:
        """Members whose process is up."""
        return [member for member in self.members if member.running]

    def member(self, name: str) -> EtcdMember:
        """The member called `name`."""
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"no member {name!r} in {self!r}")

    def start(self) -> None:
        """Start every member that is not running and wait until all of them are healthy."""
        _LIVE_CLUSTERS.add(self)
        for member in self.members:
            if member.running:
                continue
            member.start()
            # One at a time: etcd listens on its peer port before it serves it, and a member that
            # bootstraps meanwhile asks that port for /members and hangs for its 1 s bootstrap
            # timeout. Waiting for each peer to answer cuts a 3-member start from ~2 s to ~0.3 s.
            self.wait(
                member.serving_peers,
                timeout=10,
                what=f"{member.name} to serve {member.peer_url}/version",
            )
        self._wait_all_up(self.members, timeout=20)

    def stop(self) -> None:
        """Stop all members and remove the cluster's directory. Safe to call twice."""
        # SIGKILL, not SIGTERM: the directory goes anyway, and a leader that is asked to stop first
        # tries to hand leadership over, waiting up to etcd's request timeout (5 s + 2 election
        # timeouts) when its peers are already gone - seen as 6 s teardowns.
        try:
            for member in self.members:
                member.kill()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            _LIVE_CLUSTERS.discard(self)

    def log_tails(self, members: Iterable[EtcdMember] | None = None) -> str:
        """Tails of the members' logs, for error messages."""
        return "\n".join(m.log_tail() for m in (self.members if members is None else members))

    def wait(self, predicate: Callable[[], T], *, timeout: float, what: str) -> T:
        """`wait_until` that adds the members' log tails to the TimeoutError."""
        try:
            return wait_until(predicate, timeout=timeout, what=what, ignore=(OSError, EtcdRequestError))
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.log_tails()}") from None

    def wait_healthy(self, timeout: float = 20) -> None:
        """Wait until every running member answers GET /health with {"health": "true"}."""
        if not self.running_members():
            raise EtcdHarnessError(f"no member of {self!r} is running\n{self.log_tails()}")
        self.wait(
            lambda: all(member.healthy() for member in self.running_members()),
            timeout=timeout,
            what="every running member to report /health true",
        )

    def _wait_all_up(self, members: list[EtcdMember], *, timeout: float) -> None:
        # Unlike wait_healthy, a member that exits is an immediate failure, not one fewer to wait for.
        def all_up() -> bool:
            for member in members:
                if not member.running:
                    raise _MemberExited(member)
            return all(member.healthy() for member in members)

        self.wait(all_up, timeout=timeout, what=f"members {[m.name for m in members]} healthy")

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Member name -> raw status, for every running member."""
        return {member.name: member.status() for member in self.running_members()}

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        """The running member that reports itself leader; waits for an election if there is none."""

        def find() -> EtcdMember | None:
            for member in self.running_members():
                status = member.status(timeout=2.0)
                if status.get("leader") == status["header"]["member_id"]:
                    return member
            return None

        leader = self.wait(find, timeout=timeout, what="a running member to report itself leader")
        assert leader is not None  # wait() only returns truthy results
        return leader

    def _endpoint(self, endpoint: str | None) -> str:
        if endpoint is not None:
            return endpoint
        running = self.running_members()
        if not running:
            raise EtcdHarnessError(f"no member of {self!r} is running")
        return running[0].client_url

    def request(self, path: str, payload: dict[str, Any], *, endpoint: str | None = None) -> dict[str, Any]:
        """POST `payload` to the gateway `path` (e.g. "/v3/kv/range") on `endpoint` or a running member."""
        return self._http.post(f"{self._endpoint(endpoint)}{path}", payload, timeout=10.0)

    def put(self, key: str, value: bytes, endpoint: str | None = None) -> int:
        """Put one key; returns the revision from the response header."""
        response = self.request("/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, endpoint=endpoint)
        return int(response["header"]["revision"])

    def put_many(self, items: Iterable[tuple[str, bytes]], endpoint: str | None = None) -> int:
        """Put many keys in as few transactions as etcd's default request limits allow."""
        revision = 0
        batch: list[dict[str, Any]] = []
        batch_bytes = 0

        def flush() -> int:
            response = self.request("/v3/kv/txn", {"success": batch}, endpoint=endpoint)
            return int(response["header"]["revision"])

        for key, value in items:
            if batch and (len(batch) >= MAX_TXN_OPS or batch_bytes + len(value) > MAX_TXN_VALUE_BYTES):
                revision = flush()
                batch, batch_bytes = [], 0
            batch.append({"request_put": {"key": _b64(key), "value": _b64(value)}})
            batch_bytes += len(value)
        if batch:
            revision = flush()
        return revision

    def keys_with_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key starting with `prefix` (by name without the prefix) and its value."""
        end = bytearray(prefix.encode())
        end[-1] += 1  # etcd's prefix range end, for the ASCII prefixes tests use
        reply = self.request("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(bytes(end))})
        return {
            base64.b64decode(kv["key"]).decode()[len(prefix) :]: base64.b64decode(kv.get("value", ""))
            for kv in reply.get("kvs") or []
        }

    def revision(self, endpoint: str | None = None) -> int:
        """The current revision of the key-value store."""
        return int(self.request("/v3/maintenance/status", {}, endpoint=endpoint)["header"]["revision"])

    def compact(self, revision: int | None = None) -> None:
        """Compact at `revision` (default: the current one), waiting for the local physical compaction."""
        if revision is None:
            revision = self.revision()
        self.request("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def churn(
        self,
        *,
        keys: int = 200,
        value_size: int = 16 * 1024,
        rounds: int = 3,
        compact: bool = True,
    ) -> None:
        """Write `keys` keys `rounds` times over (then compact) so that every member has free pages.

        With `compact`, returns once every running member shows the free space the compaction is
        sure to give (`free_after_compaction_floor_bytes`): real fragmentation a defrag reclaims.
        """
        floor_bytes = free_after_compaction_floor_bytes(
            superseded_bytes=keys * value_size * (rounds - 1), live_keys=keys
        )
        if compact and floor_bytes <= 0:
            raise EtcdHarnessError(
                f"churn(keys={keys}, value_size={value_size}, rounds={rounds}) supersedes too little "
                "for the compaction to free anything for sure: write more rounds or larger values"
            )
        for round_index in range(rounds):
            value = bytes([round_index % 256]) * value_size
            self.put_many((f"/etcd-harness/churn/{i:06d}", value) for i in range(keys))
        if compact:
            self.compact()
            self.wait_free(floor_bytes, timeout=20)

    def free_everywhere(self, min_free_bytes: int) -> dict[str, int] | None:
        """Member -> free bytes if every running member has `min_free_bytes` free; else None, after a tick.

        bbolt moves the pages a commit freed from "pending" to "free" only at the start of a later
        write transaction (and only once no read transaction still sees them), and etcd writes only
        when it applies something: so a member that already compacted needs more writes before its
        dbSizeInUse shows the space. Each look that falls short writes one tiny key for that.
        """
        free = {name: _free_bytes(status) for name, status in self.statuses().items()}
        if all(f >= min_free_bytes for f in free.values()):
            return free
        self.put("/etcd-harness/tick", b"")
        return None

    def wait_free(self, min_free_bytes: int, *, timeout: float) -> dict[str, int]:
        """`free_everywhere` until it holds; member -> free bytes."""
        free = self.wait(
            lambda: self.free_everywhere(min_free_bytes),
            timeout=timeout,
            what=f"every member to show >= {min_free_bytes} free bytes",
        )
        assert free is not None  # wait() only returns truthy results
        return free

    def fill_until_nospace(self, value_size: int = 64 * 1024, max_writes: int = 10_000) -> None:
        """Write distinct keys until etcd refuses with NOSPACE and the alarm is listed."""
        per_request = max(1, min(MAX_TXN_OPS, MAX_TXN_VALUE_BYTES // value_size))
        value = b"x" * value_size
        written = 0
        while written < max_writes:
            count = min(per_request, max_writes - written)
            items = [(f"/etcd-harness/fill/{written + i:08d}", value) for i in range(count)]
            try:
                self.put_many(items)
            except EtcdRequestError as error:
                if NOSPACE_ERROR not in error.message:
                    raise
                break
            written += count
        else:
            raise EtcdHarnessError(
                f"{max_writes} writes of {value_size} bytes did not exhaust a {self.quota_bytes}-byte quota"
            )
        self.wait(
            lambda: any(alarm.get("alarm") == "NOSPACE" for alarm in self.alarms()),
            timeout=10,
            what="the NOSPACE alarm to be listed",
        )

    def alarms(self) -> list[dict[str, Any]]:
        """Active alarms as etcd lists them: [{"memberID": "...", "alarm": "NOSPACE"}, ...]."""
        # action omitted = GET (the zero value); the gateway omits "alarms" when there are none.
        alarms: list[dict[str, Any]] = self.request("/v3/maintenance/alarm", {}).get("alarms", [])
        return alarms

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run etcdctl (API v3) against the running members; raises on failure when `check`.

        Do not pass `--endpoints` in `args`: etcdctl 3.4 adds repeated `--endpoints` flags up rather than
        taking the last one.
        """
        flags = ["--endpoints=" + ",".join(m.client_url for m in self.running_members())]
        if self.tls is not None:
            flags += [
                f"--cacert={self.tls.ca_file}",
                f"--cert={self.tls.cert_file}",
                f"--key={self.tls.key_file}",
            ]
        # No ETCDCTL_API: 3 is the default since etcdctl 3.4, and etcdctl 3.6 warns about the variable.
        env = _child_environment(("ETCDCTL_", "ETCD_"))
        result = subprocess.run(
            [self.build.etcdctl, *flags, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise EtcdHarnessError(
                f"etcdctl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def add_learner(self, name: str) -> EtcdMember:
        """Add a learner member via `etcdctl member add --learner`, start it and wait until healthy."""
        for attempt in range(START_ATTEMPTS):
            client_port, peer_port = _free_ports(2)
            peer_url = f"http://{LOOPBACK}:{peer_port}"
            result = self.etcdctl("member", "add", name, "--learner", f"--peer-urls={peer_url}")
            member_id = _member_add_id(result.stdout)
            initial_cluster = ",".join(
                [f"{m.name}={m.peer_url}" for m in self.members] + [f"{name}={peer_url}"]
            )
            learner = self._new_member(
                name,
                client_url=f"{self._scheme}://{LOOPBACK}:{client_port}",
                peer_url=peer_url,
                initial_cluster=initial_cluster,
                initial_cluster_state="existing",
            )
            learner.start()
            try:
                self._wait_all_up([learner], timeout=20)
            except _MemberExited as error:
                if attempt + 1 < START_ATTEMPTS and ADDRESS_IN_USE in error.member.log_tail():
                    self.etcdctl("member", "remove", member_id)
                    shutil.rmtree(learner.data_dir, ignore_errors=True)
                    continue
                raise
            except TimeoutError:
                learner.stop()
                raise
            self.members.append(learner)
            return learner
        raise AssertionError("unreachable")

    @property
    def _scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def _new_member(
        self,
        name: str,
        *,
        client_url: str,
        peer_url: str,
        initial_cluster: str,
        initial_cluster_state: str,
    ) -> EtcdMember:
        return EtcdMember(
            name=name,
            client_url=client_url,
            peer_url=peer_url,
            data_dir=self.directory / name / "data",
            log_path=self.directory / name / "etcd.log",
            initial_cluster=initial_cluster,
            initial_cluster_state=initial_cluster_state,
            cluster_flags=self._cluster_flags,
            build=self.build,
            ssl_context=self._ssl_context,
        )


@dataclass(frozen=True)
class DefragInterval:
    """One defragmentation of one member's backend, from its log: etcd held the backend in between."""

    member: str
    started: datetime
    finished: datetime | None  # None: still running, or the member died during it

    def overlaps(self, other: DefragInterval) -> bool:
        """Both ran at one instant (an unfinished one runs until the end of time)."""
        end = self.finished or datetime.max.replace(tzinfo=UTC)
        other_end = other.finished or datetime.max.replace(tzinfo=UTC)
        return self.started < other_end and other.started < end


# The backend's own lines around the copy (server/mvcc/backend/backend.go): "defragmenting", then
# "defragmented" (3.4) or "finished defragmenting directory" (3.5, 3.6); zap JSON, "ts" in ISO 8601.
_DEFRAG_STARTED = ("defragmenting",)
_DEFRAG_FINISHED = ("defragmented", "finished defragmenting directory")


def parse_defrag_intervals(member: str, log_text: str) -> list[DefragInterval]:
    """The defragmentations in one member's zap JSON log, in order."""
    intervals: list[DefragInterval] = []
    started: datetime | None = None
    for line in log_text.splitlines():
        if not line.startswith("{"):
            if line.startswith("--- etcd-harness: starting") and started is not None:
                intervals.append(DefragInterval(member, started, None))  # died during it
                started = None
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = entry.get("msg")
        if message in _DEFRAG_STARTED:
            started = _log_time(entry["ts"])
        elif message in _DEFRAG_FINISHED and started is not None:
            intervals.append(DefragInterval(member, started, _log_time(entry["ts"])))
            started = None
    if started is not None:
        intervals.append(DefragInterval(member, started, None))
    return intervals


def _log_time(value: str | float) -> datetime:
    if isinstance(value, int | float):  # zap's epoch format, should a version use it
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _free_bytes(status: dict[str, Any]) -> int:
    return int(status.get("dbSize", 0)) - int(status.get("dbSizeInUse", 0))


def _member_add_id(stdout: str) -> str:
    # "Member 8e9e05c52164694d added to cluster ..." - etcdctl prints the ID in hex.
    for word_index, word in enumerate(words := stdout.split()):
        if word == "Member" and word_index + 1 < len(words):
            return words[word_index + 1]
    raise EtcdHarnessError(f"cannot find the new member's ID in etcdctl output: {stdout!r}")


def _free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1; all held open together so they are distinct."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _check_binaries(*paths: str) -> None:
    missing = [path for path in paths if not os.access(path, os.X_OK)]
    if missing:
        raise EtcdHarnessError(
            f"etcd binaries not found: {', '.join(missing)}. Run `make test`, which installs the "
            "Debian packages etcd-server and etcd-client before running pytest."
        )


def start_cluster(
    tmp_root: Path,
    *,
    size: int = 3,
    quota_bytes: int = 32 * 1024 * 1024,
    tls: bool = False,
    learner: bool = False,
    log_level: str = LOG_LEVEL,
    build: EtcdBuild | None = None,
) -> EtcdCluster:
    """Start a healthy `size`-member cluster of `build` (default: the installed etcd) under `tmp_root`.

    With `learner`, one more member is then added as a learner and started. `log_level="info"` makes
    etcd log each defragmentation (see `defrag_intervals`).
    """
    build = build or installed_build()
    tmp_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(START_ATTEMPTS):
        cluster = _launch(
            tmp_root,
            size=size,
            quota_bytes=quota_bytes,
            tls=tls,
            learner=learner,
            log_level=log_level,
            build=build,
        )
        try:
            cluster.start()
        except _MemberExited as error:
            lost_port_race = ADDRESS_IN_USE in error.member.log_tail()
            cluster.stop()  # removes the logs, so look at them first
            if lost_port_race and attempt + 1 < START_ATTEMPTS:
                continue  # another process bound a port between our probe and etcd's bind
            raise
        except BaseException:
            cluster.stop()
            raise
        if learner:
            try:
                cluster.add_learner(f"etcd-{size}-learner")
            except BaseException:
                cluster.stop()
                raise
        return cluster
    raise AssertionError("unreachable")


def _launch(
    tmp_root: Path,
    *,
    size: int,
    quota_bytes: int,
    tls: bool,
    learner: bool,
    log_level: str,
    build: EtcdBuild,
) -> EtcdCluster:
    directory = Path(tempfile.mkdtemp(prefix="etcd-", dir=tmp_root))
    tls_material, server_tls = _make_tls(directory / "tls") if tls else (None, None)
    flags = [
        f"--initial-cluster-token=etcd-harness-{uuid.uuid4().hex}",
        f"--quota-backend-bytes={quota_bytes}",
        f"--heartbeat-interval={HEARTBEAT_INTERVAL_MS}",
        f"--election-timeout={ELECTION_TIMEOUT_MS}",
        "--auto-compaction-retention=0",
        # 3.4 logs with capnslog unless told; zap is the default of 3.5 and the only choice in 3.6.
        "--logger=zap",
        "--log-outputs=stderr",
        f"--log-level={log_level}",
    ]
    if server_tls is not None and tls_material is not None:
        flags += [
            f"--cert-file={server_tls.cert_file}",
            f"--key-file={server_tls.key_file}",
            f"--trusted-ca-file={tls_material.ca_file}",
            "--client-cert-auth",
        ]
    if learner:
        # etcd refuses `member add` with "unhealthy cluster" until every voting member has been
        # connected to all peers for 5 s (etcdserver.HealthInterval). Learners do not endanger quorum,
        # so skip that check instead of making every learner test wait 5 s.
        flags.append("--strict-reconfig-check=false")
    ports = _free_ports(2 * size)
    cluster = EtcdCluster(
        directory, [], quota_bytes=quota_bytes, tls=tls_material, cluster_flags=tuple(flags), build=build
    )
    scheme = "https" if tls else "http"
    names = [f"etcd-{i}" for i in range(size)]
    peer_urls = [f"http://{LOOPBACK}:{ports[2 * i + 1]}" for i in range(size)]
    initial_cluster = ",".join(f"{n}={u}" for n, u in zip(names, peer_urls, strict=True))
    cluster.members = [
        cluster._new_member(
            name,
            client_url=f"{scheme}://{LOOPBACK}:{ports[2 * i]}",
            peer_url=peer_urls[i],
            initial_cluster=initial_cluster,
            initial_cluster_state="new",
        )
        for i, name in enumerate(names)
    ]
    return cluster
