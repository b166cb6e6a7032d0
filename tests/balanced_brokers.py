"""Two real broker processes on one real redis-server, behind a real Caddy set up like deploy/Caddyfile.

What a group practice runs (deploy/compose.yaml), on loopback: ``python -m broker serve`` twice
(``BrokerProcess`` from the Redis cluster tests), one server secret, and Caddy 2 with the
reverse-proxy block of ``deploy/Caddyfile`` as it is (load balancing, active health checks on
``/readyz``, retries), only its site address, upstreams and TLS made local. ``hung`` stops a
broker with SIGSTOP (the process keeps its sockets open and answers nothing, as a hung process
does) and always lets it go on again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config import Keys
from broker.crypto.link_key import b64url_encode, decode_link_key, new_link_key
from broker.crypto.seat_keys import seat_key
from broker.signaling.hub import Hub
from broker.signaling.tokens import TokenCodec
from broker.store.backends import connect_redis
from tests.redis_server import free_port
from tests.store.test_redis_cluster import REPO, BrokerProcess

CADDYFILE = REPO / "deploy" / "Caddyfile"


@dataclass
class Pair:
    """Two brokers of one installation, and a Hub on their Redis to schedule sessions with."""

    a: BrokerProcess
    b: BrokerProcess
    hub: Hub
    closers: list[Any]
    #: Caddy in front of both, when started (``start_proxy``).
    proxy: Caddy | None = None

    def other(self, broker: BrokerProcess) -> BrokerProcess:
        return self.b if broker is self.a else self.a

    def joins(self, broker: BrokerProcess, peer: str) -> int:
        """How many times ``peer`` joined on ``broker``, by its log (which holds event names and opaque ids only)."""
        log = broker.data_dir / f"broker-{broker.name}.log"
        if not log.exists():
            return 0
        return sum(
            1 for line in log.read_text().splitlines() if "event=peer_joined" in line and f"peer={peer} " in line
        )

    async def wait_joins(self, broker: BrokerProcess, peer: str, count: int, timeout: float = 5.0) -> bool:
        """Whether ``broker`` logs ``count`` joins of ``peer`` within ``timeout`` (a log line may follow its reply)."""
        deadline = time.monotonic() + timeout
        while self.joins(broker, peer) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return self.joins(broker, peer) == count

    async def joined_on(self, peer: str, timeout: float = 5.0) -> BrokerProcess:
        """The broker that ``peer`` joined first (it has not joined the other)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [b for b in (self.a, self.b) if self.joins(b, peer)]
            if found:
                assert len(found) == 1 and self.joins(found[0], peer) == 1, "joined more than once"
                return found[0]
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no broker logged the join of {peer}")


def broker_env(root: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """The settings both processes share: Redis, one server secret, info logs (event names and opaque ids)."""
    secret_file = root / "server.secret"
    if not secret_file.exists():
        secret_file.write_text(os.urandom(32).hex() + "\n")
        secret_file.chmod(0o600)
    return {
        **os.environ,
        "BROKER_REDIS_URL": redis_url,
        "BROKER_SECRET_FILE": str(secret_file),
        "BROKER_LOG_LEVEL": "info",
        "PYTHONPATH": str(REPO),
        **extra,
    }


async def start_pair(root: Path, env: dict[str, str], *, proxy_port: int | None = None) -> Pair:
    """Start both brokers and wait until they are ready. With ``proxy_port``, each also accepts the
    WebSocket origin of the proxy there (pages come through it) besides its own (direct peers)."""
    ports = [free_port(), free_port()]
    if proxy_port is not None:
        origins = [f"http://127.0.0.1:{port}" for port in (proxy_port, *ports)]
        env = {**env, "BROKER_ALLOWED_ORIGINS": ",".join(origins)}
    brokers = []
    for name, port in zip(("a", "b"), ports, strict=True):
        data_dir = root / f"data-{name}"
        data_dir.mkdir(mode=0o700)
        brokers.append(BrokerProcess(name, port, data_dir, env))
    for broker in brokers:
        broker.start()
    for broker in brokers:
        await broker.wait_ready()
    keys = Keys(bytes.fromhex(Path(env["BROKER_SECRET_FILE"]).read_text().strip()))
    store, bus = await connect_redis(env["BROKER_REDIS_URL"], keys.store)
    return Pair(brokers[0], brokers[1], Hub(store, bus, TokenCodec(keys.token)), [bus, store])


def start_proxy(pair: Pair, port: int, workdir: Path) -> Caddy:
    """Caddy on ``port`` in front of both brokers (start the pair with ``proxy_port=port``)."""
    pair.proxy = Caddy(port, workdir)
    pair.proxy.start([pair.a.port, pair.b.port])
    return pair.proxy


async def stop_pair(pair: Pair) -> None:
    if pair.proxy is not None:
        pair.proxy.stop()
    for broker in (pair.a, pair.b):
        with contextlib.suppress(ProcessLookupError):
            if broker.running:
                broker.signal(signal.SIGCONT)
        broker.stop()
    for closer in pair.closers:
        await closer.close()


@dataclass
class Links:
    session: str
    therapist_token: str
    client_token: str
    therapist_peer: str
    client_peer: str
    link_key: str

    def therapist(self, base: str) -> str:
        return f"{base}/t/{self.therapist_token}#{self.link_key}"

    def client(self, base: str) -> str:
        """The client's link carries its own seat key, derived from the session secret (protocol 7.1)."""
        key = b64url_encode(seat_key(decode_link_key(self.link_key), self.session, self.client_peer))
        return f"{base}/j/{self.client_token}#{key}"


async def schedule(hub: Hub) -> Links:
    session, tokens = await hub.create_session(clients=1)
    therapist, client = session.therapist(), session.clients()[0]
    return Links(session.id, tokens[therapist.id], tokens[client.id], therapist.id, client.id, new_link_key())


@contextlib.contextmanager
def hung(broker: BrokerProcess) -> Iterator[float]:
    """SIGSTOP the broker (sockets stay open, nothing answers); yields the moment; SIGCONT whatever happens."""
    broker.signal(signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        broker.signal(signal.SIGCONT)


# ---------------------------------------------------------------- Caddy


def local_caddyfile(port: int, upstreams: list[int], janus_port: int | None = None) -> str:
    """deploy/Caddyfile with a local plain-HTTP site address and local upstreams (brokers, and Janus's
    API when given: else a port nothing listens on); all else as shipped."""
    text = CADDYFILE.read_text()
    replacements = {
        "email {$ACME_EMAIL}": "admin off\n\tauto_https off",
        "{$BROKER_DOMAIN} {": f"http://127.0.0.1:{port} {{",
        "reverse_proxy broker1:8080 broker2:8080 {": "reverse_proxy "
        + " ".join(f"127.0.0.1:{p}" for p in upstreams)
        + " {",
        "reverse_proxy janus-api:8088": f"reverse_proxy 127.0.0.1:{janus_port or free_port()}",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"deploy/Caddyfile changed: update this test's copy ({old!r})"
        text = text.replace(old, new)
    return text


@dataclass
class Caddy:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, upstreams: list[int], janus_port: int | None = None) -> None:
        caddy = shutil.which("caddy")
        assert caddy, "caddy (Debian package caddy) is required: scripts/test installs it"
        config = self.workdir / "Caddyfile"
        config.write_text(local_caddyfile(self.port, upstreams, janus_port))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "XDG_DATA_HOME": str(self.workdir),
            "XDG_CONFIG_HOME": str(self.workdir),
        }
        log = open(self.workdir / "caddy.log", "ab")
        self.process = subprocess.Popen(
            [caddy, "run", "--config", str(config), "--adapter", "caddyfile"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"caddy exited: see {self.workdir}/caddy.log"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise TimeoutError("caddy did not listen")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
