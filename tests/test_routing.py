"""Alert routing: Alertmanager matchers, the acting filter, and every decision `decide` can take."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from exporter.config.settings import ClusterConfig, ConfigError, Settings, WebhookSettings, load_settings
from exporter.core.alertmanager import AlertmanagerAlert, AlertmanagerPayload, AlertStatus
from exporter.core.launches import RunState
from exporter.core.matchers import Matcher, MatcherSyntaxError, MatchOp, parse_matcher
from exporter.core.routing import (
    DEFAULT_ACTING_ALERTS,
    ActingFilter,
    AlertDecision,
    ClusterHealth,
    ClusterIndex,
    Decision,
    Policy,
    cluster_matchers,
    decide,
    iter_decisions,
    route,
    snapshot_wanted,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
POLICY = Policy(
    acting=ActingFilter(frozenset(DEFAULT_ACTING_ALERTS)), cooldown_seconds=3600, max_snapshot_age_seconds=60
)
HEALTHY = ClusterHealth(taken_at=NOW - timedelta(seconds=5), healthy=True)


def cluster(name: str, *matchers: str, paused: bool = False) -> ClusterConfig:
    return ClusterConfig(
        name=name, endpoints=["http://127.0.0.1:2379"], alerts={"matchers": list(matchers)}, paused=paused
    )


def alert(
    name: str = "EtcdDefragRecommended", status: str = "firing", fingerprint: str = "f1", **labels: str
) -> AlertmanagerAlert:
    return AlertmanagerAlert.model_validate(
        {
            "status": status,
            "labels": {"alertname": name, **labels},
            "startsAt": "2026-11-22T11:55:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "fingerprint": fingerprint,
        }
    )


# --- matchers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ('etcd_cluster="a"', {"etcd_cluster": "a"}, True),
        ('etcd_cluster="a"', {"etcd_cluster": "ab"}, False),
        ('etcd_cluster="a"', {}, False),
        ('etcd_cluster=""', {}, True),  # a missing label is the empty string
        ('etcd_cluster!="a"', {"etcd_cluster": "b"}, True),
        ('etcd_cluster!="a"', {}, True),
        ('etcd_cluster!="a"', {"etcd_cluster": "a"}, False),
        ('job=~"kube-etcd|etcd"', {"job": "etcd"}, True),
        ('job=~"etcd"', {"job": "kube-etcd"}, False),  # anchored: no substring match
        ('job=~"etcd"', {"job": "etcd-2"}, False),
        ('job=~"etcd.*"', {"job": "etcd-2"}, True),
        ('job=~"a|b"', {"job": "ab"}, False),  # the anchor wraps the whole alternation
        ('job=~".*"', {}, True),
        ('job!~"kube-.*"', {"job": "kube-etcd"}, False),
        ('job!~"kube-.*"', {"job": "etcd"}, True),
        ('job!~"kube-.*"', {}, True),
        ("job=kube-etcd", {"job": "kube-etcd"}, True),  # the classic unquoted form
        ('  job = "kube-etcd"  ', {"job": "kube-etcd"}, True),
        ('x="a\\"b"', {"x": 'a"b'}, True),
        ('x="a\\\\b"', {"x": "a\\b"}, True),
        ('x=~"tenant-\\d+"', {"x": "tenant-42"}, True),  # unknown escapes stay for the regex
        ('x="a,b"', {"x": "a,b"}, True),
    ],
)
def test_matcher(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_matcher(text).matches(labels) is expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("etcd_cluster", "expected name="),
        ('etcd_cluster: "a"', "expected name="),
        ('="a"', "expected name="),
        ('1abc="a"', "expected name="),
        ('a=="b"', "quote the value"),
        ('a="b', "closing quote is missing"),
        ('a="b\\"', "closing quote is missing"),
        ('a="b"c"', "unescaped quote"),
        ("a=b c", "quote the value"),
        ('a=~"(b"', "invalid regular expression"),
        ('a!~"[b"', "invalid regular expression"),
        ('{a="b"}', "expected name="),
    ],
)
def test_invalid_matcher_is_rejected(text: str, message: str) -> None:
    with pytest.raises(MatcherSyntaxError, match=message):
        parse_matcher(text)


def test_matcher_prints_in_alertmanager_syntax() -> None:
    assert str(parse_matcher('a=~"x\\"y"')) == 'a=~"x\\"y"'
    assert parse_matcher("a!=b") == Matcher("a", MatchOp.NOT_EQUAL, "b")


def test_invalid_matcher_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "clusters:\n  - name: a\n    endpoints: [http://127.0.0.1:2379]\n    alerts: ['job=~\"(kube\"']\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert "clusters[0].alerts.matchers: invalid regular expression in matcher 'job=~\"(kube\"'" in str(
        caught.value
    )


def test_alerts_as_a_bare_list_or_a_mapping() -> None:
    bare = cluster("a")
    assert bare.alerts.matchers == []
    listed = ClusterConfig.model_validate(
        {"name": "a", "endpoints": ["http://127.0.0.1:2379"], "alerts": ['job="kube-etcd"']}
    )
    assert listed.alerts.matchers == ['job="kube-etcd"']


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({"acting_matchers": ["sev erity=x"]}, "webhook.acting_matchers: invalid matcher"),
        ({"acting_alerts": []}, "every alert would launch a defrag"),
        ({"token": "a", "token_file": "/t"}, "either token or token_file"),
        ({"basic_auth_username": "am"}, "must be set together"),
        ({"basic_auth_password": "p"}, "must be set together"),
        ({"max_body_bytes": 10}, "webhook.max_body_bytes"),
    ],
)
def test_invalid_webhook_settings(webhook: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(webhook=webhook)


def test_default_route_is_the_cluster_label() -> None:
    assert cluster_matchers(cluster("tenant-a")) == (Matcher("etcd_cluster", MatchOp.EQUAL, "tenant-a"),)


def test_route_needs_every_matcher() -> None:
    kamaji = cluster("kamaji-a", 'namespace="tenant-a"', 'service="tenant-a-etcd"')
    assert route(labels={"namespace": "tenant-a", "service": "tenant-a-etcd"}, clusters=[kamaji]) == [kamaji]
    assert route(labels={"namespace": "tenant-a", "service": "other"}, clusters=[kamaji]) == []


@pytest.mark.parametrize(
    ("names", "matchers", "labels", "acts"),
    [
        (None, [], {"alertname": "EtcdDefragRecommended"}, True),
        (None, [], {"alertname": "EtcdNoSpaceAlarm"}, True),
        (None, [], {"alertname": "EtcdQuotaUsageCritical"}, True),
        (None, [], {"alertname": "EtcdMembersDown"}, False),
        (None, [], {}, False),
        (["Custom"], [], {"alertname": "Custom"}, True),
        (["Custom"], [], {"alertname": "EtcdDefragRecommended"}, False),
        (None, ['severity="critical"'], {"alertname": "EtcdNoSpaceAlarm", "severity": "warning"}, False),
        (None, ['severity="critical"'], {"alertname": "EtcdNoSpaceAlarm", "severity": "critical"}, True),
        ([], ['autodefrag="true"'], {"alertname": "Anything", "autodefrag": "true"}, True),
        ([], ['autodefrag="true"'], {"alertname": "Anything"}, False),
    ],
)
def test_acting_filter(
    names: list[str] | None, matchers: list[str], labels: dict[str, str], acts: bool
) -> None:
    webhook = WebhookSettings(acting_alerts=names, acting_matchers=matchers)
    assert ActingFilter.from_settings(webhook).acts(labels) is acts


# --- decide --------------------------------------------------------------------------------------

A = cluster("tenant-a")
B = cluster("tenant-b")
KUBE = cluster("kube", 'job="kube-etcd"')
PAUSED = cluster("paused", paused=True)
CLUSTERS = [A, B, KUBE, PAUSED]
SNAPSHOTS = {name: HEALTHY for name in ("tenant-a", "tenant-b", "kube", "paused")}


@pytest.mark.parametrize(
    ("the_alert", "snapshots", "runs", "decision", "cluster_name", "reason"),
    [
        (alert(etcd_cluster="tenant-a"), SNAPSHOTS, {}, Decision.LAUNCH, "tenant-a", "fired for cluster"),
        (alert(job="kube-etcd"), SNAPSHOTS, {}, Decision.LAUNCH, "kube", "fired for cluster kube"),
        (
            alert(status="resolved", etcd_cluster="tenant-a"),
            SNAPSHOTS,
            {},
            Decision.SKIP_RESOLVED,
            None,
            "resolved",
        ),
        (
            alert("EtcdMembersDown", etcd_cluster="tenant-a"),
            SNAPSHOTS,
            {},
            Decision.SKIP_NOT_ACTING,
            None,
            "",
        ),
        (alert(etcd_cluster="tenant-z"), SNAPSHOTS, {}, Decision.SKIP_UNROUTED, None, "match no configured"),
        (alert(), SNAPSHOTS, {}, Decision.SKIP_UNROUTED, None, "match no configured"),
        (
            alert(etcd_cluster="tenant-a", job="kube-etcd"),
            SNAPSHOTS,
            {},
            Decision.SKIP_AMBIGUOUS,
            None,
            "several clusters (tenant-a, kube)",
        ),
        (alert(etcd_cluster="paused"), SNAPSHOTS, {}, Decision.SKIP_PAUSED, "paused", "paused"),
        (
            alert(etcd_cluster="tenant-a"),
            SNAPSHOTS,
            {"tenant-a": RunState(running=True, started_at=NOW - timedelta(minutes=3))},
            Decision.SKIP_ALREADY_RUNNING,
            "tenant-a",
            "in flight since 2026-11-22T11:57:00+00:00",
        ),
        (
            alert(etcd_cluster="tenant-a"),
            SNAPSHOTS,
            {"tenant-a": RunState(finished_at=NOW - timedelta(minutes=59), result="success")},
            Decision.SKIP_COOLDOWN,
            "tenant-a",
            "cools down until 2026-11-22T12:01:00+00:00 after its last run (success)",
        ),
        (
            alert(etcd_cluster="tenant-a"),
            SNAPSHOTS,
            {"tenant-a": RunState(finished_at=NOW - timedelta(minutes=61), result="failed")},
            Decision.LAUNCH,
            "tenant-a",
            "",
        ),
        (
            alert(etcd_cluster="tenant-b"),
            SNAPSHOTS,
            {"tenant-a": RunState(running=True)},  # another cluster's run does not matter
            Decision.LAUNCH,
            "tenant-b",
            "",
        ),
        (alert(etcd_cluster="tenant-a"), {}, {}, Decision.SKIP_NO_SNAPSHOT, "tenant-a", "not been observed"),
        (
            alert(etcd_cluster="tenant-a"),
            {"tenant-a": ClusterHealth(taken_at=NOW - timedelta(seconds=61), healthy=True)},
            {},
            Decision.SKIP_STALE_SNAPSHOT,
            "tenant-a",
            "61s old (limit 60s)",
        ),
        (
            alert(etcd_cluster="tenant-a"),
            {"tenant-a": ClusterHealth(taken_at=NOW, healthy=False, problem="member m2 did not answer")},
            {},
            Decision.SKIP_UNHEALTHY,
            "tenant-a",
            "not healthy: member m2 did not answer",
        ),
    ],
)
def test_decide(
    the_alert: AlertmanagerAlert,
    snapshots: dict[str, ClusterHealth],
    runs: dict[str, RunState],
    decision: Decision,
    cluster_name: str | None,
    reason: str,
) -> None:
    result = decide(
        alert=the_alert, clusters=CLUSTERS, snapshots=snapshots, runs=runs, now=NOW, policy=POLICY
    )
    assert result.decision is decision
    assert result.cluster == cluster_name
    assert reason in result.reason
    assert result.fingerprint == the_alert.fingerprint


def test_checks_run_in_order_paused_before_running_before_health() -> None:
    """A paused cluster says paused even while it runs and is unhealthy: the most useful reason first."""
    runs = {"paused": RunState(running=True)}
    sick = {"paused": ClusterHealth(taken_at=NOW, healthy=False, problem="x")}
    result = decide(
        alert=alert(etcd_cluster="paused"),
        clusters=CLUSTERS,
        snapshots=sick,
        runs=runs,
        now=NOW,
        policy=POLICY,
    )
    assert result.decision is Decision.SKIP_PAUSED


def test_a_clusters_own_job_cooldown_wins() -> None:
    kube = ClusterConfig(
        name="tenant-a",
        endpoints=["http://127.0.0.1:2379"],
        kubernetes={"namespace": "etcd", "cooldown_seconds": 600},
    )
    ended = {"tenant-a": RunState(finished_at=NOW - timedelta(minutes=11), result="success")}
    result = decide(
        alert=alert(etcd_cluster="tenant-a"),
        clusters=[kube],
        snapshots=SNAPSHOTS,
        runs=ended,
        now=NOW,
        policy=POLICY,
    )
    assert result.decision is Decision.LAUNCH
    ended = {"tenant-a": RunState(finished_at=NOW - timedelta(minutes=9), result="success")}
    result = decide(
        alert=alert(etcd_cluster="tenant-a"),
        clusters=[kube],
        snapshots=SNAPSHOTS,
        runs=ended,
        now=NOW,
        policy=POLICY,
    )
    assert result.decision is Decision.SKIP_COOLDOWN


def test_one_launch_per_cluster_per_notification() -> None:
    alerts = [alert(etcd_cluster="tenant-a", fingerprint=f"a{i}", member=f"m{i}") for i in range(50)]
    alerts += [
        alert(etcd_cluster="tenant-b", fingerprint="b0"),
        alert(status="resolved", etcd_cluster="tenant-b"),
    ]
    decisions = list(
        iter_decisions(alerts=alerts, clusters=CLUSTERS, snapshots=SNAPSHOTS, runs={}, now=NOW, policy=POLICY)
    )
    launches = [d for d in decisions if d.launch]
    assert [(d.cluster, d.fingerprint) for d in launches] == [("tenant-a", "a0"), ("tenant-b", "b0")]
    duplicates = [d for d in decisions if d.decision is Decision.SKIP_DUPLICATE]
    assert len(duplicates) == 49
    assert all(d.cluster == "tenant-a" for d in duplicates)
    assert "already launches a run on cluster tenant-a" in duplicates[0].reason
    assert decisions[-1].decision is Decision.SKIP_RESOLVED


def test_alert_labels_only_choose_among_configured_clusters() -> None:
    """Labels select a configured cluster by its matchers; nothing else in them is used."""
    sneaky = alert(etcd_cluster="tenant-a", namespace="kube-system", image="evil:latest", endpoint="http://x")
    result = decide(alert=sneaky, clusters=CLUSTERS, snapshots=SNAPSHOTS, runs={}, now=NOW, policy=POLICY)
    assert result == AlertDecision(Decision.LAUNCH, result.reason, "EtcdDefragRecommended", "f1", "tenant-a")


# --- the payload ---------------------------------------------------------------------------------


def test_payload_tolerates_unknown_fields() -> None:
    payload = AlertmanagerPayload.model_validate(
        {
            "version": "4",
            "groupKey": '{}:{alertname="EtcdDefragRecommended"}',
            "truncatedAlerts": 2,
            "status": "firing",
            "receiver": "etcd-autodefrag",
            "groupLabels": {"alertname": "EtcdDefragRecommended"},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093",
            "notification_reason": "new_alerts",
            "routeLabels": {"team": "platform"},
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "EtcdDefragRecommended"},
                    "annotations": {"summary": "s"},
                    "startsAt": "2026-11-22T11:55:00.123456789Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus/graph",
                    "fingerprint": "abc",
                    "silencedBy": [],
                }
            ],
        }
    )
    assert payload.truncated_alerts == 2
    assert payload.alerts[0].status is AlertStatus.FIRING
    assert payload.alerts[0].name == "EtcdDefragRecommended"


def test_settings_default_acting_alerts_are_the_shipped_ones() -> None:
    assert Settings().webhook.acting_alerts is None
    assert ActingFilter.from_settings(Settings().webhook).names == {
        "EtcdDefragRecommended",
        "EtcdNoSpaceAlarm",
        "EtcdQuotaUsageCritical",
    }


# --- the routing index: route's answer without checking every cluster ------------------------------

MATCHER_POOL = [
    'etcd_cluster="a"',
    'etcd_cluster="b"',
    'etcd_cluster=~"a|b"',
    'etcd_cluster!="a"',
    'etcd_cluster=""',
    'job="kube-etcd"',
    'namespace="x"',
]
LABEL_VALUES = {"etcd_cluster": ["a", "b", "c0", "c1", ""], "job": ["kube-etcd", ""], "namespace": ["x", ""]}


@hypothesis.settings(max_examples=500, deadline=None, derandomize=True)
@hypothesis.given(
    matchers=st.lists(st.lists(st.sampled_from(MATCHER_POOL), max_size=3), max_size=6),
    labels=st.fixed_dictionaries({k: st.sampled_from(v) for k, v in LABEL_VALUES.items()}),
)
def test_cluster_index_routes_exactly_as_route(matchers: list[list[str]], labels: dict[str, str]) -> None:
    """Indexed, default-matcher, regex, negative, empty-value and non-etcd_cluster matchers alike."""
    clusters = [cluster(f"c{i}", *m) for i, m in enumerate(matchers)]
    present = {k: v for k, v in labels.items() if v}
    assert ClusterIndex(clusters).route(present) == route(labels=present, clusters=clusters)


def test_cluster_index_keeps_configuration_order_for_ambiguous_alerts() -> None:
    first = cluster("first", 'job="kube-etcd"')
    second = cluster("second", 'etcd_cluster="a"')
    third = cluster("third", 'etcd_cluster="a"', 'job="kube-etcd"')
    index = ClusterIndex([first, second, third])
    assert index.route({"etcd_cluster": "a", "job": "kube-etcd"}) == [first, second, third]
    assert index.route({"etcd_cluster": "b"}) == []
    assert index.by_name["second"] is second


# The webhook reads a fresh snapshot (of another shard's cluster, docs/sharding.md) only for these.
@pytest.mark.parametrize(
    ("alerts", "wanted"),
    [
        ([alert(etcd_cluster="a")], {"a"}),
        ([alert(etcd_cluster="a"), alert(etcd_cluster="b"), alert(etcd_cluster="a")], {"a", "b"}),
        ([alert(status="resolved", etcd_cluster="a")], set()),
        ([alert("SomethingElse", etcd_cluster="a")], set()),  # not an acting alert
        ([alert(etcd_cluster="nowhere")], set()),  # unrouted
        ([alert(etcd_cluster="p")], set()),  # paused
        ([alert(job="shared")], set()),  # ambiguous: routed to c and d
    ],
)
def test_snapshot_wanted(alerts: list[AlertmanagerAlert], wanted: set[str]) -> None:
    index = ClusterIndex(
        [
            cluster("a"),
            cluster("b"),
            cluster("p", paused=True),
            cluster("c", 'job="shared"'),
            cluster("d", 'job="shared"'),
        ]
    )
    routes = [index.route(a.labels) for a in alerts]
    assert snapshot_wanted(alerts=alerts, routes=routes, policy=POLICY) == wanted
    # Exactly the clusters `decide` would look at a snapshot for: it says so when there is none.
    looked = {
        d.cluster
        for a in alerts
        if (d := decide(alert=a, clusters=index, snapshots={}, runs={}, now=NOW, policy=POLICY)).decision
        is Decision.SKIP_NO_SNAPSHOT
    }
    assert looked == wanted
