"""Revoking a participant's Janus credentials also puts it out of the room (issue 22): a participant
already in the room when it is removed or put on hold stops publishing there and stops receiving the
others' frames, rather than staying until its Janus session ends.

A real broker (tests/conftest.py) and a real Janus (tests/janus_server.py). Participants stay in the
room as a call page does (tests/janus/janus_peer.py ``RoomMember``: a Janus session opened with the
token, a publisher joined with its peer id as display, a subscriber handle). What they subscribe to
is a VideoRoom remote publisher (``add_remote_publisher``), standing in for another participant's
published media: Janus lets a subscriber join only a feed that is publishing.

Tests that make up a session id use rooms of their own (the ``rooms`` fixture, another room key): a
broker's sweep destroys the rooms of sessions it does not know, and it runs when the broker starts.
"""

from __future__ import annotations

import asyncio
import time

from broker.janus.client import NO_SUCH_HANDLE, NO_SUCH_SESSION, ApiError, JanusUnavailable
from broker.janus.rooms import JanusRooms
from tests.conftest import RunningBroker
from tests.janus.broker_fixture import with_janus  # noqa: F401 - the fixture
from tests.janus.test_janus_grants import REVOKED_WITHIN_S, admit, group
from tests.janus.test_janus_rooms import rooms  # noqa: F401 - the fixture
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture

from .janus_peer import JanusApiError, RoomMember


async def displays(rooms: JanusRooms, session_id: str) -> list[str]:
    """Who the room's participant list shows (VideoRoom ``listparticipants``)."""
    async with rooms.client.videoroom() as handle:
        data = await handle.request({"request": "listparticipants", "room": rooms.keys(session_id).room})
    return [str(p.get("display")) for p in data["participants"]]


async def somebody_publishing(rooms: JanusRooms, session_id: str) -> int:
    """A feed to subscribe to: a remote publisher in the session's room (its id)."""
    keys = rooms.keys(session_id)
    body = {
        "request": "add_remote_publisher",
        "room": keys.room,
        "secret": keys.secret,
        "display": "someone-else",
        "streams": [{"type": "audio", "mid": "0", "mindex": 0, "codec": "opus"}],
    }
    async with rooms.client.videoroom() as handle:
        return int((await handle.request(body))["id"])


async def alive(rooms: JanusRooms, member: RoomMember) -> bool:
    """Whether Janus still has the member's session and every handle in it (asked with the API secret)."""
    try:
        for handle in member.handles:
            await rooms.client.api(f"/{member.session}/{handle}", {"janus": "keepalive"})
    except ApiError as exc:
        assert exc.error_code in (NO_SUCH_SESSION, NO_SUCH_HANDLE), exc.error_code
        return False
    return True


async def put_out(rooms: JanusRooms, session_id: str, member: RoomMember, peer_id: str) -> None:
    """Wait until the member is off the room's list and its Janus session, subscriptions included, is gone."""
    deadline = time.monotonic() + REVOKED_WITHIN_S
    while peer_id in await displays(rooms, session_id) or await alive(rooms, member):
        assert time.monotonic() < deadline, "the revoked participant is still in the room"
        await asyncio.sleep(0.1)


async def test_a_removed_or_held_participant_is_put_out_of_the_room_subscriptions_and_all(
    with_janus: RunningBroker,  # noqa: F811
) -> None:
    links, therapist = await group(with_janus)
    rooms = with_janus.hub.media.rooms
    assert rooms is not None
    seated = [await admit(therapist, links, i) for i in range(3)]
    (removed, _), (held, _), (staying, _) = seated
    feed = await somebody_publishing(rooms, links.session)
    members: list[RoomMember] = []
    try:
        for client, granted in seated:
            member = await RoomMember.join(granted.url, granted.token, granted.room, granted.pin, client.peer_id)
            members.append(member)
            assert (await member.subscribe(feed)).get("videoroom") == "attached"
        assert {c.peer_id for c, _ in seated} <= set(await displays(rooms, links.session))

        await therapist.remove(removed.peer_id)
        await therapist.hold(held.peer_id)
        for member, peer in zip(members[:2], (removed, held), strict=True):
            await put_out(rooms, links.session, member, peer.peer_id)
            try:  # nothing more in the room: neither a new subscription nor joining again to publish
                refused = await member.subscribe(feed)
            except JanusApiError:
                pass
            else:
                raise AssertionError(f"a put-out participant subscribed: {refused.get('videoroom')}")

        assert staying.peer_id in await displays(rooms, links.session)  # the others stay
        assert await alive(rooms, members[2])
        assert (await members[2].subscribe(feed)).get("videoroom") == "attached"
    finally:
        for member in members:
            await member.close()
        for client, _ in seated:
            await client.close()
        await therapist.end()
        await therapist.close()


async def test_revoking_in_a_room_already_gone_still_ends_the_participants_janus_session(
    rooms: JanusRooms,
    janus_server: JanusServer,  # noqa: F811
) -> None:
    granted = await rooms.grant("session-gone", "peer-gone")
    member = await RoomMember.join(
        janus_server.settings()["janus_url"], granted.token, granted.room, granted.pin, "peer-gone"
    )
    try:
        await rooms.destroy("session-gone")
        await rooms.revoke("session-gone", granted.token, peer_id="peer-gone")  # no room, nobody to kick: fine
        assert not await alive(rooms, member)
    except JanusUnavailable as exc:
        raise AssertionError(f"revoking in a room already gone raised {exc}") from None
    finally:
        await member.close()


async def test_revoking_a_seats_old_token_leaves_its_next_holder_in_the_room(
    rooms: JanusRooms,
    janus_server: JanusServer,  # noqa: F811
) -> None:
    """A hold released at once: the seat's new credentials are in use (same peer id as display) when the
    revocation of the old ones reaches Janus. Only the old token's Janus session goes; nobody is kicked
    by display, so the seat's holder stays in the room."""
    old = await rooms.grant("session-next", "peer-next")
    new = await rooms.grant("session-next", "peer-next")
    url = janus_server.settings()["janus_url"]
    before = await RoomMember.join(url, old.token, old.room, old.pin, "peer-next")
    after = await RoomMember.join(url, new.token, new.room, new.pin, "peer-next")
    try:
        await rooms.revoke("session-next", old.token, peer_id="peer-next")
        assert not await alive(rooms, before)
        assert await alive(rooms, after)
        assert await displays(rooms, "session-next") == ["peer-next"]  # the next holder, still publishing
    finally:
        await before.close()
        await after.close()
        await rooms.destroy("session-next")
