"""The group link on session creation (docs/protocol.md 4 and 15.15): asked for with ``group_link``
through the dashboard API and the admin socket, answered with ``group_token`` (null without one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from broker.http.admin_socket import AdminClient, AdminError, admin_app, start_admin_site
from broker.signaling.hub import Hub
from tests.conftest import start_broker
from tests.http.test_dashboard import full, http, login  # noqa: F401 - the fixtures
from tests.http.test_web_auth import FullBroker

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def opens_group_seat(hub: Hub, session_id: str, token: str) -> None:
    """The token is this session's group link: it resolves to the session, and is no seat's own."""
    session, _ = await hub.resolve_token(token)
    assert session.id == session_id and session.group_token_id is not None
    claims = hub.check_token(token)
    assert claims.token_id == session.group_token_id


async def test_the_api_makes_a_group_link_only_when_asked(full: FullBroker, http: ClientSession) -> None:  # noqa: F811
    alex = await login(full, http, "alex")
    hub = full.broker.hub
    status, plain = await alex.call("POST", "/api/sessions", {"clients": 3})
    assert status == 200, plain
    assert plain["group_token"] is None
    assert (await hub.get_session(plain["session"])).group_token_id is None
    status, grouped = await alex.call("POST", "/api/sessions", {"clients": 3, "group_link": True})
    assert status == 200, grouped
    assert isinstance(grouped["group_token"], str)
    assert grouped["group_token"] not in {seat["token"] for seat in grouped["seats"]}
    await opens_group_seat(hub, grouped["session"], grouped["group_token"])
    status, answer = await alex.call("POST", "/api/sessions", {"clients": 2, "group_link": "yes"})
    assert status == 400 and answer["error"] == "bad_request"


async def test_the_admin_socket_makes_a_group_link_only_when_asked(tmp_path: Path) -> None:
    running = await start_broker(tmp_path / "data")
    config = dataclasses.replace(running.config, admin_socket_path=str(tmp_path / "admin" / "admin.sock"))
    runner = web.AppRunner(admin_app(running.hub, running.broker.keys, running.url), access_log=None)
    await runner.setup()
    try:
        await start_admin_site(runner.app, runner, config)
        client = AdminClient(config)
        plain = await client.create_session(clients=2)
        assert plain["group_token"] is None
        grouped = await client.create_session(clients=2, group_link=True)
        assert isinstance(grouped["group_token"], str)
        assert grouped["group_token"] not in {seat["token"] for seat in grouped["seats"]}
        await opens_group_seat(running.hub, grouped["session"], grouped["group_token"])
        with pytest.raises(AdminError):
            await client.request("POST", "/sessions", {"clients": 2, "group_link": "yes"})
    finally:
        await runner.cleanup()
        await running.stop()
