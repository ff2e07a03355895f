"""Which replica observes which cluster: a stable split of the clusters over `total_shards` replicas.

A cluster belongs to shard `sha256(name) mod total_shards`. sha256, never Python's `hash()`: that one
is salted per process (PYTHONHASHSEED), so two replicas, or one replica after a restart, would
disagree about who owns a cluster. The assignment depends on the cluster's name and the shard count
only, so every replica computes the same split from the same config without talking to the others.

Sharding splits what each replica *observes* (the refresh, /metrics, /readyz). Every replica still
answers the webhook for every cluster: the Job name is the cluster's lock (docs/sharding.md).
"""

import hashlib
import re
from dataclasses import dataclass

# A StatefulSet names its pods `<statefulset>-<ordinal>` (Kubernetes docs, "StatefulSets: Pod identity").
_ORDINAL = re.compile(r"-(0|[1-9][0-9]*)$")


class ShardError(ValueError):
    """The shard cannot be determined; the message says what to set."""


def shard_of(cluster: str, total_shards: int) -> int:
    """The shard (0 .. total_shards-1) that observes the cluster of this name."""
    if total_shards < 1:
        raise ValueError(f"total_shards must be at least 1, not {total_shards}")
    digest = hashlib.sha256(cluster.encode()).digest()
    return int.from_bytes(digest[:8], "big") % total_shards


@dataclass(frozen=True)
class Shard:
    """This replica's part of the fleet: shard `index` of `total`."""

    index: int = 0
    total: int = 1

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ShardError(f"sharding.total_shards must be at least 1, not {self.total}")
        if not 0 <= self.index < self.total:
            raise ShardError(
                f"sharding.shard {self.index} is out of range for total_shards {self.total} "
                f"(0 to {self.total - 1})"
            )

    @property
    def sharded(self) -> bool:
        """More than one shard: this replica observes only part of the clusters."""
        return self.total > 1

    def owns(self, cluster: str) -> bool:
        """Whether this replica observes (refreshes and exports) the cluster."""
        # Unsharded, the answer needs no hash: asked per cluster on every scrape (collectors, /readyz).
        return self.total == 1 or shard_of(cluster, self.total) == self.index

    def __str__(self) -> str:
        return f"shard {self.index} of {self.total}"


UNSHARDED = Shard()


def resolve_shard(*, shard: int | None, total_shards: int, pod_name: str | None) -> Shard:
    """This replica's shard from the settings; unset with total_shards > 1, from the pod's ordinal.

    `pod_name` is env POD_NAME (the downward API's metadata.name): a StatefulSet pod `name-3` is
    shard 3. Raises ShardError saying what to set when neither gives a shard in range.
    """
    if shard is not None or total_shards == 1:
        return Shard(shard or 0, total_shards)
    if not pod_name:
        raise ShardError(
            f"sharding.total_shards is {total_shards} but this replica's shard is not set: give --shard "
            "(or ETCD_AUTODEFRAG_SHARDING__SHARD), or run in a StatefulSet with env POD_NAME from "
            "the downward API (metadata.name), whose trailing ordinal is the shard"
        )
    match = _ORDINAL.search(pod_name)
    if match is None:
        raise ShardError(
            f"cannot tell the shard from POD_NAME {pod_name!r}: it has no trailing ordinal like "
            "'etcd-autodefrag-2' (a StatefulSet pod); set --shard or ETCD_AUTODEFRAG_SHARDING__SHARD"
        )
    index = int(match[1])
    if index >= total_shards:
        raise ShardError(
            f"POD_NAME {pod_name!r} is ordinal {index}, out of range for sharding.total_shards "
            f"{total_shards}: the StatefulSet has more replicas than shards; make them equal"
        )
    return Shard(index, total_shards)
