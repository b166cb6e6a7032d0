"""extension/lib/verify.js, the extension's checks, run in Chromium and in Firefox ESR: a
manifest is trusted only with a pinned key's Ed25519 signature (WebCrypto) of its exact,
canonical bytes; a response must carry the manifest's headers exactly once and a body whose
digest the manifest lists at its path; a page's pins must be the manifest's own digests.

The manifest, keys and signatures are made here by the broker's own code (the Python side that
builds and signs releases), so the two sides are checked against each other."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.http.notice_pages import render_notice
from broker.webmanifest.canonical import canonical_json
from broker.webmanifest.integrity import sri
from broker.webmanifest.signing import public_key_text, sign
from tests.browser.conftest import NewContext
from tests.browser.firefox_bidi import Firefox
from tests.conftest import free_port
from tests.extension.kit import EXTENSION
from tests.webmanifest.web_copies import WEB

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Runs every case in the page and returns {case: outcome}; an outcome is a value or "refused:<code>".
CASES = """async (input) => {
  const v = await import('/extension/lib/verify.js');
  const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const outcome = async (run) => { try { return await run(); } catch (e) { return 'refused:' + (e.code ?? e.name); } };
  const m = bytes(input.manifest), s = bytes(input.signatures);
  const trusted = (mb, sb, keys) => v.trustedManifest(mb, sb, keys).then((t) => t.signers);
  const { manifest } = await v.trustedManifest(m, s, [input.key]);
  const headers = Object.entries(input.headers).map(([name, value]) => ({ name, value }));
  const ui = manifest.files['/static/js/ui.js'];
  return {
    ed25519: await v.ed25519Available(),
    signed: await outcome(() => trusted(m, s, [input.key])),
    pinnedAmongOthers: await outcome(() => trusted(m, s, [input.other, input.key])),
    otherKey: await outcome(() => trusted(m, s, [input.other])),
    alteredByte: await outcome(() => trusted(bytes(input.altered), s, [input.key])),
    notCanonical: await outcome(() => trusted(bytes(input.indented), bytes(input.indentedSignatures), [input.key])),
    duplicateName: await outcome(() => trusted(bytes(input.duplicate), bytes(input.duplicateSignatures), [input.key])),
    canonicalAgrees: v.canonical(JSON.parse(new TextDecoder().decode(m))) === new TextDecoder().decode(m),
    digestAgrees: (await v.sri(bytes(input.sample))) === input.sampleDigest,
    moduleBody: await outcome(() => v.checkBody(manifest, '/static/js/ui.js', bytes(input.ui))),
    moduleAltered: await outcome(() => v.checkBody(manifest, '/static/js/ui.js', bytes(input.sample))),
    linkPage: await outcome(() => v.checkBody(manifest, '/j/some-token', bytes(input.join))),
    joinPageAsModule: await outcome(() => v.checkBody(manifest, '/static/js/ui.js', bytes(input.join))),
    notice: await outcome(() => v.checkBody(manifest, '/nothing-here', bytes(input.notice))),
    headersExact: await outcome(() => v.checkHeaders(manifest, headers, '/') ?? 'ok'),
    headerTwice: await outcome(() => v.checkHeaders(manifest, [...headers, headers[0]], '/')),
    headerMissing: await outcome(() => v.checkHeaders(manifest, headers.slice(1), '/')),
    headerChanged: await outcome(() => v.checkHeaders(manifest,
      [{ name: headers[0].name, value: headers[0].value + ' ' }, ...headers.slice(1)], '/')),
    pinsRight: await outcome(() => v.checkPins(manifest, input.origin,
      [{ url: input.origin + '/static/js/ui.js', integrity: ui }]) ?? 'ok'),
    pinWrong: await outcome(() => v.checkPins(manifest, input.origin,
      [{ url: input.origin + '/static/js/ui.js', integrity: manifest.files['/static/js/call.js'] }])),
    pinUnlisted: await outcome(() => v.checkPins(manifest, input.origin,
      [{ url: input.origin + '/static/js/evil.js', integrity: ui }])),
    pinElsewhere: await outcome(() => v.checkPins(manifest, input.origin,
      [{ url: 'https://cdn.example/static/js/ui.js', integrity: ui }])),
    redirectHere: await outcome(() => v.checkRedirect('/login', '/dashboard') ?? 'ok'),
    redirectAway: await outcome(() => v.checkRedirect('//elsewhere.example/', '/dashboard')),
  };
}"""

EXPECTED: dict[str, Any] = {
    "ed25519": True,
    "otherKey": "refused:not_signed",
    "alteredByte": "refused:not_signed",
    "notCanonical": "refused:not_canonical",
    "duplicateName": "refused:not_canonical",
    "canonicalAgrees": True,
    "digestAgrees": True,
    "moduleAltered": "refused:body",
    "joinPageAsModule": "refused:body",
    "headersExact": "ok",
    "headerTwice": "refused:header",
    "headerMissing": "refused:header",
    "headerChanged": "refused:header",
    "pinsRight": "ok",
    "pinWrong": "refused:pin",
    "pinUnlisted": "refused:pin",
    "pinElsewhere": "refused:pin",
    "redirectHere": "ok",
    "redirectAway": "refused:redirect",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def case_input(origin: str) -> dict[str, Any]:
    """The shipped manifest signed by a fresh key, and variants of it each signed validly too."""
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    manifest = (WEB / "release" / "web-manifest.json").read_bytes()
    value = json.loads(manifest)
    public = public_key_text(key)

    def signatures(data: bytes) -> str:
        return b64(canonical_json({public: sign(key, data)}))

    indented = json.dumps(value, indent=1, sort_keys=True).encode()
    duplicate = b'{"app":"x",' + manifest[1:]  # "app" twice: the reader must refuse it
    altered = bytearray(manifest)
    altered[len(altered) // 2] ^= 0x01
    sample = b"export const altered = true;\n"
    return {
        "origin": origin,
        "manifest": b64(manifest),
        "signatures": signatures(manifest),
        "key": public,
        "other": public_key_text(other),
        "altered": b64(bytes(altered)),
        "indented": b64(indented),
        "indentedSignatures": signatures(indented),
        "duplicate": b64(duplicate),
        "duplicateSignatures": signatures(duplicate),
        "sample": b64(sample),
        "sampleDigest": sri(sample),
        "ui": b64((WEB / "js" / "ui.js").read_bytes()),
        "join": b64((WEB / "join.html").read_bytes()),
        "notice": b64(render_notice(WEB, "not_found")[1].encode("utf-8")),
        "headers": {"Content-Security-Policy": value["default_csp"], **value["headers"]},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served() -> AsyncIterator[str]:
    """extension/ and a blank page on a loopback origin (a secure context, as WebCrypto needs)."""
    app = web.Application()

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>unit</title>", content_type="text/html")

    app.router.add_get("/", blank)
    app.router.add_static("/extension", Path(EXTENSION))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def check(outcome: dict[str, Any], public: str) -> None:
    for name, expected in EXPECTED.items():
        assert outcome[name] == expected, f"{name}: {outcome[name]!r}"
    assert outcome["signed"] == [public] and outcome["pinnedAmongOthers"] == [public]
    for name in ("moduleBody", "linkPage", "notice"):
        assert str(outcome[name]).startswith("sha384-"), f"{name}: {outcome[name]!r}"


async def test_verify_js_in_chromium(served: str, new_context: NewContext) -> None:
    page = await (await new_context()).new_page()
    await page.goto(f"{served}/")
    data = case_input(served)
    check(await page.evaluate(CASES, data), data["key"])


async def test_verify_js_in_firefox(served: str, firefox: Firefox) -> None:
    page = await firefox.new_page()
    try:
        await page.goto(f"{served}/")
        data = case_input(served)
        check(await page.evaluate(CASES, data), data["key"])
    finally:
        await page.close()
