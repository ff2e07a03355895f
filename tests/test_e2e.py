"""End to end, as `make demo` runs it: a shipped alert fires in Prometheus, Alertmanager posts it to the
webhook, and exactly one safe defrag run follows.

The stack is demo/stack.py: a real 3-member etcd cluster, `etcd-autodefrag serve` with the local
executor and a bearer token, Alertmanager with the shipped route and receiver, Prometheus with the
shipped rules (only `for:` shortened). Every step waits for a condition, with a timeout whose
message carries the tails of every log.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_harness import NOSPACE_ERROR, EtcdBuild, EtcdRequestError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demo"))
# demo/ is not a package: its directory goes on the path, as tests/ does for etcd_harness.
from stack import (
    RECEIVER,
    SHIPPED_ALERTMANAGER,
    SHIPPED_RULES,
    History,
    LogFollower,
    MiB,
    Samples,
    Stack,
    StackOptions,
    alertmanager_config,
    demo_rules,
)

DB_SIZE = "etcd_autodefrag_db_size_bytes"
FREE = "etcd_autodefrag_db_free_bytes"
RECOMMENDED = "etcd_autodefrag_defrag_recommended"
CLUSTER_RECOMMENDED = "etcd_autodefrag_cluster_defrag_recommended"
RUNS = "etcd_autodefrag_runs_total"
ALERTS = "etcd_autodefrag_alerts_total"
NOSPACE_ACTIVE = "etcd_autodefrag_alarm_active"
FLOOR_BYTES = 100 * MiB  # EtcdDefragRecommended's floor and the default thresholds' min_free_bytes
# Generous for a busy 2-CPU CI machine; a scenario takes 20-45 s here.
ALERT_TIMEOUT = 60.0
RUN_TIMEOUT = 90.0


def shipped_alert_names() -> set[str]:
    document = yaml.safe_load(SHIPPED_RULES.read_text())
    return {rule["alert"] for group in document["groups"] for rule in group["rules"]}


def test_demo_rules_change_only_the_for_durations() -> None:
    shipped = yaml.safe_load(SHIPPED_RULES.read_text())
    changed = yaml.safe_load(demo_rules(SHIPPED_RULES.read_text(), "7s"))
    for shipped_group, group in zip(shipped["groups"], changed["groups"], strict=True):
        for shipped_rule, rule in zip(shipped_group["rules"], group["rules"], strict=True):
            assert rule.get("for") == ("7s" if "for" in shipped_rule else None)
            assert {k: v for k, v in rule.items() if k != "for"} == {
                k: v for k, v in shipped_rule.items() if k != "for"
            }


def test_demo_alertmanager_keeps_the_shipped_route(tmp_path: Path) -> None:
    shipped = yaml.safe_load(SHIPPED_ALERTMANAGER.read_text())
    config = alertmanager_config(
        SHIPPED_ALERTMANAGER.read_text(),
        webhook_url="http://127.0.0.1:1/webhook/alertmanager",
        token_file=tmp_path / "token",
        group_wait="1s",
        group_interval="2s",
        repeat_interval="1h",
    )
    (route,) = [r for r in config["route"]["routes"] if r["receiver"] == RECEIVER]
    (shipped_route,) = [r for r in shipped["route"]["routes"] if r["receiver"] == RECEIVER]
    assert route["matchers"] == shipped_route["matchers"]
    assert route["group_by"] == shipped_route["group_by"]
    (receiver,) = [r for r in config["receivers"] if r["name"] == RECEIVER]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"] == "http://127.0.0.1:1/webhook/alertmanager"
    assert hook["http_config"]["authorization"] == {
        "type": "Bearer",
        "credentials_file": str(tmp_path / "token"),
    }
    assert hook["send_resolved"] is True


def test_the_demo_is_sure_to_select_every_member_in_its_last_round() -> None:
    """The demo's rounds, replayed on a History: the last compaction frees enough for the rule, for sure."""
    import run as demo  # demo/run.py, on the path with demo/stack.py

    history = History()
    keys = [f"/demo/objects/{i:05d}" for i in range(demo.KEYS)]
    compactions = []
    for total_bytes in demo.ROUNDS_BYTES:
        for _ in range(-(-total_bytes // (demo.KEYS * demo.VALUE_BYTES))):  # as Stack.write_history
            history.overwrite(keys, demo.VALUE_BYTES)
        compactions.append(history.compacted(revision=0))
    assert demo.FLOOR_BYTES == FLOOR_BYTES
    # Round 1 supersedes all but the last values; every later one, also the previous round's last.
    assert compactions[0].superseded_bytes == demo.ROUNDS_BYTES[0] - demo.KEYS * demo.VALUE_BYTES
    assert [c.superseded_bytes for c in compactions[1:]] == list(demo.ROUNDS_BYTES[1:])
    last = compactions[-1]
    assert last.free_floor_bytes >= FLOOR_BYTES
    # The rule's other half, dbSizeFree >= 0.5 * dbSize, wants more free than in use: the live values
    # and the little else bbolt keeps (measured: under 0.1 MiB), so twice the live values is plenty.
    assert last.free_floor_bytes > 2 * demo.KEYS * demo.VALUE_BYTES


class _ResolvingStack:
    """What the demo's Follower looks at to narrate the alert; nothing else is there to call."""

    cluster = "demo"
    options = StackOptions()

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.alerts: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None

    def service_log(self) -> LogFollower:
        return LogFollower(self.log_path)

    def prometheus_alerts(self) -> list[dict[str, Any]]:
        return self.alerts

    def run_report(self) -> dict[str, Any] | None:
        return self.report


@pytest.mark.parametrize(
    ("report", "why"),
    [
        # The run has ended (its report is on disk), though the executor's state does not say so yet.
        ({"result": "success"}, "no member is worth a defrag any more"),
        (None, "the one being defragmented does not answer meanwhile"),
    ],
)
def test_the_demo_says_why_the_alert_resolved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], report: dict[str, Any] | None, why: str
) -> None:
    import run as demo  # demo/run.py, on the path with demo/stack.py

    stack = _ResolvingStack(tmp_path / "service.log")
    follower = demo.Follower(stack, demo.Narrator())  # type: ignore[arg-type]
    stack.alerts = [
        {"labels": {"alertname": demo.ALERT, "etcd_cluster": "demo"}, "state": "firing", "value": "1e8"}
    ]
    follower._alert()
    stack.alerts, stack.report = [], report
    follower._alert()

    lines = capsys.readouterr().out.splitlines()
    assert "is FIRING" in lines[0]
    assert f"{demo.ALERT} is resolved: " in lines[1]
    assert why in lines[1]


def finished_run(stack: Stack) -> dict[str, Any]:
    """The local executor's state once the run has ended."""

    def finished() -> dict[str, Any] | None:
        state = stack.run_state()
        return state if state and state.get("finished_at") else None

    return stack.wait(finished, timeout=RUN_TIMEOUT, what="the defrag run to end")


def check_shipped_rules_loaded(stack: Stack, alert_for_seconds: float) -> None:
    rules = {rule["name"]: rule for rule in stack.prometheus_rules()}
    assert set(rules) == shipped_alert_names()
    assert rules["EtcdDefragRecommended"]["duration"] == alert_for_seconds
    assert rules["EtcdNoSpaceAlarm"]["duration"] == 0  # no `for:` in the shipped rule


def check_leader_last(stack: Stack, report: dict[str, Any], leader: str) -> None:
    """Every member defragmented, each once, the leader last: in the report and in the run's log."""
    members = report["members"]
    assert stack.etcd is not None
    assert {m["name"] for m in members} == {member.name for member in stack.etcd.members}
    assert [m["outcome"] for m in members] == ["defragmented"] * 3
    assert [m["leader"] for m in members] == [False, False, True]
    assert members[-1]["name"] == leader
    # The order in which the engine actually defragmented, from its progress lines.
    started = [
        record["message"].split(":")[0]
        for record in stack.service_log().new_records()
        if record.get("logger") == "exporter.defrag.engine"
        and ": defragmenting (" in record.get("message", "")
    ]
    assert started == [m["name"] for m in members[:2]] + [f"{leader} (leader)"]


def check_run_metrics(metrics: Samples, cluster: str, state: dict[str, Any], report: dict[str, Any]) -> None:
    """Exactly one run, a success, accounted as the report says."""
    assert metrics.total(RUNS, etcd_cluster=cluster) == 1
    assert metrics.value(RUNS, etcd_cluster=cluster, result="success") == 1
    assert (
        metrics.value("etcd_autodefrag_reclaimed_bytes_total", etcd_cluster=cluster)
        == report["reclaimed_bytes"]
    )
    assert metrics.value("etcd_autodefrag_runs_in_flight", etcd_cluster=cluster) == 0
    finished_at = datetime.fromisoformat(state["finished_at"]).timestamp()
    last_run = metrics.value(
        "etcd_autodefrag_last_run_timestamp_seconds", etcd_cluster=cluster, result="success"
    )
    assert last_run == pytest.approx(finished_at, abs=0.01)
    assert (metrics.value("etcd_autodefrag_run_duration_seconds", etcd_cluster=cluster) or 0) > 0
    assert metrics.value(ALERTS, outcome="launch") == 1


def wait_resolved(stack: Stack, alertname: str) -> None:
    """The alert resolves in Prometheus and Alertmanager tells the webhook, which launches nothing."""
    stack.wait(
        lambda: stack.alert_state(alertname) is None, timeout=ALERT_TIMEOUT, what=f"{alertname} to resolve"
    )
    stack.wait_metrics(
        lambda m: (m.value(ALERTS, outcome="skip_resolved") or 0) >= 1,
        timeout=ALERT_TIMEOUT,
        what="Alertmanager to post the resolved notification",
    )
    sent, failed = stack.webhook_notifications()
    assert sent >= 2  # the firing and the resolved notification
    assert failed == 0


@pytest.mark.e2e
@pytest.mark.etcd
def test_fragmentation_alert_leads_to_one_run_leader_last(tmp_path: Path, etcd_build: EtcdBuild) -> None:
    options = StackOptions(cluster="e2e-frag", quota_bytes=512 * MiB, alert_for="5s", etcd_build=etcd_build)
    cluster = options.cluster
    with Stack(tmp_path, options) as stack:
        etcd = stack.start().etcd
        assert etcd is not None
        check_shipped_rules_loaded(stack, 5)
        quiet = stack.service_metrics()
        assert quiet.value(CLUSTER_RECOMMENDED, etcd_cluster=cluster) == 0
        assert quiet.total(RUNS, etcd_cluster=cluster) == 0
        assert stack.alert_state("EtcdDefragRecommended") is None

        # 128 MiB written over 16 MiB of live data, then compaction: the files keep their size, and
        # the 112 MiB of old versions are sure to leave every member over the 100 MiB floor.
        stack.write_history(128 * MiB, keys=32, value_size=512 * 1024)
        compaction = stack.compact()
        assert compaction.superseded_bytes == 112 * MiB
        assert compaction.free_floor_bytes >= FLOOR_BYTES
        stack.wait_free_everywhere(compaction.free_floor_bytes)
        fragmented = stack.wait_metrics(
            lambda m: m.by_member(RECOMMENDED, etcd_cluster=cluster) == {n.name: 1.0 for n in etcd.members},
            timeout=30,
            what="the rule to select every member",
        )
        sizes_before = fragmented.by_member(DB_SIZE, etcd_cluster=cluster)
        leader = etcd.leader().name

        # Prometheus fires the alert; Alertmanager posts it to the webhook.
        stack.wait(
            lambda: stack.alert_state("EtcdDefragRecommended") == "firing",
            timeout=ALERT_TIMEOUT,
            what="EtcdDefragRecommended to fire",
        )
        (alert,) = [
            a for a in stack.prometheus_alerts() if a["labels"]["alertname"] == "EtcdDefragRecommended"
        ]
        assert alert["labels"]["etcd_cluster"] == cluster
        assert float(alert["value"]) >= FLOOR_BYTES
        # Alertmanager holds it (its API lists only unresolved alerts: look before the run ends it),
        # routes it to the webhook's receiver alone, and posts it.
        held = stack.wait(
            lambda: [
                a for a in stack.alertmanager_alerts() if a["labels"]["alertname"] == "EtcdDefragRecommended"
            ],
            timeout=ALERT_TIMEOUT,
            what="Alertmanager to receive EtcdDefragRecommended",
        )
        assert [r["name"] for a in held for r in a["receivers"]] == [RECEIVER]
        stack.wait(
            lambda: stack.webhook_notifications()[0] >= 1,
            timeout=ALERT_TIMEOUT,
            what="Alertmanager to post to the webhook",
        )
        assert stack.webhook_notifications()[1] == 0

        # Exactly one run, every member defragmented and smaller, the leader last.
        state = finished_run(stack)
        assert state["result"] == "success"
        report = stack.run_report()
        assert report is not None
        assert report["result"] == "success"
        check_leader_last(stack, report, leader)
        for member in report["members"]:
            assert member["size_after_bytes"] <= member["size_before_bytes"] - FLOOR_BYTES
            assert member["size_after_bytes"] <= member["in_use_before_bytes"] + MiB

        # The gauges fall, the run metrics account for the one run.
        after = stack.wait_metrics(
            lambda m: m.value(CLUSTER_RECOMMENDED, etcd_cluster=cluster) == 0,
            timeout=30,
            what="the gauges to show the defrag",
        )
        sizes_after = after.by_member(DB_SIZE, etcd_cluster=cluster)
        assert set(sizes_after) == set(sizes_before)
        for member, size in sizes_after.items():
            assert size <= sizes_before[member] - FLOOR_BYTES
        assert all(free < MiB for free in after.by_member(FREE, etcd_cluster=cluster).values())
        assert set(after.by_member(RECOMMENDED, etcd_cluster=cluster).values()) == {0.0}
        check_run_metrics(after, cluster, state, report)

        wait_resolved(stack, "EtcdDefragRecommended")
        final = stack.service_metrics()
        assert final.total(RUNS, etcd_cluster=cluster) == 1
        assert final.value(ALERTS, outcome="launch") == 1


@pytest.mark.e2e
@pytest.mark.etcd
def test_nospace_alarm_recovered_by_compaction_defrag_and_disarm(
    tmp_path: Path, etcd_build: EtcdBuild
) -> None:
    # The NOSPACE alert has no `for:`; the others get a long one here, so that EtcdQuotaUsageCritical
    # (also acting, also true at the quota) cannot win the race to the webhook: the run must be the
    # NOSPACE alert's doing.
    options = StackOptions(
        cluster="e2e-nospace", quota_bytes=32 * MiB, compact=True, alert_for="60s", etcd_build=etcd_build
    )
    cluster = options.cluster
    with Stack(tmp_path, options) as stack:
        etcd = stack.start().etcd
        assert etcd is not None
        check_shipped_rules_loaded(stack, 60)

        # History, not live data, fills the quota: compaction and defrag can get the space back.
        stack.overwrite_until_nospace(keys=16, value_size=256 * 1024)
        assert {a["alarm"] for a in etcd.alarms()} == {"NOSPACE"}
        with pytest.raises(EtcdRequestError, match=NOSPACE_ERROR):
            etcd.put("/e2e/refused", b"x")
        stack.wait_metrics(
            lambda m: m.total(NOSPACE_ACTIVE, etcd_cluster=cluster, alarm="NOSPACE") >= 1,
            timeout=30,
            what="the service to report the NOSPACE alarm",
        )
        leader = etcd.leader().name
        sizes_before = {name: int(s["dbSize"]) for name, s in etcd.statuses().items()}
        # The member that took the writes reached the quota; the others are close behind.
        assert max(sizes_before.values()) >= 0.9 * options.quota_bytes

        stack.wait(
            lambda: stack.alert_state("EtcdNoSpaceAlarm") == "firing",
            timeout=ALERT_TIMEOUT,
            what="EtcdNoSpaceAlarm to fire",
        )
        state = finished_run(stack)
        assert state["result"] == "success"
        report = stack.run_report()
        assert report is not None
        launches = [
            record["message"]
            for record in stack.service_log().new_records()
            if record.get("logger") == "exporter.launch.local"
            and "started local run" in record.get("message", "")
        ]
        assert len(launches) == 1
        assert "for alert EtcdNoSpaceAlarm" in launches[0]

        # Compaction, then every member defragmented (the rule is not consulted under NOSPACE), leader
        # last, then the alarm disarmed: etcd takes writes again.
        assert report["compacted_revision"] > 0
        check_leader_last(stack, report, leader)
        for member in report["members"]:
            assert member["size_after_bytes"] < 0.5 * options.quota_bytes
        assert report["disarmed_alarms"]
        assert all(alarm.startswith("NOSPACE:") for alarm in report["disarmed_alarms"])
        assert etcd.alarms() == []
        assert etcd.put("/e2e/accepted", b"x") > 0

        after = stack.wait_metrics(
            lambda m: m.total(NOSPACE_ACTIVE, etcd_cluster=cluster, alarm="NOSPACE") == 0,
            timeout=30,
            what="the service to report the alarm gone",
        )
        for member, size in after.by_member(DB_SIZE, etcd_cluster=cluster).items():
            assert size < sizes_before[member] / 2
        check_run_metrics(after, cluster, state, report)

        wait_resolved(stack, "EtcdNoSpaceAlarm")
        final = stack.service_metrics()
        assert final.total(RUNS, etcd_cluster=cluster) == 1
        assert final.value(ALERTS, outcome="launch") == 1
