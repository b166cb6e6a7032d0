"""End-to-end primitives that keep the broker out of the call (DESIGN.md section 4).

The broker relays offers and answers but must never be able to swap a DTLS
fingerprint, inject a participant or replay an old message unnoticed.  This
module holds the pieces both peers compute for themselves:

* the link key (256 bits, carried only in the invite link's fragment),
* authenticated SDP: an HMAC over a canonical encoding of each offer/answer,
  keyed per peer pair from the link key, with a strictly increasing counter,
* sealed signaling: offers, answers and ICE candidates encrypted (AES-256-GCM)
  with a key per direction of a peer pair, so the broker relays only ciphertext,
* the safety code: a 9-digit code from both DTLS fingerprints that the people
  in the call compare aloud (works even without the link key),
* sealing of the client's emergency details so only the therapist can read them.

``web/js/e2ee.js`` implements the same functions for the browser; the shared
vectors in ``tests/vectors/e2ee.json`` keep the two byte-for-byte identical.
Nothing here logs or stores a key, an SDP or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "LINK_KEY_BYTES",
    "MAX_COUNTER",
    "MAX_SEALED_CHARS",
    "MAX_SEALED_PLAINTEXT",
    "MAX_SEALS_PER_KEY",
    "MIN_SEALED_CHARS",
    "REASONS",
    "SDP_TYPES",
    "SIGNAL_TYPES",
    "DetailsError",
    "InterceptionError",
    "SdpAuthenticator",
    "Trust",
    "b64url_decode",
    "b64url_encode",
    "canonical",
    "decode_link_key",
    "derive_auth_key",
    "derive_details_key",
    "derive_seal_key",
    "fingerprint_of",
    "new_link_key",
    "normalise_fingerprint",
    "open_details",
    "open_signal",
    "pair_key",
    "parse_signal_plaintext",
    "safety_code",
    "seal_aad",
    "seal_details",
    "seal_signal",
    "sign_sdp",
    "signal_plaintext",
    "verify_sdp",
]

LINK_KEY_BYTES: Final = 32
LINK_KEY_CHARS: Final = 43  # base64url without padding of 32 bytes
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
# Counters are unix microseconds; 2**53 - 1 keeps them exact in a JS Number.
MAX_COUNTER: Final = 2**53 - 1
SDP_TYPES: Final = frozenset({"offer", "answer"})
#: What may be sealed end to end: descriptions and trickled ICE candidates.
SIGNAL_TYPES: Final = frozenset({"offer", "answer", "candidate"})
#: Longest SDP a description may carry (the clear form's limit in broker/signaling/protocol.py).
MAX_SDP_CHARS: Final = 48 * 1024
MAX_CANDIDATE_CHARS: Final = 1024
MAX_MID_CHARS: Final = 64
# A sealed field is base64url(nonce || ciphertext || tag). Its longest form keeps a sealed
# frame under the broker's 64 KiB frame limit; its shortest holds a 2-byte plaintext ("{}").
MAX_SEALED_CHARS: Final = 65_000
MIN_SEALED_CHARS: Final = 40
MAX_SEALED_PLAINTEXT: Final = MAX_SEALED_CHARS * 3 // 4 - NONCE_BYTES - TAG_BYTES  # 48,722 bytes
#: Seals one sealer makes under one direction key before refusing. Random 96-bit nonces are
#: safe for 2**32 messages per key (NIST SP 800-38D section 8.3); a session needs a few thousand.
MAX_SEALS_PER_KEY: Final = 2**20

AUTH_INFO: Final = b"sdp-auth v1"
DETAILS_INFO: Final = b"emergency-details v1"
CHECKLIST_INFO: Final = b"checklist-answers v1"
PAIR_LABEL: Final = "pair v1"
SDP_LABEL: Final = "tt-sdp v1"
SEAL_LABEL: Final = "tt-seal v1"
SAS_LABEL: Final = "tt-sas v1"
DETAILS_LABEL: Final = "tt-details v1"
CHECKLIST_LABEL: Final = "tt-checklist v1"

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

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
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


class DetailsError(ValueError):
    """Sealed emergency details could not be opened (tampered, or wrong key/session/seat)."""


class Trust(enum.StrEnum):
    """How far a peer's offer/answer is authenticated; the UI shows this to people."""

    VERIFIED_BY_LINK = "verified_by_link"  # MAC checked with the link key
    UNVERIFIED = "unverified"  # no link key on one side: compare the safety code


# -- encodings -----------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """Base64url without padding: the one text form for keys, MACs and ciphertexts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url-nopad decoding: one text per byte string, nothing lenient."""
    if not isinstance(text, str) or not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url without padding") from exc
    if b64url_encode(data) != text:  # non-zero trailing bits
        raise ValueError("not canonical base64url")
    return data


def _utf8(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value.encode("utf-8")  # strict: lone surrogates raise, as in e2ee.js


def lp(value: str | bytes) -> bytes:
    """Length-prefixed field (4-byte big-endian length) so fields can never run together."""
    data = _utf8(value)
    if len(data) >= 2**32:
        raise ValueError("field too long for a 4-byte length prefix")
    return len(data).to_bytes(4, "big") + data


def u64(n: int) -> bytes:
    """8-byte big-endian unsigned integer."""
    return _check_counter(n).to_bytes(8, "big")


def _check_counter(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_COUNTER:
        raise ValueError(f"counter must be an integer in 0..{MAX_COUNTER}")
    return n


# -- link key --------------------------------------------------------------------


def new_link_key() -> str:
    """A fresh 256-bit link key in its link-fragment form (43 base64url characters)."""
    return b64url_encode(os.urandom(LINK_KEY_BYTES))


def decode_link_key(text: str) -> bytes:
    """The 32 key bytes of a link fragment; ValueError says what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError("link key must be text")
    if len(text) != LINK_KEY_CHARS:
        raise ValueError(
            f"link key must be {LINK_KEY_CHARS} base64url characters, got {len(text)} (was the link cut short?)"
        )
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("link key contains characters outside the base64url alphabet")
    try:
        return b64url_decode(text)
    except ValueError as exc:
        raise ValueError("link key is not canonical base64url") from exc


def _check_link_key(link_key: bytes) -> bytes:
    if not isinstance(link_key, bytes) or len(link_key) != LINK_KEY_BYTES:
        raise ValueError(f"link key must be {LINK_KEY_BYTES} bytes (use decode_link_key)")
    return link_key


def _hkdf(link_key: bytes, session_id: str, info: bytes) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_utf8(session_id), info=info)
    return kdf.derive(_check_link_key(link_key))


def derive_auth_key(link_key: bytes, session_id: str) -> bytes:
    """K_auth: binds every SDP MAC to this link key and this session."""
    return _hkdf(link_key, session_id, AUTH_INFO)


def derive_details_key(link_key: bytes, session_id: str) -> bytes:
    """K_details: a separate key so sealing never shares a key with SDP MACs."""
    return _hkdf(link_key, session_id, DETAILS_INFO)


# -- authenticated SDP -------------------------------------------------------------


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def pair_key(k_auth: bytes, a: str, b: str) -> bytes:
    """K_pair: one key per unordered peer pair, so a group member cannot forge for others' pairs."""
    lo, hi = (a, b) if a <= b else (b, a)  # str order is code-point order
    return _hmac(k_auth, lp(PAIR_LABEL) + lp(lo) + lp(hi))


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
    return b64url_encode(_hmac(pair_key(k_auth, sender, recipient), data))


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


# -- sealed signaling ----------------------------------------------------------------------


def derive_seal_key(k_pair: bytes, sender: str, recipient: str) -> bytes:
    """K_seal(sender -> recipient): both directions share K_pair, so each gets its own key."""
    if not isinstance(k_pair, bytes) or len(k_pair) != 32:
        raise ValueError("K_pair must be 32 bytes")
    info = lp(SEAL_LABEL) + lp(sender) + lp(recipient)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=info).derive(k_pair)


def seal_aad(session_id: str, sender: str, recipient: str, kind: str, counter: int) -> bytes:
    """The associated data of a sealed message: its routing header, which the broker sees."""
    if kind not in SIGNAL_TYPES:
        raise ValueError("type must be 'offer', 'answer' or 'candidate'")
    return b"".join((lp(SEAL_LABEL), lp(session_id), lp(sender), lp(recipient), lp(kind), u64(counter)))


def _text_field(value: object, limit: int, *, nullable: bool) -> bool:
    if value is None:
        return nullable
    return isinstance(value, str) and len(value) <= limit


def _check_signal_fields(kind: str, fields: dict[str, object]) -> None:
    """Raise ValueError unless ``fields`` is exactly the plaintext of a ``kind`` message."""
    if not isinstance(fields, dict):
        raise ValueError("plaintext must be an object")
    if kind in SDP_TYPES:
        if set(fields) != {"sdp"} or not _text_field(fields["sdp"], MAX_SDP_CHARS, nullable=False):
            raise ValueError('a description\'s plaintext is {"sdp": text of at most 48 KiB}')
        return
    if kind != "candidate":
        raise ValueError("type must be 'offer', 'answer' or 'candidate'")
    index = fields.get("sdp_mline_index")
    if (
        set(fields) != {"candidate", "sdp_mid", "sdp_mline_index"}
        or not _text_field(fields["candidate"], MAX_CANDIDATE_CHARS, nullable=False)
        or not _text_field(fields["sdp_mid"], MAX_MID_CHARS, nullable=True)
        or not (index is None or (isinstance(index, int) and not isinstance(index, bool) and 0 <= index <= 255))
    ):
        raise ValueError(
            'a candidate\'s plaintext is {"candidate", "sdp_mid", "sdp_mline_index"}'
            " within the limits of the clear form"
        )


def signal_plaintext(kind: str, fields: dict[str, object]) -> str:
    """The exact plaintext of a sealed message: compact JSON, fields in a fixed order.

    Both implementations write the same text (e2ee.js uses JSON.stringify), so the
    shared vectors can compare ciphertexts; receivers do not depend on the exact form.
    """
    _check_signal_fields(kind, fields)
    order = ("sdp",) if kind in SDP_TYPES else ("candidate", "sdp_mid", "sdp_mline_index")
    for name in order:
        value = fields[name]
        if isinstance(value, str):
            _utf8(value)  # lone surrogates raise here, as in e2ee.js
    return json.dumps({name: fields[name] for name in order}, ensure_ascii=False, separators=(",", ":"))


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_signal_plaintext(kind: str, text: str) -> dict[str, object]:
    """The fields of an opened message; InterceptionError("malformed") if it is not one."""
    try:
        fields: dict[str, object] = json.loads(text, parse_constant=_no_constant)  # NaN, Infinity: not JSON
        _check_signal_fields(kind, fields)
    except (ValueError, RecursionError) as exc:
        raise InterceptionError("malformed", f"sealed plaintext: {exc}") from None
    return fields


def seal_signal(
    k_seal: bytes,
    session_id: str,
    sender: str,
    recipient: str,
    kind: str,
    counter: int,
    plaintext: str,
    *,
    nonce: bytes | None = None,
) -> str:
    """base64url(nonce || AES-256-GCM ciphertext || tag) of one offer, answer or candidate.

    ``nonce`` exists for test vectors only; product code leaves it None (12 random bytes).
    """
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    data = _utf8(plaintext)
    if len(data) > MAX_SEALED_PLAINTEXT:
        raise ValueError(f"plaintext over {MAX_SEALED_PLAINTEXT} bytes cannot be sealed")
    aad = seal_aad(session_id, sender, recipient, kind, counter)
    return b64url_encode(nonce + AESGCM(k_seal).encrypt(nonce, data, aad))


def open_signal(
    k_seal: bytes,
    session_id: str,
    sender: str,
    recipient: str,
    kind: str,
    counter: int,
    sealed: str,
) -> str:
    """The plaintext of a sealed message; InterceptionError("bad_mac") if it does not open."""
    try:
        blob = b64url_decode(sealed)
    except ValueError:
        raise InterceptionError("bad_mac", "sealed field is not base64url") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise InterceptionError("bad_mac", "sealed field is too short")
    aad = seal_aad(session_id, sender, recipient, kind, counter)
    try:
        plain = AESGCM(k_seal).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise InterceptionError("bad_mac") from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise InterceptionError("malformed", "sealed plaintext is not UTF-8") from None


def _now_micros() -> int:
    return time.time_ns() // 1000


class SdpAuthenticator:
    """Signs or seals outgoing and checks or opens incoming signaling for one peer in one session.

    With ``link_key=None`` (a therapist on another device) it still enforces
    counters, but every peer is reported as ``Trust.UNVERIFIED`` and the people
    must compare the safety code; such a peer can neither seal nor open.
    One counter per direction covers everything sent that way: clear offers and
    answers, and sealed offers, answers and candidates.
    """

    def __init__(
        self,
        link_key: bytes | None,
        session_id: str,
        my_peer_id: str,
        *,
        clock: Callable[[], int] = _now_micros,
        seal_limit: int = MAX_SEALS_PER_KEY,
    ) -> None:
        if not 0 < seal_limit <= MAX_SEALS_PER_KEY:
            raise ValueError(f"seal_limit must be in 1..{MAX_SEALS_PER_KEY}")
        self.session_id = session_id
        self.my_peer_id = my_peer_id
        self._k_auth = None if link_key is None else derive_auth_key(link_key, session_id)
        self._clock = clock
        self._seal_limit = seal_limit
        self._last_sent: dict[str, int] = {}
        self._last_accepted: dict[str, int] = {}
        self._seals: dict[str, int] = {}
        self._seal_keys: dict[tuple[str, str], bytes] = {}

    @property
    def has_link_key(self) -> bool:
        """Whether this side can sign, seal, check and open at all."""
        return self._k_auth is not None

    def next_counter(self, recipient: str) -> int:
        """max(last + 1, now in µs): strictly increasing, even across a page reload."""
        counter = max(self._last_sent.get(recipient, 0) + 1, int(self._clock()))
        _check_counter(counter)
        self._last_sent[recipient] = counter
        return counter

    def sign(self, recipient: str, sdp_type: str, sdp: str) -> tuple[int, str | None]:
        """(counter, mac) to send with an offer/answer; mac is None without the link key."""
        if recipient == self.my_peer_id:
            raise ValueError("cannot send an offer/answer to ourselves")
        canonical(self.session_id, self.my_peer_id, recipient, sdp_type, 0, sdp)  # validate
        counter = self.next_counter(recipient)
        if self._k_auth is None:
            return counter, None
        mac = sign_sdp(self._k_auth, self.session_id, self.my_peer_id, recipient, sdp_type, counter, sdp)
        return counter, mac

    def _seal_key(self, sender: str, recipient: str) -> bytes:
        assert self._k_auth is not None
        key = self._seal_keys.get((sender, recipient))
        if key is None:
            key = derive_seal_key(pair_key(self._k_auth, sender, recipient), sender, recipient)
            self._seal_keys[(sender, recipient)] = key
        return key

    def seal(self, recipient: str, kind: str, fields: dict[str, object]) -> tuple[int, str]:
        """(counter, sealed) for an offer, answer or candidate to ``recipient``.

        ValueError without the link key, for bad fields, or once this sealer has used
        the direction key ``seal_limit`` times (a fresh page or client starts again).
        """
        if self._k_auth is None:
            raise ValueError("cannot seal without the link key")
        if recipient == self.my_peer_id:
            raise ValueError("cannot send a message to ourselves")
        plaintext = signal_plaintext(kind, fields)
        if len(plaintext.encode("utf-8")) > MAX_SEALED_PLAINTEXT:
            raise ValueError(f"plaintext over {MAX_SEALED_PLAINTEXT} bytes cannot be sealed")
        seals = self._seals.get(recipient, 0)
        if seals >= self._seal_limit:
            raise ValueError("refusing to seal: this direction key has sealed its limit of messages")
        key = self._seal_key(self.my_peer_id, recipient)
        counter = self.next_counter(recipient)
        self._seals[recipient] = seals + 1
        sealed = seal_signal(key, self.session_id, self.my_peer_id, recipient, kind, counter, plaintext)
        return counter, sealed

    def unseal(self, sender: str, kind: str, counter: int | None, sealed: str) -> dict[str, object]:
        """Open a sealed offer, answer or candidate and return its fields, or raise InterceptionError.

        bad_mac: it does not open (altered, replayed under another header, or not for us);
        replayed_counter: not above the last counter accepted from ``sender``;
        malformed: bad header or plaintext; missing_fingerprint / fingerprint_mismatch:
        as for a clear description. State changes only on success.
        """
        counter = self._check_header(sender, kind, SIGNAL_TYPES, counter)
        if self._k_auth is None:
            raise ValueError("cannot open a sealed message without the link key")
        key = self._seal_key(sender, self.my_peer_id)
        text = open_signal(key, self.session_id, sender, self.my_peer_id, kind, counter, sealed)
        fields = parse_signal_plaintext(kind, text)
        last = self._last_accepted.get(sender)
        if last is not None and counter <= last:
            raise InterceptionError("replayed_counter")
        if kind in SDP_TYPES:
            fingerprint_of(str(fields["sdp"]))
        self._last_accepted[sender] = counter
        return fields

    def verify(
        self,
        sender: str,
        sdp_type: str,
        counter: int | None,
        sdp: str,
        mac: str | None,
        *,
        allow_unverified: bool = False,
    ) -> Trust:
        """Accept a clear offer/answer or raise InterceptionError; state changes only on success.

        ``allow_unverified=True`` lets a peer holding the link key accept a message
        without MAC (the other side has no link key) -- only after the UI has warned
        and asked for the safety code.  A MAC that is present is always checked.
        Wire values go in as received: a missing counter is reported as "malformed".
        """
        if not isinstance(sdp, str):
            raise InterceptionError("malformed", "sender and sdp must be text")
        counter = self._check_header(sender, sdp_type, SDP_TYPES, counter)
        trust = Trust.UNVERIFIED
        if self._k_auth is not None and (mac or not allow_unverified):
            verify_sdp(self._k_auth, self.session_id, sender, self.my_peer_id, sdp_type, counter, sdp, mac)
            trust = Trust.VERIFIED_BY_LINK
        last = self._last_accepted.get(sender)
        if last is not None and counter <= last:
            raise InterceptionError("replayed_counter")
        fingerprint_of(sdp)
        self._last_accepted[sender] = counter
        return trust

    def _check_header(self, sender: str, kind: str, kinds: frozenset[str], counter: int | None) -> int:
        if not isinstance(sender, str):
            raise InterceptionError("malformed", "sender and sdp must be text")
        if sender == self.my_peer_id:
            raise InterceptionError("malformed", "message claims to come from ourselves")
        if kind not in kinds:
            raise InterceptionError("malformed", f"type must be one of {', '.join(sorted(kinds))}")
        if counter is None:
            raise InterceptionError("malformed", "counter missing")
        try:
            return _check_counter(counter)
        except ValueError:
            raise InterceptionError("malformed", "counter out of range") from None


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


# -- sealed for the therapist: emergency details and checklist answers ---------------------


def derive_checklist_key(link_key: bytes, session_id: str) -> bytes:
    """K_checklist: seals the client's answer to every checklist item for the therapist (section 7.4)."""
    return _hkdf(link_key, session_id, CHECKLIST_INFO)


def _for_therapist_aad(label: str, session_id: str, peer_id: str) -> bytes:
    return lp(label) + lp(session_id) + lp(peer_id)


def _seal_for_therapist(key: bytes, aad: bytes, plaintext: str, nonce: bytes | None) -> str:
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, _utf8(plaintext), aad))


def _open_for_therapist(key: bytes, aad: bytes, sealed: str, what: str) -> str:
    try:
        blob = b64url_decode(sealed)
    except ValueError:
        raise DetailsError(f"sealed {what} are not base64url") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise DetailsError(f"sealed {what} are too short")
    try:
        plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DetailsError(
            f"{what} failed authentication: altered in transit, or sealed for another link key, session or seat"
        ) from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise DetailsError(f"{what} are not UTF-8 text") from None


def seal_details(
    link_key: bytes,
    session_id: str,
    peer_id: str,
    plaintext: str,
    *,
    nonce: bytes | None = None,
) -> str:
    """Encrypt the client's emergency details (JSON text) so only the link-key holder reads them.

    ``nonce`` exists for test vectors only; leave it None in product code.
    """
    aad = _for_therapist_aad(DETAILS_LABEL, session_id, peer_id)
    return _seal_for_therapist(derive_details_key(link_key, session_id), aad, plaintext, nonce)


def open_details(link_key: bytes, session_id: str, peer_id: str, sealed: str) -> str:
    """Decrypt sealed details; DetailsError if altered or sealed for another key/session/seat."""
    aad = _for_therapist_aad(DETAILS_LABEL, session_id, peer_id)
    return _open_for_therapist(derive_details_key(link_key, session_id), aad, sealed, "emergency details")


def checklist_plaintext(answers: dict[str, bool]) -> str:
    """The sealed checklist's text: ``{"answers": {item id: boolean}}``, keys sorted, no spaces."""
    if not all(isinstance(k, str) and isinstance(v, bool) for k, v in answers.items()):
        raise ValueError("checklist answers are item ids with true or false")
    return json.dumps({"answers": answers}, sort_keys=True, separators=(",", ":"))


def seal_checklist(
    link_key: bytes,
    session_id: str,
    peer_id: str,
    answers: dict[str, bool],
    *,
    nonce: bytes | None = None,
) -> str:
    """Seal the client's answer to every checklist item for the therapist: the broker checks the
    required items in clear and keeps nothing per item (section 7.4). ``nonce``: vectors only."""
    aad = _for_therapist_aad(CHECKLIST_LABEL, session_id, peer_id)
    return _seal_for_therapist(derive_checklist_key(link_key, session_id), aad, checklist_plaintext(answers), nonce)


def open_checklist(link_key: bytes, session_id: str, peer_id: str, sealed: str) -> dict[str, bool]:
    """The answers a client sealed; DetailsError if altered, sealed for another seat, or malformed."""
    aad = _for_therapist_aad(CHECKLIST_LABEL, session_id, peer_id)
    text = _open_for_therapist(derive_checklist_key(link_key, session_id), aad, sealed, "checklist answers")
    try:
        answers = json.loads(text)["answers"]
    except (ValueError, KeyError, TypeError):
        raise DetailsError("checklist answers are not the expected JSON") from None
    if not isinstance(answers, dict) or not all(isinstance(v, bool) for v in answers.values()):
        raise DetailsError("checklist answers are not the expected JSON")
    return answers
