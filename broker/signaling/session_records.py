"""Each session's state record (``Session``) as this process reads and changes it in the store.

Changes are one state-machine step applied atomically by the store. Reads go
through two caches of this process: the decoded records (a decode costs more than
comparing the bytes), and the copy that relays check admission against, which
lets a relay go on without waiting for the store (``RELAY_RECORD_MAX_AGE_S``).
Not to be confused with the signed record of an ended session (broker.signaling.record).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from broker.signaling.connections import Spawn
from broker.signaling.protocol import ErrorCode, ProtocolError
from broker.signaling.session import Session
from broker.store.base import Store, StoreUnavailable, session_key

log = logging.getLogger("broker.hub")

#: How long relays may go on checking this process's copy of a session record. A change made here
#: drops the copy at once, and a change made by another process when its notice (every change that
#: matters to relaying publishes one) arrives on the bus; the age limit covers a notice lost in a
#: bus outage.
RELAY_RECORD_MAX_AGE_S = 0.5
#: A copy older than this is read again in the background by the next relay that uses it, so a
#: session with traffic keeps a fresh copy and its relays never wait for the store (P4 in
#: benchmarks/: on Redis, waiting cost every sixth message a round trip at 12 messages/s).
RELAY_RECORD_REFRESH_S = RELAY_RECORD_MAX_AGE_S / 2
#: Copies that fall due within this long of each other are read again together: on Redis their
#: reads leave in one write and their answers come back together, so a process with many busy
#: sessions wakes itself and Redis a few times a second for them, not once per session and
#: refresh (P4 in benchmarks/: at 1,000 messages/s over 100 sessions, 400 reads a second per
#: process cost more CPU than the relays' own work). Well under the time left before the copy's
#: age runs out (MAX_AGE - REFRESH).
RELAY_RECORD_GATHER_S = 0.05
#: Decoded session records kept per process, the most recently used (a miss costs one msgpack decode).
DECODED_MAX = 1024

_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Session)


def encode_record(session: Session) -> bytes:
    return _record_encoder.encode(session)


def decode_record(raw: bytes) -> Session:
    return _record_decoder.decode(raw)


def next_revision(previous: int, now: float) -> int:
    """The revision of a record's next change: above the previous one, and at least the time in
    milliseconds, so that it still grows after a process of an older release (which keeps no
    revision) wrote the record during a rolling upgrade."""
    return max(previous + 1, int(now * 1000))


def session_ended() -> ProtocolError:
    return ProtocolError(ErrorCode.SESSION_ENDED, "This session has ended.")


class SessionRecords:
    """Reads and atomic changes of the session records, through this process's copies of them."""

    def __init__(self, store: Store, clock: Callable[[], float], spawn: Spawn) -> None:
        self.store = store
        self.clock = clock
        self._spawn = spawn
        self._decoded: OrderedDict[str, tuple[bytes, Session]] = OrderedDict()
        #: What relays check admission against, per session: (when read, record); see RELAY_RECORD_MAX_AGE_S.
        self._relay_records: OrderedDict[str, tuple[float, Session]] = OrderedDict()
        #: Sessions whose copy is being read again in the background (one read each at a time).
        self._refreshing: set[str] = set()
        #: Of those, the ones whose read waits for the others of its gathering (RELAY_RECORD_GATHER_S).
        self._refresh_due: list[str] = []
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._record_changes = 0

    # ------------------------------------------------------------ the store's record

    async def get(self, session_id: str) -> Session | None:
        raw = await self.store.get(session_key(session_id))
        return self._decode(session_id, raw) if raw is not None else None

    async def load(self, session_id: str) -> Session:
        session = await self.get(session_id)
        if session is None:
            raise session_ended()
        return session

    async def save(self, session: Session) -> None:
        ttl = max(1.0, session.expires - self.clock())
        await self.store.put(session_key(session.id), encode_record(session), ttl)

    async def mutate(
        self,
        session_id: str,
        step: Callable[[Session], Any],
        missing: Callable[[], ProtocolError] | None = None,
        *,
        expires: int | None = None,
    ) -> tuple[Session, Any]:
        """Apply one state-machine step atomically; a refused step writes nothing.

        ``expires``: the record's new end, for a step that moves it (its TTL follows)."""
        out: list[Session] = []
        gone = missing or session_ended

        def mutate(raw: bytes | None) -> tuple[bytes | None, Any]:
            if raw is None:
                raise gone()
            session = decode_record(raw)
            result = step(session)
            session.revision = next_revision(session.revision, self.clock())
            new = encode_record(session)
            out.append(session)
            return new, result

        ttl = 1.0
        cached = self._decoded.get(session_id)
        if cached is not None:
            ttl = max(1.0, cached[1].expires - self.clock())
        else:
            current = await self.get(session_id)
            if current is None:
                raise gone()
            ttl = max(1.0, current.expires - self.clock())
        if expires is not None:
            ttl = max(1.0, expires - self.clock())
        self.changed(session_id)
        try:
            result = await self.store.update(session_key(session_id), mutate, ttl)
        finally:
            self.changed(session_id)
        return out[-1], result

    def _decode(self, session_id: str, raw: bytes) -> Session:
        """The record decoded, from a small cache of the recently used ones when it has not changed."""
        decoded = self._decoded
        cached = decoded.get(session_id)
        if cached is not None and (cached[0] is raw or cached[0] == raw):
            decoded.move_to_end(session_id)
            return cached[1]
        session = decode_record(raw)
        decoded[session_id] = (raw, session)
        decoded.move_to_end(session_id)
        if len(decoded) > DECODED_MAX:
            decoded.popitem(last=False)
        return session

    def forget(self, session_id: str) -> None:
        """The session ended, or has no connection here any more: keep no copy of it."""
        self._decoded.pop(session_id, None)
        self.changed(session_id)

    # ------------------------------------------------------------ the relays' copy

    def relay_copy_now(self, session_id: str) -> Session | None:
        """This process's recent copy of the session record, if it has one."""
        hit = self._relay_records.get(session_id)
        if hit is None:
            return None
        age = time.monotonic() - hit[0]
        if age >= RELAY_RECORD_REFRESH_S:
            if age >= RELAY_RECORD_MAX_AGE_S:
                return None
            if session_id not in self._refreshing:
                self._refreshing.add(session_id)
                # Read after the relay that found it old is on its way, with the others due soon.
                if not self._refresh_due:
                    self._refresh_timer = asyncio.get_running_loop().call_later(
                        RELAY_RECORD_GATHER_S, self._start_refresh
                    )
                self._refresh_due.append(session_id)
        return hit[1]

    def _start_refresh(self) -> None:
        """Read every copy gathered: all in this step, so their reads go to the store together."""
        due, self._refresh_due, self._refresh_timer = self._refresh_due, [], None
        for session_id in due:
            self._spawn(self._refresh_relay_copy(session_id))

    async def _refresh_relay_copy(self, session_id: str) -> None:
        """Read the copy again while relays go on using it (it is still young enough)."""
        try:
            await self._read_relay_copy(session_id)
        except (ProtocolError, StoreUnavailable):
            pass  # the next relay reads it itself, and answers what it finds
        except Exception:
            log.exception("event=internal_error where=relay_record_refresh")
        finally:
            self._refreshing.discard(session_id)

    async def relay_copy(self, session_id: str) -> Session:
        """The session record as relays see it: this process's recent copy, else the store's."""
        session = self.relay_copy_now(session_id)
        if session is not None:
            return session
        return await self._read_relay_copy(session_id)

    async def _read_relay_copy(self, session_id: str) -> Session:
        """The store's record, kept as this process's copy unless a change came meanwhile."""
        now = time.monotonic()
        changes = self._record_changes
        session = await self.load(session_id)
        if changes == self._record_changes:  # no change was made or announced while it was read
            self._relay_records[session_id] = (now, session)
            self._relay_records.move_to_end(session_id)
            if len(self._relay_records) > DECODED_MAX:
                self._relay_records.popitem(last=False)
        return session

    def changed(self, session_id: str) -> None:
        """The session's record changed (here, or announced on the bus): relays read it again."""
        self._record_changes += 1
        self._relay_records.pop(session_id, None)

    def all_changed(self) -> None:
        """Changes may have been announced and missed (the bus was cut off): relays read every record again."""
        self._record_changes += 1
        self._relay_records.clear()

    def stop(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
