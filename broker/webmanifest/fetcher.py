"""Fetching from a broker as a browser does: a browser's User-Agent and request headers for each
kind of resource, no Referer (as the pages send none), compression accepted, no cookies kept or sent, redirects not followed (each one
is reported), so that a broker cannot tell the monitor from a person by how it asks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

#: A current Chromium on Linux, as people's browsers send it.
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"

#: What a browser sends for each destination (Fetch's ``Sec-Fetch-*`` and ``Accept``).
_KIND_HEADERS: dict[str, dict[str, str]] = {
    "document": {
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
        "Sec-Fetch-Dest": "document",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Site": "none",
        "Sec-Fetch-User": "?1",
        "Upgrade-Insecure-Requests": "1",
    },
    "script": {"Accept": "*/*", "Sec-Fetch-Dest": "script", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"},
    "style": {
        "Accept": "text/css,*/*;q=0.1",
        "Sec-Fetch-Dest": "style",
        "Sec-Fetch-Mode": "no-cors",
        "Sec-Fetch-Site": "same-origin",
    },
    "image": {
        "Accept": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
        "Sec-Fetch-Dest": "image",
        "Sec-Fetch-Mode": "no-cors",
        "Sec-Fetch-Site": "same-origin",
    },
    "json": {"Accept": "*/*", "Sec-Fetch-Dest": "empty", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"},
}


@dataclass
class Fetched:
    url: str
    status: int
    #: Every value of each header, by its name in lower case (a header sent twice shows as two).
    headers: dict[str, list[str]]
    body: bytes
    #: Where a redirect points (None when the answer is not a redirect).
    location: str | None


class BrowserFetch:
    """One monitor run's HTTP client (use as ``async with``)."""

    def __init__(self, base_url: str, timeout_s: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BrowserFetch:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeout,
            headers={
                "User-Agent": USER_AGENT,
                "Accept-Language": "en-US,en;q=0.9",
                "Accept-Encoding": "gzip, deflate",
            },
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    async def get(self, path: str, kind: str) -> Fetched:
        """One GET of ``path`` (or an absolute URL) as a browser fetches a resource of ``kind``."""
        assert self._session is not None, "use BrowserFetch as an async context manager"
        url = self.url(path)
        async with self._session.get(url, headers=_KIND_HEADERS[kind], allow_redirects=False) as response:
            body = await response.read()
            headers: dict[str, list[str]] = {}
            for name, value in response.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            return Fetched(
                url=url,
                status=response.status,
                headers=headers,
                body=body,
                location=response.headers.get("Location") if 300 <= response.status < 400 else None,
            )
