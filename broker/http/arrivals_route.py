"""``GET /api/arrivals``: the logged-in therapist's dashboard hears at once when a client waits.

A stream of server-sent events (``text/event-stream``), one ``data:`` line of JSON
``{"session": id, "waiting": n}`` per event: first one per open session of the therapist, then
one whenever a session's waiting room changes (broker.signaling.arrivals publishes them on the
owner's bus channel, from whichever broker process saw the change). Opaque ids and counts only.

The page reads it with ``fetch`` and ``X-Broker-Background: 1``, so holding it open does not
keep the login alive; the stream checks the login before every event and every
``KEEPALIVE_S``, and ends when it has ended (logout, idle time, an account change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.http.login_sessions import LOGIN_COOKIE, auth_of
from broker.signaling.arrivals import arrivals_channel, encode_count
from broker.signaling.hub import Hub
from broker.signaling.protocol import SessionState
from broker.store.bus import Envelope

log = logging.getLogger("broker.dashboard")

#: A comment line this often keeps proxies from closing a quiet stream; the login is checked then too.
KEEPALIVE_S = 15.0
#: How often a quiet stream looks whether its reader went away.
GONE_CHECK_S = 1.0
#: Events queued for a reader that does not keep up; more are dropped (the next one says it all).
MAX_QUEUED = 64


#: A handler with this attribute answers a success as that media type (broker.contract.http_routes).
MEDIA_TYPE_ATTRIBUTE = "media_type"
EVENT_STREAM = "text/event-stream"


def event_stream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
    """Marks a route whose success is a stream of server-sent events, for the API contract."""
    setattr(handler, MEDIA_TYPE_ATTRIBUTE, EVENT_STREAM)
    return handler


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


async def stream_arrivals(request: web.Request, hub: Hub, therapist: str, owned: list[str]) -> web.StreamResponse:
    """Stream the waiting counts of ``therapist``'s sessions (``owned``: their ids now), for a
    request whose login was checked."""
    auth = auth_of(request)
    cookie = request.cookies.get(LOGIN_COOKIE)
    queue: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED)

    def heard(envelope: Envelope) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(envelope.data)

    channel = arrivals_channel(therapist)
    await hub.bus.subscribe(channel, heard)  # before the snapshot, so nothing falls between the two
    try:
        response = web.StreamResponse(
            headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        for session_id in owned:
            session = await hub.get_session(session_id)
            if session is not None and session.state is not SessionState.ENDED:
                await response.write(_event(encode_count(session)))
        log.info("event=arrivals_stream_opened")
        quiet_since = time.monotonic()
        while True:
            try:
                data: bytes | None = await asyncio.wait_for(queue.get(), GONE_CHECK_S)
            except TimeoutError:
                data = None
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the page went away: stop holding the subscription
            if data is None and time.monotonic() - quiet_since < KEEPALIVE_S:
                continue
            if await auth.load(cookie, touch=False) is None:
                break
            await response.write(_event(data) if data is not None else b": keepalive\n\n")
            quiet_since = time.monotonic()
    finally:
        await hub.bus.unsubscribe(channel, heard)
    log.info("event=arrivals_stream_closed")
    return response
