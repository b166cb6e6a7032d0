"""A malicious relay between a page and the broker swaps the DTLS fingerprint in the SDP it
passes on (a man in the middle): the receiving page refuses the connection and shows the
full interception warning."""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import Page, WebSocketRoute, expect

from tests.conftest import RunningBroker, schedule

from .conftest import NewContext
from .kit import Watch, look, pass_checklist, wait_screen

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

FINGERPRINT = re.compile(r"(a=fingerprint:sha-256 )([0-9A-F]{2})")


def swap_fingerprint(sdp: str) -> str:
    """What an attacker in the middle does: put its own certificate's fingerprint in."""
    return FINGERPRINT.sub(lambda m: m.group(1) + ("00" if m.group(2) != "00" else "11"), sdp)


async def relay_rewriting(page: Page, kind: str) -> list[str]:
    """Route the page's WebSocket through a relay that rewrites every `kind` it delivers."""
    rewritten: list[str] = []

    def handler(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            if isinstance(message, str) and f'"type":"{kind}"' in message:
                data = json.loads(message)
                data["sdp"] = swap_fingerprint(data["sdp"])
                rewritten.append(kind)
                message = json.dumps(data)
            ws.send(message)

        server.on_message(to_page)

    await page.route_web_socket(re.compile(r"/ws$"), handler)
    return rewritten


@pytest.mark.parametrize("victim", ["client", "therapist"])
async def test_swapped_fingerprint_is_refused_with_a_warning(
    victim: str, broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client = await (await new_context()).new_page()
    therapist = await (await new_context()).new_page()
    target = client if victim == "client" else therapist
    rewritten = await relay_rewriting(target, "offer" if victim == "client" else "answer")

    await client.goto(links.client)
    await pass_checklist(client)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()

    await wait_screen(target, "interception")
    assert rewritten, "the relay saw the description it attacks"
    alert = target.locator("#screen-interception [role=alert]")
    await expect(alert).to_contain_text("What to do now")
    await expect(target.locator("#interception-reason")).to_contain_text("bad mac")
    # Nothing got through: the victim has no connected tile.
    await expect(target.locator("[data-testid=tile][data-state=connected]")).to_have_count(0)
    await look(target, axe_source, f"{victim}-interception-warning")
    if victim == "client":
        await client.click("#interception-close")
        await wait_screen(client, "ended")
        await expect(client.locator("#ended-message")).to_contain_text("new link")
    else:
        await therapist.click("#interception-back")
        await wait_screen(therapist, "dashboard")
    await watch.assert_clean()
