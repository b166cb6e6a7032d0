"""``media_janus``: what an admitted participant of a Janus session needs to join its room.

Kept apart from protocol.py (which re-exports it in ``ServerMessage``) so that file stays readable.
The message holds a PIN and a token, so its ``repr`` leaves them out: a message printed or
logged by mistake shows no secret (docs/security.md 3.11).
"""

from __future__ import annotations

import msgspec


class MediaJanus(msgspec.Struct, tag_field="type", tag="media_janus", kw_only=True):
    """Credentials for the session's Janus VideoRoom room, sent to one admitted seat's connection only."""

    #: Janus's API as browsers reach it (the practice's proxy in front of Janus's HTTP or WebSocket transport).
    url: str
    #: The session's room number (below 2**53).
    room: int
    #: The room's PIN: the same for every participant of the session.
    pin: str
    #: This seat's own token: Janus's API and the room's access list accept it until it is revoked.
    token: str
    #: Unix seconds: join the room before then (the token stops opening the room's door).
    join_by: int
    #: This seat's place in the session (0 to 31; the therapist's is 0): the sender slot of its frames'
    #: key ids (docs/protocol.md 7.12). Fixed for the session's life, whoever holds the seat.
    slot: int

    def __repr__(self) -> str:
        return f"MediaJanus(url={self.url!r}, room={self.room}, pin=..., token=..., join_by={self.join_by}, slot={self.slot})"
