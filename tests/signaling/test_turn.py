"""TURN credentials: the scheme checked by an independent computation, then against a real coturn.

The coturn tests run turnserver on loopback (free ports, a temporary directory, stopped by its PID):
- two aiortc peers restricted to relay candidates talk through it with credentials from turn_credentials;
- an expired credential gets no allocation, so no connection;
- with the production deny list (parsed from deploy/coturn/turnserver.conf) and loopback peers otherwise
  allowed, relaying to 127.0.0.1 is refused;
- the production config, completed by deploy/coturn/entrypoint.sh, is accepted whole by coturn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import os
import random
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aioice import stun, turn
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from broker.signaling.turn import (
    MAX_TTL,
    MIN_TTL,
    TurnConfigError,
    credential_ttl,
    load_turn_secret,
    opaque_peer_id,
    parse_turn_urls,
    resolve_turn_secret,
    turn_credentials,
    turn_password,
    turn_username,
)

REPO = Path(__file__).resolve().parents[2]
PRODUCTION_CONF = REPO / "deploy" / "coturn" / "turnserver.conf"
ENTRYPOINT = REPO / "deploy" / "coturn" / "entrypoint.sh"
SECRET = "test-shared-secret-" + secrets.token_hex(8)
MESSAGE = "hello through the relay"
NO_CONNECTION_WAIT = 3.0  # a relayed pair connects in well under a second here


# --------------------------------------------------------------------------- the credential scheme


def _reference_credential(secret: bytes, username: str) -> str:
    """The TURN REST API credential computed from its definition, separately from broker.turn."""
    return base64.b64encode(hmac.HMAC(secret, username.encode(), "sha1").digest()).decode()


def test_credentials_match_an_independent_computation() -> None:
    server = turn_credentials(
        SECRET, ["turn:turn.example.org:3478"], 3600, now=1_700_000_000.7, opaque_id="peer_0123456789"
    )
    assert server["urls"] == ["turn:turn.example.org:3478"]
    assert server["username"] == "1700003600:peer_0123456789"
    assert server["credential"] == _reference_credential(SECRET.encode(), "1700003600:peer_0123456789")


def test_bytes_and_str_secrets_agree_and_a_known_vector_holds() -> None:
    # Fixed vector, computed once with `printf %s 1700003600:abcdefgh | openssl dgst -sha1 -hmac s3cret -binary | base64`.
    assert turn_password(b"s3cret", "1700003600:abcdefgh") == turn_password("s3cret", "1700003600:abcdefgh")
    assert turn_password("s3cret", "1700003600:abcdefgh") == _reference_credential(b"s3cret", "1700003600:abcdefgh")
    assert turn_password("s3cret", "1700003600:abcdefgh") == "ucZmCqOPKKnKWd7maqzRDvtb594="


def test_default_opaque_id_is_random_and_expiry_is_in_the_username() -> None:
    now = time.time()
    first = turn_credentials(SECRET, ["turn:127.0.0.1:3478"], 600, now=now)
    second = turn_credentials(SECRET, ["turn:127.0.0.1:3478"], 600, now=now)
    expiry, opaque = first["username"].split(":")
    assert int(expiry) == int(now) + 600
    assert opaque != second["username"].split(":")[1]
    assert first["credential"] != second["credential"]


def test_negative_ttl_gives_an_expiry_in_the_past() -> None:
    server = turn_credentials(SECRET, ["turn:127.0.0.1:3478"], -60, now=1_000_000)
    assert server["username"].startswith("999940:")


def test_opaque_peer_id_is_stable_keyed_and_reveals_no_peer_id() -> None:
    key = secrets.token_bytes(32)
    one = opaque_peer_id(key, "peer-therapist-1")
    assert one == opaque_peer_id(key, "peer-therapist-1")
    assert one != opaque_peer_id(key, "peer-client-1")
    assert one != opaque_peer_id(secrets.token_bytes(32), "peer-therapist-1")
    assert "therapist" not in one
    assert turn_username(1, one).endswith(":" + one)


@pytest.mark.parametrize("bad", ["", "short", "has:colon-in-it", "has space in it", "x" * 65, "Ünicode-name"])
def test_opaque_ids_that_could_smuggle_text_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        turn_username(1_700_000_000, bad)


def test_credential_ttl_follows_the_session_within_bounds() -> None:
    assert credential_ttl(45 * 60) == 45 * 60
    assert credential_ttl(30) == MIN_TTL
    assert credential_ttl(-5) == MIN_TTL
    assert credential_ttl(7 * 24 * 3600) == MAX_TTL
    assert credential_ttl(100, minimum=60, maximum=90) == 90
    with pytest.raises(ValueError):
        credential_ttl(100, minimum=10, maximum=5)


def test_empty_secret_and_missing_urls_are_configuration_errors() -> None:
    with pytest.raises(TurnConfigError):
        turn_credentials(b"", ["turn:127.0.0.1:3478"], 600)
    with pytest.raises(TurnConfigError):
        turn_credentials(SECRET, [], 600)
    with pytest.raises(TurnConfigError):
        turn_credentials(SECRET, ["http://127.0.0.1:3478"], 600)


def test_parse_turn_urls() -> None:
    value = "turn:turn.example.org:3478?transport=udp, turns:turn.example.org:443?transport=tcp,"
    assert parse_turn_urls(value) == [
        "turn:turn.example.org:3478?transport=udp",
        "turns:turn.example.org:443?transport=tcp",
    ]
    assert parse_turn_urls("") == []
    assert parse_turn_urls(None) == []
    with pytest.raises(TurnConfigError):
        parse_turn_urls("turn:ok.example.org,https://not-turn.example.org")


def test_load_turn_secret_from_env_and_file(tmp_path: Path) -> None:
    assert load_turn_secret({}) is None
    assert load_turn_secret({"BROKER_TURN_SECRET": "abc"}) == b"abc"
    secret_file = tmp_path / "turn.secret"
    secret_file.write_bytes(b"from-a-file\n")
    assert load_turn_secret({"BROKER_TURN_SECRET_FILE": str(secret_file)}) == b"from-a-file"
    with pytest.raises(TurnConfigError):
        load_turn_secret({"BROKER_TURN_SECRET": "abc", "BROKER_TURN_SECRET_FILE": str(secret_file)})
    with pytest.raises(TurnConfigError):
        load_turn_secret({"BROKER_TURN_SECRET_FILE": str(tmp_path / "missing")})
    assert resolve_turn_secret("", str(secret_file)) == b"from-a-file"
    assert resolve_turn_secret(b"raw", None) == b"raw"
    assert resolve_turn_secret("", "") is None
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(TurnConfigError):
        load_turn_secret({"BROKER_TURN_SECRET_FILE": str(tmp_path / "empty")})


# --------------------------------------------------------------------------- a real coturn


def production_denied_peer_ips() -> list[str]:
    """The denied-peer-ip values of the production config, exactly as written there."""
    values = []
    for line in PRODUCTION_CONF.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key == "denied-peer-ip":
            values.append(value.strip())
    return values


def _port_is_free(port: int, kinds: tuple[int, ...]) -> bool:
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_listening_port() -> int:
    """A port free for both UDP and TCP: coturn listens on both."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if _port_is_free(port, (socket.SOCK_DGRAM,)):
            return port
    raise RuntimeError("no free port for coturn")


def _free_relay_range(size: int = 24) -> tuple[int, int]:
    """A run of free UDP ports below the usual ephemeral range, for coturn's relay endpoints."""
    for _ in range(200):
        low = random.randrange(20000, 30000 - size)
        if all(_port_is_free(port, (socket.SOCK_DGRAM,)) for port in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError("no free relay port range for coturn")


def _stun_binding_answered(port: int) -> bool:
    """coturn is up once it answers an (unauthenticated) STUN binding request."""
    request = bytes.fromhex("0001 0000 2112a442".replace(" ", "")) + secrets.token_bytes(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(request, ("127.0.0.1", port))
            answer = sock.recv(2048)
        except OSError:
            return False
    return answer[:2] == b"\x01\x01" and answer[8:20] == request[8:20]


@dataclass
class Coturn:
    """A running turnserver on loopback."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _loopback_args(port: int, relay: tuple[int, int]) -> list[str]:
    return [
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={port}",
        f"--min-port={relay[0]}",
        f"--max-port={relay[1]}",
        "--allow-loopback-peers",
    ]


@contextlib.contextmanager
def run_coturn(command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[Coturn]:
    """Start turnserver, wait until it answers STUN, and stop it by its PID afterwards."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    server = Coturn(process, port, log)
    try:
        deadline = time.monotonic() + 10
        while not _stun_binding_answered(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coturn did not start (exit {process.poll()}):\n{server.log_text()[-3000:]}")
            time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _test_coturn_command(tmp: Path, port: int, extra: list[str]) -> list[str]:
    """The loopback command line from ENVIRONMENT.md, with the test's ports and files."""
    return [
        "turnserver",
        "-n",
        *_loopback_args(port, _free_relay_range()),
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        "--realm=test",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--fingerprint",
        f"--userdb={tmp / 'turndb.sqlite'}",
        f"--pidfile={tmp / 'turn.pid'}",
        f"--log-file={tmp / 'turn.log'}",
        "--simple-log",
        "--no-stdout-log",
        *extra,
    ]


@pytest.fixture(scope="module")
def loopback_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn that may relay between loopback peers (the control for the deny-list test)."""
    tmp = tmp_path_factory.mktemp("coturn-open")
    port = _free_listening_port()
    with run_coturn(_test_coturn_command(tmp, port, []), port, tmp / "turn.log") as server:
        yield server


@pytest.fixture(scope="module")
def deny_list_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """Same coturn, loopback peers still allowed, plus the production denied-peer-ip lines."""
    denied = production_denied_peer_ips()
    assert denied, "deploy/coturn/turnserver.conf has no denied-peer-ip lines"
    tmp = tmp_path_factory.mktemp("coturn-deny")
    port = _free_listening_port()
    extra = [f"--denied-peer-ip={value}" for value in denied]
    with run_coturn(_test_coturn_command(tmp, port, extra), port, tmp / "turn.log") as server:
        yield server


def _relay_only(server: dict[str, object]) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[RTCIceServer(**server)],  # type: ignore[arg-type]
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )


@dataclass
class PairResult:
    message: str | None
    offerer_candidate_types: list[str]


async def connect_pair(config: RTCConfiguration, wait: float) -> PairResult:
    """Two aiortc peers in this process; the offerer sends one data-channel message once open."""
    offerer, answerer = RTCPeerConnection(config), RTCPeerConnection(config)
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @answerer.on("datachannel")
    def on_datachannel(channel: RTCDataChannel) -> None:
        @channel.on("message")
        def on_message(message: str) -> None:
            if not received.done():
                received.set_result(message)

    channel = offerer.createDataChannel("probe")

    @channel.on("open")
    def on_open() -> None:
        channel.send(MESSAGE)

    try:
        await offerer.setLocalDescription(await offerer.createOffer())
        gatherer = offerer.sctp.transport.transport.iceGatherer  # type: ignore[union-attr]
        types = [candidate.type for candidate in gatherer.getLocalCandidates()]
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        try:
            message: str | None = await asyncio.wait_for(received, wait)
        except TimeoutError:
            message = None
        return PairResult(message, types)
    finally:
        await offerer.close()
        await answerer.close()


@contextlib.asynccontextmanager
async def turn_client(server: Coturn, username: str, password: str) -> AsyncIterator[turn.TurnClientUdpProtocol]:
    """A bare TURN client (aioice) to see coturn's own answers: allocation, permission, errors."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: turn.TurnClientUdpProtocol(
            ("127.0.0.1", server.port), username=username, password=password, lifetime=600, channel_refresh_time=300
        ),
        remote_addr=("127.0.0.1", server.port),
    )
    try:
        yield protocol
    finally:
        if protocol.relayed_address is not None:
            await protocol.delete()
        transport.close()


async def test_two_relay_only_peers_exchange_a_message_through_coturn(loopback_turn: Coturn) -> None:
    ice = turn_credentials(SECRET, [loopback_turn.url], credential_ttl(20 * 60))
    result = await connect_pair(_relay_only(dict(ice)), wait=10)
    assert result.offerer_candidate_types and set(result.offerer_candidate_types) == {"relay"}
    assert result.message == MESSAGE


async def test_expired_credential_gets_no_allocation(loopback_turn: Coturn) -> None:
    ice = turn_credentials(SECRET, [loopback_turn.url], -60)
    async with turn_client(loopback_turn, ice["username"], ice["credential"]) as client:
        with pytest.raises(stun.TransactionFailed) as refused:
            await client.connect()
    assert refused.value.response.error_code == 401


async def test_wrong_secret_gets_no_allocation(loopback_turn: Coturn) -> None:
    forged = turn_credentials(SECRET + "-not", [loopback_turn.url], 600)
    async with turn_client(loopback_turn, forged["username"], forged["credential"]) as client:
        with pytest.raises(stun.TransactionFailed) as refused:
            await client.connect()
    assert refused.value.response.error_code == 401


async def test_expired_credential_gives_no_connection(loopback_turn: Coturn) -> None:
    ice = turn_credentials(SECRET, [loopback_turn.url], -60)
    result = await connect_pair(_relay_only(dict(ice)), wait=NO_CONNECTION_WAIT)
    assert result.offerer_candidate_types == []
    assert result.message is None


async def test_production_deny_list_refuses_a_loopback_peer(deny_list_turn: Coturn, loopback_turn: Coturn) -> None:
    # The bare protocol: allocation is fine, a permission towards 127.0.0.1 is forbidden (403) ...
    ice = turn_credentials(SECRET, [deny_list_turn.url], 600)
    async with turn_client(deny_list_turn, ice["username"], ice["credential"]) as client:
        relayed = await client.connect()
        assert relayed[0] == "127.0.0.1"
        with pytest.raises(stun.TransactionFailed) as refused:
            await client.channel_bind(0x4000, relayed)
        assert refused.value.response.error_code == 403
    # ... while the same request is granted by the otherwise identical coturn without the list.
    open_ice = turn_credentials(SECRET, [loopback_turn.url], 600)
    async with turn_client(loopback_turn, open_ice["username"], open_ice["credential"]) as client:
        relayed = await client.connect()
        await client.channel_bind(0x4000, relayed)
    assert "denied in the range" in deny_list_turn.log_text()


async def test_production_deny_list_gives_no_connection(deny_list_turn: Coturn) -> None:
    ice = turn_credentials(SECRET, [deny_list_turn.url], 600)
    result = await connect_pair(_relay_only(dict(ice)), wait=NO_CONNECTION_WAIT)
    assert set(result.offerer_candidate_types) == {"relay"}
    assert result.message is None


@pytest.fixture(scope="module")
def production_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """coturn as deployed: deploy/coturn/entrypoint.sh completing deploy/coturn/turnserver.conf.

    Only the log destination differs (so the test can read it), and loopback listening/relay
    addresses with free ports are added on the command line.
    """
    assert shutil.which("turnserver")
    tmp = tmp_path_factory.mktemp("coturn-prod")
    conf = tmp / "base.conf"
    lines = [
        line for line in PRODUCTION_CONF.read_text().splitlines() if not line.startswith(("log-file=", "no-stdout-log"))
    ]
    conf.write_text("\n".join(lines + [f"log-file={tmp / 'turn.log'}", ""]))
    secret_file = tmp / "turn_secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    port = _free_listening_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TURN_CONFIG": str(conf),
        "TURN_RUNTIME_DIR": str(tmp),
        "TURN_SECRET_FILE": str(secret_file),
        "TURN_REALM": "turn.test.example",
    }
    command = ["sh", str(ENTRYPOINT), *_loopback_args(port, _free_relay_range())]
    with run_coturn(command, port, tmp / "turn.log", env=env) as server:
        yield server


async def test_production_config_is_accepted_whole_and_uses_the_secret_file(production_turn: Coturn) -> None:
    ice = turn_credentials(SECRET.encode(), [production_turn.url], 600)
    async with turn_client(production_turn, ice["username"], ice["credential"]) as client:
        await client.connect()
        assert client.realm == "turn.test.example"
    stale = turn_credentials(SECRET, [production_turn.url], -1)
    async with turn_client(production_turn, stale["username"], stale["credential"]) as client:
        with pytest.raises(stun.TransactionFailed):
            await client.connect()
    log = production_turn.log_text()
    assert "1500000 bytes per second allowed per session" in log  # max-bps from the production file
    assert "TCP relay endpoints are not allowed" in log  # no-tcp-relay from the production file
    assert "Bad configuration format" not in log
    assert "CONFIG ERROR" not in log
    assert SECRET not in log
    runtime_conf = production_turn.log.parent / "turnserver.conf"
    assert runtime_conf.stat().st_mode & 0o077 == 0, "the completed config holds the secret: owner-only"
