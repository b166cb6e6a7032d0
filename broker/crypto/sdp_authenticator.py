"""One peer's end-to-end state in one session: counters, MACs, seals and rosters (DESIGN.md section 4).

``SdpAuthenticator`` puts the primitives of sdp_auth.py, sealed_signaling.py, seat_keys.py and
roster.py together for a peer: it signs or seals what the peer sends, checks or opens what it
receives, and refuses anything replayed, altered or addressed from the peer itself.

Each pair is authenticated under its own **pair link key** (docs/protocol.md 7.1): the
therapist's side derives each client's from the session secret its link carries; a client
uses its own link's key with the therapist, and with another client the client-pair key the
therapist's roster gave it (7.8), accepting that client's descriptions only with the DTLS
fingerprint the roster vouches for. A peer not yet described by ``set_peer`` is authenticated
under this side's own link key (how one pair of peers worked before seat keys).

Its twin in the browser is ``SdpAuthenticator`` in ``web/js/e2ee.js`` (same method names in
camelCase). It never logs or stores a key, an SDP or plaintext outside this object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.crypto.link_key import b64url_encode, check_counter, decode_link_key, derive_auth_key, pair_key
from broker.crypto.roster import RosterEntry, parse_roster_plaintext, roster_plaintext
from broker.crypto.safety_plan import SafetyPlan, open_safety_plan
from broker.crypto.sdp_auth import SDP_TYPES, InterceptionError, Trust, canonical, fingerprint_of, sign_sdp, verify_sdp
from broker.crypto.sealed_for_therapist import open_checklist, open_details
from broker.crypto.sealed_signaling import (
    MAX_SEALED_PLAINTEXT,
    MAX_SEALS_PER_KEY,
    SIGNAL_TYPES,
    derive_seal_key,
    open_signal,
    parse_signal_plaintext,
    seal_signal,
    signal_plaintext,
)
from broker.crypto.seat_keys import client_pair_key, pair_link_key
from broker.crypto.waiting_note import NoteError, open_note, seal_note

__all__ = ["OpenedRoster", "SdpAuthenticator"]

_ROSTER_TYPES = frozenset({"roster"})


def _now_micros() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class OpenedRoster:
    """A roster from the therapist that this side acted on (its version was above the last)."""

    version: int
    entries: tuple[RosterEntry, ...]

    def entry(self, peer: str) -> RosterEntry | None:
        return next((e for e in self.entries if e.peer == peer), None)


class SdpAuthenticator:
    """Signs or seals outgoing and checks or opens incoming signaling for one peer in one session.

    ``link_key`` is what this side's link carries: the session secret for the therapist
    (``therapist=True``), the seat key (or the group key) for a client. With ``link_key=None``
    (a therapist on another device) it still enforces counters, but every peer is reported
    as ``Trust.UNVERIFIED`` and the people must compare the safety code; such a peer can
    neither seal nor open, and vouches for nobody. ``seat_keys=False``: a session scheduled
    before seat keys, whose links all carry one key (``joined.seat_keys``).
    One counter per direction covers everything sent that way: clear offers and answers,
    sealed offers, answers and candidates, and rosters.
    """

    def __init__(
        self,
        link_key: bytes | None,
        session_id: str,
        my_peer_id: str,
        *,
        therapist: bool = False,
        seat_keys: bool = True,
        clock: Callable[[], int] = _now_micros,
        seal_limit: int = MAX_SEALS_PER_KEY,
    ) -> None:
        if not 0 < seal_limit <= MAX_SEALS_PER_KEY:
            raise ValueError(f"seal_limit must be in 1..{MAX_SEALS_PER_KEY}")
        if link_key is not None:
            derive_auth_key(link_key, session_id)  # checks the key's length
        self.session_id = session_id
        self.my_peer_id = my_peer_id
        self.therapist = therapist
        self.seat_keys = seat_keys
        self._link_key = link_key
        self._clock = clock
        self._seal_limit = seal_limit
        self._last_sent: dict[str, int] = {}
        self._last_accepted: dict[str, int] = {}
        self._seals: dict[str, int] = {}
        #: The pair link key of each peer described by set_peer / a roster (None: none held).
        self._pair_keys: dict[str, bytes | None] = {}
        self._roles: dict[str, str] = {}
        self._k_auth: dict[bytes, bytes] = {}
        self._seal_keys: dict[tuple[bytes, str, str], bytes] = {}
        #: Client side: the fingerprint the therapist's latest roster vouches for, per other client.
        self._vouched: dict[str, str] = {}
        self._roster: OpenedRoster | None = None
        self._roster_version = 0

    # ------------------------------------------------------------ keys

    @property
    def has_link_key(self) -> bool:
        """Whether this side's link carried a key at all."""
        return self._link_key is not None

    def set_peer(self, peer: str, *, role: str, group: bool = False) -> None:
        """Say who ``peer`` is (``peers``, ``waiting_room``), which fixes its pair link key.

        Therapist's side: a client's seat key, or the group key for a seat taken through the
        group link (``group``). Client: the therapist's pair is under its own link key; another
        client's key comes only from a roster (until then it has none).
        """
        if peer == self.my_peer_id:
            raise ValueError("cannot describe ourselves as a peer")
        key: bytes | None
        if self._link_key is None:
            key = None
        elif self.therapist:
            key = pair_link_key(self._link_key, self.session_id, peer, seat_keys=self.seat_keys, group_seat=group)
        elif role == "therapist":
            key = self._link_key
        else:
            entry = self._roster.entry(peer) if self._roster is not None else None
            key = decode_link_key(entry.key) if entry is not None else None
        self._pair_keys[peer] = key
        self._roles[peer] = role

    def pair_link_key(self, peer: str) -> bytes | None:
        """The key the pair with ``peer`` is authenticated under, or None (this side holds none)."""
        if peer in self._pair_keys:
            return self._pair_keys[peer]
        return self._link_key

    def can_authenticate(self, peer: str) -> bool:
        """Whether this side holds a key for its pair with ``peer`` (so it seals and checks MACs)."""
        return self.pair_link_key(peer) is not None

    def vouched_fingerprint(self, peer: str) -> str | None:
        """Client side: the fingerprint the therapist's latest roster gives for another client."""
        return self._vouched.get(peer)

    def client_pair_key(self, a: str, b: str) -> str:
        """Therapist's side: K_clients(a, b) as a roster carries it (43 base64url characters)."""
        if not self.therapist or self._link_key is None:
            raise ValueError("only the therapist's side with the session secret derives client-pair keys")
        return b64url_encode(client_pair_key(self._link_key, self.session_id, a, b))

    def _auth_key(self, link_key: bytes) -> bytes:
        k_auth = self._k_auth.get(link_key)
        if k_auth is None:
            k_auth = self._k_auth[link_key] = derive_auth_key(link_key, self.session_id)
        return k_auth

    def _seal_key(self, link_key: bytes, sender: str, recipient: str) -> bytes:
        cached = self._seal_keys.get((link_key, sender, recipient))
        if cached is None:
            k_pair = pair_key(self._auth_key(link_key), sender, recipient)
            cached = self._seal_keys[(link_key, sender, recipient)] = derive_seal_key(k_pair, sender, recipient)
        return cached

    # ------------------------------------------------------------ sending

    def next_counter(self, recipient: str) -> int:
        """max(last + 1, now in µs): strictly increasing, even across a page reload."""
        counter = max(self._last_sent.get(recipient, 0) + 1, int(self._clock()))
        check_counter(counter)
        self._last_sent[recipient] = counter
        return counter

    def sign(self, recipient: str, sdp_type: str, sdp: str) -> tuple[int, str | None]:
        """(counter, mac) to send with an offer/answer; mac is None without a key for that pair."""
        if recipient == self.my_peer_id:
            raise ValueError("cannot send an offer/answer to ourselves")
        canonical(self.session_id, self.my_peer_id, recipient, sdp_type, 0, sdp)  # validate
        counter = self.next_counter(recipient)
        key = self.pair_link_key(recipient)
        if key is None:
            return counter, None
        mac = sign_sdp(self._auth_key(key), self.session_id, self.my_peer_id, recipient, sdp_type, counter, sdp)
        return counter, mac

    def _seal_text(self, recipient: str, kind: str, plaintext: str) -> tuple[int, str]:
        key = self.pair_link_key(recipient)
        if key is None:
            raise ValueError("cannot seal without the link key of this pair")
        if recipient == self.my_peer_id:
            raise ValueError("cannot send a message to ourselves")
        if len(plaintext.encode("utf-8")) > MAX_SEALED_PLAINTEXT:
            raise ValueError(f"plaintext over {MAX_SEALED_PLAINTEXT} bytes cannot be sealed")
        seals = self._seals.get(recipient, 0)
        if seals >= self._seal_limit:
            raise ValueError("refusing to seal: this direction key has sealed its limit of messages")
        direction_key = self._seal_key(key, self.my_peer_id, recipient)
        counter = self.next_counter(recipient)
        self._seals[recipient] = seals + 1
        sealed = seal_signal(direction_key, self.session_id, self.my_peer_id, recipient, kind, counter, plaintext)
        return counter, sealed

    def seal(self, recipient: str, kind: str, fields: dict[str, object]) -> tuple[int, str]:
        """(counter, sealed) for an offer, answer or candidate to ``recipient``.

        ValueError without a key for that pair, for bad fields, or once this sealer has used
        the direction key ``seal_limit`` times (a fresh page or client starts again).
        """
        return self._seal_text(recipient, kind, signal_plaintext(kind, fields))

    def seal_roster(self, recipient: str, entries: list[RosterEntry]) -> tuple[int, str, int]:
        """Therapist's side: (counter, sealed, version) of a roster for client ``recipient`` (7.8).

        The counter is the one this side uses for everything it sends that client; the
        version is max(last + 1, now in µs), strictly increasing over the session.
        """
        if not self.therapist:
            raise ValueError("only the therapist's side sends rosters")
        version = max(self._roster_version + 1, int(self._clock()))
        plaintext = roster_plaintext(version, entries)
        counter, sealed = self._seal_text(recipient, "roster", plaintext)
        self._roster_version = version
        return counter, sealed, version

    # ------------------------------------------------------------ receiving

    def _check_vouched(self, sender: str, sdp: str) -> None:
        fingerprint = fingerprint_of(sdp)
        vouched = self._vouched.get(sender)
        if not self.therapist and sender in self._vouched and vouched != fingerprint:
            raise InterceptionError("fingerprint_mismatch", "not the fingerprint the therapist vouched for")

    def unseal(self, sender: str, kind: str, counter: int | None, sealed: str) -> dict[str, object]:
        """Open a sealed offer, answer or candidate and return its fields, or raise InterceptionError.

        bad_mac: it does not open (altered, replayed under another header, or not for us);
        replayed_counter: not above the last counter accepted from ``sender``;
        malformed: bad header or plaintext; missing_fingerprint / fingerprint_mismatch:
        as for a clear description, or another client's fingerprint is not the one the
        therapist's roster vouches for. State changes only on success.
        """
        counter = self._check_header(sender, kind, SIGNAL_TYPES, counter)
        key = self.pair_link_key(sender)
        if key is None:
            raise ValueError("cannot open a sealed message without the link key of this pair")
        text = open_signal(
            self._seal_key(key, sender, self.my_peer_id),
            self.session_id,
            sender,
            self.my_peer_id,
            kind,
            counter,
            sealed,
        )
        fields = parse_signal_plaintext(kind, text)
        last = self._last_accepted.get(sender)
        if last is not None and counter <= last:
            raise InterceptionError("replayed_counter")
        if kind in SDP_TYPES:
            self._check_vouched(sender, str(fields["sdp"]))
        self._last_accepted[sender] = counter
        return fields

    def verify(
        self,
        sender: str,
        sdp_type: str,
        counter: int | None,
        sdp: str,
        mac: str | None,
        *,
        allow_unverified: bool = False,
    ) -> Trust:
        """Accept a clear offer/answer or raise InterceptionError; state changes only on success.

        ``allow_unverified=True`` lets a peer holding the pair's key accept a message
        without MAC (the other side has no link key) -- only after the UI has warned
        and asked for the safety code.  A MAC that is present is always checked.
        Wire values go in as received: a missing counter is reported as "malformed".
        """
        if not isinstance(sdp, str):
            raise InterceptionError("malformed", "sender and sdp must be text")
        counter = self._check_header(sender, sdp_type, SDP_TYPES, counter)
        trust = Trust.UNVERIFIED
        key = self.pair_link_key(sender)
        if key is not None and (mac or not allow_unverified):
            verify_sdp(self._auth_key(key), self.session_id, sender, self.my_peer_id, sdp_type, counter, sdp, mac)
            trust = Trust.VERIFIED_BY_LINK
        last = self._last_accepted.get(sender)
        if last is not None and counter <= last:
            raise InterceptionError("replayed_counter")
        self._check_vouched(sender, sdp)
        self._last_accepted[sender] = counter
        return trust

    def accept_roster(self, sender: str, counter: int | None, sealed: str, *, relayed: bool) -> OpenedRoster | None:
        """Client side: open a roster from the therapist (``sender``) and act on it if it is newer.

        ``relayed``: it came as the broker's ``roster`` message, so its counter is checked
        like any other (``replayed_counter``); a copy over the chat channel is opened the
        same way without touching the counter state. bad_mac / malformed raise
        InterceptionError. Returns the roster acted on, or None for one not above the last
        version (a second copy): then nothing changes. On success the client-pair keys and
        vouched fingerprints of the roster replace the previous ones.
        """
        counter = self._check_header(sender, "roster", _ROSTER_TYPES, counter)
        if self.therapist:
            raise InterceptionError("malformed", "the therapist's side receives no roster")
        if self._link_key is None:
            raise ValueError("cannot open a roster without the link key")
        direction_key = self._seal_key(self._link_key, sender, self.my_peer_id)
        text = open_signal(direction_key, self.session_id, sender, self.my_peer_id, "roster", counter, sealed)
        version, entries = parse_roster_plaintext(text)
        if any(e.peer == self.my_peer_id for e in entries):
            raise InterceptionError("malformed", "a roster never names its recipient")
        if relayed:
            last = self._last_accepted.get(sender)
            if last is not None and counter <= last:
                raise InterceptionError("replayed_counter")
            self._last_accepted[sender] = counter
        if version <= self._roster_version:
            return None
        self._roster_version = version
        roster = OpenedRoster(version, tuple(entries))
        self._roster = roster
        self._vouched = {e.peer: e.fingerprint for e in entries}
        for peer, role in self._roles.items():
            if role != "therapist":
                self._pair_keys[peer] = None  # another client: only while a roster lists it
        for entry in entries:
            self._pair_keys[entry.peer] = decode_link_key(entry.key)
        return roster

    @property
    def roster(self) -> OpenedRoster | None:
        """Client side: the latest roster acted on."""
        return self._roster

    def open_details(self, client: str, sealed: str) -> str:
        """Therapist's side: a client's sealed emergency details, under that client's pair link key."""
        return open_details(self._therapist_key(client), self.session_id, client, sealed)

    def open_checklist(self, client: str, sealed: str) -> dict[str, bool]:
        """Therapist's side: a client's sealed checklist answers, under that client's pair link key."""
        return open_checklist(self._therapist_key(client), self.session_id, client, sealed)

    def seal_note(self, client: str, text: str) -> str:
        """Therapist's side: a word to a waiting client, under that client's pair link key (7.4.2)."""
        return seal_note(self._therapist_key(client), self.session_id, client, text)

    def open_note(self, sealed: str) -> str:
        """Client side: the therapist's note to this seat; NoteError if it does not open."""
        if self._link_key is None:
            raise NoteError("this side holds no link key")
        return open_note(self._link_key, self.session_id, self.my_peer_id, sealed)

    def open_safety_plan(self, client: str, sealed: str) -> SafetyPlan:
        """Therapist's side: a client's sealed safety plan (7.4.3), under that client's pair link key."""
        return open_safety_plan(self._therapist_key(client), self.session_id, client, sealed)

    def _therapist_key(self, client: str) -> bytes:
        key = self._pair_keys.get(client) if client in self._pair_keys else None
        if key is None and self.therapist and self._link_key is not None:
            key = pair_link_key(self._link_key, self.session_id, client, seat_keys=self.seat_keys)
        if key is None:
            raise ValueError("no key for this client's seat")
        return key

    def _check_header(self, sender: str, kind: str, kinds: frozenset[str], counter: int | None) -> int:
        if not isinstance(sender, str):
            raise InterceptionError("malformed", "sender and sdp must be text")
        if sender == self.my_peer_id:
            raise InterceptionError("malformed", "message claims to come from ourselves")
        if kind not in kinds:
            raise InterceptionError("malformed", f"type must be one of {', '.join(sorted(kinds))}")
        if counter is None:
            raise InterceptionError("malformed", "counter missing")
        try:
            return check_counter(counter)
        except ValueError:
            raise InterceptionError("malformed", "counter out of range") from None
