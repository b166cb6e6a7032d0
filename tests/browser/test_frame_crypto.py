"""End-to-end encryption of media frames in the browser (web/js/frame_crypto.js and its worker,
web/js/frame_crypto_worker.js; docs/protocol.md 7.12), in Debian's Chromium and Firefox ESR.

Each test opens a page the broker serves (the login page: its CSP, Integrity-Policy and import
map are every page's), imports the module through the page's pins, and connects pairs of
RTCPeerConnections inside that page with the fake camera and microphone, the way Janus's
publisher and subscriber connections go: the sender offers, the receiver sets its transforms on
the offered transceivers before it answers. Each FrameCrypto is its own worker, so one page holds
a sender and receivers with different keys (tests/browser/frame_crypto_harness.js).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page

from tests.browser.conftest import NewContext
from tests.browser.firefox_bidi import FirefoxPage
from tests.browser.kit import until
from tests.conftest import RunningBroker, start_broker
from tests.webmanifest.web_copies import copy_web

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

HARNESS = Path(__file__).with_name("frame_crypto_harness.js").read_text(encoding="utf-8")
KEY = "000102030405060708090a0b0c0d0e0f"
WRONG_KEY = "f0e0d0c0b0a090807060504030201000"
NEXT_KEY = "5f5e5d5c5b5a59585756555453525150"
SLOT = 5
RETIRED_KEY_GRACE_S = 5.0
FAILURES = ("unknown_kid", "replayed", "bad_tag", "malformed")

AnyPage = Page | FirefoxPage


async def run(page: AnyPage, function: str, *args: Any) -> Any:
    """Call a page function with JSON-able arguments, in either browser."""
    if isinstance(page, FirefoxPage):
        return await page.evaluate(function, *args)
    return await page.evaluate(f"(args) => ({function})(...args)", list(args))


async def fc(page: AnyPage, name: str, op: str, *args: Any) -> Any:
    """A method of the page's FrameCrypto `name` (keys as {"hex": ...})."""
    return await run(page, "(n, op, ...a) => window.__fc.call(n, op, ...a)", name, op, *args)


async def counts(page: AnyPage, name: str) -> dict[str, Any]:
    value: dict[str, Any] = await fc(page, name, "counts")
    return value


async def inbound(page: AnyPage, link: str) -> dict[str, int]:
    value: dict[str, int] = await run(page, "(n) => window.__fc.inbound(n)", link)
    return value


async def link(page: AnyPage, name: str, sender: str, receiver: str) -> None:
    await run(page, "(n, s, r) => window.__fc.link(n, s, r)", name, sender, receiver)


async def harness(page: AnyPage, url: str, *cryptos: str) -> None:
    """The page at `url` with the harness installed and a FrameCrypto per name (each its own worker)."""
    await page.goto(url)
    assert await run(page, HARNESS) is True, "this browser has RTCRtpScriptTransform"
    for name in cryptos:
        assert await run(page, "(n) => window.__fc.start(n)", name) is True


def who(generation: int, slot: int = SLOT) -> dict[str, int]:
    return {"slot": slot, "generation": generation}


async def chromium_page(new_context: NewContext) -> Page:
    return await (await new_context()).new_page()


async def check_encrypted_media(page: AnyPage) -> None:
    """A sender and a receiver holding its key: video decodes, audio and video are opened by the
    receiver's worker, and the bytes that crossed are SFrames under the sender's key, not the frames."""
    assert await fc(page, "sender", "setSendKey", {"hex": KEY}, who(0)) == str(SLOT)
    assert await fc(page, "receiver", "addKey", {"hex": KEY}, who(0)) == str(SLOT)
    assert await fc(page, "receiver", "capture", 40) == 40
    await link(page, "keyed", "sender", "receiver")

    await until(lambda: inbound(page, "keyed"), lambda s: s["framesDecoded"] >= 15, "the keyed receiver decodes video")
    received = await until(
        lambda: counts(page, "receiver"),
        lambda c: c["decrypted"]["audio"] >= 20 and c["decrypted"]["video"] >= 15,
        "the receiver's worker opens audio and video frames",
    )
    assert received["unknown_kid"] == received["bad_tag"] == received["malformed"] == 0, received
    sent = await counts(page, "sender")
    assert sent["encrypted"]["audio"] >= 20 and sent["encrypted"]["video"] >= 15, sent
    assert sent["unkeyed"] == sent["unsent"] == 0, sent
    assert sent["started"]["send"] == {"audio": 1, "video": 1}, sent
    assert await run(page, "(n) => window.__fc.bypassed(n)", "keyed") == {"audio": False, "video": False}

    wire = await until(
        lambda: run(page, "(...a) => window.__fc.wire(...a)", "receiver", KEY, SLOT, 0),
        lambda frames: len(frames) == 40,
        "40 frames captured on the wire",
    )
    repeats = [frame for frame in wire if frame.get("repeat")]
    assert all(frame["identical"] for frame in repeats), "a counter came twice with different bytes"
    wire = [frame for frame in wire if not frame.get("repeat")]
    assert len(wire) >= 30, repeats
    kinds = {frame["kind"] for frame in wire}
    assert kinds == {"audio", "video"}, kinds
    for frame in wire:
        assert frame["kid"] == str(SLOT), frame
        assert frame["prefixKept"], frame
        assert frame["sealedLength"] == frame["size"], frame
        if frame["size"] >= 8:  # AES-GCM output equal to its input by chance: 2**-64 at most
            assert frame["sealedDiffers"], frame
        if frame["type"] == "key":
            assert frame["keyFrameStart"] == "9d012a", "the clear prefix holds VP8's key frame start code"
    assert any(frame["size"] >= 8 for frame in wire if frame["kind"] == "video")


async def test_frames_encrypted_by_one_side_decrypt_and_decode_on_the_other(
    broker: RunningBroker, new_context: NewContext
) -> None:
    page = await chromium_page(new_context)
    await harness(page, f"{broker.url}/login", "sender", "receiver")
    await check_encrypted_media(page)


async def test_a_receiver_with_a_wrong_key_or_none_decodes_nothing_and_counts_failures(
    broker: RunningBroker, new_context: NewContext
) -> None:
    page = await chromium_page(new_context)
    await harness(page, f"{broker.url}/login", "sender", "right", "wrong", "keyless")
    await fc(page, "sender", "setSendKey", {"hex": KEY}, who(0))
    await fc(page, "right", "addKey", {"hex": KEY}, who(0))
    await fc(page, "wrong", "addKey", {"hex": WRONG_KEY}, who(0))
    for name in ("right", "wrong", "keyless"):
        await link(page, name, "sender", name)

    # The control: the same sender's frames decode where the key is right.
    await until(lambda: inbound(page, "right"), lambda s: s["framesDecoded"] >= 30, "the right key decodes")
    wrong = await until(
        lambda: counts(page, "wrong"), lambda c: c["bad_tag"] >= 60, "the wrong key's receiver counts bad_tag"
    )
    keyless = await until(
        lambda: counts(page, "keyless"), lambda c: c["unknown_kid"] >= 60, "the keyless receiver counts unknown_kid"
    )
    assert wrong["decrypted"] == keyless["decrypted"] == {"audio": 0, "video": 0}
    assert wrong["unknown_kid"] == 0 and keyless["bad_tag"] == 0
    for name in ("wrong", "keyless"):
        stats = await inbound(page, name)
        assert stats["videoPackets"] > 0 and stats["audioPackets"] > 0, f"{name}: the packets did arrive"
        # framesReceived counts the frames the transform passed on to the decoder: none.
        assert stats["framesReceived"] == stats["framesDecoded"] == 0, f"{name}: a refused frame went on: {stats}"


async def test_after_a_rotation_only_a_receiver_given_the_new_key_keeps_decoding(
    broker: RunningBroker, new_context: NewContext
) -> None:
    page = await chromium_page(new_context)
    await harness(page, f"{broker.url}/login", "sender", "kept", "left")
    await fc(page, "sender", "setSendKey", {"hex": KEY}, who(0))
    for name in ("kept", "left"):
        await fc(page, name, "addKey", {"hex": KEY}, who(0))
        await link(page, name, "sender", name)
        await until(partial(inbound, page, name), lambda s: s["framesDecoded"] >= 10, f"{name} decodes")

    # The rotation (generation 1): "kept" gets the new key and retires the old KID; "left" does not.
    assert await fc(page, "kept", "addKey", {"hex": NEXT_KEY}, who(1)) == str(32 + SLOT)
    await fc(page, "kept", "retireKey", who(0))
    retired_at = time.monotonic()
    with pytest.raises(Exception, match="kid_in_use"):
        await fc(page, "sender", "setSendKey", {"hex": NEXT_KEY}, who(0))  # a KID never takes a second key
    packets_at_rotation = (await inbound(page, "left"))["videoPackets"]
    assert await fc(page, "sender", "setSendKey", {"hex": NEXT_KEY}, who(1)) == str(32 + SLOT)
    assert await fc(page, "kept", "hasKey", who(0)) is True, "a retired KID is kept for its grace period"

    await until(lambda: counts(page, "left"), lambda c: c["unknown_kid"] >= 30, "left counts the new KID as unknown")
    # Video sent before the rotation has arrived once 40 more packets have (one stream is in order).
    await until(
        lambda: inbound(page, "left"),
        lambda s: s["videoPackets"] >= packets_at_rotation + 40,
        "video after the rotation reaches left",
    )
    left_before = await inbound(page, "left")
    left_opened = (await counts(page, "left"))["decrypted"]
    kept_decoded = (await inbound(page, "kept"))["framesDecoded"]
    await until(lambda: inbound(page, "kept"), lambda s: s["framesDecoded"] >= kept_decoded + 30, "kept keeps decoding")
    left_after = await inbound(page, "left")
    for field in ("framesReceived", "framesDecoded"):
        assert left_after[field] == left_before[field], f"left got frames sent after the rotation: {left_after}"
    assert left_after["videoPackets"] > left_before["videoPackets"], "while they kept arriving"
    assert (await counts(page, "left"))["decrypted"] == left_opened
    kept = await counts(page, "kept")
    assert kept["unknown_kid"] == kept["bad_tag"] == 0, kept

    await until(lambda: fc(page, "kept", "hasKey", who(0)), lambda held: held is False, "the retired KID is dropped")
    assert time.monotonic() - retired_at >= RETIRED_KEY_GRACE_S - 0.5, "dropped before its grace period"
    assert await fc(page, "kept", "hasKey", who(1)) is True


async def test_a_browser_without_rtcrtpscripttransform_is_not_supported(
    broker: RunningBroker, new_context: NewContext
) -> None:
    context = await new_context()
    await context.add_init_script("delete window.RTCRtpScriptTransform;")
    page = await context.new_page()
    await page.goto(f"{broker.url}/login")
    outcome = await page.evaluate(
        """async () => {
          const m = await import("/static/js/frame_crypto.js");
          try { await m.FrameCrypto.start(); return [m.supported(), "started"]; }
          catch (e) { return [m.supported(), e.code]; }
        }"""
    )
    assert outcome == [False, "unsupported"]


async def test_a_sender_whose_frames_bypass_its_transform_is_detected(
    broker: RunningBroker, new_context: NewContext
) -> None:
    page = await chromium_page(new_context)
    await harness(page, f"{broker.url}/login", "sender", "receiver")
    await fc(page, "sender", "setSendKey", {"hex": KEY}, who(0))
    await fc(page, "receiver", "addKey", {"hex": KEY}, who(0))
    await link(page, "call", "sender", "receiver")
    await until(lambda: inbound(page, "call"), lambda s: s["framesDecoded"] >= 10, "the call decodes")
    assert await run(page, "(n) => window.__fc.bypassed(n)", "call") == {"audio": False, "video": False}
    # The browser stops passing video through the worker (as Chromium does, silently, for a
    # transform it skips): the encoder's frames leave as they are, and bypassed() says so.
    await run(page, "(n, k) => window.__fc.unprotect(n, k)", "call", "video")
    await until(
        lambda: run(page, "(n) => window.__fc.bypassed(n)", "call"),
        lambda b: b == {"audio": False, "video": True},
        "the bypassed video sender is detected",
    )


#: After the frame encryption's worker started: every other way to start a worker, or to make
#: a script URL, is refused (Trusted Types: one policy, already taken; the CSP: worker-src blob:).
OTHER_WORKERS = """async () => {
  const m = await import("/static/js/frame_crypto.js");
  const crypto = await m.FrameCrypto.start();
  const tries = {
    workerFromOurOrigin: () => new Worker("/static/js/frame_crypto_worker.js", { type: "module" }),
    workerFromBlob: () => new Worker(URL.createObjectURL(new Blob(["postMessage(1)"], { type: "text/javascript" }))),
    secondPolicy: () => trustedTypes.createPolicy("frame-crypto", { createScriptURL: (u) => u }),
    otherPolicy: () => trustedTypes.createPolicy("workers", { createScriptURL: (u) => u }),
    serviceWorker: () => navigator.serviceWorker.register("/static/js/frame_crypto_worker.js"),
  };
  const outcome = {};
  for (const [name, attempt] of Object.entries(tries)) {
    try { await attempt(); outcome[name] = "allowed"; } catch (e) { outcome[name] = e.name; }
  }
  outcome.registrations = (await navigator.serviceWorker.getRegistrations()).length;
  crypto.close();
  return outcome;
}"""


async def test_no_other_worker_or_service_worker_can_start(broker: RunningBroker, new_context: NewContext) -> None:
    page = await chromium_page(new_context)
    await page.goto(f"{broker.url}/login")
    assert await page.evaluate(OTHER_WORKERS) == {
        "workerFromOurOrigin": "TypeError",
        "workerFromBlob": "TypeError",
        "secondPolicy": "TypeError",
        "otherPolicy": "TypeError",
        "serviceWorker": "TypeError",
        "registrations": 0,
    }


@pytest_asyncio.fixture(loop_scope="session")
async def altered_broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    """A broker over a copy of web/, whose worker file is changed on disk after the pages were pinned."""
    root = copy_web(tmp_path)
    running = await start_broker(tmp_path / "data", web_root=str(root))
    worker = root / "js" / "frame_crypto_worker.js"
    worker.write_bytes(worker.read_bytes().replace(b"counts.unkeyed += 1;", b"counts.unkeyed += 2;"))
    yield running
    await running.stop()


async def test_a_worker_whose_bytes_differ_from_the_pin_never_starts(
    altered_broker: RunningBroker, new_context: NewContext
) -> None:
    page = await chromium_page(new_context)
    await page.goto(f"{altered_broker.url}/login")
    outcome = await page.evaluate(
        """async () => {
          const m = await import("/static/js/frame_crypto.js");
          try { await m.FrameCrypto.start(); return "started"; } catch (e) { return e.code; }
        }"""
    )
    assert outcome == "unverified"


async def test_firefox_encrypts_and_decrypts_media_frames(broker: RunningBroker, firefox_page: FirefoxPage) -> None:
    await harness(firefox_page, f"{broker.url}/login", "sender", "receiver", "keyless")
    await check_encrypted_media(firefox_page)
    await link(firefox_page, "unkeyed", "sender", "keyless")
    await until(lambda: inbound(firefox_page, "unkeyed"), lambda s: s["videoPackets"] >= 60, "video reaches Firefox")
    keyless = await until(
        lambda: counts(firefox_page, "keyless"), lambda c: c["unknown_kid"] >= 60, "Firefox's keyless receiver refuses"
    )
    assert keyless["decrypted"] == {"audio": 0, "video": 0}
    stats = await inbound(firefox_page, "unkeyed")
    assert stats["framesReceived"] == stats["framesDecoded"] == 0, f"a refused frame went on: {stats}"
