"""The therapist's "Admit" is never lost (web/js/therapist.js; docs/protocol.md `admit`).

A press is lost neither on the way nor to a redraw of the seat list.

`admit` has no reply of its own. A press made while the therapist's socket was reconnecting, or
whose message was lost with a socket that dropped, used to do nothing: the client waited on while
the page said "Admitting". Here a relay between the therapist's page and the broker swallows the
first `admit` the page sends; the page sends it again while the seat still waits, and the client
is let in.
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import WebSocketRoute, expect

from tests.browser.conftest import NewContext
from tests.browser.kit import Watch, pass_checklist, wait_screen
from tests.conftest import RunningBroker, schedule

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]


async def test_an_admit_lost_on_the_way_is_sent_again_until_the_client_is_in(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    client = await (await new_context()).new_page()
    therapist = await (await new_context()).new_page()
    admits: list[str] = []

    def lose_the_first_admit(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_broker(message: str | bytes) -> None:
            if isinstance(message, str) and json.loads(message).get("type") == "admit":
                admits.append(message)
                if len(admits) == 1:
                    return  # lost on the way
            server.send(message)

        ws.on_message(to_broker)

    await therapist.route_web_socket(re.compile(r"/ws$"), lose_the_first_admit)
    await client.goto(links.client)
    await pass_checklist(client)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    await therapist.get_by_test_id("admit").click()

    await wait_screen(client, "call", timeout=20_000)
    assert len(admits) >= 2, admits
    assert all(json.loads(a) == {"type": "admit", "peer": links.peers[links.client]} for a in admits)


async def test_a_waiting_seats_buttons_stay_the_same_elements_while_others_arrive(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """The seat list is drawn again at every change of any seat; a seat whose drawing did not change
    keeps its elements, so a press on its "Admit" in progress is not lost to a redraw (in a group,
    somebody arrives or reconnects every few seconds)."""
    links = await schedule(broker, clients=2)
    watch.secrets.extend([links.link_key, *links.seat_keys.values()])
    first, second = [await (await new_context()).new_page() for _ in range(2)]
    therapist = await (await new_context()).new_page()
    await first.goto(links.clients[0])
    await pass_checklist(first)
    await therapist.goto(links.therapist)
    await wait_screen(therapist, "dashboard")
    seat = f'[data-testid=seat][data-peer="{links.peers[links.clients[0]]}"]'
    button = await therapist.locator(f"{seat} [data-testid=admit]").element_handle()
    assert button is not None

    await second.goto(links.clients[1])  # the other seat: checking, then waiting
    await pass_checklist(second)
    other = therapist.locator(f'[data-testid=seat][data-peer="{links.peers[links.clients[1]]}"]')
    await expect(other).to_have_attribute("data-state", "waiting")
    assert await button.evaluate("(b) => b.isConnected"), "the waiting seat's button was drawn anew"
    await button.click()
    await wait_screen(first, "call", timeout=20_000)
