"""SdpAuthenticator with a key per seat (docs/protocol.md 7.1, 7.4, 7.8): which key each pair
uses, the roster sealed by the therapist's side and acted on by a client, and what a client
holding only its own seat key cannot do."""

from __future__ import annotations

import itertools

import pytest

from broker.crypto.link_key import b64url_encode, decode_link_key, new_link_key
from broker.crypto.roster import RosterEntry
from broker.crypto.sdp_auth import InterceptionError
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.crypto.sealed_for_therapist import DetailsError, open_details, seal_details
from broker.crypto.seat_keys import client_pair_key, group_key, seat_key
from tests.crypto.test_e2ee import chrome_like_sdp
from tests.crypto.test_e2ee import fake_fingerprint as fake_hex

SESSION = "s_seats01"
T, A, B = "therapist", "seat-a", "seat-b"


def fake_fingerprint(seed: str) -> str:
    """The normalised fingerprint of ``chrome_like_sdp(seed)``."""
    return "sha-256 " + fake_hex(seed)


def parties(**therapist_options: bool) -> tuple[bytes, SdpAuthenticator, SdpAuthenticator, SdpAuthenticator]:
    secret = decode_link_key(new_link_key())
    ticks = itertools.count(1_000)
    therapist = SdpAuthenticator(secret, SESSION, T, therapist=True, clock=lambda: next(ticks), **therapist_options)
    a = SdpAuthenticator(seat_key(secret, SESSION, A), SESSION, A, clock=lambda: next(ticks))
    b = SdpAuthenticator(seat_key(secret, SESSION, B), SESSION, B, clock=lambda: next(ticks))
    for client in (A, B):
        therapist.set_peer(client, role="client")
    for me, other in ((a, B), (b, A)):
        me.set_peer(T, role="therapist")
        me.set_peer(other, role="client")
    return secret, therapist, a, b


def roster_for(therapist: SdpAuthenticator, client: str, other: str, fp: str, *, held: bool = False) -> RosterEntry:
    return RosterEntry(other, fp, therapist.client_pair_key(client, other), held)


def test_the_therapist_authenticates_each_client_under_that_clients_seat_key() -> None:
    secret, therapist, a, b = parties()
    assert therapist.pair_link_key(A) == seat_key(secret, SESSION, A) != therapist.pair_link_key(B)
    counter, sealed = therapist.seal(A, "offer", {"sdp": chrome_like_sdp("t")})
    assert a.unseal(T, "offer", counter, sealed)["sdp"] == chrome_like_sdp("t")
    counter, sealed = a.seal(T, "answer", {"sdp": chrome_like_sdp("a")})
    assert therapist.unseal(A, "answer", counter, sealed)
    # Client B, holding only its own seat key, cannot seal "from the therapist" to A.
    forged = SdpAuthenticator(b.pair_link_key(T), SESSION, T)
    counter, sealed = forged.seal(A, "offer", {"sdp": chrome_like_sdp("mitm")})
    with pytest.raises(InterceptionError) as caught:
        a.unseal(T, "offer", counter, sealed)
    assert caught.value.reason == "bad_mac"


def test_group_seats_and_sessions_before_seat_keys_use_the_keys_their_links_carry() -> None:
    secret, therapist, _a, _b = parties()
    therapist.set_peer(A, role="client", group=True)
    assert therapist.pair_link_key(A) == group_key(secret, SESSION)
    legacy = SdpAuthenticator(secret, SESSION, T, therapist=True, seat_keys=False)
    legacy.set_peer(A, role="client")
    assert legacy.pair_link_key(A) == secret


def test_a_client_has_no_key_for_another_client_until_a_roster_gives_it() -> None:
    secret, therapist, a, b = parties()
    assert not a.can_authenticate(B) and not b.can_authenticate(A)
    with pytest.raises(ValueError, match="without the link key"):
        a.seal(B, "offer", {"sdp": chrome_like_sdp("a")})
    fp_b = fake_fingerprint("b")
    counter, sealed, version = therapist.seal_roster(A, [roster_for(therapist, A, B, fp_b)])
    roster = a.accept_roster(T, counter, sealed, relayed=True)
    assert roster is not None and roster.version == version
    assert a.pair_link_key(B) == client_pair_key(secret, SESSION, A, B) and a.vouched_fingerprint(B) == fp_b
    # The same roster again over the chat channel: opened, not acted on, counters untouched.
    assert a.accept_roster(T, counter, sealed, relayed=False) is None
    # Relayed again: a replay.
    with pytest.raises(InterceptionError) as caught:
        a.accept_roster(T, counter, sealed, relayed=True)
    assert caught.value.reason == "replayed_counter"
    # B, given K_clients(A, B) by its own roster, seals to A; A accepts only B's vouched fingerprint.
    counter, sealed, _ = therapist.seal_roster(B, [roster_for(therapist, B, A, fake_fingerprint("a"))])
    assert b.accept_roster(T, counter, sealed, relayed=False) is not None
    counter, sealed = b.seal(A, "offer", {"sdp": chrome_like_sdp("b")})
    assert a.unseal(B, "offer", counter, sealed)
    counter, sealed = b.seal(A, "offer", {"sdp": chrome_like_sdp("box in the middle")})
    with pytest.raises(InterceptionError) as caught:
        a.unseal(B, "offer", counter, sealed)
    assert caught.value.reason == "fingerprint_mismatch"


def test_only_a_newer_roster_from_the_therapist_is_acted_on() -> None:
    _secret, therapist, a, b = parties()
    first = therapist.seal_roster(A, [roster_for(therapist, A, B, fake_fingerprint("b"))])
    second = therapist.seal_roster(A, [])  # B removed
    assert second[2] > first[2]
    assert a.accept_roster(T, second[0], second[1], relayed=False) is not None
    assert not a.can_authenticate(B)
    assert a.accept_roster(T, first[0], first[1], relayed=False) is None  # older: ignored
    assert not a.can_authenticate(B)
    # A roster made by client B (who holds K_clients(A, B) and its own seat key) does not open.
    for key in (b.pair_link_key(T), client_pair_key(_secret, SESSION, A, B)):
        assert key is not None
        forger = SdpAuthenticator(key, SESSION, T, therapist=True, clock=lambda: 2**52)
        forger.set_peer(A, role="client")
        entry = RosterEntry(B, fake_fingerprint("evil"), b64url_encode(key), False)
        counter, sealed, _ = forger.seal_roster(A, [entry])
        with pytest.raises(InterceptionError) as caught:
            a.accept_roster(T, counter, sealed, relayed=True)
        assert caught.value.reason == "bad_mac"
    assert not a.can_authenticate(B)


def test_only_the_therapist_opens_a_clients_details() -> None:
    secret, therapist, a, b = parties()
    a_key = a.pair_link_key(T)
    assert a_key is not None
    sealed = seal_details(a_key, SESSION, A, '{"location":"home","contact":"sister"}')
    assert therapist.open_details(A, sealed) == '{"location":"home","contact":"sister"}'
    for key in (b.pair_link_key(T), client_pair_key(secret, SESSION, A, B)):
        assert key is not None
        for seat in (A, B):
            with pytest.raises(DetailsError):
                open_details(key, SESSION, seat, sealed)
