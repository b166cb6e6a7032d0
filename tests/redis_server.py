"""A real redis-server for tests: one per test session on a free port, stoppable and restartable.

Test modules import the ``redis_server`` fixture from here (``from .redis_server import redis_server``);
every module importing it shares one server.
The server runs without persistence (``--save "" --appendonly no``) unless made with other
``persistence`` options (tests/store/test_redis_outage.py runs the deployment's); ``stop(save=True)``
writes a snapshot first, so a restart on the same port comes back with the same data,
as a production Redis with persistence would.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.server_process import ServerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer(ServerProcess):
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: redis-server's persistence options: none by default.
    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server on this port and wait until it answers PING."""
        assert not self.running, "already running"
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.persistence,
                "--dir",
                str(self.workdir),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self, *, save: bool = False) -> None:
        """Stop the server by its PID (after a snapshot when ``save``)."""
        if not self.running:
            return
        if save:
            self.client().save()
        self.stop_process()

    def restart(self, *, save: bool = False) -> None:
        self.stop(save=save)
        self.start()

    def client(self) -> redis.Redis:
        """A plain synchronous client, for looking at what the broker left in Redis."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def empty_database(self, index: int = 0) -> str:
        """Start the server if needed, empty database ``index`` and return its URL.

        Fixtures whose brokers bring their own server secret start here, as a fresh install
        would: a broker refuses accounts sealed under another secret, as it should.
        """
        self.ensure_running()
        with redis.Redis(host="127.0.0.1", port=self.port, db=index, socket_timeout=5) as c:
            c.flushdb()
        return f"redis://127.0.0.1:{self.port}/{index}"

    def keys(self, prefix: str = "") -> list[bytes]:
        pattern = "".join("\\" + c if c in "\\*?[]" else c for c in prefix) + "*"
        with self.client() as c:
            return sorted(c.scan_iter(match=pattern, count=1000))

    def dump(self) -> bytes:
        """Every key name and value as stored: strings, list items, hash fields, plus DUMP output."""
        parts: list[bytes] = []
        with self.client() as c:
            for name in c.scan_iter(count=1000):
                kind = c.type(name)
                parts.append(name)
                if kind == b"string":
                    value = c.get(name)
                    parts.append(value or b"")
                elif kind == b"list":
                    parts.extend(c.lrange(name, 0, -1))
                elif kind == b"hash":
                    for k, v in c.hgetall(name).items():
                        parts += [k, v]
                elif kind == b"set":
                    parts.extend(c.smembers(name))
                elif kind == b"zset":
                    parts.extend(m for m, _ in c.zrange(name, 0, -1, withscores=True))
                elif kind == b"stream":
                    for _, fields in c.xrange(name):
                        for k, v in fields.items():
                            parts += [k, v]
                serialized = c.dump(name)
                if serialized:
                    parts.append(serialized)
        return b"\n".join(parts)


# Each test module that imports the fixture gets its own copy of it from pytest; they all
# share this one server, started by the first and stopped after the last.
_shared: RedisServer | None = None
_users = 0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    global _shared, _users
    if _shared is None:
        _shared = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
        _shared.start()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            _shared.stop()
            _shared = None
