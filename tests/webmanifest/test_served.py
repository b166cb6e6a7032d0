"""What a broker serves is what its manifest lists: the manifest and its signatures at the well-known
address byte for byte, every listed file with its digest, and every response with the manifest's
headers (a real broker, fetched over HTTP)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from broker.webmanifest.integrity import sri
from broker.webmanifest.layout import MANIFEST_FILE, MANIFEST_URL, SIGNATURES_FILE, SIGNATURES_URL
from broker.webmanifest.manifest import acceptable_digests, expected_headers, parse_manifest
from tests.conftest import RunningBroker, schedule, start_broker
from tests.webmanifest.web_copies import WEB, copy_web

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_served_manifest_is_the_shipped_one(broker: RunningBroker) -> None:
    async with aiohttp.ClientSession() as http:
        for url, kept in ((MANIFEST_URL, MANIFEST_FILE), (SIGNATURES_URL, SIGNATURES_FILE)):
            async with http.get(broker.url + url) as response:
                assert response.status == 200 and response.content_type == "application/json"
                assert await response.read() == (WEB / kept).read_bytes()


async def test_every_listed_file_and_page_is_served_as_listed_with_the_manifests_headers(
    broker: RunningBroker,
) -> None:
    manifest = parse_manifest((WEB / MANIFEST_FILE).read_bytes())
    headers = expected_headers(manifest)
    links = await schedule(broker)
    pages = {link.removeprefix(broker.url).split("#")[0] for link in [links.therapist, *links.clients]}
    checked = 0
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for path in [*sorted(manifest["files"]), *sorted(pages), "/j/" + "A" * 68, "/no-such-page", MANIFEST_URL]:
            async with http.get(broker.url + path, allow_redirects=False) as response:
                body = await response.read()
                for name, value in headers.items():
                    assert response.headers.getall(name, []) == [value], f"{path}: {name}"
                if response.status == 303:  # the dashboard without a login
                    assert path == "/dashboard" and response.headers["Location"] == "/login"
                    continue
                if path in manifest["files"]:
                    assert (response.status, sri(body)) == (200, manifest["files"][path]), path
                elif path != MANIFEST_URL:
                    assert sri(body) in acceptable_digests(manifest, path), path
                checked += 1
    assert checked >= len(manifest["files"]) + 4


async def test_a_web_root_without_a_manifest_serves_none(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    (root / MANIFEST_FILE).unlink()
    running = await start_broker(tmp_path / "data", web_root=str(root))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(running.url + MANIFEST_URL) as response:
                assert response.status == 404 and response.content_type == "text/html"
    finally:
        await running.stop()
