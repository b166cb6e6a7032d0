"""Sections 2, 3 and 4: a seat's pages and devices (resume secrets, other devices), leaving and
removal, and invite tokens (unknown, forged, revoked, of an ended session, not yet valid)."""

from __future__ import annotations

import time

import aiohttp

from broker.conformance.flows import admit, admitted_pair, joined, seat_view, to_waiting_room
from broker.conformance.report import Registry, Run
from broker.conformance.wire import Frame, code_of, join_reply

checks = Registry()

#: A well-formed resume secret no page was given.
UNKNOWN_SECRET = "A" * 43


def relayed(frame: Frame) -> bool:
    return frame.get("type") in ("offer", "answer", "candidate", "renegotiate")


@checks.scenario(
    {
        "resume.takes-seat": "a join with the seat's resume secret takes it over: the older connection gets replaced, 4001",
        "resume.unknown-secret": "an unknown resume_secret is no error: the join becomes the seat's other device",
    }
)
async def resume(run: Run) -> None:
    session = await run.session()
    first = await joined(run, session.clients[0].token)
    second = await joined(run, session.clients[0].token, resume_secret=first.secret)
    j = second.joined
    run.equal("resume.takes-seat", (j.get("peer"), j.get("other_device")), (first.id, False), "peer, other_device")
    run.equal("resume.takes-seat", j.get("resume_secret"), None, "joined.resume_secret for a presented secret")
    error = await first.peer.wait_type("error")
    run.equal("resume.takes-seat", error.get("code"), "replaced", "what the older connection gets")
    run.equal("resume.takes-seat", await first.peer.wait_closed(), 4001, "the older connection's close code")
    other = await joined(run, session.clients[0].token, resume_secret=UNKNOWN_SECRET)
    run.equal("resume.unknown-secret", other.joined.get("other_device"), True, "joined.other_device")
    secret = other.secret
    run.check("resume.unknown-secret", isinstance(secret, str) and secret != UNKNOWN_SECRET, "no own resume secret")


@checks.scenario(
    {
        "device.joined": "a join without the secret of an opened seat is its other device, checking, holder undisturbed",
        "device.listed": "the therapist's waiting_room entry shows the other device (device, state, connected)",
        "device.newer-replaces": "a newer other device replaces a waiting one, which gets replaced",
        "device.decline": "decline with device turns only the other device away (declined, 4003)",
        "device.refused": "after that, further devices of the seat get declined until allow_return",
        "device.allow-return": "allow_return lets another device ask again",
        "device.admit": "admit with device moves the seat: the holder gets replaced (4001), the device is admitted",
        "device.old-secret": "the secret of the device the seat moved away from gets replaced on join",
    },
    timeout_s=90.0,
)
async def other_device(run: Run) -> None:
    session = await run.session()
    token = session.clients[0].token
    therapist = await joined(run, session.therapist.token)
    holder = await joined(run, token)
    mark = holder.peer.mark()
    device = await joined(run, token)
    j = device.joined
    run.equal("device.joined", (j.get("other_device"), j.get("peer")), (True, holder.id), "other_device, peer")
    run.equal("device.joined", j.get("seat_state"), "checking", "the device's seat_state")
    run.check("device.joined", isinstance(j.get("resume_secret"), str), "the device has no resume secret")
    entry = await seat_view(therapist, holder.id, lambda e: e.get("other_device"), "an entry with the other device")
    listed = entry["other_device"]
    run.equal("device.listed", (listed.get("state"), listed.get("connected")), ("checking", True), "state, connected")
    run.check("device.listed", isinstance(listed.get("device"), str), "no device id")

    newer = await joined(run, token)
    error = await device.peer.wait_type("error")
    run.equal("device.newer-replaces", error.get("code"), "replaced", "what the earlier device gets")

    since = therapist.peer.mark()
    entry = await seat_view(
        therapist,
        holder.id,
        lambda e: e.get("other_device") and e["other_device"].get("device") != listed["device"],
        "newer device",
    )
    await therapist.peer.send(type="decline", peer=holder.id, device=entry["other_device"]["device"])
    await newer.peer.wait_type("declined")
    run.equal("device.decline", await newer.peer.wait_closed(), 4003, "the device's close code")
    entry = await seat_view(
        therapist, holder.id, lambda e: e.get("other_device_declined"), "declined flag", since=since
    )
    run.check("device.decline", entry.get("connected") is True, "the holder was disturbed")
    run.check("device.decline", not holder.peer.closed.is_set(), "the holder was closed")
    disturbed = [f for f in holder.peer.frames[mark:] if f.get("type") in ("error", "declined", "removed")]
    run.equal("device.decline", disturbed, [], "what the holder received meanwhile")
    refused = await run.open()
    run.equal("device.refused", code_of(await join_reply(refused, token)), "declined", "another device's join")

    await therapist.peer.send(type="allow_return", peer=holder.id)
    await seat_view(therapist, holder.id, lambda e: not e.get("other_device_declined"), "the flag cleared")
    last = await joined(run, token)
    run.equal("device.allow-return", last.joined.get("other_device"), True, "a device asking again")

    await to_waiting_room(session, last)
    entry = await seat_view(
        therapist, holder.id, lambda e: (e.get("other_device") or {}).get("state") == "waiting", "the device waiting"
    )
    await admit(therapist, last, device=entry["other_device"]["device"])
    error = await holder.peer.wait_type("error")
    run.equal("device.admit", error.get("code"), "replaced", "what the holder gets")
    run.equal("device.admit", await holder.peer.wait_closed(), 4001, "the holder's close code")
    old = await run.open()
    reply = await join_reply(old, token, resume_secret=holder.secret)
    run.equal("device.old-secret", code_of(reply), "replaced", "the join with the moved-away secret")


@checks.scenario(
    {
        "admit.remove": "remove takes an admitted client out: removed, closed 4003, gone from the therapist's peers",
        "admit.removed-rejoin": "a removed client joining again gets removed",
        "replay.dropped-on-remove": "a seat let back after removal is sent nothing relayed before",
        "leave.closed": "leave closes the connection 1000 and the seat becomes left",
        "leave.rejoin": "a client who left and never passed the checklist rejoins checking",
    },
    timeout_s=90.0,
)
async def remove_and_leave(run: Run) -> None:
    session, therapist, client = await admitted_pair(run, clients=2)
    await therapist.peer.send(type="candidate", to=client.id, candidate="")
    await client.peer.wait_type("candidate")
    since = therapist.peer.mark()
    await therapist.peer.send(type="remove", peer=client.id)
    await client.peer.wait_type("removed")
    run.equal("admit.remove", await client.peer.wait_closed(), 4003, "the close code")
    peers = await therapist.peer.wait_type("peers", since=since)
    run.check("admit.remove", all(p.get("peer") != client.id for p in peers.get("peers", [])), "still in peers")
    again = await run.open()
    reply = await join_reply(again, session.clients[0].token, resume_secret=client.secret)
    run.equal("admit.removed-rejoin", code_of(reply), "removed", "the join")
    await therapist.peer.send(type="allow_return", peer=client.id)
    await seat_view(therapist, client.id, lambda e: e.get("state") == "invited", "the seat invited again")
    back = await joined(run, session.clients[0].token, resume=0)
    end = await back.peer.sync()
    run.equal("replay.dropped-on-remove", [f["type"] for f in back.peer.frames[:end] if relayed(f)], [], "relayed")

    other = await joined(run, session.clients[1].token)
    since = therapist.peer.mark()
    await other.peer.send(type="leave")
    run.equal("leave.closed", await other.peer.wait_closed(), 1000, "the close code")
    await seat_view(therapist, other.id, lambda e: e.get("state") == "left", "the seat left", since=since)
    run.check("leave.closed", True)
    rejoined = await joined(run, session.clients[1].token, resume_secret=other.secret)
    run.equal("leave.rejoin", rejoined.joined.get("seat_state"), "checking", "the seat state on rejoin")


@checks.scenario(
    {
        "token.invalid": "an unknown or forged token gets invalid_token",
        "token.revoked": "a revoked link's holder is closed 4003 and its token gets invalid_token",
        "token.ended": "a token of an ended session gets invalid_token",
        "token.indistinguishable": "unknown, forged, revoked and ended tokens get byte-identical errors",
        "token.pages": "GET /j/ and /t/ serve a usable token's page (200) and answer 404 invalid_token for others",
        "token.not-yet-valid": "a link before its window gets token_not_yet_valid on join and 425 on its page",
    }
)
async def tokens(run: Run) -> None:
    session = await run.session(clients=2)
    token = session.clients[0].token
    forged = token[:10] + ("B" if token[10] != "B" else "C") + token[11:]
    errors: dict[str, Frame] = {}
    for what, bad in (("unknown", "A" * 40), ("forged", forged)):
        errors[what] = await join_reply(await run.open(), bad)
        run.equal("token.invalid", code_of(errors[what]), "invalid_token", f"an {what} token")
    holder = await joined(run, session.clients[1].token)
    await run.context.sessions.revoke(session.id, holder.id)
    run.equal("token.revoked", await holder.peer.wait_closed(), 4003, "the holder's close code")
    errors["revoked"] = await join_reply(await run.open(), session.clients[1].token)
    run.equal("token.revoked", code_of(errors["revoked"]), "invalid_token", "the revoked token")

    ended = await run.session()
    therapist = await joined(run, ended.therapist.token)
    await therapist.peer.send(type="end")
    await therapist.peer.wait_closed()
    errors["ended"] = await join_reply(await run.open(), ended.clients[0].token)
    run.equal("token.ended", code_of(errors["ended"]), "invalid_token", "the ended session's token")
    shapes = {what: (e.get("type"), e.get("code"), e.get("message")) for what, e in errors.items()}
    run.check("token.indistinguishable", len(set(shapes.values())) == 1, f"differ: {sorted(shapes)} -> {shapes}")

    later = await run.session(starts=int(time.time()) + 3 * 3600)
    code = code_of(await join_reply(await run.open(), later.clients[0].token))
    run.equal("token.not-yet-valid", code, "token_not_yet_valid", "the join")
    async with aiohttp.ClientSession() as http:
        for path, status, data_code in (
            (f"/j/{token}", 200, None),
            (f"/t/{session.therapist.token}", 200, None),
            ("/j/" + "A" * 40, 404, "invalid_token"),
            (f"/j/{forged}", 404, "invalid_token"),
            (f"/j/{later.clients[0].token}", 425, "token_not_yet_valid"),
        ):
            async with http.get(run.target.url + path) as response:
                page = await response.text()
            rule = "token.not-yet-valid" if status == 425 else "token.pages"
            run.equal(rule, response.status, status, f"GET {path[:3]}... status")
            if data_code is not None:
                run.check(rule, f'data-code="{data_code}"' in page, f"the page has no data-code={data_code}")
