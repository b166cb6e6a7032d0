"""What the embedded store keeps per resume-buffer entry and per value (issue 32): the bytes
themselves and a list slot, not the spare room of the encoder that made them, nor a tuple and a
number object per entry. Memory, measured by tracemalloc: no timing."""

from __future__ import annotations

import asyncio
import base64
import random
import tracemalloc
from collections.abc import Callable

import msgspec
import pytest

from broker.signaling.protocol import Candidate, Offer, encode
from broker.store.memory import MemoryStore

ENTRIES = 128
#: What an entry may cost beyond its bytes: a bytes object's header (33) and a list slot (8), rounded up.
OVERHEAD = 48


def relayed() -> bytes:
    """A relayed candidate as the broker encodes it (msgspec's buffer holds more than the message)."""
    candidate = Candidate(to="abcdefgh", candidate="candidate:842163049 1 udp 1677729535 198.51.100.7 49203 typ srflx")
    return encode(msgspec.structs.replace(candidate, from_="zyxwvuts"))


def test_a_resume_buffer_entry_costs_its_bytes_and_a_slot() -> None:
    store = MemoryStore(clock=lambda: 1000.0)
    size = len(relayed())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(ENTRIES):
            store.append_now("s:{one}:box:abcdefgh", relayed(), ENTRIES, 600)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept <= ENTRIES * (size + OVERHEAD) + 1024, f"{kept / ENTRIES:.0f} bytes per {size}-byte entry"


async def kept_by_puts(make: Callable[[], bytes]) -> int:
    """Bytes a store keeps for ``ENTRIES`` values made by ``make``, each under its own key."""
    store = MemoryStore(clock=lambda: 1000.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(ENTRIES):
            await store.put(f"s:{{v{n}}}", make(), 600)
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


async def test_a_kept_value_holds_no_spare_room() -> None:
    exact = await kept_by_puts(lambda: bytes(memoryview(relayed())))
    encoded = await kept_by_puts(relayed)
    assert encoded <= exact + ENTRIES * 16, f"{(encoded - exact) / ENTRIES:.0f} bytes more per value"


async def test_ending_a_session_finds_its_keys_through_expiry_sweeps_and_deletes() -> None:
    """The store lists each session's keys so that ending one touches only its own: the list
    follows every way a key comes and goes."""
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    record, box, other = "s:{one}", "s:{one}:box:abcdefgh", "s:{one2}"
    await store.put(record, b"r", 10)
    await store.put(other, b"o", 100)
    store.append_now(box, b"m", 8, 10)
    now[0] += 20  # both of the session's keys expire
    assert await store.get(record) is None
    assert store.sweep() >= 1
    assert await store.delete_prefix("s:{one}") == 0
    await store.put(record, b"r2", 10)
    store.append_now(box, b"m2", 8, 10)
    await store.update(record, lambda raw: (None, None), 10)  # deleted by its update
    await store.put(record, b"r3", 10)
    assert await store.delete_prefix("s:{one}") == 2
    assert await store.read_since(box, 0) == [] and await store.get(record) is None
    assert await store.get(other) == b"o", "a session whose id begins like it is another session"
    assert await store.delete_prefix("s:{one2}") == 1


def sealed_offer(ciphertext: int = 3028) -> bytes:
    """A sealed offer as the broker relays it (docs/protocol.md 7.7): some 4 KB of base64url."""
    sealed = base64.urlsafe_b64encode(random.Random(7).randbytes(ciphertext)).rstrip(b"=").decode()
    return encode(Offer(to="abcdefgh", sealed=sealed, counter=3, from_="zyxwvuts"))


def test_a_sealed_entry_keeps_its_ciphertext_as_bytes_and_comes_back_as_it_was() -> None:
    """A sealed message's base64url text is a third larger than the ciphertext it encodes: the
    resume buffer keeps the bytes, and a replay sends the very message that was relayed."""
    store = MemoryStore(clock=lambda: 1000.0)
    offers = [sealed_offer(3028 + n) for n in range(ENTRIES)]  # every length modulo 3
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offer in offers:
            store.append_now("s:{one}:box:abcdefgh", offer, ENTRIES, 600)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    replayed = asyncio.run(store.read_since("s:{one}:box:abcdefgh", 0))
    assert [entry for _, entry in replayed] == offers
    text = sum(len(o) for o in offers)
    assert kept <= 0.8 * text, f"{kept / ENTRIES:.0f} bytes kept per {text / ENTRIES:.0f}-byte sealed offer"


@pytest.mark.parametrize(
    "message",
    [
        b'{"type":"offer","sealed":"' + b"A" * 63 + b'"}',  # too short to pack
        b'{"type":"offer","sealed":"' + b"A" * 98 + b'B"}',  # stray bits in its last character
        b'{"type":"offer","sealed":"' + b"A" * 40 + b"*" * 40 + b'"}',  # not base64url
        b'{"type":"offer","sealed":"' + b"A" * 100,  # no closing quote
        b"\x00" + b"A" * 200,  # what a packed entry begins with
        b'{"type":"candidate","sealed":null,"candidate":"candidate:1 1 udp 1 198.51.100.7 9 typ host"}',
        b"",
    ],
)
def test_an_entry_that_cannot_be_packed_comes_back_as_it_was(message: bytes) -> None:
    store = MemoryStore(clock=lambda: 1000.0)
    store.append_now("s:{one}:box:abcdefgh", message, 8, 600)
    assert asyncio.run(store.read_since("s:{one}:box:abcdefgh", 0)) == [(1, message)]
