"""The browser's Janus VideoRoom client (web/js/janus_room.js; docs/protocol.md 3 and 7.12), in
Debian's Chromium against a real Janus (tests/janus_server.py) and a real broker configured with it.

Each participant's credentials are the broker's own: the seats are admitted through the protocol
with the Python client (which stays connected, so the grants stand), and each page gets the
``media_janus`` its seat received. Every page is a page the broker serves (the login page: its CSP,
which lets scripts reach Janus's origin, its Integrity-Policy and import map), in a browser context
of its own, with the fake camera and microphone (tests/browser/janus_room_harness.js).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, Route

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import MediaJanus, SeatState, Status
from tests.browser.conftest import NewContext
from tests.browser.kit import until
from tests.client.test_client import waiting_client
from tests.conftest import RunningBroker, SessionLinks, schedule
from tests.janus.broker_fixture import with_janus  # noqa: F401 - the fixture
from tests.janus.janus_peer import JanusApiError, join_room
from tests.janus_server import janus_server  # noqa: F401 - the fixture

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

HARNESS = Path(__file__).with_name("janus_room_harness.js").read_text(encoding="utf-8")
KEY = "000102030405060708090a0b0c0d0e0f"
#: The publisher's place in the session (7.12's KID = generation × 32 + slot).
SENDER = {"slot": 0, "generation": 0}
#: Another publisher's place (a client's slot).
OTHER_SENDER = {"slot": 1, "generation": 0}
#: How long a revocation may take to reach Janus (as tests/janus/test_janus_grants.py), with a margin.
REVOKED_WITHIN_S = 10.0


@dataclass
class Seat:
    """A seat admitted through the broker: its Python client (kept connected) and its grant."""

    client: BrokerClient
    granted: MediaJanus

    @property
    def credentials(self) -> dict[str, Any]:
        return {
            "url": self.granted.url,
            "room": self.granted.room,
            "pin": self.granted.pin,
            "token": self.granted.token,
        }

    @property
    def peer_id(self) -> str:
        peer_id = self.client.peer_id
        assert peer_id is not None
        return peer_id


async def call(page: Page, name: str, *args: Any) -> Any:
    return await page.evaluate(f"(args) => window.__jr.{name}(...args)", list(args))


async def participant(new_context: NewContext, broker: RunningBroker) -> Page:
    """A page of the broker's with the harness and a started FrameCrypto."""
    page = await (await new_context()).new_page()
    await page.goto(f"{broker.url}/login")
    assert await page.evaluate(HARNESS) is True, "this browser has RTCRtpScriptTransform"
    assert await call(page, "start") is True
    return page


async def therapist_seat(broker: RunningBroker) -> tuple[SessionLinks, Seat]:
    """A session above the mesh size, its therapist connected and holding its credentials."""
    links = await schedule(broker, clients=4)
    therapist = BrokerClient(links.therapist)
    await therapist.connect()
    return links, Seat(therapist, await therapist.expect(MediaJanus, timeout=10))


async def admitted(therapist: Seat, links: SessionLinks, index: int) -> Seat:
    client = await waiting_client(links, links.clients[index])
    mark = len(client.received)
    await therapist.client.admit(client.peer_id)
    await client.expect(Status, where=lambda m: m.seat_state is SeatState.ADMITTED)
    granted = await client.expect(MediaJanus, where=lambda m: client.received.index(m) >= mark, timeout=10)
    return Seat(client, granted)


async def close(therapist: Seat, *clients: Seat) -> None:
    for seat in clients:
        await seat.client.close()
    await therapist.client.end()
    await therapist.client.close()


async def participants(broker: RunningBroker, room: int) -> list[dict[str, Any]]:
    """The room's participants as Janus lists them to the broker (its API secret)."""
    rooms = broker.hub.media.rooms
    assert rooms is not None
    async with rooms.client.videoroom() as handle:
        data = await handle.request({"request": "listparticipants", "room": room})
    listed: list[dict[str, Any]] = data.get("participants", [])
    return listed


@pytest.mark.alone
async def test_subscribers_decode_the_publishers_sealed_vp8_and_one_without_the_key_decodes_nothing(
    with_janus: RunningBroker, new_context: NewContext
) -> None:
    links, therapist = await therapist_seat(with_janus)
    keyed = await admitted(therapist, links, 0)
    keyless = await admitted(therapist, links, 1)
    try:
        watchers = {}

        async def watcher(name: str, seat: Seat) -> None:
            page = await participant(new_context, with_janus)
            if name == "keyed":
                await call(page, "addKey", KEY, SENDER)
            assert "feed" in await call(page, "join", seat.credentials, seat.peer_id)
            watchers[name] = page

        # One subscriber is in the room before the publisher publishes (Janus announces it by an
        # event), the other joins after (the publisher is in the list its join returns).
        await watcher("keyed", keyed)
        publisher = await participant(new_context, with_janus)
        await call(publisher, "setSendKey", KEY, SENDER)
        joined = await call(publisher, "join", therapist.credentials, therapist.peer_id)
        assert isinstance(joined.get("feed"), int), joined
        assert await call(publisher, "publish") == {"ok": True}
        await watcher("keyless", keyless)

        feed = joined["feed"]
        for page in watchers.values():
            seen = await until(
                lambda p=page: call(p, "seen"), lambda s: s["remotes"], "the publisher's feed is received"
            )
            # Janus knows the publisher by its opaque peer id only.
            assert seen["remotes"] == [{"feed": feed, "display": therapist.peer_id}], seen

        stats = await until(
            lambda: call(watchers["keyed"], "inbound", feed),
            lambda s: s["framesDecoded"] >= 30,
            "the keyed subscriber decodes the publisher's video",
        )
        assert stats["codec"] == "video/VP8", stats
        opened = await call(watchers["keyed"], "counts")
        assert opened["decrypted"]["video"] >= 30 and opened["decrypted"]["audio"] >= 30, opened
        assert opened["unknown_kid"] == opened["bad_tag"] == opened["malformed"] == 0, opened
        sent = await call(publisher, "counts")
        assert sent["started"]["send"] == {"audio": 1, "video": 1}, sent
        assert sent["unkeyed"] == sent["unsent"] == 0, sent
        outbound = await call(publisher, "outbound")
        assert outbound["codec"] == "video/VP8", outbound
        assert outbound["transforms"] == 2, outbound
        assert outbound["audioLevelOffered"] is False, "each audio packet's level would cross Janus in the clear"

        failed = await until(
            lambda: call(watchers["keyless"], "counts"),
            lambda c: c["unknown_kid"] >= 60,
            "the keyless subscriber counts frames it cannot open",
        )
        assert failed["decrypted"] == {"audio": 0, "video": 0}, failed
        blind = await call(watchers["keyless"], "inbound", feed)
        assert blind["videoPackets"] > 0 and blind["audioPackets"] > 0, f"the packets did arrive: {blind}"
        assert blind["framesReceived"] == blind["framesDecoded"] == 0, f"a frame reached the decoder: {blind}"

        # The publisher leaves: each subscriber learns its feed is gone.
        assert await call(publisher, "leave") is True
        for page in watchers.values():
            await until(
                lambda p=page: call(p, "seen"), lambda s: s["left"] == [feed], "the publisher's leaving is seen"
            )
        for page in watchers.values():
            assert await call(page, "leave") is True
        await until(
            lambda: participants(with_janus, therapist.granted.room), lambda p: p == [], "everyone left the room"
        )
    finally:
        await close(therapist, keyed, keyless)


#: Longer than janus_room.js's REQUEST_TIMEOUT_MS (15 s): a `subscribe` held back this long times out.
SLOW_SUBSCRIBE_S = 17.0


@pytest.mark.alone
async def test_a_subscribe_janus_is_slow_to_answer_keeps_what_is_received_and_is_asked_again(
    with_janus: RunningBroker, new_context: NewContext
) -> None:
    """One receiving connection for every publisher (protocol 7.12, "A browser in the Janus room",
    step 4): a watcher receives the first publisher; Janus is slow to take its `subscribe` for the
    second (held back past the request timeout). The first publisher's frames go on decoding on the
    same connection meanwhile, the request is made again, and the watcher receives both."""
    links, therapist = await therapist_seat(with_janus)
    watching, second = await admitted(therapist, links, 0), await admitted(therapist, links, 1)
    held: list[float] = []

    async def slow_first_subscribe(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}").get("body") or {}
        if body.get("request") == "subscribe" and not held:
            held.append(time.monotonic())
            await asyncio.sleep(SLOW_SUBSCRIBE_S)
        try:
            await route.continue_()
        except PlaywrightError:
            pass  # the page gave up on it (its own timeout): nothing to continue

    try:
        first = await participant(new_context, with_janus)
        await call(first, "setSendKey", KEY, SENDER)
        first_feed = (await call(first, "join", therapist.credentials, therapist.peer_id))["feed"]
        assert await call(first, "publish") == {"ok": True}
        watcher = await participant(new_context, with_janus)
        await watcher.route(re.compile(re.escape(watching.granted.url) + ".*"), slow_first_subscribe)
        for who in (SENDER, OTHER_SENDER):
            await call(watcher, "addKey", KEY, who)
        assert "feed" in await call(watcher, "join", watching.credentials, watching.peer_id)
        decoding = await until(
            lambda: call(watcher, "inbound", first_feed), lambda s: s["framesDecoded"] >= 10, "the first feed decodes"
        )

        later = await participant(new_context, with_janus)
        await call(later, "setSendKey", KEY, OTHER_SENDER)
        second_feed = (await call(later, "join", second.credentials, second.peer_id))["feed"]
        assert await call(later, "publish") == {"ok": True}
        await until(lambda: asyncio.sleep(0, held), lambda h: h, "the watcher asks Janus for the second feed")
        # Past the request's timeout, before the held request goes on: the first feed still decodes.
        await asyncio.sleep(max(0.0, held[0] + 15.5 - time.monotonic()))
        samples = []
        while time.monotonic() < held[0] + SLOW_SUBSCRIBE_S - 0.3:
            samples.append((await call(watcher, "inbound", first_feed))["framesDecoded"])
            await asyncio.sleep(0.2)
        assert samples and all(n >= decoding["framesDecoded"] for n in samples), (decoding, samples)
        assert samples[-1] > samples[0], f"the first feed stopped decoding: {samples}"

        for feed in (first_feed, second_feed):
            await until(
                lambda f=feed: call(watcher, "inbound", f), lambda s: s["framesDecoded"] >= 10, "both feeds decode"
            )
        seen = await call(watcher, "seen")
        assert seen["failed"] == [] and {r["feed"] for r in seen["remotes"]} == {first_feed, second_feed}, seen
        for page in (first, later, watcher):
            assert await call(page, "leave") is True
    finally:
        await close(therapist, watching, second)


async def test_a_revoked_token_cannot_join_the_room(with_janus: RunningBroker, new_context: NewContext) -> None:
    links, therapist = await therapist_seat(with_janus)
    removed = await admitted(therapist, links, 0)
    try:
        page = await participant(new_context, with_janus)
        await therapist.client.remove(removed.peer_id)
        deadline = time.monotonic() + REVOKED_WITHIN_S
        while True:  # the revocation reaches Janus moments after the removal is shown
            try:
                await join_room(removed.granted.url, removed.granted.token, removed.granted.room, removed.granted.pin)
            except JanusApiError:
                break
            assert time.monotonic() < deadline, "the token was not revoked"
            await asyncio.sleep(0.1)
        refused = await call(page, "join", removed.credentials, removed.peer_id)
        assert refused == {"error": "refused", "janusCode": 403}, refused
        # The control: the same page joins with credentials still granted.
        assert "feed" in await call(page, "join", therapist.credentials, therapist.peer_id)
        await call(page, "leave")
    finally:
        await close(therapist, removed)


async def test_without_rtcrtpscripttransform_it_refuses_to_publish_or_join(
    with_janus: RunningBroker, new_context: NewContext
) -> None:
    links, therapist = await therapist_seat(with_janus)
    try:
        page = await participant(new_context, with_janus)
        await call(page, "setSendKey", KEY, SENDER)
        assert "feed" in await call(page, "join", therapist.credentials, therapist.peer_id)
        await page.evaluate("delete window.RTCRtpScriptTransform")
        assert await call(page, "supported") is False
        assert await call(page, "publish") == {"error": "unsupported", "janusCode": None}
        assert (await call(page, "outbound"))["framesEncoded"] == 0
        listed = await participants(with_janus, therapist.granted.room)
        assert [p["publisher"] for p in listed] == [False], "nothing was published to Janus"
        assert await call(page, "join", therapist.credentials, therapist.peer_id) == {
            "error": "unsupported",
            "janusCode": None,
        }
        await call(page, "leave")
    finally:
        await close(therapist)


async def test_a_sender_that_bypasses_its_transform_hangs_up_the_room(
    with_janus: RunningBroker, new_context: NewContext
) -> None:
    links, therapist = await therapist_seat(with_janus)
    try:
        page = await participant(new_context, with_janus)
        await call(page, "setSendKey", KEY, SENDER)
        assert "feed" in await call(page, "join", therapist.credentials, therapist.peer_id)
        assert await call(page, "publish") == {"ok": True}
        await until(lambda: call(page, "outbound"), lambda o: o["framesEncoded"] >= 15, "video is sent")
        assert (await call(page, "seen"))["failed"] == []  # sealed frames: nothing to catch
        await call(page, "unprotect", "video")
        seen = await until(lambda: call(page, "seen"), lambda s: s["failed"], "the bypass is caught")
        assert seen["failed"] == ["bypassed"], seen
        await until(
            lambda: participants(with_janus, therapist.granted.room), lambda p: p == [], "the page left the room"
        )
    finally:
        await close(therapist)


async def test_bad_credentials_a_name_for_display_or_no_vp8_are_refused(
    with_janus: RunningBroker, new_context: NewContext
) -> None:
    links, therapist = await therapist_seat(with_janus)
    try:
        page = await participant(new_context, with_janus)
        await call(page, "setSendKey", KEY, SENDER)
        malformed = {"error": "malformed", "janusCode": None}
        # Janus may know a participant by its opaque peer id only, never a person's name.
        assert await call(page, "join", therapist.credentials, "Ana Lopez") == malformed
        assert await call(page, "join", {**therapist.credentials, "room": "1"}, therapist.peer_id) == malformed
        assert await call(page, "join", {**therapist.credentials, "url": "ftp://x"}, therapist.peer_id) == malformed
        assert await call(page, "join", {**therapist.credentials, "pin": "wrong"}, therapist.peer_id) == {
            "error": "refused",
            "janusCode": 433,
        }
        assert "feed" in await call(page, "join", therapist.credentials, therapist.peer_id)
        await call(page, "withoutVp8")
        assert await call(page, "publish") == {"error": "unsupported", "janusCode": None}
        listed = await participants(with_janus, therapist.granted.room)
        assert [p["publisher"] for p in listed] == [False], "nothing was published to Janus"
        await call(page, "leave")
    finally:
        await close(therapist)
