"""Janus cannot see the session: its own recording of a room holds only sealed frames (issue 22,
point 4; docs/security.md 3.11).

A Chromium page publishes the fake camera (VP8, 320x240) and microphone (Opus), sealed by
web/js/frame_crypto.js, into a session's room of a real Janus (tests/janus_server.py) with the
credentials a real broker granted. The test then does what a compromised Janus operator can: it
turns on the VideoRoom's recording of the room with the room's secret (``enable_recording``), lets
it record, and reads what Janus wrote, with Janus's own tool (``janus-pp-rec``) and with
tests/janus/mjr.py (the .mjr packets, rebuilt into whole frames).

What "does not decode" means here: every recorded frame carries the 7.12 header with the
publisher's KID and refuses to open without its key (``unknown_kid``) or with another key
(``bad_tag``); and PyAV's VP8 decoder (libavcodec) gives no *correct* picture from the sealed
frames. A picture is correct if its luma is within :data:`CORRECT_PSNR_DB` of the picture the same
frame decodes to once opened with the publisher's key (broker/crypto/sframe.py): the frame's own
picture is identical (infinite PSNR), while two consecutive frames of the fake camera are about
18 dB apart and a black picture 14 dB from any of them, so only the camera's own picture passes.
The control: the opened frames decode into 320x240 pictures, at least :data:`MIN_FRAMES` of them.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import av
import pytest

from broker.crypto.sframe import (
    VP8_DELTA_CLEAR_BYTES,
    VP8_KEYFRAME_CLEAR_BYTES,
    Keyring,
    SFrameError,
    decode_header,
    derive_sender_key,
    kid_for,
)
from broker.janus.rooms import JanusRooms, RoomKeys
from tests.browser.conftest import NewContext
from tests.browser.kit import until
from tests.browser.test_janus_room import KEY, SENDER, call, close, participant, therapist_seat
from tests.conftest import RunningBroker
from tests.janus.broker_fixture import with_janus  # noqa: F401 - the fixture
from tests.janus.mjr import opus_frames, read_mjr, vp8_frames, with_header
from tests.janus_server import JanusServer, janus_server  # noqa: F401 - the fixture

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: The harness's camera (tests/browser/janus_room_harness.js publishes 320x240).
SIZE = (320, 240)
#: Frames the recording must hold, opened and decoded (about 4 s at the harness's 15 fps, with room
#: for a loaded machine's lower rate and for the frames before the first key frame).
MIN_FRAMES = 30
#: Frames encoded while recording before it is turned off.
RECORD_FRAMES = 60
#: A decoded picture this close to the frame's true picture (luma PSNR) is that picture.
CORRECT_PSNR_DB = 30.0
OTHER_KEY = "ff" * 16


async def recording(rooms: JanusRooms, keys: RoomKeys, on: bool) -> None:
    """Turn the room's recording on or off: the VideoRoom's own request, with the room secret."""
    async with rooms.client.videoroom() as handle:
        answer = await handle.request(
            {"request": "enable_recording", "room": keys.room, "secret": keys.secret, "record": on}
        )
    assert answer == {"videoroom": "success", "record": on}, answer


def keyring(hex_key: str) -> Keyring:
    ring = Keyring()
    ring.add(derive_sender_key(bytes.fromhex(hex_key), kid_for(**SENDER)))
    return ring


def vp8_clear_bytes(frame: bytes) -> int:
    """7.12's clear prefix of a VP8 frame: its frame tag's bit 0 is 0 on a key frame."""
    return VP8_DELTA_CLEAR_BYTES if frame[0] & 1 else VP8_KEYFRAME_CLEAR_BYTES


def refusal(ring: Keyring, frame: bytes, clear_bytes: int) -> str | None:
    try:
        ring.open(frame, clear_bytes)
    except SFrameError as exc:
        return exc.code
    return None


def luma(picture: av.VideoFrame) -> bytes:
    """The picture's grey levels, row after row (its Y plane without the rows' padding)."""
    grey = picture.reformat(format="gray")
    plane = grey.planes[0]
    raw = bytes(plane)
    return b"".join(raw[row * plane.line_size : row * plane.line_size + grey.width] for row in range(grey.height))


def is_correct(picture: av.VideoFrame, truth: bytes) -> bool:
    """Whether ``picture`` is the true picture: same size, luma within :data:`CORRECT_PSNR_DB`."""
    seen = luma(picture)
    if len(seen) != len(truth):
        return False
    squared = sum((a - b) * (a - b) for a, b in zip(seen, truth, strict=True)) / len(truth)
    return squared == 0 or 10 * math.log10(255 * 255 / squared) >= CORRECT_PSNR_DB


def decode_each(frames: list[bytes]) -> tuple[dict[int, av.VideoFrame], int]:
    """Each frame through one VP8 decoder, in order: the picture each gave, and how many it refused."""
    decoder = av.CodecContext.create("vp8", "r")
    pictures: dict[int, av.VideoFrame] = {}
    refused = 0
    for index, frame in enumerate(frames):
        try:
            out = decoder.decode(av.Packet(frame))
        except av.FFmpegError:
            refused += 1
            continue
        if out:
            pictures[index] = out[-1]
    return pictures, refused


def decode_file(path: Path) -> list[tuple[bytes, av.VideoFrame]]:
    """Each picture PyAV decodes from a media file's video, with the packet that gave it."""
    pictures: list[tuple[bytes, av.VideoFrame]] = []
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            data = bytes(packet)
            try:
                pictures.extend((data, picture) for picture in packet.decode())
            except av.FFmpegError:
                continue
    return pictures


def pp_rec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["janus-pp-rec", "-o", *args], capture_output=True, text=True, timeout=60, check=False)


async def test_janus_own_recording_of_a_room_holds_only_frames_that_do_not_decode_without_the_keys(
    with_janus: RunningBroker,
    new_context: NewContext,
    janus_server: JanusServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    rooms = with_janus.hub.media.rooms
    assert rooms is not None
    links, therapist = await therapist_seat(with_janus)
    keys = rooms.keys(links.session)
    assert keys.room == therapist.granted.room
    try:
        page = await participant(new_context, with_janus)
        await call(page, "setSendKey", KEY, SENDER)
        joined = await call(page, "join", therapist.credentials, therapist.peer_id)
        assert await call(page, "publish") == {"ok": True}
        sent = await until(lambda: call(page, "outbound"), lambda o: o["framesEncoded"] >= 15, "video is sent")
        await recording(rooms, keys, True)
        await until(
            lambda: call(page, "outbound"),
            lambda o: o["framesEncoded"] >= sent["framesEncoded"] + RECORD_FRAMES,
            "video is sent while recording",
        )
        await recording(rooms, keys, False)  # Janus closes its recorders: the files are complete
        assert (await call(page, "seen"))["failed"] == [], "the sender never bypassed its transform"
        assert await call(page, "leave") is True
    finally:
        await close(therapist)

    # Janus's files for this publisher in this room (Janus writes them in its working directory).
    recorded = sorted(janus_server.workdir.glob(f"videoroom-{keys.room}-user-{joined['feed']}-*.mjr"))
    videos = [p for p in recorded if "-video-" in p.name]
    audios = [p for p in recorded if "-audio-" in p.name]
    assert len(videos) == len(audios) == 1 and len(recorded) == 2, [p.name for p in recorded]
    video_file, audio_file = videos[0], audios[0]

    # Janus's own tool reads them: VP8 and Opus, marked end-to-end encrypted (the room's require_e2ee).
    for path, codec in ((video_file, "vp8"), (audio_file, "opus")):
        listed = pp_rec("--json", str(path))
        assert listed.returncode == 0, listed.stderr
        header = json.loads(listed.stdout)
        assert header["c"] == codec and header["e"] is True, header
        assert pp_rec("--parse", str(path)).returncode == 0
    refused = pp_rec(str(video_file), str(tmp_path / "as-recorded.webm"))
    assert refused.returncode != 0 and not (tmp_path / "as-recorded.webm").exists(), "pp-rec converts e2ee media"

    # The frames as Janus stored them.
    video = read_mjr(video_file)
    assert video.header == json.loads(pp_rec("--json", str(video_file)).stdout)
    frames = vp8_frames(video.packets)
    audio_frames = opus_frames(read_mjr(audio_file).packets)
    assert len(frames) >= MIN_FRAMES and len(audio_frames) >= MIN_FRAMES, (len(frames), len(audio_frames))

    # Every frame carries 7.12's header under the publisher's KID, with a counter of its own (audio
    # and video share the sender's counter), and opens neither without the key nor with another.
    counters: list[int] = []
    for frame, clear in [(f, vp8_clear_bytes(f)) for f in frames] + [(f, 0) for f in audio_frames]:
        kid, counter, _ = decode_header(frame[clear:])
        assert kid == kid_for(**SENDER), kid
        counters.append(counter)
        assert refusal(Keyring(), frame, clear) == "unknown_kid"
        assert refusal(keyring(OTHER_KEY), frame, clear) == "bad_tag"
    assert len(set(counters)) == len(counters), "a counter was used twice under one KID"

    # With the publisher's key every frame opens, and the video decodes into the camera's pictures.
    video_ring, audio_ring = keyring(KEY), keyring(KEY)
    opened = [video_ring.open(f, vp8_clear_bytes(f)).frame for f in frames]
    assert all(audio_ring.open(f).frame for f in audio_frames)
    pictures, _ = decode_each(opened)
    assert len(pictures) >= MIN_FRAMES, f"{len(pictures)} pictures from {len(opened)} opened frames"
    assert {(p.width, p.height) for p in pictures.values()} == {SIZE}
    truth = {index: luma(p) for index, p in pictures.items()}

    # Without the key, the decoder makes no correct picture of the sealed frames.
    sealed_pictures, sealed_refused = decode_each(frames)
    correct = [i for i, p in sealed_pictures.items() if i in truth and is_correct(p, truth[i])]
    assert correct == [], f"{len(correct)} sealed frames decoded to the camera's picture"
    assert sealed_refused + len(sealed_pictures) == len(frames)

    # The operator's next move: mark its file as not encrypted, so janus-pp-rec converts it. Its
    # WebM holds the sealed frames as they were, and decodes into no correct picture either.
    unmarked = tmp_path / "unmarked.mjr"
    with_header(video_file, unmarked, e=False)
    webm = tmp_path / "unmarked.webm"
    converted = pp_rec(str(unmarked), str(webm))
    assert converted.returncode == 0 and webm.stat().st_size > 0, converted.stderr
    index_of = {frame: index for index, frame in enumerate(frames)}
    with av.open(str(webm)) as container:
        remuxed = [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]
    assert remuxed and all(data in index_of for data in remuxed), "janus-pp-rec wrote other frames than Janus recorded"
    from_webm = decode_file(webm)
    like_camera = [d for d, p in from_webm if index_of[d] in truth and is_correct(p, truth[index_of[d]])]
    assert like_camera == [], f"{len(like_camera)} of the pictures in janus-pp-rec's WebM are the camera's"
