"""Ids the broker makes: random, of fixed length, and typeable after a CLI command."""

from __future__ import annotations

from broker.signaling.tokens import new_peer_id, new_session_id


def test_session_and_peer_ids_never_look_like_command_line_options() -> None:
    """`broker session revoke SESSION PEER` takes both; an id starting with "-" would read as an option."""
    sessions = [new_session_id() for _ in range(2000)]
    peers = [new_peer_id() for _ in range(2000)]
    assert not [i for i in sessions + peers if i.startswith("-")]
    assert all(len(i) == 22 for i in sessions) and all(len(i) == 8 for i in peers)
    assert len(set(sessions)) == 2000
