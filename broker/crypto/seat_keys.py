"""A key per seat: what each link carries, and the key that authenticates each pair (protocol 7.1).

In a couples, family or group session the clients must not share a key: a client who held
the key of another pair could speak for the therapist to another client, sit between two
clients, or open another client's sealed emergency details, with a compromised broker's help.
So the therapist's side makes one **session secret** and gives each client's link only the
**seat key** derived from it for that seat. The therapist's side derives every seat key; a
client holds only its own. Two clients share no key of their own: the therapist hands each
pair a **client-pair key** in the roster (broker/crypto/roster.py).

``web/js/e2ee.js`` implements the same functions for the browser; the shared vectors in
``tests/vectors/e2ee.json`` keep the two byte-for-byte identical. Nothing here logs a key.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.crypto.link_key import LINK_KEY_BYTES, lp, utf8

__all__ = ["client_pair_key", "group_key", "pair_link_key", "seat_key"]

SEAT_LABEL: Final = "tt-seat v1"
GROUP_LABEL: Final = "tt-group v1"
CLIENTS_LABEL: Final = "tt-clients v1"


def _derive(secret: bytes, session_id: str, info: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) != LINK_KEY_BYTES:
        raise ValueError(f"the session secret must be {LINK_KEY_BYTES} bytes (use decode_link_key)")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=utf8(session_id), info=info).derive(secret)


def seat_key(secret: bytes, session_id: str, peer_id: str) -> bytes:
    """K_seat: the key a client seat's link carries; only the therapist's side can derive it."""
    return _derive(secret, session_id, lp(SEAT_LABEL) + lp(peer_id))


def group_key(secret: bytes, session_id: str) -> bytes:
    """K_group: the one key a group link carries, shared by everyone who received that link."""
    return _derive(secret, session_id, lp(GROUP_LABEL))


def client_pair_key(secret: bytes, session_id: str, a: str, b: str) -> bytes:
    """K_clients: the key two clients authenticate each other with; the therapist sends it to both."""
    lo, hi = (a, b) if a <= b else (b, a)  # str order is code-point order
    return _derive(secret, session_id, lp(CLIENTS_LABEL) + lp(lo) + lp(hi))


def pair_link_key(
    secret: bytes,
    session_id: str,
    client: str,
    *,
    seat_keys: bool = True,
    group_seat: bool = False,
) -> bytes:
    """The key the therapist's side authenticates its pair with ``client`` under.

    The client's seat key; the group key for a seat taken through the group link; and the
    session secret itself for a session scheduled before seat keys (``seat_keys=False``), whose
    links all carry that one key.
    """
    if not seat_keys:
        if not isinstance(secret, bytes) or len(secret) != LINK_KEY_BYTES:
            raise ValueError(f"the session secret must be {LINK_KEY_BYTES} bytes")
        return secret
    if group_seat:
        return group_key(secret, session_id)
    return seat_key(secret, session_id, client)
