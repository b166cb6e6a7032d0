"""One Janus VideoRoom room per session that uses Janus, and credentials for that room only.

A room's number, secret and PIN are derived from the session id with a key of the broker's own
(HMAC-SHA256 under a purpose-bound key from the server secret): unpredictable to anyone without
that key, the same in every broker process, and stored nowhere, so a Redis dump holds none of them
and any process can destroy a room another one created. Rooms are created with ``require_e2ee``
(Janus forwards frames it is told not to inspect), ``is_private`` and an access list: a participant
joins with the room's PIN plus a token of its own, which the broker puts on the room's list when
the participant is admitted and takes off when it leaves (putting it out of the room too), and which
Janus's stored-token auth also accepts for the Janus API itself, limited to the VideoRoom plugin
(docs/security.md, "Janus").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from broker.janus.client import (
    NO_SUCH_FEED,
    NO_SUCH_ROOM,
    ROOM_EXISTS,
    VIDEOROOM,
    JanusClient,
    JanusUnavailable,
    PluginError,
)

log = logging.getLogger("broker.janus")

#: The most participants one room forwards for (the product's largest session).
MAX_PUBLISHERS = 16
#: Marks the rooms this broker made, so a sweep never touches anyone else's.
DESCRIPTION_PREFIX = "broker-session:"
#: How long a participant's token opens the room's door: Janus checks it only when joining.
JOIN_WINDOW_S = 120.0


@dataclass(frozen=True)
class RoomKeys:
    """A session's room: its number and the two secrets Janus asks for."""

    room: int
    secret: str = field(repr=False)
    pin: str = field(repr=False)


@dataclass(frozen=True)
class Credentials:
    """What one admitted participant needs to join its session's room, and nothing more."""

    room: int
    pin: str = field(repr=False)
    token: str = field(repr=False)
    #: Unix seconds after which the token no longer opens the room (it stays valid for the Janus
    #: API until the participant leaves: its Janus session keeps using it).
    join_by: int

    def wire(self) -> dict[str, Any]:
        return {"room": self.room, "pin": self.pin, "token": self.token, "join_by": self.join_by}


def room_keys(key: bytes, session_id: str) -> RoomKeys:
    """The room of ``session_id``: derived, never stored (see the module's docstring)."""

    def part(label: str) -> bytes:
        return hmac.new(key, f"{label}\x00{session_id}".encode(), hashlib.sha256).digest()

    # 52 bits: a room number JavaScript holds exactly; 0 is not a room.
    number = int.from_bytes(part("room")[:8], "big") >> 12 or 1
    return RoomKeys(room=number, secret=part("secret").hex(), pin=part("pin").hex()[:32])


def seat_token(key: bytes, session_id: str, peer_id: str, holder: str, generation: int) -> str:
    """A seat's token for one grant: derived like the room's keys, so any broker process can revoke
    what another granted, knowing only the seat's generation (broker/signaling/media_grants.py)."""
    label = f"token\x00{session_id}\x00{peer_id}\x00{holder}\x00{generation}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, label, hashlib.sha256).digest()).rstrip(b"=").decode()


class JanusRooms:
    """The room lifecycle: create, ensure, grant, revoke, destroy, sweep."""

    def __init__(self, client: JanusClient, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self._key = key
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        #: Each token's pending door closing here: a second grant of the same token (the seat joined
        #: again) gives it a full window of its own rather than the rest of the first one.
        self._doors: dict[str, asyncio.Task[None]] = {}

    def keys(self, session_id: str) -> RoomKeys:
        return room_keys(self._key, session_id)

    def seat_token(self, session_id: str, peer_id: str, holder: str, generation: int) -> str:
        return seat_token(self._key, session_id, peer_id, holder, generation)

    async def create(self, session_id: str) -> int:
        """Create the session's room (or find it there already, after a restart); returns its number."""
        keys = self.keys(session_id)
        body = {
            "request": "create",
            "room": keys.room,
            "admin_key": self.client.settings.room_admin_key,
            "secret": keys.secret,
            "pin": keys.pin,
            "description": DESCRIPTION_PREFIX + session_id,
            "is_private": True,
            "publishers": MAX_PUBLISHERS,
            "require_e2ee": True,
            "allowed": [],
            "permanent": False,
        }
        async with self.client.videoroom() as handle:
            try:
                await handle.request(body)
            except PluginError as exc:
                if exc.error_code != ROOM_EXISTS:
                    raise
            else:
                log.info("event=janus_room_created session=%s", session_id)
        return keys.room

    async def destroy(self, session_id: str) -> None:
        """Destroy the session's room; a room already gone is fine."""
        keys = self.keys(session_id)
        async with self.client.videoroom() as handle:
            try:
                await handle.request({"request": "destroy", "room": keys.room, "secret": keys.secret})
            except PluginError as exc:
                if exc.error_code != NO_SUCH_ROOM:
                    raise
                return
        log.info("event=janus_room_destroyed session=%s", session_id)

    async def rooms(self) -> list[dict[str, Any]]:
        """Every room Janus has, private ones included (the VideoRoom ``list`` with the admin key)."""
        async with self.client.videoroom() as handle:
            data = await handle.request({"request": "list", "admin_key": self.client.settings.room_admin_key})
        listed = data.get("list")
        return [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []

    async def grant(self, session_id: str, peer_id: str, token: str | None = None) -> Credentials:
        """Credentials for one admitted participant: its room only, its token on the room's list.

        The room is created first if Janus lost it (a restart). The token is also registered with
        Janus's stored-token auth for the VideoRoom plugin when the admin API is configured, so a
        browser can open a Janus session without the API secret. ``token``: the seat's derived one
        (``seat_token``); granting it again (a reconnect) opens the room's door again; None: a random one.
        """
        keys = self.keys(session_id)
        await self.create(session_id)
        token = token or secrets.token_urlsafe(32)
        if self.client.settings.admin_url:
            await self._remember_token(token)
        try:
            await self._allowed(keys, "add", token)
        except JanusUnavailable:
            await self._forget_token(token)
            raise
        join_by = int(self.clock() + JOIN_WINDOW_S)
        earlier = self._doors.pop(token, None)
        if earlier is not None:
            earlier.cancel()
        self._doors[token] = self._later(JOIN_WINDOW_S, lambda: self._close_door(keys, token))
        log.info("event=janus_credentials_granted session=%s peer=%s", session_id, peer_id)
        return Credentials(room=keys.room, pin=keys.pin, token=token, join_by=join_by)

    async def revoke(self, session_id: str, token: str, *, peer_id: str) -> None:
        """The participant left or was removed: its token opens nothing any more, and it is put out of
        the room (``eject``). The room already gone is fine: nobody is left in it."""
        keys = self.keys(session_id)
        door = self._doors.pop(token, None)
        if door is not None:
            door.cancel()  # nothing left to close
        room_gone = False
        try:
            await self._allowed(keys, "remove", token)
        except PluginError as exc:
            if exc.error_code != NO_SUCH_ROOM:
                raise
            room_gone = True
        await self._forget_token(token)
        log.info("event=janus_credentials_revoked session=%s", session_id)
        await self.eject(session_id, token, peer_id, room_gone=room_gone)

    async def eject(self, session_id: str, token: str, peer_id: str, *, room_gone: bool = False) -> None:
        """Put a revoked participant out of the room: taking its token off the lists stops new joins only.

        The VideoRoom ``kick`` (with the room's secret) of the participants whose display is the seat's
        peer id (the call pages join so) ends its publisher: its media stops reaching the others. A kick
        leaves the participant's subscriber handles forwarding the others' frames, though (Janus 1.1 ends
        them only in rooms with ``require_pvtid``), so every Janus session opened with the revoked token
        is destroyed too, subscriber handles and all, when the admin API is configured (``handle_info``
        names the token each handle was attached with). Nobody to kick, or no such session, is fine.
        With the admin API, ending those sessions is all (their publisher leaves the room with them), and
        nobody is kicked by display: the seat's next holder, already back in with a new token (a hold
        released at once), shows the same peer id and must stay.
        """
        kicked = ended = 0
        if self.client.settings.admin_url:
            for janus_session in await self.client.sessions_opened_with(token):
                await self.client.end_session(janus_session)
                ended += 1
        elif not room_gone:
            kicked = await self._kick(self.keys(session_id), peer_id)
        if kicked or ended:
            log.info("event=janus_participant_ejected session=%s kicked=%d ended=%d", session_id, kicked, ended)

    async def sweep(self, is_live: Callable[[str], Awaitable[bool]]) -> list[str]:
        """Destroy this broker's rooms whose session is over (ended, expired or gone); returns their sessions."""
        stale: list[str] = []
        for room in await self.rooms():
            description = room.get("description")
            if not isinstance(description, str) or not description.startswith(DESCRIPTION_PREFIX):
                continue
            session_id = description.removeprefix(DESCRIPTION_PREFIX)
            if self.keys(session_id).room != room.get("room") or await is_live(session_id):
                continue
            await self.destroy(session_id)
            stale.append(session_id)
        if stale:
            log.info("event=janus_rooms_swept count=%d", len(stale))
        return stale

    async def doors_closed(self) -> None:
        """Wait until every join window opened so far has closed (tests; a clean stop)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.client.close()

    async def _allowed(self, keys: RoomKeys, action: str, token: str) -> None:
        async with self.client.videoroom() as handle:
            await handle.request(
                {"request": "allowed", "room": keys.room, "secret": keys.secret, "action": action, "allowed": [token]}
            )

    async def _kick(self, keys: RoomKeys, peer_id: str) -> int:
        """Kick the room's participants shown as ``peer_id``; how many were kicked."""
        async with self.client.videoroom() as handle:
            try:
                data = await handle.request({"request": "listparticipants", "room": keys.room})
            except PluginError as exc:
                if exc.error_code != NO_SUCH_ROOM:
                    raise
                return 0
            listed = data.get("participants")
            present = [p for p in listed if isinstance(p, dict)] if isinstance(listed, list) else []
            kicked = 0
            for participant in present:
                if participant.get("display") != peer_id or not isinstance(participant.get("id"), int):
                    continue
                kick = {"request": "kick", "room": keys.room, "secret": keys.secret, "id": participant["id"]}
                try:
                    await handle.request(kick)
                except PluginError as exc:
                    if exc.error_code not in (NO_SUCH_ROOM, NO_SUCH_FEED):  # it left, or the room went, meanwhile
                        raise
                    continue
                kicked += 1
            return kicked

    async def _remember_token(self, token: str) -> None:
        # Janus accepts a token it already holds (a second grant of the same seat's token) as a new one.
        await self.client.admin({"janus": "add_token", "token": token, "plugins": [VIDEOROOM]})

    async def _forget_token(self, token: str) -> None:
        if self.client.settings.admin_url:
            await self.client.admin({"janus": "remove_token", "token": token})

    async def _close_door(self, keys: RoomKeys, token: str) -> None:
        if self._doors.get(token) is asyncio.current_task():
            del self._doors[token]
        try:
            await self._allowed(keys, "remove", token)
        except JanusUnavailable:
            pass  # the room is gone, or Janus is: either way the token opens nothing

    def _later(self, delay_s: float, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        async def run() -> None:
            await asyncio.sleep(delay_s)
            await work()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
