"""The Python client's negotiation with each other peer: offers, answers and candidates.

What it sends a peer it seals end to end with the link key (or signs with a MAC in clear,
for a peer of before sealed signaling), what it receives it opens or checks (broker/crypto/;
docs/protocol.md 7.7), and it drives the aiortc connection of each pair (``peers``). Anything
that fails authentication is an interception warning, reported and the connection closed.

``BrokerClient`` is this plus its connection to the broker; kept apart so that each can be
read alone. The subclass provides ``_send`` and ``_notify`` (and sets ``joined``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from aiortc import RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from broker.client.peers import HeldCandidate, PeerLink, open_link
from broker.client.trace import SetupTrace
from broker.crypto.sdp_auth import InterceptionError, Trust
from broker.crypto.sdp_authenticator import SdpAuthenticator
from broker.signaling.protocol import Answer, Candidate, Joined, Offer, Peers, Report

log = logging.getLogger("broker.client")


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

    async def _send(self, message: msgspec.Struct) -> None:
        """Send a message to the broker (the subclass's connection)."""
        raise NotImplementedError

    async def _notify(self) -> None:
        """Wake whoever waits for a change (the subclass's)."""
        raise NotImplementedError

    async def _on_peers(self, message: Peers) -> None:
        wanted = {p.peer: p for p in message.peers}
        self._offers_to = {p.peer: p.you_offer for p in message.peers}
        for peer, link in list(self.links.items()):
            if peer not in wanted:
                await self._close_link(link)
            elif peer in self._devices and self._devices[peer] != wanted[peer].device:
                await self._close_link(link)  # the seat moved to another device: never keep the old one
        self._devices = {p.peer: p.device for p in message.peers}
        for info in message.peers:
            current = self.links.get(info.peer)
            healthy = (
                current is not None and not current.closed and current.pc.connectionState not in ("failed", "closed")
            )
            if info.you_offer and info.connected and not healthy:
                if current is not None:
                    await self._close_link(current)
                self._spawn(self._start_offer(info.peer))

    async def _on_renegotiate(self, peer: str) -> None:
        """The peer asks for a fresh offer: only the offerer of the pair makes one."""
        if self._offers_to.get(peer):
            link = self.links.get(peer)
            if link is not None:
                await self._close_link(link)
            self._spawn(self._start_offer(peer))

    async def _start_offer(self, peer: str) -> None:
        assert self.auth is not None
        link = self._new_link(peer, offerer=True)
        link.sealing = self.auth.has_link_key
        pc = link.pc
        if self.media:
            pc.addTrack(AudioStreamTrack())
            pc.addTrack(VideoStreamTrack())
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

    async def _intercepted(self, peer: str, reason: str) -> None:
        self.interceptions.append(Interception(peer, reason))
        log.warning("event=interception_warning peer=%s reason=%s", peer, reason)
        with contextlib.suppress(ConnectionError, ValueError, msgspec.ValidationError):
            await self._send(Report(event="interception_warning", peer=peer, reason=reason))  # type: ignore[arg-type]
        link = self.links.get(peer)
        if link is not None:
            await self._close_link(link)

    async def _on_description(self, message: Offer | Answer) -> None:
        assert self.auth is not None
        peer = message.from_ or ""
        kind = "offer" if isinstance(message, Offer) else "answer"
        sealed = message.sealed is not None
        try:
            if message.sealed is not None:
                if not self.auth.has_link_key:
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
                link.pc.addTrack(AudioStreamTrack())
                link.pc.addTrack(VideoStreamTrack())
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

    async def _on_candidate(self, message: Candidate) -> None:
        peer = message.from_ or ""
        if message.sealed is None:
            held = HeldCandidate(message.candidate or "", message.sdp_mid, message.sdp_mline_index, sealed=False)
            await self._add_candidate(peer, held)
            return
        if self.auth is None or not self.auth.has_link_key:
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
            ice_servers=self._ice_servers(),
            ice_transport_policy=self.joined.ice_transport_policy if self.joined else "all",
            spawn=self._spawn,
            notify=self._notify,
        )
        self.links[peer] = link
        if self.trace is not None:
            self.trace.watch(link)
        return link

    async def _close_link(self, link: PeerLink) -> None:
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        await link.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
