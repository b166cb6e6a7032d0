"""Each therapist's history: the signed records of their sessions that ended in the last 30 days.

The record is the one ``session_record`` carries (broker.signaling.record): ids, times, how each
peer was verified, whether the checklist passed; no name, no content. One key per therapist
(``HISTORY_PREFIX`` + their opaque id) holds the list, newest last, with a TTL that follows the
newest entry; entries older than ``KEEP_S`` are dropped whenever the list is read or written.
It is a durable key (``store.base.is_durable``): sealed in the embedded store's session file and
in Redis, like every stored value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from broker.store.base import HISTORY_PREFIX, Store, StoreUnavailable

log = logging.getLogger("broker.history")

#: How long an ended session's record stays in its therapist's history.
KEEP_S = 30 * 24 * 3600
#: Records one history holds at most (the oldest go first): a bound on one key's size.
MAX_RECORDS = 2000


class SignedRecord(msgspec.Struct):
    """A session record and the broker's signature of it, as ``session_record`` carries them."""

    record: dict[str, Any]
    signature: str
    key_id: str


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[SignedRecord])


def _ended(entry: SignedRecord) -> int:
    ended = entry.record.get("ended")
    return ended if isinstance(ended, int) else 0


class SessionHistory:
    """Adds to and reads each therapist's history in the store."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    @staticmethod
    def key(therapist: str) -> str:
        return HISTORY_PREFIX + therapist

    def _recent(self, raw: bytes | None) -> list[SignedRecord]:
        if raw is None:
            return []
        try:
            entries = _decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return []
        since = self.clock() - KEEP_S
        return [e for e in entries if _ended(e) > since]

    async def add(self, therapist: str, entry: SignedRecord) -> None:
        def mutate(raw: bytes | None) -> tuple[bytes | None, None]:
            entries = [e for e in self._recent(raw) if e.record.get("session") != entry.record.get("session")]
            entries.append(entry)
            entries.sort(key=_ended)
            return _encoder.encode(entries[-MAX_RECORDS:]), None

        await self.store.update(self.key(therapist), mutate, float(KEEP_S))

    async def keep(self, therapist: str, entry: SignedRecord) -> None:
        """``add``, for a session that has ended anyway: a store outage loses this one record."""
        try:
            await self.add(therapist, entry)
        except StoreUnavailable:
            log.warning("event=history_unavailable session=%s", entry.record.get("session"))

    async def records(self, therapist: str) -> list[SignedRecord]:
        """The therapist's records of the last 30 days, newest first."""
        return list(reversed(self._recent(await self.store.get(self.key(therapist)))))
