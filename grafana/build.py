"""Writes grafana/etcd-autodefrag.json, the etcd-autodefrag dashboard, from the plain dicts below.

    .venv/bin/python grafana/build.py          # regenerate after editing this file
    .venv/bin/python grafana/build.py --check  # exit 1 if the committed JSON is out of date

The JSON works both for import in the UI and for provisioning (a file provider or the
kube-prometheus-stack Grafana sidecar): the data source is the `datasource` template variable, never
an `__inputs` placeholder that only the import dialog fills in. Output is deterministic (sorted keys,
fixed ids and positions), so a change to this script shows up as a reviewable diff of the JSON, and
tests/test_dashboard.py fails when the two disagree.
"""

import copy
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("etcd-autodefrag.json")
UID = "etcd-autodefrag"
RUNBOOK = "https://github.com/etcd-autodefrag/etcd-autodefrag/blob/main/docs/runbook.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_DATASOURCE = {"type": "grafana", "uid": "-- Grafana --"}
GRID_WIDTH = 24

# Every query selects the chosen clusters with this matcher...
CLUSTER = 'etcd_cluster=~"$etcd_cluster"'
# ...except in these panels, for the reason given (tests/test_dashboard.py reads this table).
ETCD_OWN_METRICS = (
    "etcd's own metrics carry no etcd_cluster label (unless added at scrape time): filtered by $etcd_job"
)
CLUSTER_FILTER_EXEMPT = {
    "Webhook alerts by outcome": "etcd_autodefrag_alerts_total counts per service, not per etcd cluster",
    "Version": "etcd_autodefrag_build_info describes the service, not an etcd cluster",
    "etcd: quota usage per member": ETCD_OWN_METRICS,
    "etcd: database size and in use per member": ETCD_OWN_METRICS,
    "etcd: has leader": ETCD_OWN_METRICS,
}
ETCD_JOB = 'job=~"$etcd_job"'

MIB_100 = 100 * 1024 * 1024  # the EtcdDefragRecommended floor (alerts/etcd-autodefrag-rules.yaml)

Json = dict[str, Any]


# --- building blocks -----------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> Json:
    """One Prometheus query of a panel (refId assigned by the panel)."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "format": "table" if table else "time_series",
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
    }


def thresholds(*steps: tuple[str, float]) -> Json:
    """Absolute thresholds: green below the first step."""
    return {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}, *({"color": c, "value": v} for c, v in steps)],
    }


def value_mappings(**texts: tuple[str, str]) -> list[Json]:
    """Map values (keyword `v0`, `v1`, ...) to (text, color)."""
    options = {
        name.removeprefix("v"): {"color": color, "index": index, "text": text}
        for index, (name, (text, color)) in enumerate(sorted(texts.items()))
    }
    return [{"options": options, "type": "value"}]


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[Json],
    *,
    unit: str = "short",
    defaults: Json | None = None,
    custom: Json | None = None,
    options: Json | None = None,
    overrides: list[Json] | None = None,
    **extra: Any,
) -> Json:
    """A query panel on the `datasource` variable."""
    for ref, query in zip("ABCDEFGH", targets, strict=False):
        query["refId"] = ref
    field_defaults: Json = {"unit": unit, "mappings": [], "thresholds": thresholds()}
    if custom is not None:
        field_defaults["custom"] = custom
    field_defaults.update(defaults or {})
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
        "options": options or {},
        "targets": targets,
        "title": title,
        "type": kind,
        **extra,
    }


LEGEND = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True}
TOOLTIP = {"mode": "multi", "sort": "desc"}


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    *,
    unit: str = "short",
    bars: bool = False,
    threshold_lines: bool = False,
    defaults: Json | None = None,
    overrides: list[Json] | None = None,
    interval: str | None = None,
) -> Json:
    """A graph; `bars` for counts per interval, `threshold_lines` to draw the thresholds."""
    custom = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 0,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if bars else "none"},
        "thresholdsStyle": {"mode": "dashed" if threshold_lines else "off"},
    }
    extra = {"interval": interval} if interval else {}
    return panel(
        "timeseries",
        title,
        description,
        targets,
        unit=unit,
        custom=custom,
        defaults={"color": {"mode": "palette-classic"}, **(defaults or {})},
        options={"legend": LEGEND, "tooltip": TOOLTIP},
        overrides=overrides,
        **extra,
    )


def stat(
    title: str,
    description: str,
    targets: list[Json],
    *,
    unit: str = "short",
    defaults: Json | None = None,
    text_mode: str = "auto",
) -> Json:
    """Current value per series, coloured by thresholds or mappings."""
    options = {
        "colorMode": "background",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": text_mode,
    }
    return panel("stat", title, description, targets, unit=unit, defaults=defaults, options=options)


def state_timeline(title: str, description: str, targets: list[Json], *, mappings: list[Json]) -> Json:
    """One row per series, coloured by value mappings."""
    options = {
        "alignValue": "left",
        "legend": LEGEND,
        "mergeValues": True,
        "rowHeight": 0.9,
        "showValue": "never",
        "tooltip": {"mode": "single", "sort": "none"},
    }
    return panel(
        "state-timeline",
        title,
        description,
        targets,
        custom={"fillOpacity": 80, "lineWidth": 0},
        defaults={"color": {"mode": "thresholds"}, "mappings": mappings},
        options=options,
    )


def table(title: str, description: str, targets: list[Json], *, hide: list[str], unit: str = "short") -> Json:
    """An instant table; `hide` lists columns not worth showing."""
    return panel(
        "table",
        title,
        description,
        targets,
        unit=unit,
        options={"cellHeight": "sm", "showHeader": True},
        transformations=[{"id": "organize", "options": {"excludeByName": dict.fromkeys(hide, True)}}],
    )


def row(title: str, panels: list[tuple[Json, int, int]], *, collapsed: bool = False) -> Json:
    """A row with its panels as (panel, width, height), laid out left to right later."""
    return {"collapsed": collapsed, "title": title, "type": "row", "layout": panels}


def layout(rows: list[Json]) -> list[Json]:
    """Assign ids and grid positions; a collapsed row keeps its panels inside itself."""
    flat: list[Json] = []
    next_id = 1
    y = 0
    for section in rows:
        content = section.pop("layout")
        section.update(id=next_id, gridPos={"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, panels=[])
        next_id += 1
        y += 1
        flat.append(section)
        x = 0
        line_height = 0
        for item, width, height in content:
            if x + width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            item.update(id=next_id, gridPos={"h": height, "w": width, "x": x, "y": y})
            next_id += 1
            x += width
            line_height = max(line_height, height)
            (section["panels"] if section["collapsed"] else flat).append(item)
        y += line_height
    return flat


# --- the dashboard -------------------------------------------------------------------------------


def by_member(metric: str, suffix: str = "") -> Json:
    """A per-member gauge of the chosen clusters."""
    return target(f"{metric}{{{CLUSTER}}}", "{{etcd_cluster}} {{member}}" + suffix)


def counted(counter: str, by: str) -> str:
    """Increase per interval of a per-cluster counter, its first increment included.

    prometheus_client creates a labelled series at its first increment, and increase() of a series
    that was born within the window misses that first value: such a series counts with its value.
    """
    selector = f"{counter}{{{CLUSTER}}}"
    return (
        f"sum by ({by}) (\n"
        f"  ({selector} unless {selector} offset $__interval)\n"
        f"  or increase({selector}[$__interval])\n"
        ")"
    )


def cluster_target(aggregation: str, metric: str) -> Json:
    """One value per chosen cluster (replicas of the service scraping the same cluster collapse)."""
    return target(f"{aggregation} by (etcd_cluster) ({metric}{{{CLUSTER}}})", "{{etcd_cluster}}")


YES_NO = value_mappings(v0=("no", "green"), v1=("yes", "orange"))

overview = row(
    "Overview",
    [
        (
            stat(
                "Cluster healthy",
                "Every voting member answered, all agree on one leader, no CORRUPT alarm. "
                "Defrag runs are refused while a cluster is unhealthy.",
                [cluster_target("max", "etcd_autodefrag_cluster_healthy")],
                defaults={"mappings": value_mappings(v0=("unhealthy", "red"), v1=("healthy", "green"))},
            ),
            4,
            4,
        ),
        (
            stat(
                "Members answering",
                "Share of the members in the member list that answered the last status request.",
                [
                    target(
                        "min by (etcd_cluster) (\n"
                        f"  sum without (member) (etcd_autodefrag_member_up{{{CLUSTER}}})\n"
                        f"  / etcd_autodefrag_cluster_members{{{CLUSTER}}}\n"
                        ")",
                        "{{etcd_cluster}}",
                    )
                ],
                unit="percentunit",
                defaults={"thresholds": thresholds(("red", 0), ("green", 1)), "min": 0, "max": 1},
            ),
            4,
            4,
        ),
        (
            stat(
                "Defrag recommended",
                "The cluster's defrag rule selects at least one member (EtcdDefragRecommended fires "
                "after 15 minutes when a selected member has 100 MiB or more to reclaim).",
                [cluster_target("max", "etcd_autodefrag_cluster_defrag_recommended")],
                defaults={"mappings": YES_NO},
            ),
            4,
            4,
        ),
        (
            stat(
                "Quota headroom",
                "Bytes left before NOSPACE: the smallest (quota - database size) over the members.",
                [cluster_target("min", "etcd_autodefrag_cluster_quota_headroom_bytes")],
                unit="bytes",
                defaults={"color": {"mode": "fixed", "fixedColor": "blue"}},
            ),
            4,
            4,
        ),
        (
            stat(
                "NOSPACE alarm",
                "etcd's NOSPACE alarm: the cluster refuses writes until space is freed and the alarm "
                "disarmed.",
                [
                    target(
                        f'max by (etcd_cluster) (etcd_autodefrag_alarm_active{{alarm="NOSPACE",{CLUSTER}}})',
                        "{{etcd_cluster}}",
                    )
                ],
                defaults={"mappings": value_mappings(v0=("none", "green"), v1=("NOSPACE", "red"))},
            ),
            4,
            4,
        ),
        (
            stat(
                "Defrag run in flight",
                "A defrag run (Kubernetes Job or local process) of the cluster is running.",
                [cluster_target("max", "etcd_autodefrag_runs_in_flight")],
                defaults={"mappings": value_mappings(v0=("idle", "green"), v1=("running", "blue"))},
            ),
            4,
            4,
        ),
    ],
)

database = row(
    "Database",
    [
        (
            timeseries(
                "Database size, in use and quota per member",
                "size: the database file, free pages included; in use: live data (what a defrag "
                "shrinks the file to); quota: NOSPACE is raised when the size reaches it.",
                [
                    by_member("etcd_autodefrag_db_size_bytes", " size"),
                    by_member("etcd_autodefrag_db_size_in_use_bytes", " in use"),
                    by_member("etcd_autodefrag_db_quota_bytes", " quota"),
                ],
                unit="bytes",
                defaults={"min": 0},
                overrides=[
                    {
                        "matcher": {"id": "byRegexp", "options": "/ quota$/"},
                        "properties": [
                            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
                            {"id": "custom.lineWidth", "value": 2},
                        ],
                    }
                ],
            ),
            24,
            9,
        ),
        (
            timeseries(
                "Fragmentation (free / size)",
                "Share of the database file that is free pages. The default rule wants half of it free "
                "(or quota usage above 80%) and at least 100 MiB to reclaim.",
                [by_member("etcd_autodefrag_db_fragmentation_ratio")],
                unit="percentunit",
                threshold_lines=True,
                defaults={"min": 0, "max": 1, "thresholds": thresholds(("orange", 0.5))},
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Reclaimable (free) bytes",
                "What a defrag would give back (size - in use). The dashed line is the 100 MiB floor of "
                "the EtcdDefragRecommended alert.",
                [by_member("etcd_autodefrag_db_free_bytes")],
                unit="bytes",
                threshold_lines=True,
                defaults={"min": 0, "thresholds": thresholds(("orange", MIB_100))},
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Quota usage (size / quota)",
                "At 100% etcd raises NOSPACE. EtcdQuotaUsageWarning at 80%, EtcdQuotaUsageCritical at 90%.",
                [by_member("etcd_autodefrag_db_quota_usage_ratio")],
                unit="percentunit",
                threshold_lines=True,
                defaults={"min": 0, "max": 1, "thresholds": thresholds(("orange", 0.8), ("red", 0.9))},
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Quota headroom per cluster",
                "Bytes left before NOSPACE: the smallest (quota - database size) over the members.",
                [target(f"etcd_autodefrag_cluster_quota_headroom_bytes{{{CLUSTER}}}", "{{etcd_cluster}}")],
                unit="bytes",
                defaults={"min": 0},
            ),
            12,
            8,
        ),
        (
            state_timeline(
                "Defrag recommended per member",
                "The cluster's defrag rule (the one the engine applies) selects the member.",
                [by_member("etcd_autodefrag_defrag_recommended")],
                mappings=YES_NO,
            ),
            12,
            8,
        ),
    ],
)

members = row(
    "Members",
    [
        (
            state_timeline(
                "Leader",
                "The raft leader: defragmented last in every run.",
                [by_member("etcd_autodefrag_member_is_leader")],
                mappings=value_mappings(v0=("follower", "transparent"), v1=("leader", "purple")),
            ),
            8,
            8,
        ),
        (
            state_timeline(
                "Alarms",
                "Alarms etcd reports as raised by the member: NOSPACE (quota reached) or CORRUPT.",
                [by_member("etcd_autodefrag_alarm_active", " {{alarm}}")],
                mappings=value_mappings(v0=("clear", "green"), v1=("raised", "red")),
            ),
            8,
            8,
        ),
        (
            state_timeline(
                "Member answering",
                "The member answered etcd-autodefrag's last status request; a member that did not has "
                "no size series at all.",
                [by_member("etcd_autodefrag_member_up")],
                mappings=value_mappings(v0=("down", "red"), v1=("up", "green")),
            ),
            8,
            8,
        ),
        (
            table(
                "Members",
                "Identity of each member: id, the endpoint etcd-autodefrag queries, etcd version.",
                [target(f"etcd_autodefrag_member_info{{{CLUSTER}}}", instant=True, table=True)],
                # Target labels a ServiceMonitor adds; the member's own labels stay.
                hide=["Time", "Value", "__name__", "container", "instance", "job", "pod", "service"],
            ),
            24,
            6,
        ),
        (
            table(
                "Kamaji DataStore tenants",
                "The tenant control planes (namespace/name) that use each discovered Kamaji DataStore "
                "(its status.usedBy), with the highest quota usage of its members: which tenants a "
                "full DataStore hits. Empty without DataStore discovery (docs/kamaji.md).",
                [
                    target(
                        f"max by (etcd_cluster, tenant) (etcd_autodefrag_datastore_tenant_info{{{CLUSTER}}})"
                        " * on (etcd_cluster) group_left ()"
                        f" max by (etcd_cluster) (etcd_autodefrag_db_quota_usage_ratio{{{CLUSTER}}})",
                        instant=True,
                        table=True,
                    )
                ],
                hide=["Time"],
                unit="percentunit",
            ),
            24,
            6,
        ),
    ],
)

runs = row(
    "Defrag runs",
    [
        (
            timeseries(
                "Defrag runs by result",
                "Runs that ended, by result: success, nothing_to_do, dry_run, failed, refused, "
                "job_failed (the Job ended without a report).",
                [
                    target(
                        counted("etcd_autodefrag_runs_total", "etcd_cluster, result"),
                        "{{etcd_cluster}} {{result}}",
                    )
                ],
                bars=True,
                interval="5m",
                defaults={"decimals": 0},
            ),
            12,
            8,
        ),
        (
            table(
                "Last run by result",
                "When the last run with each result ended.",
                [
                    target(
                        "max by (etcd_cluster, result) "
                        f"(etcd_autodefrag_last_run_timestamp_seconds{{{CLUSTER}}}) * 1000",
                        instant=True,
                        table=True,
                    )
                ],
                hide=["Time"],
                unit="dateTimeFromNow",
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Last run duration",
                "How long the last finished run of the cluster took, start to end.",
                [target(f"etcd_autodefrag_run_duration_seconds{{{CLUSTER}}}", "{{etcd_cluster}}")],
                unit="s",
                defaults={"min": 0},
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Bytes reclaimed",
                "Disk space defrag runs gave back, summed over members.",
                [
                    target(
                        counted("etcd_autodefrag_reclaimed_bytes_total", "etcd_cluster"), "{{etcd_cluster}}"
                    )
                ],
                unit="bytes",
                bars=True,
                interval="5m",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Webhook alerts by outcome",
                "Alerts received on the Alertmanager webhook, by what became of them (launch, or skip_* "
                "with the reason). Not per etcd cluster.",
                [
                    target(
                        "sum by (outcome) (increase(etcd_autodefrag_alerts_total[$__interval])) > 0",
                        "{{outcome}}",
                    )
                ],
                bars=True,
                interval="5m",
                defaults={"decimals": 0},
            ),
            8,
            8,
        ),
    ],
)

service = row(
    "Service",
    [
        (
            timeseries(
                "Refresh duration",
                "Time the last refresh of each cluster took (bounded by the scrape budget).",
                [target(f"etcd_autodefrag_refresh_duration_seconds{{{CLUSTER}}}", "{{etcd_cluster}}")],
                unit="s",
                defaults={"min": 0},
            ),
            10,
            7,
        ),
        (
            timeseries(
                "Refresh errors",
                "Refreshes in which a member or the member list did not answer.",
                [
                    target(
                        "sum by (etcd_cluster) "
                        f"(increase(etcd_autodefrag_refresh_errors_total{{{CLUSTER}}}[$__rate_interval]))",
                        "{{etcd_cluster}}",
                    )
                ],
                defaults={"min": 0},
            ),
            10,
            7,
        ),
        (
            stat(
                "Version",
                "Versions of etcd-autodefrag serving these metrics (more than one during a rollout).",
                [target("count by (version) (etcd_autodefrag_build_info)", "{{version}}")],
                defaults={"color": {"mode": "fixed", "fixedColor": "text"}},
                text_mode="name",
            ),
            4,
            7,
        ),
    ],
)

etcd_own = row(
    "etcd's own metrics (by scrape job; they work without etcd-autodefrag)",
    [
        (
            timeseries(
                "etcd: quota usage per member",
                "etcd_mvcc_db_total_size_in_bytes / etcd_server_quota_backend_bytes, what the "
                "EtcdQuotaUsage* alerts use.",
                [
                    target(
                        f"etcd_mvcc_db_total_size_in_bytes{{{ETCD_JOB}}}\n"
                        f"/ etcd_server_quota_backend_bytes{{{ETCD_JOB}}}",
                        "{{job}} {{instance}}",
                    )
                ],
                unit="percentunit",
                threshold_lines=True,
                defaults={"min": 0, "max": 1, "thresholds": thresholds(("orange", 0.8), ("red", 0.9))},
            ),
            10,
            8,
        ),
        (
            timeseries(
                "etcd: database size and in use per member",
                "The database file and its live data, as etcd reports them.",
                [
                    target(f"etcd_mvcc_db_total_size_in_bytes{{{ETCD_JOB}}}", "{{job}} {{instance}} size"),
                    target(
                        f"etcd_mvcc_db_total_size_in_use_in_bytes{{{ETCD_JOB}}}",
                        "{{job}} {{instance}} in use",
                    ),
                ],
                unit="bytes",
                defaults={"min": 0},
            ),
            10,
            8,
        ),
        (
            state_timeline(
                "etcd: has leader",
                "The member knows a leader.",
                [target(f"etcd_server_has_leader{{{ETCD_JOB}}}", "{{job}} {{instance}}")],
                mappings=value_mappings(v0=("no leader", "red"), v1=("leader", "green")),
            ),
            4,
            8,
        ),
    ],
    collapsed=True,
)


def query_variable(name: str, label: str, query: str, description: str) -> Json:
    """A multi-value variable from label_values() with an All option (regex `.*`)."""
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": DATASOURCE,
        "definition": query,
        "description": description,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": query,
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


TEMPLATING = [
    {
        "current": {},
        "description": "The Prometheus that scrapes etcd-autodefrag (and etcd).",
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "type": "datasource",
    },
    query_variable(
        "etcd_cluster",
        "etcd cluster",
        "label_values(etcd_autodefrag_cluster_healthy, etcd_cluster)",
        "The etcd clusters etcd-autodefrag watches (names from its configuration).",
    ),
    query_variable(
        "etcd_job",
        "etcd scrape job",
        "label_values(etcd_server_has_leader, job)",
        "Scrape jobs of etcd's own metrics (kube-prometheus-stack: kube-etcd), for the last row.",
    ),
]

# Runs as annotations: last_run_timestamp_seconds changes when a run with that result ends; a series
# that appears (the first run of a result since the service started) counts too. The 2m windows
# overlap the 1m step, so no change falls between two windows.
RUN_SELECTOR = f"etcd_autodefrag_last_run_timestamp_seconds{{{CLUSTER}}}"
ANNOTATIONS = [
    {
        "builtIn": 1,
        "datasource": GRAFANA_DATASOURCE,
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    },
    {
        "datasource": DATASOURCE,
        "enable": True,
        "expr": f"changes({RUN_SELECTOR}[2m]) > 0\nor\n({RUN_SELECTOR} unless {RUN_SELECTOR} offset 2m)",
        "iconColor": "purple",
        "name": "Defrag runs",
        "step": "1m",
        "tagKeys": "etcd_cluster,result",
        "textFormat": "defrag run on {{etcd_cluster}} ended: {{result}}",
        "titleFormat": "defrag run",
        "useValueForTime": False,
    },
]


def dashboard() -> Json:
    """The whole dashboard."""
    return {
        "annotations": {"list": ANNOTATIONS},
        "description": "etcd-autodefrag: fragmentation, quota usage and defrag runs per etcd cluster.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "asDropdown": False,
                "icon": "doc",
                "includeVars": False,
                "keepTime": False,
                "tags": [],
                "targetBlank": True,
                "title": "Runbook",
                "tooltip": "What each etcd-autodefrag alert means and what to do",
                "type": "link",
                "url": RUNBOOK,
            }
        ],
        "panels": layout(copy.deepcopy([overview, database, members, runs, service, etcd_own])),
        "refresh": "1m",
        "schemaVersion": 39,
        "tags": ["etcd", "etcd-autodefrag"],
        "templating": {"list": TEMPLATING},
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "etcd-autodefrag",
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    """The dashboard as the JSON text committed in OUTPUT."""
    return json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUTPUT.exists() and OUTPUT.read_text() == text:
            return 0
        print(f"{OUTPUT} is out of date: run {argv[0]}", file=sys.stderr)
        return 1
    if argv[1:]:
        print(f"usage: {argv[0]} [--check]", file=sys.stderr)
        return 2
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
