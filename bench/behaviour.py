"""Behaviour comparison: our CLI, `etcdctl defrag --cluster` and ahrtr/etcd-defrag when things go wrong.

Run from the repository root (each takes 2-4 minutes):

    .venv/bin/python bench/behaviour.py --etcd-version 3.5
    .venv/bin/python bench/behaviour.py --etcd-version 3.6 --etcd-defrag PATH

Every tool meets every scenario on a real 3-member cluster (tests/etcd_harness.py, loopback only),
and what happened is read from etcd itself, not from the tools: each member's own log says when it
defragmented (the backend's "defragmenting" ... "defragmented" lines), its status says who led, the
alarm list says whether NOSPACE is still raised. The scenarios:

- healthy: nothing goes wrong. The order the members were defragmented in, the leader's place in
  it, what the tool printed and its exit code.
- member down: a follower is SIGKILLed before the run.
- killed mid-run: when the first member's defragmentation starts (seen in its log), a member that is
  neither that one nor the leader is SIGKILLed. The kill lands while that defragmentation is still
  going on (checked against the log; the table says when it did not).
- leader moved: at the same moment, leadership is transferred from the leader to that third member,
  so the member the tool was going to visit in the middle is now the leader.
- NOSPACE: a cluster with a 16 MiB quota fills with overwrites of the same keys until etcd raises
  NOSPACE; every member's file is then mostly history that compaction frees. The rule is
  `dbQuotaUsage > 0.8`, the quota half of etcd-defrag's documented example. Our CLI runs with
  `--compact`, etcd-defrag compacts by default, etcdctl has no compaction of its own.

The first four scenarios restore one template (24 MiB live + 24 MiB free pages per member, built
once per run of this script by bench/defrag_overhead.py's build_template) before every tool, so each
tool faces the same files; the NOSPACE scenario fills a fresh cluster per tool. Our CLI needs the
NOSPACE lock tokens in etcd (docs/locking.md), which any run with space writes: in the NOSPACE
scenario it runs once with nothing to do (rule `false`) before the cluster fills up, as `serve` or an
earlier run would have done in production.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# This file's folder is first on sys.path when run as a script: importing the sibling benchmark
# first lets it take bench/ off sys.path (bench/exporter.py would shadow the `exporter` package)
# and put tests/ on it, before anything imports `exporter` or the harness.
import defrag_overhead as bench  # isort: skip

import etcd_harness
from etcd_harness import NOSPACE_ERROR, DefragInterval, EtcdCluster, EtcdRequestError, start_cluster

MIB = 1024 * 1024
TEMPLATE = bench.Scale(
    live_bytes=24 * MIB, trials=1, baseline_seconds=0.0, write_rate_per_second=0.0, write_timeout_seconds=0.0
)
NOSPACE_QUOTA_BYTES = 16 * MIB
NOSPACE_RULE = "dbQuotaUsage > 0.8"
FILL_KEYS = 32  # overwritten again and again: 2 MiB live, the rest of the quota history
FILL_VALUE_BYTES = 64 * 1024
TOOL_TIMEOUT_SECONDS = 300
WATCH_INTERVAL_SECONDS = 0.005
LINE_CHARS = 90  # output lines are cut to this in the table


# --- the tools, as an operator runs them (default timeouts) ------------------------------------


@dataclass(frozen=True)
class Tool:
    """One tool's command line for a cluster, given the scenario's rule and whether it compacts."""

    name: str
    command: Callable[[EtcdCluster, str, bool], list[str]]
    nospace_only: bool = False


def ours(cluster: EtcdCluster, rule: str, compact: bool) -> list[str]:
    """`etcd-autodefrag defrag`, every member found from the endpoints' member list."""
    return [str(bench.CLI_BIN), "defrag", "--endpoints", ",".join(cluster.endpoints), "--rule", rule] + (
        ["--compact"] if compact else []
    )


def etcdctl(cluster: EtcdCluster, rule: str, compact: bool) -> list[str]:
    """`etcdctl defrag --cluster`: it has no rule and no compaction, so both are ignored."""
    return [etcd_harness.ETCDCTL_BIN, "--endpoints=" + ",".join(cluster.endpoints), "defrag", "--cluster"]


def etcd_defrag(binary: Path, *extra: str) -> Callable[[EtcdCluster, str, bool], list[str]]:
    """etcd-defrag with its recommended `--cluster --defrag-rule`, and `extra` flags."""

    def command(cluster: EtcdCluster, rule: str, compact: bool) -> list[str]:
        return [
            str(binary),
            "--endpoints=" + ",".join(cluster.endpoints),
            "--cluster",
            f"--defrag-rule={rule}",
            f"--compaction={str(compact).lower()}",
            *extra,
        ]

    return command


def tools(etcd_defrag_bin: Path) -> list[Tool]:
    """Our CLI, etcdctl, and etcd-defrag when its binary is here (twice for NOSPACE: as recommended, and
    with its quota flag set to the real quota and --auto-disalarm)."""
    found = [Tool("etcd-autodefrag", ours), Tool("etcdctl", etcdctl)]
    if not os.access(etcd_defrag_bin, os.X_OK):
        print(f"skipping etcd-defrag: no executable at {etcd_defrag_bin} (see docs/benchmarks.md)")
        return found
    configured = etcd_defrag(
        etcd_defrag_bin, f"--etcd-storage-quota-bytes={NOSPACE_QUOTA_BYTES}", "--auto-disalarm"
    )
    return [
        *found,
        Tool("etcd-defrag", etcd_defrag(etcd_defrag_bin)),
        Tool("etcd-defrag +quota +auto-disalarm", configured, nospace_only=True),
    ]


# --- watching etcd ---------------------------------------------------------------------------------


class Logs:
    """The members' logs from now on: defragmentations as etcd recorded them."""

    def __init__(self, cluster: EtcdCluster) -> None:
        self._cluster = cluster
        self._offsets = {m.name: _size(m.log_path) for m in cluster.members}

    def _new_text(self, name: str) -> str:
        member = self._cluster.member(name)
        with member.log_path.open("rb") as log:
            log.seek(self._offsets[name])
            return log.read().decode(errors="replace")

    def first_defrag_started(self) -> str | None:
        """The member whose defragmentation began first, if any has."""
        for member in self._cluster.members:
            if '"msg":"defragmenting"' in self._new_text(member.name):
                return member.name
        return None

    def defrags(self) -> list[DefragInterval]:
        """Every defragmentation since this object was made, by start time."""
        found = [
            interval
            for member in self._cluster.members
            for interval in etcd_harness.parse_defrag_intervals(member.name, self._new_text(member.name))
        ]
        return sorted(found, key=lambda interval: interval.started)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def leader_name(cluster: EtcdCluster) -> str:
    return cluster.leader().name


def member_id(cluster: EtcdCluster, name: str) -> str:
    return str(cluster.member(name).status()["header"]["member_id"])


def bystander(cluster: EtcdCluster, busy: str, leader: str) -> str:
    """A member that is neither defragmenting now nor leading (the first by name)."""
    return sorted(m.name for m in cluster.members if m.name not in (busy, leader))[0]


# --- one scenario, one tool -------------------------------------------------------------------------


@dataclass
class Outcome:
    """What etcd and the tool showed after one tool met one scenario."""

    scenario: str
    tool: str
    exit_code: int
    lines: list[str]
    defrags: list[DefragInterval]
    leaders: list[tuple[datetime, str]]  # (from when, who led), oldest first
    down: tuple[datetime, str] | None = None  # (since when, which member) was down
    alarms_after: list[str] = field(default_factory=list)
    put_after: str = ""
    notes: list[str] = field(default_factory=list)

    def leader_at(self, when: datetime) -> str:
        current = self.leaders[0][1]
        for since, name in self.leaders:
            if since <= when:
                current = name
        return current


Action = Callable[[EtcdCluster, str, str], tuple[str, str]]


def kill_bystander(cluster: EtcdCluster, busy: str, leader: str) -> tuple[str, str]:
    victim = bystander(cluster, busy, leader)
    cluster.member(victim).kill()
    return victim, f"killed {victim} during {busy}'s defrag"


def move_leader(cluster: EtcdCluster, busy: str, leader: str) -> tuple[str, str]:
    target = bystander(cluster, busy, leader)
    try:
        cluster.request(
            "/v3/maintenance/transfer-leadership",
            {"targetID": member_id(cluster, target)},
            endpoint=cluster.member(leader).client_url,
        )
    except (OSError, EtcdRequestError) as error:
        return target, f"moving the leader to {target} failed: {error}"
    return target, f"moved the leader {leader} -> {target} during {busy}'s defrag"


def run_tool(
    cluster: EtcdCluster, scenario: str, tool: Tool, rule: str, compact: bool, action: Action | None = None
) -> Outcome:
    """Run the tool; with `action`, do it the moment the first defragmentation starts."""
    logs = Logs(cluster)
    leader = leader_name(cluster)
    outcome = Outcome(scenario, tool.name, 0, [], [], [(datetime.now(UTC), leader)])
    dead = [m.name for m in cluster.members if not m.running]
    if dead:
        outcome.down = (datetime.now(UTC), dead[0])
    acted_at: datetime | None = None
    with subprocess.Popen(
        tool.command(cluster, rule, compact), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        deadline = time.monotonic() + TOOL_TIMEOUT_SECONDS
        while action is not None and process.poll() is None and time.monotonic() < deadline:
            busy = logs.first_defrag_started()
            if busy is not None:
                target, note = action(cluster, busy, leader)
                acted_at = datetime.now(UTC)
                outcome.notes.append(note)
                if action is kill_bystander:
                    outcome.down = (acted_at, target)
                elif "failed" not in note:
                    outcome.leaders.append((acted_at, target))
                break
            time.sleep(WATCH_INTERVAL_SECONDS)
        output, _ = process.communicate(timeout=TOOL_TIMEOUT_SECONDS)
        outcome.exit_code = process.returncode
    outcome.lines = [line for line in output.splitlines() if line.strip()]
    outcome.defrags = logs.defrags()
    if action is not None and acted_at is None:
        outcome.notes.append("no defragmentation started: nothing to act on")
    elif acted_at is not None and outcome.defrags:
        first = outcome.defrags[0]
        if first.finished is not None and first.finished < acted_at:
            outcome.notes.append("(that action landed after the first defrag had finished)")
    if action is move_leader and acted_at is not None and cluster.running_members():
        now_leading = leader_name(cluster)
        if now_leading != outcome.leaders[-1][1]:
            outcome.notes.append(f"{now_leading} led at the end")
    outcome.alarms_after = [a.get("alarm", "?") for a in cluster.alarms()]
    try:
        cluster.put("/bench/behaviour/after", b"x")
        outcome.put_after = "ok"
    except EtcdRequestError as error:
        outcome.put_after = "NOSPACE" if NOSPACE_ERROR in error.message else error.message[:60]
    return outcome


def fill_with_history(cluster: EtcdCluster) -> None:
    """Overwrite FILL_KEYS keys until etcd refuses with NOSPACE; the file is then mostly history."""
    value = b"h" * FILL_VALUE_BYTES
    rounds = 10_000
    for _ in range(rounds):
        try:
            cluster.put_many((f"/bench/fill/{i:03d}", value) for i in range(FILL_KEYS))
        except EtcdRequestError as error:
            if NOSPACE_ERROR not in error.message:
                raise
            break
    else:
        raise RuntimeError(f"{rounds} rounds did not exhaust a {NOSPACE_QUOTA_BYTES}-byte quota")
    cluster.wait(
        lambda: any(a.get("alarm") == "NOSPACE" for a in cluster.alarms()),
        timeout=10,
        what="the NOSPACE alarm to be listed",
    )


# --- the table ------------------------------------------------------------------------------------


def _short(line: str) -> str:
    # A leading date and time (Go's log prefix "2025/08/23 13:00:04 ", or "2025-08-23 13:00:04,123")
    # says nothing here.
    words = line.split(" ", 2)
    if (
        len(words) == 3
        and (words[0].count("/") == 2 or words[0].count("-") == 2)
        and words[1].count(":") == 2
    ):
        line = words[2]
    line = line.replace("|", "\\|")
    return line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"


def order_cell(outcome: Outcome) -> str:
    if not outcome.defrags:
        return "none"
    cells = []
    for interval in outcome.defrags:
        mark = " (leader)" if outcome.leader_at(interval.started) == interval.member else ""
        unfinished = " (died in it)" if interval.finished is None else ""
        cells.append(f"{interval.member}{mark}{unfinished}")
    return " → ".join(cells)


def leader_last_cell(outcome: Outcome) -> str:
    led = [i for i, d in enumerate(outcome.defrags) if outcome.leader_at(d.started) == d.member]
    if not led:
        return "no leader defragmented" if outcome.defrags else "-"
    return "yes" if led == [len(outcome.defrags) - 1] else "**no**"


def while_down_cell(outcome: Outcome) -> str:
    if outcome.down is None:
        return "-"
    since, who = outcome.down
    during = [d.member for d in outcome.defrags if d.member != who and d.started >= since]
    return f"**{', '.join(during)}** ({who} down)" if during else f"none ({who} down)"


TABLE_HEADER = (
    "| scenario | tool | exit | defragmented, in order (leader = leader at that moment) | leader last "
    "| defragmented while a member was down | alarms after | put after | first line | last line | notes |\n"
    "|---|---|---:|---|---|---|---|---|---|---|---|"
)


def table_row(o: Outcome) -> str:
    """One Markdown table row (TABLE_HEADER's columns)."""
    first = _short(o.lines[0]) if o.lines else ""
    last = _short(o.lines[-1]) if len(o.lines) > 1 else ""
    return (
        f"| {o.scenario} | {o.tool} | {o.exit_code} | {order_cell(o)} | {leader_last_cell(o)} "
        f"| {while_down_cell(o)} | {', '.join(o.alarms_after) or 'none'} | {o.put_after} "
        f"| `{first}` | `{last}` ({len(o.lines)} lines) | {'; '.join(o.notes)} |"
    )


# --- the scenarios --------------------------------------------------------------------------------


def restored_scenarios(cluster: EtcdCluster, template: Path, tool_list: list[Tool]) -> list[Outcome]:
    """healthy, member down, killed mid-run, leader moved: each tool on freshly restored data."""
    outcomes = []
    for scenario in ("healthy", "member down", "killed mid-run", "leader moved"):
        for tool in tool_list:
            if tool.nospace_only:
                continue
            bench.restore(cluster, template)
            action: Action | None = None
            if scenario == "member down":
                cluster.member(bystander(cluster, "", leader_name(cluster))).kill()
            elif scenario == "killed mid-run":
                action = kill_bystander
            elif scenario == "leader moved":
                action = move_leader
            outcome = run_tool(cluster, scenario, tool, bench.RULE, compact=False, action=action)
            print(table_row(outcome), flush=True)
            outcomes.append(outcome)
    return outcomes


def nospace_scenario(root: Path, tool_list: list[Tool]) -> list[Outcome]:
    """Each tool on a fresh cluster that filled its quota with history."""
    outcomes = []
    for tool in tool_list:
        cluster = start_cluster(root, size=3, quota_bytes=NOSPACE_QUOTA_BYTES, log_level="info")
        try:
            if tool.command is ours:
                # A run with space and nothing to do writes the NOSPACE lock tokens (docs/locking.md).
                subprocess.run(ours(cluster, "false", False), capture_output=True, check=True, timeout=120)
            fill_with_history(cluster)
            outcome = run_tool(cluster, "NOSPACE", tool, NOSPACE_RULE, compact=True)
            sizes = {name: int(s["dbSize"]) for name, s in cluster.statuses().items()}
            outcome.notes.append(
                f"files after: {', '.join(f'{s / MIB:.1f}' for s in sizes.values())} MiB "
                f"(quota {NOSPACE_QUOTA_BYTES / MIB:.0f})"
            )
            print(table_row(outcome), flush=True)
            outcomes.append(outcome)
        finally:
            cluster.stop()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_tool_arguments(parser)
    parser.add_argument("--workdir", type=Path, help="where the clusters live (default: a temporary dir)")
    args = parser.parse_args()
    etcd_version = bench.use_etcd(args.etcd_version)
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/behaviour.py', *sys.argv[1:]])}")
    print(f"{bench.machine_facts()}; {etcd_version}", flush=True)
    tool_list = tools(args.etcd_defrag)
    root = Path(tempfile.mkdtemp(prefix="bench-behaviour-", dir=args.workdir))
    started = time.monotonic()
    cluster: EtcdCluster | None = None
    try:
        cluster, template, _ = bench.build_template(root, TEMPLATE, log_level="info")
        example = [t.command(cluster, bench.RULE, False) for t in tool_list if not t.nospace_only]
        print("\n".join(f"$ {shlex.join(command)}" for command in example), flush=True)
        outcomes = restored_scenarios(cluster, template, tool_list)
        cluster.stop()
        cluster = None
        outcomes += nospace_scenario(root, tool_list)
        print(f"\n{TABLE_HEADER}")
        print("\n".join(table_row(o) for o in outcomes))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"total {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
