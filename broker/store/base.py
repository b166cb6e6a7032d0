"""Where session state lives: the one interface both stores implement.

The in-process store (``broker.store.memory``) is the embedded default; the Redis store
(``broker.store.redis_store``) shares state between broker processes. Both are driven
by the same test suite. Every value carries a TTL so nothing outlives its
session, and every key of a session starts with ``session_prefix(id)`` so that
ending a session can delete all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")

#: An atomic read-modify-write step: gets the current value (None if absent),
#: returns the new value (None deletes the key) and a result for the caller.
#: It may raise to abort; then nothing is written.
Mutation = Callable[[bytes | None], tuple[bytes | None, T]]


def session_key(session_id: str) -> str:
    return f"s:{{{session_id}}}"


def session_prefix(session_id: str) -> str:
    """Every key of one session starts with this (a Redis Cluster hash tag, too)."""
    return f"s:{{{session_id}}}"


#: Each therapist's index of the sessions they scheduled (``broker.http.dashboard``) starts with this.
OWNER_PREFIX = "owner:"
#: Each therapist's history of ended sessions (``broker.signaling.history``) starts with this.
HISTORY_PREFIX = "history:"
#: The mark a cancelled session leaves until its window closes, so its links say "cancelled".
CANCELLED_PREFIX = "cancelled:"
#: Each therapist's sealed labels, notes and session secrets per session (``broker.http.vault_routes``).
VAULT_PREFIX = "vault:"


def is_durable(key: str) -> bool:
    """What a session needs to come back after a restart: its record (``session_key``; its
    mailboxes, ``s:{id}:box:...``, are not), the owner indexes the dashboard lists, the
    therapists' histories, the marks of cancelled sessions and the therapists' sealed vault items.
    The embedded store keeps these on disk as well (sealed); everything else may be lost to a restart."""
    if key.startswith("s:{"):
        return key.endswith("}")
    return key.startswith((OWNER_PREFIX, HISTORY_PREFIX, CANCELLED_PREFIX, VAULT_PREFIX))


class StoreUnavailable(Exception):
    """The store cannot be reached; callers answer ``unavailable`` and change nothing."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def update(self, key: str, mutate: Mutation[T], ttl_s: float) -> T:
        """Apply ``mutate`` atomically to the key's value; the TTL is reset on write."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; returns how many."""
        ...

    async def keys(self, prefix: str) -> list[str]: ...

    async def incr_window(self, key: str, window_s: float) -> int:
        """Count an event in a fixed window (rate limits); returns the count so far."""
        ...

    async def append(self, key: str, value: bytes, maxlen: int, ttl_s: float) -> int:
        """Append to a capped log; returns the entry's sequence number (1, 2, ... per key).

        Only the newest ``maxlen`` entries are kept; the TTL is reset on each append.
        """
        ...

    async def read_since(self, key: str, seq: int) -> list[tuple[int, bytes]]:
        """Entries of a capped log with a sequence number above ``seq``, oldest first."""
        ...

    async def trim_log(self, key: str, through: int) -> None:
        """Drop the entries of a capped log numbered ``through`` or below (a reader has them) but
        keep its numbering, as ``clear_log`` does. Its TTL is kept."""
        ...

    async def clear_log(self, key: str) -> None:
        """Drop every entry of a capped log but keep its numbering: the next entry gets the next
        sequence number, so a reader that remembers a number never mistakes a new entry for one
        it has seen. Its TTL is kept."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
