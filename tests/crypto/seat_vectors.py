"""The shared vectors of seat keys and the therapist's roster (docs/protocol.md 7.1 and 7.8).

``build_seat_vectors()`` computes them with broker/crypto/seat_keys.py and roster.py from
fixed inputs; ``tests/crypto/test_e2ee.py`` writes them into tests/vectors/e2ee.json with the
others, tests/crypto/test_seat_keys.py recomputes them with the standard library, and
tests/crypto/test_e2ee_browser.py replays them against web/js/e2ee.js.
"""

from __future__ import annotations

from typing import Any

from broker.crypto.link_key import b64url_encode, decode_link_key, derive_auth_key, pair_key
from broker.crypto.roster import RosterEntry, roster_plaintext
from broker.crypto.sealed_signaling import derive_seal_key, seal_signal
from broker.crypto.seat_keys import client_pair_key, group_key, seat_key
from broker.crypto.waiting_note import derive_note_key, note_plaintext, seal_note

SECRET = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
SECRET_B = "_-7t7Nva2djX1tXU09LR0M_OzczLysnIx8bFxMPCwcA"
SESSION = "s_7kQ2mX"
FP_1 = "sha-256 99:F9:7D:45:5D:5D:62:B2:4F:3A:94:2A:1A:BC:3F:A8:86:3F:C0:CE:20:37:F5:2F:09:BD:78:5B:22:B8:00:D4"
FP_3 = "sha-256 0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9:0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9"


def _key(text: str) -> bytes:
    return decode_link_key(text)


def _direction_key(pair_link_key: bytes, sender: str, recipient: str) -> bytes:
    k_pair = pair_key(derive_auth_key(pair_link_key, SESSION), sender, recipient)
    return derive_seal_key(k_pair, sender, recipient)


def build_note_vectors() -> dict[str, Any]:
    """Vector group ``waiting_note`` (docs/protocol.md 7.4.2): notes the therapist's side seals
    with a client's seat key derived from the session secret (``valid``), and sealed notes that
    must not open for that seat (``invalid``)."""
    secret = _key(SECRET)
    k_1 = seat_key(secret, SESSION, "seat-1")
    k_2 = seat_key(secret, SESSION, "seat-2")
    texts = [
        ("I'll be with you in a few minutes", bytes(range(12))),
        ("  Ich komme gleich – 5 Minuten später. 🙂  ", bytes(range(12, 24))),
        ('A "quote", a tab\tand <b>markup</b>', bytes(12)),
    ]
    valid = [
        {
            "session_secret": SECRET,
            "session_id": SESSION,
            "peer": "seat-1",
            "seat_key": b64url_encode(k_1),
            "k_note_hex": derive_note_key(k_1, SESSION).hex(),
            "nonce_hex": nonce.hex(),
            "text": text,
            "plaintext": note_plaintext(text),
            "sealed": seal_note(k_1, SESSION, "seat-1", text, nonce=nonce),
        }
        for text, nonce in texts
    ]
    nonce = bytes(range(12))
    header = {"session_id": SESSION, "peer": "seat-1", "seat_key": b64url_encode(k_1)}
    invalid = [
        {"what": "sealed for seat-2, delivered to seat-1", **header,
         "sealed": seal_note(k_2, SESSION, "seat-2", "hello", nonce=nonce)},
        {"what": "sealed with seat-1's key for seat-2's peer id", **header,
         "sealed": seal_note(k_1, SESSION, "seat-2", "hello", nonce=nonce)},
        {"what": "another session", **header,
         "sealed": seal_note(seat_key(secret, "s_other", "seat-1"), "s_other", "seat-1", "hello", nonce=nonce)},
        {"what": "a bit flipped", **header,
         "sealed": valid[0]["sealed"][:30] + ("B" if valid[0]["sealed"][30] != "B" else "C") + valid[0]["sealed"][31:]},
    ]  # fmt: skip
    return {"waiting_note": {"valid": valid, "invalid": invalid}}


def build_seat_vectors() -> dict[str, Any]:
    """Vector groups ``seat_key``, ``group_key``, ``client_pair_key``, ``roster_plaintext``,
    ``roster`` and ``roster_invalid`` (and ``waiting_note``, ``build_note_vectors``)."""
    secret = _key(SECRET)
    seat_cases = [(SECRET, SESSION, "seat-1"), (SECRET, SESSION, "seat-2"), (SECRET_B, SESSION, "seat-1"),
                  (SECRET, "s_other", "seat-1"), (SECRET, SESSION, "Ünï")]  # fmt: skip
    pair_cases = [(SECRET, "seat-1", "seat-2"), (SECRET, "seat-2", "seat-1"), (SECRET, "seat-1", "seat-3"),
                  (SECRET_B, "seat-1", "seat-2")]  # fmt: skip
    k12 = b64url_encode(client_pair_key(secret, SESSION, "seat-1", "seat-2"))
    k13 = b64url_encode(client_pair_key(secret, SESSION, "seat-1", "seat-3"))
    entries = [RosterEntry("seat-3", FP_3, k13, True), RosterEntry("seat-2", FP_1, k12, False)]
    version, counter, nonce = 1_763_700_000_000_100, 1_763_700_000_000_200, bytes(range(12))
    plaintext = roster_plaintext(version, entries)
    k_seat_1 = seat_key(secret, SESSION, "seat-1")
    k_seat_2 = seat_key(secret, SESSION, "seat-2")
    seal_1 = _direction_key(k_seat_1, "therapist", "seat-1")
    sealed = seal_signal(seal_1, SESSION, "therapist", "seat-1", "roster", counter, plaintext, nonce=nonce)
    # Sealed to seat-2 and re-addressed; and forged by seat-2, which holds only its own seat key.
    to_seat_2 = seal_signal(
        _direction_key(k_seat_2, "therapist", "seat-2"), SESSION, "therapist", "seat-2", "roster", counter,
        plaintext, nonce=nonce,
    )  # fmt: skip
    forged = seal_signal(
        _direction_key(k_seat_2, "therapist", "seat-1"), SESSION, "therapist", "seat-1", "roster", counter,
        plaintext, nonce=nonce,
    )  # fmt: skip
    header = {"seat_key": b64url_encode(k_seat_1), "session_id": SESSION, "sender": "therapist", "recipient": "seat-1"}

    def entry(peer: str = "seat-2", fp: str = FP_1, key: str = k12, held: str = "false") -> str:
        return f'{{"peer":"{peer}","fingerprint":"{fp}","key":"{key}","held":{held}}}'

    malformed = [
        ("not an object", "[]"),
        ("a member missing", '{"version":1}'),
        ("an extra member", '{"version":1,"peers":[],"x":1}'),
        ("version not an integer", '{"version":"1","peers":[]}'),
        ("version negative", '{"version":-1,"peers":[]}'),
        ("version beyond 2^53-1", '{"version":9007199254740992,"peers":[]}'),
        ("version a boolean", '{"version":true,"peers":[]}'),
        ("version NaN", '{"version":NaN,"peers":[]}'),
        ("an entry without held", '{"version":1,"peers":[' + entry().replace(',"held":false', "") + "]}"),
        ("held not a boolean", f'{{"version":1,"peers":[{entry(held="0")}]}}'),
        ("fingerprint not normalised (lower-case hex)", f'{{"version":1,"peers":[{entry(fp=FP_1.lower())}]}}'),
        ("fingerprint of a weak algorithm", f'{{"version":1,"peers":[{entry(fp="sha-1 AA:BB")}]}}'),
        ("key of 42 characters", f'{{"version":1,"peers":[{entry(key=k12[:-1])}]}}'),
        ("key not canonical (last character)", f'{{"version":1,"peers":[{entry(key=k12[:-1] + "B")}]}}'),
        ("peer id with a space", f'{{"version":1,"peers":[{entry(peer="seat 2")}]}}'),
        ("a peer named twice", f'{{"version":1,"peers":[{entry()},{entry()}]}}'),
    ]
    return {
        **build_note_vectors(),
        "seat_key": [
            {"session_secret": s, "session_id": i, "peer": p, "seat_key": b64url_encode(seat_key(_key(s), i, p))}
            for s, i, p in seat_cases
        ],
        "group_key": [
            {"session_secret": s, "session_id": i, "group_key": b64url_encode(group_key(_key(s), i))}
            for s, i in [(SECRET, SESSION), (SECRET_B, SESSION), (SECRET, "s_other")]
        ],
        "client_pair_key": [
            {
                "session_secret": s,
                "session_id": SESSION,
                "a": a,
                "b": b,
                "client_pair_key": b64url_encode(client_pair_key(_key(s), SESSION, a, b)),
            }
            for s, a, b in pair_cases
        ],
        "roster_plaintext": [
            {
                "version": version,
                "peers": [
                    {"peer": e.peer, "fingerprint": e.fingerprint, "key": e.key, "held": e.held} for e in entries
                ],
                "plaintext": plaintext,
            },
            {"version": 0, "peers": [], "plaintext": roster_plaintext(0, [])},
        ],
        "roster": [
            {
                "session_secret": SECRET,
                **header,
                "k_seal_hex": seal_1.hex(),
                "counter": counter,
                "nonce_hex": nonce.hex(),
                "plaintext": plaintext,
                "sealed": sealed,
            }
        ],
        "roster_invalid": [
            {
                "what": "sealed to seat-2, re-addressed to seat-1",
                **header,
                "counter": counter,
                "sealed": to_seat_2,
                "reason": "bad_mac",
            },
            {
                "what": "forged by a client holding only its own seat key",
                **header,
                "counter": counter,
                "sealed": forged,
                "reason": "bad_mac",
            },
            {
                "what": "counter changed by the relay",
                **header,
                "counter": counter + 1,
                "sealed": sealed,
                "reason": "bad_mac",
            },
        ]  # fmt: skip
        + [{"what": what, "plaintext": text, "reason": "malformed"} for what, text in malformed],
    }
