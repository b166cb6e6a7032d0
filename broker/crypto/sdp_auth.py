"""Authenticated offers and answers, and the DTLS fingerprints they commit to (docs/protocol.md 7.2, 7.3).

The broker relays offers and answers but must never be able to swap a DTLS fingerprint,
inject a participant or replay an old message unnoticed. Each offer/answer carries an HMAC
over a canonical encoding of everything the broker could alter, keyed per peer pair from the
link key, with a strictly increasing counter. Without the link key, the safety code (9 digits
from both DTLS fingerprints, compared aloud) authenticates the call instead. ``InterceptionError``
and its stable reasons say why a receiver refused a message, clear or sealed.

``web/js/e2ee.js`` implements the same functions for the browser; the shared vectors in
``tests/vectors/e2ee.json`` keep the two byte-for-byte identical. Nothing here logs an SDP.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from broker.crypto.link_key import b64url_decode, b64url_encode, hmac_sha256, lp, pair_key, u64

__all__ = [
    "FINGERPRINT_ALGORITHMS",
    "REASONS",
    "SDP_TYPES",
    "InterceptionError",
    "Trust",
    "canonical",
    "fingerprint_of",
    "normalise_fingerprint",
    "safety_code",
    "sign_sdp",
    "verify_sdp",
]

SDP_TYPES: Final = frozenset({"offer", "answer"})

SDP_LABEL: Final = "tt-sdp v1"
SAS_LABEL: Final = "tt-sas v1"

# Why a receiver refused an offer/answer.  Stable strings: the UI maps them to
# the interception warning and docs/protocol.md lists them.
REASONS: Final = frozenset(
    {
        "missing_mac",  # we hold the link key but the message carried no MAC
        "bad_mac",  # MAC does not match, or a sealed message does not open (altered, or wrong key)
        "replayed_counter",  # counter not greater than the last one accepted from this sender
        "malformed",  # wrong type, counter out of range, message addressed from ourselves
        "missing_fingerprint",  # SDP has no usable a=fingerprint line
        "fingerprint_mismatch",  # SDP lines disagree, or DTLS saw another certificate
    }
)

# Digest sizes of the hash functions accepted in a=fingerprint, in order of
# preference for the safety code.  Weaker ones (sha-1, md5) are not used.
FINGERPRINT_ALGORITHMS: Final = {"sha-256": 32, "sha-384": 48, "sha-512": 64}

_FINGERPRINT_PREFIX: Final = "a=fingerprint:"
_HEX_PAIR_RE: Final = re.compile(r"[0-9A-Fa-f]{2}")
_ALG_RE: Final = re.compile(r"[A-Za-z0-9-]+")
# Only ASCII blanks count, so Python and JS split SDP and fingerprints identically.
_BLANKS: Final = " \t"
_BLANK_RUN_RE: Final = re.compile(r"[ \t]+")


class InterceptionError(Exception):
    """A relayed offer/answer failed authentication: someone may be in the middle."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown interception reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Trust(enum.StrEnum):
    """How far a peer's offer/answer is authenticated; the UI shows this to people."""

    VERIFIED_BY_LINK = "verified_by_link"  # MAC checked with the link key
    UNVERIFIED = "unverified"  # no link key on one side: compare the safety code


# -- authenticated SDP -------------------------------------------------------------


def canonical(session_id: str, sender: str, recipient: str, sdp_type: str, counter: int, sdp: str) -> bytes:
    """The exact bytes a MAC covers: everything the broker could alter or replay."""
    if sdp_type not in SDP_TYPES:
        raise ValueError("type must be 'offer' or 'answer'")
    return b"".join(
        (
            lp(SDP_LABEL),
            lp(session_id),
            lp(sender),
            lp(recipient),
            lp(sdp_type),
            u64(counter),
            lp(sdp),
        )
    )


def sign_sdp(
    k_auth: bytes,
    session_id: str,
    sender: str,
    recipient: str,
    sdp_type: str,
    counter: int,
    sdp: str,
) -> str:
    """The MAC (base64url) of one offer/answer from sender to recipient."""
    data = canonical(session_id, sender, recipient, sdp_type, counter, sdp)
    return b64url_encode(hmac_sha256(pair_key(k_auth, sender, recipient), data))


def verify_sdp(
    k_auth: bytes,
    session_id: str,
    sender: str,
    recipient: str,
    sdp_type: str,
    counter: int,
    sdp: str,
    mac: str | None,
) -> None:
    """Constant-time MAC check; raises InterceptionError("missing_mac" | "bad_mac")."""
    if mac is None or mac == "":
        raise InterceptionError("missing_mac")
    try:
        tag = b64url_decode(mac)
    except ValueError:
        raise InterceptionError("bad_mac", "not base64url") from None
    data = canonical(session_id, sender, recipient, sdp_type, counter, sdp)
    check = crypto_hmac.HMAC(pair_key(k_auth, sender, recipient), hashes.SHA256())
    check.update(data)
    try:
        check.verify(tag)
    except InvalidSignature:
        raise InterceptionError("bad_mac") from None


# -- DTLS fingerprints and safety code -------------------------------------------------


def normalise_fingerprint(value: str) -> str:
    """'<alg> <hex>' -> '<alg lowercase> <HEX:UPPER:WITH:COLONS>'; ValueError if malformed."""
    parts = _BLANK_RUN_RE.split(value.strip(_BLANKS)) if isinstance(value, str) else []
    if len(parts) != 2 or not _ALG_RE.fullmatch(parts[0]):
        raise ValueError("fingerprint must be '<algorithm> <hex>'")
    alg, hexpart = parts[0].lower(), parts[1]
    pairs = hexpart.split(":")
    if not all(_HEX_PAIR_RE.fullmatch(p) for p in pairs):
        raise ValueError("fingerprint must be colon-separated pairs of hex digits")
    size = FINGERPRINT_ALGORITHMS.get(alg)
    if size is not None and len(pairs) != size:
        raise ValueError(f"{alg} fingerprint must have {size} bytes")
    return f"{alg} {':'.join(p.upper() for p in pairs)}"


def fingerprint_of(sdp: str) -> str:
    """The normalised DTLS fingerprint the SDP commits to.

    Every ``a=fingerprint`` line (session or media level) is read.  All lines of
    one algorithm must agree; the result uses the first of sha-256, sha-384,
    sha-512 present (aiortc lists all three for one certificate).  Raises
    InterceptionError("missing_fingerprint" | "fingerprint_mismatch").
    """
    seen: dict[str, str] = {}
    for line in sdp.split("\n"):
        line = line.strip(_BLANKS + "\r")
        if line[: len(_FINGERPRINT_PREFIX)].lower() != _FINGERPRINT_PREFIX:
            continue
        try:
            fp = normalise_fingerprint(line[len(_FINGERPRINT_PREFIX) :])
        except ValueError as exc:
            raise InterceptionError("fingerprint_mismatch", str(exc)) from None
        alg = fp.split(" ", 1)[0]
        if seen.setdefault(alg, fp) != fp:
            raise InterceptionError("fingerprint_mismatch", f"two different {alg} fingerprints")
    for alg in FINGERPRINT_ALGORITHMS:
        if alg in seen:
            return seen[alg]
    raise InterceptionError("missing_fingerprint")


def safety_code(session_id: str, fp_a: str, fp_b: str) -> str:
    """The 9-digit code both sides read aloud ('123 456 789'); order of fp_a/fp_b is irrelevant."""
    lo, hi = sorted((normalise_fingerprint(fp_a), normalise_fingerprint(fp_b)))
    digest = hashlib.sha256(lp(SAS_LABEL) + lp(session_id) + lp(lo) + lp(hi)).digest()
    digits = f"{int.from_bytes(digest[:8], 'big') % 10**9:09d}"
    return f"{digits[0:3]} {digits[3:6]} {digits[6:9]}"
