"""Janus's recordings (.mjr) read back, and VP8 frames rebuilt from their RTP packets.

The recording test (tests/browser/test_janus_recording.py) needs the frames exactly as Janus stored
them, to show they are sealed. An .mjr file (Janus's ``record.c``, version ``MJR00002``) is:

    "MJR00002" | u16 length | JSON header ({"t": "v"|"a", "c": codec, ..., "e": end-to-end encrypted})
    then per RTP packet: "MEET" | u32 milliseconds since the start | u16 length | the RTP packet

all big-endian. Packets are in arrival order; :func:`frames` puts them in sequence order, drops
retransmitted duplicates and joins each frame's packets (RFC 7741 for VP8; one packet per frame
for Opus). Janus's own reader is ``janus-pp-rec``; this one exists so the test sees the bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"MJR00002"
PACKET_MARK = b"MEET"


@dataclass(frozen=True)
class RtpPacket:
    sequence: int
    timestamp: int
    marker: bool
    payload_type: int
    payload: bytes


@dataclass(frozen=True)
class Recording:
    header: dict[str, Any]
    packets: list[RtpPacket]


def parse_rtp(data: bytes) -> RtpPacket:
    """One RTP packet (RFC 3550): its header fields and its payload, extensions and padding removed."""
    if len(data) < 12 or data[0] >> 6 != 2:
        raise ValueError("not an RTP packet")
    csrcs = data[0] & 0x0F
    at = 12 + 4 * csrcs
    if data[0] & 0x10:  # a header extension: 2 bytes profile, 2 bytes length in 32-bit words
        (words,) = struct.unpack_from(">H", data, at + 2)
        at += 4 + 4 * words
    end = len(data) - (data[-1] if data[0] & 0x20 else 0)
    if at > end:
        raise ValueError("an RTP packet cut short")
    sequence, timestamp = struct.unpack_from(">HI", data, 2)
    return RtpPacket(sequence, timestamp, bool(data[1] & 0x80), data[1] & 0x7F, bytes(data[at:end]))


def read_mjr(path: Path) -> Recording:
    """The header and every RTP packet of one .mjr file, in the order Janus wrote them."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path.name} is not an MJR00002 recording")
    (length,) = struct.unpack_from(">H", data, len(MAGIC))
    at = len(MAGIC) + 2
    header = json.loads(data[at : at + length])
    at += length
    packets = []
    while at < len(data):
        if data[at : at + 4] != PACKET_MARK or at + 10 > len(data):
            raise ValueError(f"{path.name}: no packet mark at byte {at}")
        (size,) = struct.unpack_from(">H", data, at + 8)
        packets.append(parse_rtp(data[at + 10 : at + 10 + size]))
        at += 10 + size
    return Recording(header, packets)


def in_order(packets: list[RtpPacket]) -> list[RtpPacket]:
    """Packets by sequence number (unwrapped past 65535), each sequence number once."""
    extended: dict[int, RtpPacket] = {}
    last: int | None = None
    for packet in packets:
        if last is None:
            number = packet.sequence
        else:
            delta = (packet.sequence - last) & 0xFFFF
            number = last + (delta if delta < 0x8000 else delta - 0x10000)
        last = number
        extended.setdefault(number, packet)
    return [extended[n] for n in sorted(extended)]


def vp8_payload(payload: bytes) -> tuple[bool, bytes]:
    """``(starts_a_frame, data)`` of one VP8 RTP payload: its payload descriptor (RFC 7741 4.2) removed."""
    first = payload[0]
    at = 1
    if first & 0x80:  # X: the extension byte follows
        ext = payload[at]
        at += 1
        if ext & 0x80:  # I: a picture id of 7 or 15 bits
            at += 2 if payload[at] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            at += 1
        if ext & 0x30:  # T or K: TID/Y/KEYIDX
            at += 1
    starts = bool(first & 0x10) and first & 0x07 == 0  # S set in partition 0
    return starts, payload[at:]


def vp8_frames(packets: list[RtpPacket]) -> list[bytes]:
    """Whole VP8 frames: the packets of one RTP timestamp from a start packet to the marker.

    A frame missing its start, its end or a packet in between is left out (counted by the caller
    as fewer frames): a recording is what arrived, losses included.
    """
    frames: list[bytes] = []
    parts: list[bytes] | None = None
    timestamp = previous = -1
    for packet in in_order(packets):
        if not packet.payload:
            continue
        starts, data = vp8_payload(packet.payload)
        if starts:
            parts, timestamp, previous = [data], packet.timestamp, packet.sequence
        elif parts is not None and packet.timestamp == timestamp and packet.sequence == (previous + 1) & 0xFFFF:
            parts.append(data)
            previous = packet.sequence
        else:
            parts = None
            continue
        if packet.marker and parts is not None:
            frames.append(b"".join(parts))
            parts = None
    return frames


def opus_frames(packets: list[RtpPacket]) -> list[bytes]:
    """Opus frames: one per RTP packet (RFC 7587)."""
    return [p.payload for p in in_order(packets) if p.payload]


def with_header(path: Path, target: Path, **changes: Any) -> None:
    """A copy of a recording whose JSON header has ``changes`` (what an operator can do to its own files)."""
    data = path.read_bytes()
    (length,) = struct.unpack_from(">H", data, len(MAGIC))
    header = json.loads(data[len(MAGIC) + 2 : len(MAGIC) + 2 + length])
    text = json.dumps({**header, **changes}).encode()
    target.write_bytes(MAGIC + struct.pack(">H", len(text)) + text + data[len(MAGIC) + 2 + length :])
