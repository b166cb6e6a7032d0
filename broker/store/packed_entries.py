"""Resume-buffer entries kept smaller in the embedded store: a sealed message's ciphertext as bytes,
not as its base64url text.

A sealed offer or answer is some 4 KB of base64url (docs/protocol.md 7.7), and the embedded store
keeps the last 128 messages relayed to each seat for as long as the session lasts: a session's
set-up signaling is most of what it holds (issue 32). The text is a quarter larger than the bytes
it encodes, so an entry keeps the message's text around the ciphertext and the ciphertext itself,
and gives back the very bytes it was made from (anything that would not come back byte for byte is
kept as it came).
"""

from __future__ import annotations

import base64
import binascii
import struct

#: Where a sealed message's ciphertext begins. Inside a JSON string every quote is escaped, so this
#: is the field itself; and a packed entry is only kept if it gives back the message exactly anyway.
_SEALED = b'"sealed":"'
#: The first byte of a packed entry: never the first of a JSON message.
_PACKED = b"\x00"
#: After it: the lengths of the text before and after the ciphertext.
_LENGTHS = struct.Struct(">II")
#: Shorter base64url text is kept as it is: what packing saves (a quarter) would not pay for the lengths.
MIN_TEXT = 64


def pack(message: bytes) -> bytes:
    """The entry kept for ``message``: a copy holding no spare room (``unpack`` gives ``message`` back)."""
    start = message.find(_SEALED)
    if start < 0:
        return _as_is(message)
    start += len(_SEALED)
    end = message.find(b'"', start)
    text = message[start:end]
    if end < 0 or len(text) < MIN_TEXT:
        return _as_is(message)
    try:
        raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return _as_is(message)
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != text:  # not canonical: it would not come back as it was
        return _as_is(message)
    head, tail = message[:start], message[end:]
    return b"".join((_PACKED, _LENGTHS.pack(len(head), len(tail)), head, tail, raw))


def unpack(entry: bytes) -> bytes:
    """The message an entry was made from, byte for byte."""
    if not entry.startswith(_PACKED):
        return entry
    head_length, tail_length = _LENGTHS.unpack_from(entry, 1)
    at = 1 + _LENGTHS.size
    head = entry[at : at + head_length]
    tail = entry[at + head_length : at + head_length + tail_length]
    raw = entry[at + head_length + tail_length :]
    return b"".join((head, base64.urlsafe_b64encode(raw).rstrip(b"=") if raw else b"", tail))


def _as_is(message: bytes) -> bytes:
    """A copy without spare room (msgspec's encoders return bytes inside the larger buffer they grew);
    one that could be taken for a packed entry is kept as one with nothing packed."""
    if message.startswith(_PACKED):
        return b"".join((_PACKED, _LENGTHS.pack(len(message), 0), message))
    return bytes(memoryview(message))
