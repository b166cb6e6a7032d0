"""web/js/e2ee.js in Debian's Chromium: every shared vector, and MACs/sealed details
crossing between the browser and broker/e2ee.py in both directions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Page, async_playwright

from broker import e2ee
from broker.e2ee import InterceptionError, SdpAuthenticator, Trust

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[1]
VECTORS: dict[str, Any] = json.loads(
    (REPO / "tests" / "vectors" / "e2ee.json").read_text(encoding="utf-8")
)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
BLANK_PAGE = "<!doctype html><meta charset=utf-8><title>e2ee vectors</title>"
SESSION = "s_7kQ2mX"
SDP = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "a=fingerprint:sha-256 " + ":".join(["4F"] * 32) + "\r\na=setup:actpass\r\n"
)

# In the page: hex helpers, and the module imported once per document.
PAGE_HELPERS = """async () => {
  window.e2ee = await import('/static/js/e2ee.js');
  window.hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  window.fromHex = (h) => new Uint8Array(h.match(/../g)?.map((x) => parseInt(x, 16)) ?? []);
  window.reasonOf = async (promise) => {
    try { await promise; return 'accepted'; }
    catch (err) { return err.reason ?? err.name + ': ' + err.message; }
  };
}"""


async def _blank(_request: web.Request) -> web.Response:
    return web.Response(text=BLANK_PAGE, content_type="text/html")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url() -> AsyncIterator[str]:
    """The repo's web/ at /static/ plus a blank page, on a free loopback port."""
    app = web.Application()
    app.router.add_static("/static/", REPO / "web")
    app.router.add_get("/", _blank)
    app.router.add_get("/call", _blank)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def page(base_url: str) -> AsyncIterator[Page]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        tab = await browser.new_page()
        await tab.goto(base_url + "/")
        await tab.evaluate(PAGE_HELPERS)
        yield tab
        await browser.close()


# -- every shared vector ------------------------------------------------------------------------


async def test_link_key_vectors(page: Page) -> None:
    got = await page.evaluate(
        """(v) => ({
          valid: v.valid.map((c) => hex(e2ee.decodeLinkKey(c.text))),
          invalid: v.invalid.map((t) => { try { e2ee.decodeLinkKey(t); return 'accepted'; }
                                          catch (err) { return err.message; } }),
          fresh: Array.from({length: 20}, () => e2ee.newLinkKey()),
        })""",
        VECTORS["link_key"],
    )
    assert got["valid"] == [c["hex"] for c in VECTORS["link_key"]["valid"]]
    for text, message in zip(VECTORS["link_key"]["invalid"], got["invalid"], strict=True):
        with pytest.raises(ValueError) as err:
            e2ee.decode_link_key(text)
        assert message == str(err.value)  # same words in both languages
    assert len(set(got["fresh"])) == 20
    assert all(len(e2ee.decode_link_key(k)) == 32 for k in got["fresh"])


async def test_key_derivation_vectors(page: Page) -> None:
    got = await page.evaluate(
        """async ([kAuth, pairs]) => ({
          kAuth: await Promise.all(kAuth.map(async (c) =>
            hex(await e2ee.deriveAuthKey(e2ee.decodeLinkKey(c.link_key), c.session_id)))),
          pairs: await Promise.all(pairs.map(async (c) =>
            hex(await e2ee.pairKey(fromHex(c.k_auth_hex), c.a, c.b)))),
        })""",
        [VECTORS["k_auth"], VECTORS["pair_key"]],
    )
    assert got["kAuth"] == [c["k_auth_hex"] for c in VECTORS["k_auth"]]
    assert got["pairs"] == [c["k_pair_hex"] for c in VECTORS["pair_key"]]


async def test_canonical_and_mac_vectors(page: Page) -> None:
    got = await page.evaluate(
        """async ([canon, macs]) => ({
          canonical: canon.map((c) =>
            hex(e2ee.canonical(c.session_id, c.sender, c.recipient, c.type, c.counter, c.sdp))),
          macs: await Promise.all(macs.map(async (c) => {
            const kAuth = await e2ee.deriveAuthKey(e2ee.decodeLinkKey(c.link_key), c.session_id);
            const args = [c.session_id, c.sender, c.recipient, c.type, c.counter, c.sdp];
            const mac = await e2ee.signSdp(kAuth, ...args);
            return [mac, await reasonOf(e2ee.verifySdp(kAuth, ...args, c.mac))];
          })),
        })""",
        [VECTORS["canonical"], VECTORS["mac"]],
    )
    assert got["canonical"] == [c["hex"] for c in VECTORS["canonical"]]
    assert got["macs"] == [[c["mac"], "accepted"] for c in VECTORS["mac"]]


async def test_fingerprint_vectors(page: Page) -> None:
    got = await page.evaluate(
        """([norm, fps]) => {
          const attempt = (f) => {
            try { return f(); } catch (err) { return err.reason ?? 'error'; }
          };
          return {
            norm: norm.valid.map((c) => e2ee.normaliseFingerprint(c.input)),
            normBad: norm.invalid.map((t) => attempt(() => e2ee.normaliseFingerprint(t))),
            fps: fps.valid.map((c) => e2ee.fingerprintOf(c.sdp)),
            fpsBad: fps.invalid.map((c) => attempt(() => e2ee.fingerprintOf(c.sdp))),
          };
        }""",
        [VECTORS["normalise_fingerprint"], VECTORS["fingerprint_of"]],
    )
    assert got["norm"] == [c["output"] for c in VECTORS["normalise_fingerprint"]["valid"]]
    assert got["normBad"] == ["error"] * len(VECTORS["normalise_fingerprint"]["invalid"])
    assert got["fps"] == [c["fingerprint"] for c in VECTORS["fingerprint_of"]["valid"]]
    assert got["fpsBad"] == [c["reason"] for c in VECTORS["fingerprint_of"]["invalid"]]


async def test_safety_code_vectors(page: Page) -> None:
    got = await page.evaluate(
        """(cases) => Promise.all(cases.map(async (c) =>
             [await e2ee.safetyCode(c.session_id, c.fp_a, c.fp_b),
              await e2ee.safetyCode(c.session_id, c.fp_b, c.fp_a)]))""",
        VECTORS["safety_code"],
    )
    assert got == [[c["code"], c["code"]] for c in VECTORS["safety_code"]]


async def test_details_vectors(page: Page) -> None:
    got = await page.evaluate(
        """(cases) => Promise.all(cases.map(async (c) => {
             const key = e2ee.decodeLinkKey(c.link_key);
             const nonce = fromHex(c.nonce_hex);
             const sealed = await e2ee.sealDetails(
               key, c.session_id, c.peer_id, c.plaintext, {nonce});
             return [sealed, await e2ee.openDetails(key, c.session_id, c.peer_id, c.sealed)];
           }))""",
        VECTORS["details"],
    )
    assert got == [[c["sealed"], c["plaintext"]] for c in VECTORS["details"]]


async def test_checklist_vectors(page: Page) -> None:
    got = await page.evaluate(
        """(cases) => Promise.all(cases.map(async (c) => {
             const key = e2ee.decodeLinkKey(c.link_key);
             const sealed = await e2ee.sealChecklist(
               key, c.session_id, c.peer_id, c.answers, {nonce: fromHex(c.nonce_hex)});
             return [sealed, e2ee.checklistPlaintext(c.answers),
                     await e2ee.openChecklist(key, c.session_id, c.peer_id, c.sealed)];
           }))""",
        VECTORS["checklist"],
    )
    assert got == [[c["sealed"], c["plaintext"], c["answers"]] for c in VECTORS["checklist"]]


# -- across the language boundary ---------------------------------------------------------------


async def test_js_signed_offer_is_verified_by_python(page: Page) -> None:
    link_key = e2ee.new_link_key()
    signed = await page.evaluate(
        """async ([linkKey, session, sdp]) => {
          const auth = new e2ee.SdpAuthenticator(e2ee.decodeLinkKey(linkKey), session, 'therapist');
          const first = await auth.sign('seat-1', 'offer', sdp);
          const second = await auth.sign('seat-1', 'offer', sdp);
          return {first, second, hasLinkKey: auth.hasLinkKey};
        }""",
        [link_key, SESSION, SDP],
    )
    assert signed["hasLinkKey"] is True
    client = SdpAuthenticator(e2ee.decode_link_key(link_key), SESSION, "seat-1")
    (c1, mac1), (c2, mac2) = signed["first"], signed["second"]
    assert c2 > c1 > 1_700_000_000_000_000  # unix microseconds
    assert client.verify("therapist", "offer", c1, SDP, mac1) is Trust.VERIFIED_BY_LINK
    with pytest.raises(InterceptionError, match="bad_mac"):
        client.verify("therapist", "offer", c2, SDP.replace("4F", "4E", 1), mac2)
    assert client.verify("therapist", "offer", c2, SDP, mac2) is Trust.VERIFIED_BY_LINK
    with pytest.raises(InterceptionError, match="replayed_counter"):
        client.verify("therapist", "offer", c1, SDP, mac1)


async def test_python_signed_answer_is_verified_by_js(page: Page) -> None:
    link_key = e2ee.new_link_key()
    client = SdpAuthenticator(e2ee.decode_link_key(link_key), SESSION, "seat-1")
    counter, mac = client.sign("therapist", "answer", SDP)
    outcomes = await page.evaluate(
        """async ([linkKey, session, sdp, counter, mac]) => {
          const auth = new e2ee.SdpAuthenticator(e2ee.decodeLinkKey(linkKey), session, 'therapist');
          const forged = sdp.replace('4F', '4E');
          return [
            await reasonOf(auth.verify('seat-1', 'answer', counter, sdp, null)),
            await reasonOf(auth.verify('seat-1', 'answer', counter, forged, mac)),
            await reasonOf(auth.verify('seat-1', 'offer', counter, sdp, mac)),
            await reasonOf(auth.verify('seat-2', 'answer', counter, sdp, mac)),
            await reasonOf(auth.verify('seat-1', 'answer', counter + 1, sdp, mac)),
            await reasonOf(auth.verify('therapist', 'answer', counter, sdp, mac)),
            await reasonOf(auth.verify('seat-1', 'answer', 2 ** 53, sdp, mac)),
            await reasonOf(auth.verify('seat-1', 'answer', null, sdp, mac)),
            await auth.verify('seat-1', 'answer', counter, sdp, mac),
            await reasonOf(auth.verify('seat-1', 'answer', counter, sdp, mac)),
          ];
        }""",
        [link_key, SESSION, SDP, counter, mac],
    )
    assert outcomes == [
        "missing_mac", "bad_mac", "bad_mac", "bad_mac", "bad_mac",
        "malformed", "malformed", "malformed", "verified_by_link", "replayed_counter",
    ]  # fmt: skip


async def test_unverified_mode_in_js(page: Page) -> None:
    """A therapist device without the link key: no MAC sent, counters still enforced."""
    link_key = e2ee.new_link_key()
    client = SdpAuthenticator(e2ee.decode_link_key(link_key), SESSION, "seat-1")
    counter, mac = client.sign("therapist", "offer", SDP)
    got = await page.evaluate(
        """async ([sdp, counter, mac]) => {
          const auth = new e2ee.SdpAuthenticator(null, 's_7kQ2mX', 'therapist');
          return {
            hasLinkKey: auth.hasLinkKey,
            trust: await auth.verify('seat-1', 'offer', counter, sdp, mac),
            replay: await reasonOf(auth.verify('seat-1', 'offer', counter, sdp, mac)),
            signed: await auth.sign('seat-1', 'answer', sdp),
          };
        }""",
        [SDP, counter, mac],
    )
    assert got["hasLinkKey"] is False
    assert got["trust"] == Trust.UNVERIFIED and got["replay"] == "replayed_counter"
    a_counter, a_mac = got["signed"]
    assert a_mac is None
    with pytest.raises(InterceptionError, match="missing_mac"):
        client.verify("therapist", "answer", a_counter, SDP, a_mac)
    assert (
        client.verify("therapist", "answer", a_counter, SDP, a_mac, allow_unverified=True)
        is Trust.UNVERIFIED
    )


async def test_safety_code_matches_python_for_browser_fingerprint(page: Page) -> None:
    """A real Chromium offer: its fingerprint and the code agree in both languages."""
    got = await page.evaluate(
        """async () => {
          const pc = new RTCPeerConnection();
          pc.createDataChannel('x');
          const offer = await pc.createOffer();
          pc.close();
          const fp = e2ee.fingerprintOf(offer.sdp);
          const other = 'sha-256 ' + Array(32).fill('4F').join(':');
          return {sdp: offer.sdp, fp, code: await e2ee.safetyCode('s_7kQ2mX', fp, other)};
        }"""
    )
    assert e2ee.fingerprint_of(got["sdp"]) == got["fp"]
    assert got["code"] == e2ee.safety_code(SESSION, got["fp"], e2ee.fingerprint_of(SDP))


async def test_details_cross_language(page: Page) -> None:
    key_text = e2ee.new_link_key()
    key = e2ee.decode_link_key(key_text)
    text = json.dumps({"contact": "Zoë", "phone": "+33 1 23 45 67 89"}, ensure_ascii=False)
    from_python = e2ee.seal_details(key, SESSION, "seat-1", text)
    got = await page.evaluate(
        """async ([keyText, session, sealed, text]) => {
          const key = e2ee.decodeLinkKey(keyText);
          const flip = sealed[20] === 'A' ? 'B' : 'A';
          const tampered = sealed.slice(0, 20) + flip + sealed.slice(21);
          return {
            opened: await e2ee.openDetails(key, session, 'seat-1', sealed),
            wrongSeat: await reasonOf(e2ee.openDetails(key, session, 'seat-2', sealed)),
            tampered: await reasonOf(e2ee.openDetails(key, session, 'seat-1', tampered)),
            fromJs: await e2ee.sealDetails(key, session, 'seat-1', text),
          };
        }""",
        [key_text, SESSION, from_python, text],
    )
    assert got["opened"] == text
    assert got["wrongSeat"].startswith("DetailsError: emergency details failed authentication")
    assert got["tampered"].startswith("DetailsError: ")
    assert e2ee.open_details(key, SESSION, "seat-1", got["fromJs"]) == text


async def test_checklist_cross_language(page: Page) -> None:
    key_text = e2ee.new_link_key()
    key = e2ee.decode_link_key(key_text)
    answers = {"private_place": True, "headset": False}
    from_python = e2ee.seal_checklist(key, SESSION, "seat-1", answers)
    got = await page.evaluate(
        """async ([keyText, session, sealed, answers]) => {
          const key = e2ee.decodeLinkKey(keyText);
          return {
            opened: await e2ee.openChecklist(key, session, 'seat-1', sealed),
            wrongSeat: await reasonOf(e2ee.openChecklist(key, session, 'seat-2', sealed)),
            asDetails: await reasonOf(e2ee.openDetails(key, session, 'seat-1', sealed)),
            fromJs: await e2ee.sealChecklist(key, session, 'seat-1', answers),
          };
        }""",
        [key_text, SESSION, from_python, answers],
    )
    assert got["opened"] == answers
    assert got["wrongSeat"].startswith("DetailsError: checklist answers failed authentication")
    assert got["asDetails"].startswith("DetailsError: emergency details failed authentication")
    assert e2ee.open_checklist(key, SESSION, "seat-1", got["fromJs"]) == answers


async def test_js_rejects_lone_surrogates_like_python(page: Page) -> None:
    message = await page.evaluate(
        """() => { try { e2ee.canonical('s', '\\ud800', 'b', 'offer', 1, ''); return 'accepted'; }
                   catch (err) { return err.name; } }"""
    )
    assert message == "TypeError"


# -- the link fragment ------------------------------------------------------------------------


async def test_read_link_key_from_fragment(page: Page, base_url: str) -> None:
    key = e2ee.new_link_key()
    try:
        await page.goto(f"{base_url}/call?lang=de#{key}")
        await page.evaluate(PAGE_HELPERS)
        first = await page.evaluate("() => [hex(e2ee.readLinkKeyFromFragment()), location.href]")
        assert first == [e2ee.decode_link_key(key).hex(), f"{base_url}/call?lang=de"]
        assert await page.evaluate("() => e2ee.readLinkKeyFromFragment()") is None
        await page.goto(f"{base_url}/call#{key[:-3]}")  # a link cut short by a mail client
        await page.evaluate(PAGE_HELPERS)
        damaged = await page.evaluate(
            "() => { try { e2ee.readLinkKeyFromFragment(); return 'accepted'; }"
            " catch (err) { return err.message; } }"
        )
        assert "43 base64url characters, got 40" in damaged
        assert await page.evaluate("() => location.href") == f"{base_url}/call"
    finally:  # leave the shared page as the other tests expect it
        await page.goto(base_url + "/")
        await page.evaluate(PAGE_HELPERS)
