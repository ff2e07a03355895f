"""grafana/: the committed dashboard is what grafana/build.py writes, and its queries are valid PromQL
over metrics that etcd-autodefrag and etcd really export (checked against live /metrics pages)."""

import importlib.util
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml
from aiohttp.test_utils import TestClient
from etcd_harness import EtcdCluster

from exporter.config.settings import ClusterConfig, Settings
from exporter.service.app import create_app

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD_JSON = GRAFANA / "etcd-autodefrag.json"
RULES = ROOT / "alerts" / "etcd-autodefrag-rules.yaml"
METRICS_MODULE = ROOT / "exporter" / "service" / "metrics.py"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
CLUSTER_MATCHER = ("etcd_cluster", "=~", "$etcd_cluster")
ETCD_JOB_MATCHER = ("job", "=~", "$etcd_job")
OUR_PREFIX = "etcd_autodefrag_"
# Grafana's built-in interval variables, replaced by a duration before parsing.
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b")

# Run outcomes appear on /metrics only after runs. If exporter/service/metrics.py declares them, the names
# come from its text (read at test time); otherwise from this contract list. The contract first said
# run_duration_seconds would be a histogram; RunMetrics made it a gauge (the last run's duration), and
# the dashboard follows the code.
RUN_METRICS_CONTRACT = {
    "etcd_autodefrag_runs_total",
    "etcd_autodefrag_run_duration_seconds",
    "etcd_autodefrag_reclaimed_bytes_total",
    "etcd_autodefrag_last_run_timestamp_seconds",
    "etcd_autodefrag_runs_in_flight",
    "etcd_autodefrag_alerts_total",
}
RUN_METRIC_STEMS = ("runs", "run_duration_seconds", "reclaimed_bytes", "last_run_timestamp_seconds")
RUN_METRIC_STEMS += ("runs_in_flight", "alerts")
# Metrics Prometheus itself makes (the dashboard uses none today).
PROMETHEUS_SYNTHETIC = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


PANELS = [p for p in all_panels(DASHBOARD["panels"]) if p["type"] != "row"]
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
QUERY_ANNOTATIONS = [a for a in DASHBOARD["annotations"]["list"] if not a.get("builtIn")]


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and annotation query."""
    found = [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in PANELS for t in p["targets"]]
    found += [(f"annotation {a['name']}", a["expr"]) for a in QUERY_ANNOTATIONS]
    return found


def parse(expr: str) -> promql_parser.Expr:
    return promql_parser.parse(GRAFANA_DURATIONS.sub("5m", expr))


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(parse(expr), visit)
    return found


def matchers(selector: promql_parser.VectorSelector) -> set[tuple[str, str, str]]:
    """The selector's matchers as (label, operator, value)."""
    operators = {"=": promql_parser.MatchOp.Equal, "!=": promql_parser.MatchOp.NotEqual}
    operators |= {"=~": promql_parser.MatchOp.Re, "!~": promql_parser.MatchOp.NotRe}
    return {
        (m.name, next(symbol for symbol, op in operators.items() if m.op == op), m.value)
        for m in selector.matchers.matchers
    }


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr) if s.name}


def variable_metric(variable: dict[str, Any]) -> str:
    found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"])
    assert found, f"variable {variable['name']}: expected label_values(metric, label)"
    return found.group(1)


# --- the JSON ------------------------------------------------------------------------------------


def test_committed_json_is_what_build_writes() -> None:
    assert DASHBOARD_JSON.read_text() == build.render(), (
        f"{DASHBOARD_JSON.relative_to(ROOT)} is out of date: run .venv/bin/python grafana/build.py"
    )


def test_build_is_deterministic() -> None:
    assert build.render() == build.render()


def test_dashboard_identity_for_import_and_provisioning() -> None:
    assert DASHBOARD["uid"] == "etcd-autodefrag"
    assert DASHBOARD["schemaVersion"] >= 39
    assert DASHBOARD["id"] is None
    # __inputs/__requires are filled in only by the import dialog; provisioning would keep them raw.
    assert "__inputs" not in DASHBOARD
    assert "${DS_" not in DASHBOARD_JSON.read_text()


def test_datasource_variable() -> None:
    variable = VARIABLES["datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")


def test_etcd_cluster_variable() -> None:
    variable = VARIABLES["etcd_cluster"]
    assert variable["type"] == "query"
    assert variable["query"] == "label_values(etcd_autodefrag_cluster_healthy, etcd_cluster)"
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    assert variable["datasource"] == DATASOURCE


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    for panel in PANELS:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for query in panel["targets"]:
            assert query["datasource"] == DATASOURCE, panel["title"]
    for annotation in QUERY_ANNOTATIONS:
        assert annotation["datasource"] == DATASOURCE, annotation["name"]
    for variable in VARIABLES.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_panel_ids_are_unique_and_panels_fit_the_grid() -> None:
    panels = list(all_panels(DASHBOARD["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    wanted = {
        "etcd_autodefrag_db_size_bytes",
        "etcd_autodefrag_db_size_in_use_bytes",
        "etcd_autodefrag_db_quota_bytes",
        "etcd_autodefrag_db_fragmentation_ratio",
        "etcd_autodefrag_db_free_bytes",
        "etcd_autodefrag_cluster_quota_headroom_bytes",
        "etcd_autodefrag_defrag_recommended",
        "etcd_autodefrag_member_is_leader",
        "etcd_autodefrag_alarm_active",
        "etcd_autodefrag_runs_total",
        "etcd_autodefrag_run_duration_seconds",
        "etcd_autodefrag_reclaimed_bytes_total",
        "etcd_autodefrag_last_run_timestamp_seconds",
    }
    assert sorted(wanted - used) == []
    assert [a["name"] for a in QUERY_ANNOTATIONS] == ["Defrag runs"]


# --- the queries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[where for where, _ in queries()])
def test_query_parses(where: str, expr: str) -> None:
    try:
        parse(expr)
    except ValueError as error:
        pytest.fail(f"{where}: {error}\n{expr}")


def test_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Prometheus' own parser, through recording rules: what promql-parser accepts, Prometheus must too."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus (`make debs` does)", pytrace=False)
    rules = [
        {"record": f"dashboard:query_{index}", "expr": GRAFANA_DURATIONS.sub("5m", expr)}
        for index, (_, expr) in enumerate(queries())
    ]
    rule_file = tmp_path / "dashboard-queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_exemptions_name_real_panels_and_say_why() -> None:
    titles = {p["title"] for p in PANELS}
    assert set(build.CLUSTER_FILTER_EXEMPT) <= titles
    assert all(reason.strip() for reason in build.CLUSTER_FILTER_EXEMPT.values())


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_panel_queries_select_the_chosen_clusters(panel: dict[str, Any]) -> None:
    """Every selector filters by $etcd_cluster, unless build.py exempts the panel and says why."""
    exempt = panel["title"] in build.CLUSTER_FILTER_EXEMPT
    for query in panel["targets"]:
        for selector in selectors(query["expr"]):
            name = selector.name or ""
            if not name.startswith(OUR_PREFIX):
                # etcd's own metrics: filtered by the scrape job variable instead.
                assert exempt, f"{name}: a panel on etcd's own metrics must be exempted"
                assert ETCD_JOB_MATCHER in matchers(selector), f'{name} must select job=~"$etcd_job"'
            elif not exempt:
                assert CLUSTER_MATCHER in matchers(selector), f"{name} must filter by $etcd_cluster"


def test_annotation_selects_the_chosen_clusters() -> None:
    for annotation in QUERY_ANNOTATIONS:
        for selector in selectors(annotation["expr"]):
            assert CLUSTER_MATCHER in matchers(selector), annotation["name"]


# --- against real /metrics pages -----------------------------------------------------------------


def exposition_names(text: str) -> set[str]:
    """Sample names of a text exposition, plus those its # TYPE lines declare (families without samples)."""
    names = set()
    for line in text.splitlines():
        if declared := re.match(r"# TYPE (\S+) (\w+)", line):
            name, kind = declared.groups()
            suffixes = {
                "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"),
            }.get(kind, ("",))
            names.update(name + suffix for suffix in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def run_metric_names() -> tuple[set[str], str]:
    """The run-outcome metric names exporter/service/metrics.py declares, or the contract list."""
    text = METRICS_MODULE.read_text()
    declared = re.findall(
        r"\b(Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)\(\s*"
        r'f"\{PREFIX\}_(\w+)"',
        text,
    )
    suffixes = {
        "Counter": ("_total",),
        "CounterMetricFamily": ("_total",),
        "Gauge": ("",),
        "GaugeMetricFamily": ("",),
        "Histogram": ("_bucket", "_sum", "_count"),
        "Summary": ("", "_sum", "_count"),
    }
    names = {
        f"{OUR_PREFIX}{stem}{suffix}"
        for kind, stem in declared
        if stem in RUN_METRIC_STEMS
        for suffix in suffixes[kind]
    }
    if {stem for _, stem in declared} >= set(RUN_METRIC_STEMS):
        return names, f"declared in {METRICS_MODULE.relative_to(ROOT)}"
    return RUN_METRICS_CONTRACT, "the contract list (exporter/service/metrics.py does not declare them all)"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture
async def exported(etcd: EtcdCluster, aiohttp_client: Callable[..., Any]) -> dict[str, set[str]]:
    """Metric names by source: our live /metrics, a live etcd member's /metrics, run outcomes."""
    cluster = ClusterConfig.model_validate(
        {"name": "main", "endpoints": etcd.endpoints[:1], "rule": "dbSizeFree > 1024*1024"}
    )
    client: TestClient = await aiohttp_client(
        create_app(Settings(min_refresh_interval_seconds=0), clusters=[cluster])
    )
    response = await client.get("/metrics")
    assert response.status == 200
    ours = exposition_names(await response.text())
    # The scrape must have seen the cluster, or the per-member gauges would be missing.
    assert "etcd_autodefrag_db_size_bytes" in ours, "no member answered the exporter"
    etcd_own = exposition_names(fetch(f"{etcd.members[0].client_url}/metrics"))
    runs, source = run_metric_names()
    return {"etcd-autodefrag /metrics": ours, "etcd /metrics": etcd_own, f"run outcomes ({source})": runs}


def unknown_metrics(names: set[str], exported: dict[str, set[str]]) -> list[str]:
    known = set().union(*exported.values()) | PROMETHEUS_SYNTHETIC
    return sorted(names - known)


@pytest.mark.etcd
async def test_dashboard_references_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    used |= {variable_metric(v) for v in VARIABLES.values() if v["type"] == "query"}
    unknown = unknown_metrics(used, exported)
    assert not unknown, f"the dashboard uses metrics found in none of {sorted(exported)}: {unknown}"


@pytest.mark.etcd
async def test_alert_rules_reference_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"]
    used = set().union(*(metric_names(rule["expr"]) for group in rules for rule in group["rules"]))
    unknown = unknown_metrics(used, exported)
    assert not unknown, f"the alert rules use metrics found in none of {sorted(exported)}: {unknown}"
