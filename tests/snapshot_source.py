"""An in-memory SnapshotSource (exporter.service.webhook): the webhook's view of clusters without etcd.

Routing and deciding tests build snapshots in memory and hand them in; the real-etcd tests in
tests/test_webhook.py prove the Refresher's wiring of the same protocol.
"""

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from exporter.config.settings import ClusterConfig
from exporter.core.clock import utcnow
from exporter.core.model import Member, MemberStatus
from exporter.core.snapshot import ClusterSnapshot, MemberSnapshot


class StaticSnapshots:
    """Clusters and their latest snapshots, replaced by the test; counts the refreshes asked for."""

    def __init__(
        self, clusters: Sequence[ClusterConfig] = (), snapshots: Sequence[ClusterSnapshot] = ()
    ) -> None:
        self._clusters: dict[str, ClusterConfig] = {}
        self._snapshots: dict[str, ClusterSnapshot] = {}
        self.refreshes: list[float] = []
        self.set(clusters, snapshots)

    def set(self, clusters: Sequence[ClusterConfig], snapshots: Sequence[ClusterSnapshot] = ()) -> None:
        """Replace the clusters (a new mapping, as a reload makes) and their snapshots."""
        self._clusters = {c.name: c for c in clusters}
        self._snapshots = {s.cluster: s for s in snapshots}

    def observe(self, snapshot: ClusterSnapshot) -> None:
        """A newer snapshot of one cluster, as a refresh would make."""
        self._snapshots[snapshot.cluster] = snapshot

    @property
    def clusters(self) -> Mapping[str, ClusterConfig]:
        return self._clusters

    def latest(self, name: str) -> ClusterSnapshot | None:
        return self._snapshots.get(name) if name in self._clusters else None

    async def refresh(self, *, max_age_seconds: float, names: Collection[str] | None = None) -> None:
        """A refresh makes new snapshots, taken now, as the Refresher's do (the webhook's cache keys)."""
        self.refreshes.append(max_age_seconds)
        now = utcnow()
        self._snapshots = {name: replace(s, taken_at=now) for name, s in self._snapshots.items()}


def healthy_snapshot(cluster: str, members: int = 3) -> ClusterSnapshot:
    """A cluster of `members` voters that all answered and follow member 1, with no alarm."""
    seen = []
    for i in range(1, members + 1):
        member = Member(id=i, name=f"etcd-{i - 1}", peer_urls=(), client_urls=(f"http://etcd-{i - 1}:2379",))
        status = MemberStatus(
            endpoint=member.client_urls[0],
            member_id=i,
            leader_id=1,
            cluster_id=7,
            version="3.5.0",
            db_size_bytes=100 * 2**20,
            db_size_in_use_bytes=40 * 2**20,
            raft_index=100,
            raft_applied_index=100,
            raft_term=2,
            quota_bytes=2 * 2**30,
        )
        seen.append(MemberSnapshot(member, member.client_urls[0], status))
    return ClusterSnapshot(cluster, utcnow(), tuple(seen), (), leader_id=1)
