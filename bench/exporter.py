"""Benchmark: one scrape of the exporter watching 1,000 etcd members in 334 clusters.

Run from the repository root:

    .venv/bin/python bench/exporter.py            # the figures in docs/benchmarks.md
    .venv/bin/python bench/exporter.py --quick    # smoke run: 100 members, one round
    .venv/bin/python bench/exporter.py --record   # record bench/data/ again from a real etcd 3.4
    .venv/bin/python bench/exporter.py --growth   # 1k, 3k, 10k members in one process; 10k over 4 shards

`--growth` measures (a) alone: one exporter process's scrape time and peak RSS as the fleet grows
(`--growth-members`, default 1,000, 3,000 and 10,000), then the largest fleet split over
`--shards` exporter processes (default 4; `sharding` settings, docs/sharding.md), each scraped in
turn, as Prometheus scrapes each replica of a StatefulSet.

Three readers of the same fleet are compared, each in a process of its own so that its CPU time and
peak RSS are its own:

(a) exporter: `GET /metrics` on the real service from `exporter.service.app.create_app`, served on 127.0.0.1
    and scraped from the parent process as Prometheus would (its Accept headers, gzip). Every scrape
    refreshes (min_refresh_interval_seconds=0): one status POST per member, member lists and quotas
    cached after the first scrape, which is reported on its own as the cold scrape.
(b) limit: the same status POSTs from a bare aiohttp loop (JSON decoded, nothing else) over a
    connector with the same connection limit (settings.max_concurrent_requests).
(c) naive: a naive exporter that GETs every member's full /metrics page (recorded from etcd 3.4) and
    parses it with prometheus_client's text parser, with the same connection limit.

The fleet is played by one more process (so its CPU never counts against a reader): one aiohttp
server with one listening socket per member on 127.0.0.1, kernel-assigned ports, so every member has
a client URL of its own (`http://127.0.0.1:PORT`, no path, as settings require) and a connection pool
of its own in the client. It answers with replies recorded from a real etcd 3.4 member (bench/data/),
rewritten per member: ids, leader, sizes, raft indexes; every 50th cluster carries a NOSPACE alarm.
"""

import argparse
import asyncio
import base64
import contextlib
import gzip
import http.client
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

# Run as a script, this file's folder comes first on sys.path and this file (bench/exporter.py) would
# shadow the `exporter` package it measures; the package is imported only after this line.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

DATA_DIR = _HERE / "data"
STATUS_FILE = "status.json"
STATUS_NOSPACE_FILE = "status-nospace.json"
MEMBER_LIST_FILE = "member-list.json"
METRICS_FILE = "metrics.txt"
RECORDING_FILE = "recording.json"

STATUS_PATH = "/v3/maintenance/status"
MEMBER_LIST_PATH = "/v3/cluster/member/list"
METRICS_PATH = "/metrics"

MEMBERS = 1000
MEMBERS_PER_CLUSTER = 3
NOSPACE_EVERY_CLUSTERS = 50  # every 50th cluster has a NOSPACE alarm raised (an `errors` entry)
SEED = 20240601
QUOTA_BYTES = 64 * 1024 * 1024  # --quota-backend-bytes of the recorded member
PAGE_BYTES = 4096  # bbolt grows and reports the file in whole pages

# What Prometheus 2.x sends by default (scrape_protocols: OpenMetricsText1.0.0, OpenMetricsText0.0.1,
# PrometheusText0.0.4; scrape/scrape.go acceptHeader) with compression on.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_HEADERS = {
    "Accept": PROMETHEUS_ACCEPT,
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.53.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "30",
}
# The gauges a naive exporter would take from each member's page.
NAIVE_GAUGES = (
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_server_quota_backend_bytes",
    "etcd_server_is_leader",
)
REQUEST_TIMEOUT_SECONDS = 30.0
_COMMIT: list[str] = []  # set by --commit: the commit whose exporter/ is measured
PROFILE_LINES = 30


# --- recording real replies -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(
    method: str, url: str, payload: Any = None, headers: dict[str, str] | None = None
) -> tuple[Any, bytes]:
    """(response headers, raw body) of one request; raises for any status but 200."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers, response.read()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _fill(url: str) -> str:
    """Write, overwrite, delete and compact keys so the member looks used; returns what was done."""
    rng = random.Random(SEED)

    def value() -> str:
        return base64.b64encode(rng.randbytes(1024)).decode()

    def txn(ops: list[dict[str, Any]]) -> None:
        _http("POST", url + "/v3/kv/txn", {"success": ops})

    keys = [f"/registry/bench/key-{i:05d}" for i in range(4000)]
    for start in range(0, len(keys), 100):  # below etcd's --max-txn-ops (128)
        txn([{"requestPut": {"key": _b64(k), "value": value()}} for k in keys[start : start + 100]])
    for start in range(0, 1000, 100):
        txn([{"requestPut": {"key": _b64(k), "value": value()}} for k in keys[start : start + 100]])
    for start in range(0, 2000, 100):
        txn([{"requestDeleteRange": {"key": _b64(k)}} for k in keys[start : start + 100]])
    _, body = _http("POST", url + "/v3/kv/range", {"key": _b64("/registry/"), "count_only": True})
    revision = json.loads(body)["header"]["revision"]
    _http("POST", url + "/v3/kv/compaction", {"revision": revision, "physical": True})
    # Pages freed by the compaction show as free only after the next write commits.
    _http("POST", url + "/v3/kv/put", {"key": _b64("/registry/bench/last"), "value": value()})
    for _ in range(20):
        _http("POST", url + "/v3/kv/range", {"key": _b64(keys[-1])})
    lease = json.loads(_http("POST", url + "/v3/lease/grant", {"TTL": 600})[1])["ID"]
    _http("POST", url + "/v3/lease/revoke", {"ID": lease})
    return (
        "4,000 puts of 1 KiB values in transactions of 100, 1,000 overwrites, 2,000 deletes, "
        "a physical compaction, one more put, 20 reads, a lease granted and revoked"
    )


def record(data_dir: Path) -> None:
    """Start a real single-member etcd, use it a little, and save its replies into `data_dir`."""
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    version = subprocess.run([etcd, "--version"], capture_output=True, text=True, check=True).stdout
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
        url = f"http://127.0.0.1:{_free_port()}"
        peer = f"http://127.0.0.1:{_free_port()}"
        command = [
            etcd,
            "--name=bench",
            f"--data-dir={tmp}/data",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            f"--quota-backend-bytes={QUOTA_BYTES}",
            "--logger=zap",
            "--log-level=warn",
        ]
        with (
            open(f"{tmp}/etcd.log", "wb") as log,
            subprocess.Popen(command, stdout=log, stderr=log) as etcd_proc,
        ):
            try:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        _http("POST", url + STATUS_PATH, {})
                        break
                    except (OSError, urllib.error.URLError):
                        if time.monotonic() > deadline or etcd_proc.poll() is not None:
                            log_text = Path(tmp, "etcd.log").read_text()
                            raise RuntimeError(f"etcd did not start: {log_text}") from None
                        time.sleep(0.1)
                workload = _fill(url)
                status_headers, status = _http("POST", url + STATUS_PATH, {})
                members_headers, members = _http("POST", url + MEMBER_LIST_PATH, {"linearizable": True})
                member_id = json.loads(status)["header"]["member_id"]
                alarm = {"memberID": member_id, "alarm": "NOSPACE"}
                _http("POST", url + "/v3/maintenance/alarm", {"action": "ACTIVATE", **alarm})
                _, status_nospace = _http("POST", url + STATUS_PATH, {})
                _http("POST", url + "/v3/maintenance/alarm", {"action": "DEACTIVATE", **alarm})
                metrics_headers, metrics = _http("GET", url + METRICS_PATH)
                gzip_headers, _ = _http("GET", url + METRICS_PATH, headers={"Accept-Encoding": "gzip"})
            finally:
                etcd_proc.terminate()
                etcd_proc.wait(10)
    (data_dir / STATUS_FILE).write_bytes(status)
    (data_dir / STATUS_NOSPACE_FILE).write_bytes(status_nospace)
    (data_dir / MEMBER_LIST_FILE).write_bytes(members)
    (data_dir / METRICS_FILE).write_bytes(metrics)
    recording = {
        "etcd_version": version.split("\n", 1)[0].removeprefix("etcd Version: "),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quota_backend_bytes": QUOTA_BYTES,
        "workload": workload,
        "content_type": {
            STATUS_PATH: status_headers["Content-Type"],
            MEMBER_LIST_PATH: members_headers["Content-Type"],
            METRICS_PATH: metrics_headers["Content-Type"],
        },
        "metrics_gzip": gzip_headers.get("Content-Encoding") == "gzip",
        "command": "bench/exporter.py --record",
    }
    (data_dir / RECORDING_FILE).write_text(json.dumps(recording, indent=2) + "\n")
    print(f"recorded {len(metrics):,} bytes of /metrics and the JSON replies into {data_dir}")


# --- the synthetic fleet ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """The replies of the real etcd member, as saved by `record`."""

    status: dict[str, Any]
    status_nospace: dict[str, Any]
    member_list: dict[str, Any]
    metrics: bytes
    content_type: dict[str, str]
    metrics_gzip: bool

    @classmethod
    def load(cls, data_dir: Path) -> "Recorded":
        recording = json.loads((data_dir / RECORDING_FILE).read_text())
        return cls(
            status=json.loads((data_dir / STATUS_FILE).read_bytes()),
            status_nospace=json.loads((data_dir / STATUS_NOSPACE_FILE).read_bytes()),
            member_list=json.loads((data_dir / MEMBER_LIST_FILE).read_bytes()),
            metrics=(data_dir / METRICS_FILE).read_bytes(),
            content_type=recording["content_type"],
            metrics_gzip=recording["metrics_gzip"],
        )


def cluster_sizes(members: int) -> list[int]:
    """Clusters of three, and one smaller cluster for the rest: 1,000 members -> 333 x 3 + 1."""
    full, rest = divmod(members, MEMBERS_PER_CLUSTER)
    return [MEMBERS_PER_CLUSTER] * full + ([rest] if rest else [])


def cluster_name(index: int) -> str:
    return f"bench-{index:04d}"


def _compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def fleet_replies(recorded: Recorded, urls: list[str]) -> list[tuple[bytes, bytes]]:
    """(status reply, member list reply) of every member, rewritten from the recorded ones.

    Every member has its own id, sizes and raft indexes; a cluster's members share a cluster id,
    a leader (the first member) and a term, and list each other in the member list.
    """
    rng = random.Random(SEED)
    first_page = int(recorded.status["dbSize"]) // PAGE_BYTES
    last_page = int(QUOTA_BYTES * 0.9) // PAGE_BYTES
    replies: list[tuple[bytes, bytes]] = []
    offset = 0
    for cluster, size in enumerate(cluster_sizes(len(urls))):
        cluster_urls = urls[offset : offset + size]
        offset += size
        ids = [rng.getrandbits(64) | 1 for _ in cluster_urls]
        cluster_id = str(rng.getrandbits(64))
        term = str(rng.randint(2, 40))
        revision = int(recorded.status["header"]["revision"]) + rng.randint(0, 10**6)
        raft_index = revision + rng.randint(10, 10**4)
        nospace = cluster % NOSPACE_EVERY_CLUSTERS == NOSPACE_EVERY_CLUSTERS - 1
        members = [
            {
                **recorded.member_list["members"][0],
                "ID": str(member_id),
                "name": f"{cluster_name(cluster)}-{k}",
                "peerURLs": [f"http://{cluster_name(cluster)}-{k}.invalid:2380"],  # never contacted
                "clientURLs": [url],
            }
            for k, (member_id, url) in enumerate(zip(ids, cluster_urls, strict=True))
        ]
        for k, member_id in enumerate(ids):
            pages = rng.randint(first_page, last_page)
            status = json.loads(json.dumps(recorded.status_nospace if nospace else recorded.status))
            status["header"].update(
                cluster_id=cluster_id, member_id=str(member_id), revision=str(revision), raft_term=term
            )
            status.update(
                dbSize=str(pages * PAGE_BYTES),
                dbSizeInUse=str(rng.randint(pages // 5, pages) * PAGE_BYTES),
                leader=str(ids[0]),
                raftIndex=str(raft_index - k),
                raftAppliedIndex=str(raft_index - k),
                raftTerm=term,
            )
            if nospace:
                status["errors"] = [f"memberID:{ids[0]} alarm:NOSPACE "]
            member_list = {
                "header": {
                    **recorded.member_list["header"],
                    "cluster_id": cluster_id,
                    "member_id": str(member_id),
                },
                "members": members,
            }
            replies.append((_compact(status), _compact(member_list)))
    return replies


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _fleet_main(conn: Connection, data_dir: Path, members: int) -> None:
    recorded = Recorded.load(data_dir)
    sockets = [_listening_socket() for _ in range(members)]
    urls = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    by_port = {
        sock.getsockname()[1]: reply
        for sock, reply in zip(sockets, fleet_replies(recorded, urls), strict=True)
    }
    json_type = {"Content-Type": recorded.content_type[STATUS_PATH]}
    metrics_type = {"Content-Type": recorded.content_type[METRICS_PATH]}
    # etcd's /metrics (promhttp) gzips for a client that accepts it, as aiohttp's client does.
    metrics_gzip = gzip.compress(recorded.metrics, compresslevel=6) if recorded.metrics_gzip else b""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        if transport is None:
            return web.Response(status=500)
        status, member_list = by_port[transport.get_extra_info("sockname")[1]]  # the member's socket
        if request.path == STATUS_PATH and request.method == "POST":
            return web.Response(body=status, headers=json_type)
        if request.path == MEMBER_LIST_PATH and request.method == "POST":
            return web.Response(body=member_list, headers=json_type)
        if request.path == METRICS_PATH and request.method == "GET":
            if metrics_gzip and "gzip" in request.headers.get("Accept-Encoding", ""):
                return web.Response(body=metrics_gzip, headers={**metrics_type, "Content-Encoding": "gzip"})
            return web.Response(body=recorded.metrics, headers=metrics_type)
        return web.Response(status=404, text="404 page not found\n")

    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock).start()
    conn.send(urls)
    try:
        await _serve_commands(conn, {})
    finally:
        await runner.cleanup()


# --- the processes: one command at a time over a pipe ----------------------------------------------

Handler = Callable[..., Awaitable[dict[str, Any]]]


def _usage() -> dict[str, Any]:
    """This process's CPU seconds so far, current RSS and peak RSS (bytes)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return {
        "cpu_seconds": ru.ru_utime + ru.ru_stime,
        "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE"),
        "max_rss_bytes": ru.ru_maxrss * 1024,  # KiB on Linux
    }


async def _serve_commands(conn: Connection, handlers: Mapping[str, Handler]) -> None:
    """Answer the parent's commands, "name" or ("name", *args), until it says stop.

    Waiting happens in a thread, so costs no CPU. Also used by bench/webhook_storm.py.
    """
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "stop":
            conn.send({})
            return
        name, *args = (command,) if isinstance(command, str) else command
        try:
            reply = _usage() if name == "usage" else await handlers[name](*args)
        except Exception as exc:  # the parent raises it with the process's name
            reply = {"error": f"{name}: {exc!r}"}
        conn.send(reply)


def _process_entry(kind: str, conn: Connection, *args: Any) -> None:
    """What a spawned process runs; `kind` picks the role."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    roles: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
        "fleet": _fleet_main,
        "exporter": _exporter_main,
        "limit": _limit_main,
        "naive": _naive_main,
    }
    asyncio.run(roles[kind](conn, *args))


async def _exporter_main(
    conn: Connection,
    endpoints: list[list[str]],
    concurrency: int,
    shard: tuple[int, int] = (0, 1),
    budget_seconds: float = 30,
) -> None:
    """(a) The real service: create_app on 127.0.0.1, scraped by the parent; `shard` (index, total)."""
    import cProfile
    import io
    import logging
    import pstats

    from prometheus_client.exposition import choose_encoder, generate_latest

    from exporter.config.settings import Settings
    from exporter.service.app import REFRESHER, REGISTRY, create_app
    from exporter.service.refresh import Refresher

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(
        clusters=[{"name": cluster_name(c), "endpoints": urls} for c, urls in enumerate(endpoints)],
        scrape_budget_seconds=budget_seconds,  # never truncates a refresh here
        min_refresh_interval_seconds=0,  # every scrape refreshes
        member_list_refresh_seconds=3600,  # steady state: member lists cached after the first scrape
        background_refresh_seconds=3600,  # only the refresh at start-up; scrapes drive the rest
        max_concurrent_requests=concurrency,
        sharding={"shard": shard[0], "total_shards": shard[1]},
    )
    app = create_app(settings, clusters=settings.clusters)
    runner = web.AppRunner(app, access_log=None)
    sock = _listening_socket()
    profiler = cProfile.Profile()

    def members_up(refresher: Refresher) -> int:
        return sum(m.up for _, snapshot in refresher.snapshots() for m in snapshot.members)

    async def start() -> dict[str, Any]:
        await runner.setup()  # starts the session and the background refresh (the cold one)
        await web.SockSite(runner, sock).start()
        return {"port": sock.getsockname()[1], "package": str(Path(create_app.__code__.co_filename).parent)}

    async def refresh() -> dict[str, Any]:
        started = time.perf_counter()
        await app[REFRESHER].refresh()
        return {"seconds": time.perf_counter() - started, "up": members_up(app[REFRESHER])}

    async def render() -> dict[str, Any]:
        """The exposition alone: OpenMetrics (what Prometheus asks for) and the 0.0.4 text format."""
        openmetrics, _ = choose_encoder(PROMETHEUS_ACCEPT)  # what the /metrics handler picks
        started = time.perf_counter()
        body = openmetrics(app[REGISTRY])
        middle = time.perf_counter()
        text = generate_latest(app[REGISTRY])
        return {
            "seconds": middle - started,
            "bytes": len(body),
            "text_seconds": time.perf_counter() - middle,
            "text_bytes": len(text),
        }

    async def up() -> dict[str, Any]:
        return {"up": members_up(app[REFRESHER])}

    async def profile_start() -> dict[str, Any]:
        profiler.enable()
        return {}

    async def profile_stop() -> dict[str, Any]:
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(PROFILE_LINES)
        stats.sort_stats("cumulative").print_stats(PROFILE_LINES)
        profiler.clear()
        return {"text": out.getvalue()}

    handlers = {
        "start": start,
        "refresh": refresh,
        "render": render,
        "up": up,
        "profile_start": profile_start,
        "profile_stop": profile_stop,
    }
    try:
        await _serve_commands(conn, handlers)
    finally:
        await runner.cleanup()


def _session(concurrency: int) -> aiohttp.ClientSession:
    """A session bounded like the exporter's: `concurrency` connections in all, none per host."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    # No `total`: it would count the wait for a free connection too, and the naive pass keeps 1,000
    # requests queued behind 64 connections for tens of seconds.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=REQUEST_TIMEOUT_SECONDS, sock_read=REQUEST_TIMEOUT_SECONDS
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _limit_main(conn: Connection, urls: list[str], concurrency: int) -> None:
    """(b) The limit: the same status POSTs from a bare loop, JSON decoded and nothing else."""
    async with _session(concurrency) as session:

        async def one(url: str) -> str:
            async with session.post(url + STATUS_PATH, json={}) as response:
                body = await response.json(content_type=None)
            return str(body["header"]["member_id"])

        async def run() -> dict[str, Any]:
            started = time.perf_counter()
            ids = await asyncio.gather(*(one(url) for url in urls))
            return {"seconds": time.perf_counter() - started, "up": len(set(ids))}

        await _serve_commands(conn, {"run": run})


async def _naive_main(conn: Connection, urls: list[str], concurrency: int) -> None:
    """(c) A naive exporter: every member's full /metrics page, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    async with _session(concurrency) as session:

        async def one(url: str) -> dict[str, float]:
            async with session.get(url + METRICS_PATH) as response:
                text = await response.text()
            return {
                family.name: family.samples[0].value
                for family in text_string_to_metric_families(text)
                if family.name in NAIVE_GAUGES
            }

        async def run() -> dict[str, Any]:
            started = time.perf_counter()
            pages = await asyncio.gather(*(one(url) for url in urls))
            return {
                "seconds": time.perf_counter() - started,
                "up": sum(len(values) == len(NAIVE_GAUGES) for values in pages),
            }

        await _serve_commands(conn, {"run": run})


# --- the parent: start the processes, take turns, report -------------------------------------------


@dataclass
class Proc:
    """A spawned role and the pipe to it."""

    name: str
    process: multiprocessing.process.BaseProcess
    conn: Connection

    def call(self, command: str, timeout: float = 600.0) -> dict[str, Any]:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.name}: no answer to {command!r} within {timeout:g}s")
        reply: dict[str, Any] = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            self.call("stop", timeout=30)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


def _spawn(ctx: Any, kind: str, *args: Any, entry: Callable[..., None] | None = None) -> Proc:
    """A process running `entry(kind, conn, *args)` (default: this benchmark's roles)."""
    parent, child = ctx.Pipe()
    target = entry or _process_entry
    process = ctx.Process(target=target, args=(kind, child, *args), name=f"bench-{kind}", daemon=True)
    process.start()
    child.close()
    return Proc(kind, process, parent)


SCRAPE_TIMEOUT_SECONDS = 600  # a cold 10,000-member scrape on a loaded machine takes minutes


def scrape(port: int, members: int, *, check: bool = True) -> tuple[float, int, int]:
    """(seconds, bytes on the wire, bytes uncompressed) of one Prometheus-like GET /metrics.

    With `check`, raises unless the exposition shows every member up.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SCRAPE_TIMEOUT_SECONDS)
    try:
        started = time.perf_counter()
        connection.request("GET", METRICS_PATH, headers=PROMETHEUS_HEADERS)
        response = connection.getresponse()
        wire = response.read()
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"scrape answered HTTP {response.status}")
    text = gzip.decompress(wire) if response.getheader("Content-Encoding") == "gzip" else wire
    up = sum(
        line.startswith(b"etcd_autodefrag_member_up{") and line.endswith(b" 1.0")
        for line in text.splitlines()
    )
    if check and up != members:
        raise RuntimeError(f"the scrape shows {up} of {members} members up")
    return seconds, len(wire), len(text)


@dataclass
class Timed:
    """One measured operation: wall seconds and the CPU seconds the client and the fleet spent."""

    seconds: float
    client_cpu_seconds: float
    fleet_cpu_seconds: float


def timed(client: Proc, fleet: Proc, operation: Callable[[], float]) -> Timed:
    """Run `operation` (which returns its own wall seconds) and charge CPU to both processes."""
    client_before, fleet_before = client.call("usage"), fleet.call("usage")
    seconds = operation()
    client_after, fleet_after = client.call("usage"), fleet.call("usage")
    return Timed(
        seconds,
        client_after["cpu_seconds"] - client_before["cpu_seconds"],
        fleet_after["cpu_seconds"] - fleet_before["cpu_seconds"],
    )


def _checked(reply: dict[str, Any], members: int, what: str) -> float:
    if reply["up"] != members:
        raise RuntimeError(f"{what}: {reply['up']} of {members} members answered")
    return float(reply["seconds"])


@dataclass(frozen=True)
class Options:
    members: int
    concurrency: int
    warmup: int
    rounds: int
    naive_rounds: int
    profile: bool
    data_dir: Path


def run(options: Options) -> dict[str, Any]:
    """Every measurement of one run, as plain data for `report`."""
    ctx = multiprocessing.get_context("spawn")  # each process imports only what its role needs
    n = options.members
    procs: list[Proc] = []
    try:
        fleet = _spawn(ctx, "fleet", options.data_dir, n)
        procs.append(fleet)
        if not fleet.conn.poll(120):
            raise RuntimeError("the fleet server did not start within 120s")
        urls: list[str] = fleet.conn.recv()
        endpoints, offset = [], 0
        for size in cluster_sizes(n):
            endpoints.append(urls[offset : offset + size])
            offset += size
        exporter = _spawn(ctx, "exporter", endpoints, options.concurrency)
        limit = _spawn(ctx, "limit", urls, options.concurrency)
        naive = _spawn(ctx, "naive", urls, options.concurrency)
        procs += [exporter, limit, naive]
        usage: dict[str, dict[str, Any]] = {p.name: p.call("usage", timeout=120) for p in procs}

        # Cold: the first scrape right after start-up waits for the start-up refresh, which reads the
        # member lists and every member's quota from its /metrics before the statuses.
        started = exporter.call("start")
        port = started["port"]
        if _COMMIT and Path(started["package"]) == _HERE.parent / "exporter":
            raise RuntimeError(f"--commit: the exporter process loaded the work tree's {started['package']}")
        cold_scrape = timed(exporter, fleet, lambda: scrape(port, n)[0])
        usage["exporter after the cold scrape"] = exporter.call("usage")
        cold_limit = timed(limit, fleet, lambda: _checked(limit.call("run"), n, "limit"))

        last_sizes = {"wire": 0, "text": 0}

        def scrape_once() -> float:
            seconds, wire, text = scrape(port, n)
            last_sizes.update(wire=wire, text=text)
            return seconds

        def exporter_turn() -> tuple[Timed, Timed, dict[str, Any]]:
            s = timed(exporter, fleet, scrape_once)
            r = timed(exporter, fleet, lambda: _checked(exporter.call("refresh"), n, "refresh"))
            return s, r, exporter.call("render")

        def limit_turn() -> Timed:
            return timed(limit, fleet, lambda: _checked(limit.call("run"), n, "limit"))

        a_scrape: list[Timed] = []
        a_refresh: list[Timed] = []
        a_render: list[dict[str, Any]] = []
        b_run: list[Timed] = []
        for round_ in range(options.warmup + options.rounds):
            if round_ % 2:  # alternate who goes first, so neither always follows the other
                b, (s, r, rendered) = limit_turn(), exporter_turn()
            else:
                (s, r, rendered), b = exporter_turn(), limit_turn()
            if round_ >= options.warmup:
                a_scrape.append(s)
                a_refresh.append(r)
                a_render.append(rendered)
                b_run.append(b)

        # The naive pass takes tens of seconds, longer than aiohttp keeps idle connections (15 s), so
        # it runs after the paired (a)/(b) rounds rather than between them.
        c_run = [
            timed(naive, fleet, lambda: _checked(naive.call("run", timeout=1800), n, "naive"))
            for _ in range(1 + options.naive_rounds)
        ]
        final = {p.name: p.call("usage") for p in procs}

        profiles = {}
        if options.profile:  # after every figure above, so it perturbs none of them
            for name, command in (("refresh", lambda: exporter.call("refresh")), ("scrape", scrape_once)):
                exporter.call("profile_start")
                for _ in range(3):
                    command()
                profiles[f"3 steady-state calls of {name}"] = exporter.call("profile_stop")["text"]
            cold = _spawn(ctx, "exporter", endpoints, options.concurrency)
            procs.append(cold)
            cold.call("profile_start", timeout=120)
            # Profiling slows the cold scrape down ~2x, enough for some requests to time out.
            scrape(cold.call("start")["port"], n, check=False)
            profiles["the cold scrape, in a fresh exporter process"] = cold.call("profile_stop")["text"]
    finally:
        for proc in reversed(procs):
            proc.stop()
    return {
        "options": options,
        "clusters": len(endpoints),
        "cold_scrape": cold_scrape,
        "cold_limit": cold_limit,
        "cold_naive": c_run[0],
        "a_scrape": a_scrape,
        "a_refresh": a_refresh,
        "a_render": a_render,
        "b_run": b_run,
        "c_run": c_run[1:],
        "scrape_bytes": (last_sizes["wire"], last_sizes["text"]),
        "usage": usage,
        "final": final,
        "profiles": profiles,
    }


# --- --growth: one process at 1k, 3k, 10k members, and the largest fleet over N shards -------------


@dataclass(frozen=True)
class GrowthOptions:
    members: list[int]
    shards: int
    concurrency: int
    rounds: int
    data_dir: Path


@dataclass
class Exported:
    """One exporter process of the growth run: what it watched and what its scrapes took."""

    label: str
    members: int
    clusters: int
    cold: float
    scrapes: list[float]
    wire_bytes: int
    text_bytes: int
    rss_after_imports: int
    peak_rss: int


# Generous: a cold 10,000-member refresh on a loaded 2-CPU machine takes tens of seconds, and a
# refresh cut short by the budget would show members down instead of a time.
GROWTH_BUDGET_SECONDS = 300


def _split(urls: list[str], members: int) -> list[list[str]]:
    endpoints, offset = [], 0
    for size in cluster_sizes(members):
        endpoints.append(urls[offset : offset + size])
        offset += size
    return endpoints


def _measure_exporters(
    ctx: Any, label: str, endpoints: list[list[str]], shards: list[tuple[int, int]], options: GrowthOptions
) -> list[Exported]:
    """Start one exporter per shard, take each one's cold scrape, then `rounds` scrapes of each in turn."""
    from exporter.core.shard import shard_of

    procs: list[Proc] = []
    try:
        procs = [
            _spawn(ctx, "exporter", endpoints, options.concurrency, shard, GROWTH_BUDGET_SECONDS)
            for shard in shards
        ]
        before = [p.call("usage", timeout=120) for p in procs]
        owned = [
            [urls for c, urls in enumerate(endpoints) if shard_of(cluster_name(c), total) == index]
            for index, total in shards
        ]
        members = [sum(len(urls) for urls in mine) for mine in owned]
        ports, colds = [], []
        for proc, count in zip(procs, members, strict=True):
            # One at a time: each replica has a pod (and CPU) of its own in production.
            ports.append(proc.call("start", timeout=600)["port"])
            colds.append(scrape(ports[-1], count)[0])
            print(f"{label}: {count:,} members, cold scrape {colds[-1]:.1f}s", file=sys.stderr, flush=True)
        scrapes: list[list[float]] = [[] for _ in procs]
        sizes: list[tuple[int, int]] = [(0, 0)] * len(procs)
        for _ in range(options.rounds):
            for k, (port, count) in enumerate(zip(ports, members, strict=True)):
                seconds, wire, text = scrape(port, count)
                print(f"{label}: {count:,} members, scrape {seconds:.2f}s", file=sys.stderr, flush=True)
                scrapes[k].append(seconds)
                sizes[k] = (wire, text)
        after = [p.call("usage") for p in procs]
    finally:
        for proc in reversed(procs):
            proc.stop()
    return [
        Exported(
            label if len(shards) == 1 else f"{label}, shard {index} of {total}",
            members[k],
            len(owned[k]),
            colds[k],
            scrapes[k],
            sizes[k][0],
            sizes[k][1],
            before[k]["rss_bytes"],
            after[k]["max_rss_bytes"],
        )
        for k, (index, total) in enumerate(shards)
    ]


# Members one fleet process plays: 1,666 clusters of 3. Each member costs the fleet a listening socket
# and, between back-to-back scrapes, the exporter's idle keep-alive connection to it: 10,000 members
# in one process would pass the 20,000 open files this machine allows a process.
FLEET_MEMBERS_PER_PROCESS = 4998


def _start_fleets(ctx: Any, data_dir: Path, members: int) -> tuple[list[Proc], list[list[str]]]:
    """Fleet processes playing `members` members together, and the clusters' endpoints in order."""
    counts = [FLEET_MEMBERS_PER_PROCESS] * (members // FLEET_MEMBERS_PER_PROCESS)
    if rest := members % FLEET_MEMBERS_PER_PROCESS:
        counts.append(rest)
    fleets = [_spawn(ctx, "fleet", data_dir, count) for count in counts]
    endpoints: list[list[str]] = []
    try:
        for fleet, count in zip(fleets, counts, strict=True):
            if not fleet.conn.poll(600):
                raise RuntimeError(f"a fleet process of {count} members did not start within 600s")
            endpoints += _split(fleet.conn.recv(), count)
    except BaseException:
        for fleet in fleets:
            fleet.stop()
        raise
    return fleets, endpoints


def run_growth(options: GrowthOptions) -> list[Exported]:
    """The growth curve of one process, then the largest fleet split over `options.shards`."""
    ctx = multiprocessing.get_context("spawn")
    results: list[Exported] = []
    for n in options.members:
        fleets, endpoints = _start_fleets(ctx, options.data_dir, n)
        try:
            results += _measure_exporters(ctx, f"{n:,} members, one process", endpoints, [(0, 1)], options)
            if n == max(options.members) and options.shards > 1:
                shards = [(i, options.shards) for i in range(options.shards)]
                results += _measure_exporters(ctx, f"{n:,} members", endpoints, shards, options)
        finally:
            for fleet in fleets:
                fleet.stop()
    return results


def report_growth(results: list[Exported], options: GrowthOptions) -> tuple[str, bool]:
    """A Markdown table of the growth run, and whether every shard met the 2.5 s target."""
    lines = [
        f"Median of {options.rounds} steady-state scrapes after the cold one; at most "
        f"{options.concurrency} connections in flight per process.",
        f"Machine: {_machine()}; {_source_state()}; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| exporter process | members | clusters | scrape, median | min – max | per member | cold scrape "
        "| exposition | RSS after imports | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    met = True
    for r in results:
        med = statistics.median(r.scrapes)
        if "shard" in r.label and med >= SHARD_TARGET_SECONDS:
            met = False
        lines.append(
            f"| {r.label} | {r.members:,} | {r.clusters:,} | {_ms(med)} | {_ms(min(r.scrapes))} – "
            f"{_ms(max(r.scrapes))} | {med / r.members * 1e6:,.0f} µs | {_ms(r.cold)} | "
            f"{r.text_bytes / 1e6:,.1f} MB | {_mib(r.rss_after_imports)} | {_mib(r.peak_rss)} |"
        )
    sharded = [r for r in results if "shard" in r.label]
    if sharded:
        worst = max(statistics.median(r.scrapes) for r in sharded)
        lines += [
            "",
            f"Slowest shard: {_ms(worst)} (target: under {SHARD_TARGET_SECONDS:g} s each): "
            f"{'met' if met else 'NOT met'}.",
        ]
    return "\n".join(lines), met


SHARD_TARGET_SECONDS = 2.5


# --- the report ------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _mib(count: float) -> str:
    return f"{count / 2**20:,.0f} MiB"


def _row(label: str, runs: list[Timed], members: int) -> str:
    seconds = [t.seconds for t in runs]
    med = statistics.median(seconds)
    client_cpu = statistics.median(t.client_cpu_seconds for t in runs)
    fleet_share = statistics.median(t.fleet_cpu_seconds / t.seconds for t in runs)
    spread = f"{_ms(min(seconds))} – {_ms(max(seconds))}" if len(runs) > 1 else "–"
    return (
        f"| {label} | {_ms(med)} | {spread} | {med / members * 1e6:,.0f} µs | "
        f"{_ms(client_cpu)} | {fleet_share:.0%} |"
    )


def _machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model
        )
    versions = ", ".join(f"{name} {version(name)}" for name in ("aiohttp", "prometheus_client"))
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {versions}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def _source_state() -> str:
    """Which `exporter` package was measured: the commit, and whether exporter/ differed from it."""
    if _COMMIT:
        return f"exporter/ as committed at {_COMMIT[0]} (--commit)"
    spec = importlib.util.find_spec("exporter")
    package = Path(spec.origin).parent if spec and spec.origin else None
    if package is None or package != _HERE.parent / "exporter":
        return f"exporter package from {package}"

    def git(*args: str) -> str:
        command = ["git", "-C", str(_HERE.parent), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "exporter")
    except (OSError, subprocess.CalledProcessError):
        return "exporter package from a source tree outside git"
    return f"commit {commit}" + (" with uncommitted changes in exporter/" if dirty else "")


def _use_commit(commit: str, into: Path) -> str:
    """Measure `exporter/` as committed at `commit`, whatever the work tree holds; returns the commit.

    The package is exported into `into`, which goes first on sys.path; spawned processes inherit it.
    """
    root = str(_HERE.parent)
    sha = subprocess.run(
        ["git", "-C", root, "rev-parse", "--short", "--verify", f"{commit}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(["git", "-C", root, "archive", sha, "exporter"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    sys.path.insert(0, str(into))
    return sha


def _default_concurrency() -> int:
    """The service's default connection limit (settings.max_concurrent_requests)."""
    from exporter.config.settings import Settings

    return int(Settings.model_fields["max_concurrent_requests"].default)


def report(result: dict[str, Any]) -> tuple[str, bool]:
    """A Markdown report of one run, and whether both targets were met."""
    options: Options = result["options"]
    n = options.members
    a, b, c = result["a_scrape"], result["b_run"], result["c_run"]
    a_med = statistics.median(t.seconds for t in a)
    c_med = statistics.median(t.seconds for t in c)
    a_over_b = statistics.median(x.seconds / y.seconds for x, y in zip(a, b, strict=True))
    c_over_a = c_med / a_med
    refresh_over_b = statistics.median(
        x.seconds / y.seconds for x, y in zip(result["a_refresh"], b, strict=True)
    )
    met = a_over_b <= 1.5 and c_over_a >= 10
    wire, text = result["scrape_bytes"]
    render = statistics.median(r["seconds"] for r in result["a_render"])
    render_text = statistics.median(r["text_seconds"] for r in result["a_render"])
    text_bytes = statistics.median(r["text_bytes"] for r in result["a_render"])
    lines = [
        f"{n:,} members in {result['clusters']:,} clusters, at most {options.concurrency} connections "
        f"in flight; median of {options.rounds} rounds after {options.warmup} warm-up "
        f"({options.naive_rounds} after 1 for the naive exporter).",
        f"Machine: {_machine()}; {_source_state()}.",
        "",
        "| figure | median | min – max | per member | client CPU | fleet CPU share |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("(a) exporter: one scrape of `GET /metrics` (steady state)", a, n),
        _row("(a) of which `Refresher.refresh()` alone", result["a_refresh"], n),
        _row("(b) limit: bare aiohttp loop, status POSTs", b, n),
        _row("(c) naive: full /metrics page per member, parsed", c, n),
        _row("(a) cold: first scrape after start-up", [result["cold_scrape"]], n),
        _row("(b) cold: first pass, new connections", [result["cold_limit"]], n),
        _row("(c) cold: first pass, new connections", [result["cold_naive"]], n),
        "",
        f"Rendering the exposition alone, in the steady-state rounds: {_ms(render)} in OpenMetrics, which "
        f"Prometheus asks for ({text / 1e6:,.1f} MB, {wire / 1e3:,.0f} kB gzipped on the wire); "
        f"{_ms(render_text)} in the 0.0.4 text format ({text_bytes / 1e6:,.1f} MB).",
        "",
        "| ratio (same run) | value | target | met |",
        "| --- | --- | --- | --- |",
        f"| (a) / (b), median of per-round ratios | {a_over_b:.2f}x | at most 1.5x | "
        f"{'yes' if a_over_b <= 1.5 else 'NO'} |",
        f"| (c) / (a), medians | {c_over_a:,.0f}x | at least 10x | {'yes' if c_over_a >= 10 else 'NO'} |",
        f"| (a) `Refresher.refresh()` alone / (b), median of per-round ratios | {refresh_over_b:.2f}x | "
        "(for reference) | |",
        "",
        "| process | RSS after imports | peak RSS | peak − after imports |",
        "| --- | --- | --- | --- |",
    ]
    usage, final = result["usage"], result["final"]
    after_cold = usage["exporter after the cold scrape"]
    rows = [
        ("(a) exporter service, end of run", usage["exporter"], final["exporter"]),
        ("(a) exporter service, after the cold scrape", usage["exporter"], after_cold),
        ("(b) bare loop", usage["limit"], final["limit"]),
        ("(c) naive exporter", usage["naive"], final["naive"]),
        ("synthetic fleet (not measured)", usage["fleet"], final["fleet"]),
    ]
    for label, start, end in rows:
        lines.append(
            f"| {label} | {_mib(start['rss_bytes'])} | {_mib(end['max_rss_bytes'])} | "
            f"{_mib(end['max_rss_bytes'] - start['rss_bytes'])} |"
        )
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--record", action="store_true", help="record bench/data/ from a real etcd 3.4")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 members, one round")
    parser.add_argument("--members", type=int, help=f"members in the fleet (default {MEMBERS})")
    parser.add_argument("--rounds", type=int, help="measured rounds of (a) and (b) (default 5)")
    parser.add_argument("--naive-rounds", type=int, help="measured passes of (c) (default 5)")
    parser.add_argument("--concurrency", type=int, help="connection limit (default: the settings' default)")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile the cold scrape, 3 refreshes and 3 scrapes"
    )
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="where the recorded replies live")
    parser.add_argument(
        "--commit", help="measure exporter/ as committed at this git revision, ignoring work-tree edits"
    )
    parser.add_argument(
        "--growth", action="store_true", help="(a) alone at several fleet sizes, then the largest over shards"
    )
    parser.add_argument(
        "--growth-members",
        default="1000,3000,10000",
        help="with --growth: fleet sizes, comma-separated (default 1000,3000,10000)",
    )
    parser.add_argument("--shards", type=int, default=4, help="with --growth: shards of the largest fleet")
    args = parser.parse_args(argv)
    if args.record:
        record(args.data)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-exporter-src-") as source:
        if args.commit:
            _COMMIT.append(_use_commit(args.commit, Path(source)))
        return _run_and_report(args)


def _run_and_report(args: argparse.Namespace) -> int:
    quick = args.quick
    if args.growth:
        growth = GrowthOptions(
            members=[100, 300] if quick else [int(n) for n in args.growth_members.split(",")],
            shards=args.shards,
            concurrency=args.concurrency or _default_concurrency(),
            rounds=args.rounds or (1 if quick else 5),
            data_dir=args.data,
        )
        text, met = report_growth(run_growth(growth), growth)
        print(text)
        return 0 if met or quick else 1
    options = Options(
        members=args.members or (100 if quick else MEMBERS),
        concurrency=args.concurrency or _default_concurrency(),
        warmup=1,
        rounds=args.rounds or (1 if quick else 5),
        naive_rounds=args.naive_rounds or (1 if quick else 5),
        profile=args.profile,
        data_dir=args.data,
    )
    result = run(options)
    text, met = report(result)
    print(text)
    for name, profile in result["profiles"].items():
        print(f"\n## cProfile of the exporter process: {name}\n\n{profile.strip()}")
    return 0 if met or quick else 1


if __name__ == "__main__":
    sys.exit(main())
