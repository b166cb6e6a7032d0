"""Logging that keeps nothing personal: event types and opaque ids only.

Our own log lines carry no tokens, keys, SDP, names or addresses by
construction. Third-party WebRTC libraries (aioice, aiortc) log candidate
addresses at INFO, so they are raised to WARNING, and every record passes a
filter that redacts anything shaped like an IP address as a second line of
defence.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
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


def configure(level: str = "info", stream: TextIO = sys.stderr) -> logging.Handler:
    """Set up the process's logging once: one handler, redaction, quiet WebRTC libraries."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactAddresses())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
