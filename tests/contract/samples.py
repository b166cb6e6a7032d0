"""A sample of every signaling message, both forms of the relayed ones, made with the Structs of
broker/signaling/protocol.py (so they are what its encoder writes)."""

from __future__ import annotations

import msgspec

from broker.signaling import protocol as p

PEER = "abcdEFGH"
OTHER = "zyx_-987"
SEALED = "A" * 43 + "w"  # 44 base64url characters: 33 bytes
SECRET = "S" * 43
SDP = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
CANDIDATE = "candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host"


def client_samples() -> list[msgspec.Struct]:
    return [
        p.Hello(protocol=p.PROTOCOL_VERSION, agent="sample/1", id="m-1"),
        p.Join(token="tok_en-1", resume=7, resume_secret=SECRET),
        p.ChecklistSubmit(
            policy_version="2026-1",
            answers={"private_room": True, "headphones": False},
            consent_version="3",
            details=SEALED,
            answers_sealed=SEALED,
            safety_plan=SEALED,
        ),
        p.PreflightOffer(sdp=SDP),
        p.Admit(peer=PEER, device=OTHER),
        p.Decline(peer=PEER),
        p.Remove(peer=PEER),
        p.AllowReturn(peer=PEER),
        p.Hold(peer=PEER, id="hold-1"),
        p.Release(peer=PEER),
        p.Offer(to=PEER, sdp=SDP, counter=1, mac="bWFj"),
        p.Offer(to=PEER, sealed=SEALED, counter=2),
        p.Answer(to=PEER, sdp=SDP, counter=1, mac=None),
        p.Answer(to=PEER, sealed=SEALED, counter=3),
        p.Candidate(to=PEER, candidate=CANDIDATE, sdp_mid="0", sdp_mline_index=0),
        p.Candidate(to=PEER, candidate="", sdp_mid="0", sdp_mline_index=0),
        p.Candidate(to=PEER, sealed=SEALED, counter=4),
        p.Renegotiate(to=PEER),
        p.Roster(to=PEER, counter=5, sealed=SEALED),
        p.WaitingNote(peer=PEER, sealed=SEALED, id="note-1"),
        p.Report(event="interception_warning", peer=PEER, reason="bad_mac"),
        p.Leave(),
        p.End(verification={PEER: "link", OTHER: "safety_code"}),
        p.Ping(n=3, id="ping_1"),
        p.Ping(n=4, ack=17),
    ]


def server_samples() -> list[msgspec.Struct]:
    other = p.OtherDeviceEntry(device=OTHER, state=p.SeatState.WAITING, connected=True, checklist={"ok": True})
    return [
        p.Welcome(protocol=p.PROTOCOL_VERSION, heartbeat_s=20.0, auth_deadline_s=5.0, max_message_bytes=65536),
        p.Joined(
            session="sess1",
            peer=PEER,
            role=p.Role.CLIENT,
            seat_state=p.SeatState.CHECKING,
            session_state=p.SessionState.OPEN,
            starts=1_800_000_000,
            expires=1_800_005_000,
            minor=False,
            ice_servers=[{"urls": ["turn:turn.example:3478"], "username": "u", "credential": "c"}],
            ice_transport_policy="relay",
            policy={"version": "2026-1", "items": []},
            seat_token="seat-token",
            resume_secret=SECRET,
            other_device=False,
            seat_keys=True,
            media="janus",
        ),
        p.Status(seat_state=p.SeatState.WAITING, session_state=p.SessionState.OPEN, therapist_present=True),
        p.Status(seat_state=p.SeatState.ADMITTED, session_state=p.SessionState.LIVE, therapist_present=True, held=True),
        p.ChecklistAccepted(summary={"all_required_met": True}),
        p.PreflightAnswer(sdp=SDP),
        p.WaitingRoom(
            seats=[
                p.WaitingEntry(
                    peer=PEER,
                    state=p.SeatState.WAITING,
                    connected=True,
                    minor=True,
                    group=True,
                    held=False,
                    checklist={"all_required_met": True},
                    details=SEALED,
                    other_device=other,
                    other_device_declined=False,
                )
            ]
        ),
        p.Peers(
            peers=[
                p.PeerInfo(peer=PEER, role=p.Role.THERAPIST, connected=True, you_offer=False, device=None),
                p.PeerInfo(peer=OTHER, role=p.Role.CLIENT, connected=True, you_offer=True, group=True, held=True),
            ]
        ),
        p.Declined(),
        p.Removed(),
        p.SessionRecord(record={"session": "sess1", "seats": []}, signature="c2ln", key_id="key-1"),
        p.SessionEnded(reason="expired"),
        p.TherapistNote(sealed=SEALED),
        p.SessionEnded(reason="cancelled"),
        p.Error(code=p.ErrorCode.SESSION_CANCELLED, message="This session was cancelled.", ref="m-2"),
        p.Pong(n=3),
        p.Reconnect(reason="restart", after_ms=250),
        p.MediaJanus(
            url="https://janus.practice.example/janus",
            room=4503599627370495,
            pin="0f" * 16,
            token="t" * 43,
            join_by=1_800_000_120,
            slot=3,
        ),
        p.Error(code=p.ErrorCode.JANUS_UNAVAILABLE, message="The media server is not answering."),
        p.Error(code=p.ErrorCode.PREFLIGHT_BUSY, message="Wait.", ref="m-1", retry_after_ms=1500),
        p.Offer(to=PEER, sealed=SEALED, counter=2, from_=OTHER, seq=1),
        p.Answer(to=PEER, sdp=SDP, counter=1, mac="bWFj", from_=OTHER, seq=2),
        p.Candidate(to=PEER, candidate=CANDIDATE, sdp_mid="0", from_=OTHER, seq=3),
        p.Renegotiate(to=PEER, from_=OTHER, seq=4),
        p.Roster(to=PEER, counter=6, sealed=SEALED, from_=OTHER, seq=5),
    ]


def wire_type(message: msgspec.Struct) -> str:
    return str(message.__struct_config__.tag)
