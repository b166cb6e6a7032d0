"""Logging that keeps nothing personal: event types and opaque ids only.

Our own log lines carry no tokens, keys, SDP, names or addresses by
construction. Third-party WebRTC libraries (aioice, aiortc) log candidate
addresses at INFO, so they are raised to WARNING, and every record passes a
filter that redacts anything shaped like an IP address as a second line of
defence.

Lines are written as text (``time LEVEL logger event=... session=...``) or, for a log
pipeline, as one JSON object per line (``JsonFormatter``): the same handler, the same
filter and the same message, only laid out differently, so that what is never logged
stays unlogged in both formats.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6_CANDIDATE = re.compile(r"[0-9A-Fa-f]*:[0-9A-Fa-f]*:[0-9A-Fa-f:.%]*")


def redact(text: str) -> str:
    """``text`` with every IPv4 and IPv6 address replaced by ``[address]``."""
    text = _IPV4.sub("[address]", text)

    def v6(match: re.Match[str]) -> str:
        try:
            ipaddress.ip_address(match.group(0).split("%")[0])
        except ValueError:
            return match.group(0)
        return "[address]"

    return _IPV6_CANDIDATE.sub(v6, text)


def has_address(text: str) -> bool:
    return redact(text) != text


NOISY = ("aioice", "aiortc", "aiohttp.access")


class RedactAddresses(logging.Filter):
    """Replaces IP addresses in the final message with a placeholder."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg = clean
            record.args = None
        return True


#: The layouts ``configure`` writes (setting ``log_format``); the first is the default.
LOG_FORMATS = ("text", "json")

TEXT_LAYOUT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: Fields every JSON line has; a message's own ``key=value`` pairs never replace them.
RECORD_FIELDS = ("time", "level", "logger", "message", "exception", "stack")

_PAIR_START = re.compile(r"(?:^|(?<=\s))([a-z_][a-z0-9_]*)=")


def message_fields(message: str) -> dict[str, str] | None:
    """The ``key=value`` pairs of a message such as ``event=peer_joined session=s1``, or None.

    A value runs to the next `` key=``, so one holding spaces stays whole. A message that does not
    start with a pair, repeats a key or uses one of ``RECORD_FIELDS`` is free text (None): it is
    then written whole as ``message``, exactly as the text format writes it.
    """
    starts = list(_PAIR_START.finditer(message))
    if not starts or starts[0].start() != 0:
        return None
    fields: dict[str, str] = {}
    for here, following in zip(starts, [*starts[1:], None], strict=True):
        key = here.group(1)
        if key in fields or key in RECORD_FIELDS:
            return None
        end = following.start() if following is not None else len(message)
        fields[key] = message[here.end() : end].rstrip()
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, then the message's pairs.

    Values stay strings, as written in the text line, so a field never changes type between lines.
    A message that is not ``key=value`` pairs goes whole into ``message``; a traceback into
    ``exception``. Nothing else of the record is written, so a line holds no more than its text
    form: the address filter has already run on the message, and JSON escaping keeps a value
    from starting a line of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, str] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        pairs = message_fields(message)
        if pairs is None:
            line["message"] = message
        else:
            line.update(pairs)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for a ``log_format`` of ``LOG_FORMATS``."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_LAYOUT)
    raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure(level: str = "info", stream: TextIO = sys.stderr, log_format: str = "text") -> logging.Handler:
    """Set up the process's logging once: one handler, redaction, quiet WebRTC libraries.

    aiohttp's loggers (the private access log among them) and every other library's propagate to
    this one handler, so they are laid out and filtered like the broker's own lines; so do Python's
    warnings, which would otherwise be written to stderr as lines of their own.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RedactAddresses())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
