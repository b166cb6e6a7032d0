"""The Python client's negotiation with each other peer: offers, answers, candidates and rosters.

What it sends a peer it seals end to end with that pair's link key (or signs with a MAC in
clear, for a peer of before sealed signaling), what it receives it opens or checks
(broker/crypto/; docs/protocol.md 7.7), and it drives the aiortc connection of each pair
(``peers``). Anything that fails authentication is an interception warning, reported and
the connection closed.

Between two clients the therapist vouches (7.8): the therapist's side sends each client a
roster of the others' DTLS fingerprints and client-pair keys; a client connects to another
client only while its latest roster lists it, keeps that client's early signaling for up to
``EARLY_SIGNAL_S`` until one does, and closes the pair when a newer roster drops it or
changes its fingerprint. Private time (7.9): towards a held peer, and from a held client
towards everyone, no media is sent and none taken, on the same connections.

``BrokerClient`` is this plus its connection to the broker; kept apart so that each can be
read alone. The subclass provides ``_send`` and ``_notify`` (and sets ``joined``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from aiortc import RTCCertificate, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from broker.client.peers import HeldCandidate, PeerLink, check_uses_certificate, open_link
from broker.client.trace import SetupTrace
from broker.crypto.roster import RosterEntry
from broker.crypto.sdp_auth import InterceptionError, Trust, fingerprint_of
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.signaling.protocol import Answer, Candidate, Joined, MediaJanus, Offer, Peers, Renegotiate, Report, Roster

log = logging.getLogger("broker.client")

#: How long signaling from a client that no roster lists yet is kept waiting for one (7.8).
EARLY_SIGNAL_S: Final = 30.0
#: After its first ``peers`` the therapist's side sends rosters at the latest this much later (7.8).
ROSTER_DEADLINE_S: Final = 10.0


@dataclass(frozen=True)
class Interception:
    """An offer or answer that failed authentication: someone may be in the middle."""

    peer: str
    reason: str


class PeerNegotiation:
    """The connections with the session's other peers, and the signaling that sets them up."""

    def __init__(self, *, media: bool, ice_servers: list[dict[str, Any]] | None, allow_unverified: bool) -> None:
        self.media = media
        self.ice_override = ice_servers
        self.allow_unverified = allow_unverified
        self.joined: Joined | None = None
        #: In a Janus session: this seat's credentials for the session's room (``media_janus``), once given.
        self.janus: MediaJanus | None = None
        self.auth: SdpAuthenticator | None = None
        self.links: dict[str, PeerLink] = {}
        self.interceptions: list[Interception] = []
        self._pending_candidates: dict[str, list[HeldCandidate]] = {}
        #: Signaling dropped without a warning, by why (content-free): clear candidates from a
        #: peer whose description came sealed, replayed sealed candidates, ...
        self.dropped: dict[str, int] = {}
        #: The device holding each peer's seat, as the last ``peers`` said.
        self._devices: dict[str, str | None] = {}
        self._offers_to: dict[str, bool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Off by default: a content-free trace of the set-up, for finding rare failures (``trace``).
        self.trace: SetupTrace | None = None
        #: One DTLS certificate for every connection, so each peer sees one fingerprint (7.8).
        self.certificate = RTCCertificate.generateCertificate()
        #: Each admitted peer's role, and whether the connection of each is live, as ``peers`` said.
        self._roles: dict[str, str] = {}
        self._peer_connected: dict[str, bool] = {}
        #: Client side: signaling from another client that no roster lists yet, with when it came.
        self._early: dict[str, list[tuple[float, Offer | Answer | Candidate]]] = {}
        #: Clients to ask for a fresh offer once a roster lists them: their early offer waited too
        #: long, or a roster made us drop the pair.
        self._ask_offer: set[str] = set()
        #: Private time (7.9): who ``peers`` says is held, who the therapist's roster says is, and us.
        self._held_by_peers: set[str] = set()
        self._held_by_roster: set[str] = set()
        self.self_held = False
        #: Therapist's side: each client's fingerprint from its authenticated SDP, and what each
        #: client's last roster said (to send a new one only when that changes).
        self._fingerprints: dict[str, str] = {}
        self._roster_said: dict[str, tuple[RosterEntry, ...]] = {}
        self._rosters_due = False
        self._roster_timer: asyncio.TimerHandle | None = None
        #: Rosters this side sent (therapist) or acted on (client): for tests and diagnostics.
        self.rosters_sent = 0
        self.rosters_acted = 0

    @property
    def is_therapist(self) -> bool:
        return self.joined is not None and self.joined.role == "therapist"

    async def _send(self, message: msgspec.Struct) -> None:
        """Send a message to the broker (the subclass's connection)."""
        raise NotImplementedError

    async def _notify(self) -> None:
        """Wake whoever waits for a change (the subclass's)."""
        raise NotImplementedError

    async def _on_peers(self, message: Peers) -> None:
        wanted = {p.peer: p for p in message.peers}
        self._offers_to = {p.peer: p.you_offer for p in message.peers}
        self._roles = {p.peer: p.role for p in message.peers}
        self._peer_connected = {p.peer: p.connected for p in message.peers}
        self._held_by_peers = {p.peer for p in message.peers if p.held}
        if self.auth is not None:
            for info in message.peers:
                self.auth.set_peer(info.peer, role=info.role, group=info.group)
        for peer, link in list(self.links.items()):
            if peer not in wanted:
                await self._close_link(link)
            elif peer in self._devices and self._devices[peer] != wanted[peer].device:
                await self._close_link(link)  # the seat moved to another device: never keep the old one
        for peer in list(self._fingerprints):
            if peer not in wanted or (peer in self._devices and self._devices[peer] != wanted[peer].device):
                del self._fingerprints[peer]  # gone: vouched for again once its new page authenticates
        self._devices = {p.peer: p.device for p in message.peers}
        for info in message.peers:
            current = self.links.get(info.peer)
            healthy = (
                current is not None and not current.closed and current.pc.connectionState not in ("failed", "closed")
            )
            if info.you_offer and info.connected and not healthy and self._may_connect(info.peer):
                if current is not None:
                    await self._close_link(current)
                self._spawn(self._start_offer(info.peer))
        self._apply_holds()
        await self._replay_early()
        if self.is_therapist:
            if self._roster_timer is None:
                loop = asyncio.get_running_loop()
                self._roster_timer = loop.call_later(ROSTER_DEADLINE_S, self._roster_deadline)
            await self._send_rosters()

    def _may_connect(self, peer: str) -> bool:
        """The therapist connects to every client; a client to another client only while a roster lists it."""
        if self.is_therapist or self._roles.get(peer) == "therapist":
            return True
        return self.auth is not None and self.auth.can_authenticate(peer)

    async def _on_renegotiate(self, peer: str) -> None:
        """The peer asks for a fresh offer: only the offerer of the pair makes one."""
        if self._offers_to.get(peer) and self._may_connect(peer):
            link = self.links.get(peer)
            if link is not None:
                await self._close_link(link)
            self._spawn(self._start_offer(peer))

    async def _start_offer(self, peer: str) -> None:
        assert self.auth is not None
        if not self._may_connect(peer):
            return  # another client that no roster lists (any more)
        link = self._new_link(peer, offerer=True)
        link.sealing = self.auth.can_authenticate(peer)
        pc = link.pc
        if self.media:
            link.add_track(AudioStreamTrack())
            link.add_track(VideoStreamTrack())
        else:
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        await self._send_description(link, "offer")

    async def _send_description(self, link: PeerLink, kind: str) -> None:
        """Our description, sealed end to end when this connection seals, else in clear with a MAC.

        Not for a connection closed or replaced while its description was made (a second request
        for an offer, or an offer, came meanwhile): the peer would answer a connection that is gone."""
        assert self.auth is not None
        if self.links.get(link.peer) is not link:
            await link.close()
            return
        sdp = link.pc.localDescription.sdp
        check_uses_certificate(link.pc, self.certificate)
        cls = Offer if kind == "offer" else Answer
        if link.sealing:
            counter, sealed = self.auth.seal(link.peer, kind, {"sdp": sdp})
            await self._send(cls(to=link.peer, counter=counter, sealed=sealed))
        else:
            counter, mac = self.auth.sign(link.peer, kind, sdp)
            await self._send(cls(to=link.peer, sdp=sdp, counter=counter, mac=mac))

    def _dropped(self, peer: str, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1
        log.info("event=signal_dropped peer=%s why=%s", peer, why)

    async def _intercepted(self, peer: str, reason: str, *, close: bool = True) -> None:
        """The interception warning: recorded, reported, and (for signaling) that connection closed.

        A roster that fails keeps the connection with the therapist (``close=False``): the
        client goes on acting on the roster it had (7.8)."""
        self.interceptions.append(Interception(peer, reason))
        log.warning("event=interception_warning peer=%s reason=%s", peer, reason)
        with contextlib.suppress(ConnectionError, ValueError, msgspec.ValidationError):
            await self._send(Report(event="interception_warning", peer=peer, reason=reason))  # type: ignore[arg-type]
        link = self.links.get(peer)
        if link is not None and close:
            await self._close_link(link)

    def _waits_for_roster(self, peer: str) -> bool:
        """Client side: signaling from ``peer`` cannot be checked until a roster lists it."""
        if self.is_therapist or self._roles.get(peer) == "therapist":
            return False
        return self.auth is None or not self.auth.can_authenticate(peer)

    def _keep_early(self, peer: str, message: Offer | Answer | Candidate) -> None:
        now = asyncio.get_running_loop().time()
        kept = [(t, m) for t, m in self._early.get(peer, []) if now - t < EARLY_SIGNAL_S]
        if isinstance(message, Offer):
            kept = []  # a new offer replaces what came before it
        kept.append((now, message))
        self._early[peer] = kept[-64:]
        self._dropped(peer, "waiting_for_roster")

    async def _replay_early(self) -> None:
        """Handle kept signaling from clients a roster now lists; forget what waited too long."""
        now = asyncio.get_running_loop().time()
        for peer in list(self._early):
            kept = [m for t, m in self._early[peer] if now - t < EARLY_SIGNAL_S]
            if any(isinstance(m, Offer) for t, m in self._early[peer] if now - t >= EARLY_SIGNAL_S):
                self._ask_offer.add(peer)
            self._early[peer] = [(t, m) for t, m in self._early[peer] if now - t < EARLY_SIGNAL_S]
            if not kept:
                del self._early[peer]
                continue
            if self._waits_for_roster(peer):
                continue
            del self._early[peer]
            self._ask_offer.discard(peer)
            for message in kept:
                if isinstance(message, Candidate):
                    await self._on_candidate(message)
                else:
                    await self._on_description(message)

    async def _on_description(self, message: Offer | Answer) -> None:
        assert self.auth is not None
        peer = message.from_ or ""
        kind = "offer" if isinstance(message, Offer) else "answer"
        sealed = message.sealed is not None
        if self._waits_for_roster(peer):
            self._keep_early(peer, message)
            return
        try:
            if message.sealed is not None:
                if not self.auth.can_authenticate(peer):
                    self._dropped(peer, "sealed_without_link_key")
                    return
                sdp = str(self.auth.unseal(peer, kind, message.counter, message.sealed)["sdp"])
                trust = Trust.VERIFIED_BY_LINK
            else:
                sdp = message.sdp or ""
                trust = self.auth.verify(
                    peer, kind, message.counter, sdp, message.mac, allow_unverified=self.allow_unverified
                )
        except InterceptionError as exc:
            await self._intercepted(peer, exc.reason)
            return
        link: PeerLink | None
        if isinstance(message, Offer):
            old = self.links.get(peer)
            if old is not None:
                await self._close_link(old)
            link = self._new_link(peer, offerer=False)
            link.trust = trust
            link.remote_sealed = link.sealing = sealed  # answer the way the offer came
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if self.media:
                link.add_track(AudioStreamTrack())
                link.add_track(VideoStreamTrack())
            await link.pc.setLocalDescription(await link.pc.createAnswer())
            await self._send_description(link, "answer")
        else:
            link = self.links.get(peer)
            if link is None or not link.offerer or link.pc.signalingState != "have-local-offer":
                return
            link.trust = trust
            link.remote_sealed = sealed
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        for held in self._pending_candidates.pop(peer, []):
            await self._add_candidate(peer, held)
        if (
            self.is_therapist
            and trust == Trust.VERIFIED_BY_LINK
            and self._fingerprints.get(peer) != (fingerprint := fingerprint_of(sdp))
        ):
            self._fingerprints[peer] = fingerprint  # learnt or changed: the other clients hear of it
            await self._send_rosters()

    async def _on_candidate(self, message: Candidate) -> None:
        peer = message.from_ or ""
        if message.sealed is not None and self._waits_for_roster(peer):
            self._keep_early(peer, message)
            return
        if message.sealed is None:
            held = HeldCandidate(message.candidate or "", message.sdp_mid, message.sdp_mline_index, sealed=False)
            await self._add_candidate(peer, held)
            return
        if self.auth is None or not self.auth.can_authenticate(peer):
            self._dropped(peer, "sealed_without_link_key")
            return
        try:
            fields = self.auth.unseal(peer, "candidate", message.counter, message.sealed)
        except InterceptionError as exc:
            if exc.reason == "bad_mac":  # altered or made up: only someone in the middle does that
                await self._intercepted(peer, exc.reason)
            else:  # a replayed or malformed candidate can do no harm: drop it
                self._dropped(peer, f"candidate_{exc.reason}")
            return
        line, mid, index = fields["candidate"], fields["sdp_mid"], fields["sdp_mline_index"]
        assert isinstance(line, str) and (mid is None or isinstance(mid, str))
        assert index is None or isinstance(index, int)
        await self._add_candidate(peer, HeldCandidate(line, mid, index, sealed=True))

    async def _add_candidate(self, peer: str, held: HeldCandidate) -> None:
        link = self.links.get(peer)
        if link is None or link.pc.remoteDescription is None:
            self._pending_candidates.setdefault(peer, []).append(held)
            return
        if link.remote_sealed and not held.sealed:
            # The peer seals: a clear candidate can only come from the broker.
            self._dropped(peer, "clear_candidate")
            return
        await link.add_candidate(held)

    def _ice_servers(self) -> list[dict[str, Any]]:
        if self.ice_override is not None:
            return self.ice_override
        return list(self.joined.ice_servers) if self.joined else []

    def _new_link(self, peer: str, *, offerer: bool) -> PeerLink:
        link = open_link(
            peer,
            offerer=offerer,
            certificate=self.certificate,
            ice_servers=self._ice_servers(),
            ice_transport_policy=self.joined.ice_transport_policy if self.joined else "all",
            spawn=self._spawn,
            notify=self._notify,
        )
        self.links[peer] = link
        link.paused = self.self_held or self.is_held(peer)
        link.on_roster = lambda counter, sealed: self._spawn(self._on_roster(peer, counter, sealed, relayed=False))
        if self.trace is not None:
            self.trace.watch(link)
        return link

    # ------------------------------------------------------------ the therapist's roster (7.8)

    def _roster_deadline(self) -> None:
        self._rosters_due = True
        self._spawn(self._send_rosters())

    def _admitted_clients(self) -> list[str]:
        return sorted(p for p, role in self._roles.items() if role == "client")

    def _roster_for(self, client: str) -> tuple[RosterEntry, ...]:
        assert self.auth is not None
        return tuple(
            RosterEntry(other, self._fingerprints[other], self.auth.client_pair_key(client, other), self.is_held(other))
            for other in self._admitted_clients()
            if other != client and other in self._fingerprints
        )

    async def _send_rosters(self) -> None:
        """Therapist's side: a new roster to every admitted, unheld client whose roster would change.

        Not before it holds an authenticated SDP from every connected admitted client, or
        ``ROSTER_DEADLINE_S`` after its first ``peers``; never without the session secret."""
        auth = self.auth
        if not self.is_therapist or auth is None or not auth.has_link_key:
            return
        clients = self._admitted_clients()
        if not self._rosters_due:
            if any(self._peer_connected.get(c) and c not in self._fingerprints for c in clients):
                return
            self._rosters_due = True
        for client in clients:
            if self.is_held(client):
                continue
            entries = self._roster_for(client)
            if self._roster_said.get(client) == entries:
                continue
            self._roster_said[client] = entries
            counter, sealed, _version = auth.seal_roster(client, list(entries))
            self.rosters_sent += 1
            log.info("event=roster_sent peer=%s", client)
            with contextlib.suppress(ConnectionError):
                await self._send(Roster(to=client, counter=counter, sealed=sealed))
            self._send_roster_copy(client, counter, sealed)

    def _send_roster_copy(self, client: str, counter: int, sealed: str) -> None:
        """The same roster over the pair's chat channel, which the broker cannot drop or delay (7.8)."""
        link = self.links.get(client)
        if link is not None and link.channel is not None and link.channel.readyState == "open":
            link.channel.send(json.dumps({"t": "roster", "counter": counter, "sealed": sealed}))

    async def _on_roster(self, sender: str, counter: int | None, sealed: str, *, relayed: bool) -> None:
        """Client side: a roster relayed or over the chat channel; acted on only if it is newer."""
        if self.auth is None or self.is_therapist or self._roles.get(sender) != "therapist":
            self._dropped(sender, "roster_not_from_therapist")
            return
        try:
            roster = self.auth.accept_roster(sender, counter, sealed, relayed=relayed)
        except InterceptionError as exc:
            await self._intercepted(sender, exc.reason, close=False)
            return
        except ValueError:
            self._dropped(sender, "roster_without_link_key")
            return
        if roster is None:
            return
        self.rosters_acted += 1
        log.info("event=roster_acted_on")
        self._held_by_roster = {e.peer for e in roster.entries if e.held}
        for peer, link in list(self.links.items()):
            if self._roles.get(peer) == "therapist":
                continue
            entry = roster.entry(peer)
            remote = link.remote_fingerprint
            if entry is None or (remote is not None and remote != entry.fingerprint):
                await self._close_link(link)  # no longer vouched for, or not the page the therapist saw
                if not self._offers_to.get(peer):
                    self._ask_offer.add(peer)
        for entry in roster.entries:
            current = self.links.get(entry.peer)
            healthy = (
                current is not None and not current.closed and current.pc.connectionState not in ("failed", "closed")
            )
            if self._offers_to.get(entry.peer) and self._peer_connected.get(entry.peer) and not healthy:
                self._spawn(self._start_offer(entry.peer))
        self._apply_holds()
        await self._replay_early()
        for peer in sorted(self._ask_offer):
            if not self._waits_for_roster(peer) and peer not in self.links:
                # Its offer was dropped unanswered: ask for a fresh one, so the pair connects now.
                self._ask_offer.discard(peer)
                with contextlib.suppress(ConnectionError):
                    await self._send(Renegotiate(to=peer))
        await self._notify()

    # ------------------------------------------------------------ private time (7.9)

    def is_held(self, peer: str) -> bool:
        """Whether ``peer`` is on hold by any account we have (``peers``, the roster)."""
        return peer in self._held_by_peers or peer in self._held_by_roster

    def _apply_holds(self) -> None:
        """No media to or from a held peer, and none at all while we are held; back on release."""
        for peer, link in self.links.items():
            link.set_paused(self.self_held or self.is_held(peer))

    async def _close_link(self, link: PeerLink) -> None:
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        await link.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
