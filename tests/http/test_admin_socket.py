"""The local admin socket: only the broker's user can reach it, and the broker never changes the
permissions of a directory it did not make (issue 25, finding 12)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from broker.config import Config
from broker.config_check import check_config
from broker.http.admin_socket import AdminSocketUnsafe, start_admin_site

Start = Callable[[Path], Awaitable[Path]]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start the admin site with its socket at the given path, as ``broker serve`` does."""
    runners: list[web.AppRunner] = []

    async def run(socket: Path) -> Path:
        runner = web.AppRunner(web.Application(), access_log=None)
        await runner.setup()
        runners.append(runner)
        config = Config(data_dir=tmp_path / "data", admin_socket_path=str(socket))
        await start_admin_site(runner.app, runner, config)
        return socket

    yield run
    for runner in runners:
        await runner.cleanup()


async def test_an_existing_directory_keeps_its_mode_and_the_socket_is_private(tmp_path: Path, start: Start) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir()
    directory.chmod(0o755)
    socket = await start(directory / "admin.sock")
    assert mode_of(directory) == 0o755  # the broker used to chmod it to 0700
    assert stat.S_ISSOCK(os.lstat(socket).st_mode) and mode_of(socket) == 0o600
    assert os.lstat(socket).st_uid == os.geteuid()


async def test_a_missing_directory_is_made_private(tmp_path: Path, start: Start) -> None:
    socket = await start(tmp_path / "run" / "broker" / "admin.sock")
    assert mode_of(socket.parent) == 0o700 and mode_of(socket) == 0o600


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770, 0o730])
async def test_a_directory_others_can_write_to_is_refused_and_left_alone(
    tmp_path: Path, start: Start, mode: int
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(AdminSocketUnsafe, match="can be written by other users") as refused:
        await start(shared / "admin.sock")
    assert "BROKER_ADMIN_SOCKET_PATH" in str(refused.value)
    assert mode_of(shared) == mode and not (shared / "admin.sock").exists()


async def test_something_else_at_the_socket_path_is_not_removed(tmp_path: Path, start: Start) -> None:
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o700)
    (directory / "admin.sock").write_text("not a socket")
    with pytest.raises(AdminSocketUnsafe, match="is not a socket a broker left behind"):
        await start(directory / "admin.sock")
    assert (directory / "admin.sock").read_text() == "not a socket"


async def test_a_socket_left_by_a_stopped_broker_is_replaced(tmp_path: Path, start: Start) -> None:
    import socket as sockets

    path = tmp_path / "sockets" / "admin.sock"
    path.parent.mkdir(mode=0o700)
    stale = sockets.socket(sockets.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(ConnectionRefusedError), sockets.socket(sockets.AF_UNIX) as probe:
        probe.connect(str(path))
    await start(path)
    with sockets.socket(sockets.AF_UNIX) as probe:
        probe.connect(str(path))  # the broker listens there now
    assert mode_of(path) == 0o600


def test_check_config_and_serve_refuse_a_shared_socket_directory(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    config = Config(data_dir=tmp_path / "data", admin_socket_path=str(shared / "broker-admin.sock"))
    assert any("can be written by other users" in p for p in check_config(config))
    env = {**os.environ, "BROKER_ADMIN_SOCKET_PATH": str(shared / "broker-admin.sock")}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--data-dir", str(tmp_path / "data"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2 and "can be written by other users" in result.stderr
    assert mode_of(shared) == 0o1777
    assert check_config(Config(data_dir=tmp_path / "data")) == []  # the default, DATA_DIR/run/admin.sock
