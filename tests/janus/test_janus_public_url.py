"""Janus's address as browsers reach it (``janus_public_url``): what participants are sent, what
``check-config`` asks for, and the pages' CSP ``connect-src`` (only when Janus has an origin of its own)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import aiohttp

from broker.client.broker_client import BrokerClient
from broker.config import Config
from broker.config_check import check_config
from broker.janus.scheduling import janus_connect_source, janus_public_url
from broker.signaling.protocol import MediaJanus
from tests.conftest import schedule, start_broker
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture

#: Janus configured, and sessions above four people use it (so its participants need its public address).
SECRETS: dict[str, object] = {"janus_api_secret": "s", "janus_room_admin_key": "k", "mesh_max_participants": 4}
NEEDS_PUBLIC_URL = "janus_url is set but janus_public_url is not"


def test_loopback_janus_beside_a_loopback_broker_needs_no_public_url(tmp_path: Path) -> None:
    local = Config(data_dir=tmp_path, janus_url="http://127.0.0.1:8088/janus", **SECRETS)
    assert janus_public_url(local) == "http://127.0.0.1:8088/janus"
    assert not any(NEEDS_PUBLIC_URL in p for p in check_config(local))
    assert janus_public_url(Config(data_dir=tmp_path)) is None  # no Janus: nothing to reach


def test_a_janus_browsers_cannot_reach_needs_a_public_url(tmp_path: Path) -> None:
    private = Config(data_dir=tmp_path, janus_url="http://10.0.0.5:8088/janus", **SECRETS)
    served = Config(data_dir=tmp_path, host="0.0.0.0", janus_url="http://127.0.0.1:8088/janus", **SECRETS)
    for config in (private, served):
        assert janus_public_url(config) is None
        assert any(NEEDS_PUBLIC_URL in p and "docs/deploy.md" in p for p in check_config(config))
    every_session_a_mesh = replace(private, mesh_max_participants=16)  # no session uses Janus yet
    assert not any(NEEDS_PUBLIC_URL in p for p in check_config(every_session_a_mesh))
    proxied = Config(
        data_dir=tmp_path,
        host="0.0.0.0",
        janus_url="http://10.0.0.5:8088/janus",
        janus_public_url="https://janus.practice.example/janus",
        **SECRETS,
    )
    assert janus_public_url(proxied) == "https://janus.practice.example/janus"
    assert not any("janus_public_url" in p for p in check_config(proxied))
    wrong = Config(data_dir=tmp_path, janus_url="http://10.0.0.5:8088/janus", janus_public_url="ftp://x", **SECRETS)
    assert any("janus_public_url must be" in p for p in check_config(wrong))


def test_only_another_origin_joins_connect_src(tmp_path: Path) -> None:
    public = "https://broker.practice.example"
    same = Config(
        data_dir=tmp_path,
        public_url=public,
        janus_url="http://10.0.0.5:8088/janus",
        janus_public_url=public + "/janus",
        **SECRETS,
    )
    assert janus_connect_source(same) is None  # 'self' covers it: the signed manifest's CSP holds
    other = Config(
        data_dir=tmp_path,
        public_url=public,
        janus_url="http://10.0.0.5:8088/janus",
        janus_public_url="https://janus.practice.example:8443/janus",
        **SECRETS,
    )
    assert janus_connect_source(other) == "https://janus.practice.example:8443"
    assert janus_connect_source(Config(data_dir=tmp_path)) is None


async def csp_of(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/login") as response:
        return response.headers["Content-Security-Policy"]


async def test_the_pages_csp_lets_scripts_reach_janus_only_when_it_is_configured(
    tmp_path: Path,
    janus_server: JanusServer,  # noqa: F811
) -> None:
    janus_server.ensure_running()
    plain = await start_broker(tmp_path / "plain")
    with_janus = await start_broker(
        tmp_path / "janus",
        **janus_server.settings(),
        mesh_max_participants=4,
        janus_public_url="https://janus.practice.example/janus",
    )
    try:
        assert "connect-src 'self';" in await csp_of(plain.url)
        assert "connect-src 'self' https://janus.practice.example;" in await csp_of(with_janus.url)
        links = await schedule(with_janus, clients=4)  # above the mesh: a Janus session
        async with BrokerClient(links.therapist) as therapist:
            granted = await therapist.expect(MediaJanus, timeout=10)
            assert granted.url == "https://janus.practice.example/janus"  # the address browsers reach
            await therapist.end()
    finally:
        await plain.stop()
        await with_janus.stop()
