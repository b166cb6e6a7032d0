"""Commands pipelined on one Redis connection: written as they come, replies matched in order.

The bus's publisher sends everything on one connection so that Redis runs it in this
process's publish order; waiting for each reply before the next command would cost a
round trip per message. This module holds the wire format of those commands (RESP),
the pipe that matches replies to them, and how an error reply becomes ``CommandRefused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from typing import Any, Protocol

from redis import exceptions as redis_errors

from broker.store.base import StoreUnavailable
from broker.store.redis_store import TIMEOUT_S, CommandRefused

log = logging.getLogger("broker.bus_redis")


def resp_command(*args: bytes | str | int) -> bytes:
    """One Redis command in the wire format (RESP): what redis-py's pack_command makes, at a fraction of its cost."""
    return b"*%d\r\n" % len(args) + resp_arguments(args)


def resp_arguments(args: tuple[bytes | str | int, ...]) -> bytes:
    """The arguments of a RESP command, without its count (for commands that share a start)."""
    parts = []
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class Settles(Protocol):
    """What a reply settles, as a future is settled: a command's future, or the bus's batched relays."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, error: BaseException, /) -> None: ...


def fail_all(batch: list[tuple[bytes, Settles]], error: BaseException) -> None:
    """Fail every command of a batch that has no answer yet."""
    for _, done in batch:
        if not done.done():
            done.set_exception(error)


class Pipe:
    """The publisher's own connection: commands written as they come, replies matched in order.

    A reply that does not come within ``TIMEOUT_S`` of its command, or a broken connection,
    fails every command still waiting (StoreUnavailable) and retires the pipe; the next
    command opens a new one. One timer watches the oldest command waiting (not one per
    reply): when it is overdue, the reader is cancelled.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        #: Futures of the commands written and not answered yet, oldest first, with when each was written.
        self.waiting: deque[tuple[float, Settles]] = deque()
        self.broken = False
        #: The task reading replies (``read_replies``), set by whoever starts it.
        self.reader: asyncio.Task[None] | None = None
        #: Armed while commands wait: when the oldest of them would be overdue.
        self._watch: asyncio.TimerHandle | None = None
        self._overdue = False

    async def send(self, batch: list[tuple[bytes, Settles]]) -> None:
        if self.broken or not self.conn.is_connected:  # never let redis-py connect it again under us
            self.broken = True
            raise StoreUnavailable("the publisher's connection is gone")
        now = self.loop.time()
        if self._watch is None:
            self._watch = self.loop.call_at(now + TIMEOUT_S, self._check_overdue)
        self.waiting.extend((now, done) for _, done in batch)  # before writing: replies can come at once
        try:
            await self.conn.send_packed_command([command for command, _ in batch], check_health=False)
        except BaseException:
            self.broken = True  # redis-py has closed it; the reader fails what waits
            raise

    def _check_overdue(self) -> None:
        self._watch = None
        if not self.waiting:
            return
        due = self.waiting[0][0] + TIMEOUT_S
        if due > self.loop.time():
            self._watch = self.loop.call_at(due, self._check_overdue)
        elif self.reader is not None and not self.reader.done():
            self._overdue = True
            self.broken = True
            self.reader.cancel()

    async def read_replies(self) -> None:
        error: BaseException = StoreUnavailable("the publisher's connection was closed")
        try:
            while True:
                try:
                    reply: Any = await self.conn.read_response(timeout=math.inf)
                except redis_errors.ResponseError as exc:  # an error reply fails its own command only
                    reply = refusal(exc)
                    log.warning("event=bus_command_refused reply=%s", reply.code)
                    if reply.code == "NOSCRIPT":
                        self.broken = True  # the script cache was flushed: the next pipe loads it again
                _, done = self.waiting.popleft()
                if not done.done():
                    if isinstance(reply, CommandRefused):
                        done.set_exception(reply)
                    else:
                        done.set_result(reply)
                if self.broken and not self.waiting:
                    return  # retired, and every command it carried has its answer
        except IndexError:
            error = StoreUnavailable("a reply nobody waited for")
        except redis_errors.ConnectionError:
            pass  # closed by Redis or by us: the error above
        except asyncio.CancelledError:
            error = StoreUnavailable("TimeoutError" if self._overdue else "closed")
            if not self._overdue:
                raise
        except Exception as exc:
            error = StoreUnavailable(type(exc).__name__)
        finally:
            self.broken = True
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            waiting, self.waiting = self.waiting, deque()
            for _, done in waiting:
                if not done.done():
                    done.set_exception(error)
            with contextlib.suppress(Exception):
                await self.conn.disconnect(nowait=True)


#: Redis's error codes of the replies redis-py raises as their own classes (it drops the code from
#: the message of these); any other error reply keeps its code as the message's first word.
_ERROR_CODES: tuple[tuple[type[Exception], str], ...] = (
    (redis_errors.NoScriptError, "NOSCRIPT"),
    (redis_errors.ReadOnlyError, "READONLY"),
    (redis_errors.OutOfMemoryError, "OOM"),
    (redis_errors.BusyLoadingError, "LOADING"),
    (redis_errors.NoPermissionError, "NOPERM"),
)


def refusal(error: redis_errors.ResponseError) -> CommandRefused:
    """A pipelined command's error reply as ``CommandRefused``, with Redis's code."""
    for kind, code in _ERROR_CODES:
        if isinstance(error, kind):
            return CommandRefused(f"{code} {error}")
    return CommandRefused(str(error))
