"""Mesh or Janus, decided at scheduling (issue 22, point 2), with a real Janus (tests/janus_server.py).

Up to ``mesh_max_participants`` (default 4, therapist included) a session is peer to peer; above it the
broker makes the session's Janus room when it is scheduled and destroys it when the session ends. A broker
without Janus refuses such a session in the CLI, the JSON API and ``broker check-config``; a Janus that
does not answer gives ``janus_unavailable``; either way nothing is saved.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from broker.config import Config
from broker.config_check import check_config, unavailable_choices
from broker.http.admin_socket import AdminClient, AdminError, admin_app, start_admin_site
from broker.janus.client import JanusUnavailable
from broker.janus.scheduling import JanusRequired
from tests.conftest import RunningBroker, start_broker
from tests.http.test_dashboard import http, login  # noqa: F401 - fixtures
from tests.http.test_web_auth import PASSWORD, start_full_broker
from tests.janus.broker_fixture import MESH, with_janus  # noqa: F401 - the fixture
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture
from tests.redis_server import free_port

BROKER = [sys.executable, "-m", "broker"]


async def room_numbers(running: RunningBroker) -> set[int]:
    rooms = running.hub.media.rooms
    assert rooms is not None
    return {int(r["room"]) for r in await rooms.rooms() if isinstance(r.get("room"), int)}  # type: ignore[arg-type]


async def test_a_group_above_the_mesh_gets_a_room_that_goes_when_it_ends(with_janus: RunningBroker) -> None:
    hub = with_janus.hub
    small, _ = await hub.create_session(clients=3)  # four people: peer to peer, no room
    assert small.media == "mesh"
    big, _ = await hub.create_session(clients=4)
    assert big.media == "janus"
    assert (await hub.get_session(big.id)).media == "janus"  # type: ignore[union-attr] - recorded on the session
    assert hub.media.rooms is not None
    number = hub.media.rooms.keys(big.id).room
    assert number in await room_numbers(with_janus)
    assert hub.media.rooms.keys(small.id).room not in await room_numbers(with_janus)
    listed = next(r for r in await hub.media.rooms.rooms() if r.get("room") == number)
    assert listed["require_e2ee"] is True and listed["pin_required"] is True
    await hub.cancel_session(big.id)
    assert number not in await room_numbers(with_janus)
    await hub.cancel_session(small.id)


async def test_the_largest_group_fits_and_one_more_seat_does_not(with_janus: RunningBroker) -> None:
    session, _ = await with_janus.hub.create_session(clients=15)
    assert session.media == "janus"
    await with_janus.hub.cancel_session(session.id)
    with pytest.raises(ValueError, match="client seats"):
        await with_janus.hub.create_session(clients=16)


async def test_a_stale_room_is_swept(with_janus: RunningBroker) -> None:
    rooms = with_janus.hub.media.rooms
    assert rooms is not None
    number = await rooms.create("a-session-that-no-longer-exists")
    live, _ = await with_janus.hub.create_session(clients=5)

    async def is_live(session_id: str) -> bool:
        return await with_janus.hub.get_session(session_id) is not None

    swept = await rooms.sweep(is_live)
    # The broker's own sweeper (sweep_forever: a first pass as it starts) may have got there first on
    # a busy machine (seen in a CI rehearsal); either way it is the same sweep, and the room is gone.
    assert set(swept) <= {"a-session-that-no-longer-exists"}
    numbers = await room_numbers(with_janus)
    assert number not in numbers and rooms.keys(live.id).room in numbers
    await with_janus.hub.cancel_session(live.id)


async def test_janus_down_refuses_the_group_and_saves_nothing(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/janus"
    running = await start_broker(
        tmp_path / "data", **MESH, janus_url=nowhere, janus_api_secret="s", janus_room_admin_key="k", janus_timeout_s=2
    )
    try:
        before = set(await running.broker.store.keys(""))
        with pytest.raises(JanusUnavailable) as refused:
            await running.hub.create_session(clients=6)
        assert refused.value.code == "janus_unavailable"
        assert set(await running.broker.store.keys("")) == before
        small, _ = await running.hub.create_session(clients=1)  # the mesh does not need Janus
        assert small.media == "mesh"
    finally:
        await running.stop()


async def test_the_admin_socket_answers_janus_unavailable_and_saves_nothing(tmp_path: Path) -> None:
    running = await start_broker(
        tmp_path / "data",
        **MESH,
        janus_url=f"http://127.0.0.1:{free_port()}/janus",
        janus_api_secret="s",
        janus_room_admin_key="k",
        janus_timeout_s=2,
    )
    admin = web.AppRunner(admin_app(running.hub, running.broker.keys, running.url), access_log=None)
    await admin.setup()
    await start_admin_site(admin.app, admin, running.config)
    try:
        before = set(await running.broker.store.keys(""))
        with pytest.raises(AdminError) as refused:
            await AdminClient(running.config).create_session(clients=7)
        assert "Janus" in str(refused.value) and "nothing was saved" in str(refused.value)
        assert set(await running.broker.store.keys("")) == before
    finally:
        await admin.cleanup()
        await running.stop()


async def test_without_janus_a_group_above_the_mesh_is_refused(tmp_path: Path) -> None:
    running = await start_broker(tmp_path / "data", **MESH)
    try:
        before = set(await running.broker.store.keys(""))
        with pytest.raises(JanusRequired) as refused:
            await running.hub.create_session(clients=4)
        assert refused.value.code == "janus_required" and "4 participants" in str(refused.value)
        assert set(await running.broker.store.keys("")) == before
        assert (await running.hub.create_session(clients=3))[0].media == "mesh"
    finally:
        await running.stop()


async def test_the_json_api_refuses_without_janus_and_says_what_it_allows(
    tmp_path: Path,
    http: ClientSession,  # noqa: F811
) -> None:
    full = await start_full_broker(tmp_path / "data", **MESH)
    try:
        await full.auth.accounts.add("gale", PASSWORD)
        gale = await login(full, http, "gale")
        before = set(await full.broker.store.keys(""))
        status, answer = await gale.call("POST", "/api/sessions", {"clients": 5, "kind": "group"})
        assert status == 400 and answer["error"] == "janus_required", answer
        assert "Janus" in answer["message"]
        assert set(await full.broker.store.keys("")) - before == set()
        _, listed = await gale.call("GET", "/api/sessions")
        assert listed["mesh_max_participants"] == 4 and listed["janus_available"] is False
        status, created = await gale.call("POST", "/api/sessions", {"clients": 3, "kind": "group"})
        assert status == 200 and created["media"] == "mesh"
    finally:
        await full.stop()


async def test_the_json_api_schedules_through_janus_and_answers_janus_unavailable(
    tmp_path: Path,
    http: ClientSession,  # noqa: F811
    janus_server: JanusServer,  # noqa: F811
) -> None:
    janus_server.ensure_running()
    full = await start_full_broker(tmp_path / "data", **janus_server.settings(), **MESH)
    down = await start_full_broker(
        tmp_path / "down",
        **MESH,
        janus_url=f"http://127.0.0.1:{free_port()}/janus",
        janus_api_secret="s",
        janus_room_admin_key="k",
        janus_timeout_s=2,
    )
    try:
        await full.auth.accounts.add("hale", PASSWORD)
        hale = await login(full, http, "hale")
        status, created = await hale.call("POST", "/api/sessions", {"clients": 8, "kind": "group"})
        assert status == 200 and created["media"] == "janus", created
        _, listed = await hale.call("GET", "/api/sessions")
        assert [s["media"] for s in listed["sessions"]] == ["janus"] and listed["janus_available"] is True
        await down.auth.accounts.add("ivy", PASSWORD)
        ivy = await login(down, http, "ivy")
        before = set(await down.broker.store.keys(""))
        status, answer = await ivy.call("POST", "/api/sessions", {"clients": 8, "kind": "group"})
        assert status == 503 and answer["error"] == "janus_unavailable", answer
        assert set(await down.broker.store.keys("")) == before
    finally:
        await full.stop()
        await down.stop()


async def test_the_cli_refuses_a_group_above_the_mesh_without_janus(tmp_path: Path) -> None:
    running = await start_broker(tmp_path / "data", **MESH)
    admin = web.AppRunner(admin_app(running.hub, running.broker.keys, running.url), access_log=None)
    await admin.setup()
    await start_admin_site(admin.app, admin, running.config)
    try:
        before = set(await running.broker.store.keys(""))
        process = await asyncio.create_subprocess_exec(
            *BROKER,
            "session",
            "create",
            "--data-dir",
            str(running.config.data_dir),
            "--seats",
            "6",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        stderr = err.decode()
        assert process.returncode == 1
        assert "more than 4 participants" in stderr and "BROKER_JANUS_URL" in stderr and "Traceback" not in stderr
        assert set(await running.broker.store.keys("")) == before
    finally:
        await admin.cleanup()
        await running.stop()


def test_check_config_says_groups_above_the_mesh_need_janus(tmp_path: Path) -> None:
    bare = Config(data_dir=tmp_path, mesh_max_participants=4)
    assert any(c.startswith("group sessions above 4 participants") for c in unavailable_choices(bare))
    with_janus = Config(
        data_dir=tmp_path,
        mesh_max_participants=4,
        janus_url="http://127.0.0.1:8088/janus",
        janus_api_secret="s",
        janus_room_admin_key="k",
    )
    assert not any(c.startswith("group sessions") for c in unavailable_choices(with_janus))
    assert check_config(with_janus) == check_config(bare)
    open_janus = Config(data_dir=tmp_path, janus_url="http://127.0.0.1:8088/janus")
    assert any("janus_api_secret" in p for p in check_config(open_janus))
    assert any("mesh_max_participants" in p for p in check_config(Config(data_dir=tmp_path, mesh_max_participants=1)))


async def test_no_janus_secret_pin_or_token_in_the_brokers_logs(
    with_janus: RunningBroker,
    janus_server: JanusServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hub = with_janus.hub
    rooms = hub.media.rooms
    assert rooms is not None
    session, _ = await hub.create_session(clients=6)
    granted = await rooms.grant(session.id, session.clients()[0].id)
    await rooms.revoke(session.id, granted.token, peer_id=session.clients()[0].id)
    await hub.cancel_session(session.id)
    keys = rooms.keys(session.id)
    assert "event=janus_room_created" in caplog.text and "event=janus_room_destroyed" in caplog.text
    for secret in (
        keys.secret,
        keys.pin,
        granted.token,
        janus_server.api_secret,
        janus_server.admin_secret,
        janus_server.room_admin_key,
    ):
        assert secret not in caplog.text
