"""Sections 2, 3, 5, 8 and 9: joining, roles, the checklist and the pre-flight, the waiting
room, admit and decline, and what the therapist sees meanwhile."""

from __future__ import annotations

import re
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection

from broker.conformance.flows import (
    admit,
    joined,
    offers_safety_plan,
    preflight,
    seat_view,
    submit_checklist,
)
from broker.conformance.report import Registry, Run
from broker.conformance.wire import Frame, code_of, join_reply, new_id

checks = Registry()

PEER_ID = re.compile(r"[A-Za-z0-9_-]{8}")
RESUME_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
#: A peer id no session has (well-formed, so only the broker's lookup can refuse it).
NOBODY = "Nobody00"


async def offer_sdp(*, audio: bool) -> str:
    """A real SDP offer with a ``preflight`` data channel, and with audio (which no pre-flight takes)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if audio:
        pc.addTransceiver("audio")
    pc.createDataChannel("preflight")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@checks.scenario(
    {
        "roles.client-only": "preflight_offer and checklist from the therapist get not_allowed (section 5)",
        "roles.therapist-only": "admit, decline, remove, allow_return and end from a client get not_allowed",
        "roles.target-not-client": "a therapist action aimed at the therapist's own seat gets not_allowed",
        "admit.not-in-session": "admitting a peer id that is not in the session gets not_in_session",
        "admit.not-waiting": "admitting a client still in checking gets invalid_state",
    }
)
async def roles(run: Run) -> None:
    session = await run.session()
    therapist = await joined(run, session.therapist.token)
    client = await joined(run, session.clients[0].token)
    sdp = await offer_sdp(audio=True)
    for kind, fields in (("preflight_offer", {"sdp": sdp}), ("checklist", {"policy_version": "v", "answers": {}})):
        code = await therapist.peer.request_error(kind, **fields)
        run.equal("roles.client-only", code, "not_allowed", f"{kind} from the therapist")
    for kind, fields in (
        ("admit", {"peer": client.id}),
        ("decline", {"peer": client.id}),
        ("remove", {"peer": therapist.id}),
        ("allow_return", {"peer": client.id}),
        ("end", {}),
    ):
        run.equal("roles.therapist-only", await client.peer.request_error(kind, **fields), "not_allowed", kind)
    for kind in ("admit", "decline", "remove", "allow_return"):
        code = await therapist.peer.request_error(kind, peer=therapist.id)
        run.equal("roles.target-not-client", code, "not_allowed", f"{kind} of the therapist's seat")
    code = await therapist.peer.request_error("admit", peer=NOBODY)
    run.equal("admit.not-in-session", code, "not_in_session", "admit of an unknown peer id")
    run.equal(
        "admit.not-waiting", await therapist.peer.request_error("admit", peer=client.id), "invalid_state", "admit"
    )


@checks.scenario(
    {
        "checklist.preflight-missing": "a checklist with no pre-flight run gets preflight_missing (policy needs it)",
        "preflight.refused": "a pre-flight offer that asks for media, or is no SDP, gets preflight_refused",
        "preflight.limited": "a second pre-flight offer while one runs gets preflight_limited with retry_after_ms",
        "preflight.done": "the pre-flight answers, pings over the data channel and sends done, connected",
        "checklist.policy-outdated": "a checklist for another policy version gets policy_outdated",
        "checklist.unknown-item": "an answer for an item the policy does not have gets checklist_unknown_item",
        "checklist.incomplete": "a required item missing or false gets checklist_incomplete",
        "checklist.consent-outdated": "consent for another text version gets consent_outdated",
        "checklist.details-missing": "no details when the policy asks for them gets details_missing",
        "checklist.details-invalid": "details that are not well-formed base64url of 24-4096 chars get details_invalid",
        "checklist.accepted": "a complete checklist gets checklist_accepted and the seat moves to waiting",
        "checklist.invalid-state": "a checklist from a seat no longer checking gets invalid_state",
        "waiting.therapist-view": "the therapist's waiting_room shows the seat waiting, its checklist (and sealed safety plan) and details",
        "admit.admitted": "admit moves the client to admitted and the session to live; both get peers, therapist offers",
        "admit.twice": "admitting a client already admitted gets invalid_state",
    },
    timeout_s=90.0,
)
async def checklist_and_admit(run: Run) -> None:
    session = await run.session()
    therapist = await joined(run, session.therapist.token)
    client = await joined(run, session.clients[0].token)
    policy = client.joined["policy"]
    items = policy["items"]
    kinds = {item.get("kind") for item in items}
    if any(item.get("check") == "preflight" and item.get("level") == "required" for item in items):
        reply = await submit_checklist(session, client)
        run.equal("checklist.preflight-missing", reply.get("code"), "preflight_missing", "the answer")
    else:
        run.skip("checklist.preflight-missing", "the policy has no required preflight item")

    code = await client.peer.request_error("preflight_offer", sdp=await offer_sdp(audio=True))
    run.equal("preflight.refused", code, "preflight_refused", "an offer with audio")
    code = await client.peer.request_error("preflight_offer", sdp="this is not SDP")
    run.equal("preflight.refused", code, "preflight_refused", "an offer that is no SDP")

    second = await offer_sdp(audio=False)

    async def offer_again() -> None:
        ref = new_id("pf")
        await client.peer.send(type="preflight_offer", sdp=second, id=ref)
        error = await client.peer.wait_for(lambda f: f.get("ref") == ref, "an error about the second offer")
        run.equal("preflight.limited", error.get("code"), "preflight_limited", "the second offer")
        retry = error.get("retry_after_ms")
        run.check("preflight.limited", isinstance(retry, int) and retry > 0, f"retry_after_ms is {retry!r}")

    done = await preflight(client.peer, while_running=offer_again)
    run.check("preflight.done", done.get("connected") is True, f"done says {done}")

    faults: dict[str, tuple[str, dict[str, Any]]] = {
        "checklist.policy-outdated": ("policy_outdated", {"policy_version": "0" * 16}),
        "checklist.unknown-item": ("checklist_unknown_item", {"answers": {"no_such_item_x": True}}),
        "checklist.consent-outdated": ("consent_outdated", {"consent_version": "0000-outdated"}),
        "checklist.details-missing": ("details_missing", {"details": None}),
        "checklist.details-invalid": ("details_invalid", {"details": "not+base64url"}),
    }
    required = [i["id"] for i in items if i.get("level") == "required" and i.get("check") != "preflight"]
    for rule, (expected, changes) in faults.items():
        if rule == "checklist.unknown-item":
            changes = {"answers": {**{r: True for r in required}, "no_such_item_x": True}}
        if rule.startswith("checklist.consent") and "consent" not in kinds:
            run.skip(rule, "the policy has no consent item")
            continue
        if rule.startswith("checklist.details") and "details" not in kinds:
            run.skip(rule, "the policy has no details item")
            continue
        reply = await submit_checklist(session, client, **changes)
        run.equal(rule, reply.get("code"), expected, "the answer")
    if required:
        for answers in ({r: True for r in required[1:]}, {r: r != required[0] for r in required}):
            reply = await submit_checklist(session, client, answers=answers)
            run.equal("checklist.incomplete", reply.get("code"), "checklist_incomplete", f"without {required[0]}")
    else:
        run.skip("checklist.incomplete", "the policy has no required item but the pre-flight")

    since = therapist.peer.mark()
    reply = await submit_checklist(session, client)
    summary = reply.get("summary") or {}
    run.equal("checklist.accepted", reply.get("type"), "checklist_accepted", "the answer")
    run.equal("checklist.accepted", summary.get("all_required_met"), True, "summary.all_required_met")
    run.equal("checklist.accepted", summary.get("policy_version"), policy["version"], "summary.policy_version")
    await client.peer.wait_for(lambda f: f.get("type") == "status" and f.get("seat_state") == "waiting", "status")
    entry = await seat_view(therapist, client.id, lambda e: e.get("state") == "waiting", "entry waiting", since=since)
    run.check("waiting.therapist-view", entry.get("connected") is True, f"connected is {entry.get('connected')!r}")
    checklist = entry.get("checklist") or {}
    run.equal("waiting.therapist-view", checklist.get("all_required_met"), True, "the entry's checklist")
    if "details" in kinds:
        run.check("waiting.therapist-view", isinstance(entry.get("details"), str), "the entry has no sealed details")
    if offers_safety_plan(policy):
        plan = checklist.get("safety_plan")
        run.check("waiting.therapist-view", isinstance(plan, str), "the entry's checklist has no sealed safety plan")
    run.equal(
        "checklist.invalid-state", (await submit_checklist(session, client)).get("code"), "invalid_state", "again"
    )

    since_t, since_c = therapist.peer.mark(), client.peer.mark()
    await admit(therapist, client)
    status = client.peer.find(lambda f: f.get("type") == "status" and f.get("seat_state") == "admitted", since_c)
    run.equal("admit.admitted", (status or {}).get("session_state"), "live", "the session state once admitted")
    for who, other, offers in ((therapist, client, True), (client, therapist, False)):

        def naming(frame: Frame, other_id: str = other.id) -> bool:
            return frame.get("type") == "peers" and any(p.get("peer") == other_id for p in frame.get("peers", []))

        peers = await who.peer.wait_for(
            naming,
            "peers naming the other side",
            since=since_t if who is therapist else since_c,
        )
        info = next(p for p in peers["peers"] if p.get("peer") == other.id)
        run.equal("admit.admitted", info.get("you_offer"), offers, f"you_offer for {who.joined.get('role')}")
    run.equal("admit.twice", await therapist.peer.request_error("admit", peer=client.id), "invalid_state", "admit")


@checks.scenario(
    {
        "join.client": "a client's joined: role client, seat_state checking, a 43-character resume_secret, a policy",
        "join.therapist": "the therapist's joined: role therapist, seat_state admitted, no resume_secret, no policy",
        "join.session-state": "the session is scheduled until the therapist connects, then open",
        "join.status": "a client gets status; therapist_present turns true when the therapist connects",
        "join.waiting-room": "the therapist gets waiting_room with every client seat and whether it is connected",
        "join.already-joined": "a join on a joined connection gets already_joined",
    }
)
async def join_views(run: Run) -> None:
    session = await run.session(clients=2)
    client = await joined(run, session.clients[0].token)
    j = client.joined
    run.equal("join.client", (j.get("role"), j.get("seat_state")), ("client", "checking"), "role and seat_state")
    run.equal("join.client", (j.get("session"), j.get("peer")), (session.id, session.clients[0].peer), "session, peer")
    run.check("join.client", bool(RESUME_SECRET.fullmatch(str(j.get("resume_secret")))), "resume_secret malformed")
    run.check("join.client", j.get("other_device") is False, f"other_device is {j.get('other_device')!r}")
    policy = j.get("policy") or {}
    run.check("join.client", isinstance(policy.get("version"), str) and bool(policy.get("items")), "no usable policy")
    run.check("join.client", bool(PEER_ID.fullmatch(client.id)), f"peer id {client.id!r} is not 8 of [A-Za-z0-9_-]")
    run.equal("join.session-state", j.get("session_state"), "scheduled", "before the therapist came")
    status = await client.peer.wait_type("status")
    run.equal("join.status", status.get("therapist_present"), False, "therapist_present before the therapist")

    since = client.peer.mark()
    therapist = await joined(run, session.therapist.token)
    t = therapist.joined
    run.equal("join.therapist", (t.get("role"), t.get("seat_state")), ("therapist", "admitted"), "role and state")
    run.equal("join.therapist", (t.get("resume_secret"), t.get("policy")), (None, None), "resume_secret and policy")
    run.equal("join.session-state", t.get("session_state"), "open", "once the therapist connected")
    await client.peer.wait_for(
        lambda f: f.get("type") == "status" and f.get("therapist_present") is True,
        "status with the therapist",
        since=since,
    )
    run.check("join.status", True)
    room = await therapist.peer.wait_type("waiting_room")
    entries = {e.get("peer"): e for e in room.get("seats", [])}
    run.equal("join.waiting-room", set(entries), {c.peer for c in session.clients}, "the seats listed")
    first, second = (entries.get(c.peer, {}) for c in session.clients)
    run.equal("join.waiting-room", (first.get("state"), first.get("connected")), ("checking", True), "the joined one")
    run.equal("join.waiting-room", (second.get("state"), second.get("connected")), ("invited", False), "the other")
    code = await client.peer.request_error("join", token=session.clients[0].token)
    run.equal("join.already-joined", code, "already_joined", "a second join")


@checks.scenario(
    {
        "admit.decline": "decline turns a client away: it gets declined and is closed 4003",
        "admit.declined-rejoin": "a declined client joining again gets declined",
        "admit.allow-return": "after allow_return the seat opens again from any device, checking",
    }
)
async def decline_and_return(run: Run) -> None:
    session = await run.session()
    therapist = await joined(run, session.therapist.token)
    client = await joined(run, session.clients[0].token)
    await therapist.peer.send(type="decline", peer=client.id)
    await client.peer.wait_type("declined")
    run.equal("admit.decline", await client.peer.wait_closed(), 4003, "the close code")
    again = await run.open()
    reply = await join_reply(again, session.clients[0].token, resume_secret=client.secret)
    run.equal("admit.declined-rejoin", code_of(reply), "declined", "the join")
    await therapist.peer.send(type="allow_return", peer=client.id)
    await seat_view(therapist, client.id, lambda e: e.get("state") == "invited", "the seat invited again")
    back = await joined(run, session.clients[0].token)
    run.equal("admit.allow-return", back.joined.get("seat_state"), "checking", "the seat state on return")
    run.equal("admit.allow-return", back.joined.get("other_device"), False, "other_device")
