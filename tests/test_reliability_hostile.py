"""Hostile traffic at the webhook (issue 18): the counted tests that go into docs/reliability.md.

Each test runs the real `etcd-autodefrag serve` as a process, with its log (the default text format)
going to a file, and sends what an attacker or a storm would; the log bytes written, the requests
sent, the worst `/healthz` and `/metrics` latency and the launches are measured from outside, as an
operator would see them, and added to the suite's tally (tests/reliability_counts.py).

Which test proves which item of the issue (the unit-level tests are in test_webhook.py and
test_logs.py):

- 1 (log flooding without credentials) and 4 (unrouted alerts and 401s without limit):
  `test_bursts_of_hostile_requests_leave_a_bounded_log`; unit level
  `test_webhook.py::test_refused_requests_are_logged_once_per_cause_and_source_a_minute`,
  `::test_unrouted_alerts_are_logged_once_a_minute_however_many`,
  `test_logs.py::test_throttle_logs_the_first_per_key_and_window_and_counts_the_rest`.
- 2 (forged log lines): `test_webhook.py::test_request_text_in_every_field_stays_on_one_line` (every
  field, through the service's handler), `test_logs.py::test_every_record_is_one_line_whatever_its_arguments`;
  here every line of every log must start with a timestamp.
- 3 (the event loop stalls): `test_the_largest_allowed_payloads_keep_healthz_and_metrics_answering`;
  the cap and the compact reply: `test_webhook.py::test_too_many_alerts_are_refused_before_validation`,
  `::test_the_reply_counts_outcomes_instead_of_listing_alerts`.
- 5 (500 for deeply nested JSON): `test_webhook.py::test_bad_requests_get_a_4xx_and_a_short_reason`
  (nested arrays and objects, a broken gzip body), and here in the burst.
- 6 (dry-run without single-flight): `test_dry_run_predicts_one_launch_for_a_storm`;
  `test_webhook.py::test_dry_run_decides_and_logs_but_starts_nothing`,
  `::test_a_dry_run_never_holds_back_a_real_one`, `::test_kubernetes_dry_run_creates_nothing`.
- Issue 19 item 6 (a 500 before authentication):
  `test_webhook.py::test_any_bytes_in_the_credentials_are_a_401_never_a_500`, and here in the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from etcd_harness import EtcdCluster
from reliability_counts import Counts
from test_webhook import TOKEN, Scrape, alert, notification

pytestmark = pytest.mark.etcd

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO |WARNING|ERROR|CRITICAL) ")
# What the log may grow by during a whole burst: a few lines per cause, whatever the burst's size.
LOG_BOUND_BYTES = 16 * 1024
SERVE = [sys.executable, "-m", "exporter", "serve"]
PROBE_BOUND_SECONDS = 1.0  # under the Deployment's liveness timeout (3 s), with room to spare


@dataclass
class Service:
    """`etcd-autodefrag serve` as a process, its log in a file."""

    process: subprocess.Popen[bytes]
    url: str
    log_file: Path

    def log_size(self) -> int:
        return self.log_file.stat().st_size

    def log_lines(self) -> list[str]:
        return self.log_file.read_text(errors="strict").split("\n")[:-1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Awaitable[Service]]]:
    started: list[subprocess.Popen[bytes]] = []

    async def start(config: dict[str, Any]) -> Service:
        config_file = tmp_path / f"config-{len(started)}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        log_file = tmp_path / f"service-{len(started)}.log"
        port = _free_port()
        environment = {**os.environ, "ETCD_AUTODEFRAG_WEBHOOK__TOKEN": TOKEN}
        environment.pop("KUBERNETES_SERVICE_HOST", None)
        with log_file.open("wb") as log:
            process = subprocess.Popen(  # noqa: ASYNC220 (returns at once; readiness is awaited below)
                [*SERVE, "--config", str(config_file), "--listen", f"127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=environment,
            )
        started.append(process)
        service = Service(process, f"http://127.0.0.1:{port}", log_file)
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{service.url}/readyz") as answer:
                        if answer.status == 200:
                            return service
                except aiohttp.ClientError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the service did not become ready:\n{log_file.read_text()}")
                await asyncio.sleep(0.1)

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)


def service_config(etcd: EtcdCluster, tmp_path: Path, **webhook: Any) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c0", "endpoints": etcd.endpoints[:1]}],
        "webhook": webhook,
        # Nothing is ever started: the launches are counted by the dry run's bookkeeping.
        "executor": {"kind": "local", "dry_run": True, "state_dir": str(tmp_path / "state")},
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=64, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def scrape(session: aiohttp.ClientSession, service: Service) -> Scrape:
    async with session.get(f"{service.url}/metrics") as answer:
        assert answer.status == 200
        return Scrape(await answer.text())


async def send_all(
    session: aiohttp.ClientSession,
    url: str,
    requests: list[tuple[str, dict[str, str], bytes | None]],
    *,
    at_once: int,
) -> list[int]:
    """Every request, `at_once` in flight; their statuses."""
    statuses: list[int] = []
    queue = iter(requests)

    async def worker() -> None:
        for method, headers, body in queue:
            async with session.request(method, url, data=body, headers=headers) as answer:
                await answer.read()
                statuses.append(answer.status)

    await asyncio.gather(*(worker() for _ in range(at_once)))
    return statuses


async def garbage(url: str, size: int) -> bytes:
    """One connection that sends `size` bytes of \\x01 (not HTTP at all); the status line it got."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"\x01" * size)
        with contextlib.suppress(ConnectionError):  # the server answered 400 and closed first
            await writer.drain()
        async with asyncio.timeout(30):
            return (await reader.readline()).strip()
    finally:
        writer.close()


def assert_one_line_per_record(service: Service) -> None:
    lines = service.log_lines()
    assert lines
    assert all(TIMESTAMP.match(line) for line in lines), [x for x in lines if not TIMESTAMP.match(x)][:3]


async def test_bursts_of_hostile_requests_leave_a_bounded_log(
    etcd: EtcdCluster,
    tmp_path: Path,
    start_service: Callable[..., Awaitable[Service]],
    session: aiohttp.ClientSession,
    reliability_counts: Counts,
) -> None:
    """Issue 18 items 1, 4 and 5: what used to write ~51 MB (garbage), a line per 401 and a line per
    unrouted alert now writes a few lines per cause, and every request is still counted."""
    # Alerts of 10,000 in a post, as the storm had (5 MB: above the default caps).
    service = await start_service(service_config(etcd, tmp_path, max_alerts=10_000, max_body_bytes=8 << 20))
    url = f"{service.url}/webhook/alertmanager"
    before = service.log_size()

    answers = await asyncio.gather(*(garbage(service.url, 200_000) for _ in range(100)))
    assert set(answers) == {b"HTTP/1.0 400 Bad Request"}

    valid = json.dumps(notification(alert("c0"))).encode()
    wrong = [f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Basic !!", "Bearer \\xff"]
    unauthorized = [("POST", {**AUTH, "Authorization": wrong[i % 4]}, valid) for i in range(1000)]
    nested = b"[" * 200_000
    bad = [
        ("POST", AUTH, b"{"),
        ("POST", AUTH, nested),
        ("GET", AUTH, None),
        ("POST", {**AUTH, "Content-Type": "text/plain"}, valid),
    ]
    unrouted = json.dumps(notification(*(alert(f"nope-{i}") for i in range(10_000)))).encode()
    statuses = await send_all(session, url, unauthorized, at_once=50)
    statuses += await send_all(session, url, bad * 100, at_once=20)
    statuses += await send_all(session, url, [("POST", AUTH, unrouted)] * 10, at_once=5)
    assert statuses.count(401) == 1000
    assert (statuses.count(400), statuses.count(405), statuses.count(415)) == (200, 100, 100)
    assert statuses.count(200) == 10
    assert max(statuses) < 500

    async with session.get(f"{service.url}/healthz") as answer:  # still answering, log flushed
        assert answer.status == 200
    written = service.log_size() - before
    assert written < LOG_BOUND_BYTES, service.log_file.read_text()[-3000:]
    assert_one_line_per_record(service)
    metrics = await scrape(session, service)
    assert metrics.value("etcd_autodefrag_http_errors_total", cause="malformed_request") == 100
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="unauthorized") == 1000
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="bad_request") == 200
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_unrouted") == 100_000
    assert metrics.value("etcd_autodefrag_http_errors_total", cause="server_error") == 0
    sent = 100 + len(statuses)
    reliability_counts.add("hostile_requests_sent", sent)
    reliability_counts.add("hostile_garbage_connections", 100)
    reliability_counts.add("hostile_unauthorized_posts", 1000)
    reliability_counts.add("hostile_bad_requests", 400)
    reliability_counts.add("hostile_unrouted_alerts", 100_000)
    reliability_counts.add("hostile_log_bytes", written)
    reliability_counts.add("hostile_5xx", sum(s >= 500 for s in statuses))


def largest_payloads() -> dict[str, bytes]:
    """The bodies that cost the service most within its default limits (4 MiB, 1,000 alerts)."""

    def filled(cluster: str) -> bytes:
        # 1,000 alerts with labels and annotations as large as the 4 MiB cap allows.
        filler = "x" * 3600
        alerts = [alert(cluster, member=f"m{i}", detail=filler) for i in range(1000)]
        return json.dumps(notification(*alerts)).encode()

    minimal = {"status": "firing", "labels": {"a": "b"}, "startsAt": "2026-11-22T11:55:00Z"}
    return {
        "routed": filled("c0"),  # 1,000 decisions, one launch (dry)
        "unrouted": filled("elsewhere"),  # 1,000 decisions, each reason quoting its labels
        # ~50,000 minimal alerts: refused after json.loads, before validation (413).
        "too_many": json.dumps(notification(*[minimal] * 49_000)).encode(),
    }


async def test_the_largest_allowed_payloads_keep_healthz_and_metrics_answering(
    etcd: EtcdCluster,
    tmp_path: Path,
    start_service: Callable[..., Awaitable[Service]],
    session: aiohttp.ClientSession,
    reliability_counts: Counts,
) -> None:
    """Issue 18 item 3: eight 4 MiB bodies at once kept /healthz silent for 11 s; now the parsing
    and deciding take the loop one notification and one slice at a time."""
    service = await start_service(service_config(etcd, tmp_path))
    bodies = largest_payloads()
    assert all(3_500_000 < len(body) <= 4 * 1024 * 1024 for body in bodies.values())
    url = f"{service.url}/webhook/alertmanager"
    rounds, at_once = 8, 8
    requests = [("POST", AUTH, body) for body in bodies.values()] * (rounds * at_once // len(bodies) + 1)
    worst: dict[str, float] = {"/healthz": 0.0, "/metrics": 0.0}
    probes: dict[str, int] = {"/healthz": 0, "/metrics": 0}
    posting = asyncio.create_task(send_all(session, url, requests, at_once=at_once))

    # As their real callers do: the kubelet opens a connection per probe, Prometheus keeps one.
    prometheus = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def probe(path: str, client: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with client.get(f"{service.url}{path}") as answer:
            await answer.read()
            assert answer.status == 200
        worst[path] = max(worst[path], time.perf_counter() - started)
        probes[path] += 1

    async with prometheus:
        while not posting.done():  # every probe starts while posts are in flight
            await asyncio.gather(
                probe("/healthz", session), probe("/metrics", prometheus), asyncio.sleep(0.05)
            )
    statuses = posting.result()
    assert sorted(set(statuses)) == [200, 413]
    assert statuses.count(413) == len(requests) // 3
    assert min(probes.values()) >= 10  # probed all along, not once at the end
    assert worst["/healthz"] < PROBE_BOUND_SECONDS, worst
    assert worst["/metrics"] < PROBE_BOUND_SECONDS, worst
    metrics = await scrape(session, service)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="dry_run") == 1  # one launch in all
    assert_one_line_per_record(service)
    reliability_counts.add("large_payloads_posted", len(requests))
    reliability_counts.add("large_payload_probes", sum(probes.values()))
    reliability_counts.add("worst_healthz_ms", round(worst["/healthz"] * 1000))
    reliability_counts.add("worst_metrics_ms", round(worst["/metrics"] * 1000))


async def test_dry_run_predicts_one_launch_for_a_storm(
    etcd: EtcdCluster,
    tmp_path: Path,
    start_service: Callable[..., Awaitable[Service]],
    session: aiohttp.ClientSession,
    reliability_counts: Counts,
) -> None:
    """Issue 18 item 6: 2,000 posts for one cluster made 2,000 'would launch' lines in dry-run."""
    service = await start_service(service_config(etcd, tmp_path))
    before = service.log_size()
    body = json.dumps(notification(alert("c0"))).encode()
    statuses = await send_all(
        session, f"{service.url}/webhook/alertmanager", [("POST", AUTH, body)] * 2000, at_once=50
    )
    assert statuses == [200] * 2000
    metrics = await scrape(session, service)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="dry_run") == 1
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_cooldown") == 1999
    assert metrics.value("etcd_autodefrag_runs_total", etcd_cluster="c0", result="dry_run") == 1
    lines = service.log_lines()
    assert sum("DRY-RUN: would run" in line for line in lines) == 1
    written = service.log_size() - before
    assert written < 4096
    reliability_counts.add("dry_run_storm_posts", 2000)
    reliability_counts.add("dry_run_storm_launches", 1)
    reliability_counts.add("dry_run_storm_log_bytes", written)
