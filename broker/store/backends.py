"""Which store and bus a broker process uses: in its own memory (the embedded default, one
process) or on Redis (several processes, one practice).

The one place that builds both Redis halves, which depend on each other only through this module:
the bus carries relays the store logs, and the store's readiness waits for the bus.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from broker.store.base import Store
from broker.store.bus import Bus
from broker.store.local_bus import LocalBus
from broker.store.memory import MemoryStore
from broker.store.redis_bus import RedisBus
from broker.store.redis_store import TIMEOUT_S, RedisStore, redis_client
from broker.store.sealing import Sealer
from broker.store.session_file import open_session_store

log = logging.getLogger("broker.store_redis")


async def open_backends(
    redis_url: str, key: bytes, *, session_file: Path | None = None, session_key: bytes = b""
) -> tuple[Store, Bus]:
    """Redis when ``redis_url`` is set, else this process's memory. ``key`` seals what Redis holds.

    In memory, with ``session_file``: sessions are kept there too (sealed with ``session_key``),
    and the store starts with what it holds, so a restart loses none (``session_file.py``).
    """
    if redis_url:
        return await connect_redis(redis_url, key)
    if session_file is not None:
        return await open_session_store(session_file, session_key), LocalBus()
    return MemoryStore(), LocalBus()


async def connect_redis(url: str, key: bytes) -> tuple[RedisStore, RedisBus]:
    """The store and bus of one broker process on the Redis at ``url``, sealing with ``key`` (32 bytes).

    Does not fail when Redis is down at start: /readyz reports it, and both
    come up by themselves once Redis answers.
    """
    client = redis_client(url)
    sealer = Sealer(key)
    bus = RedisBus(client, sealer)
    # /readyz asks the store: after an outage, report ready only once this process
    # receives other processes' messages again, not merely when Redis answers.
    store = RedisStore(client, sealer, also_ready=bus.connected.is_set)
    store.read_through(bus)
    bus.start()
    try:
        await asyncio.wait_for(client.ping(), TIMEOUT_S)
    except Exception:
        log.warning("event=redis_unreachable_at_start")
    return store, bus
