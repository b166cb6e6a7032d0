"""The therapist's roster: how a client learns which other clients are really in the call (protocol 7.8).

Two clients share no key, so neither can tell on its own whether the peer the broker calls
"the other client" is who the therapist admitted. The therapist vouches: over its own
authenticated pair with each client it sends a roster, sealed under that pair's direction
key, listing every other admitted client with the DTLS fingerprint the therapist saw in that
client's authenticated SDP, the client-pair key for the two of them, and whether that client
is on hold. A client accepts a connection from another client only under that key and only
with that fingerprint, and sends nothing to (and plays nothing from) a client on hold.

``web/js/e2ee.js`` implements the same functions for the browser; the shared vectors in
``tests/vectors/e2ee.json`` keep the two byte-for-byte identical. Nothing here logs a key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from broker.crypto.link_key import check_counter, decode_link_key
from broker.crypto.sdp_auth import FINGERPRINT_ALGORITHMS, InterceptionError, normalise_fingerprint

__all__ = ["MAX_ROSTER_PEERS", "RosterEntry", "parse_roster_plaintext", "roster_plaintext"]

#: A session has at most 15 client seats, so a client's roster names at most 14 others.
MAX_ROSTER_PEERS: Final = 14
_PEER_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENTRY_FIELDS: Final = ("peer", "fingerprint", "key", "held")


@dataclass(frozen=True)
class RosterEntry:
    """Another admitted client as the therapist vouches for it."""

    peer: str
    #: Normalised ("sha-256 AB:CD:..."), as the therapist read it from that client's SDP.
    fingerprint: str
    #: The client-pair key (43 base64url characters) for the recipient and this peer.
    key: str
    held: bool


def _check_entry(entry: RosterEntry) -> None:
    if not isinstance(entry.peer, str) or not _PEER_ID_RE.fullmatch(entry.peer):
        raise ValueError("a roster entry's peer must be a peer id")
    if not isinstance(entry.fingerprint, str):
        raise ValueError("a roster entry's fingerprint must be text")
    if normalise_fingerprint(entry.fingerprint) != entry.fingerprint:
        raise ValueError("a roster entry's fingerprint must be normalised")
    if entry.fingerprint.split(" ", 1)[0] not in FINGERPRINT_ALGORITHMS:
        raise ValueError("a roster entry's fingerprint must be sha-256, sha-384 or sha-512")
    decode_link_key(entry.key)
    if not isinstance(entry.held, bool):
        raise ValueError("a roster entry's held must be true or false")


def _check_roster(version: int, entries: list[RosterEntry]) -> None:
    check_counter(version)
    if len(entries) > MAX_ROSTER_PEERS:
        raise ValueError(f"a roster names at most {MAX_ROSTER_PEERS} peers")
    for entry in entries:
        _check_entry(entry)
    if len({e.peer for e in entries}) != len(entries):
        raise ValueError("a roster names each peer once")


def roster_plaintext(version: int, entries: list[RosterEntry]) -> str:
    """The exact plaintext the therapist seals: compact JSON, entries sorted by peer id.

    ``{"version": n, "peers": [{"peer", "fingerprint", "key", "held"}, ...]}``, what
    ``JSON.stringify`` writes for the same object in e2ee.js.
    """
    _check_roster(version, entries)
    peers = [{name: getattr(e, name) for name in _ENTRY_FIELDS} for e in sorted(entries, key=lambda e: e.peer)]
    return json.dumps({"version": version, "peers": peers}, ensure_ascii=False, separators=(",", ":"))


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_roster_plaintext(text: str) -> tuple[int, list[RosterEntry]]:
    """(version, entries) of an opened roster; InterceptionError("malformed") if it is not one.

    Receivers read any JSON text with exactly these members, in any order.
    """
    try:
        data = json.loads(text, parse_constant=_no_constant)
        if not isinstance(data, dict) or set(data) != {"version", "peers"}:
            raise ValueError('a roster is {"version", "peers"}')
        version, peers = data["version"], data["peers"]
        if not isinstance(version, int) or isinstance(version, bool) or not isinstance(peers, list):
            raise ValueError("a roster's version is an integer and its peers a list")
        entries = []
        for item in peers:
            if not isinstance(item, dict) or set(item) != set(_ENTRY_FIELDS):
                raise ValueError('a roster entry is {"peer", "fingerprint", "key", "held"}')
            entries.append(RosterEntry(item["peer"], item["fingerprint"], item["key"], item["held"]))
        _check_roster(version, entries)
    except (ValueError, RecursionError, TypeError) as exc:
        raise InterceptionError("malformed", f"roster: {exc}") from None
    return version, entries
