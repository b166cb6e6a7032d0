"""Invite tokens: the capability that turns a link into a seat.

A token names its session and seat by random ids (208 bits of randomness in
all) and carries its validity window, all authenticated by an HMAC under a key
derived from the server secret. The window being authenticated lets the broker
tell "expired" from "unknown" even after the session's record is gone, while
the store never holds a token: only the seat's random ``token_id``, which is
useless without the server secret.

Layout (then base64url without padding):
``version(1) | session_id(16) | token_id(10) | not_before(u32) | expires(u32) | mac(16)``
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from broker.signaling.protocol import ErrorCode, ProtocolError

TOKEN_VERSION = 1
_BODY = struct.Struct(">B16s10sII")
_MAC_LEN = 16
_TOKEN_LEN = _BODY.size + _MAC_LEN

#: The one answer for an unknown, forged, revoked or ended-session token, so
#: that a holder of a revoked link learns nothing more than a guesser.
INVALID_MESSAGE = "This link is not valid. It may have been revoked, or its session has ended."


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Strict base64url decoding without padding; ValueError on anything else."""
    if not text or any(c not in _B64_ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def typeable_id(size: int) -> str:
    """Random base64url id that never starts with "-", so the CLI can take it as an argument."""
    while True:
        candidate = b64e(secrets.token_bytes(size))
        if not candidate.startswith("-"):
            return candidate


def new_session_id() -> str:
    """A 128-bit random session id (22 characters)."""
    return typeable_id(16)


def new_token_id() -> str:
    """An 80-bit random token id, the part of a token the seat record keeps."""
    return b64e(secrets.token_bytes(10))


def new_peer_id() -> str:
    """A 48-bit random peer id: unique within a session, never a name."""
    return typeable_id(6)


def new_node_id() -> str:
    """A 64-bit random id naming one broker process (a *node*) for as long as it runs: says
    nothing about the machine, and a restarted process gets a new one."""
    return secrets.token_hex(8)


def new_connection_id(node: str) -> str:
    """An opaque id for one WebSocket, naming the node that holds it (``node_of``)."""
    return f"{node}.{secrets.token_hex(8)}"


def node_of(conn: str) -> str | None:
    """The node holding a connection (``new_connection_id``); None for an id that names none."""
    node, dot, _ = conn.partition(".")
    return node if dot else None


def new_resume_secret() -> str:
    """A 256-bit secret that proves a later join comes from the same page (43 characters).

    Given to the device that opens a client seat (``joined.resume_secret``); the page keeps it in
    memory only, so a forwarded link, another device or a reload cannot present it.
    """
    return b64e(secrets.token_bytes(32))


def resume_digest(secret: str) -> str:
    """What the session record keeps of a resume secret: a digest, never the secret itself."""
    return b64e(hashlib.sha256(b"tt-resume v1\x00" + secret.encode("ascii")).digest())


@dataclass(frozen=True)
class TokenClaims:
    session_id: str
    token_id: str
    not_before: int
    expires: int


class TokenCodec:
    """Issues and checks invite tokens with one HMAC key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("token key must be at least 32 bytes")
        self._key = key

    def issue(self, claims: TokenClaims) -> str:
        body = _BODY.pack(
            TOKEN_VERSION,
            b64d(claims.session_id),
            b64d(claims.token_id),
            claims.not_before,
            claims.expires,
        )
        return b64e(body + self._mac(body))

    def check(self, token: str, now: float) -> TokenClaims:
        """Return the claims of an authentic token inside its own window.

        Raises ProtocolError with ``invalid_token`` (malformed or forged),
        ``token_not_yet_valid`` or ``token_expired``.
        """
        claims = self.verify(token)
        check_window(claims.not_before, claims.expires, now)
        return claims

    def verify(self, token: str) -> TokenClaims:
        """The claims of an authentic token, its window not yet judged: while the session's record
        exists, its window is the one that counts (a rescheduled session keeps its links working);
        the token's own window answers only once the record is gone. ``invalid_token`` otherwise."""
        try:
            raw = b64d(token)
        except ValueError:
            raise invalid_token() from None
        if len(raw) != _TOKEN_LEN:
            raise invalid_token()
        body, mac = raw[: _BODY.size], raw[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise invalid_token()
        version, sid, tid, not_before, expires = _BODY.unpack(body)
        if version != TOKEN_VERSION:
            raise invalid_token()
        return TokenClaims(b64e(sid), b64e(tid), not_before, expires)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_LEN]


def check_window(not_before: int, expires: int, now: float) -> None:
    """``token_not_yet_valid`` before the window, ``token_expired`` from its end."""
    if now < not_before:
        raise ProtocolError(
            ErrorCode.TOKEN_NOT_YET_VALID,
            "This link is not open yet. Please come back closer to your appointment time.",
        )
    if now >= expires:
        raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "This link has expired. Please ask your therapist for a new one.")


def invalid_token() -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_TOKEN, INVALID_MESSAGE)
