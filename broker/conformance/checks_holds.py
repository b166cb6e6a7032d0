"""Sections 3, 5, 6 and 10: private time (``hold``, ``release``, ``on_hold``, the ``held`` of every
view), the therapist's ``roster`` (therapist to client only, sealed form only) and
``joined.seat_keys``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from broker.conformance.flows import Joined, admit, joined, seat_view, waiting_client
from broker.conformance.report import Registry, Run
from broker.conformance.wire import Frame, Peer, new_id

checks = Registry()

#: A well-formed sealed value (base64url of 48 bytes): the broker checks the outer shape only.
SEALED = "S3" * 32


def entry_of(frame: Frame, key: str, peer: str) -> Frame | None:
    return next((e for e in frame.get(key, []) if isinstance(e, dict) and e.get("peer") == peer), None)


async def peers_showing(client: Joined, peer: str, held: bool, since: int) -> Frame:
    """The client's first ``peers`` from ``since`` on whose entry for ``peer`` has ``held``."""

    def shows(frame: Frame) -> bool:
        entry = entry_of(frame, "peers", peer) if frame.get("type") == "peers" else None
        return entry is not None and entry.get("held") is held

    return await client.peer.wait_for(shows, f"peers with {peer} held {held}", since=since)


async def status_held(client: Joined, held: bool, since: int) -> Frame:
    return await client.peer.wait_for(
        lambda f: f.get("type") == "status" and f.get("held") is held, f"status held {held}", since=since
    )


async def relay_code(sender: Peer, kind: str, to: str, fields: dict[str, object]) -> str:
    """``relayed`` when no error about the message came before a ping's pong, else its code."""
    ref = new_id(kind[:8])
    since = sender.mark()
    await sender.send(type=kind, to=to, id=ref, **fields)
    await sender.sync()
    error = sender.find(lambda f: f.get("type") == "error" and f.get("ref") == ref, since)
    return str(error.get("code")) if error is not None else "relayed"


@checks.scenario(
    {
        "joined.seat-keys": "joined.seat_keys is true for a session scheduled now (section 10)",
        "hold.views": "hold: the client's status says held, every admitted peer's peers and the waiting room show it",
        "hold.no-relay": "nothing is relayed to or from a held client: on_hold both ways; the others carry on",
        "hold.idempotent": "holding a held client, or releasing one not held, is not an error",
        "hold.errors": "hold or release: not_allowed (from a client, of the therapist), not_in_session, not_admitted",
        "hold.release": "release: every view shows the client released, and relaying to and from it resumes",
        "roster.relay": "a roster goes from the therapist to a client with from and seq set, counter and sealed as sent",
        "roster.not-allowed": "a roster from a client gets not_allowed, whatever its target",
        "roster.bad-shape": "a roster with a clear form's field, or without counter or sealed, gets bad_message",
    },
    timeout_s=90.0,
)
async def holds(run: Run) -> None:
    session = await run.session(clients=3)
    therapist = await joined(run, session.therapist.token)
    run.equal("joined.seat-keys", therapist.joined.get("seat_keys"), True, "the therapist's joined.seat_keys")
    a = await waiting_client(run, session, 0)
    b = await waiting_client(run, session, 1)
    run.equal("joined.seat-keys", a.joined.get("seat_keys"), True, "a client's joined.seat_keys")
    for client in (a, b):
        await admit(therapist, client)
    absent = session.clients[2].peer
    t = therapist.peer
    candidate: dict[str, object] = {"candidate": ""}

    # The roster, while nobody is held.
    since, counter = a.peer.mark(), 7
    await t.send(type="roster", to=a.id, counter=counter, sealed=SEALED, **{"from": "Forged00", "seq": 9})
    roster = await a.peer.wait_type("roster", since=since)
    got = (roster.get("from"), roster.get("counter"), roster.get("sealed"))
    run.equal("roster.relay", got, (therapist.id, counter, SEALED), "from, counter, sealed")
    run.check("roster.relay", isinstance(roster.get("seq"), int) and roster.get("seq") != 9, "seq")
    for to in (b.id, therapist.id, "Nobody00"):
        code = await a.peer.request_error("roster", to=to, counter=1, sealed=SEALED)
        run.equal("roster.not-allowed", code, "not_allowed", f"a client's roster to {to}")
    bad: dict[str, dict[str, object]] = {
        "with sdp": {"sdp": "v=0", "counter": 1, "sealed": SEALED},
        "with a mac": {"mac": "bWFj", "counter": 1, "sealed": SEALED},
        "with a candidate line": {"candidate": "", "counter": 1, "sealed": SEALED},
        "without counter": {"sealed": SEALED},
        "without sealed": {"counter": 1},
    }
    mark = a.peer.mark()
    for what, fields in bad.items():
        code = await t.request_error("roster", to=a.id, **fields)
        run.equal("roster.bad-shape", code, "bad_message", f"a roster {what}")
    await a.peer.sync()
    relayed = [f for f in a.peer.frames[mark:] if f.get("type") == "roster"]
    run.equal("roster.bad-shape", relayed, [], "rosters relayed")

    # Refusals change nothing; releasing a client not held is no error.
    for kind in ("hold", "release"):
        code = await a.peer.request_error(kind, peer=b.id)
        run.equal("hold.errors", code, "not_allowed", f"{kind} from a client")
        for target, expected in (
            (therapist.id, "not_allowed"),
            ("Nobody00", "not_in_session"),
            (absent, "not_admitted"),
        ):
            code = await t.request_error(kind, peer=target)
            run.equal("hold.errors", code, expected, f"{kind} of {target}")
    ref, since = new_id("rel"), t.mark()
    await t.send(type="release", peer=a.id, id=ref)
    await t.sync()
    run.check("hold.idempotent", t.find(lambda f: f.get("ref") == ref, since) is None, "releasing an unheld client")

    # Hold: the views.
    marks = {c.id: c.peer.mark() for c in (a, b)}
    since = t.mark()
    await t.send(type="hold", peer=a.id)
    status = await status_held(a, True, marks[a.id])
    run.equal("hold.views", status.get("seat_state"), "admitted", "the held client's seat_state")
    await peers_showing(b, a.id, True, marks[b.id])
    entry = await seat_view(therapist, a.id, lambda e: e.get("held") is True, "waiting room held", since=since)
    run.equal("hold.views", entry.get("state"), "admitted", "the held seat's state in the waiting room")
    therapist_peers = await t.wait_for(
        lambda f: f.get("type") == "peers" and (entry_of(f, "peers", a.id) or {}).get("held") is True,
        "the therapist's peers showing the hold",
        since=since,
    )
    run.check("hold.views", therapist_peers is not None)
    ref, since = new_id("hold"), t.mark()
    await t.send(type="hold", peer=a.id, id=ref)
    await t.sync()
    run.check("hold.idempotent", t.find(lambda f: f.get("ref") == ref, since) is None, "holding a held client")

    # Hold: nothing relayed to or from the held client.
    mark = a.peer.mark()
    for sender, to, what in ((t, a.id, "therapist to held"), (b.peer, a.id, "client to held")):
        run.equal("hold.no-relay", await relay_code(sender, "candidate", to, candidate), "on_hold", what)
    run.equal(
        "hold.no-relay", await relay_code(t, "roster", a.id, {"counter": 8, "sealed": SEALED}), "on_hold", "roster"
    )
    for to, what in ((therapist.id, "held to therapist"), (b.id, "held to client")):
        run.equal("hold.no-relay", await relay_code(a.peer, "candidate", to, candidate), "on_hold", what)
    run.equal("hold.no-relay", await relay_code(t, "candidate", b.id, candidate), "relayed", "therapist to the other")
    await a.peer.sync()
    got_relays = [f.get("type") for f in a.peer.frames[mark:] if f.get("type") in ("candidate", "roster")]
    run.equal("hold.no-relay", got_relays, [], "what the held client received")

    # Release.
    marks = {c.id: c.peer.mark() for c in (a, b)}
    since = t.mark()
    await t.send(type="release", peer=a.id)
    await status_held(a, False, marks[a.id])
    await peers_showing(b, a.id, False, marks[b.id])
    await seat_view(therapist, a.id, lambda e: e.get("held") is False, "waiting room released", since=since)
    run.check("hold.release", True)
    for sender, to, what in ((t, a.id, "therapist to released"), (a.peer, therapist.id, "released to therapist")):
        run.equal("hold.release", await relay_code(sender, "candidate", to, candidate), "relayed", what)
    run.equal(
        "hold.release", await relay_code(t, "roster", a.id, {"counter": 9, "sealed": SEALED}), "relayed", "roster"
    )


def refers_to(ref: str) -> Callable[[Frame], bool]:
    return lambda f: f.get("ref") == ref


async def note_code(sender: Peer, peer: str, fields: Mapping[str, object]) -> str:
    """``accepted`` when no error about a ``waiting_note`` came before a ping's pong, else its code."""
    ref, since = new_id("note"), sender.mark()
    await sender.send(type="waiting_note", peer=peer, id=ref, **fields)
    await sender.sync()
    error = sender.find(refers_to(ref), since)
    return str(error.get("code")) if error is not None else "accepted"


@checks.scenario(
    {
        "note.delivered": "waiting_note: to a waiting or checking client as therapist_note, sealed as sent, to nobody else",
        "note.confirmed": "an accepted waiting_note gets no error before the pong of a ping sent behind it",
        "note.errors": "waiting_note: not_allowed (from a client, to the therapist), not_in_session, invalid_state "
        "(an admitted client), bad_message (no sealed, a field in clear)",
    },
    timeout_s=60.0,
)
async def notes(run: Run) -> None:
    session = await run.session(clients=3)
    therapist = await joined(run, session.therapist.token)
    t = therapist.peer
    waiting = await waiting_client(run, session, 0)
    admitted = await waiting_client(run, session, 1)
    checking = await joined(run, session.clients[2].token)
    await admit(therapist, admitted)
    marks = {c.id: c.peer.mark() for c in (waiting, admitted, checking)}

    for client, what in ((waiting, "a waiting client"), (checking, "a checking client")):
        run.equal("note.confirmed", await note_code(t, client.id, {"sealed": SEALED}), "accepted", what)
        note = await client.peer.wait_type("therapist_note", since=marks[client.id])
        run.equal("note.delivered", (note.get("sealed"), note.get("from")), (SEALED, None), what)

    code = await note_code(waiting.peer, checking.id, {"sealed": SEALED})
    run.equal("note.errors", code, "not_allowed", "a note from a client")
    for target, expected in (
        (therapist.id, "not_allowed"),
        ("Nobody00", "not_in_session"),
        (admitted.id, "invalid_state"),
    ):
        run.equal("note.errors", await note_code(t, target, {"sealed": SEALED}), expected, target)
    for what, fields in (("without sealed", {}), ("with text in clear", {"sealed": SEALED, "text": "hello"})):
        code = await note_code(t, waiting.id, fields)
        run.equal("note.errors", code, "bad_message", f"a note {what}")

    for client in (waiting, admitted, checking):
        await client.peer.sync()
    notes_got = {
        c.id: [f for f in c.peer.frames[marks[c.id] :] if f.get("type") == "therapist_note"]
        for c in (waiting, admitted, checking)
    }
    run.equal(
        "note.delivered", [len(notes_got[c.id]) for c in (waiting, admitted, checking)], [1, 0, 1], "notes per client"
    )
