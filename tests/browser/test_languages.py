"""The client's pages in the client's language (issue 33): the whole way in and into the call in
Spanish on a phone, a language switch mid-checklist that keeps every answer, the consent accepted
in Spanish recorded with the policy version and the language, and axe clean in both languages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from broker.client.broker_client import BrokerClient
from broker.signaling.protocol import WaitingRoom
from broker.signaling.record import build_record
from broker.webmanifest.release import build_release
from tests.browser.conftest import NewContext
from tests.browser.kit import PHONE, Watch, check_axe, fill_details, tick_all, wait_device_checks, wait_screen
from tests.conftest import RunningBroker, schedule, start_broker
from tests.webmanifest.web_copies import copy_web

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

WEB = Path(__file__).resolve().parents[2] / "web"
ES = json.loads((WEB / "i18n" / "es.json").read_text(encoding="utf-8"))
EN = json.loads((WEB / "i18n" / "en.json").read_text(encoding="utf-8"))


async def phone_page(new_context: NewContext, locale: str) -> Page:
    """A phone whose browser prefers ``locale`` (navigator.languages)."""
    context = await new_context(viewport=PHONE, is_mobile=True, has_touch=True, locale=locale)
    return await context.new_page()


async def test_the_whole_way_in_and_into_the_call_in_spanish(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    peer = links.peers[links.client]
    async with BrokerClient(links.therapist, reconnect=False, agent="test-therapist") as therapist:
        page = await phone_page(new_context, "es-MX")
        await page.goto(links.client)
        await wait_screen(page, "welcome")
        await expect(page.locator("html")).to_have_attribute("lang", "es")
        await expect(page.locator("#welcome-title")).to_have_text(ES["welcome.title"])
        await expect(page.locator("#quick-exit")).to_contain_text(ES["quick_exit.label"])
        await expect(page.get_by_test_id("language-switch")).to_have_value("es")
        # The appointment in Spanish words (Intl with the page's language): a Spanish weekday.
        await expect(page.get_by_test_id("appointment-time")).to_have_text(
            re.compile(r"lunes|martes|miércoles|jueves|viernes|sábado|domingo")
        )
        await check_axe(page, axe_source, "es-welcome")
        await page.click("#welcome-start")
        await wait_screen(page, "checklist")
        await expect(page.get_by_test_id("checklist-progress")).to_have_text("Paso 1 de 3: Su dispositivo")
        await wait_device_checks(page)
        await expect(page.get_by_test_id("device-summary")).to_have_text(ES["device.summary_ready"])
        await page.locator("#device-details summary").click()
        await expect(page.get_by_test_id("item-camera").locator(".text")).to_contain_text(
            "Su cámara funciona y puede verse en la vista previa."
        )
        await check_axe(page, axe_source, "es-checklist-device")
        await page.click("#step-next")
        await expect(page.locator("#step-space h2")).to_have_text(ES["space.title"])
        await expect(page.locator("label[for=answer-private_place]")).to_contain_text(
            "Estoy en un lugar privado donde nadie puede oírme."
        )
        await expect(page.locator("label[for=answer-private_place] .level")).to_have_text("(necesario)")
        await tick_all(page, "space")
        await check_axe(page, axe_source, "es-checklist-space")
        await page.click("#step-next")
        await expect(page.get_by_test_id("consent-text")).to_contain_text("Riesgo de daño.")
        await expect(page.get_by_test_id("consent-text")).to_have_attribute("lang", "es")
        # A required field left empty: the page says so in Spanish.
        await tick_all(page, "consent")
        await page.click("#checklist-submit")
        await expect(page.get_by_test_id("checklist-error")).to_have_text(ES["problem.details"])
        await fill_details(page, "Casa, calle Olmo 4", "Ana, 0123 456")
        await check_axe(page, axe_source, "es-checklist-consent")
        await page.click("#checklist-submit")
        await wait_screen(page, "waiting")
        await expect(page.locator("#waiting-title")).to_have_text(ES["waiting.title"])
        await check_axe(page, axe_source, "es-waiting")
        room = await therapist.expect(
            WaitingRoom, where=lambda m: any(s.peer == peer and s.state.value == "waiting" for s in m.seats), timeout=30
        )
        entry = next(s for s in room.seats if s.peer == peer)
        # What the therapist sees of the checklist: passed, for this policy version, read in Spanish.
        assert entry.checklist is not None and entry.checklist["language"] == "es"
        await therapist.admit(peer)
        await wait_screen(page, "call")
        await expect(page.locator("#call-title")).to_have_text(ES["page.brand"])
        await expect_call_screen_in_spanish(page)
        await check_axe(page, axe_source, "es-call")
        # The chat, opened: its heading, its hint and its button in Spanish too.
        await page.get_by_test_id("toggle-chat").click()
        await expect(page.locator("#chat-title")).to_have_text(ES["call.chat_title"])
        await expect(page.locator("#chat-panel .hint")).to_have_text(ES["call.chat_hint"])
        await expect(page.locator("#chat-panel button[type=submit]")).to_have_text(ES["call.send"])
        await check_axe(page, axe_source, "es-call-chat")
    await watch.assert_clean()


#: What the call screen's status line may say while the call is being set up, in Spanish.
CALL_STATES = ("call.connecting", "call.state.connected", "call.state.waiting_other", "call.state.nobody_yet")


async def expect_call_screen_in_spanish(page: Page) -> None:
    """The call screen's own words (call.js, adapt.js, media_mode.js, safety_signal.js) are the
    Spanish catalogue's, read from es.json: none of them is left in English."""
    await expect(page.get_by_test_id("toggle-mic").locator(".label")).to_have_text(ES["call.mute"])
    await expect(page.get_by_test_id("toggle-camera").locator(".label")).to_have_text(ES["call.stop_camera"])
    await expect(page.get_by_test_id("toggle-chat").locator(".label")).to_have_text(ES["call.chat"])
    await expect(page.get_by_test_id("leave").locator(".label")).to_have_text(ES["leave.confirm"])
    await expect(page.get_by_test_id("call-menu").locator(".label")).to_have_text(ES["safety.more"])
    # The default signal's words are the page's own, in Spanish (the policy kept the default).
    await expect(page.get_by_test_id("safety-signal")).to_have_text(ES["safety.signal_default"], use_inner_text=False)
    await expect(page.locator("label[for=call-mode]")).to_have_text(ES["call.mode"])
    await expect(page.locator("#call-mode option[value=audio_only]")).to_have_text(ES["mode.audio_only"])
    await expect(page.locator("section.callbar")).to_have_attribute("aria-label", ES["call.controls"])
    await expect(page.get_by_test_id("connection-indicator")).to_have_text(ES["adapt.good"])
    await expect(page.locator(".selfview video")).to_have_attribute("aria-label", ES["call.self_video"])
    await expect(page.get_by_test_id("call-state")).to_have_text(
        re.compile("|".join(re.escape(ES[k]) for k in CALL_STATES))
    )
    english = [EN[k] for k in ("call.mute", "call.stop_camera", "call.controls", "adapt.good", "call.connecting")]
    text = await page.locator("#screen-call").inner_text()
    assert not [word for word in english if word in text], "English left on the call screen"


async def test_switching_language_mid_checklist_keeps_the_answers(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    page = await phone_page(new_context, "en-GB")
    await page.goto(links.client)
    await wait_screen(page, "welcome")
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await page.click("#welcome-start")
    await wait_device_checks(page)
    await page.click("#step-next")
    await page.check("#answer-private_place")
    await page.check("#answer-notifications_off")
    await page.locator("#safety-plan summary").click()
    await page.fill("#plan-code-word", "lovely weather")
    await page.select_option("#plan-call-back", "no")
    # Spanish, then back: the ticks, the words typed and the choice stay; the texts change.
    await page.get_by_test_id("language-switch").select_option("es")
    await expect(page.locator("html")).to_have_attribute("lang", "es")
    await expect(page.locator("#step-space h2")).to_have_text(ES["space.title"])
    await expect(page.get_by_test_id("checklist-progress")).to_have_text("Paso 2 de 3: Su espacio")
    await expect(page.locator("label[for=answer-private_place] > span").first).to_have_text(
        "Estoy en un lugar privado donde nadie puede oírme."
    )
    await expect(page.locator("#stepper li").first).to_contain_text(ES["step.device"])
    assert await page.is_checked("#answer-private_place") and await page.is_checked("#answer-notifications_off")
    assert not await page.is_checked("#answer-private_device")
    await expect(page.get_by_test_id("plan-code-word")).to_have_value("lovely weather")
    await expect(page.get_by_test_id("plan-call-back")).to_have_value("no")
    await expect(page.locator("#plan-call-back option[value=no]")).to_have_text(ES["plan.call_back_no"])
    await check_axe(page, axe_source, "es-switched-space")
    # The device step was checked in English: its statuses follow the switch too.
    await page.click("#step-back")
    await expect(page.get_by_test_id("device-summary")).to_have_text(ES["device.summary_ready"])
    await page.get_by_test_id("language-switch").select_option("en")
    await expect(page.get_by_test_id("device-summary")).to_have_text(EN["device.summary_ready"])
    await page.click("#step-next")
    assert await page.is_checked("#answer-private_place")
    await expect(page.get_by_test_id("plan-code-word")).to_have_value("lovely weather")
    await expect(page.locator("#step-space h2")).to_have_text(EN["space.title"])
    # Nothing of the choice is kept: no storage but what the page kept for a reload before.
    assert await page.evaluate("localStorage.length") == 0
    assert await page.evaluate("Object.keys(sessionStorage).every((k) => k.startsWith('tt.'))")
    await watch.assert_clean()


async def test_the_consent_accepted_in_spanish_is_recorded_with_policy_version_and_language(
    broker: RunningBroker, new_context: NewContext, watch: Watch
) -> None:
    """The therapist scheduled the seat in Spanish (?lang=es in the link); the client's browser
    prefers English. The page starts in Spanish, and what the broker keeps of the accepted
    checklist says which policy version and which language: nothing else."""
    links = await schedule(broker, clients=1)
    watch.secrets.append(links.link_key)
    link = links.client.replace("#", "?lang=es#", 1)
    page = await phone_page(new_context, "en-US")
    await page.goto(link)
    await wait_screen(page, "welcome")
    await expect(page.locator("html")).to_have_attribute("lang", "es")
    assert page.url.endswith("/j?lang=es"), "the neutral address keeps only the language, for a reload"
    await page.click("#welcome-start")
    await wait_device_checks(page)
    await page.click("#step-next")
    await tick_all(page, "space")
    await page.click("#step-next")
    await tick_all(page, "consent")
    await fill_details(page, "Casa", "Ana, 0123 456")
    await page.click("#checklist-submit")
    await wait_screen(page, "waiting")
    session = await broker.hub.get_session(links.session)
    assert session is not None
    seat = session.seat(links.peers[links.client])
    kept = seat.checklist or {}
    assert kept["language"] == "es" and kept["all_required_met"] is True
    assert kept["policy_version"] == broker.hub.checklist.policy.version
    record = build_record(session, ended=0, reason="ended", verification=None)
    [client] = [s for s in record["seats"] if s["role"] == "client"]
    assert client["checklist_language"] == "es" and client["checklist_policy_version"] == kept["policy_version"]
    # A reload starts in the link's language again.
    await page.reload()
    await expect(page.locator("html")).to_have_attribute("lang", "es")
    await watch.assert_clean()


async def test_english_pages_are_axe_clean_after_a_switch_back(
    broker: RunningBroker, new_context: NewContext, watch: Watch, axe_source: str
) -> None:
    page = await phone_page(new_context, "es-ES")
    await page.goto(broker.url + "/")
    await expect(page.locator("#index-title")).to_have_text(ES["index.title"])
    await check_axe(page, axe_source, "es-index")
    await page.get_by_test_id("language-switch").select_option("en")
    await expect(page.locator("#index-title")).to_have_text(EN["index.title"])
    await expect(page).to_have_title(EN["index.brand"])
    await check_axe(page, axe_source, "en-index")
    # A link that does not work: the broker's notice page, shown in the client's language.
    await page.goto(broker.url + "/j/" + "A" * 43 + "?lang=es")
    await expect(page.locator("h1")).to_have_text(ES["notice.invalid_token.title"])
    await expect(page.locator("main p")).to_have_text(ES["notice.invalid_token.message"])
    await check_axe(page, axe_source, "es-notice")
    await watch.assert_clean()


async def test_a_catalogue_altered_after_the_release_is_not_used(
    tmp_path: Path, new_context: NewContext, watch: Watch
) -> None:
    """A catalogue is fetched with the SHA-384 the release pinned (web/js/catalogues.js, itself
    pinned by the import map): one altered on the broker's disk is refused by the browser, and the
    page stays in English rather than show words nobody signed."""
    root = copy_web(tmp_path)
    build_release(root)
    spanish = root / "i18n" / "es.json"
    spanish.write_text(spanish.read_text(encoding="utf-8").replace(ES["index.title"], "ALTERED"), encoding="utf-8")
    running = await start_broker(tmp_path / "data", web_root=str(root))
    try:
        page = await phone_page(new_context, "es-ES")
        await page.goto(running.url + "/")
        await expect(page.locator("html")).to_have_attribute("lang", "en")
        await expect(page.get_by_test_id("language-switch")).to_have_value("en")
        await expect(page.locator("#index-title")).to_have_text(EN["index.title"])
        assert "ALTERED" not in await page.content()
        assert any("integrity" in e.lower() for e in watch.console_errors), watch.console_errors
    finally:
        await running.stop()


async def test_the_page_offers_only_the_practices_languages(
    tmp_path: Path, new_context: NewContext, watch: Watch
) -> None:
    """A practice that offers English only (BROKER_LANGUAGES=en): a link asking for Spanish, in a
    Spanish browser, ends up in English once the page has joined, and the switch offers nothing else."""
    running = await start_broker(tmp_path / "data", languages=("en",))
    try:
        links = await schedule(running, clients=1)
        watch.secrets.append(links.link_key)
        page = await phone_page(new_context, "es-ES")
        await page.goto(links.client.replace("#", "?lang=es#", 1))
        await wait_screen(page, "welcome")
        await expect(page.locator("html")).to_have_attribute("lang", "en")
        await expect(page.locator("#welcome-title")).to_have_text(EN["welcome.title"])
        await expect(page.locator("#language-switch option")).to_have_count(1)
    finally:
        await running.stop()
    await watch.assert_clean()


async def test_a_switch_leaves_the_practices_own_words_alone(
    tmp_path: Path, new_context: NewContext, watch: Watch
) -> None:
    """The practice's name is the practice's: no catalogue replaces it when the client switches."""
    running = await start_broker(tmp_path / "data", practice_name="Consultorio Río")
    try:
        links = await schedule(running, clients=1)
        watch.secrets.append(links.link_key)
        page = await phone_page(new_context, "en-US")
        await page.goto(links.client)
        await wait_screen(page, "welcome")
        await expect(page.locator("#practice-name")).to_have_text("Consultorio Río")
        await page.get_by_test_id("language-switch").select_option("es")
        await expect(page.locator("#welcome-title")).to_have_text(ES["welcome.title"])
        await expect(page.locator("#practice-name")).to_have_text("Consultorio Río")
    finally:
        await running.stop()
    await watch.assert_clean()


async def test_a_catalogue_that_never_answers_does_not_hold_the_page(
    broker: RunningBroker, new_context: NewContext
) -> None:
    """The Spanish catalogue's request is left hanging: the page gives up on it after its bounded
    tries (i18n.js: 5 s each, three at most) and goes on in English instead of staying on
    "Opening your session…"."""
    links = await schedule(broker)
    page = await phone_page(new_context, "es-ES")
    await page.route("**/static/i18n/es.json", lambda route: None)  # never answered
    await page.goto(links.client)
    await wait_screen(page, "welcome", timeout=40_000)
    await expect(page.locator("html")).to_have_attribute("lang", "en")
    await expect(page.locator("#welcome-title")).to_have_text(EN["welcome.title"])
