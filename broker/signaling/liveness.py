"""Which broker processes are alive, so that the seats a dead one held are freed.

Each process (a *node*: ``tokens.new_node_id``, random, nothing about the machine) keeps a
mark in the store, ``node:<id>``, holding nothing but ``1``, with a TTL of one heartbeat,
written again ``MARKS_PER_HEARTBEAT`` times per heartbeat. Every connection id names its
node (``tokens.new_connection_id``), so a seat's record says which node holds it.

At each mark, a process looks at the sessions it holds a connection of: a seat held by a node
whose mark is gone is released (``session.release_nodes``, as a disconnect would) and every
peer of the session sees it (``connected`` false in ``waiting_room`` and ``peers``). A peer
that came back through another process meanwhile holds its seat with a new connection, which
the release does not touch: it is applied atomically to the record as it is then. A session
with nobody left on a live process needs nobody told; the first process to hold one of its
peers again releases what a dead one held. So a dead process's seats are released within one
heartbeat and one mark's interval of its death.

Alone on the embedded store (one process, its own bus), the only other nodes a record can name
are this process's earlier runs, all dead; and once a session names none, every connection it
gets is this process's: so each session is read once, not again at every mark. On Redis the sessions are read a batch at a time (``READ_BATCH``),
so that a process holding thousands of sessions sends no burst of reads that would hold up the
relays waiting for the same connections.

A store outage must not make everyone dead: a process declares no other dead until its own
mark has been written without a failure for a whole TTL (since it started, since the store
came back, or since it found its own mark gone), so every live process had the time to write
its mark again. A process that finds its own mark gone (the store lost it, or the process
hung) may have had seats released by others: it tells the peers whose seat no longer names
their connection to reconnect (``reconnect``), and their resume takes their seats back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from broker.signaling import session as sm
from broker.signaling.connections import CLOSE_RESTART, Connections
from broker.signaling.protocol import ProtocolError, Reconnect
from broker.signaling.session import Session
from broker.signaling.session_records import SessionRecords
from broker.store.base import Store, StoreUnavailable

log = logging.getLogger("broker.hub")

#: Where each node's mark lives. Not a session key: nothing of a person, gone with its TTL.
MARK_PREFIX = "node:"
#: Marks written per heartbeat; a dead node's seats go within ``1 + 1/MARKS_PER_HEARTBEAT`` heartbeats.
MARKS_PER_HEARTBEAT = 4
#: Session records read at once when looking for dead nodes' seats.
READ_BATCH = 64


def mark_key(node: str) -> str:
    return MARK_PREFIX + node


class NodeLiveness:
    """This process's mark in the store, and the release of seats held by nodes without one."""

    def __init__(
        self,
        store: Store,
        records: SessionRecords,
        connections: Connections,
        heartbeat_s: float,
        *,
        sessions_here: Callable[[], Iterable[str]],
        publish_views: Callable[[Session], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        alone: bool = False,
    ) -> None:
        self.store = store
        #: No other live process can exist (the embedded store): a session is checked until clean.
        self.alone = alone
        #: With ``alone``: sessions here that name no other node, which need no further look.
        self._clean: set[str] = set()
        self.records = records
        self.connections = connections
        self.node = connections.node
        #: The mark's TTL: a node not heard of for this long is dead.
        self.ttl_s = heartbeat_s
        self.interval_s = heartbeat_s / MARKS_PER_HEARTBEAT
        self._sessions_here = sessions_here
        self._publish_views = publish_views
        self.clock = clock
        #: Since when this node's mark has been written without a failure (None: it is failing).
        self.steady_since: float | None = None
        self._written = False

    async def run(self) -> None:
        """Mark, and release what dead nodes held, every ``interval_s`` until cancelled (the first
        beat is the caller's: ``Hub.start``)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception:  # the next beat tries again; never let the loop die
                log.exception("event=internal_error where=liveness")

    async def beat(self) -> None:
        """Write this node's mark; once steady for a TTL, release the seats of nodes without one."""
        now = self.clock()
        try:
            had_mark = await self.store.update(mark_key(self.node), lambda old: (b"1", old is not None), self.ttl_s)
        except StoreUnavailable:
            if self.steady_since is not None:
                log.info("event=node_mark_unavailable node=%s", self.node)
            self.steady_since = None
            return
        lapsed = self._written and not had_mark
        self._written = True
        if lapsed:
            log.warning("event=node_mark_lapsed node=%s", self.node)
            await self.reconnect_released()
        if self.steady_since is None or lapsed:
            self.steady_since = now
        if now - self.steady_since >= self.ttl_s:
            await self.release_dead()

    async def release_dead(self) -> int:
        """Release, in the sessions this process holds a peer of, every seat held by a node whose
        mark is gone; every peer of such a session is sent its new view. Returns how many."""
        try:
            here = list(self._sessions_here())
            if self.alone:
                self._clean.intersection_update(here)
                here = [s for s in here if s not in self._clean]
            found: list[Session | None] = []
            for start in range(0, len(here), READ_BATCH):
                found += await asyncio.gather(*(self.records.get(s) for s in here[start : start + READ_BATCH]))
            sessions = [s for s in found if s is not None]
            nodes = sorted(set().union(*(sm.held_on(s) for s in sessions)) - {self.node})
            marks = await asyncio.gather(*(self.store.get(mark_key(node)) for node in nodes))
        except StoreUnavailable:
            return 0
        dead = {node for node, mark in zip(nodes, marks, strict=True) if mark is None}
        if self.alone:
            self._clean.update(s.id for s in sessions if not sm.held_on(s) - {self.node})
        if not dead:
            return 0
        freed = 0
        for session in sessions:
            if not sm.held_on(session) & dead:
                continue
            try:
                changed, count = await self.records.mutate(session.id, lambda s: sm.release_nodes(s, dead))
            except (ProtocolError, StoreUnavailable):
                continue
            if count:
                freed += count
                log.info("event=seats_released_dead_node session=%s seats=%d", session.id, count)
                await self._publish_views(changed)
        return freed

    async def reconnect_released(self) -> int:
        """Every connection here whose place its session's record no longer names (another process
        released it while this one's mark was gone) is told to reconnect: its resume takes the
        place back. Returns how many."""
        told = 0
        for conn in self.connections:
            if not conn.joined or conn.closed:
                continue
            try:
                session = await self.records.get(conn.session_id or "")
            except StoreUnavailable:
                return told
            if session is None or conn.id in sm.connections_of(session, conn.peer_id or ""):
                continue
            log.info("event=released_peer_reconnects conn=%s", conn.id)
            conn.close_after_queue(CLOSE_RESTART, Reconnect(reason="resume", after_ms=0))
            told += 1
        return told
