"""Relayed messages batched per resume buffer: one Redis script call appends and publishes them.

Relayed messages for one resume buffer that are queued back to back (a peer's burst of
ICE candidates, read from its socket together) go to Redis as one script call and cross
to the other processes as one sealed bus message. The publisher never waits to fill such
a batch: it only joins what is already queued behind the previous command, so it costs a
lone message nothing. The publisher also numbers them, from the seq it expects Redis to
give (``RelaySeqs``), so that the script rarely has to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from broker.store.base import StoreUnavailable
from broker.store.bus import Envelope, Failed, Handler, with_seq
from broker.store.redis_bus_messages import (
    NODE_ID_BYTES,
    RELAYS_MARK,
    channel_of,
    deliver,
    peer_channel_of,
    seal_relays,
)
from broker.store.redis_pipe import resp_arguments, resp_command
from broker.store.redis_store import NEXT_SEQ_LUA, keep_entries_lua
from broker.store.sealing import Sealer

log = logging.getLogger("broker.bus_redis")

#: Relays to one resume buffer queued back to back travel as one command, up to this many ...
RELAYS_PER_COMMAND = 32
#: ... and about this many bytes of messages.
RELAY_BYTES_PER_COMMAND = 256 * 1024
#: Resume buffers whose next seq the publisher remembers (the most recently relayed to).
EXPECTED_SEQS_MAX = 4096

# Relayed messages for one recipient in one call: append them to its resume buffer (the
# capped "<seq>:<sealed entry>" log of store_redis, numbered on from its last entry) and
# publish them with the first seq the log gave them. The call travels in the publisher's
# pipeline, so the messages keep their place among this process's other messages.
#
# The publisher numbers the entries and the bus message itself, from the seq it expects the
# log to give (what Redis answered for its previous relays to this buffer). When that holds,
# as it does unless another process or the store appended in between, the script checks it
# and passes its arguments on: building strings in Lua was most of the script's cost (P4 in
# benchmarks/, results.md). Otherwise the script numbers them again. What is stored and
# published is the same either way, and the same as before the publisher numbered anything.
# The message goes to the recipient's channel; if no client subscribes it there, to the session's.
# KEYS[1] the log; ARGV: maxlen, ttl ms, the recipient's channel, the session's channel, the
# expected first seq, the bus message (head, "<seq>:", sealed list of envelopes), then one
# "<seq>:<sealed entry>" per message.
_RELAY = (
    NEXT_SEQ_LUA
    + """
local message = ARGV[6]
if first == tonumber(ARGV[5]) then
"""
    + keep_entries_lua("ARGV, 7")
    + """
else
  local entries = {}
  for i = 7, #ARGV do
    local entry = ARGV[i]
    entries[i - 6] = string.format('%d:', first + i - 7) .. string.sub(entry, string.find(entry, ':', 1, true) + 1)
  end
"""
    + keep_entries_lua("entries")
    + """
  local colon = string.find(message, ':', HEAD + 1, true)
  message = string.sub(message, 1, HEAD) .. string.format('%d:', first) .. string.sub(message, colon + 1)
end
if redis.call('SPUBLISH', ARGV[3], message) == 0 and ARGV[3] ~= ARGV[4] then
  redis.call('SPUBLISH', ARGV[4], message)
end
return first
""".replace("HEAD", str(NODE_ID_BYTES + len(RELAYS_MARK)))
)

#: The unchanging start of every relay command after its argument count: EVALSHA, the script's
#: digest, one key. Redis hashes an EVAL's script on every call; the publisher loads it once per connection.
_RELAY_HEAD = resp_arguments((b"EVALSHA", hashlib.sha1(_RELAY.encode()).hexdigest(), 1))
#: Sent first on each of the publisher's connections: a restarted or flushed Redis has no scripts.
LOAD_RELAY = resp_command(b"SCRIPT", b"LOAD", _RELAY)


class RelaySeqs:
    """Per resume buffer relayed to lately: the seq Redis should give its next relay (0: not
    known), and the relays last sent to it (their answer sets it; None once answered)."""

    __slots__ = ("by_log",)

    def __init__(self) -> None:
        self.by_log: OrderedDict[str, list[Any]] = OrderedDict()

    def first_of(self, relays: Relays) -> int:
        """The seq Redis should give the first of these relays, which are being sent now (0: not known)."""
        expected = self.by_log
        known = expected.get(relays.log_key)
        if known is None:
            known = expected[relays.log_key] = [0, relays]
            if len(expected) > EXPECTED_SEQS_MAX:
                expected.popitem(last=False)
        else:
            expected.move_to_end(relays.log_key)
        first: int = known[0]
        known[0] = first + len(relays.envelopes) if first else 0
        known[1] = relays
        return first

    def answered(self, relays: Relays, next_seq: int) -> None:
        """Redis numbered these relays: unless more were sent to that buffer since, the next follow them."""
        known = self.by_log.get(relays.log_key)
        if known is not None and known[1] is relays:
            known[0] = next_seq
            known[1] = None


@dataclass(frozen=True, eq=False, slots=True)
class RelayOrigin:
    """What relays need of the bus that sends them (one per bus): its id and sealer, its local
    handlers by session (the bus's own dict, live), and the seqs it expects."""

    node_id: bytes
    sealer: Sealer
    handlers: dict[str, list[Handler]]
    seqs: RelaySeqs


class Relays:
    """Relayed messages for one resume buffer, queued back to back: one script call for them all.

    Settled by the publisher's pipe like a future: with the first message's seq, it delivers the
    messages to this process's own handlers (stamped) and answers the relays that wait for their
    seq (``publish_relayed``); a failure goes to every relay. It is also the hub's ``Pending``
    for these relays: the hub keeps it, not a future per relay.
    """

    __slots__ = (
        "entries",
        "envelopes",
        "log_key",
        "maxlen",
        "origin",
        "settle",
        "session_id",
        "settled",
        "size",
        "ttl_ms",
        "waiters",
    )

    def __init__(self, origin: RelayOrigin, session_id: str, log_key: str, maxlen: int) -> None:
        self.origin = origin
        self.session_id = session_id
        self.log_key = log_key
        self.maxlen = maxlen
        self.ttl_ms = 0
        self.envelopes: list[Envelope] = []
        self.entries: list[bytes] = []
        #: Per relay: the future of its seq (``publish_relayed``), or whom to tell of a failure.
        self.settle: list[asyncio.Future[int] | Failed] = []
        self.size = 0
        self.settled = False
        self.waiters: list[asyncio.Future[None]] | None = None

    def takes(self, session_id: str, to_peer: str | None, log_key: str, maxlen: int, size: int) -> bool:
        return (
            log_key == self.log_key
            and session_id == self.session_id
            and to_peer == self.envelopes[0].to_peer
            and maxlen == self.maxlen
            and len(self.envelopes) < RELAYS_PER_COMMAND
            and self.size + size <= RELAY_BYTES_PER_COMMAND
        )

    def add(self, envelope: Envelope, entry: bytes, ttl_ms: int, settle: asyncio.Future[int] | Failed) -> None:
        """One more relay, with its sealed resume-buffer entry (the buffer is its recipient's)."""
        self.envelopes.append(envelope)
        self.entries.append(entry)
        self.settle.append(settle)
        self.size += len(envelope.data)
        self.ttl_ms = ttl_ms  # the newest: the session's remaining life, as the last message saw it

    def command(self) -> bytes:
        """The script call, made when the publisher takes it (nothing joins it afterwards)."""
        origin = self.origin
        channel = channel_of(self.session_id)
        # One buffer is one recipient's: the first message names it for them all.
        recipient = self.envelopes[0].to_peer
        to = channel if recipient is None else peer_channel_of(self.session_id, recipient)
        first = origin.seqs.first_of(self)
        message = seal_relays(origin.sealer, channel, origin.node_id, first, self.envelopes)
        entries = [b"%d:%s" % (first + n, entry) for n, entry in enumerate(self.entries)]
        arguments: tuple[bytes | str | int, ...] = (
            self.log_key,
            self.maxlen,
            self.ttl_ms,
            to,
            channel,
            first,
            message,
            *entries,
        )
        return b"*%d\r\n" % (len(arguments) + 3) + _RELAY_HEAD + resp_arguments(arguments)

    def command_or_fail(self) -> bytes | None:
        """``command``, or None when making it failed: a bug, so these relays fail (their senders
        are told) and whoever sends commands goes on."""
        try:
            return self.command()
        except Exception as exc:
            log.exception("event=bus_publish_failed")
            self.set_exception(StoreUnavailable(type(exc).__name__))
            return None

    # The pipe settles it as it settles a future; the hub waits on it (``bus.Pending``).

    def done(self) -> bool:
        return self.settled

    async def wait(self) -> None:
        if not self.settled:
            waiter = asyncio.get_running_loop().create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(waiter)
            await waiter

    def set_result(self, first: Any) -> None:
        self.settled = True
        seq = int(first)
        self.origin.seqs.answered(self, seq + len(self.envelopes))
        handlers = self.origin.handlers.get(self.session_id)
        if handlers:
            for n, envelope in enumerate(self.envelopes):  # the hub's, sent already: stamped in place
                envelope.data = with_seq(envelope.data, seq + n)
                envelope.seq = seq + n
                deliver(handlers, envelope)
        for n, settle in enumerate(self.settle):
            if isinstance(settle, asyncio.Future) and not settle.done():
                settle.set_result(seq + n)
        self._release()

    def set_exception(self, error: BaseException) -> None:
        self.settled = True  # whoever sent them answers the failure
        for settle in self.settle:
            if not isinstance(settle, asyncio.Future):
                try:
                    settle(error)
                except Exception:
                    log.exception("event=bus_relay_failure_unreported")
            elif not settle.done():
                settle.set_exception(error)
        self._release()

    def _release(self) -> None:
        """Wake whoever waits, and let go of the messages (the hub may keep this a while)."""
        self.envelopes, self.entries, self.settle = [], [], []
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
