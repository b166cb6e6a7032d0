"""The embedded store: session state in this process's memory, for a practice that runs one broker.

Every value expires with its session, like on Redis; a sweeper drops what nobody read again.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker.store.base import Mutation, StoreUnavailable

T = TypeVar("T")


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
