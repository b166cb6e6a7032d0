"""Each admitted participant of a Janus session gets credentials for its room only (issue 22, point 1),
over its own WebSocket, from a real broker (tests/conftest.py) and a real Janus (tests/janus_server.py).

The credentials are tried the way a browser would use them (tests/janus/janus_peer.py: a Janus session
opened with the token alone, then a VideoRoom ``join`` with the PIN and token): they open the room while
the seat is admitted, and nothing once it is put on hold, removed, leaves or the session ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from broker.client.broker_client import BrokerClient
from broker.janus.client import JanusClient, JanusSettings
from broker.janus.rooms import JanusRooms
from broker.janus.scheduling import MediaPlanner
from broker.signaling.protocol import Error, ErrorCode, MediaJanus, Peers, SeatState, Status, WaitingRoom
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, SessionLinks, schedule, start_broker_pair
from tests.janus.broker_fixture import MESH, with_janus  # noqa: F401 - the fixture
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture
from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401 - the fixture

from .janus_peer import JanusApiError, join_room

#: How long a revocation may take to reach Janus (one spawned step and a few Janus requests), with a margin.
REVOKED_WITHIN_S = 10.0


def position(peer: BrokerClient, message: object) -> int:
    """Where ``message`` (this very object: a resent grant equals the first) is in what the peer received."""
    return next(i for i, m in enumerate(peer.received) if m is message)


async def credentials(peer: BrokerClient, after: int = 0, timeout: float = 10.0) -> MediaJanus:
    """The first ``media_janus`` the peer received after its ``after``-th message."""
    got = await peer.expect(MediaJanus, where=lambda m: position(peer, m) >= after, timeout=timeout)
    assert peer.janus is got  # the client keeps the latest credentials
    return got


async def opens_the_room(granted: MediaJanus) -> bool:
    """A join with the credentials succeeds (False: Janus refuses the token, or the room's door)."""
    try:
        answer = await join_room(granted.url, granted.token, granted.room, granted.pin)
    except JanusApiError:
        return False
    return answer.get("videoroom") == "joined" and answer.get("room") == granted.room


async def shut_out(granted: MediaJanus) -> None:
    """Wait until Janus refuses the credentials (the revocation is done after the change is shown)."""
    deadline = time.monotonic() + REVOKED_WITHIN_S
    while await opens_the_room(granted):
        assert time.monotonic() < deadline, "the revoked token still opens the room"
        await asyncio.sleep(0.1)


async def group(running: RunningBroker) -> tuple[SessionLinks, BrokerClient]:
    """A session above the mesh size (five seats), its therapist connected and holding its credentials."""
    links = await schedule(running, clients=4)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    return links, therapist


async def admit(therapist: BrokerClient, links: SessionLinks, index: int) -> tuple[BrokerClient, MediaJanus]:
    client = await waiting_client(links, links.clients[index])
    mark = len(client.received)
    await therapist.admit(client.peer_id)
    await client.expect(Status, where=lambda m: m.seat_state is SeatState.ADMITTED)
    return client, await credentials(client, mark)


async def test_admitted_participants_get_credentials_that_open_their_room_and_waiting_ones_get_none(
    with_janus: RunningBroker,
) -> None:
    links, therapist = await group(with_janus)
    client = await waiting_client(links)
    try:
        mine = await credentials(therapist)  # the therapist's seat is admitted once connected
        assert with_janus.hub.media.rooms is not None
        assert mine.room == with_janus.hub.media.rooms.keys(links.session).room
        assert mine.url == with_janus.config.janus_url  # broker and Janus on loopback: the same address
        assert mine.join_by > time.time()
        assert await opens_the_room(mine)
        await asyncio.sleep(0.5)  # the waiting room's changes were settled meanwhile: nothing for the client
        assert client.janus is None and not any(isinstance(m, MediaJanus) for m in client.received)
        mark = len(client.received)
        await therapist.admit(client.peer_id)
        theirs = await credentials(client, mark)
        assert theirs.token != mine.token and theirs.pin == mine.pin and theirs.room == mine.room
        assert await opens_the_room(theirs)
        assert not any(isinstance(m, MediaJanus) for m in therapist.received[1:] if m is not mine)
    finally:
        await client.close()
        await therapist.end()
        await therapist.close()


async def test_hold_remove_and_leave_revoke_and_release_grants_anew(with_janus: RunningBroker) -> None:
    links, therapist = await group(with_janus)
    held, held_granted = await admit(therapist, links, 0)
    removed, removed_granted = await admit(therapist, links, 1)
    leaving, leaving_granted = await admit(therapist, links, 2)
    try:
        mark = len(held.received)
        await therapist.hold(held.peer_id)
        await shut_out(held_granted)
        await therapist.release(held.peer_id)
        again = await credentials(held, mark)  # off hold: another token, which opens the room
        assert again.token != held_granted.token
        assert await opens_the_room(again)
        assert not await opens_the_room(held_granted)

        await therapist.remove(removed.peer_id)
        await shut_out(removed_granted)

        await leaving.leave()
        await shut_out(leaving_granted)
        assert await opens_the_room(again)  # the others' credentials still work
    finally:
        for peer in (held, removed, leaving):
            await peer.close()
        await therapist.end()
        await therapist.close()


async def test_a_reconnecting_seat_gets_its_credentials_again_and_the_session_end_revokes_them(
    with_janus: RunningBroker,
) -> None:
    links, therapist = await group(with_janus)
    client, granted = await admit(therapist, links, 0)
    try:
        mark = len(client.received)
        assert client._ws is not None
        await client._ws.close()  # the connection drops; the client resumes its seat
        await client.expect(Peers, where=lambda m: position(client, m) >= mark, timeout=15)
        resent = await credentials(client, mark)
        assert resent.token == granted.token  # the same grant: its door opened again
        therapist_granted = therapist.janus
        assert therapist_granted is not None
        await therapist.end()
        for revoked in (granted, therapist_granted):
            await shut_out(revoked)
            with pytest.raises(JanusApiError):  # the room is gone, and the tokens open no Janus session
                await join_room(revoked.url, revoked.token, revoked.room, revoked.pin)
    finally:
        await client.close()
        await therapist.close()


async def test_a_mesh_session_never_gets_janus_credentials(with_janus: RunningBroker) -> None:
    links = await schedule(with_janus, clients=1)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    client = await waiting_client(links)
    try:
        await therapist.admit(client.peer_id)
        await client.wait_connected(therapist.peer_id)
        await asyncio.sleep(0.5)
        for peer in (therapist, client):
            assert peer.janus is None and not any(isinstance(m, MediaJanus) for m in peer.received)
    finally:
        await client.close()
        await therapist.end()
        await therapist.close()


async def test_janus_down_at_admission_is_a_clear_error_and_the_admission_stands(with_janus: RunningBroker) -> None:
    links, therapist = await group(with_janus)
    client = await waiting_client(links)
    working = with_janus.hub.media
    nowhere = JanusSettings(url=f"http://127.0.0.1:{free_port()}/janus", api_secret="s", timeout_s=2)
    with_janus.hub.media = MediaPlanner(4, JanusRooms(JanusClient(nowhere), b"k" * 32), working.public_url)
    try:
        mark = len(client.received)
        await therapist.admit(client.peer_id)
        error = await client.expect(Error, where=lambda m: m.code is ErrorCode.JANUS_UNAVAILABLE, timeout=15)
        assert "Janus" in error.message and error.ref is None
        assert client.final is None  # not a reason to give the seat up
        assert not any(isinstance(m, MediaJanus) for m in client.received[mark:])
        record = await with_janus.hub.get_session(links.session)
        assert record is not None and record.seat(client.peer_id).state is SeatState.ADMITTED
        await client.wait_connected(therapist.peer_id)  # the call goes on
        with_janus.hub.media = working  # Janus is back: the next change of the session, any, grants it
        mark = len(client.received)
        another = await waiting_client(links, links.clients[1])  # someone else arrives in the waiting room
        assert await opens_the_room(await credentials(client, mark))
        await another.close()
    finally:
        with_janus.hub.media = working
        await client.close()
        await therapist.end()
        await therapist.close()


@pytest.mark.redis
async def test_a_token_granted_by_one_process_is_revoked_by_another(
    tmp_path: Path,
    janus_server: JanusServer,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
) -> None:
    janus_server.ensure_running()
    a, b = await start_broker_pair(tmp_path, redis_server.empty_database(), **janus_server.settings(), **MESH)
    try:
        links = await schedule(a, clients=4)
        therapist = BrokerClient(links.therapist)  # on process A, which handles the admission
        await therapist.connect()
        client = await waiting_client(links, links.clients[0].replace(a.url, b.url))  # on process B
        try:
            mark = len(client.received)
            await therapist.admit(client.peer_id)
            granted = await credentials(client, mark)
            assert await opens_the_room(granted)
            await client.leave()  # handled by process B
            await shut_out(granted)
        finally:
            await client.close()
            await therapist.end()
            await therapist.close()
    finally:
        await a.stop()
        await b.stop()


async def test_no_token_or_pin_in_the_logs(with_janus: RunningBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    links, therapist = await group(with_janus)
    client, granted = await admit(therapist, links, 0)
    try:
        await therapist.remove(client.peer_id)
        await shut_out(granted)
    finally:
        await client.close()
        await therapist.end()
        await therapist.close()
    assert "event=janus_credentials_sent" in caplog.text and "event=janus_credentials_revoked" in caplog.text
    text = caplog.text + repr(granted) + repr(client.received)
    for secret in (granted.token, granted.pin):
        assert secret not in text


async def test_a_session_cancelled_while_nobody_is_connected_revokes_every_token(with_janus: RunningBroker) -> None:
    links, therapist = await group(with_janus)
    client, granted = await admit(therapist, links, 0)
    therapist_granted = await credentials(therapist)
    await client.close()  # both connections go; their seats stay admitted, their tokens granted
    await therapist.close()
    assert await opens_the_room(granted)
    await with_janus.hub.cancel_session(links.session)
    for revoked in (granted, therapist_granted):
        await shut_out(revoked)  # revoked as the session ended: not even a Janus session opens
        with pytest.raises(JanusApiError):
            await join_room(revoked.url, revoked.token, revoked.room, revoked.pin)


async def test_a_revoked_link_and_a_seat_moved_to_another_device_revoke_the_token(with_janus: RunningBroker) -> None:
    links, therapist = await group(with_janus)
    revoked, revoked_granted = await admit(therapist, links, 0)
    moved, moved_granted = await admit(therapist, links, 1)
    newcomer = await waiting_client(links, links.clients[1])  # the same link opened on another device
    try:
        await with_janus.hub.revoke_seat(links.session, revoked.peer_id)
        await shut_out(revoked_granted)

        assert newcomer.joined is not None and newcomer.joined.other_device
        room = await therapist.expect(
            WaitingRoom,
            where=lambda m: any(
                s.peer == moved.peer_id and s.other_device is not None and s.other_device.state is SeatState.WAITING
                for s in m.seats
            ),
        )
        other = next(s.other_device for s in room.seats if s.peer == moved.peer_id)
        assert other is not None
        mark = len(newcomer.received)
        await therapist.admit(moved.peer_id, device=other.device)
        on_the_new_device = await credentials(newcomer, mark)  # the seat's new holder gets a token of its own
        assert on_the_new_device.token != moved_granted.token
        await shut_out(moved_granted)  # the old device's no longer opens anything
        assert await opens_the_room(on_the_new_device)
    finally:
        for peer in (revoked, moved, newcomer):
            await peer.close()
        await therapist.end()
        await therapist.close()
