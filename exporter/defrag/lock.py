"""One defrag run per etcd cluster, whoever starts it and from wherever, also under NOSPACE.

The design and the argument that two runs can never both defragment are in docs/locking.md. In short,
two kinds of record live in etcd itself under PREFIX (Kubernetes keeps its data under /registry/):

- HOLDER_KEY, bound to a lease of the run's deadline plus a margin, names the run that holds the lock.
  A run takes it with a put in a transaction that compares the key absent. A run that dies leaves a
  key that expires with its lease.
- TOKEN_COUNT token keys, written in advance while the cluster has space. While a NOSPACE alarm is
  active etcd refuses every put and every lease grant, but still applies deletes; so the tokens are
  a ladder that only deletes climb. The number of tokens deleted says the state: even = free, odd =
  held. A run takes the lock by deleting the lowest token when its index is even and gives it back by
  deleting the next one; each step is a transaction that compares its token still exists, so of any
  number of runs exactly one wins each step. A run that has space again puts the deleted tokens back.

A taker always checks both records in one transaction: a put of HOLDER_KEY compares the next token
present with an even index, a token delete compares HOLDER_KEY absent.
"""

import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.core import clock
from exporter.etcd.client import EtcdApi, KeyValue, NoEndpointAnswered, b64, first_answer

log = logging.getLogger(__name__)

PREFIX = b"/etcd-autodefrag/"
HOLDER_KEY = PREFIX + b"defrag-lock"
TOKEN_PREFIX = PREFIX + b"nospace-lock/"
# Eight NOSPACE runs (taken and given back) before the cluster has space again; one is the rule.
TOKEN_COUNT = 16
TOKEN_VALUE = b"etcd-autodefrag: a NOSPACE lock token; deleting it takes the lock (docs/locking.md)"
LOCK_MARGIN_SECONDS = 300
BREAK_HINT = (
    "if no defrag run is going on for this cluster (check Jobs, CronJobs and other hosts), "
    "run `etcd-autodefrag defrag ... --break-lock` once"
)


def token_key(index: int) -> bytes:
    """The key of one NOSPACE token."""
    return TOKEN_PREFIX + b"%02d" % index


class LockUnavailable(Exception):
    """Another run holds this cluster's lock (or the lock cannot be taken): refuse, touch nothing."""


@dataclass(frozen=True)
class LockState:
    """What etcd holds of the lock at one revision."""

    holder: KeyValue | None
    tokens: frozenset[int]

    @property
    def next_token(self) -> int | None:
        """The lowest token left: the one the next step deletes; None when none is left."""
        return min(self.tokens) if self.tokens else None

    @property
    def held_under_nospace(self) -> bool:
        """An odd number of tokens is gone: a run that started under NOSPACE holds the lock."""
        return self.next_token is not None and self.next_token % 2 == 1


def parse_state(keys: Mapping[bytes, KeyValue]) -> LockState:
    """The lock's state from every key under PREFIX."""
    tokens = set()
    for key in keys:
        if key.startswith(TOKEN_PREFIX) and key[len(TOKEN_PREFIX) :].isdigit():
            index = int(key[len(TOKEN_PREFIX) :])
            if 0 <= index < TOKEN_COUNT:
                tokens.add(index)
    return LockState(holder=keys.get(HOLDER_KEY), tokens=frozenset(tokens))


def holder_text(value: bytes) -> str:
    """Who holds the lock, from HOLDER_KEY's value, for a refusal message."""
    try:
        held = json.loads(value)
        return f"{held['holder']} (pid {held['pid']}, cluster {held['cluster']}) since {held['since']}"
    except (ValueError, TypeError, KeyError):
        # Not ours (written by hand or another tool): show it as quoted text, never as a bytes repr.
        return repr(value[:200].decode("utf-8", errors="replace"))


# --- transactions, as the gateway takes them (pure) ----------------------------------------------------


def _exists(key: bytes) -> dict[str, str]:
    return {"key": b64(key), "target": "VERSION", "result": "GREATER", "version": "0"}


def _absent(key: bytes) -> dict[str, str]:
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def _unchanged(kv: KeyValue) -> dict[str, str]:
    return {"key": b64(kv.key), "target": "MOD", "result": "EQUAL", "mod_revision": str(kv.mod_revision)}


def _put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    put: dict[str, str] = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def _delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def take_with_space(state: LockState, holder_value: bytes, lease: int) -> dict[str, Any]:
    """Write HOLDER_KEY, and put back every token a NOSPACE run deleted (all of them, the first time).

    Valid only when `state` is free: no holder and an even number of tokens gone (or none left).
    """
    last = state.next_token
    # None left (never written, or all deleted): the ladder's last token absent says none came back.
    ladder = _exists(token_key(last)) if last is not None else _absent(token_key(TOKEN_COUNT - 1))
    compare = [_absent(HOLDER_KEY), ladder]
    missing = range(last if last is not None else TOKEN_COUNT)
    return {
        "compare": compare,
        "success": [
            _put(HOLDER_KEY, holder_value, lease),
            *(_put(token_key(i), TOKEN_VALUE) for i in missing),
        ],
    }


def take_under_nospace(next_token: int) -> dict[str, Any]:
    """Delete the next token (an even one), if no holder key exists and nobody deleted it first."""
    token = token_key(next_token)
    return {"compare": [_absent(HOLDER_KEY), _exists(token)], "success": [_delete(token)]}


def give_back_with_space(taken: int) -> dict[str, Any]:
    """Put back every token up to the one `taken` deleted, if no other run has moved the ladder."""
    return {
        "compare": [_absent(token_key(taken)), _exists(token_key(taken + 1))],
        "success": [_put(token_key(i), TOKEN_VALUE) for i in range(taken + 1)],
    }


def give_back_under_nospace(taken: int) -> dict[str, Any]:
    """Delete the token after the one `taken` deleted: the count of deleted tokens is even again."""
    return {
        "compare": [_absent(token_key(taken)), _exists(token_key(taken + 1))],
        "success": [_delete(token_key(taken + 1))],
    }


def write_tokens() -> dict[str, Any]:
    """Write every token when none exists (by the ladder's order, the last one absent says so)."""
    return {
        "compare": [_absent(token_key(TOKEN_COUNT - 1))],
        "success": [_put(token_key(i), TOKEN_VALUE) for i in range(TOKEN_COUNT)],
    }


# --- holds -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """How this run holds the lock: by HOLDER_KEY's lease, by a deleted token, or by an override."""

    lease: int = 0
    token: int | None = None
    ttl_seconds: int = 0

    @property
    def guarded(self) -> bool:
        """False for a run the operator let go on without any lock (`--break-lock` under NOSPACE)."""
        return bool(self.lease) or self.token is not None


class ClusterLock:
    """Takes and gives back one cluster's lock through whichever of its members answers first."""

    def __init__(self, client: EtcdApi, endpoints: Sequence[str], *, cluster: str) -> None:
        self.client = client
        self.endpoints = list(endpoints)
        self.cluster = cluster

    async def _first(self, call: Any) -> Any:
        try:
            return (await first_answer(self.endpoints, call))[1]
        except NoEndpointAnswered as exc:
            raise LockUnavailable(f"cannot read or write the lock in etcd: {exc}") from None

    async def read(self) -> LockState:
        """The lock's state (a linearizable read)."""
        return parse_state(await self._first(lambda e: self.client.range_prefix(e, PREFIX)))

    async def _txn(self, request: Mapping[str, Any]) -> bool:
        reply = await self._first(lambda e: self.client.txn(e, request))
        return bool(reply.get("succeeded"))

    async def take(self, *, nospace: bool, deadline_seconds: float, break_lock: bool = False) -> Hold:
        """Take the lock or raise LockUnavailable saying who holds it and what to do."""
        state = await self.read()
        if break_lock:
            state = await self._break(state)
        if state.holder is not None:
            raise LockUnavailable(
                f"another defrag run holds the lock key {HOLDER_KEY.decode()} in etcd: "
                f"{holder_text(state.holder.value)}; it expires by itself with its lease, "
                f"or {BREAK_HINT}"
            )
        if state.held_under_nospace:
            raise LockUnavailable(
                "another defrag run that started under NOSPACE holds the lock (NOSPACE token "
                f"{token_key(state.next_token or 0).decode()} is the next to delete); it gives the lock "
                f"back when it ends, and a run that died cannot, so {BREAK_HINT}"
            )
        if nospace:
            return await self._take_under_nospace(state, break_lock=break_lock)
        return await self._take_with_space(state, deadline_seconds)

    async def _take_with_space(self, state: LockState, deadline_seconds: float) -> Hold:
        ttl = int(deadline_seconds) + 1 + LOCK_MARGIN_SECONDS
        value = json.dumps(
            {
                "holder": socket.gethostname(),
                "pid": os.getpid(),
                "cluster": self.cluster,
                "since": clock.utcnow().isoformat(timespec="seconds"),
            }
        ).encode()
        try:
            lease = await self._first(lambda e: self.client.lease_grant(e, ttl))
            taken = await self._txn(take_with_space(state, value, lease))
        except LockUnavailable as exc:
            if _nospace_refusal(exc):
                raise LockUnavailable(
                    f"{exc} (a NOSPACE alarm raised since the health check refuses the lock's writes; "
                    "the next run takes the lock the NOSPACE way)"
                ) from None
            raise
        if not taken:
            await self._revoke(lease)
            raise LockUnavailable("another defrag run took the lock in etcd first")
        return Hold(lease=lease, ttl_seconds=ttl)

    async def _take_under_nospace(self, state: LockState, *, break_lock: bool) -> Hold:
        if state.next_token is None:
            if break_lock:
                log.warning(
                    "cluster %s: --break-lock under NOSPACE with no lock token in etcd: this run goes on "
                    "without any lock between hosts, as the operator asked",
                    self.cluster,
                )
                return Hold()
            raise LockUnavailable(
                "a NOSPACE alarm is active and etcd holds no NOSPACE lock tokens for this cluster (they "
                "are written while it has space, by any run or by `serve`), so no lock can keep a second "
                f"run out: refusing rather than risk two members at once; {BREAK_HINT}"
            )
        if not await self._txn(take_under_nospace(state.next_token)):
            raise LockUnavailable("another defrag run took the NOSPACE lock in etcd first")
        return Hold(token=state.next_token)

    async def _break(self, state: LockState) -> LockState:
        """Undo what a dead run left (the operator says none is going on), then read again."""
        if state.holder is not None:
            log.warning(
                "cluster %s: --break-lock: deleting the lock key held by %s",
                self.cluster,
                holder_text(state.holder.value),
            )
            await self._txn({"compare": [_unchanged(state.holder)], "success": [_delete(HOLDER_KEY)]})
        if state.held_under_nospace and state.next_token is not None:
            token = token_key(state.next_token)
            log.warning(
                "cluster %s: --break-lock: giving back the NOSPACE lock of a run that did not (%s)",
                self.cluster,
                token.decode(),
            )
            await self._txn({"compare": [_exists(token)], "success": [_delete(token)]})
        return await self.read()

    async def give_back(self, hold: Hold) -> None:
        """Give the lock back; raises LockUnavailable when etcd did not take it back."""
        if hold.lease:
            await self._revoke(hold.lease)
        elif hold.token is not None:
            try:
                if await self._txn(give_back_with_space(hold.token)):
                    return
            except LockUnavailable as exc:
                if not _nospace_refusal(exc):
                    raise
            if not await self._txn(give_back_under_nospace(hold.token)):
                raise LockUnavailable(
                    "the NOSPACE lock was no longer this run's to give back (broken with --break-lock?)"
                )

    async def _revoke(self, lease: int) -> None:
        await self._first(lambda e: self.client.lease_revoke(e, lease))

    async def write_tokens(self) -> bool:
        """Write the NOSPACE tokens if none exists; True when they were written now."""
        return await self._txn(write_tokens())


def _nospace_refusal(exc: LockUnavailable) -> bool:
    """etcd refused a write for NOSPACE ("etcdserver: mvcc: database space exceeded")."""
    return "database space exceeded" in str(exc)
