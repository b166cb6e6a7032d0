"""The embedded store: session state in this process's memory, for a practice that runs one broker.

Every value expires with its session, like on Redis; a sweeper drops what nobody read again.
Memory is the working copy. With a journal (``broker.store.session_file``, the default of
``broker serve``) the durable keys (``base.is_durable``: session records and owner indexes) are
also written through to disk, so a restart loses no session; the relay path (capped logs,
``append_now``) never touches the disk.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from broker.store.base import Mutation, StoreUnavailable, is_durable, session_prefix
from broker.store.packed_entries import pack, unpack

T = TypeVar("T")


class Journal(Protocol):
    """Where the durable keys' writes go as well (``broker.store.session_file.SessionFile``)."""

    def stage(self, key: str, value: bytes | None, expires: float) -> None:
        """Note a write (None: a delete) for the next commit; memory already holds it."""
        ...

    async def commit(self) -> None:
        """Return once everything staged so far is on disk; StoreUnavailable if it cannot be."""
        ...

    def commit_soon(self) -> None:
        """Start a commit nobody waits for (expired keys), from the event loop's thread."""
        ...

    async def close(self) -> None: ...


#: How every key of a session begins (``session_prefix``, up to the session id).
_SESSION_KEYS = session_prefix("").removesuffix("}")


def session_of(key: str) -> str | None:
    """The ``session_prefix`` a session's key begins with; None for a key of no session."""
    if not key.startswith(_SESSION_KEYS):
        return None
    end = key.find("}")
    return key[: end + 1] if end > 0 else None


def right_sized(value: bytes) -> bytes:
    """A copy of ``value`` that holds no spare room. msgspec's encoders return bytes inside the
    larger buffer they grew while encoding (a 293-byte relayed candidate sits in 463 bytes), and
    what this store keeps lives as long as its session: every byte of the slack counts per session."""
    return bytes(memoryview(value))


class CappedLog:
    """One capped log (a seat's resume buffer): its newest entries, numbered one after another
    up to ``last``. The numbers are not stored: entry ``i`` is ``last - len(entries) + 1 + i``,
    so an entry costs its bytes and one list slot (no tuple and number object per entry), and a
    sealed message's ciphertext is kept as bytes, not base64url text (``packed_entries``)."""

    __slots__ = ("last", "entries", "expires")

    def __init__(self, last: int, expires: float) -> None:
        self.last = last
        self.entries: list[bytes] = []
        self.expires = expires

    def since(self, seq: int) -> list[tuple[int, bytes]]:
        first = self.last - len(self.entries) + 1
        return [(first + i, unpack(self.entries[i])) for i in range(max(0, seq + 1 - first), len(self.entries))]

    def drop_through(self, seq: int) -> None:
        """Forget the entries numbered ``seq`` or below; the numbering stays (``last``)."""
        drop = min(len(self.entries), seq - (self.last - len(self.entries)))
        if drop > 0:
            del self.entries[:drop]


class MemoryStore:
    """Embedded store: a dict with expiry times, swept lazily and periodically."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, journal: Journal | None = None, seq_base: int = 0
    ) -> None:
        self._clock = clock
        self._journal = journal
        #: A new capped log numbers its entries from ``seq_base + 1``: after a restart, above every
        #: number the previous process gave out, so a reconnecting peer that remembers one never
        #: takes a new entry for one it has seen (``SessionFile.seq_base``).
        self._seq_base = seq_base
        self._data: dict[str, tuple[bytes, float]] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        self._logs: dict[str, CappedLog] = {}
        #: Each session's keys (values and logs), by its prefix: ending a session (``delete_prefix``)
        #: touches its own keys, not every key of every session (at 8,000 sessions ending 50 a
        #: second, looking at every key took a third of a core).
        self._sessions: dict[str, set[str]] = {}

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            self._unindex(key)
            self._journal_expired(key)
            return None
        return item[0]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        expires = self._write(key, value, ttl_s)
        if self._journal is not None and is_durable(key):
            self._journal.stage(key, value, expires)
            await self._journal.commit()

    async def update(self, key: str, mutate: Mutation[T], ttl_s: float) -> T:
        # No await between read and write: atomic on the event loop.
        current = await self.get(key)
        new, result = mutate(current)
        if new is None:
            expires = 0.0
            self._data.pop(key, None)
            self._unindex(key)
        else:
            expires = self._write(key, new, ttl_s)
        if self._journal is not None and (new is not None or current is not None) and is_durable(key):
            self._journal.stage(key, new, expires)
            await self._journal.commit()
        return result

    async def delete_prefix(self, prefix: str) -> int:
        if session_of(prefix) == prefix:  # a whole session: its own keys
            keys = self._sessions.pop(prefix, set())
            doomed = [k for k in keys if k in self._data]
            logs = [k for k in keys if k in self._logs]
        else:
            doomed = [k for k in self._data if k.startswith(prefix)]
            logs = [k for k in self._logs if k.startswith(prefix)]
        for k in doomed:
            del self._data[k]
        for k in logs:
            del self._logs[k]
        for k in (*doomed, *logs):
            self._unindex(k)
        if self._journal is not None:
            durable = [k for k in doomed if is_durable(k)]
            for k in durable:
                self._journal.stage(k, None, 0.0)
            if durable:
                # Not waited for: the session's end was already written (its record says ended, and
                # is refused), and what ends it (the owner's index, say) follows without a wait
                # between, as on memory alone. A failed delete is tried again with the next commit.
                self._journal.commit_soon()
        return len(doomed) + len(logs)

    async def keys(self, prefix: str) -> list[str]:
        self.sweep()
        return [k for k in (*self._data, *self._logs) if k.startswith(prefix)]

    async def incr_window(self, key: str, window_s: float) -> int:
        current = await self.get(key)
        count = (int(current) if current else 0) + 1
        ttl = window_s
        if current is not None:
            ttl = self._data[key][1] - self._clock()
        self._write(key, str(count).encode(), ttl)
        return count

    async def append(self, key: str, value: bytes, maxlen: int, ttl_s: float) -> int:
        return self.append_now(key, value, maxlen, ttl_s)

    def append_now(self, key: str, value: bytes, maxlen: int, ttl_s: float) -> int:
        """``append`` in this very step (the embedded relay path has nothing to wait for).

        The log is changed in place: nothing of its older entries is copied.
        """
        now = self._clock()
        log = self._logs.get(key)
        if log is None or log.expires <= now:
            log = self._logs[key] = CappedLog(self._seq_base, now)
            self._index(key)
        log.last += 1
        entries = log.entries
        entries.append(pack(value))  # a sealed message's ciphertext as bytes: a quarter smaller
        if len(entries) > maxlen:
            del entries[: len(entries) - maxlen]
        log.expires = now + ttl_s
        return log.last

    async def read_since(self, key: str, seq: int) -> list[tuple[int, bytes]]:
        log = self._logs.get(key)
        if log is None or log.expires <= self._clock():
            return []
        return log.since(seq)

    async def trim_log(self, key: str, through: int) -> None:
        log = self._logs.get(key)
        if log is not None and log.expires > self._clock():
            log.drop_through(through)

    async def clear_log(self, key: str) -> None:
        log = self._logs.get(key)
        if log is not None and log.expires > self._clock():
            log.entries = []

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        if self._journal is not None:
            await self._journal.close()
        self._data.clear()
        self._logs.clear()
        self._sessions.clear()

    def restore(self, key: str, value: bytes, expires: float) -> None:
        """Put back a value read from the journal at start (not written to it again)."""
        self._data[key] = (value, expires)
        self._index(key)
        heapq.heappush(self._expiry_heap, (expires, key))

    def sweep(self) -> int:
        """Drop expired keys; returns how many."""
        now = self._clock()
        dropped = 0
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            _, key = heapq.heappop(self._expiry_heap)
            item = self._data.get(key)
            if item is not None and item[1] <= now:
                del self._data[key]
                self._unindex(key)
                self._journal_expired(key)
                dropped += 1
        for key in [k for k, log in self._logs.items() if log.expires <= now]:
            del self._logs[key]
            self._unindex(key)
            dropped += 1
        if len(self._expiry_heap) > 4 * len(self._data) + 1024:
            self._expiry_heap = [(exp, k) for k, (_, exp) in self._data.items()]
            heapq.heapify(self._expiry_heap)
        return dropped

    async def run_sweeper(self, every_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.sweep()

    def _write(self, key: str, value: bytes, ttl_s: float) -> float:
        expires = self._clock() + max(ttl_s, 0.001)
        self._data[key] = (right_sized(value), expires)
        self._index(key)
        heapq.heappush(self._expiry_heap, (expires, key))
        return expires

    def _index(self, key: str) -> None:
        """A key now held: listed with its session's, if it is a session's."""
        session = session_of(key)
        if session is not None:
            self._sessions.setdefault(session, set()).add(key)

    def _unindex(self, key: str) -> None:
        """A key let go: off its session's list once neither a value nor a log holds it."""
        session = session_of(key)
        if session is None or key in self._data or key in self._logs:
            return
        keys = self._sessions.get(session)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._sessions[session]

    def _journal_expired(self, key: str) -> None:
        """An expired durable key goes from disk too, without anyone waiting for it."""
        if self._journal is not None and is_durable(key):
            self._journal.stage(key, None, 0.0)
            self._journal.commit_soon()


async def with_store(call: Awaitable[T]) -> T:
    """Await a store call, turning connection failures into StoreUnavailable."""
    try:
        return await call
    except StoreUnavailable:
        raise
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise StoreUnavailable(str(type(exc).__name__)) from None
