"""Mesh or Janus: decided once, when a session is scheduled, from its number of participants.

Up to ``mesh_max`` participants (therapist included) the browsers talk peer to peer; above it,
up to ``sm.MAX_SEATS``, the session uses a Janus room. A broker without Janus configured refuses
such a session (``janus_required``) rather than schedule a call that could not hold its people.
The session records the choice (``Session.media``), so a call never switches mid-way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from broker.config import Config, Keys
from broker.janus.client import JanusClient, JanusSettings, JanusUnavailable
from broker.janus.rooms import JanusRooms
from broker.signaling.session_state import Session, SessionMedia
from broker.signaling.wire_types import SessionState
from broker.store.base import StoreUnavailable

log = logging.getLogger("broker.janus")

Media = SessionMedia
#: How often a broker process looks for rooms of sessions that are over (missed at their end).
SWEEP_EVERY_S = 300.0

#: The stable error code of a session too large for a broker without Janus (docs/protocol.md).
JANUS_REQUIRED = "janus_required"
#: What people are told when Janus does not answer at scheduling (nothing is saved).
JANUS_UNAVAILABLE_MESSAGE = (
    "The practice's media server (Janus) is not answering, so this group session could not be prepared; "
    "nothing was saved. Try again in a moment, or ask your practice admin."
)
#: Every session fits a mesh when nothing says otherwise (a Hub built without configuration).
UNLIMITED_MESH = 16


class JanusRequired(ValueError):
    """The session has more participants than the mesh holds and this broker has no Janus."""

    code = JANUS_REQUIRED

    def __init__(self, mesh_max: int) -> None:
        super().__init__(
            f"Sessions with more than {mesh_max} participants need the practice's media server (Janus), "
            "which this broker does not have (BROKER_JANUS_URL). Schedule fewer seats, or ask your practice admin."
        )


class MediaPlanner:
    """The scheduling rule and the rooms of the sessions that use Janus."""

    def __init__(self, mesh_max: int = UNLIMITED_MESH, rooms: JanusRooms | None = None, public_url: str = "") -> None:
        self.mesh_max = mesh_max
        self.rooms = rooms
        #: Janus's API as browsers reach it (``janus_public_url``), sent with each participant's credentials.
        self.public_url = public_url

    def media_for(self, clients: int) -> Media:
        """The media of a session with ``clients`` client seats (plus its therapist); JanusRequired."""
        if clients + 1 <= self.mesh_max or clients + 1 > UNLIMITED_MESH:
            return "mesh"  # beyond the largest session: ``new_session`` refuses the seat count itself
        if self.rooms is None:
            raise JanusRequired(self.mesh_max)
        return "janus"

    async def prepare(self, session_id: str, media: Media) -> None:
        """Create the room of a session that uses Janus; JanusUnavailable leaves nothing behind."""
        if media == "janus":
            assert self.rooms is not None
            await self.rooms.create(session_id)

    async def release(self, session_id: str, media: Media) -> None:
        """The session is over: its room goes (a failure is logged; the sweep destroys it later)."""
        if media != "janus" or self.rooms is None:
            return
        try:
            await self.rooms.destroy(session_id)
        except JanusUnavailable:
            log.warning("event=janus_room_not_destroyed session=%s", session_id)

    async def aclose(self) -> None:
        if self.rooms is not None:
            await self.rooms.aclose()


def janus_settings(config: Config) -> JanusSettings | None:
    """Janus as configured, or None when the practice has none."""
    if not config.janus_url:
        return None
    return JanusSettings(
        url=config.janus_url,
        api_secret=config.janus_api_secret,
        admin_url=config.janus_admin_url,
        admin_secret=config.janus_admin_secret,
        room_admin_key=config.janus_room_admin_key,
        timeout_s=config.janus_timeout_s,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def janus_public_url(config: Config) -> str | None:
    """Janus's API as browsers reach it; None when Janus is configured but browsers could not reach it."""
    if not config.janus_url:
        return None
    if config.janus_public_url:
        return config.janus_public_url
    janus_host = urlsplit(config.janus_url).hostname or ""
    return config.janus_url if _is_loopback(janus_host) and _is_loopback(config.host) else None


def janus_connect_source(config: Config) -> str | None:
    """Janus's origin as the pages' CSP must allow it (``connect-src``), when it is not the broker's own.

    A practice that serves Janus's API through its proxy on the broker's origin (a path such as
    ``/janus``) needs none: ``'self'`` covers it, and the CSP stays the signed web manifest's.
    """
    url = janus_public_url(config)
    if url is None:
        return None
    parts, own = urlsplit(url), urlsplit(config.base_url)
    if not parts.scheme or not parts.netloc or (parts.scheme, parts.netloc) == (own.scheme, own.netloc):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def media_planner(config: Config, keys: Keys) -> MediaPlanner:
    settings = janus_settings(config)
    rooms = JanusRooms(JanusClient(settings), keys.janus_rooms) if settings is not None else None
    return MediaPlanner(config.mesh_max_participants, rooms, public_url=janus_public_url(config) or "")


async def sweep_forever(planner: MediaPlanner, get_session: Callable[[str], Awaitable[Session | None]]) -> None:
    """Destroy, now and then, the rooms of sessions that ended without theirs going (Janus was down)."""

    async def is_live(session_id: str) -> bool:
        try:
            session = await get_session(session_id)
        except StoreUnavailable:
            return True  # not known to be over: keep its room
        return session is not None and session.state is not SessionState.ENDED

    while planner.rooms is not None:
        try:
            await planner.rooms.sweep(is_live)
        except JanusUnavailable:
            log.info("event=janus_sweep_unavailable")
        await asyncio.sleep(SWEEP_EVERY_S)
