"""Simulation: alert-triggered defrags (our rule) against a nightly CronJob, over 30 days of churn.

Run from the repository root (pure Python, no etcd, deterministic, a few seconds):

    .venv/bin/python bench/policy_simulation.py            # the table in docs/benchmarks.md
    .venv/bin/python bench/policy_simulation.py --quick    # 7 days, headline trace only

The model, one 3-member etcd cluster in steps of 5 minutes (the API server's compaction interval),
counted over 30 days after one day of warm-up:

* Every member applies the same writes. Each write is a new revision of a key; the revision it
  supersedes (or a deleted object) stays in the database as *history* until compaction.
* The API server compacts every 5 minutes up to the revision it saw at its previous compaction
  (kube-apiserver --etcd-compaction-interval=5m), so 5 to 10 minutes of history are kept.
  What compaction frees becomes free pages, reused by bbolt before the file grows.
* bbolt grows the file only when the pages in use (live + history) need more than the file holds
  in reusable free pages: size = max(size, live + history + stranded). `stranded` is the one
  imperfection modelled: a small share of the bytes each compaction frees (STRAND_RATIO, 0.2%)
  ends up in free runs too short for the multi-page values written later (bbolt allocates
  contiguous pages for a value), unusable until a defrag. With 0 (the `busy, no stranding` row),
  defragmenting can never lower the peak, it only shrinks files in quiet times.
* etcd reports dbSize = the file size and dbSizeInUse = live + history (free pages, stranded ones
  included, are the difference), and raises NOSPACE when the file reaches the quota (etcd checks
  the backend size, free pages included, against --quota-backend-bytes).
* A defrag of a member sets size = live + history, stranded = 0, and blocks the member for
  in_use / DEFRAG_BYTES_PER_SECOND (100 MiB/s: a defrag rewrites every page in use).

The two policies:

(a) ours: every 5 minutes the exporter evaluates the cluster's rule on each member's status
    (`exporter.core.policy.evaluate` with `cluster_rule(ClusterConfig(...))`: the default thresholds,
    dbSizeFree >= 100 MiB && (dbSizeFree >= 0.5 * dbSize || dbQuotaUsage > 0.8)). The alerts in
    alerts/etcd-autodefrag-rules.yaml that launch runs are modelled with their shipped `for`:
    EtcdDefragRecommended (rule selects a member, 15 min), EtcdQuotaUsageCritical (size > 90% of
    the quota, 5 min) and EtcdNoSpaceAlarm (none). Alertmanager re-sends a firing alert every hour
    (repeat_interval); the webhook launches a run unless one ended less than the cooldown (1 h) ago.
    A run is the engine's plan (`exporter.core.policy.make_plan`): the rule is evaluated again on fresh
    statuses and only the members it selects are defragmented (all of them under NOSPACE).
(b) cron: a CronJob at 00:00 every day that defragments every member (etcdctl defrag --cluster).
(c) never: no defragmentation, for reference.
"""

import argparse
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and bench/exporter.py would shadow the
# `exporter` package; the package is imported only after this line.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from pydantic import ValidationError  # noqa: E402

from exporter.config.settings import ClusterConfig, format_validation_error  # noqa: E402
from exporter.core.model import Member, MemberStatus  # noqa: E402
from exporter.core.policy import cluster_rule, evaluate, make_plan  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
SEED = 20240601
STEP_MINUTES = 5  # = the API server's compaction interval
STEPS_PER_DAY = 24 * 60 // STEP_MINUTES
QUOTA_BYTES = 8 * GIB  # the largest quota etcd recommends; kubeadm and most managed offerings use it
MEMBERS = 3
# Members apply the same writes but their freelists differ: a per-member factor on stranding.
MEMBER_STRAND_FACTORS = (0.9, 1.0, 1.1)
STRAND_RATIO = 0.002
DEFRAG_BYTES_PER_SECOND = 100 * MIB
# The shipped alerts and Alertmanager/webhook settings (alerts/, exporter/kubernetes/jobs.py).
RECOMMENDED_FOR_MINUTES = 15  # EtcdDefragRecommended
CRITICAL_USAGE_RATIO = 0.9  # EtcdQuotaUsageCritical
CRITICAL_FOR_MINUTES = 5
REPEAT_INTERVAL_MINUTES = 60  # Alertmanager repeat_interval
COOLDOWN_MINUTES = 60  # executor.cooldown_seconds
WARNING_USAGE_RATIO = 0.8  # EtcdQuotaUsageWarning: time above it is reported
CRON_MINUTE_OF_DAY = 0
# The first day only fills the files up to their daily high-water mark (and a CronJob at minute 0
# would defragment freshly loaded files): it runs under each policy but is not counted.
WARMUP_DAYS = 1
WASTED_BELOW_BYTES = 100 * MIB  # a defrag that gives back less than this was not worth blocking for


# --- traces ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """A 30-day workload: live data, write volume with a daily cycle, and bursts."""

    name: str
    description: str
    live_start_bytes: float = 1.5 * GIB
    live_growth_bytes_per_day: float = 10 * MIB
    # Bytes of new revisions per hour, averaged over the day: ~150 writes/s of ~3 KiB objects (pod
    # and node status, leases, events, endpoint slices of a cluster with a few hundred nodes).
    write_bytes_per_hour: float = 1.5 * GIB
    daily_amplitude: float = 0.6  # writes peak at (1 + a) x the mean at 14:00, (1 - a) x at 02:00
    weekend_factor: float = 0.7
    noise_sigma: float = 0.25  # log-normal noise on each step's writes
    bursts_per_week: float = 1.0
    burst_live_bytes: tuple[float, float] = (300 * MIB, 800 * MIB)  # objects created, deleted later
    burst_hours: tuple[float, float] = (1.0, 4.0)
    burst_write_factor: float = 2.0
    nightly_batch_bytes: float = 0.0  # objects created at 01:00 and deleted at 04:00 every day
    strand_ratio: float = STRAND_RATIO


TRACES = (
    Trace(
        "busy",
        "1.5 GiB live (+10 MiB/day), 1.5 GiB/h of writes with a daily cycle, 1 burst/week",
    ),
    Trace(
        "busy, no stranding",
        "busy, with perfect free-page reuse (the model without stranding)",
        strand_ratio=0.0,
    ),
    Trace(
        "steady",
        "1.5 GiB live, flat 1 GiB/h of writes, no bursts",
        live_growth_bytes_per_day=0.0,
        write_bytes_per_hour=1.0 * GIB,
        daily_amplitude=0.0,
        weekend_factor=1.0,
        noise_sigma=0.1,
        bursts_per_week=0.0,
    ),
    Trace(
        "bursty",
        "busy + 4 bursts/week of 0.5-2 GiB of objects living 1-6 h, 3x writes meanwhile",
        bursts_per_week=4.0,
        burst_live_bytes=(512 * MIB, 2 * GIB),
        burst_hours=(1.0, 6.0),
        burst_write_factor=3.0,
    ),
    Trace(
        "fast-growing",
        "busy with live data growing 150 MiB/day (1.5 GiB to 6 GiB over the 31 days)",
        live_growth_bytes_per_day=150 * MIB,
    ),
    Trace(
        "nightly batch",
        "busy + 1.5 GiB of objects created at 01:00 and deleted at 04:00 every night",
        nightly_batch_bytes=1.5 * GIB,
    ),
)


@dataclass(frozen=True)
class Workload:
    """A trace turned into per-step series (deterministic for a seed)."""

    writes_bytes: list[float]  # new revisions written during the step
    live_bytes: list[float]  # live data at the end of the step


def workload(trace: Trace, days: int, seed: int) -> Workload:
    """The per-step writes and live data of `trace` over `days`."""
    rng = random.Random(f"{seed}/{trace.name}")
    steps = days * STEPS_PER_DAY
    burst_live = [0.0] * steps
    burst_writes = [1.0] * steps
    for _ in range(_poisson(rng, trace.bursts_per_week * days / 7)):
        start = rng.randrange(steps)
        length = max(1, round(rng.uniform(*trace.burst_hours) * 60 / STEP_MINUTES))
        size = rng.uniform(*trace.burst_live_bytes)
        for step in range(start, min(steps, start + length)):
            burst_live[step] += size
            burst_writes[step] *= trace.burst_write_factor
    writes, live = [], []
    per_step = trace.write_bytes_per_hour * STEP_MINUTES / 60
    for step in range(steps):
        minute = step * STEP_MINUTES
        hour = minute / 60 % 24
        day = minute // (24 * 60)
        diurnal = 1 + trace.daily_amplitude * math.cos(2 * math.pi * (hour - 14) / 24)
        weekend = trace.weekend_factor if day % 7 >= 5 else 1.0  # day 0 is a Monday
        noise = rng.lognormvariate(-(trace.noise_sigma**2) / 2, trace.noise_sigma)
        writes.append(per_step * diurnal * weekend * noise * burst_writes[step])
        batch = trace.nightly_batch_bytes if 1 <= hour < 4 else 0.0
        live.append(
            trace.live_start_bytes
            + trace.live_growth_bytes_per_day * minute / 1440
            + burst_live[step]
            + batch
        )
    return Workload(writes, live)


def _poisson(rng: random.Random, mean: float) -> int:
    count, threshold, product = 0, math.exp(-mean), rng.random()
    while product > threshold:
        count += 1
        product *= rng.random()
    return count


# --- the database of one member ------------------------------------------------------------------


@dataclass
class Database:
    """One member's bbolt file, as the model sees it."""

    strand_factor: float
    live_bytes: float
    history_bytes: float = 0.0
    stranded_bytes: float = 0.0
    size_bytes: float = 0.0

    def __post_init__(self) -> None:
        self.size_bytes = self.live_bytes

    @property
    def in_use_bytes(self) -> float:
        """What etcd reports as dbSizeInUse."""
        return self.live_bytes + self.history_bytes

    def step(self, writes_bytes: float, live_bytes: float, strand_ratio: float) -> None:
        """Apply one step of writes, grow the file if needed, then compact."""
        deleted = max(self.live_bytes - live_bytes, 0.0)
        self.live_bytes = live_bytes
        self.history_bytes += writes_bytes + deleted  # superseded revisions and deleted objects
        # Reusable free pages are taken first; the file grows only for what they cannot hold.
        self.size_bytes = max(self.size_bytes, self.in_use_bytes + self.stranded_bytes)
        # Compaction to the revision of the previous compaction: this step's history stays.
        kept = writes_bytes + deleted
        freed = self.history_bytes - kept
        self.history_bytes = kept
        free = self.size_bytes - self.in_use_bytes
        self.stranded_bytes = min(self.stranded_bytes + strand_ratio * self.strand_factor * freed, free)

    def defragment(self) -> tuple[float, float]:
        """Rewrite the file with only the pages in use; returns (bytes reclaimed, seconds blocked)."""
        reclaimed = self.size_bytes - self.in_use_bytes
        self.size_bytes = self.in_use_bytes
        self.stranded_bytes = 0.0
        return reclaimed, self.in_use_bytes / DEFRAG_BYTES_PER_SECOND

    def status(self, member_id: int) -> MemberStatus:
        """The member's status as the exporter would read it (sizes in whole 4 KiB pages)."""
        return MemberStatus(
            endpoint=f"http://member-{member_id}:2379",
            member_id=member_id,
            leader_id=1,
            cluster_id=1,
            version="3.4.23",
            db_size_bytes=int(self.size_bytes) // 4096 * 4096,
            db_size_in_use_bytes=int(self.in_use_bytes) // 4096 * 4096,
            raft_index=0,
            raft_applied_index=0,
            raft_term=1,
            quota_bytes=QUOTA_BYTES,
        )


# --- policies ---------------------------------------------------------------------------------------

MEMBER_LIST = [
    Member(id=i, name=f"etcd-{i - 1}", peer_urls=(), client_urls=(f"http://member-{i}:2379",))
    for i in range(1, MEMBERS + 1)
]


class Policy:
    """Decides, once per step, which members to defragment now."""

    name = ""

    def choose(self, minute: int, databases: Sequence[Database]) -> list[int]:
        """Indexes of the members to defragment at `minute` (one run when not empty)."""
        raise NotImplementedError


class Never(Policy):
    """No defragmentation at all."""

    name = "never"

    def choose(self, minute: int, databases: Sequence[Database]) -> list[int]:
        """Nothing, ever."""
        return []


class NightlyCron(Policy):
    """`etcdctl defrag --cluster` from a CronJob at midnight: every member, no questions asked."""

    name = "cron"

    def choose(self, minute: int, databases: Sequence[Database]) -> list[int]:
        """Every member at 00:00."""
        return list(range(len(databases))) if minute % 1440 == CRON_MINUTE_OF_DAY else []


@dataclass
class _Alert:
    """Prometheus `for` semantics: pending from the first true evaluation, firing after `for`."""

    for_minutes: int
    active_since: int | None = None

    def evaluate(self, minute: int, condition: bool) -> bool:
        """Whether the alert fires at this evaluation."""
        if not condition:
            self.active_since = None
            return False
        if self.active_since is None:
            self.active_since = minute
        return minute - self.active_since >= self.for_minutes


@dataclass
class AlertTriggered(Policy):
    """Our path: rule -> gauges -> alerts -> Alertmanager -> webhook (cooldown) -> engine plan."""

    name = "ours"
    recommended: _Alert = field(default_factory=lambda: _Alert(RECOMMENDED_FOR_MINUTES))
    critical: _Alert = field(default_factory=lambda: _Alert(CRITICAL_FOR_MINUTES))
    last_sent: int | None = None
    last_run: int | None = None
    rule_text: str | None = None  # None: the default thresholds

    def __post_init__(self) -> None:
        config = ClusterConfig(name="simulated", endpoints=["http://member-1:2379"], rule=self.rule_text)
        self.rule = cluster_rule(config)

    def choose(self, minute: int, databases: Sequence[Database]) -> list[int]:
        """Members the engine's plan defragments, when an acting alert reaches the webhook."""
        statuses = [db.status(member.id) for db, member in zip(databases, MEMBER_LIST, strict=True)]
        nospace = any(s.db_size_bytes >= QUOTA_BYTES for s in statuses)
        recommended = any(evaluate(self.rule, s, nospace=nospace).defrag for s in statuses)
        critical = any(s.db_size_bytes > CRITICAL_USAGE_RATIO * QUOTA_BYTES for s in statuses)
        firing = [
            self.recommended.evaluate(minute, recommended),
            self.critical.evaluate(minute, critical),
            nospace,  # EtcdNoSpaceAlarm has no `for`
        ]
        if not any(firing):
            self.last_sent = None  # resolved: the next firing is a new notification
            return []
        if self.last_sent is not None and minute - self.last_sent < REPEAT_INTERVAL_MINUTES:
            return []
        self.last_sent = minute
        if self.last_run is not None and minute - self.last_run < COOLDOWN_MINUTES:
            return []  # the webhook answers skip_cooldown
        self.last_run = minute
        plan = make_plan(
            rule=self.rule,
            members=MEMBER_LIST,
            statuses={s.member_id: s for s in statuses},
            endpoints={m.id: m.client_urls[0] for m in MEMBER_LIST},
            nospace=nospace,
        )
        return [p.member.id - 1 for p in plan.to_defrag]


# --- running a policy over a workload ------------------------------------------------------------


@dataclass
class Outcome:
    """What a policy did over the whole workload."""

    runs: int = 0
    member_defrags: int = 0
    blocked_member_seconds: float = 0.0
    reclaimed_bytes: float = 0.0
    wasted_defrags: int = 0
    peak_usage_ratio: float = 0.0
    minutes_above_warning: int = 0
    minutes_nospace: int = 0


def simulate(trace: Trace, load: Workload, policy: Policy) -> Outcome:
    """Play the workload on a fresh cluster under `policy`; the first WARMUP_DAYS are not counted."""
    databases = [Database(factor, load.live_bytes[0]) for factor in MEMBER_STRAND_FACTORS]
    outcome = Outcome()
    warm_up = Outcome()  # what happens before the files reach their daily high-water mark
    for step, (writes, live) in enumerate(zip(load.writes_bytes, load.live_bytes, strict=True)):
        for db in databases:
            db.step(writes, live, trace.strand_ratio)
        counted = outcome if step >= WARMUP_DAYS * STEPS_PER_DAY else warm_up
        _account(counted, step, databases, policy)
    return outcome


def _account(outcome: Outcome, step: int, databases: list[Database], policy: Policy) -> None:
    """Record one step's quota use, then let the policy act and record its defrags."""
    usage = max(db.size_bytes for db in databases) / QUOTA_BYTES
    outcome.peak_usage_ratio = max(outcome.peak_usage_ratio, usage)
    outcome.minutes_above_warning += STEP_MINUTES if usage > WARNING_USAGE_RATIO else 0
    outcome.minutes_nospace += STEP_MINUTES if usage >= 1.0 else 0
    chosen = policy.choose(step * STEP_MINUTES, databases)
    if chosen:
        outcome.runs += 1
    for index in chosen:
        reclaimed, blocked = databases[index].defragment()
        outcome.member_defrags += 1
        outcome.blocked_member_seconds += blocked
        outcome.reclaimed_bytes += reclaimed
        outcome.wasted_defrags += reclaimed < WASTED_BELOW_BYTES


def policies(recommended_for_minutes: int, rule: str | None = None) -> tuple[Callable[[], Policy], ...]:
    """Fresh-policy factories, ours first."""
    return (
        lambda: AlertTriggered(recommended=_Alert(recommended_for_minutes), rule_text=rule),
        NightlyCron,
        Never,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7 days, the headline trace only")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--for-minutes",
        type=int,
        default=RECOMMENDED_FOR_MINUTES,
        help=f"`for` of EtcdDefragRecommended (shipped: {RECOMMENDED_FOR_MINUTES})",
    )
    parser.add_argument(
        "--rule",
        metavar="EXPR",
        help="ours with this defrag rule (etcd-defrag syntax) instead of the default thresholds",
    )
    args = parser.parse_args()
    if args.rule is not None:
        try:
            ClusterConfig(name="simulated", endpoints=["http://member-1:2379"], rule=args.rule)
        except ValidationError as exc:
            parser.error("--rule: " + "\n".join(format_validation_error(exc).splitlines()[1:]).strip())
    days = 7 if args.quick else args.days
    traces = TRACES[:1] if args.quick else TRACES
    started = time.perf_counter()
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/policy_simulation.py', *sys.argv[1:]])}")
    print(
        f"{days} days (after {WARMUP_DAYS} day of warm-up) in {STEP_MINUTES}-minute steps, "
        f"{MEMBERS} members, quota {QUOTA_BYTES / GIB:.0f} GiB, "
        f"stranding {STRAND_RATIO:.1%} of freed bytes (x {', '.join(map(str, MEMBER_STRAND_FACTORS))} per "
        f"member), defrag at {DEFRAG_BYTES_PER_SECOND / MIB:.0f} MiB/s, seed {args.seed}; ours: "
        f"rule {args.rule or 'the default thresholds'}, EtcdDefragRecommended for {args.for_minutes}m, "
        "EtcdQuotaUsageCritical (> 90%) for "
        f"{CRITICAL_FOR_MINUTES}m, EtcdNoSpaceAlarm; repeat {REPEAT_INTERVAL_MINUTES}m, "
        f"cooldown {COOLDOWN_MINUTES}m; cron: every member at 00:00\n"
    )
    for trace in traces:
        print(f"- {trace.name}: {trace.description}")
    print(
        "\n| trace | policy | runs | member defrags | member-seconds blocked | reclaimed (GiB) "
        "| defrags < 100 MiB | peak quota use | hours > 80% | hours NOSPACE |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    headline = (Outcome(), Outcome())
    for trace in traces:
        load = workload(trace, WARMUP_DAYS + days, args.seed)
        outcomes = {}
        for make in policies(args.for_minutes, args.rule):
            policy = make()
            outcome = outcomes[policy.name] = simulate(trace, load, policy)
            print(
                f"| {trace.name} | {policy.name} | {outcome.runs} | {outcome.member_defrags} "
                f"| {outcome.blocked_member_seconds:,.0f} | {outcome.reclaimed_bytes / GIB:.1f} "
                f"| {outcome.wasted_defrags} | {outcome.peak_usage_ratio:.1%} "
                f"| {outcome.minutes_above_warning / 60:.1f} | {outcome.minutes_nospace / 60:.1f} |"
            )
        ours, cron = outcomes["ours"], outcomes["cron"]
        fewer = f"{cron.member_defrags / ours.member_defrags:.1f}x" if ours.member_defrags else "all"
        higher = 100 * (ours.peak_usage_ratio - cron.peak_usage_ratio)
        verdicts.append(
            f"{trace.name}: cron does {fewer} the member defrags of ours ({cron.blocked_member_seconds:,.0f} "
            f"vs {ours.blocked_member_seconds:,.0f} member-seconds blocked); peak quota use "
            f"{ours.peak_usage_ratio:.1%} (ours) vs {cron.peak_usage_ratio:.1%} (cron): "
            + ("ours no higher" if higher <= 1e-7 else f"ours {higher:.1f} points HIGHER")
        )
        if trace is TRACES[0]:
            headline = (ours, cron)
    print()
    for line in verdicts:
        print(line)
    ours, cron = headline
    fewer_met = 5 * ours.member_defrags <= cron.member_defrags
    peak_met = ours.peak_usage_ratio <= cron.peak_usage_ratio + 1e-9
    print(
        f"\ntarget (headline trace '{TRACES[0].name}'): >= 5x fewer member defrags than cron: "
        f"{'met' if fewer_met else 'NOT met'}; no higher peak quota use: {'met' if peak_met else 'NOT met'}"
    )
    print(f"\n{time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
