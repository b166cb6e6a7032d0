"""Where session state lives: one small interface, two implementations.

The in-process ``MemoryStore`` is the embedded default; the Redis store
(``broker.store.redis_store``) shares state between broker processes. Both are driven
by the same test suite. Every value carries a TTL so nothing outlives its
session, and every key of a session starts with ``session_prefix(id)`` so that
ending a session can delete all of it.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable
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

    async def clear_log(self, key: str) -> None:
        """Drop every entry of a capped log but keep its numbering: the next entry gets the next
        sequence number, so a reader that remembers a number never mistakes a new entry for one
        it has seen. Its TTL is kept."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Embedded store: a dict with expiry times, swept lazily and periodically."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        # Capped logs: key -> (last sequence number, the newest entries, expiry time).
        self._logs: dict[str, tuple[int, deque[tuple[int, bytes]], float]] = {}

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            return None
        return item[0]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._write(key, value, ttl_s)

    async def update(self, key: str, mutate: Mutation[T], ttl_s: float) -> T:
        # No await between read and write: atomic on the event loop.
        current = await self.get(key)
        new, result = mutate(current)
        if new is None:
            self._data.pop(key, None)
        else:
            self._write(key, new, ttl_s)
        return result

    async def delete_prefix(self, prefix: str) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        for k in doomed:
            del self._data[k]
        logs = [k for k in self._logs if k.startswith(prefix)]
        for k in logs:
            del self._logs[k]
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

        A bounded deque appended in place (no copy of up to ``maxlen`` entries per append).
        """
        now = self._clock()
        log = self._logs.get(key)
        if log is None or log[2] <= now:
            entries: deque[tuple[int, bytes]]
            seq, entries = 1, deque(maxlen=maxlen)
        else:
            seq, entries = log[0] + 1, log[1]
            if entries.maxlen != maxlen:
                entries = deque(entries, maxlen=maxlen)
        entries.append((seq, value))
        self._logs[key] = (seq, entries, now + ttl_s)
        return seq

    async def read_since(self, key: str, seq: int) -> list[tuple[int, bytes]]:
        log = self._logs.get(key)
        if log is None or log[2] <= self._clock():
            return []
        return [(n, v) for n, v in log[1] if n > seq]

    async def clear_log(self, key: str) -> None:
        log = self._logs.get(key)
        if log is not None and log[2] > self._clock():
            self._logs[key] = (log[0], deque(maxlen=log[1].maxlen), log[2])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
        self._logs.clear()

    def sweep(self) -> int:
        """Drop expired keys; returns how many."""
        now = self._clock()
        dropped = 0
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            _, key = heapq.heappop(self._expiry_heap)
            item = self._data.get(key)
            if item is not None and item[1] <= now:
                del self._data[key]
                dropped += 1
        for key in [k for k, log in self._logs.items() if log[2] <= now]:
            del self._logs[key]
            dropped += 1
        if len(self._expiry_heap) > 4 * len(self._data) + 1024:
            self._expiry_heap = [(exp, k) for k, (_, exp) in self._data.items()]
            heapq.heapify(self._expiry_heap)
        return dropped

    async def run_sweeper(self, every_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.sweep()

    def _write(self, key: str, value: bytes, ttl_s: float) -> None:
        expires = self._clock() + max(ttl_s, 0.001)
        self._data[key] = (value, expires)
        heapq.heappush(self._expiry_heap, (expires, key))


async def with_store(call: Awaitable[T]) -> T:
    """Await a store call, turning connection failures into StoreUnavailable."""
    try:
        return await call
    except StoreUnavailable:
        raise
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise StoreUnavailable(str(type(exc).__name__)) from None
