"""The facts we read from etcd, as plain immutable values shared by the pure core and the I/O edges."""

from dataclasses import dataclass
from enum import StrEnum


class AlarmKind(StrEnum):
    """etcd's alarm types (etcdserverpb.AlarmType)."""

    NONE = "NONE"
    NOSPACE = "NOSPACE"
    CORRUPT = "CORRUPT"


@dataclass(frozen=True)
class Alarm:
    """One active alarm, raised by one member."""

    member_id: int
    kind: AlarmKind


@dataclass(frozen=True)
class Member:
    """A cluster member as the member list reports it."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False


@dataclass(frozen=True)
class MemberStatus:
    """One member's answer to the maintenance Status call, plus the quota it runs with."""

    endpoint: str
    member_id: int
    leader_id: int
    cluster_id: int
    version: str
    db_size_bytes: int
    db_size_in_use_bytes: int
    raft_index: int
    raft_applied_index: int
    raft_term: int
    is_learner: bool = False
    # Quota as the member itself reports it (status on etcd >= 3.6, else its metrics page); 0 = unknown.
    quota_bytes: int = 0
    # When its etcd process started (Unix time, from its metrics page); 0 = unknown.
    process_start_time_seconds: float = 0.0
    errors: tuple[str, ...] = ()
    # Active alarms of the whole cluster: etcd lists them in the status reply's `errors`.
    alarms: tuple[Alarm, ...] = ()

    @property
    def is_leader(self) -> bool:
        """Whether this member was the leader when it answered."""
        return self.member_id != 0 and self.member_id == self.leader_id
