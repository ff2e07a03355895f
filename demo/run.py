"""`make demo`: an etcd cluster fragments, Prometheus fires the alert, the webhook defragments it.

Everything is real and runs on 127.0.0.1, on free ports, in one temporary directory
(demo/stack.py): a 3-member etcd cluster, `etcd-autodefrag serve` with the local executor,
Alertmanager with the shipped route and receiver, Prometheus with the shipped alert rules (only their
`for:` shortened from minutes to seconds). The demo writes, overwrites and compacts until the rule
selects every member, then narrates what follows on its own: the alert firing, Alertmanager calling
the webhook, each member defragmented (leader last), the gauges falling, the alert resolving.

`--keep` (or KEEP=1) leaves everything running until Ctrl-C. Otherwise, and on failure, Ctrl-C or
SIGTERM, every process the demo started is stopped and its directory removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from stack import STACK_ERRORS, MiB, Samples, Stack, StackError, StackOptions

from exporter.core.units import human_bytes

ALERT = "EtcdDefragRecommended"
# The shipped alert and the default rule want at least 100 MiB to give back on a member; large
# values write that much history fastest (~8 MiB/s here, with 16 MiB of live data).
KEYS = 32
VALUE_BYTES = 512 * 1024
# Round 1 stays below the floor on purpose (its files hold about 60 MiB, 16 MiB of them live). Round
# 2's compaction removes 112 MiB of old versions (its own 96 MiB and round 1's last 16 MiB), so every
# member shows over 111 MiB free, whatever bbolt's allocator did (Stack.compact says how much for
# sure; tests/test_e2e.py checks that it clears the floor). Multiples of 16 MiB.
ROUNDS_BYTES = (48 * MiB, 112 * MiB)
FLOOR_BYTES = 100 * MiB  # EtcdDefragRecommended and the default thresholds (docs/rules.md)
# Generous for a busy 2-CPU machine; the whole demo takes about a minute.
ALERT_TIMEOUT_SECONDS = 60.0
RUN_TIMEOUT_SECONDS = 120.0
RESOLVE_TIMEOUT_SECONDS = 60.0
# The service's log (its defrag runs log there too): the engine's progress lines are the story;
# of the webhook's and the executor's, only trouble (their launches are told from the counters).
ENGINE_LOGGER = "exporter.defrag.engine"
OTHER_LOGGERS = {
    "exporter.service.webhook": "webhook",
    "exporter.launch.executor": "executor",
    "exporter.launch.local": "executor",
    "exporter.launch.kubernetes": "executor",
    "exporter.service.app": "service",
}
WEBHOOK_OUTCOMES = {
    "launch": "the service started a defrag run",
    "skip_resolved": "a resolved alert, acknowledged: nothing to do",
    "skip_already_running": "a run is already going: nothing launched",
    "skip_cooldown": "the cluster cools down after its run: nothing launched",
}


class Narrator:
    """Prints what happens, each line with the wall-clock time."""

    def __init__(self) -> None:
        self.bold = sys.stdout.isatty()

    def say(self, text: str, *, at: float | None = None) -> None:
        """One line, stamped with `at` (Unix time) or now."""
        stamp = time.strftime("%H:%M:%S", time.localtime(at))
        print(f"\033[1m{stamp} {text}\033[0m" if self.bold else f"{stamp} {text}", flush=True)

    def detail(self, text: str) -> None:
        print(f"         {text}", flush=True)


def show_members(out: Narrator, metrics: Samples, cluster: str) -> None:
    """A table of the service's gauges for the cluster, one line per member."""
    sizes = metrics.by_member("etcd_autodefrag_db_size_bytes", etcd_cluster=cluster)
    in_use = metrics.by_member("etcd_autodefrag_db_size_in_use_bytes", etcd_cluster=cluster)
    free = metrics.by_member("etcd_autodefrag_db_free_bytes", etcd_cluster=cluster)
    ratio = metrics.by_member("etcd_autodefrag_db_fragmentation_ratio", etcd_cluster=cluster)
    leader = metrics.by_member("etcd_autodefrag_member_is_leader", etcd_cluster=cluster)
    recommended = metrics.by_member("etcd_autodefrag_defrag_recommended", etcd_cluster=cluster)
    out.detail(f"{'MEMBER':<16}{'FILE SIZE':>11}{'IN USE':>11}{'FREE':>11}{'FRAGMENTED':>12}  DEFRAG?")
    for member in sorted(sizes):
        name = member + (" (leader)" if leader.get(member) else "")
        out.detail(
            f"{name:<16}{human_bytes(sizes[member]):>11}{human_bytes(in_use.get(member, 0)):>11}"
            f"{human_bytes(free.get(member, 0)):>11}{ratio.get(member, 0):>12.0%}  "
            f"{'yes' if recommended.get(member) else 'no'}"
        )


def start(stack: Stack, out: Narrator) -> None:
    out.say(f"Starting the demo stack in {stack.workdir} (127.0.0.1 only, free ports)")
    etcd = stack.start_etcd()
    out.detail(
        f"etcd: 3 members, quota {human_bytes(stack.options.quota_bytes)} each: {', '.join(etcd.endpoints)}"
    )
    stack.start_service()
    out.detail(
        f"etcd-autodefrag serve: {stack.service_url} (local executor; the webhook wants a bearer token)"
    )
    stack.start_alertmanager()
    out.detail(
        f"Alertmanager: {stack.alertmanager_url}, routing EtcdDefragRecommended, EtcdNoSpaceAlarm and "
        "EtcdQuotaUsageCritical to the webhook (alerts/alertmanager/alertmanager.yml)"
    )
    stack.start_prometheus()
    out.detail(
        f"Prometheus: {stack.prometheus_url}, scraping the 3 members and the service every "
        f"{stack.options.scrape_interval}, with alerts/etcd-autodefrag-rules.yaml (for the demo only, "
        f"every `for:` is {stack.options.alert_for} instead of minutes)"
    )


def fragment(stack: Stack, out: Narrator) -> None:
    """Write, overwrite and compact, in ever larger rounds, until the rule selects every member."""
    out.say("The cluster now:")
    show_members(out, stack.service_metrics(), stack.cluster)
    for round_number, total in enumerate(ROUNDS_BYTES, 1):
        out.say(
            f"Round {round_number}: overwriting {KEYS} keys of {human_bytes(VALUE_BYTES)} until "
            f"{human_bytes(total)} are written; etcd keeps every old version until the history is compacted"
            + ("" if round_number == 1 else ", and fills the pages the last compaction freed first")
        )

        def progress(written: int) -> None:
            sizes = stack.service_metrics().by_member(
                "etcd_autodefrag_db_size_bytes", etcd_cluster=stack.cluster
            )
            out.detail(
                f"{human_bytes(written)} written; database files now "
                + ", ".join(human_bytes(size) for size in sizes.values())
            )

        stack.write_history(
            total, keys=KEYS, value_size=VALUE_BYTES, on_progress=progress, progress_every_bytes=32 * MiB
        )
        compaction = stack.compact()
        out.say(
            f"Compacted the history up to revision {compaction.revision} (kube-apiserver does this every "
            "5 minutes): the old versions' pages are free now, but the files do not shrink"
        )
        # Wait for what the data guarantees: the free space a member shows beyond it is bbolt's
        # allocator at work, different per member and per run.
        stack.wait_free_everywhere(compaction.free_floor_bytes)
        metrics = stack.wait_metrics(
            lambda m: _settled(stack, m),
            timeout=30,
            what="the service's gauges to show the compaction",
        )
        show_members(out, metrics, stack.cluster)
        free = metrics.by_member("etcd_autodefrag_db_free_bytes", etcd_cluster=stack.cluster)
        recommended = metrics.by_member("etcd_autodefrag_defrag_recommended", etcd_cluster=stack.cluster)
        if recommended and all(recommended.values()):
            out.say(
                f"The rule now selects all {len(recommended)} members: each has at least "
                f"{human_bytes(FLOOR_BYTES)} to give "
                "back and is more than half free"
            )
            return
        out.detail(
            f"Not worth a defrag yet: the rule wants at least {human_bytes(FLOOR_BYTES)} to reclaim "
            f"on a member (the most now: {human_bytes(max(free.values()))}); writing more"
        )
    raise StackError(f"{len(ROUNDS_BYTES)} rounds did not make every member worth a defrag")


def _settled(stack: Stack, metrics: Samples) -> bool:
    """Whether every member's free bytes in this scrape match what etcd reports now."""
    etcd = stack.etcd
    assert etcd is not None
    free = metrics.by_member("etcd_autodefrag_db_free_bytes", etcd_cluster=stack.cluster)
    expected = {
        name: int(s.get("dbSize", 0)) - int(s.get("dbSizeInUse", 0)) for name, s in etcd.statuses().items()
    }
    return free == {k: float(v) for k, v in expected.items()}


@dataclass
class Follower:
    """Notices, one poll at a time, what the stack does on its own, and narrates it."""

    stack: Stack
    out: Narrator
    alert_state: str | None = None
    fired_at: float | None = None
    resolved_at: float | None = None
    outcomes: dict[str, float] = field(default_factory=dict)
    run_result: str | None = None
    run_finished_at: float | None = None
    held: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log = self.stack.service_log()
        self.log.new_records()  # start-up lines are not news

    def poll(self) -> None:
        """Narrate what changed since the last poll, in the order it happened."""
        # Log lines were written before this poll looks at anything else, so they go first; but a
        # run's lines wait until the webhook call that launched it has been told.
        self.held += self.log.new_records()
        self._log_lines()
        self._run()
        self._alert()
        calls = self._webhook_calls()
        if calls:
            # Alertmanager may have posted a resolution that Prometheus made after the look above.
            self._alert()
        for call in calls:
            self.out.say(call)
        self._log_lines()

    def _alert(self) -> None:
        state, value = None, 0.0
        for alert in self.stack.prometheus_alerts():
            labels = alert["labels"]
            if labels.get("alertname") == ALERT and labels.get("etcd_cluster") == self.stack.cluster:
                state, value = str(alert["state"]), float(alert["value"])
        if state == self.alert_state:
            return
        if state == "pending":
            self.out.say(f"Prometheus: {ALERT} is pending (it must hold for {self.stack.options.alert_for})")
        elif state == "firing":
            self.fired_at = time.monotonic()
            self.out.say(
                f"Prometheus: {ALERT} is FIRING: the most fragmented member would give back "
                + human_bytes(value)
            )
        elif self.alert_state == "firing":
            self.resolved_at = time.monotonic()
            # The run writes its report as it ends; the executor's state says so only once the service
            # has noticed the child's exit, and Prometheus may resolve the alert in between.
            ended = self.run_result is not None or self.stack.run_report() is not None
            why = (
                "no member is worth a defrag any more"
                if ended
                else "the members done have nothing left to give back, and the one being defragmented "
                "does not answer meanwhile, so its gauges are missing for that moment"
            )
            self.out.say(f"Prometheus: {ALERT} is resolved: {why}")
        self.alert_state = state

    def _log_lines(self) -> None:
        launched = bool(self.outcomes.get("launch"))
        waiting = []
        for record in self.held:
            logger, level = str(record.get("logger")), record.get("level")
            if logger == ENGINE_LOGGER and not launched:
                waiting.append(record)
            elif logger == ENGINE_LOGGER and level in ("info", "warning", "error"):
                self.out.say(f"run: {record.get('message')}", at=_record_time(record))
            elif logger in OTHER_LOGGERS and level in ("warning", "error"):
                self.out.say(
                    f"{OTHER_LOGGERS[logger]}: {level}: {record.get('message')}", at=_record_time(record)
                )
        self.held = waiting

    def _webhook_calls(self) -> list[str]:
        """What the webhook did since the last poll, one line per outcome, from its counters."""
        calls = []
        if failed := self.stack.webhook_notifications()[1]:
            raise StackError(f"Alertmanager failed to post to the webhook {failed:g} times")
        metrics = self.stack.service_metrics()
        for labels, value in metrics.select("etcd_autodefrag_alerts_total"):
            outcome = labels["outcome"]
            if value > self.outcomes.get(outcome, 0):
                count = value - self.outcomes.get(outcome, 0)
                meaning = WEBHOOK_OUTCOMES.get(outcome, "see docs/webhook.md")
                if outcome == "launch" and (state := self.stack.run_state()):
                    meaning += (
                        f", `etcd-autodefrag defrag --cluster {self.stack.cluster}` (pid {state['pid']})"
                    )
                calls.append(
                    "Alertmanager called the webhook (POST /webhook/alertmanager, bearer token): "
                    f"{count:g} alert(s) -> {outcome}: {meaning}"
                )
                self.outcomes[outcome] = value
        return calls

    def _run(self) -> None:
        if self.run_result is not None:
            return
        state = self.stack.run_state()
        if state and state.get("finished_at"):
            self.run_result = str(state.get("result"))
            self.run_finished_at = time.monotonic()

    def until(self, condition: Any, *, timeout: float, what: str) -> None:
        """Poll (narrating) until `condition()` holds."""

        def check() -> bool:
            self.poll()
            return bool(condition())

        self.stack.wait(check, timeout=timeout, what=what)


def _record_time(record: dict[str, Any]) -> float | None:
    """When a JSON log line was written (exporter/logs.py writes UTC with a Z)."""
    try:
        return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def follow(stack: Stack, out: Narrator) -> tuple[Follower, dict[str, Any], Samples]:
    """From the alert to its resolution; returns the follower, the run's report and the gauges after."""
    follower = Follower(stack, out)
    follower.until(lambda: follower.fired_at, timeout=ALERT_TIMEOUT_SECONDS, what=f"{ALERT} to fire")
    follower.until(lambda: follower.run_result, timeout=RUN_TIMEOUT_SECONDS, what="the defrag run to end")
    report = stack.run_report()
    if follower.run_result != "success" or report is None:
        raise StackError(f"the defrag run ended with {follower.run_result!r}, not success")
    metrics = stack.wait_metrics(
        lambda m: m.value("etcd_autodefrag_cluster_defrag_recommended", etcd_cluster=stack.cluster) == 0,
        timeout=30,
        what="the gauges to show the defrag",
    )
    out.say("The gauges after the run:")
    show_members(out, metrics, stack.cluster)
    follower.until(
        lambda: follower.resolved_at and follower.outcomes.get("skip_resolved"),
        timeout=RESOLVE_TIMEOUT_SECONDS,
        what=f"{ALERT} to resolve and Alertmanager to send the resolved notification",
    )
    return follower, report, metrics


def summary(
    stack: Stack, out: Narrator, follower: Follower, report: dict[str, Any], *, began: float, keep: bool
) -> None:
    members = report["members"]
    order = " -> ".join(m["name"] + (" (leader)" if m["leader"] else "") for m in members)
    assert follower.fired_at is not None
    assert follower.run_finished_at is not None
    out.say("Summary")
    out.detail(
        f"reclaimed {human_bytes(report['reclaimed_bytes'])} on {len(members)} members, in order {order}"
    )
    out.detail(
        f"from the alert firing to the run's end: {follower.run_finished_at - follower.fired_at:.1f}s "
        f"(the run itself: {report['duration_seconds']:.1f}s); "
        f"the whole demo: {time.monotonic() - began:.0f}s"
    )
    metrics = stack.service_metrics()
    runs = metrics.total("etcd_autodefrag_runs_total", etcd_cluster=stack.cluster)
    alerts = ", ".join(f"{count:g} {outcome}" for outcome, count in follower.outcomes.items())
    out.detail(f"runs: {runs:g} (etcd_autodefrag_runs_total); alerts at the webhook: {alerts}")
    graph = f"{stack.prometheus_url}/graph?g0.expr=etcd_autodefrag_db_size_bytes&g0.range_input=5m"
    if keep:
        out.detail(f"Prometheus: the alert at {stack.prometheus_url}/alerts, the sizes at {graph}")
    else:
        out.detail(
            "Prometheus: run `make demo KEEP=1` to keep the stack up and open the URLs it prints "
            "(the alerts page, the sizes graph); this run stops everything now"
        )


def keep_running(stack: Stack, out: Narrator) -> None:
    assert stack.etcd is not None
    out.say(f"KEEP: everything stays up until Ctrl-C (or kill {os.getpid()}):")
    out.detail(f"Prometheus    {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)")
    out.detail(f"Alertmanager  {stack.alertmanager_url}")
    out.detail(f"the service   {stack.service_url}/metrics")
    out.detail(f"etcd          {','.join(stack.etcd.endpoints)}")
    out.detail(
        f"e.g.  .venv/bin/etcd-autodefrag status --endpoints {stack.etcd.endpoints[0]}   "
        f"(logs in {stack.workdir / 'logs'})"
    )
    while True:
        signal.pause()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--keep",
        action="store_true",
        default=os.environ.get("KEEP", "") not in ("", "0"),
        help="leave everything running until Ctrl-C (default: KEEP=1 in the environment)",
    )
    args = parser.parse_args(argv)
    # Also SIGINT: a shell starts background jobs with it ignored, which would make Python ignore it too.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    out = Narrator()
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="etcd-autodefrag-demo-"))
    stack = Stack(workdir, StackOptions(quota_bytes=512 * MiB))
    done = False
    try:
        start(stack, out)
        fragment(stack, out)
        follower, report, _ = follow(stack, out)
        summary(stack, out, follower, report, began=began, keep=args.keep)
        done = True
        if args.keep:
            keep_running(stack, out)
        return 0
    except KeyboardInterrupt:
        print(flush=True)
        out.say("Stopping, as asked" if done else "Interrupted")
        return 0 if done else 130
    except STACK_ERRORS as error:
        out.say(f"The demo failed: {error}")
        if "--- " not in str(error):  # Stack.wait's timeouts carry the log tails already
            print(stack.log_tails(), flush=True)
        return 1
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        out.say("Stopped every process the demo started and removed its files")


if __name__ == "__main__":
    sys.exit(main())
