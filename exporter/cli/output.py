"""What `status` prints: the rows of a snapshot and the text table."""

import logging
from collections.abc import Callable, Sequence
from typing import Any

from exporter.core.policy import (
    QuorumCost,
    fragmentation_ratio,
    free_bytes,
    quorum_cost,
    quota_usage_ratio,
)
from exporter.core.snapshot import ClusterSnapshot
from exporter.core.units import human_bytes

log = logging.getLogger("etcd_autodefrag")


def status_rows(snapshot: ClusterSnapshot, *, whole_cluster: bool = True) -> list[dict[str, Any]]:
    """One dict per member, the columns of `status`.

    `whole_cluster` False (no member discovery): the rows are the given members only, too few to
    say what a defrag costs the quorum, so `defrag_cost` is null.
    """
    rows = []
    alarms: dict[int, list[str]] = {}
    for alarm in snapshot.alarms:
        alarms.setdefault(alarm.member_id, []).append(alarm.kind.value)
    voters = [m for m in snapshot.members if not m.member.is_learner]
    cost, cost_reason = quorum_cost(voting=len(voters), healthy_voting=sum(m.up for m in voters))
    for m in snapshot.members:
        s = m.status
        usage = quota_usage_ratio(s) if s else None
        rows.append(
            {
                "endpoint": m.endpoint,
                "id": f"{m.member.id or (s.member_id if s else 0):x}",
                "name": m.member.name,
                "version": s.version if s else None,
                "db_size_bytes": s.db_size_bytes if s else None,
                "db_size_in_use_bytes": s.db_size_in_use_bytes if s else None,
                "db_free_bytes": free_bytes(s) if s else None,
                "fragmentation_ratio": round(fragmentation_ratio(s), 4) if s else None,
                "quota_bytes": s.quota_bytes if s and s.quota_bytes else None,
                "quota_usage_ratio": round(usage, 4) if usage is not None else None,
                "is_leader": bool(s and s.member_id == snapshot.leader_id),
                "is_learner": m.member.is_learner,
                "raft_term": s.raft_term if s else None,
                "raft_index": s.raft_index if s else None,
                "raft_applied_index": s.raft_applied_index if s else None,
                "alarms": alarms.get(m.member.id or (s.member_id if s else 0), []),
                "defrag_recommended": bool(m.verdict and m.verdict.defrag),
                "reason": m.verdict.reason if m.verdict else m.error,
                "error": m.error,
                # What defragmenting this member would cost the cluster (exporter.core.policy.quorum_cost).
                "defrag_cost": (None if not whole_cluster else "none" if m.member.is_learner else cost.value),
                "defrag_cost_reason": (
                    "not known: only the given members were asked (no member discovery)"
                    if not whole_cluster
                    else "learner: never defragmented"
                    if m.member.is_learner
                    else cost_reason
                ),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an etcdctl-style table."""
    columns: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("NAME", lambda r: r["name"]),
        ("ENDPOINT", lambda r: r["endpoint"]),
        ("ID", lambda r: r["id"]),
        ("VERSION", lambda r: r["version"] or "-"),
        ("DB SIZE", lambda r: _size(r["db_size_bytes"])),
        ("IN USE", lambda r: _size(r["db_size_in_use_bytes"])),
        ("FREE", lambda r: _size(r["db_free_bytes"])),
        ("FRAG", lambda r: _pct(r["fragmentation_ratio"])),
        ("QUOTA", lambda r: _size(r["quota_bytes"])),
        ("QUOTA USE", lambda r: _pct(r["quota_usage_ratio"])),
        ("LEADER", lambda r: "true" if r["is_leader"] else "false"),
        ("LEARNER", lambda r: "true" if r["is_learner"] else "false"),
        ("TERM", lambda r: _num(r["raft_term"])),
        ("INDEX", lambda r: _num(r["raft_index"])),
        ("APPLIED", lambda r: _num(r["raft_applied_index"])),
        ("ALARMS", lambda r: ",".join(r["alarms"])),
        ("DEFRAG?", lambda r: "yes" if r["defrag_recommended"] else "no"),
    ]
    cells = [[head for head, _ in columns]] + [[str(get(r)) for _, get in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [rule]
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append(rule)
    lines.append(rule)
    for r in rows:
        if r["reason"]:
            lines.append(f"{r['name'] or r['endpoint']}: {r['reason']}")
    costs = {
        (r["defrag_cost"], r["defrag_cost_reason"])
        for r in rows
        if r["defrag_cost"] not in (QuorumCost.NONE, None)
    }
    for cost, reason in sorted(costs):
        lines.append(f"defrag risk ({cost}): {reason}")
    return "\n".join(lines)


def _size(value: int | None) -> str:
    return human_bytes(value) if value is not None else "-"


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def _num(value: int | None) -> str:
    return str(value) if value is not None else "-"
