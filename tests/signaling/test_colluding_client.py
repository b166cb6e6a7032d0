"""A client who colludes with a malicious broker cannot attack another client (issue 21; protocol 7.1, 7.8).

The colluder holds what its own link and its own roster give it: its seat key and its
client-pair key with the victim. The broker gone bad passes on whatever the colluder makes,
under any ``from`` it likes (``deliver``), and hands it the victim's sealed emergency
details. Each attack runs ``ROUNDS`` times against real aiortc peers (the connection set up
again between rounds) and must be detected every time:

- (a) an offer or a roster "from the therapist" made by the colluder does not open
  (``bad_mac``): it lacks the victim's seat key; a forged roster changes nothing;
- (b) the colluder puts another certificate (a box in the middle) into its own descriptions
  to the victim, sealed validly under the client-pair key its roster gave it: the
  fingerprint is not the one the therapist vouched for (``fingerprint_mismatch``);
- (c) the victim's sealed details do not open under any key the colluder holds, while the
  therapist opens them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.client.broker_client import BrokerClient
from broker.client.peers import PeerLink
from broker.crypto.link_key import b64url_encode
from broker.crypto.roster import RosterEntry
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.crypto.sealed_for_therapist import DetailsError, open_details
from broker.signaling.protocol import Answer, Offer, Roster, WaitingRoom, encode
from broker.store.bus import Envelope
from tests.client.seats import Call, three_way, wait_for
from tests.conftest import RunningBroker, start_broker
from tests.signaling.test_malicious_relay import ATTACKER_FINGERPRINT, attacker_description

ROUNDS = 20


@pytest.fixture(scope="module")
async def evil(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningBroker]:
    running = await start_broker(Path(tmp_path_factory.mktemp("colluding-broker")))
    yield running
    await running.stop()


async def deliver(running: RunningBroker, session_id: str, message: Offer | Roster) -> None:
    """The broker passes a message on as it likes, ``from`` included (no check of its own)."""
    await running.broker.hub.relays.bus.publish(session_id, Envelope(message.to, None, encode(message)))


def colluders_authenticator(colluder: BrokerClient) -> SdpAuthenticator:
    """Everything the colluder can sign or seal with: its seat key and the keys its roster gave it."""
    assert colluder.auth is not None
    return colluder.auth


class ColludingClient(BrokerClient):
    """A client that, towards ``victim``, describes another certificate than its own (a box in
    the middle), sealed validly under the client-pair key its roster gave it."""

    victim: str | None = None

    async def _send_description(self, link: PeerLink, kind: str) -> None:
        if link.peer != self.victim or self.auth is None or self.links.get(link.peer) is not link:
            await super()._send_description(link, kind)
            return
        sdp = re.sub(r"a=fingerprint:\S+ \S+", f"a=fingerprint:{ATTACKER_FINGERPRINT}", link.pc.localDescription.sdp)
        counter, sealed = self.auth.seal(link.peer, kind, {"sdp": sdp})
        cls = Offer if kind == "offer" else Answer
        await self._send(cls(to=link.peer, counter=counter, sealed=sealed))


async def reconnected(call: Call, victim: BrokerClient) -> None:
    """The victim's connection with the therapist set up again after an attack closed it."""
    therapist = call.therapist
    if therapist.peer_id not in victim.links:
        await victim.renegotiate(therapist.peer_id)
    await victim.wait_connected(therapist.peer_id, timeout=15)


async def test_a_colluder_cannot_speak_as_the_therapist_offers_and_rosters(evil: RunningBroker) -> None:
    call = await three_way(evil)
    colluder, victim = call.clients
    therapist = call.therapist
    try:
        auth = colluders_authenticator(colluder)
        roster_before = victim.auth.roster if victim.auth else None
        assert roster_before is not None and roster_before.entry(colluder.peer_id) is not None
        fake = await attacker_description()
        for round_ in range(ROUNDS):
            await reconnected(call, victim)
            # The best it can do: seal "therapist -> victim" under a key it holds (its seat key, or
            # its client-pair key with the victim), the broker saying it comes from the therapist.
            key = auth.pair_link_key(therapist.peer_id if round_ % 2 else victim.peer_id)
            assert key is not None
            forger = SdpAuthenticator(key, call.links.session, therapist.peer_id)
            counter, sealed = forger.seal(victim.peer_id, "offer", {"sdp": fake})
            await deliver(
                evil,
                call.links.session,
                Offer(to=victim.peer_id, counter=counter, sealed=sealed, from_=therapist.peer_id),
            )
            await wait_for(lambda n=2 * round_ + 1: len(victim.interceptions) == n)
            assert victim.interceptions[-1].peer == therapist.peer_id
            assert victim.interceptions[-1].reason == "bad_mac"
            # A roster "from the therapist" that vouches for its own box in the middle.
            entry = RosterEntry(colluder.peer_id, ATTACKER_FINGERPRINT, b64url_encode(key), False)
            forger = SdpAuthenticator(key, call.links.session, therapist.peer_id, therapist=True)
            counter, sealed, _ = forger.seal_roster(victim.peer_id, [entry])
            await deliver(
                evil,
                call.links.session,
                Roster(to=victim.peer_id, counter=counter, sealed=sealed, from_=therapist.peer_id),
            )
            await wait_for(lambda n=2 * round_ + 2: len(victim.interceptions) == n)
            assert victim.interceptions[-1].reason == "bad_mac"
            assert victim.auth is not None and victim.auth.roster == roster_before  # the forged roster changed nothing
        assert colluder.peer_id in victim.links  # the real pair of clients stays up throughout
    finally:
        await call.close()


async def test_a_colluder_cannot_put_a_box_between_it_and_another_client(evil: RunningBroker) -> None:
    call = await three_way(evil, classes=[ColludingClient], connect=False)
    colluder, victim = call.clients
    assert isinstance(colluder, ColludingClient)
    colluder.victim = victim.peer_id
    try:
        await victim.wait_connected(call.therapist.peer_id)
        await colluder.wait_connected(call.therapist.peer_id)
        # Whoever offers, the colluder's description of another certificate is refused.
        victim_offers = victim.peer_id < colluder.peer_id
        for round_ in range(ROUNDS):
            if round_:
                await (colluder.renegotiate(victim.peer_id) if victim_offers else victim.renegotiate(colluder.peer_id))
            await wait_for(lambda n=round_ + 1: len(victim.interceptions) == n)
            assert victim.interceptions[-1].peer == colluder.peer_id
            assert victim.interceptions[-1].reason == "fingerprint_mismatch"
            assert colluder.peer_id not in victim.links
        assert victim.auth is not None and victim.auth.vouched_fingerprint(colluder.peer_id) != ATTACKER_FINGERPRINT
        await victim.wait_connected(call.therapist.peer_id)  # its pair with the therapist is untouched
    finally:
        await call.close()


async def test_a_colluder_cannot_open_another_clients_emergency_details(evil: RunningBroker) -> None:
    for _ in range(ROUNDS):
        call = await three_way(evil, connect=False)
        colluder, victim = call.clients
        try:
            room = await call.therapist.expect(
                WaitingRoom, where=lambda m: all(s.details for s in m.seats) and len(m.seats) == 2
            )
            sealed = next(s.details for s in room.seats if s.peer == victim.peer_id)
            assert sealed is not None
            # The broker forwards the victim's blob to the colluder: no key the colluder holds opens it.
            await colluder.wait_connected(victim.peer_id)
            assert colluder.auth is not None and colluder.link_key is not None
            held_keys = [colluder.link_key, colluder.auth.pair_link_key(victim.peer_id)]
            for key in held_keys:
                assert key is not None
                for seat in (victim.peer_id, colluder.peer_id):
                    with pytest.raises(DetailsError):
                        open_details(key, call.links.session, seat, sealed)
            # The therapist opens it, under that client's seat key.
            assert f"home of {victim.peer_id}" in call.therapist.open_details(victim.peer_id, sealed)
        finally:
            await call.close()
