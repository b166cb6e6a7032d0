"""Short-lived TURN credentials (the "TURN REST API" shared-secret scheme coturn calls use-auth-secret).

Why: a static TURN password in a web page can be copied and used by anyone as a free relay. With a secret
shared only between the broker and coturn, the broker mints per-peer credentials that expire with the
session, and coturn checks them without any database or call back to the broker.

Scheme: username = "<expiry unix seconds>:<opaque id>", credential = base64(HMAC-SHA1(secret, username)).
The opaque id is random or an HMAC of the broker's peer id, never a name: coturn logs usernames.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

__all__ = [
    "MAX_TTL",
    "MIN_TTL",
    "IceServer",
    "TurnConfigError",
    "credential_ttl",
    "load_turn_secret",
    "opaque_peer_id",
    "parse_turn_urls",
    "resolve_turn_secret",
    "turn_credentials",
    "turn_password",
    "turn_username",
]

MIN_TTL = 10 * 60
"""Shortest lifetime handed out: a session about to end still gets time to (re)connect."""

MAX_TTL = 24 * 60 * 60
"""Longest lifetime handed out, whatever the session's length: a leaked credential dies within a day."""

_OPAQUE_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_TURN_URL = re.compile(r"(turns?|stuns?):[^\s,]+")


class TurnConfigError(ValueError):
    """The TURN secret or URLs are missing or malformed (a configuration mistake, fatal at start)."""


class IceServer(TypedDict):
    """The shape of a WebRTC RTCIceServer dictionary, as the page and aiortc take it."""

    urls: list[str]
    username: str
    credential: str


def _secret_bytes(secret: bytes | str) -> bytes:
    """coturn HMACs with the secret's bytes as written in its config, so a str is taken as UTF-8."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise TurnConfigError("the TURN shared secret is empty")
    return raw


def credential_ttl(session_remaining: float, *, minimum: int = MIN_TTL, maximum: int = MAX_TTL) -> int:
    """Lifetime for a peer's credentials: the session's remaining length, kept within [minimum, maximum]."""
    if minimum > maximum:
        raise ValueError("minimum TTL is above maximum TTL")
    return int(min(max(session_remaining, minimum), maximum))


def opaque_peer_id(key: bytes, peer_id: str) -> str:
    """A stable, unlinkable TURN user id for one peer: HMAC of the broker's peer id under a broker key.

    Why: coturn logs usernames; this lets an operator correlate one peer's allocations without the
    TURN server ever learning who the peer is.
    """
    if not key:
        raise ValueError("the key for opaque peer ids is empty")
    digest = hmac.new(key, b"turn-user v1\x00" + peer_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:15]).decode("ascii")


def _random_opaque_id() -> str:
    return secrets.token_urlsafe(15)


def turn_username(expiry: int, opaque_id: str) -> str:
    """The REST-API username; coturn refuses it once the unix time `expiry` has passed."""
    if not _OPAQUE_ID.fullmatch(opaque_id):
        raise ValueError("opaque id must be 8-64 characters of [A-Za-z0-9_-]")
    return f"{int(expiry)}:{opaque_id}"


def turn_password(secret: bytes | str, username: str) -> str:
    """The REST-API credential: base64(HMAC-SHA1(secret, username)), as coturn recomputes it."""
    mac = hmac.new(_secret_bytes(secret), username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


def turn_credentials(
    secret: bytes | str,
    urls: list[str],
    ttl: int,
    *,
    now: float | None = None,
    opaque_id: str | None = None,
) -> IceServer:
    """An RTCIceServer entry valid for `ttl` seconds from `now` (default: the current time).

    `ttl` is used as given so callers (and tests) control it; use credential_ttl() to bound a
    session's remaining length. `opaque_id` defaults to a fresh random id.
    """
    if not urls:
        raise TurnConfigError("no TURN URLs configured")
    for url in urls:
        _check_url(url)
    issued = time.time() if now is None else now
    username = turn_username(int(issued) + int(ttl), opaque_id or _random_opaque_id())
    return {"urls": list(urls), "username": username, "credential": turn_password(secret, username)}


def _check_url(url: str) -> str:
    if not _TURN_URL.fullmatch(url):
        raise TurnConfigError("TURN URLs must look like turn:HOST[:PORT][?transport=udp|tcp] or turns:...")
    return url


def parse_turn_urls(value: str | None) -> list[str]:
    """Split BROKER_TURN_URLS (a comma list) into checked URLs; empty or unset gives []."""
    if not value:
        return []
    return [_check_url(part.strip()) for part in value.split(",") if part.strip()]


def load_turn_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The TURN shared secret from BROKER_TURN_SECRET or the file named by BROKER_TURN_SECRET_FILE.

    Returns None when neither is set (TURN disabled). See resolve_turn_secret for the rules.
    """
    env = os.environ if environ is None else environ
    return resolve_turn_secret(env.get("BROKER_TURN_SECRET"), env.get("BROKER_TURN_SECRET_FILE"))


def resolve_turn_secret(inline: str | bytes | None, path: str | os.PathLike[str] | None) -> bytes | None:
    """The secret given inline or in a file (e.g. Config.turn_secret / Config.turn_secret_file).

    Setting both is refused as ambiguous; neither gives None. A file's trailing newline is dropped,
    so `openssl rand -hex 32 > turn.secret` yields the same bytes coturn reads from its config.
    """
    if inline and path:
        raise TurnConfigError("set only one of the TURN secret and the TURN secret file")
    if inline:
        return _secret_bytes(inline)
    if path:
        return _read_secret_file(Path(path))
    return None


def _read_secret_file(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TurnConfigError(f"cannot read the TURN secret file {path}: {exc.strerror}") from None
    return _secret_bytes(raw.rstrip(b"\r\n"))
