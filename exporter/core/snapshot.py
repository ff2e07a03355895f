"""What one refresh observed of a cluster, and what that says about its health. Pure data.

Built by exporter.etcd.observe; read by the service's gauges, the webhook and `status`.
"""

from dataclasses import dataclass
from datetime import datetime

from exporter.core.model import Alarm, Member, MemberStatus
from exporter.core.policy import Health, Verdict, cluster_health


@dataclass(frozen=True)
class MemberSnapshot:
    """One member as last seen: its status (None when it did not answer) and the rule's verdict."""

    member: Member
    endpoint: str
    status: MemberStatus | None
    error: str | None = None
    verdict: Verdict | None = None

    @property
    def up(self) -> bool:
        """Whether the member answered this time."""
        return self.status is not None


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything observed about one cluster in one refresh."""

    cluster: str
    taken_at: datetime
    members: tuple[MemberSnapshot, ...] = ()
    alarms: tuple[Alarm, ...] = ()
    leader_id: int = 0
    error: str | None = None  # set when not even the member list could be read

    def health(self) -> Health:
        """The cluster's health by the one verdict (core.policy.cluster_health), from this snapshot."""
        if self.error:
            return Health(False, (self.error,))
        if not self.members:
            return Health(False, ("no members observed",))
        # One status call per member: its answer is the read, its leader field the leader it follows.
        answers = {m.member: None if m.up else m.error or "no answer" for m in self.members if m.endpoint}
        leaders = {m.member: m.status.leader_id for m in self.members if m.status}
        return cluster_health(
            members=[m.member for m in self.members],
            answers=answers,
            alarms=self.alarms,
            leaders=leaders,
        )
