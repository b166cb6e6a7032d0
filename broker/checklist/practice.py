"""The policy file's ``[practice]`` table: the practice's name, and how its client's pages look to
someone else at the client's device (the tab's title) and where the quick exit lands (a page the
practice picks instead of the built-in neutral one; docs/security.md, "The client's device and
the person in the room")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_NAME = 200
MAX_PAGE_TITLE = 80
MAX_EXIT_URL = 2000
KEYS = frozenset({"name", "page_title", "exit_url"})


@dataclass(frozen=True)
class Practice:
    """What ``[practice]`` says; None where it says nothing (the built-in choice applies)."""

    name: str | None = None
    #: The title of every client page (join page, its notices), in place of the neutral default.
    page_title: str | None = None
    #: Where the quick exit sends the client: an absolute https:// address.
    exit_url: str | None = None


def parse_practice(raw: Any, source: str, problems: list[str]) -> Practice:
    """Read ``[practice]``, appending every fault to ``problems`` in plain words."""
    if raw is None:
        return Practice()
    if not isinstance(raw, dict):
        problems.append(f"{source}: [practice] must be a table.")
        return Practice()
    for key in sorted(set(raw) - KEYS):
        problems.append(f"{source}: [practice] has an unknown key {key!r} (known: {', '.join(sorted(KEYS))}).")
    return Practice(
        name=_text(raw.get("name"), "name", MAX_NAME, source, problems),
        page_title=_text(raw.get("page_title"), "page_title", MAX_PAGE_TITLE, source, problems),
        exit_url=_exit_url(raw.get("exit_url"), source, problems),
    )


def _text(value: Any, key: str, limit: int, source: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit or not value.isprintable():
        problems.append(f"{source}: [practice] {key!r} must be a non-empty line of text of at most {limit} characters.")
        return None
    return value.strip()


def _exit_url(value: Any, source: str, problems: list[str]) -> str | None:
    """An absolute https:// address with a host and nothing that could hide another: no user name or
    password, no spaces or control characters. Anything else (``javascript:``, ``http:``, a bare
    path) is refused, since the broker sends the client there."""
    if value is None:
        return None
    refusal = f"{source}: [practice] 'exit_url' must be an https:// address of at most {MAX_EXIT_URL} characters"
    if not isinstance(value, str) or len(value) > MAX_EXIT_URL or not value.isprintable() or " " in value:
        problems.append(refusal + ".")
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        host = None
        parts = None
    if parts is None or parts.scheme != "https" or not host or "@" in parts.netloc:
        problems.append(refusal + f" with a host name and no user name (got {value!r}).")
        return None
    return value
