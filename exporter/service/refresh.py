"""Keeping a fresh snapshot of every configured cluster for /metrics and the webhook.

A scrape triggers a refresh and waits for it at most `scrape_budget_seconds`; concurrent scrapes
(two Prometheus replicas) share one refresh in flight. Every member request has its own timeout,
capped by that budget, and the shared HTTP connector bounds how many run at once, so one dead
member costs one timeout and never delays the others. Member lists are cached and read again
every `member_list_refresh_seconds`, or at once when a member stops answering.

With sharding (exporter.core.shard) the refresher knows every configured cluster but refreshes and
exports only its shard's; the webhook reads any other cluster on demand (`refresh_on_demand`), one
read per cluster in flight however many alerts ask, each bounded by the same budget.
"""

import asyncio
import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from exporter.config.settings import ClusterConfig
from exporter.core import clock
from exporter.core.model import AlarmKind
from exporter.core.policy import cluster_rule
from exporter.core.rule import Rule
from exporter.core.shard import UNSHARDED, Shard
from exporter.core.snapshot import ClusterSnapshot, MemberSnapshot
from exporter.defrag.lock import ClusterLock, LockUnavailable
from exporter.etcd.client import EtcdApi, EtcdError
from exporter.etcd.observe import QuotaCache, observe_cluster
from exporter.etcd.topology import Topology, discover

log = logging.getLogger(__name__)


@dataclass
class ClusterWatch:
    """What we keep between refreshes for one cluster."""

    config: ClusterConfig
    client: EtcdApi
    rule: Rule
    quotas: QuotaCache = field(default_factory=QuotaCache)
    topology: Topology | None = None
    members_read_at: float = 0.0
    snapshot: ClusterSnapshot | None = None
    refresh_duration_seconds: float = 0.0
    refresh_errors_total: int = 0
    lock_tokens_checked: bool = False
    refreshed_at: float = float("-inf")  # monotonic start of the refresh that took `snapshot`


class Refresher:
    """Owns the latest snapshot of each cluster and refreshes its shard's clusters concurrently."""

    def __init__(
        self,
        clusters: Sequence[ClusterConfig],
        client_for: Callable[[ClusterConfig], EtcdApi],
        *,
        scrape_budget_seconds: float = 4.0,
        min_refresh_interval_seconds: float = 0.0,
        member_list_refresh_seconds: float = 60.0,
        write_lock_tokens: bool = False,
        shard: Shard = UNSHARDED,
    ) -> None:
        self._client_for = client_for
        self.shard = shard
        self.scrape_budget_seconds = scrape_budget_seconds
        self.min_refresh_interval_seconds = min_refresh_interval_seconds
        self.member_list_refresh_seconds = member_list_refresh_seconds
        self.write_lock_tokens = write_lock_tokens
        self.watches: dict[str, ClusterWatch] = {}
        self.owned: dict[str, ClusterWatch] = {}
        self._in_flight: asyncio.Task[None] | None = None
        self._on_demand: dict[str, asyncio.Task[None]] = {}
        self._last_refresh_at = float("-inf")
        self.refreshes_total = 0
        self.reconfigure(clusters)

    def reconfigure(self, clusters: Sequence[ClusterConfig]) -> None:
        """Adopt a new cluster list (all of them, not only this shard's); removed ones vanish."""
        watches = {}
        for cluster in clusters:
            kept = self.watches.get(cluster.name)
            if kept is not None and kept.config == cluster:
                watches[cluster.name] = kept
            else:
                watches[cluster.name] = ClusterWatch(
                    cluster, self._client_for(cluster), cluster_rule(cluster)
                )
        self.watches = watches
        self.owned = {name: w for name, w in watches.items() if self.shard.owns(name)}
        self._clusters = {name: watch.config for name, watch in watches.items()}

    @property
    def clusters(self) -> Mapping[str, ClusterConfig]:
        """The configured clusters by name: a new mapping on every reconfigure (SnapshotSource)."""
        return self._clusters

    def latest(self, name: str) -> ClusterSnapshot | None:
        """The cluster's latest snapshot, None before the first or for an unknown name."""
        watch = self.watches.get(name)
        return watch.snapshot if watch is not None else None

    @property
    def ready(self) -> bool:
        """True once every cluster of this shard has been observed at least once."""
        return all(w.snapshot is not None for w in self.owned.values())

    def snapshots(self) -> list[tuple[ClusterWatch, ClusterSnapshot]]:
        """The latest snapshot of each cluster of this shard that has one (what /metrics exports)."""
        return [(w, w.snapshot) for w in self.owned.values() if w.snapshot is not None]

    async def refresh(
        self, *, max_age_seconds: float | None = None, names: Collection[str] | None = None
    ) -> None:
        """Bring snapshots up to date, sharing a refresh already in flight.

        `names`: only these clusters need to be fresh (SnapshotSource): this shard's are refreshed
        all together as usual, another shard's are read on demand (`refresh_on_demand`).
        Returns within the scrape budget: whatever did not answer by then is recorded as down.
        """
        max_age = self.min_refresh_interval_seconds if max_age_seconds is None else max_age_seconds
        if names is not None:
            others = [name for name in names if name not in self.owned]
            reads = [self.refresh_on_demand(others, max_age_seconds=max_age)] if others else []
            if len(others) < len(names):
                reads.append(self.refresh(max_age_seconds=max_age))
            await asyncio.gather(*reads)
            return
        if self._in_flight is None or self._in_flight.done():
            if clock.monotonic() - self._last_refresh_at < max_age:
                return
            self._in_flight = asyncio.create_task(self._refresh_all())
        await asyncio.shield(self._in_flight)

    async def refresh_on_demand(self, names: Sequence[str], *, max_age_seconds: float) -> None:
        """Snapshots of these clusters no older than `max_age_seconds`, for those outside this shard.

        Nothing refreshes them in the background: the webhook asks when an alert needs one. A read
        already in flight for a cluster is shared, so an alert storm costs one read per cluster,
        each bounded by the scrape budget (a cluster that does not answer shows as down).
        """
        reads = []
        now = clock.monotonic()
        for name in names:
            watch = self.watches.get(name)
            if watch is None or name in self.owned:
                continue
            read = self._on_demand.get(name)
            if read is None:
                if watch.snapshot is not None and now - watch.refreshed_at <= max_age_seconds:
                    continue
                read = asyncio.create_task(self._refresh_one(watch, write_lock_tokens=False))
                self._on_demand[name] = read
                read.add_done_callback(functools.partial(self._on_demand_done, name))
            reads.append(read)
        if reads:
            await asyncio.gather(*(asyncio.shield(read) for read in reads))

    def _on_demand_done(self, name: str, _read: "asyncio.Task[None]") -> None:
        self._on_demand.pop(name, None)

    async def _refresh_all(self) -> None:
        started = clock.monotonic()
        watches = list(self.owned.values())
        await asyncio.gather(*(self._refresh_one(w) for w in watches))
        self._last_refresh_at = started
        self.refreshes_total += 1

    async def _refresh_one(self, watch: ClusterWatch, *, write_lock_tokens: bool = True) -> None:
        started = clock.monotonic()
        budget = self.scrape_budget_seconds
        try:
            async with asyncio.timeout(budget):
                snapshot = await self._observe(watch)
        except TimeoutError:
            snapshot = self._timed_out(watch, budget)
        watch.refresh_duration_seconds = clock.monotonic() - started
        if snapshot.error or any(not m.up for m in snapshot.members):
            watch.refresh_errors_total += 1
            watch.topology = None  # a member may have been replaced: read the member list again
        watch.snapshot = snapshot
        watch.refreshed_at = started
        # Only the owner writes them: an on-demand read by another shard stays read-only.
        if write_lock_tokens and self.write_lock_tokens and not watch.lock_tokens_checked:
            await self._write_lock_tokens(watch, snapshot)

    async def _write_lock_tokens(self, watch: ClusterWatch, snapshot: ClusterSnapshot) -> None:
        """Write the cluster's NOSPACE lock tokens once, while it has space (exporter.defrag.lock).

        A run that starts under NOSPACE can take the lock only if they exist by then; every run with
        space writes them too, but a cluster whose first run comes with NOSPACE has only us.
        """
        if snapshot.error or any(a.kind is AlarmKind.NOSPACE for a in snapshot.alarms):
            return
        endpoints = [m.endpoint for m in snapshot.members if m.up]
        if not endpoints:
            return
        watch.lock_tokens_checked = True
        try:
            if await ClusterLock(watch.client, endpoints, cluster=watch.config.name).write_tokens():
                log.debug("cluster %s: wrote the NOSPACE lock tokens", watch.config.name)
        except LockUnavailable as exc:
            log.warning(
                "cluster %s: cannot write the NOSPACE lock tokens, so a run that starts under NOSPACE "
                "will be refused: %s",
                watch.config.name,
                exc,
            )

    async def _observe(self, watch: ClusterWatch) -> ClusterSnapshot:
        now = clock.monotonic()
        if watch.topology is None or now - watch.members_read_at > self.member_list_refresh_seconds:
            try:
                watch.topology = await discover(watch.client, watch.config)
            except EtcdError as exc:
                log.warning("cluster %s: member list unavailable: %s", watch.config.name, exc.message)
                return ClusterSnapshot(watch.config.name, clock.utcnow(), error=exc.message)
            watch.members_read_at = now
        return await observe_cluster(
            watch.client, watch.config, watch.rule, watch.quotas, topology=watch.topology
        )

    def _timed_out(self, watch: ClusterWatch, budget: float) -> ClusterSnapshot:
        """Every known member down: a member that did not answer in budget shows up 0, not old values."""
        reason = f"no answer within the scrape budget of {budget:g}s"
        members = watch.topology.selected() if watch.topology is not None else []
        return ClusterSnapshot(
            watch.config.name,
            clock.utcnow(),
            tuple(MemberSnapshot(m, url or "", None, reason) for m, url in members),
            error=None if members else reason,
        )
