"""The Alertmanager webhook of `etcd-autodefrag serve`, over real HTTP, deciding from in-memory snapshots
(tests/snapshot_source.py) or, where the wiring is the point, from the Refresher's of real etcd.

Launches go to a counting fake executor where only the webhook is under test, and to the real local
executor (with a controllable stand-in for the defrag child, or the real engine end to end) where the
single-flight guarantees across restarts and processes are.
"""

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.http_exceptions import BadStatusLine
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from snapshot_source import StaticSnapshots, healthy_snapshot

from exporter.config.settings import ClusterConfig, ConfigError, Settings, load_settings
from exporter.core.handoff import cluster_from_json, cluster_json
from exporter.core.launches import LaunchOutcome, LaunchResult, RunState, Trigger
from exporter.core.report import MemberReport, RunReport, RunResult
from exporter.kubernetes.api import kube_api_client
from exporter.launch.executor import ExecutorRejected, ExecutorUnavailable, OnFinished
from exporter.launch.kubernetes import KubernetesExecutor
from exporter.launch.local import LocalExecutor, child_environment, local_executor
from exporter.service import auth
from exporter.service import webhook as webhook_module
from exporter.service.app import create_app

pytestmark = pytest.mark.etcd

ClientFactory = Callable[..., Awaitable[TestClient]]
TOKEN = "s3cr3t-t0ken-that-must-never-be-logged"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAKE_DEFRAG = Path(__file__).with_name("fake_defrag.py")


# --- payloads ------------------------------------------------------------------------------------


def fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def alert(
    cluster: str | None = "c0", name: str = "EtcdDefragRecommended", status: str = "firing", **labels: str
) -> dict[str, Any]:
    """One alert as Alertmanager sends it."""
    all_labels = {"alertname": name, "severity": "warning", **labels}
    if cluster is not None:
        all_labels["etcd_cluster"] = cluster
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {
            "summary": f"etcd cluster {cluster} should be defragmented",
            "runbook_url": "https://example.com/runbooks/etcd-defrag",
        },
        "startsAt": "2026-11-22T11:55:00.123456789Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-22T12:05:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=etcd_autodefrag_cluster_defrag_recommended",
        "fingerprint": fingerprint(all_labels),
    }


def notification(*alerts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A webhook body (version 4), including fields we do not model."""
    firing = any(a["status"] == "firing" for a in alerts)
    common = dict(alerts[0]["labels"]) if alerts else {}
    for a in alerts[1:]:
        common = {k: v for k, v in common.items() if a["labels"].get(k) == v}
    return {
        "receiver": "etcd-autodefrag",
        "status": "firing" if firing else "resolved",
        "alerts": list(alerts),
        "groupLabels": {"alertname": common.get("alertname", "")},
        "commonLabels": common,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "version": "4",
        "groupKey": '{}/{severity="warning"}:{alertname="EtcdDefragRecommended"}',
        "truncatedAlerts": 0,
        **extra,
    }


# --- collaborators -------------------------------------------------------------------------------


class FakeExecutor:
    """Counts launches and remembers them as running; fails with `fail` when told to."""

    def __init__(
        self, *, fail: Exception | None = None, outcome: LaunchOutcome = LaunchOutcome.CREATED
    ) -> None:
        self.fail = fail
        self.outcome = outcome
        self.launched: list[tuple[str, Trigger]] = []
        self.running: set[str] = set()
        self.on_finished: OnFinished | None = None
        self.stopped = False

    async def start(self, on_finished: OnFinished) -> None:
        self.on_finished = on_finished

    async def stop(self) -> None:
        self.stopped = True

    async def launch(self, cluster: ClusterConfig, trigger: Trigger) -> LaunchResult:
        await asyncio.sleep(0)  # a real launch awaits I/O: let concurrent requests interleave here
        if self.fail is not None:
            raise self.fail
        if self.outcome is not LaunchOutcome.CREATED:
            reason = f"fake says {self.outcome.value}"
            return LaunchResult(False, f"fake-{cluster.name}", reason, self.outcome)
        self.launched.append((cluster.name, trigger))
        self.running.add(cluster.name)
        return LaunchResult(True, f"fake-{cluster.name}", "created", LaunchOutcome.CREATED)

    def runs(self, clusters: Sequence[str]) -> dict[str, RunState]:
        return {name: RunState(running=name in self.running) for name in clusters}


@dataclass
class Child:
    """One started stand-in defrag process, waiting for the test to say how it ends."""

    argv: list[str]
    writer: asyncio.StreamWriter
    done: bool = False

    @property
    def cluster(self) -> str:
        return cluster_from_json(self.argv[self.argv.index("--cluster-json") + 1]).name

    def finish(self, report: dict[str, Any] | None = None, *, exit_code: int = 0) -> None:
        stdout = json.dumps(report) + "\n" if report is not None else ""
        self.writer.write(json.dumps({"stdout": stdout, "exit": exit_code}).encode())
        self.writer.close()
        self.done = True


@dataclass
class FakeDefrag:
    """Serves the stand-in children (tests/fake_defrag.py) and hands each one to the test as it starts."""

    socket_path: str
    started: asyncio.Queue[Child] = field(default_factory=asyncio.Queue)
    children: list[Child] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(FAKE_DEFRAG), self.socket_path]

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        child = Child(json.loads(await reader.readline()), writer)
        self.children.append(child)
        await self.started.put(child)

    async def next(self, timeout: float = 30) -> Child:
        async with asyncio.timeout(timeout):
            return await self.started.get()


def report(cluster: str, result: str = "success", reclaimed: int = 5 * 1024 * 1024) -> dict[str, Any]:
    return {"cluster": cluster, "result": result, "reason": "", "reclaimed_bytes": reclaimed, "members": []}


@pytest.fixture
async def fake_defrag() -> AsyncIterator[FakeDefrag]:
    # Unix socket paths are limited to ~100 bytes: pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="fd-", dir="/tmp")
    fake = FakeDefrag(os.path.join(directory, "s"))
    server = await asyncio.start_unix_server(fake.accept, fake.socket_path)
    try:
        yield fake
    finally:
        for child in fake.children:
            if not child.done:
                child.finish(exit_code=99)
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Fleet:
    """Healthy clusters without etcd: the service sees them through StaticSnapshots.

    What routing and deciding need of a cluster is its latest snapshot, so these tests build it in
    memory (tests/snapshot_source.py); the tests that take `etcd` prove the Refresher's wiring.
    """

    endpoints: ClassVar[list[str]] = ["http://etcd-0.invalid:2379"]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


def clusters(fleet: Fleet | Fleet, count: int = 10, **overrides: Any) -> list[ClusterConfig]:
    """`count` configured clusters c0, c1, ... all observing the same healthy etcd (or fleet)."""
    return [
        ClusterConfig.model_validate({"name": f"c{i}", "endpoints": fleet.endpoints[:1], **overrides})
        for i in range(count)
    ]


def settings(**overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "min_refresh_interval_seconds": 0,
        "scrape_budget_seconds": 3,
        "webhook": {"token": TOKEN},
    }
    return Settings(**{**options, **overrides})


Serve = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def serve(aiohttp_client: ClientFactory) -> Serve:
    async def start(cluster_list: list[ClusterConfig], runner: Any = None, /, **options: Any) -> TestClient:
        """A service for these clusters; `runner` is its executor (None: the one the settings describe)."""
        snapshots = options.pop("snapshots", None)
        if snapshots is None and cluster_list and all(c.endpoints == Fleet.endpoints for c in cluster_list):
            snapshots = StaticSnapshots(cluster_list, [healthy_snapshot(c.name) for c in cluster_list])
        app = create_app(
            settings(**options),
            clusters=cluster_list,
            executor=runner,
            snapshots=snapshots,
        )
        return await aiohttp_client(app)

    return start


async def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await client.post(
        "/webhook/alertmanager", json=body, headers=AUTH if headers is None else headers
    )
    text = await response.text()
    return response.status, json.loads(text) if response.content_type == "application/json" else text


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) <= 1, f"{name}{labels}: {len(found)} samples"
        return found[0] if found else 0.0


async def scrape(client: TestClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status == 200
    return Scrape(await response.text())


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds naming `what`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def outcomes(body: dict[str, Any]) -> list[str]:
    """The reply's outcomes, one per alert, grouped in the order each outcome first occurred."""
    return [outcome for outcome, seen in body["outcomes"].items() for _ in range(seen["alerts"])]


def reason(body: dict[str, Any], outcome: str) -> str:
    """The reason the reply gives for an outcome (its first alert's)."""
    text: str = body["outcomes"][outcome]["reason"]
    return text


# --- the happy paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("observed", ["fleet", "etcd"])
async def test_firing_alert_launches_with_the_trigger(
    observed: str, fleet: Fleet, etcd: EtcdCluster, serve: Serve
) -> None:
    """The same decision from in-memory snapshots and from the Refresher's snapshots of real etcd."""
    executor = FakeExecutor()
    client = await serve(clusters(fleet if observed == "fleet" else etcd, 2), executor)
    the_alert = alert("c1")
    status, body = await post(client, notification(the_alert))
    assert status == 200
    assert body["status"] == "ok"
    assert body == {
        "status": "ok",
        "alerts": 1,
        "outcomes": {
            "launch": {
                "alerts": 1,
                "clusters": ["c1"],
                "reason": "alert EtcdDefragRecommended fired for cluster c1",
            }
        },
    }
    [(cluster, trigger)] = executor.launched
    assert cluster == "c1"
    assert trigger.alertname == "EtcdDefragRecommended"
    assert trigger.fingerprint == the_alert["fingerprint"]
    assert trigger.receiver == "etcd-autodefrag"
    assert trigger.group_key.endswith(':{alertname="EtcdDefragRecommended"}')
    assert trigger.fired_at is not None
    assert trigger.fired_at.year == 2026
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="launch") == 1
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_unrouted") == 0  # exported at 0


async def test_resolved_alerts_are_acknowledged(fleet: Fleet, serve: Serve) -> None:
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 1), executor)
    status, body = await post(client, notification(alert("c0", status="resolved")))
    assert (status, outcomes(body)) == (200, ["skip_resolved"])
    assert executor.launched == []


async def test_a_group_launches_once_per_cluster(fleet: Fleet, serve: Serve) -> None:
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 3), executor)
    alerts = [alert("c0", member=f"m{i}") for i in range(50)]
    alerts += [alert("c1", name="EtcdNoSpaceAlarm"), alert("c1", name="EtcdQuotaUsageCritical")]
    alerts += [alert("c2", status="resolved"), alert("c2", name="EtcdMembersDown")]
    status, body = await post(client, notification(*alerts))
    assert status == 200
    assert sorted(c for c, _ in executor.launched) == ["c0", "c1"]
    assert outcomes(body).count("launch") == 2
    assert outcomes(body).count("skip_duplicate") == 50
    assert outcomes(body)[-2:] == ["skip_resolved", "skip_not_acting"]
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_duplicate") == 50


async def test_unknown_fields_are_tolerated(fleet: Fleet, serve: Serve) -> None:
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 1), executor)
    body = notification(
        {**alert("c0"), "silencedBy": [], "inhibitedBy": None},
        truncatedAlerts=3,
        notification_reason="repeat_interval",
        routeLabels={"team": "platform"},
        someFutureField={"nested": [1, 2]},
    )
    status, answer = await post(client, body)
    assert (status, outcomes(answer)) == (200, ["launch"])


async def test_unrouted_and_ambiguous_alerts_answer_2xx_and_are_counted(
    fleet: Fleet, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    executor = FakeExecutor()
    kube = {"alerts": ['job="kube-etcd"']}
    configured = [
        *clusters(fleet, 1),
        ClusterConfig.model_validate({"name": "k1", "endpoints": fleet.endpoints[:1], **kube}),
        ClusterConfig.model_validate({"name": "k2", "endpoints": fleet.endpoints[:1], **kube}),
    ]
    client = await serve(configured, executor)
    status, body = await post(client, notification(alert("nope"), alert(None), alert(None, job="kube-etcd")))
    assert status == 200
    assert outcomes(body) == ["skip_unrouted", "skip_unrouted", "skip_ambiguous"]
    assert "match several clusters (k1, k2)" in reason(body, "skip_ambiguous")
    assert executor.launched == []
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_unrouted") == 2
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_ambiguous") == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skip_ambiguous" in m and "k1, k2" in m for m in warnings)


async def test_paused_and_unhealthy_clusters_launch_nothing(etcd: EtcdCluster, serve: Serve) -> None:
    executor = FakeExecutor()
    dead = f"http://127.0.0.1:{free_port()}"
    configured = [
        ClusterConfig(name="paused", endpoints=etcd.endpoints[:1], paused=True),
        ClusterConfig(name="dead", endpoints=[dead], request_timeout_seconds=1),
    ]
    client = await serve(configured, executor)
    status, body = await post(client, notification(alert("paused"), alert("dead")))
    assert status == 200
    assert outcomes(body) == ["skip_paused", "skip_unhealthy"]
    assert dead in reason(body, "skip_unhealthy")
    assert executor.launched == []


# --- authentication ------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {TOKEN}x"}, 401),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 401),
        ({"Authorization": f"Token {TOKEN}"}, 401),
        (basic("alertmanager", "wrong"), 401),
        (basic("someone", "pa55"), 401),
        ({"Authorization": "Basic !!!not-base64"}, 401),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, 401),
        (AUTH, 200),
        ({"Authorization": f"bearer  {TOKEN} "}, 200),
        (basic("alertmanager", "pa55"), 200),
    ],
)
async def test_authentication(
    fleet: Fleet,
    serve: Serve,
    tmp_path: Path,
    headers: dict[str, str],
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("pa55\n")
    webhook = {
        "token": TOKEN,
        "basic_auth_username": "alertmanager",
        "basic_auth_password_file": password_file,
    }
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 1), executor, webhook=webhook)
    caplog.set_level(logging.DEBUG)
    answer, body = await post(client, notification(alert("c0")), headers)
    assert answer == status
    if status == 401:
        assert body == {"status": "error", "error": "missing or wrong credentials"}
        assert executor.launched == []
        assert (await scrape(client)).value("etcd_autodefrag_alerts_total", outcome="unauthorized") == 1
    assert TOKEN not in caplog.text
    assert "pa55" not in caplog.text


async def raw_request(client: TestClient, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no HTTP client library would (non-UTF-8 headers, control characters) and read
    the status line and body of the answer."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        async with asyncio.timeout(30):
            answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


WEBHOOK_HEAD = b"POST /webhook/alertmanager HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff\xfe",  # not UTF-8
        b"Bearer " + TOKEN.encode() + b"\xff",  # the token and a byte more
        b"Bearer caf\xe9",  # latin-1
        "Bearer café-中".encode(),  # UTF-8, not ASCII
        b"\xff\xfe " + TOKEN.encode(),  # the scheme itself
        b"Basic \xff\xfe",
        b"Basic " + base64.b64encode(b"alertmanager:\xff"),
        b"Bearer\t" + TOKEN.encode() + b"\xc3\x28",  # a tab, and an invalid UTF-8 sequence
    ],
)
async def test_any_bytes_in_the_credentials_are_a_401_never_a_500(
    fleet: Fleet, serve: Serve, authorization: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19 item 6: a non-UTF-8 byte in the header raised UnicodeEncodeError (a 500)."""
    webhook = {"token": TOKEN, "basic_auth_username": "alertmanager", "basic_auth_password": "pa55"}
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 1), executor, webhook=webhook)
    body = json.dumps(notification(alert("c0"))).encode()
    status, answer = await raw_request(
        client, WEBHOOK_HEAD + b"Authorization: " + authorization + b"\r\n", body
    )
    assert status == 401
    assert json.loads(answer) == {"status": "error", "error": "missing or wrong credentials"}
    assert executor.launched == []
    assert (await scrape(client)).value("etcd_autodefrag_alerts_total", outcome="unauthorized") == 1
    assert "Traceback" not in caplog.text


async def test_a_non_ascii_token_is_compared_as_utf8_bytes(fleet: Fleet, serve: Serve) -> None:
    token = "tökén-中文-secret"
    client = await serve(clusters(fleet, 1), FakeExecutor(), webhook={"token": token})
    body = json.dumps(notification(alert("c0"))).encode()
    good = WEBHOOK_HEAD + b"Authorization: Bearer " + token.encode() + b"\r\n"
    assert (await raw_request(client, good, body))[0] == 200
    cut = WEBHOOK_HEAD + b"Authorization: Bearer " + token.encode()[:-1] + b"\r\n"  # half a character
    assert (await raw_request(client, cut, body))[0] == 401


def test_authorized_never_raises_on_any_string() -> None:
    credentials = auth.Credentials(token=SecretStr(TOKEN), basic=("am", SecretStr("pw")))
    for header in ["Bearer \udcff", "Bearer \ud800", "Basic \udcff", "\x00", "Bearer " + TOKEN + "\udcff"]:
        assert auth.authorized(header, credentials) is False
    assert auth.authorized(f"Bearer {TOKEN}", credentials) is True


async def test_token_from_a_file_and_from_the_environment(
    fleet: Fleet, serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    client = await serve(clusters(fleet, 1), FakeExecutor(), webhook={"token_file": token_file})
    assert (await post(client, notification(), {"Authorization": "Bearer from-a-file"}))[0] == 200
    assert (await post(client, notification(), AUTH))[0] == 401

    monkeypatch.setenv("ETCD_AUTODEFRAG_WEBHOOK__TOKEN", "from-the-env")
    from_env = load_settings()
    assert from_env.webhook.token is not None
    assert from_env.webhook.token.get_secret_value() == "from-the-env"
    assert "from-the-env" not in repr(from_env)
    assert "from-the-env" not in str(from_env.model_dump())
    assert "ETCD_AUTODEFRAG_WEBHOOK__TOKEN" not in child_environment(os.environ)


async def test_a_rotated_token_file_is_followed(
    fleet: Fleet,
    serve: Serve,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kubernetes updates a mounted Secret in place: the new token works without a restart."""
    monkeypatch.setattr(webhook_module, "SECRET_CHECK_SECONDS", 0.0)  # look on every request
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    client = await serve(clusters(fleet, 1), FakeExecutor(), webhook={"token_file": token_file})
    assert (await post(client, notification(), {"Authorization": "Bearer first-token"}))[0] == 200

    token_file.write_text("the-second-token\n")
    assert (await post(client, notification(), {"Authorization": "Bearer the-second-token"}))[0] == 200
    assert (await post(client, notification(), {"Authorization": "Bearer first-token"}))[0] == 401

    caplog.set_level(logging.WARNING, logger="exporter.service.webhook")
    token_file.write_text("")  # caught mid-rotation: keep what works
    assert (await post(client, notification(), {"Authorization": "Bearer the-second-token"}))[0] == 200
    assert any("unusable, keeping the current credentials" in r.getMessage() for r in caplog.records)
    assert "the-second-token" not in caplog.text


@pytest.mark.parametrize(
    ("listen", "webhook", "message"),
    [
        ("0.0.0.0:9479", {}, "the webhook has no credentials but the service listens on 0.0.0.0:9479"),
        ("[::]:9479", {}, "has no credentials"),
        ("10.0.0.5:9479", {}, "set webhook.token_file"),
        ("etcd-autodefrag:9479", {}, "has no credentials"),
        ("0.0.0.0:9479", {"token_file": "/nonexistent/token"}, "webhook.token_file: cannot read"),
        ("0.0.0.0:9479", {"token": "  "}, "webhook.token is empty"),
    ],
)
def test_start_up_refuses_an_open_webhook_beyond_loopback(
    listen: str, webhook: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        create_app(Settings(listen_address=listen, webhook=webhook), clusters=[], executor=FakeExecutor())


@pytest.mark.parametrize("listen", ["127.0.0.1:9479", "[::1]:9479", "localhost:9479", "127.0.0.2:1"])
async def test_an_open_webhook_serves_on_loopback(fleet: Fleet, serve: Serve, listen: str) -> None:
    client = await serve(clusters(fleet, 1), FakeExecutor(), webhook={}, listen_address=listen)
    assert (await post(client, notification(alert("c0")), headers={}))[0] == 200


def test_start_up_message_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from exporter.cli.main import main

    assert main(["serve", "--listen", "0.0.0.0:1"]) == 2
    err = capsys.readouterr().err
    assert "the webhook has no credentials but the service listens on 0.0.0.0:1" in err


# --- bad input -----------------------------------------------------------------------------------


def valid_body() -> bytes:
    return json.dumps(notification(alert("c0"))).encode()


def chunks(data: bytes) -> Any:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    return gen()


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "headers", "body", "status", "outcome", "error"),
    [
        ("GET", {}, None, 405, "method_not_allowed", "use POST"),
        ("PUT", JSON, valid_body(), 405, "method_not_allowed", "use POST"),
        ("DELETE", {}, None, 405, "method_not_allowed", "use POST"),
        ("POST", {"Content-Type": "text/plain"}, valid_body(), 415, "unsupported_media_type", "text/plain"),
        ("POST", {}, valid_body(), 415, "unsupported_media_type", "must be application/json"),
        (
            "POST",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"a=b",
            415,
            "unsupported_media_type",
            "must be application/json",
        ),
        ("POST", JSON, b"x" * 2049, 413, "payload_too_large", "larger than 2048 bytes"),
        ("POST", JSON, "chunked", 413, "payload_too_large", "larger than 2048 bytes"),
        ("POST", JSON, b"", 400, "bad_request", "malformed JSON"),
        ("POST", JSON, b'{"version": "4",', 400, "bad_request", "malformed JSON"),
        ("POST", JSON, b"\xff\xfe{}", 400, "bad_request", "malformed JSON"),
        ("POST", JSON, b"[" * 100_000, 400, "bad_request", "malformed JSON: recursion limit exceeded"),
        ("POST", JSON, b'{"a":' * 100_000, 400, "bad_request", "malformed JSON: recursion limit exceeded"),
        (
            "POST",
            {**JSON, "Content-Encoding": "gzip"},
            b"not gzip at all",
            400,
            "bad_request",
            "the body cannot be read: its Content-Encoding does not decode",
        ),
        ("POST", JSON, b"[]", 400, "bad_request", "invalid payload: (body): Input should be an object"),
        ("POST", JSON, b"null", 400, "bad_request", "invalid payload"),
        ("POST", JSON, b'{"version": "4"}', 400, "bad_request", "groupKey: Field required"),
        (
            "POST",
            JSON,
            json.dumps({**notification(alert("c0")), "version": "3"}).encode(),
            400,
            "bad_request",
            "version: Value error, unsupported webhook payload version '3'",
        ),
        (
            "POST",
            JSON,
            json.dumps(notification({**alert("c0"), "status": "pending"})).encode(),
            400,
            "bad_request",
            "alerts.0.status: Input should be 'firing' or 'resolved'",
        ),
        (
            "POST",
            JSON,
            json.dumps(notification({**alert("c0"), "labels": {"etcd_cluster": 7}})).encode(),
            400,
            "bad_request",
            "alerts.0.labels.etcd_cluster: Input should be a valid string",
        ),
        (
            "POST",
            JSON,
            json.dumps(notification({**alert("c0"), "startsAt": "yesterday"})).encode(),
            400,
            "bad_request",
            "alerts.0.startsAt",
        ),
        (
            "POST",
            JSON,
            json.dumps({**notification(alert("c0")), "alerts": "many"}).encode(),
            400,
            "bad_request",
            "alerts: Input should be a valid array",
        ),
    ],
)
async def test_bad_requests_get_a_4xx_and_a_short_reason(
    fleet: Fleet,
    serve: Serve,
    method: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    outcome: str,
    error: str,
) -> None:
    executor = FakeExecutor()
    cap = 2048 if body == "chunked" or len(body or b"") <= 4096 else 4 * 1024 * 1024
    client = await serve(clusters(fleet, 1), executor, webhook={"token": TOKEN, "max_body_bytes": cap})
    data = chunks(b"[" + b" " * 4096 + b"]") if body == "chunked" else body
    response = await client.request(method, "/webhook/alertmanager", data=data, headers={**AUTH, **headers})
    assert response.status == status
    answer = await response.json()
    assert answer["status"] == "error"
    assert error in answer["error"]
    assert len(answer["error"]) <= 300
    if status == 405:
        assert response.headers["Allow"] == "POST"
    assert executor.launched == []
    assert (await scrape(client)).value("etcd_autodefrag_alerts_total", outcome=outcome) == 1


async def test_no_field_of_any_type_makes_a_5xx(fleet: Fleet, serve: Serve) -> None:
    """Every field of a valid notification, dropped or replaced by each JSON type: 200 or 400, never 5xx."""
    client = await serve(clusters(fleet, 1), FakeExecutor())
    valid = notification(alert("c0"))
    wrong: list[Any] = [None, 0, -1.5, True, "", "x" * 300, [], [1], {}, {"a": {"b": []}}]
    variants: list[dict[str, Any]] = []
    for key in [*valid, "alerts.0", *(f"alerts.0.{k}" for k in valid["alerts"][0])]:
        for value in [*wrong, "DROP"]:
            body = json.loads(json.dumps(valid))
            *path, last = key.split(".")
            target = body
            for part in path:
                target = target[int(part)] if part.isdigit() else target[part]
            if value == "DROP":
                del target[int(last) if last.isdigit() else last]
            elif last.isdigit():
                target[int(last)] = value
            else:
                target[last] = value
            variants.append(body)
    answers = await asyncio.gather(*(post(client, body) for body in variants))
    assert {status for status, _ in answers} <= {200, 400}
    assert sum(status == 400 for status, _ in answers) > 100


async def test_the_default_body_cap_holds_a_large_group(fleet: Fleet, serve: Serve) -> None:
    """1,000 alerts with their labels and annotations (~650 KiB) fit the default 4 MiB cap."""
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 1), executor)
    body = notification(*(alert("c0", member=f"member-{i}", pod=f"etcd-{i}") for i in range(1000)))
    assert 500_000 < len(json.dumps(body)) < 4 * 1024 * 1024
    status, answer = await post(client, body)
    assert status == 200
    assert outcomes(answer).count("launch") == 1


async def test_too_many_alerts_are_refused_before_validation(fleet: Fleet, serve: Serve) -> None:
    """413, as for the body cap (a payload larger than we process; Alertmanager does not retry
    4xx): the count is checked before the costly part, so even invalid alerts are not looked at."""
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 1), executor, webhook={"token": TOKEN, "max_alerts": 5})
    status, body = await post(client, notification(*(alert("c0", member=f"m{i}") for i in range(5))))
    assert (status, outcomes(body).count("launch")) == (200, 1)
    status, body = await post(client, notification(*(alert("c0", member=f"m{i}") for i in range(6))))
    assert status == 413
    assert body["error"] == (
        "6 alerts in one notification, more than webhook.max_alerts (5): set max_alerts: 5 (or less) "
        "in the Alertmanager receiver's webhook_config"
    )
    status, _ = await post(client, {**notification(alert("c0")), "alerts": [{"status": "nonsense"}] * 6})
    assert status == 413  # not 400: the alerts themselves were never validated
    assert len(executor.launched) == 1
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="too_many_alerts") == 2


def test_the_alert_cap_is_a_setting_with_a_floor() -> None:
    assert Settings().webhook.max_alerts == 1000
    with pytest.raises(ValueError, match="max_alerts"):
        Settings(webhook={"max_alerts": 0})


async def test_the_reply_counts_outcomes_instead_of_listing_alerts(fleet: Fleet, serve: Serve) -> None:
    """The reply used to carry an entry per alert (13 MB for a 4 MiB body of minimal alerts)."""
    client = await serve(clusters(fleet, 2), FakeExecutor())
    alerts = [alert("c0", member=f"m{i}") for i in range(400)]
    alerts += [alert(f"unknown-{i}") for i in range(500)] + [alert("c1", status="resolved")] * 100
    response = await client.post("/webhook/alertmanager", json=notification(*alerts), headers=AUTH)
    assert response.status == 200
    text = await response.text()
    assert len(text) < 2000
    body = json.loads(text)
    assert body["alerts"] == 1000
    assert {k: (v["alerts"], v["clusters"]) for k, v in body["outcomes"].items()} == {
        "launch": (1, ["c0"]),
        "skip_duplicate": (399, ["c0"]),
        "skip_unrouted": (500, []),
        "skip_resolved": (100, []),
    }
    assert reason(body, "skip_unrouted").startswith(
        'labels {alertname="EtcdDefragRecommended", etcd_cluster="unknown-0"'
    )


async def test_refused_requests_are_logged_once_per_cause_and_source_a_minute(
    fleet: Fleet, serve: Serve, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17 item 5 and issue 18 item 4: 400/405/415 left no line, and every 401 wrote one."""
    now = [1000.0]
    monkeypatch.setattr(webhook_module.clock, "monotonic", lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="exporter.service.webhook")
    client = await serve(clusters(fleet, 1), FakeExecutor(), webhook={"token": TOKEN, "max_body_bytes": 2048})
    valid = json.dumps(notification(alert("c0"))).encode()
    bad = {
        "unauthorized": ("POST", {**JSON, "Authorization": f"Bearer {TOKEN[:-1]}"}, valid),
        "bad_request": ("POST", {**JSON, **AUTH}, b'{"version": "4", "secret-looking body'),
        "method_not_allowed": ("GET", AUTH, None),
        "unsupported_media_type": ("POST", {**AUTH, "Content-Type": "text/plain"}, valid),
        "payload_too_large": ("POST", {**JSON, **AUTH}, b"x" * 4096),
    }
    for _ in range(20):
        for method, headers, body in bad.values():
            response = await client.request(method, "/webhook/alertmanager", data=body, headers=headers)
            assert 400 <= response.status < 500
    lines = [r for r in caplog.records if r.name == "exporter.service.webhook"]
    assert [r.levelno for r in lines] == [logging.WARNING] * 5
    assert [r.getMessage() for r in lines] == [
        "webhook: refused a request from 127.0.0.1: 401 unauthorized: missing or wrong credentials",
        "webhook: refused a request from 127.0.0.1: 400 bad_request: malformed JSON: EOF while parsing "
        "a string at line 1 column 37",
        "webhook: refused a request from 127.0.0.1: 405 method_not_allowed: use POST",
        "webhook: refused a request from 127.0.0.1: 415 unsupported_media_type: Content-Type must be "
        "application/json, not text/plain",
        "webhook: refused a request from 127.0.0.1: 413 payload_too_large: body larger than 2048 bytes: "
        "raise webhook.max_body_bytes or set max_alerts in the Alertmanager receiver",
    ]
    assert TOKEN[:-1] not in caplog.text
    assert "secret-looking" not in caplog.text
    metrics = await scrape(client)
    for outcome in bad:
        assert metrics.value("etcd_autodefrag_alerts_total", outcome=outcome) == 20
    now[0] += 60  # a minute later, the next one is logged again, saying how many were not
    caplog.clear()
    method, headers, body = bad["unauthorized"]
    await client.request(method, "/webhook/alertmanager", data=body, headers=headers)
    [line] = [r.getMessage() for r in caplog.records if r.name == "exporter.service.webhook"]
    assert line.endswith("missing or wrong credentials (and 19 more like it since the last such line)")


async def test_unrouted_alerts_are_logged_once_a_minute_however_many(
    fleet: Fleet, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING per unrouted alert made 44,619 lines from one post (issue 18 item 4)."""
    caplog.set_level(logging.INFO, logger="exporter.service.webhook")
    client = await serve(clusters(fleet, 1), FakeExecutor())
    alerts = [alert(f"nope-{i}") for i in range(500)] + [alert(None, job=f"j{i}") for i in range(500)]
    for _ in range(3):
        status, body = await post(client, notification(*alerts))
        assert (status, outcomes(body).count("skip_unrouted")) == (200, 1000)
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert "skip_unrouted" in line
    assert 'etcd_cluster="nope-0"' in line
    assert (await scrape(client)).value("etcd_autodefrag_alerts_total", outcome="skip_unrouted") == 3000


async def test_request_text_in_every_field_stays_on_one_line(
    fleet: Fleet, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 item 2, through the service's own log handler in the default text format.

    Newline, CR, ESC, NUL, C1 controls, line separators and a lone surrogate in alert names, label
    keys and values, fingerprints, unrouted cluster names, reasons (of a refusal and of a failed
    launch), the Content-Type and the peer of a malformed request: every record is one line.
    """
    from exporter import logs
    from exporter.service.app import ServerLog
    from exporter.service.metrics import RunMetrics

    evil = "\n2026-01-01 00:00:00 ERROR forged\r\x1b[2J\x00\x85\u2028\u2029"
    stream = io.StringIO()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    access = logging.getLogger("aiohttp.access")
    monkeypatch.setattr(access, "level", access.level)
    logs.configure(fmt="text", level="DEBUG", stream=stream)
    records: list[logging.LogRecord] = []
    root.handlers[0].addFilter(lambda record: records.append(record) is None)

    failing = FakeExecutor(fail=ExecutorUnavailable(f"Kubernetes API said {evil}"))
    client = await serve(clusters(fleet, 2), failing)
    named = {
        "status": "firing",
        "labels": {"alertname": f"EtcdDefragRecommended{evil}"},
        "startsAt": "2026-11-22T11:55:00Z",
        "fingerprint": f"fp{evil}",
    }
    labels = {"alertname": "EtcdDefragRecommended", f"key{evil}": f"value{evil}", "etcd_cluster": f"c0{evil}"}
    unrouted = {**named, "labels": labels}
    routed = {**alert("c1"), "fingerprint": f"fp{evil}"}
    await post(client, notification(named, unrouted, routed, {**unrouted, "status": "resolved"}))
    bad_key = notification({**alert("c0"), "labels": {f"k{evil}": 7}})
    assert (await post(client, bad_key))[0] == 400
    head = b"POST /webhook/alertmanager HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + TOKEN.encode()
    content_type = (
        b"\r\nContent-Type: text/" + "\u2028\x85".encode() + b"\xff\xfe\r\n"
    )  # no controls: HTTP refuses those
    assert (await raw_request(client, head + content_type, b"{}"))[0] == 415
    ServerLog(RunMetrics(CollectorRegistry(), alert_outcomes=[])).exception(
        "Error handling request from %s", f"10.0.0.1{evil}", exc_info=BadStatusLine(evil)
    )

    text = stream.getvalue()
    text.encode("utf-8")  # a lone surrogate would fail here, and in a real log file
    lines = text.split("\n")
    assert lines.pop() == ""
    assert len(lines) == len(records)  # exactly one line per record
    assert len(text.splitlines()) == len(records)  # and no other kind of line break inside one
    assert all(line[:4].isdigit() and line.isprintable() for line in lines)
    escaped = "\\n2026-01-01 00:00:00 ERROR forged\\r\\x1b[2J\\x00\\x85\\u2028\\u2029"
    for shown in (
        f"EtcdDefragRecommended{escaped}",  # alert name
        f"key{escaped}",  # label key
        f"value{escaped}",  # label value
        f"fp{escaped}",  # fingerprint
        f'etcd_cluster="c0{escaped}"',  # the cluster an alert names
        f"Kubernetes API said {escaped}",  # a reason from the executor
        f"k{escaped}: Input should be a valid string",  # a refusal's reason quoting a key
        "not text/\\u2028\\x85",  # the Content-Type
        f"from 10.0.0.1{escaped}",  # the peer of a malformed request
    ):
        assert shown in text, shown


# --- executor failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("executor", "status", "outcome"),
    [
        (
            FakeExecutor(fail=ExecutorUnavailable("Kubernetes API: connection refused")),
            503,
            "launch_unavailable",
        ),
        (FakeExecutor(fail=ExecutorRejected("Job rejected: 422 Invalid")), 422, "launch_rejected"),
        (FakeExecutor(outcome=LaunchOutcome.NAME_TAKEN), 422, "launch_rejected"),
        (FakeExecutor(outcome=LaunchOutcome.ALREADY_RUNNING), 200, "skip_already_running"),
        (FakeExecutor(outcome=LaunchOutcome.COOLING_DOWN), 200, "skip_cooldown"),
    ],
)
async def test_executor_answers_map_to_the_retry_contract(
    fleet: Fleet, serve: Serve, executor: FakeExecutor, status: int, outcome: str
) -> None:
    client = await serve(clusters(fleet, 2), executor)
    answer, body = await post(client, notification(alert("c0"), alert("c1", status="resolved")))
    assert answer == status
    assert outcomes(body) == [outcome, "skip_resolved"]
    assert (await scrape(client)).value("etcd_autodefrag_alerts_total", outcome=outcome) == 1


# --- concurrency ---------------------------------------------------------------------------------


async def test_1000_concurrent_posts_for_10_clusters_launch_10_runs(
    fleet: Fleet, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="exporter.service.webhook")
    executor = FakeExecutor()
    client = await serve(clusters(fleet, 10), executor)
    answers = await asyncio.gather(*(post(client, notification(alert(f"c{i % 10}"))) for i in range(1000)))
    assert {status for status, _ in answers} == {200}
    assert sorted(c for c, _ in executor.launched) == [f"c{i}" for i in range(10)]
    found = [o for _, body in answers for o in outcomes(body)]
    assert found.count("launch") == 10
    assert found.count("skip_already_running") == 990
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="launch") == 10
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_already_running") == 990
    # The storm's repeats are counted, but logged above DEBUG once per cluster and reason.
    skips = [r for r in caplog.records if "skip_already_running" in r.getMessage()]
    assert len(skips) == 990
    loud = sorted(r.etcd_cluster for r in skips if r.levelno > logging.DEBUG)
    assert loud == [f"c{i}" for i in range(10)]


# --- the local executor --------------------------------------------------------------------------


def local(state_dir: Path, fake: FakeDefrag, *, cooldown: float = 3600) -> LocalExecutor:
    return LocalExecutor(
        state_dir=state_dir,
        cooldown_seconds=cooldown,
        command=fake.command,
        reconcile_interval_seconds=0.05,
    )


async def test_dry_run_decides_and_logs_but_starts_nothing(
    fleet: Fleet, serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    state_dir = tmp_path / "state"
    # The executor the settings describe (local, outside a Pod), as `serve` builds it.
    client = await serve(clusters(fleet, 2), None, executor={"dry_run": True, "state_dir": state_dir})
    status, body = await post(client, notification(alert("c0"), alert("c1", status="resolved")))
    assert status == 200
    assert outcomes(body) == ["dry_run", "skip_resolved"]
    assert reason(body, "dry_run") == "dry run: nothing started"
    # The same single-flight and cooldown as a real launch (issue 18 item 6): the next alerts for
    # c0 would find its run cooling down, and c1 is launched once, too.
    for _ in range(3):
        status, body = await post(client, notification(alert("c0"), alert("c1")))
        assert status == 200
        assert body["outcomes"].keys() <= {"dry_run", "skip_cooldown"}
    assert "cools down until" in reason(body, "skip_cooldown")
    assert "after its last run (dry_run)" in reason(body, "skip_cooldown")
    dry = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DRY-RUN: would run ")]
    assert len(dry) == 2
    handed = shlex.join(["--cluster-json", cluster_json(clusters(fleet, 2)[0])])
    assert f"-m exporter defrag {handed} --log-format text --log-level INFO --output json" in dry[0]
    assert not state_dir.exists()  # not even a lock file: a dry run's bookkeeping stays in memory
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="dry_run") == 2
    assert metrics.value("etcd_autodefrag_alerts_total", outcome="skip_cooldown") == 5
    assert metrics.value("etcd_autodefrag_runs_total", etcd_cluster="c0", result="dry_run") == 1
    assert metrics.value("etcd_autodefrag_runs_in_flight", etcd_cluster="c0") == 0


async def test_a_dry_run_never_holds_back_a_real_one(
    fleet: Fleet, serve: Serve, tmp_path: Path, fake_defrag: FakeDefrag
) -> None:
    """Dry runs are remembered in memory only: a real service on the same state directory, or this
    service after a restart, launches as if they had never been."""
    state_dir = tmp_path / "state"
    dry = await serve(clusters(fleet, 1), None, executor={"dry_run": True, "state_dir": state_dir})
    assert outcomes((await post(dry, notification(alert("c0"))))[1]) == ["dry_run"]
    assert outcomes((await post(dry, notification(alert("c0"))))[1]) == ["skip_cooldown"]
    real = await serve(clusters(fleet, 1), local(state_dir, fake_defrag))
    assert outcomes((await post(real, notification(alert("c0"))))[1]) == ["launch"]
    await fake_defrag.next()
    # ... and the dry service sees the real run, as a real launch would.
    assert outcomes((await post(dry, notification(alert("c0"))))[1]) == ["skip_already_running"]


async def test_local_run_end_to_end_with_the_stand_in(
    fleet: Fleet, serve: Serve, tmp_path: Path, fake_defrag: FakeDefrag
) -> None:
    executor = local(tmp_path / "state", fake_defrag)
    configured = clusters(fleet, 2)
    client = await serve(configured, executor)
    status, body = await post(client, notification(alert("c1")))
    assert (status, outcomes(body)) == (200, ["launch"])
    child = await fake_defrag.next()
    # Handed the cluster the service decided on, as data (docs/run-handoff.md): no config file.
    assert child.argv[:2] == ["defrag", "--cluster-json"]
    assert cluster_from_json(child.argv[2]) == configured[1]
    assert "--config" not in child.argv
    assert child.argv[-2:] == ["--output", "json"]
    assert (await scrape(client)).value("etcd_autodefrag_runs_in_flight", etcd_cluster="c1") == 1
    assert (await scrape(client)).value("etcd_autodefrag_runs_in_flight", etcd_cluster="c0") == 0
    # While it runs, the same alert is acknowledged without a second run.
    status, body = await post(client, notification(alert("c1")))
    assert (status, outcomes(body)) == (200, ["skip_already_running"])

    child.finish(report("c1", reclaimed=7 * 1024 * 1024))

    async def recorded() -> bool:
        return (await scrape(client)).value(
            "etcd_autodefrag_runs_total", etcd_cluster="c1", result="success"
        ) == 1

    await eventually(recorded, timeout=10, what="the run's outcome on /metrics")
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_reclaimed_bytes_total", etcd_cluster="c1") == 7 * 1024 * 1024
    assert metrics.value("etcd_autodefrag_runs_in_flight", etcd_cluster="c1") == 0
    assert (
        metrics.value("etcd_autodefrag_last_run_timestamp_seconds", etcd_cluster="c1", result="success") > 0
    )
    assert metrics.value("etcd_autodefrag_run_duration_seconds", etcd_cluster="c1") > 0
    # Cooling down now.
    status, body = await post(client, notification(alert("c1")))
    assert (status, outcomes(body)) == (200, ["skip_cooldown"])
    assert "cools down until" in reason(body, "skip_cooldown")
    assert len(fake_defrag.children) == 1


@pytest.mark.parametrize(
    ("answer", "exit_code", "result"),
    [
        (None, 1, "job_failed"),
        ({"result": "refused", "reason": "cluster unhealthy"}, 3, "refused"),
        ({"result": "failed", "reclaimed_bytes": 1024}, 1, "failed"),
        ({"result": "nothing_to_do"}, 0, "nothing_to_do"),
        ({"result": "something-new"}, 0, "job_failed"),
    ],
)
async def test_local_run_results_become_metrics(
    fleet: Fleet,
    serve: Serve,
    tmp_path: Path,
    fake_defrag: FakeDefrag,
    answer: dict[str, Any] | None,
    exit_code: int,
    result: str,
) -> None:
    client = await serve(clusters(fleet, 1), local(tmp_path, fake_defrag))
    assert (await post(client, notification(alert("c0"))))[0] == 200
    (await fake_defrag.next()).finish(answer, exit_code=exit_code)

    async def recorded() -> bool:
        return (await scrape(client)).value(
            "etcd_autodefrag_runs_total", etcd_cluster="c0", result=result
        ) == 1

    await eventually(recorded, timeout=10, what=f"runs_total{{result={result!r}}}")


async def test_a_restarted_service_sees_the_run_and_records_its_end(
    fleet: Fleet, serve: Serve, tmp_path: Path, fake_defrag: FakeDefrag
) -> None:
    state_dir = tmp_path / "state"
    first = await serve(clusters(fleet, 1), local(state_dir, fake_defrag))
    assert outcomes((await post(first, notification(alert("c0"))))[1]) == ["launch"]
    child = await fake_defrag.next()
    await first.close()  # the service stops; its child runs on and keeps the lock

    second = await serve(clusters(fleet, 1), local(state_dir, fake_defrag))
    status, body = await post(second, notification(alert("c0")))
    assert (status, outcomes(body)) == (200, ["skip_already_running"])
    assert (await scrape(second)).value("etcd_autodefrag_runs_in_flight", etcd_cluster="c0") == 1

    child.finish(report("c0"))

    async def recorded() -> bool:
        metrics = await scrape(second)
        return metrics.value("etcd_autodefrag_runs_total", etcd_cluster="c0", result="success") == 1

    await eventually(recorded, timeout=10, what="the restarted service to record the run's end")
    assert (await scrape(second)).value("etcd_autodefrag_runs_in_flight", etcd_cluster="c0") == 0
    status, body = await post(second, notification(alert("c0")))
    assert (status, outcomes(body)) == (200, ["skip_cooldown"])

    third = await serve(clusters(fleet, 1), local(state_dir, fake_defrag))  # and after another restart
    assert outcomes((await post(third, notification(alert("c0"))))[1]) == ["skip_cooldown"]
    assert len(fake_defrag.children) == 1


async def test_two_services_on_one_host_launch_one_run_per_cluster(
    fleet: Fleet, serve: Serve, tmp_path: Path, fake_defrag: FakeDefrag
) -> None:
    state_dir = tmp_path / "state"
    one = await serve(clusters(fleet, 10), local(state_dir, fake_defrag))
    two = await serve(clusters(fleet, 10), local(state_dir, fake_defrag))
    answers = await asyncio.gather(
        *(post(one if i % 2 else two, notification(alert(f"c{i % 10}"))) for i in range(1000))
    )
    assert {status for status, _ in answers} == {200}
    found = [o for _, body in answers for o in outcomes(body)]
    assert found.count("launch") == 10
    assert found.count("skip_already_running") == 990
    started = [await fake_defrag.next() for _ in range(10)]
    assert sorted(child.cluster for child in started) == [f"c{i}" for i in range(10)]
    for child in started:
        child.finish(report(child.cluster))

    async def all_recorded() -> bool:
        total = 0.0
        for client in (one, two):
            metrics = await scrape(client)
            total += sum(
                metrics.value("etcd_autodefrag_runs_total", etcd_cluster=f"c{i}", result="success")
                for i in range(10)
            )
        return total == 10

    await eventually(all_recorded, timeout=20, what="10 recorded runs over both services")
    assert len(fake_defrag.children) == 10


SECOND_PROCESS = """
import asyncio, sys
from pathlib import Path
from exporter.launch.local import LocalExecutor
from exporter.core.launches import Trigger
from exporter.config.settings import ClusterConfig

async def main():
    executor = LocalExecutor(
        state_dir=Path(sys.argv[1]), cooldown_seconds=0,
        command=[sys.executable, "-c", "raise SystemExit(7)"],
    )
    cluster = ClusterConfig(name="c0", endpoints=["http://127.0.0.1:2379"])
    print((await executor.launch(cluster, Trigger(alertname="A"))).outcome.value)

asyncio.run(main())
"""


async def test_the_lock_alone_keeps_another_process_out(tmp_path: Path, fake_defrag: FakeDefrag) -> None:
    """Even when a second process reads the state before the first wrote it, the flock decides."""
    state_dir = tmp_path / "state"
    executor = local(state_dir, fake_defrag, cooldown=0)
    finished: list[str] = []
    await executor.start(lambda outcome: finished.append(outcome.result))
    cluster = ClusterConfig(name="c0", endpoints=["http://127.0.0.1:2379"])
    assert (await executor.launch(cluster, Trigger(alertname="A"))).created
    child = await fake_defrag.next()

    async def launch_from_another_process() -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SECOND_PROCESS, str(state_dir), stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await process.communicate()
        return stdout.decode().strip()

    (state_dir / "c0.json").unlink()  # as if the other process had read the state before it was written
    assert await launch_from_another_process() == "already_running"
    child.finish(report("c0"))

    async def recorded() -> bool:  # the executor records the end before it lets go of the lock
        return bool(finished)

    await eventually(recorded, timeout=10, what="the first run's end to be recorded")
    assert await launch_from_another_process() == "created"  # no cooldown: the lock was all that held it
    await executor.stop()


async def test_state_dir_problems_answer_503(
    fleet: Fleet, serve: Serve, tmp_path: Path, fake_defrag: FakeDefrag
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    client = await serve(clusters(fleet, 1), local(blocker / "state", fake_defrag))
    status, body = await post(client, notification(alert("c0")))
    assert (status, body["status"], outcomes(body)) == (503, "retry", ["launch_unavailable"])


async def test_real_defrag_end_to_end(fresh_etcd_cluster: EtcdCluster, serve: Serve, tmp_path: Path) -> None:
    cluster = fresh_etcd_cluster
    cluster.churn()
    before = {name: int(s["dbSize"]) for name, s in cluster.statuses().items()}
    config = tmp_path / "config.yaml"
    config.write_text(
        "clusters:\n"
        "  - name: e2e\n"
        f"    endpoints: [{cluster.endpoints[0]}]\n"
        "    rule: 'dbSizeFree > 1024*1024'\n"
        "    health_timeout_seconds: 20\n"
        "    settle_seconds: 0\n"  # started seconds ago: no rollout gate
    )
    configured = load_settings(config).clusters
    executor = LocalExecutor(state_dir=tmp_path / "state", cooldown_seconds=3600)
    client = await serve(configured, executor)
    status, body = await post(client, notification(alert("e2e", name="EtcdNoSpaceAlarm")))
    assert (status, outcomes(body)) == (200, ["launch"])

    async def succeeded() -> bool:
        metrics = await scrape(client)
        return metrics.value("etcd_autodefrag_runs_total", etcd_cluster="e2e", result="success") == 1

    await eventually(succeeded, timeout=60, what="the defrag run to succeed")
    metrics = await scrape(client)
    assert metrics.value("etcd_autodefrag_reclaimed_bytes_total", etcd_cluster="e2e") > 0
    assert metrics.value("etcd_autodefrag_runs_in_flight", etcd_cluster="e2e") == 0
    after = {name: int(s["dbSize"]) for name, s in cluster.statuses().items()}
    assert all(after[name] < before[name] for name in before), (before, after)
    saved = json.loads((tmp_path / "state" / "e2e.report.json").read_text())
    assert saved["result"] == "success"
    assert saved["reclaimed_bytes"] == metrics.value(
        "etcd_autodefrag_reclaimed_bytes_total", etcd_cluster="e2e"
    )


def test_child_command_for_the_embedded_default(tmp_path: Path) -> None:
    """Without configured clusters, the child is handed the embedded default as any other cluster,
    with the service's log settings."""
    from exporter.config.settings import default_cluster

    settings = Settings(log_format="json", log_level="debug", executor={"state_dir": tmp_path})
    command = local_executor(settings).child_command(default_cluster())
    assert cluster_from_json(command[command.index("--cluster-json") + 1]) == default_cluster()
    assert command[command.index("--log-format") + 1 :][:3] == ["json", "--log-level", "DEBUG"]


def test_tokens_never_in_logs_or_reprs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    configured = Settings(webhook={"token": TOKEN, "basic_auth_username": "am", "basic_auth_password": TOKEN})
    logging.getLogger("test").info("settings: %r %s", configured, configured.model_dump())
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(configured)


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The executor kind `auto` looks at KUBERNETES_SERVICE_HOST: keep CI pods from changing the tests.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


# --- the kubernetes executor against the fake API server ------------------------------------------

NAMESPACE = "etcd"


def kube_clusters(fleet: Fleet, count: int) -> list[ClusterConfig]:
    return clusters(fleet, count, kubernetes={"namespace": NAMESPACE, "variant": "plain"})


def kube_executor(api: ApiClient, *, dry_run: bool = False) -> KubernetesExecutor:
    return KubernetesExecutor(
        api_client=api,
        image="ghcr.io/etcd-autodefrag/etcd-autodefrag:test",
        cooldown_seconds=3600,
        timeout_seconds=5,
        dry_run=dry_run,
        namespaces=[NAMESPACE],
    )


def job_report(cluster: str, reclaimed: int) -> str:
    members = [MemberReport(name="m1", id="1", endpoint="e", leader=True, reclaimed_bytes=reclaimed)]
    return RunReport(cluster=cluster, result=RunResult.SUCCESS, members=members).summary_json()


async def test_kubernetes_1000_concurrent_posts_for_10_clusters_create_10_jobs(
    fake_kube: FakeKube, kube_api: ApiClient, fleet: Fleet, serve: Serve
) -> None:
    client = await serve(kube_clusters(fleet, 10), kube_executor(kube_api))
    answers = await asyncio.gather(*(post(client, notification(alert(f"c{i % 10}"))) for i in range(1000)))
    assert {status for status, _ in answers} == {200}
    found = [o for _, body in answers for o in outcomes(body)]
    assert found.count("launch") == 10
    assert found.count("skip_already_running") == 990
    assert sorted(name for _, name in fake_kube.jobs) == sorted(f"etcd-autodefrag-c{i}" for i in range(10))
    job = fake_kube.job(NAMESPACE, "etcd-autodefrag-c3")
    annotations = job["metadata"]["annotations"]
    assert annotations["etcd-autodefrag.io/alertname"] == "EtcdDefragRecommended"
    assert annotations["etcd-autodefrag.io/receiver"] == "etcd-autodefrag"
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    metrics = await scrape(client)
    assert sum(metrics.value("etcd_autodefrag_runs_in_flight", etcd_cluster=f"c{i}") for i in range(10)) == 10


async def test_kubernetes_restart_between_posts_creates_no_second_job(
    fake_kube: FakeKube, kube_api: ApiClient, fleet: Fleet, serve: Serve
) -> None:
    first = await serve(kube_clusters(fleet, 1), kube_executor(kube_api))
    assert outcomes((await post(first, notification(alert("c0"))))[1]) == ["launch"]
    fake_kube.start_job(NAMESPACE, "etcd-autodefrag-c0")
    await first.close()

    second = await serve(kube_clusters(fleet, 1), kube_executor(kube_api))
    status, body = await post(second, notification(alert("c0")))
    assert (status, outcomes(body)) == (200, ["skip_already_running"])
    # From the watch's list of running Jobs, or, if the post came first, from the 409 on the name.
    text = reason(body, "skip_already_running")
    assert "in flight since" in text or "already running: Job etcd-autodefrag-c0" in text, text
    assert len(fake_kube.jobs) == 1

    fake_kube.finish_job(NAMESPACE, "etcd-autodefrag-c0", message=job_report("c0", 3 * 1024 * 1024))

    async def recorded() -> bool:
        metrics = await scrape(second)
        return metrics.value("etcd_autodefrag_runs_total", etcd_cluster="c0", result="success") == 1

    await eventually(recorded, timeout=10, what="the Job's end on /metrics")
    metrics = await scrape(second)
    assert metrics.value("etcd_autodefrag_reclaimed_bytes_total", etcd_cluster="c0") == 3 * 1024 * 1024
    # The outcome is an Event on the Job too (the launch's DefragTriggered came from the first service).
    event = await finished_event(fake_kube)
    assert (event["reason"], event["type"]) == ("DefragSucceeded", "Normal")
    assert event["involvedObject"]["name"] == "etcd-autodefrag-c0"
    assert "reclaimed 3.0 MiB" in event["message"]
    assert metrics.value("etcd_autodefrag_runs_in_flight", etcd_cluster="c0") == 0
    # Seen ending: the pure decision already says cooldown, without asking the API.
    assert outcomes((await post(second, notification(alert("c0"))))[1]) == ["skip_cooldown"]
    await second.close()
    # Restarted again: the finished Job (kept for its TTL) says cooldown.
    third = await serve(kube_clusters(fleet, 1), kube_executor(kube_api))
    status, body = await post(third, notification(alert("c0")))
    assert (status, outcomes(body)) == (200, ["skip_cooldown"])
    assert len(fake_kube.jobs) == 1
    # ... and it did not count the run the previous service counted.
    assert (await scrape(third)).value("etcd_autodefrag_runs_total", etcd_cluster="c0", result="success") == 0


async def test_kubernetes_job_failing_without_a_report_counts_job_failed(
    fake_kube: FakeKube, kube_api: ApiClient, fleet: Fleet, serve: Serve
) -> None:
    client = await serve(kube_clusters(fleet, 1), kube_executor(kube_api))
    assert outcomes((await post(client, notification(alert("c0"))))[1]) == ["launch"]
    fake_kube.finish_job(NAMESPACE, "etcd-autodefrag-c0", succeeded=False)

    async def recorded() -> bool:
        metrics = await scrape(client)
        return metrics.value("etcd_autodefrag_runs_total", etcd_cluster="c0", result="job_failed") == 1

    await eventually(recorded, timeout=10, what="runs_total{result='job_failed'}")
    event = await finished_event(fake_kube)
    assert (event["reason"], event["type"]) == ("DefragFailed", "Warning")
    assert event["message"].startswith("job_failed")
    assert "without a report" in event["message"]


async def finished_event(fake_kube: FakeKube) -> dict[str, Any]:
    """The one Event about a finished run the service recorded (not a DefragTriggered one)."""

    def events() -> list[dict[str, Any]]:
        return [e for e in fake_kube.events if e["reason"] in ("DefragSucceeded", "DefragFailed")]

    async def recorded() -> bool:
        return bool(events())

    await eventually(recorded, timeout=10, what="the Event about the finished run")
    (event,) = events()
    return event


@pytest.mark.parametrize(
    ("status", "answer", "outcome"),
    [
        (500, 503, "launch_unavailable"),
        (503, 503, "launch_unavailable"),
        (429, 503, "launch_unavailable"),
        (403, 422, "launch_rejected"),
        (422, 422, "launch_rejected"),
    ],
)
async def test_kubernetes_api_failures_map_to_the_retry_contract(
    fake_kube: FakeKube,
    kube_api: ApiClient,
    fleet: Fleet,
    serve: Serve,
    status: int,
    answer: int,
    outcome: str,
) -> None:
    client = await serve(kube_clusters(fleet, 1), kube_executor(kube_api))
    fake_kube.fail_next(1, status, match="POST /apis/batch/v1/namespaces/etcd/jobs")
    code, body = await post(client, notification(alert("c0")))
    assert (code, outcomes(body)) == (answer, [outcome])
    assert f"Kubernetes API: {status}" in reason(body, outcome)
    assert fake_kube.jobs == {}
    # Alertmanager retries the 503: the retry goes through.
    code, body = await post(client, notification(alert("c0")))
    assert (code, outcomes(body)) == (200, ["launch"])


async def test_kubernetes_unreachable_answers_503(fleet: Fleet, serve: Serve) -> None:
    async with await kube_api_client(host=f"http://127.0.0.1:{free_port()}") as api:
        client = await serve(kube_clusters(fleet, 1), kube_executor(api))
        code, body = await post(client, notification(alert("c0")))
    assert (code, body["status"], outcomes(body)) == (503, "retry", ["launch_unavailable"])


async def test_kubernetes_dry_run_creates_nothing(
    fake_kube: FakeKube,
    kube_api: ApiClient,
    fleet: Fleet,
    serve: Serve,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client = await serve(kube_clusters(fleet, 1), kube_executor(kube_api, dry_run=True))
    code, body = await post(client, notification(alert("c0")))
    assert (code, outcomes(body)) == (200, ["dry_run"])
    assert fake_kube.jobs == {}
    assert "DRY-RUN: would create Job etcd-autodefrag-c0 in namespace etcd" in caplog.text
    # The Job would exist now: what follows waits for its cooldown, as it would for real.
    answers = await asyncio.gather(*(post(client, notification(alert("c0"))) for _ in range(20)))
    assert {(code, tuple(outcomes(body))) for code, body in answers} == {(200, ("skip_cooldown",))}
    assert caplog.text.count("DRY-RUN: would create Job etcd-autodefrag-c0 in namespace etcd") == 1
    assert fake_kube.jobs == {}


async def test_a_cluster_without_a_kubernetes_section_is_rejected(
    fake_kube: FakeKube, kube_api: ApiClient, fleet: Fleet, serve: Serve
) -> None:
    # kube_api before serve: the service (and its Job watch) stops before the API client closes.
    client = await serve(clusters(fleet, 1), kube_executor(kube_api))
    code, body = await post(client, notification(alert("c0")))
    assert (code, outcomes(body)) == (422, ["launch_rejected"])
    assert "no kubernetes section" in reason(body, "launch_rejected")
