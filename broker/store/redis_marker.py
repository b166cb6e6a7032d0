"""The deployment's mark in the session Redis: how a broker process tells that Redis came back empty.

A Redis restarted without its data (no persistence, a lost volume, a FLUSHALL) answers every
command as before, but every session it held is gone: without this, people would see "this link
does not work" and nobody would know why. So the first broker process to find the session Redis
without a mark writes one (a random id, ``SET NX``: of several processes starting at once, one
wins and all adopt its id), and every process then checks, every ``CHECK_EVERY_S`` and whenever
a link turns out to have no session, that the mark is still the one it knows:

- no mark, and this process (or its data directory) never knew one: the deployment's first
  start, nothing lost;
- no mark, or another mark, where this process knew one: Redis came back empty. The process
  records when (``EMPTIED_KEY``, kept as long as a link made before could still be opened),
  writes a new mark and logs ``event=session_store_emptied``; ``emptied_at`` then tells the
  link pages, joins and /readyz (wired in broker/http/app.py).

The mark's id is also kept in the data directory, so a broker restarted together with an
emptied Redis (a host reboot) still tells the two cases apart. Both keys hold a random id and a
time, nothing about anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from pathlib import Path

import redis.asyncio as aioredis

from broker.store.base import StoreUnavailable
from broker.store.redis_store import unavailable_on_redis_errors

log = logging.getLogger("broker.store_redis")

MARK_KEY = "deployment:mark"
EMPTIED_KEY = "deployment:emptied"
#: How often each process looks at the mark (besides when a link has no session).
CHECK_EVERY_S = 1.0
#: The file in the data directory that remembers the mark's id across restarts of the broker.
MARK_FILE = "session-store.mark"


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw


class StoreMarker:
    """One broker process's view of the mark; ``check`` keeps it current."""

    def __init__(self, client: aioredis.Redis, keep_s: int, data_dir: Path | None = None) -> None:
        """``keep_s``: how long the emptied record lasts (until every link made before has expired)."""
        self._redis = client
        self._keep_s = keep_s
        self._file = data_dir / MARK_FILE if data_dir is not None else None
        self._known = self._remembered()
        #: When the session Redis was found emptied (Unix seconds), while that record lasts.
        self.emptied_at: int | None = None
        self._lock = asyncio.Lock()

    def _remembered(self) -> str | None:
        if self._file is None:
            return None
        try:
            text = self._file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text or None

    def _remember(self, mark: str) -> None:
        self._known = mark
        if self._file is None:
            return
        try:
            partial = self._file.with_name(f"{MARK_FILE}.{os.getpid()}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(mark + "\n")
            os.replace(partial, self._file)  # processes sharing the directory write the same id
        except OSError:
            log.warning("event=store_mark_not_saved")

    async def check(self) -> bool:
        """Look at the mark once; True when this look found the store emptied (it was not known before).

        Raises StoreUnavailable when Redis cannot be reached.
        """
        async with self._lock:
            with unavailable_on_redis_errors():
                mark = _text(await self._redis.get(MARK_KEY))
                if mark is not None and mark == self._known:
                    await self._read_emptied()
                    return False
                if self._known is None:
                    # This process never knew a mark: adopt the one there, or write the first
                    # (several processes starting at once: one SET NX wins, all adopt it).
                    if mark is None:
                        await self._redis.set(MARK_KEY, secrets.token_hex(16), nx=True)
                    self._remember(await self._mark())
                    await self._read_emptied()
                    return False
                # Came back empty (or another process already found it so and marked it anew).
                # The record goes first, so whoever sees a new mark also finds it.
                await self._redis.set(EMPTIED_KEY, str(int(time.time())), nx=True, ex=self._keep_s)
                await self._redis.set(MARK_KEY, secrets.token_hex(16), nx=True)
                self._remember(await self._mark())
                await self._read_emptied()
        log.warning("event=session_store_emptied")
        return True

    async def _mark(self) -> str:
        mark = _text(await self._redis.get(MARK_KEY))
        if mark is None:  # emptied again in between: the next check finds it
            raise StoreUnavailable("mark vanished")
        return mark

    async def _read_emptied(self) -> None:
        raw = _text(await self._redis.get(EMPTIED_KEY))
        self.emptied_at = int(raw) if raw is not None and raw.isdigit() else None

    async def watch(self) -> None:
        """Check the mark every CHECK_EVERY_S for the life of the process; an outage just waits."""
        while True:
            with contextlib.suppress(StoreUnavailable):
                await self.check()
            await asyncio.sleep(CHECK_EVERY_S)
