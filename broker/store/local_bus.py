"""The embedded bus: a session's messages delivered inside the one broker process, in publish order."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable

from broker.store.base import Store
from broker.store.bus import Envelope, Failed, Handler, append_then_publish, with_seq
from broker.store.memory import MemoryStore


class LocalBus:
    """Delivers synchronously inside the one process, in publish order."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)

    async def subscribe(self, session_id: str, handler: Handler) -> None:
        self._handlers[session_id].append(handler)

    async def unsubscribe(self, session_id: str, handler: Handler) -> None:
        handlers = self._handlers.get(session_id)
        if handlers and handler in handlers:
            handlers.remove(handler)
            if not handlers:
                del self._handlers[session_id]

    async def publish(self, session_id: str, envelope: Envelope) -> None:
        self.publish_now(session_id, envelope)

    def publish_now(self, session_id: str, envelope: Envelope) -> None:
        for handler in list(self._handlers.get(session_id, ())):
            handler(envelope)

    async def publish_relayed(
        self, session_id: str, envelope: Envelope, store: Store, log_key: str, maxlen: int, ttl_s: float
    ) -> int:
        seq = self.publish_relayed_soon(session_id, envelope, store, log_key, maxlen, ttl_s, _ignore)
        if seq is not None:
            return seq
        return await append_then_publish(self, store, session_id, envelope, log_key, maxlen, ttl_s)

    def publish_relayed_soon(
        self,
        session_id: str,
        envelope: Envelope,
        store: Store,
        log_key: str,
        maxlen: int,
        ttl_s: float,
        failed: Failed,
    ) -> int | None:
        """With the embedded store: no coroutine at all on a relayed message's way (P1 in benchmarks/)."""
        if type(store) is not MemoryStore:
            return None
        seq = store.append_now(log_key, envelope.data, maxlen, ttl_s)
        self.publish_now(session_id, Envelope(envelope.to_peer, None, with_seq(envelope.data, seq), seq=seq))
        return seq

    async def hold_peer(self, session_id: str, peer_id: str) -> None:
        """Every message reaches every handler of its session in this process already."""

    async def release_peer(self, session_id: str, peer_id: str) -> None:
        """Nothing was held."""

    def add_reconnect_listener(self, listener: Callable[[], Awaitable[None]]) -> None:
        """One process never loses its own bus."""

    async def close(self) -> None:
        self._handlers.clear()

    def channels(self) -> int:
        return len(self._handlers)


def _ignore(error: BaseException) -> None:
    """A failure within the step raises instead: nothing is left to tell."""
