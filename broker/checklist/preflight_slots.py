"""Fair sharing of this process's pre-flight slots between seats and sessions.

A pre-flight holds one of the broker's own peer connections for up to its timeout, and the checklist requires
one, so a single client must not be able to keep everyone else's out (security review, issue 25, finding 4).
The rules, per broker process:

- **one at a time per seat**: a seat with a pre-flight running or waiting for a slot gets ``preflight_limited``
  for another offer (the running one is kept: its result still counts);
- **a rate per seat**: a seat starts at most ``per_seat_per_minute`` pre-flights in any ``window_s``; beyond
  that, ``preflight_limited`` with the time until the oldest start leaves the window;
- **a share per session**: one session holds at most ``per_session`` slots at once; its further offers wait;
- **fair waiting**: an offer that finds no slot waits for one, at most ``wait_s`` (then ``preflight_busy``).
  A freed slot goes to the waiting seat that started the fewest pre-flights in the window, then to the one that
  came first, passing over seats of a session already holding its share. A seat of another session therefore
  waits behind at most the seats with fewer recent pre-flights than its own, never behind a hammering one.

Every refusal carries a retry hint (seconds). Pure bookkeeping with an injectable clock; the pre-flight
service (broker.checklist.preflight) acquires a slot before it makes a peer connection and releases it after teardown.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.config import Config

__all__ = ["Slot", "SlotLimits", "PreflightRefused", "SlotScheduler"]

#: Who asks for a slot: (session id, seat's peer id).
SeatKey = tuple[str, str]


@dataclass(frozen=True)
class SlotLimits:
    """The pre-flight limits of one broker process (see the module docstring)."""

    #: Pre-flights running at once in this process.
    slots: int = 8
    #: Of those, how many one session may hold at once.
    per_session: int = 4
    #: Pre-flights one seat may start in any ``window_s``.
    per_seat_per_minute: int = 6
    #: How long an offer may wait for a slot before it gets ``preflight_busy``.
    wait_s: float = 8.0
    window_s: float = 60.0
    #: Offers waiting at once; beyond that, ``preflight_busy`` straight away.
    max_waiting: int = 256

    @classmethod
    def from_config(cls, config: Config) -> SlotLimits:
        return cls(
            slots=config.preflight_slots,
            per_session=config.preflight_session_slots,
            per_seat_per_minute=config.preflight_seat_per_minute,
            wait_s=config.preflight_wait_s,
        )

    def problems(self) -> list[str]:
        """What makes these limits unusable, in plain words (empty list = fine)."""
        out = []
        if self.slots < 1 or self.per_session < 1 or self.per_seat_per_minute < 1:
            out.append("preflight_slots, preflight_session_slots and preflight_seat_per_minute must be at least 1.")
        if self.wait_s < 0:
            out.append("preflight_wait_s must not be negative.")
        if self.window_s <= 0:
            out.append("The pre-flight rate window must be positive.")
        return out


class PreflightRefused(Exception):
    """An offer the broker will not answer, or a result it cannot give (no slot for this seat among
    them). ``code`` is stable and goes on the wire: preflight_bad_offer, preflight_media_refused,
    preflight_busy, preflight_limited, preflight_unknown. ``retry_after_s``, when set, is how long
    to wait before offering again."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = None if retry_after_s is None else max(0.0, retry_after_s)


@dataclass(eq=False)
class Slot:
    """A slot held by one seat's pre-flight; give it back with ``SlotScheduler.release``."""

    key: SeatKey
    #: Clock time by which the holder gives it back at the latest (for retry hints).
    held_until: float


@dataclass(eq=False)
class _Waiter:
    key: SeatKey
    order: int
    gives_up_at: float
    granted: asyncio.Event = field(default_factory=asyncio.Event)
    slot: Slot | None = None


class SlotScheduler:
    """Hands out the pre-flight slots under ``SlotLimits``. ``hold_s`` is the longest a pre-flight keeps its slot
    (its timeout and teardown), used only to tell a refused seat when to come back."""

    def __init__(self, limits: SlotLimits, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.hold_s = hold_s
        self._clock = clock
        self._running: dict[SeatKey, Slot] = {}
        self._per_session: Counter[str] = Counter()
        self._waiting: list[_Waiter] = []
        self._starts: dict[SeatKey, deque[float]] = {}
        self._order = itertools.count()

    def running_count(self) -> int:
        return len(self._running)

    def waiting_count(self) -> int:
        return len(self._waiting)

    def held_by(self, session: str) -> int:
        """Slots this session holds now."""
        return self._per_session.get(session, 0)

    def starts_in_window(self, session: str, seat: str) -> int:
        """How many pre-flights this seat started in the current window (its place when waiting)."""
        self._forget_old(self._clock())
        return len(self._starts.get((session, seat), ()))

    async def acquire(self, session: str, seat: str) -> Slot:
        """A slot for this seat's next pre-flight, waiting for one if needed; PreflightRefused when the seat is
        over its own limits, or when no slot came within ``wait_s``."""
        now = self._clock()
        self._forget_old(now)
        key = (session, seat)
        self._check_seat(key, now)
        if len(self._waiting) >= self.limits.max_waiting:
            raise self._busy(now)
        waiter = _Waiter(key, next(self._order), now + self.limits.wait_s)
        self._waiting.append(waiter)
        self._dispatch()
        if waiter.slot is None:
            try:
                await asyncio.wait_for(waiter.granted.wait(), timeout=self.limits.wait_s)
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                self._withdraw(waiter)
                raise
        if waiter.slot is None:
            self._withdraw(waiter)
            raise self._busy(self._clock())
        return waiter.slot

    def release(self, slot: Slot) -> None:
        """Give a slot back (again is harmless) and hand it to the next waiting seat."""
        if self._running.get(slot.key) is not slot:
            return
        del self._running[slot.key]
        session = slot.key[0]
        self._per_session[session] -= 1
        if self._per_session[session] <= 0:
            del self._per_session[session]
        self._dispatch()

    # -- internals -------------------------------------------------------------------------------------------

    def _check_seat(self, key: SeatKey, now: float) -> None:
        running = self._running.get(key)
        if running is not None:
            raise PreflightRefused(
                "preflight_limited",
                "A network check for this device is already running. Wait for it to finish before starting another.",
                running.held_until - now,
            )
        for waiter in self._waiting:
            if waiter.key == key:
                raise PreflightRefused(
                    "preflight_limited",
                    "A network check for this device is already waiting to start. Wait for it before starting another.",
                    waiter.gives_up_at - now + self.hold_s,
                )
        starts = self._starts.get(key)
        if starts is not None and len(starts) >= self.limits.per_seat_per_minute:
            wait = starts[0] + self.limits.window_s - now
            raise PreflightRefused(
                "preflight_limited",
                f"This device has run the network check {len(starts)} times in the last minute. "
                "It can run it again shortly.",
                wait,
            )

    def _busy(self, now: float) -> PreflightRefused:
        soonest = min((slot.held_until for slot in self._running.values()), default=now)
        return PreflightRefused(
            "preflight_busy",
            "Many network checks are running right now. Yours will be tried again in a moment.",
            max(1.0, soonest - now),
        )

    def _dispatch(self) -> None:
        """While a slot is free, give it to the best waiting seat whose session is under its share."""
        while self._waiting and len(self._running) < self.limits.slots:
            eligible = [w for w in self._waiting if self._per_session[w.key[0]] < self.limits.per_session]
            if not eligible:
                return
            best = min(eligible, key=lambda w: (len(self._starts.get(w.key, ())), w.order))
            self._waiting.remove(best)
            best.slot = self._grant(best.key)
            best.granted.set()

    def _grant(self, key: SeatKey) -> Slot:
        now = self._clock()
        slot = Slot(key, now + self.hold_s)
        self._running[key] = slot
        self._per_session[key[0]] += 1
        self._starts.setdefault(key, deque()).append(now)
        return slot

    def _withdraw(self, waiter: _Waiter) -> None:
        """A waiter that stops waiting: out of the queue, and a slot it was given just now goes back."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        if waiter.slot is not None:
            self.release(waiter.slot)
            waiter.slot = None

    def _forget_old(self, now: float) -> None:
        """Drop starts that left the window, and seats with none left (memory stays bounded)."""
        horizon = now - self.limits.window_s
        for key in list(self._starts):
            starts = self._starts[key]
            while starts and starts[0] <= horizon:
                starts.popleft()
            if not starts:
                del self._starts[key]
