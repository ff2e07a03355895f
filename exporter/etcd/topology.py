"""Which members a cluster has, how to reach each, and which of them the configuration names.

One meaning of `discover_members` for everything that reads a cluster (the engine, `status`, the
service's snapshots):

- true (the default): every member of the member list, each reached through the configured endpoint
  that is one of its client URLs, else through its first advertised client URL.
- false: the member list is still read, because the safety gates need every voter, but only the
  members behind the configured endpoints are observed and defragmented, each through the URL
  configured for it. A configured endpoint is matched to its member by the member id its status
  reports, so a proxy, a load balancer or `localhost` for `127.0.0.1` still finds the right member;
  when it does not answer, by its client URL. One that matches no member is kept as a stand-in
  member with id 0 (observed as it is, and a run refuses it).

`discover` does the I/O; `topology` is the pure decision, table-tested in tests/test_topology.py.
"""

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from exporter.config.settings import ClusterConfig
from exporter.core.model import Member
from exporter.core.policy import endpoint_for
from exporter.etcd.client import EtcdApi, EtcdError, NoEndpointAnswered, first_answer


@dataclass(frozen=True)
class Topology:
    """A cluster's members as the configuration selects them (see the module docstring)."""

    members: tuple[Member, ...]  # the whole member list
    endpoints: Mapping[int, str]  # member id -> the URL to reach it (members without one: absent)
    targets: frozenset[int] | None = None  # ids behind the configured endpoints; None: every member
    unanswered: Mapping[str, str] = field(default_factory=dict)  # configured endpoint -> its status error
    unmatched: tuple[str, ...] = ()  # configured endpoints that are no member of the list

    @property
    def whole_cluster(self) -> bool:
        """Whether every member is selected (member discovery), not only the configured ones."""
        return self.targets is None

    def selected(self) -> list[tuple[Member, str | None]]:
        """The members to observe, each with its URL (None: it has no client URL yet).

        A configured endpoint that matched no member comes last, as a stand-in member with id 0.
        """
        chosen = [m for m in self.members if self.targets is None or m.id in self.targets]
        stand_ins = [Member(id=0, name=url, peer_urls=(), client_urls=(url,)) for url in self.unmatched]
        return [(m, self.endpoints.get(m.id)) for m in chosen] + [(m, m.client_urls[0]) for m in stand_ins]


def topology(
    *,
    members: Sequence[Member],
    configured: Sequence[str],
    discover_members: bool,
    member_ids: Mapping[str, int | str] | None = None,
) -> Topology:
    """The topology from the member list and, without discovery, what each configured endpoint said.

    `member_ids` maps each configured endpoint to the member id its status reported, or to the
    error message when it did not answer; it is not needed (nor asked for) with discovery.
    """
    endpoints = {m.id: url for m in members if (url := endpoint_for(m, configured)) is not None}
    if discover_members:
        return Topology(tuple(members), endpoints)
    ids = {m.id for m in members}
    targets: set[int] = set()
    unanswered: dict[str, str] = {}
    unmatched: list[str] = []
    for url in configured:
        answer = (member_ids or {}).get(url, "not asked")
        if isinstance(answer, str):
            unanswered[url] = answer
            answer = next((m.id for m in members if url in m.client_urls), 0)
        if answer in ids:
            targets.add(answer)
            endpoints[answer] = url  # through the endpoint the user configured for it
        else:
            unmatched.append(url)
    return Topology(tuple(members), endpoints, frozenset(targets), unanswered, tuple(unmatched))


async def discover(client: EtcdApi, cluster: ClusterConfig) -> Topology:
    """The cluster's topology: the member list from the first configured endpoint that answers.

    Without member discovery, each configured endpoint is also asked for its status (concurrently),
    to learn which member it is. Raises EtcdError when no configured endpoint gave the member list.
    """
    try:
        _, members = await first_answer(cluster.endpoints, client.members)
    except NoEndpointAnswered as exc:
        raise EtcdError(cluster.endpoints[0], f"no configured endpoint answered: {exc}") from None
    member_ids: dict[str, int | str] = {}
    if not cluster.discover_members:

        async def member_id(url: str) -> int | str:
            try:
                return (await client.status(url)).member_id
            except EtcdError as exc:
                return exc.message

        answers = await asyncio.gather(*(member_id(url) for url in cluster.endpoints))
        member_ids = dict(zip(cluster.endpoints, answers, strict=True))
    return topology(
        members=members,
        configured=cluster.endpoints,
        discover_members=cluster.discover_members,
        member_ids=member_ids,
    )
