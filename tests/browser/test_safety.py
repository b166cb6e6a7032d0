"""The client's safety plan and the discreet "I can't talk freely" signal in Chromium (issue 29,
items 3 to 6), in a family session: the therapist and two clients.

Each client leaves a safety plan in the checklist (fields that keep nothing in form history); the
therapist reads it beside the emergency details. In the call, the first client uses the signal in
the call's menu, then types the code word in chat: the therapist's page shows a quiet notice with
the plan within 2 seconds each time, while the broker relays, logs and audits nothing (counted on
the broker and on the client's WebSocket), the client's page shows nothing new but its own chat
line, and the other client gets nothing of the signal, the code word or the plan on any channel.
Then the first client leaves quickly (safety_signal.js ``sendLeftQuickly``, then its leave): the
therapist sees "left quickly" with the plan, not a dropped connection. The second client's page
goes away without a word: the therapist sees its plan again with "connection dropped"."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Locator, Page, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import (
    RECORD_PEER_CONNECTIONS,
    Watch,
    fill_details,
    frames_decoded,
    look,
    start_checklist,
    tick_all,
    wait_device_checks,
    wait_screen,
)
from tests.conftest import RunningBroker, SessionLinks, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

#: Every data-channel message a page receives, in window.__channelMessages (the page's own code
#: still creates and uses each channel; this only listens as well).
RECORD_CHANNEL_MESSAGES = """
(() => {
  const seen = [];
  Object.defineProperty(window, '__channelMessages', { value: seen });
  const native = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = native.apply(this, args);
    channel.addEventListener('message', (event) => seen.push(String(event.data)));
    return channel;
  };
})();
"""
#: What a page shows: its visible text (hidden screens and closed menus are not in it), without what
#: follows the network rather than the people (adapt.js: the connection indicator, its tip, "Video
#: paused"; call.js: each tile's connection state, "Interrupted" while a pair restarts its ICE): on a
#: loaded machine those change by themselves. The screen reader's announcements (visually hidden) are
#: compared apart (ANNOUNCED): each may only be what it was, or one of those network phrases.
VISIBLE_TEXT = """() => {
  const network = [...document.querySelectorAll(
    '[data-testid=connection-indicator], [data-testid=connection-tip], [data-testid=video-paused-notice], ' +
    '[data-testid=peer-state], #announcer, #announcer-urgent')];
  const was = network.map((node) => node.hidden);
  network.forEach((node) => { node.hidden = true; });
  const text = document.body.innerText;
  network.forEach((node, i) => { node.hidden = was[i]; });
  return text;
}"""
#: The same, with the chat log left out too.
TEXT_BUT_CHAT = """() => {
  const log = document.querySelector('[data-testid=chat-log]');
  const network = [...document.querySelectorAll(
    '[data-testid=connection-indicator], [data-testid=connection-tip], [data-testid=video-paused-notice], ' +
    '[data-testid=peer-state], #announcer, #announcer-urgent')];
  const was = network.map((node) => node.hidden);
  [log, ...network].forEach((node) => { node.hidden = true; });
  const text = document.body.innerText;
  log.hidden = false;
  network.forEach((node, i) => { node.hidden = was[i]; });
  return text;
}"""

#: What the page's screen-reader regions announce now (polite, urgent).
ANNOUNCED = "() => ['announcer', 'announcer-urgent'].map((id) => document.getElementById(id)?.textContent ?? '')"
#: The phrases the network, not the people, makes the page announce: adapt.js's and the call's state.
NETWORK_PHRASES = {
    re.sub(r"<[^>]+>", "", text)
    for key, text in json.loads((Path(__file__).parents[2] / "web" / "i18n" / "en.json").read_text()).items()
    if key.startswith(("adapt.", "call.state."))
}


async def announced_as_before(page: Page, before: list[str]) -> None:
    """Each screen-reader region says what it said before, or a network phrase: nothing of the signal."""
    for now, was in zip(await page.evaluate(ANNOUNCED), before, strict=True):
        assert now in (was, "") or now in NETWORK_PHRASES, f"announced: {now!r}"


PLANS = [
    {"code_word": "Is it raining there?", "call_back": "no", "how": "Text first: 0123 456 789"},
    {"code_word": "Blue mug", "call_back": "yes", "how": "Mobile, after 6 pm"},
]
FIELDS = ["#details-location", "#details-contact", "#plan-code-word", "#plan-how", "#plan-call-back"]


@dataclass
class Person:
    page: Page
    peer: str
    sent: list[str] = field(default_factory=list)  # WebSocket frames the page sent
    received: list[str] = field(default_factory=list)  # WebSocket frames the page received

    def watch_socket(self) -> None:
        def on_socket(ws: Any) -> None:
            ws.on("framesent", lambda payload: self.sent.append(_text(payload)))
            ws.on("framereceived", lambda payload: self.received.append(_text(payload)))

        self.page.on("websocket", on_socket)


def audit_lines(running: RunningBroker) -> list[str]:
    path = running.config.audit_path
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@dataclass
class BrokerCounts:
    """What the broker did, counted where it happens: signaling it relayed, audit lines it wrote."""

    relayed: int
    audit: int

    @staticmethod
    def of(running: RunningBroker) -> BrokerCounts:
        return BrokerCounts(sum(running.broker.metrics.relayed.counts.values()), len(audit_lines(running)))


class LogRecords(logging.Handler):
    """Every record the broker's loggers make while attached, at any level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.logger = logging.getLogger("broker")
        self.level_before = self.logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> LogRecords:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)


def _text(payload: Any) -> str:
    return payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")


async def checklist_with_plan(page: Page, plan: dict[str, str], i: int, axe: str | None = None) -> None:
    """The default policy's checklist, with a safety plan on the "Your space" step."""
    await start_checklist(page)
    await wait_device_checks(page)
    await page.click("#step-next")
    await tick_all(page, "space")
    plan_form = page.get_by_test_id("safety-plan")
    await expect(plan_form).to_be_visible()
    await plan_form.locator("summary").click()
    await page.fill("#plan-code-word", plan["code_word"])
    await page.select_option("#plan-call-back", plan["call_back"])
    await page.fill("#plan-how", plan["how"])
    if axe:
        await look(page, axe, "client-safety-plan")
    await page.click("#step-next")
    await tick_all(page, "consent")
    await fill_details(page, f"Room {i}", f"Contact {i}")
    # Nothing the client types is offered back later: autocomplete off, and no form is ever submitted.
    for selector in FIELDS:
        assert await page.get_attribute(selector, "autocomplete") == "off", selector
        assert await page.eval_on_selector(selector, "(e) => e.form === null"), selector
    await page.click("#checklist-submit")
    await wait_screen(page, "waiting")
    for selector in FIELDS:  # emptied once sent
        assert await page.input_value(selector) == "", selector


async def open_family(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe: str
) -> tuple[SessionLinks, Page, list[Person]]:
    links = await schedule(broker, clients=2)
    watch.secrets.extend(links.secrets)
    therapist = await (await new_context()).new_page()
    clients = []
    for link in links.clients:
        context = await new_context()
        await context.add_init_script(RECORD_PEER_CONNECTIONS)
        await context.add_init_script(RECORD_CHANNEL_MESSAGES)
        person = Person(await context.new_page(), links.peers[link])
        person.watch_socket()
        clients.append(person)

    async def client_way_in(person: Person, link: str, i: int) -> None:
        await person.page.goto(link)
        await checklist_with_plan(person.page, PLANS[i], i, axe if i == 0 else None)

    async def therapist_way_in() -> None:
        await therapist.goto(links.therapist)
        await wait_screen(therapist, "dashboard")

    await asyncio.gather(
        therapist_way_in(),
        *(client_way_in(p, link, i) for i, (p, link) in enumerate(zip(clients, links.clients, strict=True))),
    )
    return links, therapist, clients


def seat(therapist: Page, peer: str) -> Locator:
    return therapist.locator(f'[data-testid=seat][data-peer="{peer}"]')


def notice(therapist: Page, peer: str) -> Locator:
    return therapist.locator(f'[data-testid=safety-notice][data-peer="{peer}"]')


async def relays_settled(running: RunningBroker, quiet_s: float = 2.0, within_s: float = 30.0) -> None:
    """The call is set up: the broker has relayed nothing for `quiet_s` (late candidates, rosters)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    before = BrokerCounts.of(running).relayed
    while loop.time() < deadline:
        await asyncio.sleep(quiet_s)
        now = BrokerCounts.of(running).relayed
        if now == before:
            return
        before = now
    pytest.fail("the broker kept relaying signaling long after the call was set up")


def other_session(line: str, session: str) -> bool:
    """A log or audit line that names a session, and not this one."""
    named = re.findall(r'session[=":\s]+"?([A-Za-z0-9_-]+)', line)
    return bool(named) and session not in named


#: What a page sends the broker in a call that has nothing to say to it: keep-alives, and an ICE
#: restart's signaling, which a loaded machine's calls do now and then (a connection gone
#: "disconnected"). The safety signal is none of these: a page that sent it through the broker
#: would send another type.
QUIET_CALL_TYPES = {"ping", "renegotiate", "offer", "answer", "candidate"}


def only_pings(frames: list[str]) -> list[str]:
    """What a page sent besides keep-alives and an ICE restart's signaling."""
    return [f for f in frames if json.loads(f).get("type") not in QUIET_CALL_TYPES]


class SessionRelays:
    """The types of the messages the broker relays in one session, counted where every relay passes
    (``Metrics.relayed_message``, wrapped for the test's while): the shared broker's other sessions
    (another test's, winding down) are not counted."""

    def __init__(self, running: RunningBroker, session: str) -> None:
        self.metrics, self.session, self.types = running.broker.metrics, session, []
        self.original = self.metrics.relayed_message

    def __enter__(self) -> list[str]:
        def counting(message: object, session_id: str, sender: str, recipient: str) -> None:
            if session_id == self.session:
                self.types.append(type(message).__name__.lower())
            self.original(message, session_id, sender, recipient)

        self.metrics.relayed_message = counting  # type: ignore[method-assign]
        return self.types

    def __exit__(self, *_: object) -> None:
        self.metrics.relayed_message = self.original  # type: ignore[method-assign]


async def test_the_signal_and_the_plan_reach_the_therapist_alone_end_to_end(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links, therapist, (first, second) = await open_family(broker, new_context, watch, axe_source)
    plan = PLANS[0]

    # The therapist reads each plan beside the emergency details, before letting anyone in.
    for person, own in ((first, PLANS[0]), (second, PLANS[1])):
        plan_box = seat(therapist, person.peer).locator("details.safety-plan")
        await plan_box.locator("summary").click()
        await expect(plan_box.get_by_test_id("safety-plan-opened")).to_contain_text(own["code_word"])
    await expect(seat(therapist, first.peer).get_by_test_id("safety-plan-opened")).to_contain_text(
        "No — do not call back"
    )
    await expect(seat(therapist, first.peer).get_by_test_id("safety-plan-opened")).to_contain_text(plan["how"])
    await look(therapist, axe_source, "therapist-safety-plan")
    sealed_first = next(json.loads(f)["safety_plan"] for f in first.sent if '"type":"checklist"' in f)
    assert plan["code_word"] not in sealed_first
    for person in (first, second):
        await seat(therapist, person.peer).get_by_test_id("admit").click()
    await frames_decoded(therapist, 2)
    for person in (first, second):
        await wait_screen(person.page, "call")
        await frames_decoded(person.page, 2)
    await relays_settled(broker)

    # A chat message to everyone still reaches the other client (the channel it would see it on works).
    await first.page.get_by_test_id("toggle-chat").click()
    await first.page.fill("[data-testid=chat-input]", "Hello both")
    await first.page.press("[data-testid=chat-input]", "Enter")
    await expect(second.page.get_by_test_id("chat-log")).to_contain_text("Hello both")
    await expect(therapist.get_by_test_id("chat-log")).to_contain_text("Hello both")
    await relays_settled(broker, quiet_s=1.0)

    counts = BrokerCounts.of(broker)
    sent_before = len(first.sent)
    first_text, second_text = await first.page.evaluate(VISIBLE_TEXT), await second.page.evaluate(VISIBLE_TEXT)
    first_said, second_said = await first.page.evaluate(ANNOUNCED), await second.page.evaluate(ANNOUNCED)
    second_messages = await second.page.evaluate("window.__channelMessages.length")
    with LogRecords() as logged, SessionRelays(broker, links.session) as relayed:
        # The control in the call's menu: an ordinary menu item.
        await first.page.get_by_test_id("call-menu").click()
        item = first.page.get_by_test_id("safety-signal")
        await expect(item).to_have_text("Report a connection problem")
        await look(first.page, axe_source, "client-call-menu")
        await item.click()
        await expect(notice(therapist, first.peer)).to_contain_text("may not be able to talk freely", timeout=2000)
        await expect(notice(therapist, first.peer)).to_contain_text("discreet signal")
        await expect(notice(therapist, first.peer).get_by_test_id("safety-plan-opened")).to_contain_text(
            plan["code_word"]
        )
        await look(therapist, axe_source, "therapist-safety-notice")
        await expect(first.page.get_by_test_id("safety-signal")).to_be_hidden()
        assert await first.page.evaluate(VISIBLE_TEXT) == first_text  # the client's screen: as before
        await announced_as_before(first.page, first_said)

        # The code word, typed alone in chat (another case, spacing and punctuation).
        await therapist.locator('[data-testid=safety-notice] button:has-text("Dismiss")').click()
        await expect(notice(therapist, first.peer)).to_have_count(0)
        text_but_chat = await first.page.evaluate(TEXT_BUT_CHAT)
        await first.page.fill("[data-testid=chat-input]", "  is it RAINING there ")
        await first.page.press("[data-testid=chat-input]", "Enter")
        await expect(notice(therapist, first.peer)).to_contain_text("typed their code word", timeout=2000)
        await expect(notice(therapist, first.peer).get_by_test_id("safety-plan-opened")).to_contain_text(plan["how"])
        await expect(therapist.get_by_test_id("chat-log")).to_contain_text("is it RAINING there")
        # On the client's screen, only what every message it sends shows: its own chat line.
        await expect(first.page.get_by_test_id("chat-log").locator("li").last).to_contain_text("is it RAINING there")
        assert await first.page.evaluate(TEXT_BUT_CHAT) == text_but_chat
        await announced_as_before(first.page, first_said)
        await asyncio.sleep(1.5)  # time enough for anything to reach the other client

    # The broker relayed, logged and audited nothing; the client's page sent it nothing but pings.
    # (A line naming another session is another test's, winding down on this shared broker.)
    assert [kind for kind in relayed if kind not in QUIET_CALL_TYPES] == []
    ours = [line for line in audit_lines(broker)[counts.audit :] if not other_session(line, links.session)]
    assert ours == []
    assert [line for line in logged.lines if not other_session(line, links.session)] == []
    assert only_pings(first.sent[sent_before:]) == []
    # The other client: nothing of the signal, the code word or the plan, on any channel or screen.
    assert await second.page.evaluate(VISIBLE_TEXT) == second_text
    await announced_as_before(second.page, second_said)
    arrived = (await second.page.evaluate("window.__channelMessages"))[second_messages:]
    assert not [m for m in arrived if '"safety"' in m or "RAINING" in m], arrived
    everything_second_got = " ".join([*await second.page.evaluate("window.__channelMessages"), *second.received])
    assert sealed_first not in everything_second_got and plan["code_word"] not in everything_second_got
    audit = broker.config.audit_path.read_text(encoding="utf-8")
    assert "RAINING" not in audit.upper() and sealed_first not in audit

    # The first client uses the quick exit ("Leave now"): "left quickly" reaches the therapist
    # before the page goes, and the page lands on the neutral one.
    await first.page.get_by_test_id("quick-exit").click()
    await first.page.wait_for_url("**/today")
    await expect(notice(therapist, first.peer)).to_contain_text("left quickly")
    await expect(notice(therapist, first.peer)).to_have_attribute("data-reason", "left_quickly")
    await expect(notice(therapist, first.peer).get_by_test_id("safety-plan-opened")).to_contain_text(plan["code_word"])
    await expect(seat(therapist, first.peer)).to_have_attribute("data-state", "left")
    await expect(seat(therapist, first.peer)).not_to_contain_text("Connection dropped")
    assert not await second.page.evaluate("window.__channelMessages.some((m) => m.includes('left_quickly'))")

    # The second client's page goes away without a word: its plan comes back with "connection dropped".
    await second.page.context.close()
    dropped = notice(therapist, second.peer)
    await expect(dropped).to_have_attribute("data-reason", "dropped")
    await expect(dropped).to_contain_text("connection dropped")
    await expect(dropped.get_by_test_id("safety-plan-opened")).to_contain_text(PLANS[1]["code_word"])
    await expect(dropped.get_by_test_id("safety-plan-opened")).to_contain_text(re.compile("Yes"))
    await watch.assert_clean()
