"""Media frames encrypted end to end for the trip through Janus (issue 22; docs/protocol.md 7.12).

Janus forwards every participant's encoded frames to the others, so it must only ever hold
ciphertext. Each frame is sealed in the browser before it leaves, with the structure of SFrame
(RFC 9605): a short header naming the key (KID) and the frame's counter (CTR), then the
AES-GCM ciphertext of the frame with the header as associated data. The cipher suite is
RFC 9605's AES_128_GCM_SHA256_128 (0x0004): HKDF-SHA-256 key schedule, AES-128-GCM, 16-byte tag.

A KID names one sender and one key generation (:func:`kid_for`); each rotation gives every
sender a fresh base key under a new KID. A receiver keeps a :class:`Keyring` and refuses a
counter it has already accepted for that KID (a window of :data:`REPLAY_WINDOW` counters).

``web/js/sframe.js`` is the browser twin; ``tests/vectors/sframe.json`` keeps the two byte for
byte identical, and the recording test uses this module to show recorded frames stay sealed.
Nothing here logs a key or a frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CIPHER_SUITE",
    "ERROR_CODES",
    "MAX_KID_GENERATION",
    "MAX_VALUE",
    "REPLAY_WINDOW",
    "RETIRED_KEY_GRACE_SECONDS",
    "SENDER_SLOTS",
    "VP8_DELTA_CLEAR_BYTES",
    "VP8_KEYFRAME_CLEAR_BYTES",
    "Decrypted",
    "Keyring",
    "SFrameError",
    "SenderKey",
    "decode_header",
    "decrypt_frame",
    "derive_sender_key",
    "encode_header",
    "encrypt_frame",
    "kid_for",
    "kid_parts",
]

#: RFC 9605's registry value for AES_128_GCM_SHA256_128, bound into every derived key.
CIPHER_SUITE: Final = 0x0004
KEY_BYTES: Final = 16
SALT_BYTES: Final = 12
TAG_BYTES: Final = 16
#: Base keys are random; fewer than 16 bytes would be weaker than the AES key they make.
MIN_BASE_KEY_BYTES: Final = 16
MAX_BASE_KEY_BYTES: Final = 64
#: KID and CTR are unsigned 64-bit values: at most 8 bytes after the config byte.
MAX_VALUE: Final = 2**64 - 1
#: Counters a receiver remembers per KID, behind the highest it accepted. A sender's audio and
#: video share one counter, so reordering between them and on the network stays well inside.
REPLAY_WINDOW: Final = 1024
#: How long a receiver keeps a retired KID after a rotation, for frames still in flight.
RETIRED_KEY_GRACE_SECONDS: Final = 5
#: A KID is ``generation * SENDER_SLOTS + slot``: 32 slots hold 16 participants with room to spare.
SENDER_SLOTS: Final = 32
MAX_KID_GENERATION: Final = MAX_VALUE // SENDER_SLOTS
#: Bytes of a VP8 frame left readable (its payload header) so depacketizers see the frame type.
VP8_KEYFRAME_CLEAR_BYTES: Final = 10
VP8_DELTA_CLEAR_BYTES: Final = 3

KEY_LABEL: Final = b"SFrame 1.0 Secret key "
SALT_LABEL: Final = b"SFrame 1.0 Secret salt "
ERROR_CODES: Final = ("unknown_kid", "replayed", "bad_tag", "malformed")


class SFrameError(ValueError):
    """A frame refused, with a stable ``code`` from :data:`ERROR_CODES`."""

    def __init__(self, code: str, detail: str) -> None:
        assert code in ERROR_CODES
        super().__init__(f"{code}: {detail}")
        self.code = code


def _check_value(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VALUE:
        raise SFrameError("malformed", f"{what} must be an integer from 0 to 2**64-1")
    return value


def kid_for(slot: int, generation: int) -> int:
    """The KID of sender ``slot`` (its place in the session's roster) at key ``generation``."""
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < SENDER_SLOTS:
        raise SFrameError("malformed", f"a sender slot is 0 to {SENDER_SLOTS - 1}")
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation <= MAX_KID_GENERATION:
        raise SFrameError("malformed", "a key generation is a non-negative integer that fits a KID")
    return generation * SENDER_SLOTS + slot


def kid_parts(kid: int) -> tuple[int, int]:
    """``(slot, generation)`` of a KID: who sent the frame, under which rotation."""
    _check_value(kid, "a KID")
    return kid % SENDER_SLOTS, kid // SENDER_SLOTS


def _field(value: int) -> tuple[int, bytes]:
    """A value's config-byte nibble and its trailing bytes: below 8 in the nibble, else extended."""
    if value < 8:
        return value, b""
    length = (value.bit_length() + 7) // 8
    return 0x8 | (length - 1), value.to_bytes(length, "big")


def encode_header(kid: int, counter: int) -> bytes:
    """The SFrame header: config byte ``X|K|Y|C`` then the extended KID and CTR, shortest form."""
    kid_nibble, kid_bytes = _field(_check_value(kid, "a KID"))
    ctr_nibble, ctr_bytes = _field(_check_value(counter, "a counter"))
    return bytes([(kid_nibble << 4) | ctr_nibble]) + kid_bytes + ctr_bytes


def _read(nibble: int, data: bytes, at: int, what: str) -> tuple[int, int]:
    if not nibble & 0x8:
        return nibble, at
    length = (nibble & 0x7) + 1
    raw = data[at : at + length]
    if len(raw) != length:
        raise SFrameError("malformed", f"the header is cut short inside the {what}")
    value = int.from_bytes(raw, "big")
    if value < 8 or raw[0] == 0:
        raise SFrameError("malformed", f"the {what} is not in its shortest encoding")
    return value, at + length


def decode_header(data: bytes) -> tuple[int, int, int]:
    """``(kid, counter, header_length)`` from the start of ``data``; only shortest encodings pass."""
    if not data:
        raise SFrameError("malformed", "an empty frame has no header")
    config = data[0]
    kid, at = _read(config >> 4, data, 1, "KID")
    counter, at = _read(config & 0xF, data, at, "counter")
    return kid, counter, at


@dataclass(frozen=True)
class SenderKey:
    """One sender's AES key and nonce salt under one KID (never printed: repr hides both)."""

    kid: int
    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)


def _expand(secret: bytes, label: bytes, kid: int, length: int) -> bytes:
    info = label + kid.to_bytes(8, "big") + CIPHER_SUITE.to_bytes(2, "big")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def derive_sender_key(base_key: bytes, kid: int) -> SenderKey:
    """The key and salt a sender's base key gives under ``kid`` (RFC 9605's key schedule).

    HKDF-SHA-256 with an empty salt, once with the key label and once with the salt label, each
    followed by the KID (8 bytes) and the cipher suite (2 bytes), big-endian: a base key reused
    under another KID still yields unrelated keys.
    """
    if not isinstance(base_key, bytes) or not MIN_BASE_KEY_BYTES <= len(base_key) <= MAX_BASE_KEY_BYTES:
        raise SFrameError("malformed", f"a base key is {MIN_BASE_KEY_BYTES} to {MAX_BASE_KEY_BYTES} bytes")
    _check_value(kid, "a KID")
    return SenderKey(kid, _expand(base_key, KEY_LABEL, kid, KEY_BYTES), _expand(base_key, SALT_LABEL, kid, SALT_BYTES))


def _nonce(salt: bytes, counter: int) -> bytes:
    return (int.from_bytes(salt, "big") ^ counter).to_bytes(SALT_BYTES, "big")


def _check_clear(clear_bytes: int, available: int) -> int:
    if isinstance(clear_bytes, bool) or not isinstance(clear_bytes, int) or clear_bytes < 0:
        raise SFrameError("malformed", "clear_bytes is a non-negative integer")
    if clear_bytes > available:
        raise SFrameError("malformed", "the frame is shorter than its clear prefix")
    return clear_bytes


def encrypt_frame(key: SenderKey, counter: int, frame: bytes, clear_bytes: int = 0) -> bytes:
    """``prefix || header || AES-GCM(rest, aad = header || prefix)``.

    ``prefix`` is the first ``clear_bytes`` of the frame (0 for audio, the VP8 payload header for
    VP8: :data:`VP8_KEYFRAME_CLEAR_BYTES` or :data:`VP8_DELTA_CLEAR_BYTES`); it stays readable
    but is authenticated, as RFC 9605's "metadata". The caller never reuses a counter under a KID.
    """
    header = encode_header(key.kid, counter)
    cut = _check_clear(clear_bytes, len(frame))
    prefix = bytes(frame[:cut])
    sealed = AESGCM(key.key).encrypt(_nonce(key.salt, counter), bytes(frame[cut:]), header + prefix)
    return prefix + header + sealed


@dataclass(frozen=True)
class Decrypted:
    """A frame that passed: who sent it (KID), its counter and the plaintext."""

    kid: int
    counter: int
    frame: bytes = field(repr=False)


@dataclass
class _Received:
    key: SenderKey
    highest: int = -1
    #: Bit ``i`` set: counter ``highest - i`` was accepted.
    seen: int = 0

    def refuses(self, counter: int) -> bool:
        if counter > self.highest:
            return False
        behind = self.highest - counter
        return behind >= REPLAY_WINDOW or bool(self.seen >> behind & 1)

    def accept(self, counter: int) -> None:
        if counter > self.highest:
            ahead = counter - self.highest
            self.seen = 1 if ahead >= REPLAY_WINDOW else ((self.seen << ahead) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = counter
        else:
            self.seen |= 1 << (self.highest - counter)


class Keyring:
    """The keys a receiver holds, by KID, each with its replay window."""

    def __init__(self) -> None:
        self._keys: dict[int, _Received] = {}

    def add(self, key: SenderKey) -> None:
        """Hold ``key``; re-adding the same KID keeps its window only if the key is the same."""
        held = self._keys.get(key.kid)
        if held is None or held.key != key:
            self._keys[key.kid] = _Received(key)

    def drop(self, kid: int) -> None:
        """Forget a KID (a retired generation after its grace period); its frames become unknown_kid."""
        self._keys.pop(kid, None)

    def kids(self) -> frozenset[int]:
        return frozenset(self._keys)

    def open(self, data: bytes, clear_bytes: int = 0) -> Decrypted:
        """Open one frame: malformed, unknown_kid, replayed or bad_tag, in that order of checks.

        A counter is remembered only once its frame authenticates, so forged frames cannot burn
        counters a real frame will need.
        """
        data = bytes(data)
        cut = _check_clear(clear_bytes, len(data))
        prefix, rest = data[:cut], data[cut:]
        kid, counter, length = decode_header(rest)
        if len(rest) < length + TAG_BYTES:
            raise SFrameError("malformed", "the frame is too short to hold its tag")
        held = self._keys.get(kid)
        if held is None:
            raise SFrameError("unknown_kid", "no key is held for this KID")
        if held.refuses(counter):
            raise SFrameError("replayed", "this counter was already accepted or is outside the window")
        header = rest[:length]
        try:
            frame = AESGCM(held.key.key).decrypt(_nonce(held.key.salt, counter), rest[length:], header + prefix)
        except InvalidTag:
            raise SFrameError("bad_tag", "the frame does not authenticate under this KID's key") from None
        held.accept(counter)
        return Decrypted(kid, counter, prefix + frame)


def decrypt_frame(keyring: Keyring, data: bytes, clear_bytes: int = 0) -> Decrypted:
    """Open one frame with the keys ``keyring`` holds (see :meth:`Keyring.open`)."""
    return keyring.open(data, clear_bytes)
