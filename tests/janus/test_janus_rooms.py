"""The broker's Janus client against a real Janus (tests/janus_server.py): rooms and credentials."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from broker.janus.client import JanusClient, JanusSettings, JanusUnavailable
from broker.janus.rooms import JanusRooms
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture
from tests.redis_server import free_port

from .janus_peer import JanusApiError, join_room

UNAUTHORIZED = 433  # the VideoRoom's answer to a wrong PIN or a token not on the room's list
JANUS_UNAUTHORIZED = 403  # the Janus API's answer to a request without a valid token or secret


def settings_of(server: JanusServer) -> JanusSettings:
    s = server.settings()
    return JanusSettings(
        url=s["janus_url"],
        api_secret=s["janus_api_secret"],
        admin_url=s["janus_admin_url"],
        admin_secret=s["janus_admin_secret"],
        room_admin_key=s["janus_room_admin_key"],
    )


@pytest.fixture
async def rooms(janus_server: JanusServer) -> AsyncIterator[JanusRooms]:  # noqa: F811
    janus_server.ensure_running()
    made = JanusRooms(JanusClient(settings_of(janus_server)), b"test room key".ljust(32, b"."))
    yield made
    await made.aclose()


def listed(all_rooms: list[dict[str, object]], number: int) -> dict[str, object] | None:
    return next((r for r in all_rooms if r.get("room") == number), None)


async def test_a_session_room_is_private_e2ee_and_pin_protected_until_destroyed(rooms: JanusRooms) -> None:
    number = await rooms.create("session-a")
    room = listed(await rooms.rooms(), number)
    assert room is not None
    assert room["require_e2ee"] is True
    assert room["pin_required"] is True
    assert room["is_private"] is True
    assert room["max_publishers"] == 16
    assert await rooms.create("session-a") == number  # again after a restart: the same room, no error
    await rooms.destroy("session-a")
    assert listed(await rooms.rooms(), number) is None
    await rooms.destroy("session-a")  # already gone: fine


async def test_credentials_open_their_own_room_only(rooms: JanusRooms, janus_server: JanusServer) -> None:  # noqa: F811
    await rooms.create("session-b")
    other = await rooms.create("session-c")
    mine = await rooms.grant("session-b", "peer-1")
    try:
        joined = await join_room(janus_server.url, mine.token, mine.room, mine.pin)
        assert joined.get("videoroom") == "joined", joined
        assert joined.get("room") == mine.room
        wrong_pin = await join_room(janus_server.url, mine.token, mine.room, "0" * 32)
        assert wrong_pin.get("error_code") == UNAUTHORIZED
        other_pin = rooms.keys("session-c").pin  # even with the other room's PIN, the token is not on its list
        elsewhere = await join_room(janus_server.url, mine.token, other, other_pin)
        assert elsewhere.get("error_code") == UNAUTHORIZED
    finally:
        await rooms.revoke("session-b", mine.token, peer_id="peer-1")
    with pytest.raises(JanusApiError) as refused:  # revoked: not even a Janus session
        await join_room(janus_server.url, mine.token, mine.room, mine.pin)
    assert refused.value.code == JANUS_UNAUTHORIZED
    await rooms.destroy("session-b")
    await rooms.destroy("session-c")


async def test_a_token_stops_opening_the_room_after_its_join_window(
    rooms: JanusRooms,
    janus_server: JanusServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("broker.janus.rooms.JOIN_WINDOW_S", 0.3)
    granted = await rooms.grant("session-d", "peer-2")
    try:
        await rooms.doors_closed()  # the door closes by itself
        late = await join_room(janus_server.url, granted.token, granted.room, granted.pin)
        assert late.get("error_code") == UNAUTHORIZED
    finally:
        await rooms.revoke("session-d", granted.token, peer_id="peer-2")
        await rooms.destroy("session-d")


async def test_granting_a_token_again_gives_it_a_full_join_window(
    rooms: JanusRooms,
    janus_server: JanusServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A seat that joins the broker again is sent the same token (broker/signaling/media_grants.py): its
    door must stay open a whole window from then, not close when the first grant's window ends."""
    monkeypatch.setattr("broker.janus.rooms.JOIN_WINDOW_S", 3.0)
    token = rooms.seat_token("session-h", "peer-4", "device-1", 0)
    await rooms.grant("session-h", "peer-4", token=token)
    await asyncio.sleep(1.8)
    again = await rooms.grant("session-h", "peer-4", token=token)
    await asyncio.sleep(1.8)  # past the first window, within the second
    try:
        joined = await join_room(janus_server.url, again.token, again.room, again.pin)
        assert joined.get("videoroom") == "joined", joined
        await rooms.doors_closed()
        late = await join_room(janus_server.url, again.token, again.room, again.pin)
        assert late.get("error_code") == UNAUTHORIZED
    finally:
        await rooms.revoke("session-h", token, peer_id="peer-4")
        await rooms.destroy("session-h")


async def test_the_sweep_destroys_rooms_of_sessions_that_are_over(rooms: JanusRooms) -> None:
    live = await rooms.create("session-live")
    over = await rooms.create("session-over")

    async def is_live(session_id: str) -> bool:
        return session_id == "session-live"

    assert await rooms.sweep(is_live) == ["session-over"]
    numbers = [r.get("room") for r in await rooms.rooms()]
    assert live in numbers and over not in numbers
    await rooms.destroy("session-live")


async def test_janus_down_is_a_clear_error(janus_server: JanusServer) -> None:  # noqa: F811
    nowhere = JanusSettings(url=f"http://127.0.0.1:{free_port()}/janus", timeout_s=2)
    down = JanusRooms(JanusClient(nowhere), b"k" * 32)
    with pytest.raises(JanusUnavailable) as refused:
        await down.create("session-e")
    assert refused.value.code == "janus_unavailable"
    await down.aclose()


async def test_a_wrong_api_secret_is_refused_and_creates_nothing(
    rooms: JanusRooms,
    janus_server: JanusServer,  # noqa: F811
) -> None:
    wrong = JanusSettings(url=janus_server.url, api_secret="not-the-secret", room_admin_key="x")
    intruder = JanusRooms(JanusClient(wrong), b"k" * 32)
    with pytest.raises(JanusUnavailable):
        await intruder.create("session-f")
    await intruder.aclose()
    assert listed(await rooms.rooms(), rooms.keys("session-f").room) is None


async def test_no_room_secret_pin_or_token_in_the_logs(
    rooms: JanusRooms,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await rooms.create("session-g")
    granted = await rooms.grant("session-g", "peer-3")
    await rooms.revoke("session-g", granted.token, peer_id="peer-3")
    await rooms.destroy("session-g")
    keys = rooms.keys("session-g")
    settings = rooms.client.settings
    text = caplog.text + repr(granted) + repr(keys) + repr(settings)
    assert "event=janus_room_created" in caplog.text
    for secret in (keys.secret, keys.pin, granted.token, settings.api_secret, settings.admin_secret):
        assert secret not in text
