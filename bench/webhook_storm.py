"""Benchmark: `POST /webhook/alertmanager` under a storm, against a trivial aiohttp handler.

Run from the repository root:

    .venv/bin/python bench/webhook_storm.py            # the figures in docs/benchmarks.md (~1 min)
    .venv/bin/python bench/webhook_storm.py --quick    # smoke run: 1,000 alerts, one round

The storm: 10,000 firing `EtcdDefragRecommended` alerts over 50 configured clusters, one alert per
notification (the most requests Alertmanager can make of them), 200 per cluster, interleaved, sent
by 32 connections at once. Exactly 50 of them must launch a run (the first for each cluster) and the
other 9,950 must be answered "already running"; the benchmark fails otherwise.

Two handlers, served by one process on 127.0.0.1 (kernel-assigned ports), each by its own
`web.AppRunner`, and measured in the same round, in alternating order:

(a) the real service: `exporter.service.app.create_app(settings, clusters=..., executor=...)` with a bearer
    token, the real routing and decisions, health from snapshots of a real etcd member (every
    cluster observes the same 1-member etcd 3.4 started by tests/etcd_harness.py), its logs at INFO
    formatted by the service's own handler (written to /dev/null), and the **Kubernetes executor**
    (`kubernetes_executor(settings, api_client=...)`: the real kubernetes-asyncio client) against the
    fake API server of tests/fake_kube.py, in a process of its own. The Kubernetes executor rather
    than a recording one because it is what a storm meets in production: the 50 launches are real
    Job creates over HTTP with the Job watch running, and "exactly 50 launches" is checked where it
    matters, as 50 Jobs in the API server. The local executor would add 50 process spawns,
    which measure the operating system, not the webhook.
(b) a trivial aiohttp handler: reads the body and answers `{"status": "ok"}`.

The load comes from a separate process (so its CPU never counts against the server), an aiohttp
client that times each request from send to the last byte of the answer. Before each storm, 500
notifications of a resolved alert warm the connections and code paths up (they launch nothing).
Every round starts a fresh service (nothing remembered) and empties the fake API server.

Figures per round: requests/s over the storm, p50 and p99 latency, the server's CPU per request.
Ratios are taken per round, (a) against (b), and the report gives their medians over the rounds.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web

# Run as a script, this file's folder comes first on sys.path, and bench/exporter.py would shadow the
# `exporter` package measured here; the package is imported only after this line.
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_ROOT / "tests"))


def _load(name: str, file: str) -> ModuleType:
    """A sibling benchmark as a module (by path: bench/ is not a package, and must not be on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, _HERE / file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Reused from the other benchmarks: process roles over a pipe, CPU usage, percentiles, machine facts.
_bench_exporter = _load("bench_exporter", "exporter.py")
_bench_defrag = _load("bench_defrag_overhead", "defrag_overhead.py")
usage = _bench_exporter._usage
percentile = _bench_defrag.percentile
machine_facts = _bench_defrag.machine_facts

from etcd_harness import EtcdCluster, start_cluster  # noqa: E402
from fake_kube import FakeKube  # noqa: E402

from exporter import logs  # noqa: E402
from exporter.config.settings import Settings  # noqa: E402
from exporter.kubernetes.api import kube_api_client  # noqa: E402
from exporter.launch.kubernetes import kubernetes_executor  # noqa: E402
from exporter.service.app import REFRESHER, create_app  # noqa: E402

CLUSTERS = 50
ALERTS = 10_000
WARMUP_ALERTS = 500
CONCURRENCY = 32
ROUNDS = 5
NAMESPACE = "etcd"
TOKEN = "bench-token-0123456789abcdef"
PATH = "/webhook/alertmanager"
TARGET_RATIO = 0.5


# --- payloads --------------------------------------------------------------------------------------


def notification(cluster: str, index: int, status: str = "firing") -> bytes:
    """One Alertmanager notification (version 4) holding one alert, as Alertmanager sends it."""
    labels = {"alertname": "EtcdDefragRecommended", "severity": "warning", "etcd_cluster": cluster}
    alert = {
        "status": status,
        "labels": labels,
        "annotations": {
            "summary": f"etcd cluster {cluster} should be defragmented",
            "description": "3 members have more than 100 MiB to reclaim.",
            "runbook_url": "https://example.com/runbook#etcddefragrecommended",
        },
        "startsAt": "2026-11-22T11:55:00.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-22T12:05:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=etcd_autodefrag_cluster_defrag_recommended",
        "fingerprint": f"{index:016x}",
    }
    return json.dumps(
        {
            "receiver": "etcd-autodefrag",
            "status": status,
            "alerts": [alert],
            "groupLabels": {"alertname": "EtcdDefragRecommended", "etcd_cluster": cluster},
            "commonLabels": labels,
            "commonAnnotations": alert["annotations"],
            "externalURL": "http://alertmanager:9093",
            "version": "4",
            "groupKey": f'{{}}:{{alertname="EtcdDefragRecommended", etcd_cluster="{cluster}"}}',
            "truncatedAlerts": 0,
        }
    ).encode()


def storm_bodies(alerts: int, clusters: int, status: str = "firing") -> list[bytes]:
    """`alerts` notifications, cluster after cluster round-robin: every cluster is hit all along."""
    return [notification(f"c{i % clusters}", i, status) for i in range(alerts)]


# --- the processes -------------------------------------------------------------------------------------


_serve = _bench_exporter._serve_commands  # ("name", *args) commands until "stop"


async def _kube_main(conn: Connection) -> None:
    """The fake Kubernetes API server (tests/fake_kube.py)."""
    fake = FakeKube()
    await fake.start()

    async def url() -> dict[str, Any]:
        return {"url": fake.url}

    async def reset() -> dict[str, Any]:
        for namespace, name in list(fake.jobs):
            fake.delete_job(namespace, name)
        fake.requests.clear()
        return {}

    async def jobs() -> dict[str, Any]:
        creates = sum(r.method == "POST" and r.path.endswith("/jobs") for r in fake.requests)
        return {"jobs": sorted(name for _, name in fake.jobs), "creates": creates}

    try:
        await _serve(conn, {"url": url, "reset": reset, "jobs": jobs})
    finally:
        await fake.close()


def service_settings(etcd_url: str, clusters: int) -> Settings:
    return Settings(
        webhook={"token": TOKEN},
        executor={"kind": "kubernetes", "image": "ghcr.io/etcd-autodefrag/etcd-autodefrag:bench"},
        clusters=[
            {
                "name": f"c{i}",
                "endpoints": [etcd_url],
                # One etcd member stands in for every cluster: the Jobs are never run.
                "allow_unavailable_defrag": True,
                "kubernetes": {"namespace": NAMESPACE, "variant": "plain"},
            }
            for i in range(clusters)
        ],
    )


async def _trivial(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"status": "ok"})


async def _server_main(conn: Connection, kube_url: str, etcd_url: str, clusters: int) -> None:
    """Both handlers, each on its own AppRunner; "start" makes a fresh service, "stop_apps" ends it."""
    runners: list[web.AppRunner] = []
    api: list[Any] = []

    async def start() -> dict[str, Any]:
        settings = service_settings(etcd_url, clusters)
        client = await kube_api_client(host=kube_url)
        api.append(client)
        real = create_app(
            settings, clusters=settings.clusters, executor=kubernetes_executor(settings, api_client=client)
        )
        trivial = web.Application()
        trivial.router.add_post(PATH, _trivial)
        ports = []
        for app in (real, trivial):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            ports.append(runner.addresses[0][1])
        # Every cluster observed once before the storm (health known, as in production).
        await real[REFRESHER].refresh(max_age_seconds=0)
        if not real[REFRESHER].ready:
            raise RuntimeError("the service did not observe every cluster")
        return {"real": ports[0], "trivial": ports[1]}

    async def stop_apps() -> dict[str, Any]:
        while runners:
            await runners.pop().cleanup()
        while api:
            await api.pop().close()
        return {}

    try:
        await _serve(conn, {"start": start, "stop_apps": stop_apps})
    finally:
        await stop_apps()


async def _load_main(conn: Connection) -> None:
    """The load generator: bodies built before the clock starts, then sent by CONCURRENCY workers."""

    async def storm(port: int, alerts: int, clusters: int, status: str, concurrency: int) -> dict[str, Any]:
        bodies = storm_bodies(alerts, clusters, status)
        url = f"http://127.0.0.1:{port}{PATH}"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        latencies: list[float] = [0.0] * len(bodies)
        statuses: Counter[int] = Counter()
        outcomes: Counter[str] = Counter()
        queue = iter(range(len(bodies)))
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                for index in queue:
                    started = time.perf_counter()
                    async with session.post(url, data=bodies[index], headers=headers) as answer:
                        text = await answer.read()
                    latencies[index] = time.perf_counter() - started
                    statuses[answer.status] += 1
                    for outcome, seen in json.loads(text).get("outcomes", {}).items():
                        outcomes[outcome] += seen["alerts"]

            cpu_before = usage()["cpu_seconds"]
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            seconds = time.perf_counter() - started
            cpu = usage()["cpu_seconds"] - cpu_before
        return {
            "seconds": seconds,
            "latencies": latencies,
            "statuses": dict(statuses),
            "outcomes": dict(outcomes),
            "client_cpu_seconds": cpu,
        }

    await _serve(conn, {"storm": storm})


def _entry(kind: str, conn: Connection, *args: Any) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    if kind == "server":  # the service's own log handler at INFO, formatting every line, into /dev/null
        logs.configure(fmt="text", level="INFO", stream=open(os.devnull, "w"))  # noqa: SIM115
    roles = {"kube": _kube_main, "server": _server_main, "load": _load_main}
    asyncio.run(roles[kind](conn, *args))


def _spawn(ctx: Any, kind: str, *args: Any) -> Any:
    return _bench_exporter._spawn(ctx, kind, *args, entry=_entry)


# --- rounds and figures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storm:
    """One storm against one handler."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_seconds: float
    client_cpu_seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def server_cpu_us_per_request(self) -> float:
        return self.server_cpu_seconds / self.requests * 1e6


@dataclass(frozen=True)
class Options:
    alerts: int
    clusters: int
    rounds: int
    concurrency: int


def one_storm(server: Any, load: Any, port: int, options: Options) -> tuple[Storm, dict[str, Any]]:
    """Warm up with resolved alerts, then the storm; the server's CPU is charged around the storm only."""
    warm = load.call(("storm", port, WARMUP_ALERTS, options.clusters, "resolved", options.concurrency))
    if warm["statuses"] != {200: WARMUP_ALERTS} or warm["outcomes"].get("launch"):
        raise RuntimeError(f"warm-up went wrong: {warm['statuses']} {warm['outcomes']}")
    before = server.call("usage")["cpu_seconds"]
    reply = load.call(("storm", port, options.alerts, options.clusters, "firing", options.concurrency))
    server_cpu = server.call("usage")["cpu_seconds"] - before
    latencies_ms = [s * 1000 for s in reply["latencies"]]
    storm = Storm(
        requests=options.alerts,
        seconds=reply["seconds"],
        p50_ms=percentile(latencies_ms, 0.50),
        p99_ms=percentile(latencies_ms, 0.99),
        server_cpu_seconds=server_cpu,
        client_cpu_seconds=reply["client_cpu_seconds"],
    )
    return storm, reply


def one_round(index: int, kube: Any, server: Any, load: Any, options: Options) -> tuple[Storm, Storm]:
    """A fresh service and an empty API server; (a) and (b) in alternating order."""
    kube.call("reset")
    ports = server.call("start")
    try:
        order = ("real", "trivial") if index % 2 == 0 else ("trivial", "real")
        storms: dict[str, Storm] = {}
        for arm in order:
            storm, reply = one_storm(server, load, ports[arm], options)
            if reply["statuses"] != {200: options.alerts}:
                raise RuntimeError(f"{arm}: answers {reply['statuses']}")
            if arm == "real":
                check_launches(reply["outcomes"], kube.call("jobs"), options)
            storms[arm] = storm
    finally:
        server.call("stop_apps")
    real, trivial = storms["real"], storms["trivial"]
    print(
        f"round {index + 1} ({' then '.join(order)}): "
        f"(a) {real.rps:,.0f} req/s, p99 {real.p99_ms:.1f} ms, "
        f"{real.server_cpu_us_per_request:,.0f} µs CPU/req; "
        f"(b) {trivial.rps:,.0f} req/s, p99 {trivial.p99_ms:.1f} ms, "
        f"{trivial.server_cpu_us_per_request:,.0f} µs CPU/req; "
        f"(a)/(b) throughput {real.rps / trivial.rps:.2f}x",
        flush=True,
    )
    return real, trivial


def check_launches(outcomes: dict[str, int], kube: dict[str, Any], options: Options) -> None:
    """Exactly one launch per cluster, in the answers and as Jobs in the API server."""
    expected_jobs = sorted(f"etcd-autodefrag-c{i}" for i in range(options.clusters))
    problems = []
    if outcomes.get("launch") != options.clusters:
        problems.append(f"{outcomes.get('launch', 0)} launch answers, not {options.clusters}")
    if outcomes.get("skip_already_running") != options.alerts - options.clusters:
        problems.append(f"outcomes {outcomes}")
    if kube["jobs"] != expected_jobs:
        problems.append(f"{len(kube['jobs'])} Jobs in the API server, not {options.clusters}")
    if kube["creates"] != options.clusters:
        problems.append(f"{kube['creates']} Job creates, not {options.clusters}")
    if problems:
        raise RuntimeError("launches: " + "; ".join(problems))


def report(runs: list[tuple[Storm, Storm]], options: Options, facts: str) -> tuple[str, bool]:
    """A Markdown report and whether the targets were met."""
    throughput = statistics.median(a.rps / b.rps for a, b in runs)
    p99 = statistics.median(a.p99_ms / b.p99_ms for a, b in runs)
    cpu = statistics.median(a.server_cpu_us_per_request / b.server_cpu_us_per_request for a, b in runs)
    met = throughput >= TARGET_RATIO and p99 <= 1 / TARGET_RATIO

    def row(label: str, storms: list[Storm]) -> str:
        def med(values: list[float]) -> float:
            return statistics.median(values)

        rps = [s.rps for s in storms]
        return (
            f"| {label} | {med(rps):,.0f} ({min(rps):,.0f} – {max(rps):,.0f}) | "
            f"{med([s.p50_ms for s in storms]):.1f} | {med([s.p99_ms for s in storms]):.1f} | "
            f"{med([s.server_cpu_us_per_request for s in storms]):,.0f} | "
            f"{med([s.client_cpu_seconds / s.seconds for s in storms]):.0%} |"
        )

    lines = [
        f"{options.alerts:,} firing alerts over {options.clusters} clusters, one per notification, "
        f"{options.concurrency} connections; median of {len(runs)} rounds; "
        f"{options.clusters} launches checked in every round.",
        f"Machine: {facts}.",
        "",
        "| handler | requests/s, median (min – max) | p50 ms | p99 ms | server CPU µs/request | "
        "load generator CPU share |",
        "| --- | --- | --- | --- | --- | --- |",
        row("(a) `POST /webhook/alertmanager`, the real service", [a for a, _ in runs]),
        row("(b) trivial aiohttp handler", [b for _, b in runs]),
        "",
        "| ratio (same round, median over rounds) | value | target | met |",
        "| --- | --- | --- | --- |",
        f"| requests/s, (a) / (b) | {throughput:.2f}x | at least {TARGET_RATIO}x | "
        f"{'yes' if throughput >= TARGET_RATIO else 'NO'} |",
        f"| p99 latency, (a) / (b) | {p99:.2f}x | at most {1 / TARGET_RATIO:g}x | "
        f"{'yes' if p99 <= 1 / TARGET_RATIO else 'NO'} |",
        f"| server CPU per request, (a) / (b) | {cpu:.2f}x | (for reference) | |",
    ]
    return "\n".join(lines), met


def run(options: Options) -> list[tuple[Storm, Storm]]:
    ctx = multiprocessing.get_context("spawn")
    root = Path(tempfile.mkdtemp(prefix="bench-storm-"))
    cluster: EtcdCluster | None = None
    procs: list[Any] = []
    try:
        cluster = start_cluster(root, size=1)
        kube = _spawn(ctx, "kube")
        procs.append(kube)
        kube_url = kube.call("url")["url"]
        server = _spawn(ctx, "server", kube_url, cluster.endpoints[0], options.clusters)
        load = _spawn(ctx, "load")
        procs += [server, load]
        return [one_round(i, kube, server, load, options) for i in range(options.rounds)]
    finally:
        for proc in reversed(procs):
            proc.stop()
        if cluster is not None:
            cluster.stop()
        with contextlib.suppress(OSError):
            os.rmdir(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 alerts, one round")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {ROUNDS})")
    parser.add_argument("--alerts", type=int, help=f"alerts per storm (default {ALERTS:,})")
    args = parser.parse_args(argv)
    options = Options(
        alerts=args.alerts or (1_000 if args.quick else ALERTS),
        clusters=CLUSTERS,
        rounds=args.rounds or (1 if args.quick else ROUNDS),
        concurrency=CONCURRENCY,
    )
    logging.basicConfig(level=logging.WARNING)
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/webhook_storm.py', *(argv or sys.argv[1:])])}")
    facts = machine_facts()
    print(facts, flush=True)
    started = time.monotonic()
    runs = run(options)
    text, met = report(runs, options, facts)
    print(f"\n{text}\n\ntotal {time.monotonic() - started:.0f}s")
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
