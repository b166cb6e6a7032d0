"""The Janus sizing benchmark's load generator: VideoRoom participants as aiortc peers, in a process of its own.

``janus_sizing.py`` starts ``--workers`` of these processes (``python _janus_load.py``) and drives each
over a pipe: one JSON command a line on its stdin, one JSON reply a line on its stdout. The first
line gives the Janus API's address, the clip to send and this process's participants (each its
room, PIN and token, as the broker grants them: ``broker.janus.rooms.JanusRooms.grant``).

- ``publish``: every participant opens its Janus session with its token, joins as a publisher and
  publishes one VP8 video track marked ``e2ee`` (the room requires it); the reply holds the feeds.
- ``subscribe``: every participant receives every other feed on one subscriber handle and peer
  connection (Janus's multistream subscription), as ``web/js/janus_room.js`` does.
- ``mark`` / ``report``: counters since ``mark`` (frames and RTP packets sent and received).
- ``stop``: leave, close everything, exit.

The sent track replays a pre-encoded clip (``av.Packet`` from a track: the path aiortc's
``MediaPlayer(decode=False)`` uses), so no encoder runs here. aiortc decodes what it receives (it
has no receive-only mode): the clip is a simple picture, cheap to decode, padded to the bitrate
(see ``janus_sizing.py``), and each received track is drained so decoded frames do not pile up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEOROOM = "janus.plugin.videoroom"
KEEPALIVE_S = 20.0
NO_SUCH_FEED = 428


class NoSuchFeed(Exception):
    pass


class ClipTrack(VideoStreamTrack):
    """A video track replaying encoded VP8 frames in a loop at 30 frames a second (no encoding)."""

    def __init__(self, frames: list[bytes]) -> None:
        super().__init__()
        self.frames = frames
        self.sent = 0

    async def recv(self) -> av.Packet:  # type: ignore[override]
        pts, time_base = await self.next_timestamp()
        packet = av.Packet(self.frames[self.sent % len(self.frames)])
        packet.pts = pts
        packet.time_base = Fraction(time_base)
        self.sent += 1
        return packet


class JanusSession:
    """One participant's Janus session over the HTTP API: requests, and events from the long poll."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.id = 0
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "token": self.token, "transaction": body.get("transaction") or secrets.token_hex(8)}
        async with self.http.post(self.url + path, json=body) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
        if answer.get("janus") == "error":
            raise RuntimeError(f"janus error {answer['error']['code']}")
        return answer

    async def create(self) -> None:
        self.id = (await self.post("", {"janus": "create"}))["data"]["id"]
        self.tasks.append(asyncio.ensure_future(self.poll()))
        self.tasks.append(asyncio.ensure_future(self.keepalive()))

    async def attach(self) -> int:
        return int((await self.post(f"/{self.id}", {"janus": "attach", "plugin": VIDEOROOM}))["data"]["id"])

    async def message(
        self, handle: int, body: dict[str, Any], jsep: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A VideoRoom request; its answer (plugin data, JSEP) comes on the long poll or at once."""
        transaction = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[transaction] = future
        request: dict[str, Any] = {"janus": "message", "body": body, "transaction": transaction}
        if jsep is not None:
            request["jsep"] = jsep
        answer = await self.post(f"/{self.id}/{handle}", request)
        if answer.get("janus") == "success":
            self.waiting.pop(transaction, None)
            event = answer
        else:
            event = await asyncio.wait_for(future, 30)
        data = event.get("plugindata", {}).get("data", {})
        if data.get("error_code") == NO_SUCH_FEED:
            raise NoSuchFeed()
        if "error_code" in data:
            raise RuntimeError(f"videoroom error {data['error_code']}")
        return data, event.get("jsep")

    async def poll(self) -> None:
        while True:
            params = {"maxev": "10", "token": self.token}
            try:
                async with self.http.get(f"{self.url}/{self.id}", params=params) as response:
                    events = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                await asyncio.sleep(0.5)
                continue
            for event in events if isinstance(events, list) else [events]:
                future = self.waiting.pop(str(event.get("transaction")), None)
                if future is not None and not future.done() and event.get("janus") == "event":
                    future.set_result(event)

    async def keepalive(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            await self.post(f"/{self.id}", {"janus": "keepalive"})

    async def destroy(self) -> None:
        for task in self.tasks:
            task.cancel()
        try:
            await self.post(f"/{self.id}", {"janus": "destroy"})
        except (aiohttp.ClientError, RuntimeError):
            pass


@dataclass
class Participant:
    room: int
    pin: str
    token: str
    janus: JanusSession
    feed: int = 0
    publisher: RTCPeerConnection | None = None
    track: ClipTrack | None = None
    subscribers: list[RTCPeerConnection] = field(default_factory=list)


class Load:
    def __init__(self, config: dict[str, Any]) -> None:
        self.url: str = config["url"]
        self.frames = [bytes.fromhex(f) for f in json.loads(Path(config["clip"]).read_text())]
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.people = [
            Participant(p["room"], p["pin"], p["token"], JanusSession(self.http, self.url, p["token"]))
            for p in config["participants"]
        ]
        self.frames_received = 0
        self.drains: list[asyncio.Task[None]] = []
        self.mark: dict[str, int] = {}

    def peer(self) -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def publish_one(self, who: Participant) -> None:
        await who.janus.create()
        handle = await who.janus.attach()
        join = {"request": "join", "ptype": "publisher", "room": who.room, "pin": who.pin, "token": who.token}
        data, _ = await who.janus.message(handle, join)
        who.feed = int(data["id"])
        pc = who.publisher = self.peer()
        who.track = ClipTrack(self.frames)
        transceiver = pc.addTransceiver(who.track, direction="sendonly")
        vp8 = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType in ("video/VP8", "video/rtx")]
        transceiver.setCodecPreferences(vp8)
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"type": "offer", "sdp": pc.localDescription.sdp, "trickle": False, "e2ee": True}
        _, jsep = await who.janus.message(handle, {"request": "publish", "video": True, "e2ee": True}, offer)
        if not jsep or jsep.get("type") != "answer":
            raise RuntimeError("janus sent no answer to the publish")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="answer"))
        for _ in range(300):  # Janus offers a feed to subscribers once its media is up
            if pc.connectionState == "connected":
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"publisher not connected: {pc.connectionState}")

    async def subscribe_one(self, who: Participant, feeds: list[int]) -> None:
        handle = await who.janus.attach()
        join = {
            "request": "join",
            "ptype": "subscriber",
            "room": who.room,
            "pin": who.pin,
            "token": who.token,
            "streams": [{"feed": feed} for feed in feeds],
        }
        for _ in range(20):
            try:
                _, jsep = await who.janus.message(handle, join)
                break
            except NoSuchFeed:  # published, but Janus has not seen its media yet
                await asyncio.sleep(0.25)
        else:
            raise RuntimeError(f"feeds {feeds} never all appeared")
        if not jsep or jsep.get("type") != "offer":
            raise RuntimeError("janus sent no offer to the subscriber")
        pc = self.peer()
        who.subscribers.append(pc)
        pc.on("track", self.drain)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = {"type": "answer", "sdp": pc.localDescription.sdp, "trickle": False, "e2ee": True}
        await who.janus.message(handle, {"request": "start"}, answer)

    def drain(self, track: MediaStreamTrack) -> None:
        async def count() -> None:
            try:
                while True:
                    await track.recv()
                    self.frames_received += 1
            except MediaStreamError:
                pass

        self.drains.append(asyncio.ensure_future(count()))

    async def counters(self) -> dict[str, int]:
        sent = sent_bytes = received = 0
        for who in self.people:
            if who.publisher is not None:
                for stat in (await who.publisher.getStats()).values():
                    if stat.type == "outbound-rtp":
                        sent += stat.packetsSent
                        sent_bytes += stat.bytesSent
            for pc in who.subscribers:
                for stat in (await pc.getStats()).values():
                    if stat.type == "inbound-rtp":
                        received += stat.packetsReceived
        return {
            "packets_sent": sent,
            "bytes_sent": sent_bytes,
            "frames_sent": sum(who.track.sent for who in self.people if who.track is not None),
            "packets_received": received,
            "frames_received": self.frames_received,
        }

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "publish":
            await asyncio.gather(*(self.publish_one(who) for who in self.people))
            return {"feeds": [who.feed for who in self.people]}
        if cmd == "subscribe":
            feeds: list[int] = command["feeds"]
            await asyncio.gather(
                *(self.subscribe_one(who, [feed for feed in feeds if feed != who.feed]) for who in self.people)
            )
            received = sum(len(pc.getTransceivers()) for who in self.people for pc in who.subscribers)
            return {"subscriptions": received}
        if cmd == "mark":
            self.mark = await self.counters()
            return {}
        if cmd == "report":
            now = await self.counters()
            return {key: value - self.mark.get(key, 0) for key, value in now.items()}
        raise ValueError(f"unknown command {cmd}")

    async def close(self) -> None:
        for task in self.drains:
            task.cancel()
        for who in self.people:
            for pc in [*who.subscribers, *([who.publisher] if who.publisher else [])]:
                await pc.close()
            if who.janus.id:
                await who.janus.destroy()
        await self.http.close()


async def main() -> None:
    logging.getLogger("aiortc").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    load = Load(json.loads(await reader.readline()))
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            command = json.loads(line)
            if command["cmd"] == "stop":
                break
            try:
                reply = await load.handle(command)
            except Exception as exc:  # reported to the driver, which stops the run with it
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await load.close()


if __name__ == "__main__":
    asyncio.run(main())
