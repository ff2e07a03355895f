"""The whole product on one machine, with real components only: `make demo` and tests/test_e2e.py.

`Stack(workdir, options)` starts, on free ports of 127.0.0.1 and with every file under `workdir`:

- a 3-member etcd cluster (tests/etcd_harness.py);
- `etcd-autodefrag serve` with the `local` executor (runs are `etcd-autodefrag defrag` child
  processes, their state in `workdir/state`) and a bearer token for its webhook;
- Alertmanager, with the route and receiver of alerts/alertmanager/alertmanager.yml (same matchers
  and grouping; only the URL, the token file and the timings changed), gossip disabled;
- Prometheus, scraping etcd as `job="kube-etcd"` and the service as `job="etcd-autodefrag"` (the
  selectors the shipped rules use) every second, evaluating a copy of
  alerts/etcd-autodefrag-rules.yaml in which only the `for:` durations are shortened, and sending
  its alerts to that Alertmanager.

Each process logs to `workdir/logs/<name>.log`; `Stack.log_tails()` shows the ends of all of them
when something goes wrong. `Stack.stop()` stops every process the stack started, also a defrag run
still in flight. The shipped files are only read, never changed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from etcd_harness import (  # noqa: E402 - the harness lives with the tests
    NOSPACE_ERROR,
    EtcdBuild,
    EtcdCluster,
    EtcdHarnessError,
    EtcdRequestError,
    free_after_compaction_floor_bytes,
    start_cluster,
    wait_until,
)
from processes import ServerProcess  # noqa: E402 - shared with the tests' servers

SHIPPED_RULES = ROOT / "alerts" / "etcd-autodefrag-rules.yaml"
SHIPPED_ALERTMANAGER = ROOT / "alerts" / "alertmanager" / "alertmanager.yml"
# The receiver of the shipped Alertmanager example that posts to the webhook.
RECEIVER = "etcd-autodefrag"
# Scrape jobs named as the shipped rules select them (alerts/README.md, "Adapting the selectors").
ETCD_JOB = "kube-etcd"
SERVICE_JOB = "etcd-autodefrag"
WEBHOOK_PATH = "/webhook/alertmanager"
LOOPBACK = "127.0.0.1"
MiB = 1024 * 1024
HTTP_TIMEOUT_SECONDS = 5.0
START_TIMEOUT_SECONDS = 60.0
START_ATTEMPTS = 3  # a port handed out by the kernel may be taken before the server binds it
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 20

T = TypeVar("T")


class StackError(RuntimeError):
    """A component of the stack did not start or did not reach the state asked for."""


# What a stack operation raises when something does not work: a component that does not start or
# answer, etcd refusing a request, a wait that timed out. The demo reports these without a traceback.
STACK_ERRORS: tuple[type[Exception], ...] = (StackError, EtcdHarnessError, TimeoutError, OSError)


@dataclass(frozen=True)
class StackOptions:
    """What differs between the demo and the end-to-end scenarios."""

    cluster: str = "demo"
    quota_bytes: int = 512 * MiB
    # `compact: true` in the cluster's configuration: runs compact the history first (the way out
    # of NOSPACE when the history, not the live data, filled the quota).
    compact: bool = False
    # Every `for:` of the shipped rules becomes this (the rules want minutes; a demo has seconds).
    alert_for: str = "5s"
    scrape_interval: str = "1s"
    group_wait: str = "1s"
    group_interval: str = "2s"
    # Alertmanager re-sends a still-firing group this often; the webhook must not launch again.
    repeat_interval: str = "1h"
    # The etcd release to run (tests/etcd_harness.py); None: the installed etcd.
    etcd_build: EtcdBuild | None = None
    cooldown_seconds: float = 3600.0


@dataclass(frozen=True)
class Compaction:
    """What `Stack.compact` removed, and the free space it is sure to leave on every member."""

    revision: int
    superseded_bytes: int  # the old versions of what the stack wrote, removed by this compaction
    free_floor_bytes: int  # etcd_harness.free_after_compaction_floor_bytes


@dataclass
class History:
    """What the stack wrote, for what a compaction is sure to free: no guess at bbolt's allocator."""

    live_value_bytes: dict[str, int] = field(default_factory=dict)  # key -> its latest value's size
    superseded_bytes: int = 0  # old versions' bytes since the last compaction

    def overwrite(self, keys: list[str], value_bytes: int) -> None:
        """Each of `keys` now holds a `value_bytes` value; the one it held before is an old version."""
        for key in keys:
            self.superseded_bytes += self.live_value_bytes.get(key, 0)
            self.live_value_bytes[key] = value_bytes

    def compacted(self, revision: int) -> Compaction:
        """A compaction at `revision` removed every old version so far."""
        compaction = Compaction(
            revision=revision,
            superseded_bytes=self.superseded_bytes,
            free_floor_bytes=free_after_compaction_floor_bytes(
                superseded_bytes=self.superseded_bytes, live_keys=len(self.live_value_bytes)
            ),
        )
        self.superseded_bytes = 0
        return compaction


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def demo_rules(shipped: str, alert_for: str) -> str:
    """The shipped rule file with every `for:` set to `alert_for`; everything else as shipped."""
    document = yaml.safe_load(shipped)
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = alert_for
    return yaml.safe_dump(document, sort_keys=False, width=1000)


def alertmanager_config(
    shipped: str,
    *,
    webhook_url: str,
    token_file: Path,
    group_wait: str,
    group_interval: str,
    repeat_interval: str,
) -> dict[str, Any]:
    """The shipped Alertmanager example pointed at our webhook, with the demo's timings."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(shipped))
    route = next(r for r in config["route"]["routes"] if r["receiver"] == RECEIVER)
    route.update(group_wait=group_wait, group_interval=group_interval, repeat_interval=repeat_interval)
    receiver = next(r for r in config["receivers"] if r["name"] == RECEIVER)
    (hook,) = receiver["webhook_configs"]
    hook["url"] = webhook_url
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    return config


@dataclass(frozen=True)
class Samples:
    """One scrape of a /metrics page: (name, labels, value) triples."""

    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Samples:
        return cls(
            tuple(
                (s.name, dict(s.labels), s.value)
                for family in text_string_to_metric_families(text)
                for s in family.samples
            )
        )

    def select(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """The samples of `name` whose labels include `labels`."""
        return [
            (sample_labels, value)
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """The sum over the matching samples (0 when there are none)."""
        return sum(value for _, value in self.select(name, **labels))

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one matching sample; None when there is none."""
        found = self.select(name, **labels)
        if len(found) > 1:
            raise ValueError(f"{len(found)} samples of {name} match {labels}")
        return found[0][1] if found else None

    def by_member(self, name: str, **labels: str) -> dict[str, float]:
        """member label -> value."""
        return {sample_labels["member"]: value for sample_labels, value in self.select(name, **labels)}


class LogFollower:
    """Reads the JSON lines a process appends to its log, each line once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_records(self) -> list[dict[str, Any]]:
        """Records logged since the last call (lines that are not JSON objects are skipped)."""
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class _Http:
    """GET and POST on loopback, never through a proxy."""

    def __init__(self) -> None:
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, url: str) -> bytes:
        with self._opener.open(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            body: bytes = response.read()
            return body

    def get_json(self, url: str) -> Any:
        return json.loads(self.get(url))

    def ok(self, url: str) -> bool:
        try:
            self.get(url)
        except OSError:  # urllib's HTTPError and URLError included
            return False
        return True


class Stack:
    """etcd, etcd-autodefrag, Alertmanager and Prometheus; `start()` brings all up, `stop()` down.

    Use as a context manager, or call `stop()` in a `finally`. The parts can be started one by one
    (`start_etcd`, `start_service`, `start_alertmanager`, `start_prometheus`, in this order) by a
    caller that narrates between them.
    """

    def __init__(self, workdir: Path, options: StackOptions | None = None) -> None:
        self.workdir = workdir
        self.options = options or StackOptions()
        self.cluster = self.options.cluster
        self.etcd: EtcdCluster | None = None
        self.processes: dict[str, ServerProcess] = {}
        self.urls: dict[str, str] = {}
        self.token_file = workdir / "webhook-token"
        self.state_dir = workdir / "state"
        self.config_file = workdir / "etcd-autodefrag.yaml"
        self.rules_file = workdir / "prometheus" / "etcd-autodefrag-rules.yaml"
        self._http = _Http()
        self.history = History()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- starting -------------------------------------------------------------------------------

    def start(self) -> Stack:
        """Start every part and wait until Prometheus scrapes all targets and knows Alertmanager."""
        self.start_etcd()
        self.start_service()
        self.start_alertmanager()
        self.start_prometheus()
        return self

    def start_etcd(self) -> EtcdCluster:
        """A 3-member cluster with the options' quota."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.etcd = start_cluster(
            self.workdir / "etcd", quota_bytes=self.options.quota_bytes, build=self.options.etcd_build
        )
        return self.etcd

    def start_service(self) -> str:
        """`etcd-autodefrag serve` (local executor, webhook token); returns its URL once ready."""
        etcd = self._etcd()
        self.token_file.write_text(secrets.token_urlsafe(32) + "\n")
        self.token_file.chmod(0o600)
        (self.workdir / "locks").mkdir(exist_ok=True)
        # The service's environment without ETCD_AUTODEFRAG_* from the caller's shell, which would
        # override the generated configuration; the engine's host lock goes under workdir too.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_AUTODEFRAG_")}
        env["ETCD_AUTODEFRAG_LOCK_DIR"] = str(self.workdir / "locks")

        def command(port: int) -> list[str]:
            config = {
                # JSON lines, so that the demo and the tests can follow what the service and its
                # defrag runs (whose stderr goes to the same log) do.
                "log_format": "json",
                "listen_address": f"{LOOPBACK}:{port}",
                # Below Prometheus's scrape timeout (= the 1 s scrape interval).
                "scrape_budget_seconds": 0.8,
                "webhook": {"token_file": str(self.token_file)},
                "executor": {
                    "kind": "local",
                    "state_dir": str(self.state_dir),
                    "cooldown_seconds": self.options.cooldown_seconds,
                },
                "clusters": [
                    {
                        "name": self.cluster,
                        "endpoints": etcd.endpoints,
                        "compact": self.options.compact,
                        "settle_seconds": 0,
                    }
                ],
            }
            self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            return [sys.executable, "-m", "exporter", "serve", "--config", str(self.config_file)]

        return self._start_server("etcd-autodefrag", command, "/readyz", env=env)

    def start_alertmanager(self) -> str:
        """Alertmanager with the shipped route and receiver, posting to the service's webhook."""
        directory = self.workdir / "alertmanager"
        directory.mkdir(parents=True, exist_ok=True)
        config = alertmanager_config(
            SHIPPED_ALERTMANAGER.read_text(),
            webhook_url=self.urls["etcd-autodefrag"] + WEBHOOK_PATH,
            token_file=self.token_file,
            group_wait=self.options.group_wait,
            group_interval=self.options.group_interval,
            repeat_interval=self.options.repeat_interval,
        )
        (directory / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        binary = _binary("prometheus-alertmanager", "alertmanager")

        def command(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={directory / 'alertmanager.yml'}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--cluster.listen-address=",  # no gossip: a single instance, no port for peers
            ]

        return self._start_server("alertmanager", command, "/-/ready")

    def start_prometheus(self) -> str:
        """Prometheus with the demo copy of the rules; waits until every target is up."""
        etcd = self._etcd()
        directory = self.rules_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        self.rules_file.write_text(demo_rules(SHIPPED_RULES.read_text(), self.options.alert_for))
        interval = self.options.scrape_interval
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(self.rules_file)],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [_host_port(self.urls["alertmanager"])]}]}]
            },
            "scrape_configs": [
                {
                    "job_name": SERVICE_JOB,
                    "static_configs": [{"targets": [_host_port(self.urls["etcd-autodefrag"])]}],
                },
                {
                    "job_name": ETCD_JOB,
                    # The label added at scrape time, as docs/runbook.md ("Routing alerts to the
                    # webhook") suggests, so that alerts from etcd's own metrics route too.
                    "static_configs": [
                        {
                            "targets": [_host_port(url) for url in etcd.endpoints],
                            "labels": {"etcd_cluster": self.cluster},
                        }
                    ],
                },
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        binary = _binary("prometheus")

        def command(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
            ]

        url = self._start_server("prometheus", command, "/-/ready")
        targets = 1 + len(etcd.endpoints)
        self.wait(
            lambda: len([v for _, v in self.query("up") if v == 1]) == targets,
            timeout=START_TIMEOUT_SECONDS,
            what=f"Prometheus to scrape all {targets} targets successfully",
        )
        self.wait(
            lambda: self._http.get_json(f"{url}/api/v1/alertmanagers")["data"]["activeAlertmanagers"],
            timeout=START_TIMEOUT_SECONDS,
            what="Prometheus to know its Alertmanager",
        )
        return url

    def _start_server(
        self,
        name: str,
        command: Callable[[int], list[str]],
        ready_path: str,
        *,
        env: dict[str, str] | None = None,
    ) -> str:
        for attempt in range(START_ATTEMPTS):
            port = free_port()
            url = f"http://{LOOPBACK}:{port}"
            process = ServerProcess(
                name,
                command(port),
                self.workdir / "logs" / f"{name}.log",
                env,
                own_session=True,
                death_signal=signal.SIGTERM,
                stop_timeout_seconds=STOP_TIMEOUT_SECONDS,
            )
            self.processes[name] = process
            process.start()

            def ready(process: ServerProcess = process, url: str = url) -> bool:
                if process.exit_code is not None:
                    raise StackError(f"{name} exited with code {process.exit_code}\n{process.tail()}")
                return self._http.ok(url + ready_path)

            try:
                wait_until(ready, timeout=START_TIMEOUT_SECONDS, what=f"{name} at {url}{ready_path}")
            except StackError:
                if attempt + 1 < START_ATTEMPTS and "address already in use" in process.tail():
                    continue  # another process took the port between our probe and its bind
                raise
            except TimeoutError as error:
                raise StackError(f"{error}\n{process.tail()}") from None
            self.urls[name] = url
            return url
        raise AssertionError("unreachable")

    # --- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process the stack started, a defrag run in flight included. Safe to call twice."""
        for process in reversed(list(self.processes.values())):
            process.stop()
        self._stop_defrag_run()
        if self.etcd is not None:
            self.etcd.stop()

    def _stop_defrag_run(self) -> None:
        """A defrag child outlives its service by design (its own session): stop it by its pid."""
        state = self.run_state()
        pid = int(state.get("pid") or 0) if state and not state.get("finished_at") else 0
        if not pid:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return  # already gone
        if b"defrag" not in cmdline or str(self.config_file).encode() not in cmdline:
            return  # the pid was reused by some other process
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    # --- looking -------------------------------------------------------------------------------

    def _etcd(self) -> EtcdCluster:
        if self.etcd is None:
            raise StackError("etcd is not started")
        return self.etcd

    @property
    def service_url(self) -> str:
        return self.urls["etcd-autodefrag"]

    @property
    def prometheus_url(self) -> str:
        return self.urls["prometheus"]

    @property
    def alertmanager_url(self) -> str:
        return self.urls["alertmanager"]

    def log_tails(self) -> str:
        """The last lines of every log, etcd's included, for failure messages."""
        tails = [p.tail() for p in self.processes.values()]
        if self.etcd is not None:
            tails.append(self.etcd.log_tails())
        return "\n".join(tails)

    def wait(self, predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """`wait_until` (HTTP errors count as "not yet") with every log's tail in the TimeoutError."""
        try:
            result = wait_until(
                predicate,
                timeout=timeout,
                what=what,
                interval=0.2,
                ignore=(OSError, EtcdRequestError),  # OSError includes urllib's HTTPError
            )
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.log_tails()}") from None
        assert result is not None  # wait_until returns only truthy results
        return result

    def wait_metrics(self, condition: Callable[[Samples], bool], *, timeout: float, what: str) -> Samples:
        """The first scrape of the service's /metrics that satisfies `condition`."""

        def scrape() -> Samples | None:
            metrics = self.service_metrics()
            return metrics if condition(metrics) else None

        return self.wait(scrape, timeout=timeout, what=what)

    def service_metrics(self) -> Samples:
        """A scrape of the service's /metrics."""
        return Samples.parse(self._http.get(f"{self.service_url}/metrics").decode())

    def alertmanager_metrics(self) -> Samples:
        """A scrape of Alertmanager's own /metrics."""
        return Samples.parse(self._http.get(f"{self.alertmanager_url}/metrics").decode())

    def webhook_notifications(self) -> tuple[float, float]:
        """(sent, failed): notifications Alertmanager has posted to the webhook so far."""
        metrics = self.alertmanager_metrics()
        return (
            metrics.total("alertmanager_notifications_total", integration="webhook"),
            metrics.total("alertmanager_notifications_failed_total", integration="webhook"),
        )

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) per series."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        result = self._http.get_json(url)["data"]["result"]
        return [(series["metric"], float(series["value"][1])) for series in result]

    def prometheus_alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts as Prometheus reports them."""
        alerts: list[dict[str, Any]] = self._http.get_json(f"{self.prometheus_url}/api/v1/alerts")["data"][
            "alerts"
        ]
        return alerts

    def alert_state(self, name: str) -> str | None:
        """ "pending" or "firing" for this cluster's alert `name`; None when inactive."""
        for alert in self.prometheus_alerts():
            labels = alert["labels"]
            if labels.get("alertname") == name and labels.get("etcd_cluster") == self.cluster:
                return str(alert["state"])
        return None

    def prometheus_rules(self) -> list[dict[str, Any]]:
        """The alerting rules Prometheus has loaded."""
        groups = self._http.get_json(f"{self.prometheus_url}/api/v1/rules?type=alert")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds (API v2)."""
        alerts: list[dict[str, Any]] = self._http.get_json(f"{self.alertmanager_url}/api/v2/alerts")
        return alerts

    def run_state(self) -> dict[str, Any] | None:
        """The local executor's state file of the cluster (start, end, result, pid), if any."""
        return _read_json(self.state_dir / f"{self.cluster}.json")

    def run_report(self) -> dict[str, Any] | None:
        """The last run's JSON report (`defrag --output json`), once the run has ended."""
        return _read_json(self.state_dir / f"{self.cluster}.report.json")

    def service_log(self) -> LogFollower:
        """A follower of the service's log (its defrag runs log there too), from the beginning."""
        return LogFollower(self.processes["etcd-autodefrag"].log_path)

    # --- workload -------------------------------------------------------------------------------

    def write_history(
        self,
        total_bytes: int,
        *,
        keys: int = 100,
        value_size: int = 100 * 1024,
        on_progress: Callable[[int], None] | None = None,
        progress_every_bytes: int = 32 * MiB,
    ) -> int:
        """Overwrite the same `keys` keys until `total_bytes` are written; returns the bytes written.

        etcd keeps every superseded value until the history is compacted, so the database files
        grow by about what is written, while the live data stays at `keys * value_size`.
        """
        written = 0
        next_progress = progress_every_bytes
        round_index = 0
        while written < total_bytes:
            value = round_index.to_bytes(4, "big") * (value_size // 4)
            self._put_objects(keys, value)
            written += keys * len(value)
            round_index += 1
            if on_progress is not None and (written >= next_progress or written >= total_bytes):
                on_progress(written)
                next_progress += progress_every_bytes
        return written

    def _put_objects(self, keys: int, value: bytes) -> None:
        """Overwrite the `keys` demo objects with `value`, and say so in the history."""
        names = [f"/demo/objects/{i:05d}" for i in range(keys)]
        self._etcd().put_many((name, value) for name in names)
        self.history.overwrite(names, len(value))

    def compact(self) -> Compaction:
        """Compact the history up to the current revision (as kube-apiserver does every 5 minutes)."""
        etcd = self._etcd()
        revision = etcd.revision()
        etcd.compact(revision)
        return self.history.compacted(revision)

    def wait_free_everywhere(self, min_free_bytes: int, *, timeout: float = 30.0) -> dict[str, int]:
        """Until every member shows at least `min_free_bytes` free; member -> free bytes.

        Wait for a `Compaction.free_floor_bytes`, never for more: what a member shows above it
        depends on bbolt's allocator, not on the data.
        """
        etcd = self._etcd()
        return self.wait(
            lambda: etcd.free_everywhere(min_free_bytes),
            timeout=timeout,
            what=f"{min_free_bytes} free bytes on every member",
        )

    def overwrite_until_nospace(
        self, *, keys: int = 16, value_size: int = 256 * 1024, max_rounds: int = 1000
    ) -> int:
        """Overwrite the same keys until etcd refuses with NOSPACE; returns the rounds written.

        The live data stays at `keys * value_size`: it is the uncompacted history that fills the
        quota, so compaction and defragmentation can recover from it.
        """
        etcd = self._etcd()
        for round_index in range(max_rounds):
            value = round_index.to_bytes(4, "big") * (value_size // 4)
            try:
                self._put_objects(keys, value)
            except EtcdRequestError as error:
                if NOSPACE_ERROR not in error.message:
                    raise
                self.wait(
                    lambda: any(a.get("alarm") == "NOSPACE" for a in etcd.alarms()),
                    timeout=10,
                    what="the NOSPACE alarm to be listed",
                )
                return round_index
        raise StackError(f"{max_rounds} rounds did not fill the {self.options.quota_bytes}-byte quota")


def _binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise StackError(
        f"{' or '.join(names)} not found on PATH: install Debian's prometheus and "
        "prometheus-alertmanager (`make demo` and `make test` do)"
    )


def _host_port(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in reversed(text.strip().splitlines()):  # the report is the last JSON line
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                return data
    return None
