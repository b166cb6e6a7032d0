"""Invite links as the Python client reads them, and the broker URLs they lead to.

The link key travels in the fragment, which a browser never sends: kept here, it stays
with the client (it seals signaling end to end), never in a URL the broker sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class InviteLink:
    base_url: str
    role: str
    token: str
    link_key: str | None


def parse_link(link: str) -> InviteLink:
    """Split ``BASE/j/<token>#<link key>`` (client) or ``BASE/t/...`` (therapist)."""
    parts = urlsplit(link)
    segments = parts.path.rstrip("/").split("/")
    if len(segments) < 3 or segments[-2] not in ("j", "t") or not segments[-1]:
        raise ValueError("not an invite link: expected BASE/j/<token>#<key> or BASE/t/<token>#<key>")
    prefix = "/".join(segments[:-2])
    base = f"{parts.scheme}://{parts.netloc}{prefix}"
    role = "therapist" if segments[-2] == "t" else "client"
    return InviteLink(base, role, segments[-1], parts.fragment or None)


def ws_url(base_url: str) -> str:
    """The broker's signaling WebSocket under ``base_url``."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws"


def origin_of(base_url: str) -> str:
    """The Origin a browser on the broker's pages would send (the broker checks it)."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"
