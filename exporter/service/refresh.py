"""Keeping a fresh snapshot of every configured cluster for /metrics and the webhook.

A scrape triggers a refresh and waits for it at most `scrape_budget_seconds`; concurrent scrapes
(two Prometheus replicas) share one refresh in flight. Every member request has its own timeout,
capped by that budget, and the shared HTTP connector bounds how many run at once, so one dead
member costs one timeout and never delays the others. Member lists are cached and read again
every `member_list_refresh_seconds`, or at once when a member stops answering.
"""

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from exporter.config.settings import ClusterConfig
from exporter.core import clock
from exporter.core.model import AlarmKind
from exporter.core.policy import cluster_rule
from exporter.core.rule import Rule
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


class Refresher:
    """Owns the latest snapshot of each cluster and refreshes them all concurrently."""

    def __init__(
        self,
        clusters: Sequence[ClusterConfig],
        client_for: Callable[[ClusterConfig], EtcdApi],
        *,
        scrape_budget_seconds: float = 4.0,
        min_refresh_interval_seconds: float = 0.0,
        member_list_refresh_seconds: float = 60.0,
        write_lock_tokens: bool = False,
    ) -> None:
        self._client_for = client_for
        self.scrape_budget_seconds = scrape_budget_seconds
        self.min_refresh_interval_seconds = min_refresh_interval_seconds
        self.member_list_refresh_seconds = member_list_refresh_seconds
        self.write_lock_tokens = write_lock_tokens
        self.watches: dict[str, ClusterWatch] = {}
        self._in_flight: asyncio.Task[None] | None = None
        self._last_refresh_at = float("-inf")
        self.refreshes_total = 0
        self.reconfigure(clusters)

    def reconfigure(self, clusters: Sequence[ClusterConfig]) -> None:
        """Adopt a new cluster list; removed clusters vanish from the next scrape."""
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
        """True once every cluster has been observed at least once."""
        return all(w.snapshot is not None for w in self.watches.values())

    def snapshots(self) -> list[tuple[ClusterWatch, ClusterSnapshot]]:
        """The latest snapshot of each cluster that has one."""
        return [(w, w.snapshot) for w in self.watches.values() if w.snapshot is not None]

    async def refresh(self, *, max_age_seconds: float | None = None) -> None:
        """Bring snapshots up to date, sharing a refresh already in flight.

        Returns within the scrape budget: whatever did not answer by then is recorded as down.
        """
        max_age = self.min_refresh_interval_seconds if max_age_seconds is None else max_age_seconds
        if self._in_flight is None or self._in_flight.done():
            if clock.monotonic() - self._last_refresh_at < max_age:
                return
            self._in_flight = asyncio.create_task(self._refresh_all())
        await asyncio.shield(self._in_flight)

    async def _refresh_all(self) -> None:
        started = clock.monotonic()
        watches = list(self.watches.values())
        await asyncio.gather(*(self._refresh_one(w) for w in watches))
        self._last_refresh_at = started
        self.refreshes_total += 1

    async def _refresh_one(self, watch: ClusterWatch) -> None:
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
        if self.write_lock_tokens and not watch.lock_tokens_checked:
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
