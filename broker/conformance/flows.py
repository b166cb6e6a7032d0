"""The steps every scenario shares, written from docs/protocol.md: join, the network pre-flight
(section 9, a real WebRTC data channel with aiortc), the checklist (section 8) and admission."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from broker.conformance.report import Run, Session
from broker.conformance.wire import Frame, Peer, Unexpected, join, new_id
from broker.crypto.safety_plan import SafetyPlan, seal_safety_plan
from broker.crypto.sealed_for_therapist import seal_checklist, seal_details

#: Emergency details as the browser writes them (section 7.4): made up, never a person's.
DETAILS = json.dumps({"location": "conformance test", "contact": "nobody"}, separators=(",", ":"))
#: A safety plan (section 7.4.3), made up too.
SAFETY_PLAN = SafetyPlan(code_word="conformance test", call_back=False, how="")


@dataclass
class Joined:
    """A peer that joined a seat, with the ``joined`` frame it got."""

    peer: Peer
    joined: Frame

    @property
    def id(self) -> str:
        return str(self.joined["peer"])

    @property
    def secret(self) -> str | None:
        return self.joined.get("resume_secret")


async def joined(run: Run, token: str, **extra: Any) -> Joined:
    peer = await run.open()
    return Joined(peer, await join(peer, token, **extra))


async def preflight(
    peer: Peer, timeout: float = 25.0, while_running: Callable[[], Awaitable[None]] | None = None
) -> Frame:
    """Section 9 step by step: an in-band ``preflight`` channel, the offer with its candidates,
    a pong for every ping; the broker's ``done`` message. ``while_running`` is called once the
    answer came, while this pre-flight still runs."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    done: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
    channel = pc.createDataChannel("preflight")

    @channel.on("message")
    def on_message(data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, str) else None
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("t") == "ping":
            channel.send(json.dumps({"t": "pong", "n": message.get("n")}))
        elif message.get("t") == "done" and not done.done():
            done.set_result(message)

    try:
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate here
        ref = new_id("pf")
        since = peer.mark()
        await peer.send(type="preflight_offer", sdp=pc.localDescription.sdp, id=ref)
        reply = await peer.reply_to(ref, ("preflight_answer",), since=since, timeout=timeout)
        if reply["type"] != "preflight_answer":
            raise Unexpected(f"the pre-flight offer got {reply.get('code')}")
        if while_running is not None:
            await while_running()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
        try:
            return await asyncio.wait_for(done, 12.0)
        except TimeoutError:
            raise Unexpected("the pre-flight sent no `done` within 12 s of its answer") from None
    finally:
        await pc.close()


def needs_preflight(policy: Frame) -> bool:
    return any(item.get("check") == "preflight" for item in policy.get("items", []))


def offers_safety_plan(policy: Frame) -> bool:
    """The practice offers the client a safety plan (section 8, ``safety.plan``)."""
    return bool((policy.get("safety") or {}).get("plan"))


def checklist_fields(session: Session, client: Joined, **changes: Any) -> dict[str, Any]:
    """A checklist meeting every required item of the seat's policy (``joined.policy``), with
    the sealed details and answers the document asks for; ``changes`` override fields."""
    policy = client.joined["policy"]
    items = policy["items"]
    fields: dict[str, Any] = {
        "policy_version": policy["version"],
        "answers": {item["id"]: True for item in items if item.get("level") == "required"},
        "answers_sealed": seal_checklist(session.link_key, session.id, client.id, {i["id"]: True for i in items}),
    }
    if any(item.get("kind") == "consent" for item in items) and policy.get("consent"):
        fields["consent_version"] = policy["consent"]["version"]
    if any(item.get("kind") == "details" for item in items):
        fields["details"] = seal_details(session.link_key, session.id, client.id, DETAILS)
    if offers_safety_plan(policy):
        fields["safety_plan"] = seal_safety_plan(session.link_key, session.id, client.id, SAFETY_PLAN)
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


async def submit_checklist(session: Session, client: Joined, **changes: Any) -> Frame:
    """The ``checklist_accepted`` or ``error`` answering a checklist."""
    ref = new_id("cl")
    since = client.peer.mark()
    await client.peer.send(type="checklist", id=ref, **checklist_fields(session, client, **changes))
    return await client.peer.reply_to(ref, ("checklist_accepted",), since=since, timeout=20.0)


async def to_waiting_room(session: Session, client: Joined) -> Frame:
    """Pre-flight (when the policy has it) and checklist; the ``checklist_accepted`` frame."""
    if needs_preflight(client.joined["policy"]):
        await preflight(client.peer)
    reply = await submit_checklist(session, client)
    if reply["type"] != "checklist_accepted":
        raise Unexpected(f"a complete checklist got {reply.get('code')}")
    return reply


async def waiting_client(run: Run, session: Session, index: int = 0) -> Joined:
    client = await joined(run, session.clients[index].token)
    await to_waiting_room(session, client)
    return client


async def admit(therapist: Joined, client: Joined, device: str | None = None) -> None:
    """The therapist admits; returns once the client's ``status`` says ``admitted``."""
    since = client.peer.mark()
    fields = {"peer": client.id} if device is None else {"peer": client.id, "device": device}
    await therapist.peer.send(type="admit", **fields)
    await client.peer.wait_for(
        lambda f: f.get("type") == "status" and f.get("seat_state") == "admitted", "status admitted", since=since
    )


async def admitted_pair(run: Run, clients: int = 1) -> tuple[Session, Joined, Joined]:
    """A session with its therapist and first client in the call."""
    session = await run.session(clients=clients)
    therapist = await joined(run, session.therapist.token)
    client = await waiting_client(run, session)
    await admit(therapist, client)
    return session, therapist, client


def waiting_entry(frame: Frame, peer: str) -> Frame | None:
    return next((s for s in frame.get("seats", []) if s.get("peer") == peer), None)


async def seat_view(therapist: Joined, peer: str, match: Any, what: str, since: int = 0) -> Frame:
    """The therapist's first ``waiting_room`` entry of ``peer`` that ``match`` accepts."""

    def accepts(frame: Frame) -> bool:
        entry = waiting_entry(frame, peer) if frame.get("type") == "waiting_room" else None
        return entry is not None and bool(match(entry))

    frame = await therapist.peer.wait_for(accepts, what, since=since)
    entry = waiting_entry(frame, peer)
    assert entry is not None
    return entry
