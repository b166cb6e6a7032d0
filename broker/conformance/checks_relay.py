"""Sections 3, 6, 7 and 10: relaying between admitted peers (who may send what to whom, what the
broker sets and what it leaves untouched), replay on reconnect, and the end of a session with
its signed record."""

from __future__ import annotations

import base64
import json
import time

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.conformance.flows import admitted_pair, joined, seat_view
from broker.conformance.report import Registry, Run, Session
from broker.conformance.wire import Frame, Peer, new_id
from broker.crypto.link_key import derive_auth_key, pair_key
from broker.crypto.sdp_auth import InterceptionError, sign_sdp, verify_sdp
from broker.crypto.sealed_signaling import derive_seal_key, seal_signal, signal_plaintext

checks = Registry()

#: An offer's SDP as the peers would send it (the broker does not read it).
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"


def counter_now() -> int:
    return time.time_ns() // 1000


def seal(session: Session, sender: str, recipient: str, kind: str, counter: int, fields: dict[str, object]) -> str:
    """An offer, answer or candidate sealed end to end as section 7.7 says."""
    k_pair = pair_key(derive_auth_key(session.link_key, session.id), sender, recipient)
    key = derive_seal_key(k_pair, sender, recipient)
    return seal_signal(key, session.id, sender, recipient, kind, counter, signal_plaintext(kind, fields))


async def relayed_to(peer: Peer, kind: str, since: int, ref: str) -> Frame:
    return await peer.wait_for(
        lambda f: f.get("type") == kind or (f.get("type") == "error" and f.get("ref") == ref),
        f"relayed {kind}",
        since=since,
    )


@checks.scenario(
    {
        "relay.offer": "an offer reaches the named peer with from set to the sender and a seq",
        "relay.sender-overwritten": "a from or seq sent by a peer is overwritten by the broker",
        "relay.payload-untouched": "sdp, counter and mac pass untouched: the MAC still verifies with the link key",
        "relay.answer-candidate-renegotiate": "the answering side's answer, candidates and renegotiate are relayed",
        "relay.sealed": "sealed offers and candidates pass with counter and sealed untouched",
        "relay.seq": "seq grows by one for each message relayed to a seat, in the order sent",
        "relay.not-offerer": "an offer from the answering side, an answer or renegotiate from the offerer: not_offerer",
        "relay.not-in-session": "a message to oneself, or to a peer of no or another session, gets not_in_session",
        "relay.not-admitted": "a message to or from a client who is not admitted gets not_admitted",
        "relay.bad-shape": "mixed clear and sealed forms, or malformed sealed values, get bad_message, not relayed",
        "report.accepted": "report is accepted with no answer (section 5)",
    },
    timeout_s=90.0,
)
async def relay(run: Run) -> None:
    session, therapist, client = await admitted_pair(run, clients=2)
    t, c = therapist.peer, client.peer
    k_auth = derive_auth_key(session.link_key, session.id)
    counter = counter_now()
    mac = sign_sdp(k_auth, session.id, therapist.id, client.id, "offer", counter, SDP)
    since, ref = c.mark(), new_id("of")
    await t.send(
        type="offer", to=client.id, sdp=SDP, counter=counter, mac=mac, id=ref, **{"from": "Forged00", "seq": 9}
    )
    offer = await relayed_to(c, "offer", since, ref)
    run.equal("relay.offer", offer.get("type"), "offer", "what the client got")
    run.equal("relay.offer", offer.get("from"), therapist.id, "from")
    run.check("relay.offer", isinstance(offer.get("seq"), int), f"seq is {offer.get('seq')!r}")
    run.equal("relay.sender-overwritten", offer.get("from"), therapist.id, "from after a forged one")
    run.check("relay.sender-overwritten", offer.get("seq") != 9, "the sender's seq was kept")
    untouched = (offer.get("sdp"), offer.get("counter"), offer.get("mac"))
    run.equal("relay.payload-untouched", untouched, (SDP, counter, mac), "sdp, counter, mac")
    try:
        verify_sdp(k_auth, session.id, str(offer.get("from")), client.id, "offer", counter, SDP, offer.get("mac"))
        run.check("relay.payload-untouched", True)
    except InterceptionError as exc:
        run.check("relay.payload-untouched", False, f"the relayed offer's MAC does not verify: {exc}")

    since = t.mark()
    sent: list[Frame] = [
        {"type": "answer", "to": therapist.id, "sdp": SDP, "counter": counter + 1, "mac": None},
        {"type": "candidate", "to": therapist.id, "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"},
        {"type": "candidate", "to": therapist.id, "candidate": ""},
        {"type": "renegotiate", "to": therapist.id},
    ]
    for frame in sent:
        await c.send(**frame)
    for frame in sent:
        got = await t.wait_type(str(frame["type"]), since=since)
        since = t.frames.index(got) + 1
        expected = {k: v for k, v in frame.items() if k != "to" and v is not None}
        kept = {k: got.get(k) for k in expected}
        run.equal("relay.answer-candidate-renegotiate", kept, expected, f"the relayed {frame['type']}")
        run.equal("relay.answer-candidate-renegotiate", got.get("from"), client.id, "from")

    since, first = c.mark(), counter_now()
    sealed_offer = seal(session, therapist.id, client.id, "offer", first, {"sdp": SDP})
    await t.send(type="offer", to=client.id, counter=first, sealed=sealed_offer)
    lines = [f"candidate:{n} 1 udp 1 127.0.0.1 9 typ host" for n in range(1, 21)]
    for n, line in enumerate(lines, 1):
        plain: dict[str, object] = {"candidate": line, "sdp_mid": "0", "sdp_mline_index": 0}
        sealed = seal(session, therapist.id, client.id, "candidate", first + n, plain)
        await t.send(type="candidate", to=client.id, counter=first + n, sealed=sealed)
    await c.wait_for(lambda f: f.get("counter") == first + len(lines), "the last sealed candidate", since=since)
    passed = [f for f in c.frames[since:] if f.get("type") in ("offer", "candidate")]
    head = passed[0]
    run.equal("relay.sealed", (head.get("sealed"), head.get("counter")), (sealed_offer, first), "the sealed offer")
    run.check("relay.sealed", head.get("sdp") is None, "a sealed offer gained an sdp")
    run.equal("relay.seq", [f.get("counter") for f in passed], [first + n for n in range(len(lines) + 1)], "order")
    seqs = [f.get("seq") for f in passed]
    first_seq = seqs[0] if isinstance(seqs[0], int) else 0
    run.equal("relay.seq", seqs, list(range(first_seq, first_seq + len(passed))), "the seq numbers")
    run.equal("relay.seq", first_seq, int(offer["seq"]) + 1, "the seq after the clear offer")

    for sender, kind, to in ((c, "offer", therapist.id), (t, "answer", client.id), (t, "renegotiate", client.id)):
        fields = {"sdp": SDP, "counter": counter_now()} if kind != "renegotiate" else {}
        code = await sender.request_error(kind, to=to, **fields)
        run.equal("relay.not-offerer", code, "not_offerer", kind)
    stranger = (await run.session()).clients[0].peer
    for what, to in (("oneself", therapist.id), ("an unknown peer", "Nobody00"), ("another session's", stranger)):
        code = await t.request_error("candidate", to=to, candidate="")
        run.equal("relay.not-in-session", code, "not_in_session", f"a candidate to {what}")

    other = await joined(run, session.clients[1].token)
    code = await t.request_error("candidate", to=other.id, candidate="")
    run.equal("relay.not-admitted", code, "not_admitted", "to a client in checking")
    code = await other.peer.request_error("candidate", to=therapist.id, candidate="")
    run.equal("relay.not-admitted", code, "not_admitted", "from a client in checking")

    mark = c.mark()
    bad_shapes: dict[str, dict[str, object]] = {
        "clear and sealed": {"type": "offer", "sdp": SDP, "counter": 1, "sealed": sealed_offer},
        "sealed without counter": {"type": "offer", "sealed": sealed_offer},
        "clear candidate with a counter": {"type": "candidate", "candidate": "", "counter": 1},
        "padded sealed": {"type": "offer", "counter": 1, "sealed": sealed_offer[: -2 - len(sealed_offer) % 4] + "=="},
        "too short sealed": {"type": "offer", "counter": 1, "sealed": "A" * 36},
    }
    for what, shape in bad_shapes.items():
        fields = {k: v for k, v in shape.items() if k != "type"}
        code = await t.request_error(str(shape["type"]), to=client.id, **fields)
        run.equal("relay.bad-shape", code, "bad_message", what)
    await c.sync()
    run.equal("relay.bad-shape", [f["type"] for f in c.frames[mark:] if f.get("type") != "pong"], [], "relayed")

    since = c.mark()
    await c.send(type="report", event="interception_warning", peer=therapist.id, reason="bad_mac", id="rp1")
    await c.sync()
    run.equal("report.accepted", c.summary(since), "[pong]", "the answers to a report")


@checks.scenario(
    {
        "presence.disconnected": "a client whose socket closed shows connected false to the therapist",
        "replay.resume": "a reconnect with resume_secret and resume gets the relayed messages it missed, in order",
        "replay.keeps-state": "a resumed admitted seat is still admitted, and its joined has no new secret",
    }
)
async def replay(run: Run) -> None:
    session, therapist, client = await admitted_pair(run)
    t = therapist.peer
    await t.send(type="candidate", to=client.id, candidate="")
    last = int((await client.peer.wait_type("candidate"))["seq"])
    since = t.mark()
    await client.peer.close()
    entry = await seat_view(therapist, client.id, lambda e: e.get("connected") is False, "connected false", since=since)
    run.equal("presence.disconnected", entry.get("state"), "admitted", "the seat's state while away")
    lines = [f"candidate:{n} 1 udp 1 127.0.0.1 9 typ host" for n in range(1, 4)]
    for line in lines:
        ref = new_id("away")
        await t.send(type="candidate", to=client.id, candidate=line, id=ref)
    await t.sync()
    back = await joined(run, session.clients[0].token, resume_secret=client.secret, resume=last)
    run.equal("replay.keeps-state", back.joined.get("seat_state"), "admitted", "seat_state")
    run.equal("replay.keeps-state", back.joined.get("resume_secret"), None, "resume_secret")
    await back.peer.wait_for(lambda f: f.get("candidate") == lines[-1], "the last missed candidate")
    got = [(f.get("candidate"), f.get("seq")) for f in back.peer.frames if f.get("type") == "candidate"]
    expected = [(line, last + n) for n, line in enumerate(lines, 1)]
    run.equal("replay.resume", got, expected, "the candidates replayed (line, seq)")


def canonical(record: object) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@checks.scenario(
    {
        "end.order": "end: the therapist gets session_record, then everyone session_ended (ended), closed 4010",
        "end.record-signature": "the record's signature verifies over its canonical JSON with the published key",
        "end.record-content": "the record: v 1, the session, end_reason, seats with admitted_at and verification",
    }
)
async def ending(run: Run) -> None:
    session, therapist, client = await admitted_pair(run)
    await therapist.peer.send(type="end", verification={client.id: "safety_code"})
    for who in (therapist, client):
        ended = await who.peer.wait_type("session_ended")
        run.equal("end.order", ended.get("reason"), "ended", "session_ended.reason")
        run.equal("end.order", await who.peer.wait_closed(), 4010, "the close code")
    kinds = [f.get("type") for f in therapist.peer.frames]
    run.check("end.order", kinds.index("session_record") < kinds.index("session_ended"), "record after session_ended")
    signed = therapist.peer.find(lambda f: f.get("type") == "session_record") or {}
    record = signed.get("record") or {}
    async with aiohttp.ClientSession() as http:
        async with http.get(run.target.url + "/.well-known/broker-signing-key") as response:
            keys = (await response.json(content_type=None)).get("keys", [])
    key = next((k for k in keys if k.get("kid") == signed.get("key_id")), None)
    if run.check("end.record-signature", key is not None, f"no published key has kid {signed.get('key_id')!r}"):
        assert key is not None
        try:
            public = Ed25519PublicKey.from_public_bytes(b64url(key["x"]))
            public.verify(b64url(str(signed.get("signature"))), canonical(record))
            run.check("end.record-signature", True)
        except (InvalidSignature, ValueError) as exc:
            run.check("end.record-signature", False, f"the signature does not verify ({type(exc).__name__})")
    run.equal("end.record-content", (record.get("v"), record.get("session")), (1, session.id), "v and session")
    run.equal("end.record-content", record.get("end_reason"), "ended", "end_reason")
    seats = {s.get("peer"): s for s in record.get("seats", [])}
    run.equal("end.record-content", set(seats), {s.peer for s in session.seats}, "the seats")
    mine, theirs = seats.get(therapist.id, {}), seats.get(client.id, {})
    for role, entry in (("therapist", mine), ("client", theirs)):
        run.check("end.record-content", isinstance(entry.get("admitted_at"), int), f"the {role}'s admitted_at")
    run.equal("end.record-content", theirs.get("verified"), "safety_code", "the client's verified")
    run.equal("end.record-content", record.get("started"), theirs.get("admitted_at"), "started")
