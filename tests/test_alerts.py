"""The alert rules and Alertmanager examples under alerts/, checked with the real promtool and amtool.

promtool and amtool come from Debian's `prometheus` and `prometheus-alertmanager` (`make debs`
installs them); a missing tool fails the test, it never skips it.
"""

import importlib
import importlib.util
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from exporter.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "alerts"
RULES = ALERTS / "etcd-autodefrag-rules.yaml"
UNIT_TESTS = sorted((ALERTS / "tests").glob("*.yaml"))
# The etcd mixin's space alerts as kube-prometheus-stack ships them, for with-etcd-mixin.yaml only.
MIXIN_RULES = ALERTS / "tests" / "etcd-mixin" / "rules.yaml"
ALERTMANAGER_YML = ALERTS / "alertmanager" / "alertmanager.yml"
ALERTMANAGER_CONFIG_CRD = ALERTS / "alertmanager" / "alertmanagerconfig.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/etcd-autodefrag/etcd-autodefrag/blob/main/docs/runbook.md#"

# The contract with the webhook (exporter/core/routing.py): alerts with these names launch defrag runs.
WEBHOOK_ALERTS = frozenset({"EtcdDefragRecommended", "EtcdNoSpaceAlarm", "EtcdQuotaUsageCritical"})
WEBHOOK_URL = "http://etcd-autodefrag.etcd-autodefrag.svc:9479/webhook/alertmanager"
# The two selectors alerts/README.md tells users to replace; every rule must spell them this way.
# etcd's own metrics: kube-prometheus-stack's kube-etcd, and kamaji-etcd's ServiceMonitor job (its
# Helm release: kamaji-etcd on its own, kamaji when Kamaji's chart installed it).
ETCD_JOBS = "kube-etcd|kamaji-etcd|kamaji"
SERVICE_JOB = "etcd-autodefrag"
OUR_PREFIX = "etcd_autodefrag_"
# kube-prometheus-stack inhibits severity="info" (InfoInhibitor): it would starve the webhook.
SEVERITIES = {"warning", "critical"}


def tool(name: str, package: str) -> str:
    """The path of a command-line tool, or a failed test that says how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install Debian's {package} (`make debs` does, "
            f"or `apt-get install {package}`)",
            pytrace=False,
        )
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alert_rules()]


def mixin_alert_names() -> set[str]:
    groups = yaml.safe_load(MIXIN_RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub generates for a Markdown file's headings (code blocks skipped)."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def vector_selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def equal_matchers(selector: promql_parser.VectorSelector) -> dict[str, str]:
    return {m.name: m.value for m in selector.matchers.matchers if m.op == promql_parser.MatchOp.Equal}


# --- promtool ------------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = run(tool("promtool", "prometheus"), "check", "rules", RULES)
    assert result.returncode == 0, f"promtool check rules {RULES.name}:\n{result.stdout}{result.stderr}"


def test_there_are_unit_tests() -> None:
    assert UNIT_TESTS, f"no promtool unit tests in {ALERTS / 'tests'}"


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda path: path.name)
def test_promtool_unit_tests_pass(unit_test: Path) -> None:
    result = run(tool("promtool", "prometheus"), "test", "rules", unit_test)
    assert result.returncode == 0, f"promtool test rules {unit_test.name}:\n{result.stdout}{result.stderr}"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: dict[str, int] = defaultdict(int)
    quiet: dict[str, int] = defaultdict(int)
    for unit_test in UNIT_TESTS:
        document = yaml.safe_load(unit_test.read_text())
        assert [(unit_test.parent / f).resolve() for f in document["rule_files"]] in (
            [RULES],
            [RULES, MIXIN_RULES],
        ), f"{unit_test.name} must test {RULES.name} (and at most the etcd mixin's beside it)"
        for case in document["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet)[check["alertname"]] += 1
    names = set(alert_names())
    # promtool passes an empty expectation for an alert that does not exist: catch misspelt names.
    tested = set(firing) | set(quiet)
    assert tested <= names | mixin_alert_names(), f"unit tests for unknown alerts: {tested - names}"
    assert {n for n in names if not firing[n]} == set(), "alerts without a firing unit test"
    assert {n for n in names if not quiet[n]} == set(), "alerts without a not-firing unit test"


# --- the rules themselves ------------------------------------------------------------------------


def test_alert_names_are_unique() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_summary_description_and_runbook(rule: dict[str, Any]) -> None:
    assert rule.get("labels", {}).get("severity") in SEVERITIES, "severity must be warning or critical"
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"missing annotation {key}"
    url = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_URL), url
    anchor = url.removeprefix(RUNBOOK_URL)
    assert anchor in github_anchors(RUNBOOK.read_text()), f"no section #{anchor} in {RUNBOOK.name}"
    # Values are bytes or ratios: a bare $value prints 1.073741824e+09 or 0.875.
    for text in annotations.values():
        for action in re.findall(r"{{(.*?)}}", text):
            if "$value" in action:
                assert re.search(r"\|\s*humanize", action), f"{{{{{action}}}}} is not humanized"


def test_runbook_links_resolve() -> None:
    runbook = RUNBOOK.read_text()
    anchors = github_anchors(runbook)
    links = re.findall(r"\]\(#([^)]+)\)", runbook)
    assert links
    assert sorted({link for link in links if link not in anchors}) == []


def test_webhook_alerts_exist_with_their_contract_names() -> None:
    assert set(alert_names()) >= WEBHOOK_ALERTS
    # The webhook's default list, when that module is part of this tree (it is written concurrently).
    if importlib.util.find_spec("exporter.core.routing") is not None:
        routing = importlib.import_module("exporter.core.routing")
        assert set(routing.DEFAULT_ACTING_ALERTS) == WEBHOOK_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_selectors_are_the_documented_replaceable_ones(rule: dict[str, Any]) -> None:
    """etcd's metrics select job=~ETCD_JOBS, `up` job="etcd-autodefrag", ours none; ALERTS names a
    mixin alert."""
    for selector in vector_selectors(rule["expr"]):
        name = selector.name or ""
        matchers = equal_matchers(selector)
        if name.startswith(OUR_PREFIX):
            assert "job" not in matchers, f"{name}: our metrics need no job selector"
        elif name == "up":
            assert matchers.get("job") == SERVICE_JOB, f"up must select job={SERVICE_JOB!r}"
        elif name == "ALERTS":
            assert matchers.get("alertname") in mixin_alert_names(), "ALERTS must name an etcd mixin alert"
        else:
            assert name.startswith("etcd_"), f"unexpected metric {name!r}"
            regexes = {
                m.name: m.value for m in selector.matchers.matchers if m.op == promql_parser.MatchOp.Re
            }
            assert "job" not in matchers, f"{name} must select job=~{ETCD_JOBS!r}"
            assert regexes.get("job") == ETCD_JOBS, f"{name} must select job=~{ETCD_JOBS!r}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_aggregations_keep_etcd_cluster(rule: dict[str, Any]) -> None:
    """The webhook routes on etcd_cluster: no aggregation may drop it (one alert per etcd cluster)."""
    modifiers: list[promql_parser.AggModifier] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            modifiers.append(node.modifier)

    promql_parser.walk(promql_parser.parse(rule["expr"]), visit)
    for modifier in modifiers:
        assert modifier is not None, "aggregate by (etcd_cluster, ...), not over everything"
        if modifier.type == promql_parser.AggModifierType.By:
            assert "etcd_cluster" in modifier.labels, f"by ({', '.join(modifier.labels)}) drops etcd_cluster"
        else:
            assert "etcd_cluster" not in modifier.labels, "without (etcd_cluster) drops it"


def test_documented_selector_replacement_is_valid(tmp_path: Path) -> None:
    """alerts/README.md: replacing the etcd selector as a whole (its sed line) yields valid rules."""
    readme = (ALERTS / "README.md").read_text()
    (sed,) = re.findall(r"^sed -e '(s/.*/)' alerts/etcd-autodefrag-rules.yaml > my-rules.yaml$", readme, re.M)
    _, old, new, _ = sed.split("/")
    assert old == f'job=~"{ETCD_JOBS}"'
    text = RULES.read_text()
    flavour = tmp_path / "my-rules.yaml"
    flavour.write_text(text.replace(old, new))
    assert ETCD_JOBS not in flavour.read_text().split("groups:", 1)[1]
    result = run(tool("promtool", "prometheus"), "check", "rules", flavour)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Alertmanager --------------------------------------------------------------------------------


def alertmanager_yml() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_YML.read_text())
    return config


def webhook_route(config: dict[str, Any]) -> dict[str, Any]:
    routes = [r for r in config["route"]["routes"] if r["receiver"] == "etcd-autodefrag"]
    assert len(routes) == 1
    return routes[0]


def alternatives(regex: str) -> set[str]:
    return set(regex.split("|"))


@pytest.fixture
def checkable_alertmanager_yml(tmp_path: Path) -> Path:
    """A copy of the example whose credentials_file is a real file.

    amtool 0.25 does not open credentials_file (Alertmanager reads it per request), but pointing it at
    an existing file keeps this check independent of that detail.
    """
    token = tmp_path / "token"
    token.write_text("test-token\n")
    config = alertmanager_yml()
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["http_config"]["authorization"]["credentials_file"] = str(token)
    copy = tmp_path / "alertmanager.yml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def test_alertmanager_example_passes_amtool(checkable_alertmanager_yml: Path) -> None:
    result = run(tool("amtool", "prometheus-alertmanager"), "check-config", checkable_alertmanager_yml)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("alertname", "expected"),
    [(name, True) for name in sorted(WEBHOOK_ALERTS)]
    + [(name, False) for name in ("EtcdQuotaUsageWarning", "EtcdDefragRunFailed", "Watchdog")],
)
def test_alertmanager_routes_exactly_the_webhook_alerts(
    checkable_alertmanager_yml: Path, alertname: str, expected: bool
) -> None:
    result = run(
        tool("amtool", "prometheus-alertmanager"),
        "config",
        "routes",
        "test",
        f"--config.file={checkable_alertmanager_yml}",
        f"alertname={alertname}",
        "etcd_cluster=tenant-a",
        "severity=critical",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    receivers = result.stdout.split()
    assert ("etcd-autodefrag" in receivers) is expected, result.stdout


def test_alertmanager_webhook_receiver() -> None:
    config = alertmanager_yml()
    route = webhook_route(config)
    assert route["matchers"] == [f'alertname=~"{"|".join(sorted(WEBHOOK_ALERTS))}"']
    assert route["group_by"][0] == "etcd_cluster"
    assert route["continue"] is True
    (receiver,) = [r for r in config["receivers"] if r["name"] == "etcd-autodefrag"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"] == WEBHOOK_URL
    assert webhook["send_resolved"] is True
    assert webhook["max_alerts"] == Settings().webhook.max_alerts  # more would be refused
    authorization = webhook["http_config"]["authorization"]
    assert authorization["type"] == "Bearer"
    assert authorization["credentials_file"].startswith("/")


def test_alertmanager_inhibits_the_mixins_quota_page_for_ours() -> None:
    """With the etcd mixin loaded, one page per member near its quota: ours (it launches the defrag)."""
    ours = {
        "alertname": "EtcdQuotaUsageCritical",
        "severity": "critical",
        "job": "kube-etcd",
        "instance": "i",
    }
    theirs = {**ours, "alertname": "etcdDatabaseQuotaLowSpace"}  # alerts/tests/with-etcd-mixin.yaml
    assert "etcdDatabaseQuotaLowSpace" in mixin_alert_names()
    rules = [
        inhibit
        for inhibit in alertmanager_yml()["inhibit_rules"]
        if all(matches(m, ours) for m in inhibit["source_matchers"])
        and all(matches(m, theirs) for m in inhibit["target_matchers"])
    ]
    assert len(rules) == 1
    assert all(label in ours and ours[label] == theirs[label] for label in rules[0]["equal"])
    assert not all(matches(m, ours) for m in rules[0]["target_matchers"])  # never the other way round


def test_alertmanager_inhibits_no_webhook_alert() -> None:
    """An inhibited alert reaches no receiver, the webhook included."""
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}
    for inhibit in alertmanager_yml().get("inhibit_rules", []):
        for name in WEBHOOK_ALERTS:
            labels = {"alertname": name, "severity": severities[name]}
            assert not all(matches(m, labels) for m in inhibit["target_matchers"]), (name, inhibit)


def matches(matcher: str, labels: dict[str, str]) -> bool:
    """Alertmanager matcher semantics for the quoted form `name op "value"` (anchored regexes)."""
    found = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*', matcher)
    assert found, f"unsupported matcher syntax in the example: {matcher}"
    name, op, value = found.groups()
    actual = labels.get(name, "")
    if op in ("=~", "!~"):
        return (re.fullmatch(value, actual) is not None) == (op == "=~")
    return (actual == value) == (op == "=")


def test_alertmanagerconfig_mirrors_the_plain_example() -> None:
    text = ALERTMANAGER_CONFIG_CRD.read_text()
    resource = yaml.safe_load(text)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1alpha1"
    assert resource["kind"] == "AlertmanagerConfig"
    plain = webhook_route(alertmanager_yml())
    route = resource["spec"]["route"]
    (matcher,) = route["matchers"]
    assert (matcher["name"], matcher["matchType"]) == ("alertname", "=~")
    assert alternatives(matcher["value"]) == WEBHOOK_ALERTS
    assert route["groupBy"] == plain["group_by"]
    for camel, snake in (("groupWait", "group_wait"), ("groupInterval", "group_interval")):
        assert route[camel] == plain[snake]
    assert route["repeatInterval"] == plain["repeat_interval"]
    (receiver,) = resource["spec"]["receivers"]
    assert receiver["name"] == route["receiver"]
    (webhook,) = receiver["webhookConfigs"]
    assert webhook["url"] == WEBHOOK_URL
    assert webhook["sendResolved"] is True
    assert webhook["maxAlerts"] == Settings().webhook.max_alerts
    authorization = webhook["httpConfig"]["authorization"]
    assert authorization["type"] == "Bearer"
    assert set(authorization["credentials"]) == {"name", "key"}
    # The namespace-matcher gotcha is documented where people copy from.
    assert "alertmanagerConfigMatcherStrategy" in text
    assert "OnNamespace" in text
