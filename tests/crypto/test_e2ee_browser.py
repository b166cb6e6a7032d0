"""web/js/e2ee.js (and web/js/safety_plan.js) in Debian's Chromium: every shared vector, and MACs, sealed signaling and
sealed details crossing between the browser and the Python modules in broker/crypto/ in both directions."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Page, async_playwright

from broker.crypto.link_key import b64url_encode, decode_link_key, derive_auth_key, new_link_key, pair_key
from broker.crypto.roster import RosterEntry, parse_roster_plaintext
from broker.crypto.safety_plan import SafetyPlan, open_safety_plan, seal_safety_plan
from broker.crypto.sdp_auth import InterceptionError, Trust, fingerprint_of, safety_code
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.crypto.sealed_for_therapist import DetailsError, open_checklist, open_details, seal_checklist, seal_details
from broker.crypto.sealed_signaling import (
    MAX_SEALED_CHARS,
    MAX_SEALED_PLAINTEXT,
    MAX_SEALS_PER_KEY,
    derive_seal_key,
    open_signal,
    signal_plaintext,
)
from broker.crypto.seat_keys import seat_key
from broker.crypto.waiting_note import open_note, seal_note
from tests.browser.kit import web_dir_site

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

REPO = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads((REPO / "tests" / "vectors" / "e2ee.json").read_text(encoding="utf-8"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
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


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url() -> AsyncIterator[str]:
    """The repo's web/ at /static/ plus a blank page, on a free loopback port."""
    async with web_dir_site("/call") as base:
        yield base


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def page(base_url: str) -> AsyncIterator[Page]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
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
            decode_link_key(text)
        assert message == str(err.value)  # same words in both languages
    assert len(set(got["fresh"])) == 20
    assert all(len(decode_link_key(k)) == 32 for k in got["fresh"])


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


async def test_seal_vectors(page: Page) -> None:
    got = await page.evaluate(
        """async (v) => ({
          keys: await Promise.all(v.seal_key.map(async (c) => {
            const kAuth = await e2ee.deriveAuthKey(e2ee.decodeLinkKey(c.link_key), c.session_id);
            const kPair = await e2ee.pairKey(kAuth, c.sender, c.recipient);
            return [hex(kPair), hex(await e2ee.deriveSealKey(kPair, c.sender, c.recipient))];
          })),
          aad: v.seal_aad.map((c) => hex(e2ee.sealAad(c.session_id, c.sender, c.recipient, c.type, c.counter))),
          plaintexts: v.signal_plaintext.map((c) => [
            e2ee.signalPlaintext(c.type, c.fields), e2ee.parseSignalPlaintext(c.type, c.plaintext)]),
          sealed: await Promise.all(v.sealed.map(async (c) => {
            const key = e2ee.decodeLinkKey(c.link_key);
            const kAuth = await e2ee.deriveAuthKey(key, c.session_id);
            const kSeal = await e2ee.deriveSealKey(
              await e2ee.pairKey(kAuth, c.sender, c.recipient), c.sender, c.recipient);
            const plaintext = e2ee.signalPlaintext(c.type, c.fields);
            const sealed = await e2ee.sealSignal(kSeal, c.session_id, c.sender, c.recipient, c.type,
              c.counter, plaintext, {nonce: fromHex(c.nonce_hex)});
            const receiver = new e2ee.SdpAuthenticator(key, c.session_id, c.recipient);
            const opened = await receiver.unseal(c.sender, c.type, c.counter, c.sealed);
            const again = await reasonOf(receiver.unseal(c.sender, c.type, c.counter, c.sealed));
            return [sealed, opened, again];
          })),
          invalid: await Promise.all(v.sealed_invalid.map((c) => reasonOf(e2ee.openSignal(
            fromHex(c.k_seal_hex), c.session_id, c.sender, c.recipient, c.type, c.counter, c.sealed)))),
        })""",
        VECTORS,
    )
    assert got["keys"] == [[c["k_pair_hex"], c["k_seal_hex"]] for c in VECTORS["seal_key"]]
    assert got["aad"] == [c["hex"] for c in VECTORS["seal_aad"]]
    assert got["plaintexts"] == [[c["plaintext"], c["fields"]] for c in VECTORS["signal_plaintext"]]
    assert got["sealed"] == [[c["sealed"], c["fields"], "replayed_counter"] for c in VECTORS["sealed"]]
    assert got["invalid"] == [c["reason"] for c in VECTORS["sealed_invalid"]]


async def test_seat_key_and_roster_vectors(page: Page) -> None:
    """Every seat-key and roster vector group (docs/protocol.md 7.1, 7.8) against e2ee.js."""
    got = await page.evaluate(
        """async (v) => {
          const secret = (c) => e2ee.decodeLinkKey(c.session_secret);
          const b64 = e2ee.b64urlEncode;
          return {
            seat: await Promise.all(v.seat_key.map(async (c) =>
              b64(await e2ee.seatKey(secret(c), c.session_id, c.peer)))),
            group: await Promise.all(v.group_key.map(async (c) => b64(await e2ee.groupKey(secret(c), c.session_id)))),
            pairs: await Promise.all(v.client_pair_key.map(async (c) =>
              b64(await e2ee.clientPairKey(secret(c), c.session_id, c.a, c.b)))),
            plaintexts: v.roster_plaintext.map((c) => {
              const parsed = e2ee.parseRosterPlaintext(c.plaintext);
              return [e2ee.rosterPlaintext(c.version, c.peers), e2ee.rosterPlaintext(parsed.version, parsed.peers)];
            }),
            rosters: await Promise.all(v.roster.map(async (c) => {
              const pairLink = await e2ee.pairLinkKey(secret(c), c.session_id, c.recipient);
              const kAuth = await e2ee.deriveAuthKey(pairLink, c.session_id);
              const kSeal = await e2ee.deriveSealKey(
                await e2ee.pairKey(kAuth, c.sender, c.recipient), c.sender, c.recipient);
              const sealed = await e2ee.sealSignal(kSeal, c.session_id, c.sender, c.recipient, 'roster',
                c.counter, c.plaintext, {nonce: fromHex(c.nonce_hex)});
              // The client holds only its seat key; the therapist derives it from the session secret.
              const client = new e2ee.SdpAuthenticator(e2ee.decodeLinkKey(c.seat_key), c.session_id, c.recipient);
              const viaChannel = await client.acceptRoster(c.sender, c.counter, c.sealed, {relayed: false});
              const relayed = await client.acceptRoster(c.sender, c.counter, c.sealed);
              const replayed = await reasonOf(client.acceptRoster(c.sender, c.counter, c.sealed));
              const therapist = new e2ee.SdpAuthenticator(secret(c), c.session_id, c.sender);
              therapist.setPeerKey(c.recipient, e2ee.seatKey(secret(c), c.session_id, c.recipient));
              const [counter, fresh] = await therapist.sealRoster(c.recipient, relayed.version, relayed.peers);
              const reopened = await client.acceptRoster(c.sender, counter, fresh);
              return [b64(pairLink), hex(kSeal), sealed, e2ee.rosterPlaintext(viaChannel.version, viaChannel.peers),
                      replayed, e2ee.rosterPlaintext(reopened.version, reopened.peers)];
            })),
            invalid: await Promise.all(v.roster_invalid.map(async (c) => {
              if (!c.sealed) {
                try { e2ee.parseRosterPlaintext(c.plaintext); return 'accepted'; }
                catch (err) { return err.reason ?? err.message; }
              }
              const client = new e2ee.SdpAuthenticator(e2ee.decodeLinkKey(c.seat_key), c.session_id, c.recipient);
              return reasonOf(client.acceptRoster(c.sender, c.counter, c.sealed));
            })),
          };
        }""",
        VECTORS,
    )
    assert got["seat"] == [c["seat_key"] for c in VECTORS["seat_key"]]
    assert got["group"] == [c["group_key"] for c in VECTORS["group_key"]]
    assert got["pairs"] == [c["client_pair_key"] for c in VECTORS["client_pair_key"]]
    assert got["plaintexts"] == [[c["plaintext"], c["plaintext"]] for c in VECTORS["roster_plaintext"]]
    assert got["rosters"] == [
        [c["seat_key"], c["k_seal_hex"], c["sealed"], c["plaintext"], "replayed_counter", c["plaintext"]]
        for c in VECTORS["roster"]
    ]
    assert got["invalid"] == [c["reason"] for c in VECTORS["roster_invalid"]]


async def test_roster_sealed_in_js_opens_in_python(page: Page) -> None:
    """A roster the browser seals opens with the Python primitives under the client's seat key."""
    secret = new_link_key()
    entries = [
        {"peer": "seat-2", "fingerprint": "sha-256 " + ":".join(["4F"] * 32), "key": new_link_key(), "held": True}
    ]
    counter, sealed = await page.evaluate(
        """async ([secret, session, entries]) => {
          const s = e2ee.decodeLinkKey(secret);
          const therapist = new e2ee.SdpAuthenticator(s, session, 'therapist');
          therapist.setPeerKey('seat-1', e2ee.pairLinkKey(s, session, 'seat-1'));
          return therapist.sealRoster('seat-1', 7, entries);
        }""",
        [secret, SESSION, entries],
    )
    k_seat = seat_key(decode_link_key(secret), SESSION, "seat-1")
    k_seal = derive_seal_key(pair_key(derive_auth_key(k_seat, SESSION), "therapist", "seat-1"), "therapist", "seat-1")
    text = open_signal(k_seal, SESSION, "therapist", "seat-1", "roster", counter, sealed)
    assert parse_roster_plaintext(text) == (7, [RosterEntry(**entries[0])])
    other = seat_key(decode_link_key(secret), SESSION, "seat-2")  # another client's key does not open it
    k_other = derive_seal_key(pair_key(derive_auth_key(other, SESSION), "therapist", "seat-1"), "therapist", "seat-1")
    with pytest.raises(InterceptionError, match="bad_mac"):
        open_signal(k_other, SESSION, "therapist", "seat-1", "roster", counter, sealed)


async def test_details_a_page_seals_open_for_the_therapist_only_never_for_another_client(page: Page) -> None:
    """A relay that forwards one client's sealed details to another client gives it nothing it can open."""
    secret = new_link_key()
    result = await page.evaluate(
        """async ([secret, session]) => {
          const s = e2ee.decodeLinkKey(secret);
          const mine = e2ee.pairLinkKey(s, session, 'seat-1');   // what seat-1's link carries
          const other = e2ee.pairLinkKey(s, session, 'seat-2');  // what seat-2's link carries
          const text = '{"location":"home","contact":"Sam"}';
          const sealed = await e2ee.sealDetails(await mine, session, 'seat-1', text);
          const attempt = async (key, peer) => {
            try { return await e2ee.openDetails(await key, session, peer, sealed); } catch { return null; }
          };
          return {
            therapist: await attempt(e2ee.pairLinkKey(s, session, 'seat-1'), 'seat-1'),
            otherClient: await attempt(other, 'seat-1'),
            otherClientRelabelled: await attempt(other, 'seat-2'),
            sealed,
          };
        }""",
        [secret, SESSION],
    )
    assert result["therapist"] == '{"location":"home","contact":"Sam"}'
    assert result["otherClient"] is None and result["otherClientRelabelled"] is None
    other_key = seat_key(decode_link_key(secret), SESSION, "seat-2")
    with pytest.raises(DetailsError):
        open_details(other_key, SESSION, "seat-1", result["sealed"])


# -- across the language boundary ---------------------------------------------------------------


async def test_js_signed_offer_is_verified_by_python(page: Page) -> None:
    link_key = new_link_key()
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
    client = SdpAuthenticator(decode_link_key(link_key), SESSION, "seat-1")
    (c1, mac1), (c2, mac2) = signed["first"], signed["second"]
    assert c2 > c1 > 1_700_000_000_000_000  # unix microseconds
    assert client.verify("therapist", "offer", c1, SDP, mac1) is Trust.VERIFIED_BY_LINK
    with pytest.raises(InterceptionError, match="bad_mac"):
        client.verify("therapist", "offer", c2, SDP.replace("4F", "4E", 1), mac2)
    assert client.verify("therapist", "offer", c2, SDP, mac2) is Trust.VERIFIED_BY_LINK
    with pytest.raises(InterceptionError, match="replayed_counter"):
        client.verify("therapist", "offer", c1, SDP, mac1)


async def test_python_signed_answer_is_verified_by_js(page: Page) -> None:
    link_key = new_link_key()
    client = SdpAuthenticator(decode_link_key(link_key), SESSION, "seat-1")
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


CANDIDATE = {
    "candidate": "candidate:1 1 udp 2122260223 192.0.2.7 53110 typ host",
    "sdp_mid": "0",
    "sdp_mline_index": 0,
}


async def test_js_sealed_signaling_opens_in_python(page: Page) -> None:
    link_key = new_link_key()
    sent = await page.evaluate(
        """async ([linkKey, session, sdp, candidate]) => {
          const auth = new e2ee.SdpAuthenticator(e2ee.decodeLinkKey(linkKey), session, 'therapist');
          // Not awaited one by one: the counters are taken in call order all the same.
          return Promise.all([
            auth.seal('seat-1', 'offer', {sdp}),
            auth.seal('seat-1', 'candidate', candidate),
            auth.seal('seat-1', 'candidate', {candidate: '', sdp_mid: null, sdp_mline_index: null}),
          ]);
        }""",
        [link_key, SESSION, SDP, CANDIDATE],
    )
    client = SdpAuthenticator(decode_link_key(link_key), SESSION, "seat-1")
    (c1, offer), (c2, candidate), (c3, end) = sent
    assert c1 < c2 < c3
    for text in (offer, candidate, end):
        assert "fingerprint" not in text and "192.0.2.7" not in text
    assert client.unseal("therapist", "offer", c1, offer) == {"sdp": SDP}
    assert client.unseal("therapist", "candidate", c2, candidate) == CANDIDATE
    with pytest.raises(InterceptionError, match="bad_mac"):  # delivered as if it were for the offer
        client.unseal("therapist", "offer", c3, end)
    assert client.unseal("therapist", "candidate", c3, end)["candidate"] == ""


async def test_python_sealed_signaling_opens_in_js(page: Page) -> None:
    link_key = new_link_key()
    client = SdpAuthenticator(decode_link_key(link_key), SESSION, "seat-1")
    answer = client.seal("therapist", "answer", {"sdp": SDP})
    candidate = client.seal("therapist", "candidate", CANDIDATE)
    outcomes = await page.evaluate(
        """async ([linkKey, session, [aCounter, answer], [cCounter, candidate]]) => {
          const key = e2ee.decodeLinkKey(linkKey);
          const auth = new e2ee.SdpAuthenticator(key, session, 'therapist');
          const other = new e2ee.SdpAuthenticator(key, session, 'seat-2');
          const flip = answer[30] === 'A' ? 'B' : 'A';
          const tampered = answer.slice(0, 30) + flip + answer.slice(31);
          return [
            await reasonOf(auth.unseal('seat-1', 'answer', aCounter, tampered)),
            await reasonOf(auth.unseal('seat-1', 'answer', aCounter + 1, answer)),
            await reasonOf(auth.unseal('seat-1', 'offer', aCounter, answer)),
            await reasonOf(auth.unseal('seat-2', 'answer', aCounter, answer)),
            await reasonOf(other.unseal('therapist', 'answer', aCounter, answer)),  // re-addressed
            await reasonOf(auth.unseal('seat-1', 'answer', null, answer)),
            await reasonOf(auth.unseal('therapist', 'answer', aCounter, answer)),
            await auth.unseal('seat-1', 'answer', aCounter, answer),
            await reasonOf(auth.unseal('seat-1', 'answer', aCounter, answer)),
            await auth.unseal('seat-1', 'candidate', cCounter, candidate),
          ];
        }""",
        [link_key, SESSION, answer, candidate],
    )
    assert outcomes == [
        "bad_mac", "bad_mac", "bad_mac", "bad_mac", "bad_mac", "malformed", "malformed",
        {"sdp": SDP}, "replayed_counter", CANDIDATE,
    ]  # fmt: skip


async def test_js_checks_messages_from_one_sender_in_the_order_they_came(page: Page) -> None:
    """Messages handed in without waiting are checked in that order, however long each takes to
    check, or an earlier one would look replayed: a long sealed offer before short candidates,
    and a clear offer (four WebCrypto steps to check its MAC) before a sealed candidate (two)."""
    link_key = new_link_key()
    therapist = SdpAuthenticator(decode_link_key(link_key), SESSION, "therapist")
    long_sdp = SDP + "a=x-padding:" + "p" * 40_000 + "\r\n"
    warm_up = [("candidate", *therapist.seal("seat-1", "candidate", CANDIDATE), None)]
    messages = [("offer", *therapist.seal("seat-1", "offer", {"sdp": long_sdp}), None)]
    messages += [("candidate", *therapist.seal("seat-1", "candidate", CANDIDATE), None) for _ in range(30)]
    counter, mac = therapist.sign("seat-1", "offer", SDP)
    messages += [("offer", counter, SDP, mac)]
    messages += [("candidate", *therapist.seal("seat-1", "candidate", CANDIDATE), None)]
    outcomes = await page.evaluate(
        """async ([linkKey, session, warmUp, messages]) => {
          const auth = new e2ee.SdpAuthenticator(e2ee.decodeLinkKey(linkKey), session, 'seat-1');
          const hand = ([type, counter, body, mac]) => mac
            ? auth.verify('therapist', type, counter, body, mac)
            : auth.unseal('therapist', type, counter, body);
          await hand(warmUp[0]);  // the direction key is derived once, before the race
          return Promise.all(messages.map((m) => reasonOf(hand(m))));
        }""",
        [link_key, SESSION, warm_up, messages],
    )
    assert outcomes == ["accepted"] * len(messages)


async def test_js_sealing_limits_and_the_keyless_side(page: Page) -> None:
    got = await page.evaluate(
        """async ([session, candidate]) => {
          const key = e2ee.decodeLinkKey(e2ee.newLinkKey());
          const auth = new e2ee.SdpAuthenticator(key, session, 'therapist', {clock: () => 1000, sealLimit: 2});
          const counters = [(await auth.seal('seat-1', 'candidate', candidate))[0],
                            (await auth.seal('seat-1', 'candidate', candidate))[0]];
          const refused = await reasonOf(auth.seal('seat-1', 'candidate', candidate));
          const next = auth.nextCounter('seat-1');
          const other = (await auth.seal('seat-2', 'candidate', candidate))[0];
          const nonces = new Set();
          const fresh = new e2ee.SdpAuthenticator(key, session, 'therapist');
          for (let i = 0; i < 500; i++) nonces.add((await fresh.seal('seat-1', 'candidate', candidate))[1].slice(0, 16));
          const keyless = new e2ee.SdpAuthenticator(null, session, 'therapist');
          let tooBig;
          try { new e2ee.SdpAuthenticator(key, session, 'x', {sealLimit: e2ee.MAX_SEALS_PER_KEY + 1}); tooBig = 'accepted'; }
          catch (err) { tooBig = err.name; }
          return {
            counters, refused, next, other, nonces: nonces.size, tooBig, limit: e2ee.MAX_SEALS_PER_KEY,
            keylessSeal: await reasonOf(keyless.seal('seat-1', 'candidate', candidate)),
            badFields: await reasonOf(auth.seal('seat-3', 'candidate', {candidate: 'x'})),
            largest: e2ee.MAX_SEALED_PLAINTEXT, longest: e2ee.MAX_SEALED_CHARS,
          };
        }""",
        [SESSION, CANDIDATE],
    )
    assert got["counters"] == [1000, 1001] and got["next"] == 1002 and got["other"] == 1000
    assert got["refused"].startswith("Error: refusing to seal")
    assert got["nonces"] == 500
    assert got["tooBig"] == "RangeError" and got["limit"] == MAX_SEALS_PER_KEY
    assert got["keylessSeal"] == "Error: cannot seal without the link key"
    assert got["badFields"].startswith("Error: a candidate's plaintext")
    assert (got["largest"], got["longest"]) == (MAX_SEALED_PLAINTEXT, MAX_SEALED_CHARS)


async def test_unverified_mode_in_js(page: Page) -> None:
    """A therapist device without the link key: no MAC sent, counters still enforced."""
    link_key = new_link_key()
    client = SdpAuthenticator(decode_link_key(link_key), SESSION, "seat-1")
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
    assert client.verify("therapist", "answer", a_counter, SDP, a_mac, allow_unverified=True) is Trust.UNVERIFIED


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
    assert fingerprint_of(got["sdp"]) == got["fp"]
    assert got["code"] == safety_code(SESSION, got["fp"], fingerprint_of(SDP))


async def test_details_cross_language(page: Page) -> None:
    key_text = new_link_key()
    key = decode_link_key(key_text)
    text = json.dumps({"contact": "Zoë", "phone": "+33 1 23 45 67 89"}, ensure_ascii=False)
    from_python = seal_details(key, SESSION, "seat-1", text)
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
    assert open_details(key, SESSION, "seat-1", got["fromJs"]) == text


async def test_checklist_cross_language(page: Page) -> None:
    key_text = new_link_key()
    key = decode_link_key(key_text)
    answers = {"private_place": True, "headset": False}
    from_python = seal_checklist(key, SESSION, "seat-1", answers)
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
    assert open_checklist(key, SESSION, "seat-1", got["fromJs"]) == answers


async def test_js_rejects_lone_surrogates_like_python(page: Page) -> None:
    message = await page.evaluate(
        """() => { try { e2ee.canonical('s', '\\ud800', 'b', 'offer', 1, ''); return 'accepted'; }
                   catch (err) { return err.name; } }"""
    )
    assert message == "TypeError"


# -- the link fragment ------------------------------------------------------------------------


async def test_read_link_key_from_fragment(page: Page, base_url: str) -> None:
    key = new_link_key()
    try:
        await page.goto(f"{base_url}/call?lang=de#{key}")
        await page.evaluate(PAGE_HELPERS)
        first = await page.evaluate("() => [hex(e2ee.readLinkKeyFromFragment()), location.href]")
        assert first == [decode_link_key(key).hex(), f"{base_url}/call?lang=de"]
        assert await page.evaluate("() => e2ee.readLinkKeyFromFragment()") is None
        await page.goto(f"{base_url}/call#{key[:-3]}")  # a link cut short by a mail client
        await page.evaluate(PAGE_HELPERS)
        damaged = await page.evaluate(
            "() => { try { e2ee.readLinkKeyFromFragment(); return 'accepted'; } catch (err) { return err.message; } }"
        )
        assert "43 base64url characters, got 40" in damaged
        assert await page.evaluate("() => location.href") == f"{base_url}/call"
    finally:  # leave the shared page as the other tests expect it
        await page.goto(base_url + "/")
        await page.evaluate(PAGE_HELPERS)


async def test_js_counts_plaintext_limits_in_code_points_like_python(page: Page) -> None:
    """A candidate line of 1024 emoji is 1024 characters to Python and 2048 UTF-16 units to JS."""
    line = "\U0001f388" * 1024
    fields = {"candidate": line, "sdp_mid": None, "sdp_mline_index": None}
    assert signal_plaintext("candidate", fields)  # within the limit in Python
    got = await page.evaluate(
        """([fields]) => {
          const attempt = (f) => { try { e2ee.signalPlaintext('candidate', f); return 'accepted'; }
                                   catch (err) { return err.message; } };
          return [attempt(fields), attempt({...fields, candidate: fields.candidate + 'x'})];
        }""",
        [fields],
    )
    assert got[0] == "accepted" and got[1].startswith("a candidate's plaintext")
    with pytest.raises(ValueError, match="a candidate's plaintext"):
        signal_plaintext("candidate", {**fields, "candidate": line + "x"})


async def test_waiting_note_vectors(page: Page) -> None:
    """The page seals a note with the seat key it derives from the session secret, byte for byte
    as the vectors (and so as broker/crypto/waiting_note.py), opens them, and opens none of the
    invalid ones (docs/protocol.md 7.4.2)."""
    group = VECTORS["waiting_note"]
    got = await page.evaluate(
        """async ([valid, invalid]) => ({
             valid: await Promise.all(valid.map(async (c) => {
               const secret = e2ee.decodeLinkKey(c.session_secret);
               const key = await e2ee.pairLinkKey(secret, c.session_id, c.peer);
               const sealed = await e2ee.sealNote(key, c.session_id, c.peer, c.text, {nonce: fromHex(c.nonce_hex)});
               return [e2ee.b64urlEncode(key), e2ee.notePlaintext(c.text), sealed,
                       await e2ee.openNote(key, c.session_id, c.peer, c.sealed)];
             })),
             invalid: await Promise.all(invalid.map((c) =>
               reasonOf(e2ee.openNote(e2ee.decodeLinkKey(c.seat_key), c.session_id, c.peer, c.sealed)))),
           })""",
        [group["valid"], group["invalid"]],
    )
    assert got["valid"] == [[c["seat_key"], c["plaintext"], c["sealed"], c["text"].strip()] for c in group["valid"]]
    assert all(reason.startswith("NoteError: ") for reason in got["invalid"]), got["invalid"]
    assert len(got["invalid"]) == len(group["invalid"])


async def test_waiting_note_cross_language(page: Page) -> None:
    key = seat_key(decode_link_key(new_link_key()), SESSION, "seat-1")
    from_python = seal_note(key, SESSION, "seat-1", "Ich komme gleich")
    got = await page.evaluate(
        """async ([keyText, session, sealed]) => {
          const key = e2ee.decodeLinkKey(keyText);
          return {
            opened: await e2ee.openNote(key, session, 'seat-1', sealed),
            wrongSeat: await reasonOf(e2ee.openNote(key, session, 'seat-2', sealed)),
            tooLong: await reasonOf(e2ee.sealNote(key, session, 'seat-1', 'x'.repeat(281))),
            fromJs: await e2ee.sealNote(key, session, 'seat-1', ' Gleich da \\u{1F642} '),
          };
        }""",
        [b64url_encode(key), SESSION, from_python],
    )
    assert got["opened"] == "Ich komme gleich"
    assert got["wrongSeat"].startswith("NoteError: ")
    assert got["tooLong"].startswith("Error: a note has 1 to 280 characters")
    assert open_note(key, SESSION, "seat-1", got["fromJs"]) == "Gleich da \U0001f642"


async def test_safety_plan_vectors(page: Page) -> None:
    """web/js/safety_plan.js seals a client's plan byte for byte as the vectors (and so as
    broker/crypto/safety_plan.py), opens them, and opens none of the invalid ones (7.4.3)."""
    group = VECTORS["safety_plan"]
    got = await page.evaluate(
        """async ([valid, invalid]) => {
             const plan = await import('/static/js/safety_plan.js');
             return {
               valid: await Promise.all(valid.map(async (c) => {
                 const key = e2ee.decodeLinkKey(c.seat_key);
                 const fields = {codeWord: c.code_word, callBack: c.call_back, how: c.how};
                 const sealed = await plan.sealSafetyPlan(key, c.session_id, c.peer, fields, {nonce: fromHex(c.nonce_hex)});
                 const opened = await plan.openSafetyPlan(key, c.session_id, c.peer, c.sealed);
                 return [hex(await plan.deriveSafetyPlanKey(key, c.session_id)), plan.safetyPlanPlaintext(fields), sealed,
                         {code_word: opened.codeWord, call_back: opened.callBack, how: opened.how}];
               })),
               invalid: await Promise.all(invalid.map((c) =>
                 reasonOf(plan.openSafetyPlan(e2ee.decodeLinkKey(c.seat_key), c.session_id, c.peer, c.sealed)))),
             };
           }""",
        [group["valid"], group["invalid"]],
    )
    assert got["valid"] == [[c["k_plan_hex"], c["plaintext"], c["sealed"], c["opened"]] for c in group["valid"]]
    assert all(reason.startswith("SafetyPlanError: ") for reason in got["invalid"]), got["invalid"]
    assert len(got["invalid"]) == len(group["invalid"])


async def test_safety_plan_cross_language_and_the_code_word_match(page: Page) -> None:
    """A plan sealed by the page opens in Python and the other way round; the code word in chat
    matches only as the whole message, whatever its case, spacing and end punctuation (7.4.3)."""
    key = seat_key(decode_link_key(new_link_key()), SESSION, "seat-1")
    from_python = seal_safety_plan(key, SESSION, "seat-1", SafetyPlan("Blaue Tasse", True, "SMS zuerst"))
    got = await page.evaluate(
        """async ([keyText, session, sealed]) => {
          const plan = await import('/static/js/safety_plan.js');
          const key = e2ee.decodeLinkKey(keyText);
          const word = 'Is it raining there?';
          return {
            opened: await plan.openSafetyPlan(key, session, 'seat-1', sealed),
            wrongSeat: await reasonOf(plan.openSafetyPlan(key, session, 'seat-2', sealed)),
            empty: await reasonOf(plan.sealSafetyPlan(key, session, 'seat-1', {codeWord: '  ', callBack: null, how: ''})),
            tooLong: await reasonOf(plan.sealSafetyPlan(key, session, 'seat-1', {codeWord: '\\u{1F642}'.repeat(101)})),
            fromJs: await plan.sealSafetyPlan(key, session, 'seat-1', {codeWord: ' Tee \\u{1F375} ', callBack: false, how: ''}),
            matches: ['  is it RAINING   there ', 'Is it raining there?!', '\\u201cis it raining there\\u201d',
                      'is it raining there? he is here', 'is it raining', ''].map((m) => plan.isCodeWord(m, word)),
            noWord: plan.isCodeWord('???', '???'),
          };
        }""",
        [b64url_encode(key), SESSION, from_python],
    )
    assert got["opened"] == {"codeWord": "Blaue Tasse", "callBack": True, "how": "SMS zuerst"}
    assert got["wrongSeat"].startswith("SafetyPlanError: ")
    assert got["empty"].startswith("Error: an empty safety plan is not sealed")
    assert got["tooLong"].startswith("Error: a code word has at most 100 characters")
    assert open_safety_plan(key, SESSION, "seat-1", got["fromJs"]) == SafetyPlan("Tee \U0001f375", False, "")
    assert got["matches"] == [True, True, True, False, False, False]
    assert got["noWord"] is False  # a code word of punctuation only never matches (the form says so)
