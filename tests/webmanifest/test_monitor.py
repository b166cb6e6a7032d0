"""``broker verify-web``: a broker serving one altered byte of a module, a page loading a script the
manifest does not list, an altered notice page, a manifest not signed by the key given: each is
named and the command exits non-zero; the unaltered broker passes. Brokers are real (in this
process, on a copy of web/ where a test changes it); the command runs as a separate process."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from broker.webmanifest.integrity import sri
from broker.webmanifest.monitor import verify_web
from broker.webmanifest.pins import module_files
from broker.webmanifest.release import sign_release
from broker.webmanifest.signing import generate_key
from tests.conftest import RunningBroker, free_port, start_broker
from tests.webmanifest.web_copies import REPO, WEB, copy_web, flip_byte

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def verify_web_command(url: str, *args: str) -> tuple[int, str]:
    """``python -m broker verify-web URL ARGS``: its exit code, and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "verify-web", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    return int(process.returncode or 0), out.decode()


@pytest_asyncio.fixture(loop_scope="session")
async def practice(tmp_path: Path) -> AsyncIterator[tuple[Path, str, Path]]:
    """A practice's own copy of web/, signed with its own key: (web root, public key, data dir)."""
    root = copy_web(tmp_path)
    public = generate_key(tmp_path / "practice.pem")
    sign_release(root, tmp_path / "practice.pem")
    yield root, public, tmp_path


async def test_the_unaltered_broker_passes(broker: RunningBroker) -> None:
    code, out = await verify_web_command(broker.url)
    assert code == 0, out
    assert "OK:" in out and "DIFF" not in out


async def test_one_altered_byte_in_a_module_fails_naming_the_file(practice: tuple[Path, str, Path]) -> None:
    root, public, tmp = practice
    clean = await start_broker(tmp / "clean", web_root=str(root))
    try:
        code, out = await verify_web_command(clean.url, "--key", public)
        assert code == 0 and f"signed by {public}" in out, out
    finally:
        await clean.stop()
    flip_byte(root / "js" / "e2ee.js", 5000)
    patched = await start_broker(tmp / "patched", web_root=str(root))
    try:
        code, out = await verify_web_command(patched.url, "--key", public)
    finally:
        await patched.stop()
    assert code == 1, out
    assert "DIFF /static/js/e2ee.js: served sha384-" in out
    assert "DIFFERS:" in out


async def test_any_altered_module_is_named_and_only_it(practice: tuple[Path, str, Path]) -> None:
    """Each module in turn gets one byte changed on the running broker's disk, as on a host broken into."""
    root, public, tmp = practice
    running = await start_broker(tmp / "data", web_root=str(root))
    try:
        for rel in module_files(root):
            flip_byte(root / rel, 10)
            report = await verify_web(running.url, keys=[public])
            flip_byte(root / rel, 10)
            named = {f.path for f in report.findings}
            assert not report.ok and named == {"/static/" + rel}, (rel, [str(f) for f in report.findings])
        assert (await verify_web(running.url, keys=[public])).ok
    finally:
        await running.stop()


async def test_a_manifest_not_signed_by_the_key_given_fails(practice: tuple[Path, str, Path], tmp_path: Path) -> None:
    root, _, tmp = practice
    other = generate_key(tmp_path / "other.pem")
    running = await start_broker(tmp / "data", web_root=str(root))
    try:
        code, out = await verify_web_command(running.url, "--key", other)
    finally:
        await running.stop()
    assert code == 1 and "carries no valid signature by the key(s) given" in out, out


async def test_a_page_loading_a_script_the_manifest_does_not_list_is_named(practice: tuple[Path, str, Path]) -> None:
    root, public, tmp = practice
    extra = b'document.title = "altered";\n'
    (root / "js" / "extra.js").write_bytes(extra)
    index = root / "index.html"
    index.write_text(
        index.read_text().replace(
            "</head>", f'<script type="module" src="/static/js/extra.js" integrity="{sri(extra)}"></script>\n</head>'
        )
    )
    running = await start_broker(tmp / "data", web_root=str(root))
    try:
        report = await verify_web(running.url, keys=[public])
    finally:
        await running.stop()
    found = [str(f) for f in report.findings]
    assert "DIFF /static/index.html: loads /static/js/extra.js, which the manifest does not list" in found, found
    assert any(f.startswith("DIFF /: served sha384-") for f in found), found


async def test_an_altered_notice_page_is_caught(practice: tuple[Path, str, Path]) -> None:
    root, public, tmp = practice
    template = root / "notice.html"
    template.write_text(template.read_text().replace("<main", '<script src="/static/js/ui.js"></script>\n<main'))
    running = await start_broker(tmp / "data", web_root=str(root))
    try:
        report = await verify_web(running.url, keys=[public])
    finally:
        await running.stop()
    found = [str(f) for f in report.findings]
    assert any(f.startswith("DIFF /j/") and "a link that does not work" in f for f in found), found
    assert any("an address that names nothing" in f for f in found), found
    assert any("loads the script" in f and "without integrity" in f for f in found), found


async def test_a_broker_without_a_manifest_or_out_of_reach_fails(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    (root / "release" / "web-manifest.json").unlink()
    running = await start_broker(tmp_path / "data", web_root=str(root))
    try:
        code, out = await verify_web_command(running.url)
    finally:
        await running.stop()
    assert code == 1 and "no manifest served (status 404)" in out, out
    code, out = await verify_web_command(f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert code == 2 and "Cannot reach" in out, out


async def test_the_monitor_asks_as_a_browser_and_keeps_no_cookie() -> None:
    """A broker cannot tell the monitor by how it asks: a browser's User-Agent and Sec-Fetch
    headers per resource, no Referer, and no cookie sent back even when one is set."""
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        response = web.Response(
            body=(WEB / "release" / "web-manifest.json").read_bytes(), content_type="application/json"
        )
        response.set_cookie("tracker", "1", path="/")
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        report = await verify_web(f"http://127.0.0.1:{port}", local_root=WEB)
    finally:
        await runner.cleanup()
    assert len(seen) > 10 and report.findings  # every file answered with the manifest's bytes: all differ
    assert all(h["User-Agent"].startswith("Mozilla/5.0 (X11; Linux x86_64)") for h in seen)
    assert all("Cookie" not in h and "Referer" not in h for h in seen)
    destinations = {h.get("Sec-Fetch-Dest") for h in seen}
    assert {"document", "script", "style", "image"} <= destinations
