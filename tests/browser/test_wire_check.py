"""The page checks what the broker sends against the same definitions the Python client decodes with.

web/js/wire_check.js with the generated web/js/wire_schema.js, in Debian's Chromium: it accepts a
sample of every server message (tests/contract/samples.py) and refuses malformed ones (a required
field missing, a wrong type, an extra field where the schema forbids it, a string too long, ...),
naming the field and never a value; on every case its verdict is the Python decoder's
(``decode_server``, msgspec). Then a broker gone bad sends malformed messages to a real join page:
the page drops each with a console event and carries on into the call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from broker.client.broker_client import BrokerClient
from broker.signaling import protocol as p
from broker.signaling.protocol import Peers, WaitingRoom, decode_server, encode
from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, pass_checklist, wait_screen, web_dir_site
from tests.client.test_refused_frames import MALFORMED, MARKER, MalformingTransport, malforming  # noqa: F401
from tests.conftest import RunningBroker, schedule
from tests.contract.samples import CANDIDATE, OTHER, PEER, SDP, SEALED, server_samples, wire_type

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

RELAYED = {"offer", "answer", "candidate", "renegotiate", "roster"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def checker(chromium: Browser) -> AsyncIterator[Page]:
    """A blank page with the repo's web/ at /static/ and web/js/wire_check.js imported."""
    async with web_dir_site() as base:
        context = await chromium.new_context()
        page = await context.new_page()
        await page.goto(base + "/")
        await page.evaluate("async () => { window.wire = await import('/static/js/wire_check.js'); }")
        yield page
        await context.close()


async def verdicts(page: Page, frames: list[str]) -> list[dict[str, str] | None]:
    """The page's answer for each frame's text, parsed as protocol.js parses it."""
    result: list[dict[str, str] | None] = await page.evaluate(
        """(texts) => texts.map((text) => {
            let message;
            try { message = JSON.parse(text); } catch { message = undefined; }
            return window.wire.checkServerMessage(message);
        })""",
        frames,
    )
    return result


def python_accepts(frame: str) -> bool:
    try:
        decode_server(frame)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    return True


def as_dict(message: msgspec.Struct) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(encode(message))
    return decoded


def wrong_type(value: Any) -> Any:
    """A JSON value of another type than ``value``'s."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "1"
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        return {}
    return []  # an object, or null


def malformed_cases() -> list[tuple[str, dict[str, Any] | list[Any] | str | int | None, str, str]]:
    """(what, frame, the field named, the reason or reasons): every one refused. A field whose value
    is one of a list (an enum) says ``enum`` for a value of the wrong type too."""
    cases: list[tuple[str, Any, str, str]] = []
    for sample in server_samples():
        frame = as_dict(sample)
        kind = wire_type(sample)
        for field in msgspec.structs.fields(sample):
            if field.required:
                cases.append(
                    (
                        f"{kind} without {field.encode_name}",
                        _without(frame, field.encode_name),
                        field.encode_name,
                        "missing",
                    )
                )
            if field.encode_name in frame:
                changed = {**frame, field.encode_name: wrong_type(frame[field.encode_name])}
                cases.append((f"{kind} with a wrong {field.encode_name}", changed, field.encode_name, "type|enum"))
        if kind in RELAYED:
            cases.append((f"{kind} with an extra field", {**frame, MARKER: 1}, "(message)", "extra_field"))
        cases.append((f"{kind} with a wrong type", {**frame, "type": 7}, "type", "enum"))
    relayed = {"type": "candidate", "to": PEER, "from": OTHER, "seq": 3}
    offer = {"type": "offer", "to": PEER, "from": OTHER, "seq": 2}
    peers = as_dict(p.Peers(peers=[p.PeerInfo(peer=PEER, role=p.Role.CLIENT, connected=True, you_offer=True)]))
    room = next(as_dict(s) for s in server_samples() if isinstance(s, p.WaitingRoom))
    cases += [
        ("a candidate line too long", {**relayed, "candidate": "x" * 1025}, "candidate", "length"),
        (
            "a candidate of 1,025 characters outside the BMP",
            {**relayed, "candidate": "\U0001f600" * 1025},
            "candidate",
            "length",
        ),
        ("an SDP too long", {**offer, "sdp": "v" * (48 * 1024 + 1)}, "sdp", "length"),
        ("a sender id too long", {**offer, "sdp": SDP, "from": "a" * 65}, "from", "length"),
        ("a sender id with a space", {**offer, "sdp": SDP, "from": "a b"}, "from", "pattern"),
        ("a sealed text too short", {**offer, "sealed": "A" * 38 + "w", "counter": 1}, "sealed", "length"),
        ("a sealed text not base64url", {**offer, "sealed": "A" * 43 + "!", "counter": 1}, "sealed", "pattern"),
        ("a negative seq", {**offer, "sdp": SDP, "seq": -1}, "seq", "range"),
        (
            "an mline index over 255",
            {**relayed, "candidate": CANDIDATE, "sdp_mline_index": 256},
            "sdp_mline_index",
            "range",
        ),
        ("an offer in both forms", {**offer, "sdp": SDP, "sealed": SEALED, "counter": 1}, "(message)", "form"),
        ("an offer in neither form", offer, "(message)", "form"),
        (
            "a sealed candidate with its line",
            {**relayed, "sealed": SEALED, "counter": 1, "candidate": CANDIDATE},
            "(message)",
            "form",
        ),
        (
            "a peer with an unknown role",
            {**peers, "peers": [{**peers["peers"][0], "role": MARKER}]},
            "peers[0].role",
            "enum",
        ),
        (
            "a peer entry without you_offer",
            _nested_without(peers, "peers", "you_offer"),
            "peers[0].you_offer",
            "missing",
        ),
        (
            "an other device in an unknown state",
            {
                **room,
                "seats": [{**room["seats"][0], "other_device": {**room["seats"][0]["other_device"], "state": "x"}}],
            },
            "seats[0].other_device.state",
            "enum",
        ),
        ("an error code that does not exist", {"type": "error", "code": MARKER, "message": "m"}, "code", "enum"),
        ("a pong with a float", {"type": "pong", "n": 1.5}, "n", "type"),
        ("an unknown type", {"type": MARKER}, "type", "enum"),
        ("no type", {"peers": []}, "type", "enum"),
        ("an array", [1], "(message)", "type"),
        ("null", None, "(message)", "type"),
        ("a number", 7, "(message)", "type"),
    ]
    return cases


def _without(frame: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != name}


def _nested_without(frame: dict[str, Any], array: str, name: str) -> dict[str, Any]:
    return {**frame, array: [_without(frame[array][0], name)]}


async def test_every_server_message_sample_is_accepted(checker: Page) -> None:
    samples = server_samples()
    assert {wire_type(s) for s in samples} == set(p.server_message_types())
    frames = [encode(s).decode() for s in samples]
    extras = [json.dumps({**as_dict(s), "later_field": 1}) for s in samples if wire_type(s) not in RELAYED]
    more = [
        json.dumps({"type": "candidate", "to": PEER, "candidate": "\U0001f600" * 1024, "from": OTHER}),  # 1,024 chars
        json.dumps({"type": "candidate", "to": PEER, "candidate": "", "sdp_mid": None, "sdp_mline_index": None}),
        json.dumps({"type": "welcome", "protocol": 1, "heartbeat_s": 20, "auth_deadline_s": 5, "max_message_bytes": 1}),
    ]
    for frame in [*frames, *extras, *more]:
        assert python_accepts(frame), frame[:200]
    assert await verdicts(checker, [*frames, *extras, *more]) == [None] * (len(frames) + len(extras) + len(more))


async def test_malformed_server_messages_are_refused_by_field_never_by_value(checker: Page) -> None:
    cases = malformed_cases()
    frames = [json.dumps(frame, ensure_ascii=False) for _what, frame, _field, _reason in cases]
    got = await verdicts(checker, frames)
    for (what, _frame, field, reason), frame, verdict in zip(cases, frames, got, strict=True):
        assert not python_accepts(frame), f"the Python client accepts {what}: the case is not malformed"
        assert verdict is not None, f"the page accepted {what}"
        assert verdict["field"] == field and verdict["reason"] in reason.split("|"), (what, verdict)
        assert MARKER not in json.dumps(verdict), f"{what}: the verdict quotes the frame"
    named = {v["type"] for v in got if v is not None}
    assert named <= {*p.server_message_types(), "unknown"}


async def test_frames_that_are_not_json_are_refused(checker: Page) -> None:
    got = await verdicts(checker, ["", "{", MARKER, '{"type":"pong"} x'])
    assert [(v or {}).get("field") for v in got] == ["(message)"] * 4
    assert all(v is not None and v["type"] == "unknown" for v in got)


# -- a real join page, its broker gone bad ------------------------------------------------------


async def test_the_join_page_drops_malformed_messages_and_carries_on(
    broker: RunningBroker,
    malforming: list[MalformingTransport],  # noqa: F811 - the fixture, imported
    new_context: NewContext,
    watch: Watch,
) -> None:
    """Before the page's first ``status`` the broker sends every frame of MALFORMED (among them a
    ``status`` saying "admitted" and a ``joined`` for another session): the page drops each with a
    console warning naming its type and field, shows none of it, and goes through the checklist and
    the waiting room into the call."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    therapist = BrokerClient(links.therapist, reconnect=False, agent="test-therapist")
    await therapist.connect()
    try:
        context = await new_context()
        page = await context.new_page()
        warnings: list[str] = []
        page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
        await page.goto(links.client)
        await wait_screen(page, "welcome")
        await pass_checklist(page)
        refused = [w for w in warnings if w.startswith("event=server_message_refused")]
        assert sorted(w.split()[1] for w in refused) == sorted(f"type={kind}" for kind, _frame in MALFORMED)
        assert all(" field=" in w and " reason=" in w for w in refused)
        assert not any(MARKER in w for w in warnings), "a refused frame's content reached the console"

        peer = links.peers[links.client]
        await therapist.expect(
            WaitingRoom, where=lambda m: any(s.peer == peer and s.state.value == "waiting" for s in m.seats)
        )
        await therapist.admit(peer)
        await wait_screen(page, "call")
        await therapist.wait_connected(peer, timeout=30)
        await therapist.expect(Peers, where=lambda m: any(x.peer == peer for x in m.peers))
        assert any(t.sent_malformed for t in malforming)
        await watch.assert_clean()
    finally:
        await therapist.close()
