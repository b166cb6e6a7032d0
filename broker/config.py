"""Configuration: defaults, then an optional TOML file, then BROKER_* env vars, then flags.

Also owns the server secret: 32 random bytes generated once into the data dir
(mode 0600) and the purpose-bound keys derived from it, so that one file backs
up everything the broker needs to recognise its own tokens and records.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENV_PREFIX = "BROKER_"


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("broker-data")
    host: str = "127.0.0.1"
    port: int = 8080
    #: Base URL used in links; default http://HOST:PORT.
    public_url: str = ""
    #: Origins allowed to open the signaling WebSocket; default the public URL's origin.
    allowed_origins: tuple[str, ...] = ()
    redis_url: str = ""
    #: Where therapist accounts live when Redis is used; default ``redis_url``. Point it at a
    #: Redis that persists (AOF) when the session Redis deliberately keeps nothing on disk.
    accounts_redis_url: str = ""
    turn_urls: tuple[str, ...] = ()
    turn_secret: str = ""
    turn_secret_file: str = ""
    secret_file: str = ""
    #: The audit log's key, kept apart from the data directory: a file, or the value itself
    #: (BROKER_AUDIT_KEY). Unset: derived from the server secret (see broker.audit.setup).
    audit_key_file: str = ""
    audit_key: str = field(default="", repr=False)
    #: A new audit log file is started when the current one reaches this size (0: never).
    audit_rotate_bytes: int = 16 * 1024 * 1024
    policy_file: str = ""
    #: WebSocket heartbeat and the deadline for hello + join.
    heartbeat_s: float = 20.0
    auth_deadline_s: float = 5.0
    #: Token bucket per connection: sustained messages per second and burst.
    rate_per_s: float = 50.0
    rate_burst: int = 200
    #: Open WebSocket connections allowed per client address (IPv6: per /64).
    max_connections_per_address: int = 50
    #: Open HTTP connections, WebSockets included, per client address; behind a trusted proxy,
    #: requests in progress per forwarded address.
    max_http_connections_per_address: int = 100
    #: A new connection must deliver its first request head within this time, or is dropped.
    http_header_timeout_s: float = 10.0
    #: An idle connection between requests is closed after this long (also bounding a later
    #: request's head). Keep it above the reverse proxy's idle timeout for pooled connections
    #: to the broker (Caddy 120 s, nginx and ingress-nginx 60 s).
    http_keepalive_s: float = 150.0
    #: Outgoing messages queued for one connection before it is closed as too slow.
    send_queue_limit: int = 256
    #: Network pre-flights (broker-side peer connections) running at once in this process; of those, at most
    #: ``preflight_session_slots`` for one session; a seat starts at most ``preflight_seat_per_minute`` a
    #: minute; an offer waits at most ``preflight_wait_s`` for a slot (see broker/checklist/preflight_slots.py).
    preflight_slots: int = 8
    preflight_session_slots: int = 4
    preflight_seat_per_minute: int = 6
    preflight_wait_s: float = 8.0
    #: Trust X-Forwarded-For from a TLS proxy in front (compose, Kubernetes).
    trust_proxy: bool = False
    #: The local admin socket; per process when several share one data dir (compose, Kubernetes).
    admin_socket_path: str = ""
    #: Require a second factor for every therapist login.
    require_second_factor: bool = False
    #: Therapist login: logged off after this long idle, and after this long at most (seconds).
    login_idle_s: float = 15 * 60
    login_absolute_s: float = 12 * 3600
    #: Shown as the issuer in authenticator apps and on the client's welcome screen.
    practice_name: str = ""
    #: The languages the practice offers its clients (catalogues of the web root; the checklist
    #: policy should translate its texts into each: ``broker check-config`` names what is missing).
    languages: tuple[str, ...] = ("en", "es")
    log_level: str = "info"
    #: How log lines are laid out on stderr: "text" (``time LEVEL logger event=...``) or "json"
    #: (one object per line, for a log pipeline); the same fields and redaction in both (broker/logs.py).
    log_format: str = "text"
    #: Where Prometheus scrapes this process's metrics (host:port), never the public port; "off": nowhere.
    metrics_address: str = "127.0.0.1:9464"
    #: The browser client's files (pages, modules, styles, images, the signed web manifest); empty: the
    #: copy shipped in the package. A practice that changes them builds and signs its own manifest.
    web_root: str = ""
    #: Group sessions: up to this many participants (therapist included) talk peer to peer; a session
    #: scheduled with more uses Janus (``janus_url``), up to 16. Decided at scheduling, never mid-call.
    #: 4: past that, home uplinks give out (each browser sends its video once per other participant).
    mesh_max_participants: int = 4
    #: Janus's API (HTTP transport, loopback or a private network), e.g. http://127.0.0.1:8088/janus;
    #: empty: no Janus, and no session above ``mesh_max_participants``.
    janus_url: str = ""
    #: Janus's ``api_secret``; the admin API (stored tokens) and its ``admin_secret``; the VideoRoom
    #: plugin's ``admin_key``. Held by the broker only, never sent to a browser.
    janus_api_secret: str = field(default="", repr=False)
    janus_admin_url: str = ""
    janus_admin_secret: str = field(default="", repr=False)
    janus_room_admin_key: str = field(default="", repr=False)
    #: How long one request to Janus may take before the broker gives up (janus_unavailable).
    janus_timeout_s: float = 5.0
    #: Janus's API as browsers reach it: the practice's TLS proxy in front of Janus's HTTP (or WebSocket)
    #: transport, e.g. https://janus.practice.example/janus. Sent to admitted participants of Janus sessions
    #: and allowed in the pages' CSP ``connect-src``. Empty: ``janus_url`` itself, but only when both it and
    #: the broker are on loopback (a test or a laptop); otherwise ``check-config`` asks for it (mesh below 16).
    janus_public_url: str = ""

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def origins(self) -> tuple[str, ...]:
        if self.allowed_origins:
            return tuple(o.rstrip("/") for o in self.allowed_origins)
        parts = urlsplit(self.base_url)
        origin = f"{parts.scheme}://{parts.netloc}"
        extra: tuple[str, ...] = ()
        if parts.hostname == "127.0.0.1":
            extra = (f"{parts.scheme}://localhost:{parts.port}",)
        return (origin, *extra)

    @property
    def secret_path(self) -> Path:
        return Path(self.secret_file) if self.secret_file else self.data_dir / "server.secret"

    @property
    def audit_path(self) -> Path:
        """The content-free audit log, shared by the server and the CLI."""
        return self.data_dir / "audit.log"

    @property
    def accounts_path(self) -> Path:
        """The embedded default's accounts file (unused when accounts live in Redis)."""
        return self.data_dir / "accounts.sqlite3"

    @property
    def sessions_path(self) -> Path:
        """The embedded store's session file, so sessions survive a restart (unused with Redis)."""
        return self.data_dir / "sessions.sqlite3"

    @property
    def accounts_redis(self) -> str:
        """The Redis URL holding therapist accounts, or "" for the SQLite file in the data dir."""
        return self.accounts_redis_url or self.redis_url

    @property
    def admin_socket(self) -> Path:
        return Path(self.admin_socket_path) if self.admin_socket_path else self.data_dir / "run" / "admin.sock"


_BOOL_TRUE = {"1", "true", "yes", "on"}


def _coerce(name: str, raw: Any, template: Any) -> Any:
    if isinstance(template, bool):
        if isinstance(raw, bool):
            return raw
        return str(raw).strip().lower() in _BOOL_TRUE
    if isinstance(template, int):
        return int(raw)
    if isinstance(template, float):
        return float(raw)
    if isinstance(template, Path):
        return Path(raw)
    if isinstance(template, tuple):
        if isinstance(raw, (list, tuple)):
            return tuple(str(x).strip() for x in raw if str(x).strip())
        return tuple(x.strip() for x in str(raw).split(",") if x.strip())
    return str(raw)


class ConfigError(Exception):
    """Configuration that cannot be used; the message says what and where."""


def load_config(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    env = os.environ if env is None else env
    defaults = Config()
    values: dict[str, Any] = {}
    config_file = env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                values.update(tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"Cannot read the configuration file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"The configuration file {config_file} is not valid TOML: {exc}") from None
    for f in fields(Config):
        key = ENV_PREFIX + f.name.upper()
        if key in env and env[key] != "":
            values[f.name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    known = {f.name: getattr(defaults, f.name) for f in fields(Config)}
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in known:
            raise ConfigError(f"Unknown configuration key {name!r} (check the spelling).")
        try:
            kwargs[name] = _coerce(name, raw, known[name])
        except (TypeError, ValueError):
            raise ConfigError(f"Configuration key {name!r} has an invalid value.") from None
    return replace(defaults, **kwargs)


# ---------------------------------------------------------------- secrets


def load_or_create_secret(config: Config) -> bytes:
    """The server secret, generated (32 random bytes, hex, mode 0600) when absent.

    Several processes may start together on a new data directory (brokers, ``broker therapist
    add``): each writes a whole secret to a file of its own and links it into place, which fails
    if another was first. Every process then reads the one that won, never a half-written file.
    """
    path = config.secret_path
    if not path.exists():
        _create_secret(path)
    raw = path.read_bytes().strip()
    return bytes.fromhex(raw.decode("ascii")) if _is_hex(raw) else raw


def _create_secret(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_bytes(32).hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            pass  # another process's secret is in place: it is the one
        except OSError:  # a file system without hard links: create it in place, as before
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(partial.read_text())
    finally:
        partial.unlink(missing_ok=True)


def _is_hex(raw: bytes) -> bool:
    try:
        bytes.fromhex(raw.decode("ascii"))
        return len(raw) % 2 == 0
    except ValueError:
        return False


@dataclass(frozen=True)
class Keys:
    """Purpose-bound keys derived from the server secret."""

    secret: bytes = field(repr=False)

    def derive(self, purpose: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"broker keys v1", info=purpose.encode()).derive(
            self.secret
        )

    @property
    def token(self) -> bytes:
        return self.derive("invite-token")

    @property
    def admin(self) -> bytes:
        return self.derive("admin-api")

    @property
    def store(self) -> bytes:
        return self.derive("store-at-rest")

    @property
    def sessions(self) -> bytes:
        return self.derive("sessions-at-rest")

    @property
    def address(self) -> bytes:
        return self.derive("address-pseudonym")

    @property
    def accounts(self) -> bytes:
        return self.derive("accounts-at-rest")

    @property
    def audit(self) -> bytes:
        return self.derive("audit-chain")

    @property
    def janus_rooms(self) -> bytes:
        return self.derive("janus-room-keys")

    @property
    def signing_seed(self) -> bytes:
        return self.derive("session-record-ed25519")
