"""One peer as an outside implementer writes it: a bare WebSocket and JSON objects.

Frames are read in the background into a list, so a check can wait for the one it needs
(an error naming its ``ref``, a relayed offer) while keeping everything else for later, and
the close code is the one in the broker's close frame (what a browser reports).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

Frame = dict[str, Any]

#: The protocol version docs/protocol.md describes.
PROTOCOL = 1


class Unexpected(Exception):
    """The broker did not do what the document says; the message says what happened instead."""


@dataclass(frozen=True)
class Target:
    """The broker under test: its base URL and an origin it allows (section 1)."""

    url: str
    origin: str

    @classmethod
    def of(cls, url: str, origin: str | None = None) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http:// or https:// URL of a broker")
        base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        return cls(base, (origin or f"{parts.scheme}://{parts.netloc}").rstrip("/"))

    @property
    def ws_url(self) -> str:
        return ("ws" + self.url[4:] if self.url.startswith("http") else self.url) + "/ws"


_ids = itertools.count(1)


def new_id(prefix: str = "m") -> str:
    """A fresh message ``id`` (section 5: 1-64 of ``[A-Za-z0-9_-]``)."""
    return f"{prefix}{next(_ids)}"


class Peer:
    """A WebSocket to the broker with every frame it received so far."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.frames: list[Frame] = []
        #: The code of the broker's close frame (or of the drop), once the socket closed.
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, target: Target, **options: Any) -> Peer:
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(target.ws_url, origin=target.origin, max_msg_size=0, **options)
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    try:
                        frame = json.loads(msg.data)
                    except ValueError:
                        frame = {"type": "<not JSON>", "text": msg.data[:200]}
                    self.frames.append(frame if isinstance(frame, dict) else {"type": "<not an object>"})
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    self.frames.append({"type": "<binary frame>"})
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    self.close_code = msg.data
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    self.close_code = self.ws.close_code
                    break
                self._notify()
        finally:
            self.closed.set()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def mark(self) -> int:
        """Where the next frame will be: pass it as ``since`` to look only at what comes after."""
        return len(self.frames)

    async def send(self, **fields: Any) -> None:
        await self.send_text(json.dumps(fields))

    async def send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    def find(self, match: Callable[[Frame], bool], since: int = 0) -> Frame | None:
        return next((f for f in self.frames[since:] if match(f)), None)

    async def wait_for(
        self, match: Callable[[Frame], bool], what: str, *, since: int = 0, timeout: float = 5.0
    ) -> Frame:
        """The first frame from ``since`` on that ``match`` accepts; Unexpected after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.find(match, since)
            if found is not None:
                return found
            if self.closed.is_set():
                raise Unexpected(f"no {what}: the connection closed ({self.close_code}); got {self.summary(since)}")
            left = deadline - loop.time()
            if left <= 0:
                raise Unexpected(f"no {what} within {timeout:g} s; got {self.summary(since)}")
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                pass

    async def wait_type(self, kind: str, *, since: int = 0, timeout: float = 5.0) -> Frame:
        return await self.wait_for(lambda f: f.get("type") == kind, f"`{kind}`", since=since, timeout=timeout)

    async def reply_to(self, ref: str, kinds: tuple[str, ...] = (), *, since: int = 0, timeout: float = 5.0) -> Frame:
        """The ``error`` whose ``ref`` is ``ref``, or the first frame of one of ``kinds``."""
        return await self.wait_for(
            lambda f: (f.get("type") == "error" and f.get("ref") == ref) or f.get("type") in kinds,
            f"answer to {ref}",
            since=since,
            timeout=timeout,
        )

    async def error_code(self, ref: str, *, timeout: float = 5.0) -> str:
        """The code of the error about the message sent with ``id`` ``ref``."""
        error = await self.wait_for(
            lambda f: f.get("type") == "error" and f.get("ref") == ref, f"error with ref {ref}", timeout=timeout
        )
        return str(error.get("code"))

    async def request_error(self, kind: str, **fields: Any) -> str:
        """Send one message with a fresh ``id`` and return the code of the error about it."""
        ref = new_id(kind[:8])
        await self.send(type=kind, id=ref, **fields)
        return await self.error_code(ref)

    async def sync(self, timeout: float = 5.0) -> int:
        """Send a ping and wait for its pong: everything answered at once has come by then."""
        n = next(_ids)
        await self.send(type="ping", n=n)
        await self.wait_for(lambda f: f.get("type") == "pong" and f.get("n") == n, f"pong {n}", timeout=timeout)
        return self.mark()

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            raise Unexpected(f"the connection was not closed within {timeout:g} s") from None
        return self.close_code

    def summary(self, since: int = 0) -> str:
        """What came, for a failure line: types and error codes, never payloads."""
        kinds = [
            f"error:{f.get('code')}" if f.get("type") == "error" else str(f.get("type")) for f in self.frames[since:]
        ]
        return "[" + ", ".join(kinds[-8:]) + "]"

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self.ws.close()
        finally:
            await self.http.close()


async def hello(peer: Peer) -> Frame:
    await peer.send(type="hello", protocol=PROTOCOL, agent="conformance")
    return await peer.wait_type("welcome")


async def join(peer: Peer, token: str, **extra: Any) -> Frame:
    """``hello`` then ``join``; the ``joined`` frame, or Unexpected naming the error."""
    if peer.find(lambda f: f.get("type") == "welcome") is None:
        await hello(peer)
    ref = new_id("join")
    since = peer.mark()
    await peer.send(type="join", token=token, id=ref, **extra)
    reply = await peer.reply_to(ref, ("joined",), since=since)
    if reply["type"] != "joined":
        raise Unexpected(f"join refused with {reply.get('code')}")
    return reply


async def join_reply(peer: Peer, token: str, **extra: Any) -> Frame:
    """``hello`` then a ``join`` that may be refused: the ``joined`` or the ``error`` frame."""
    await hello(peer)
    ref = new_id("join")
    await peer.send(type="join", token=token, id=ref, **extra)
    return await peer.reply_to(ref, ("joined",))


def code_of(frame: Frame) -> str:
    """An error's code, or the frame's type when it is no error."""
    return str(frame.get("code")) if frame.get("type") == "error" else str(frame.get("type"))
