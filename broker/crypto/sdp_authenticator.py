"""One peer's end-to-end state in one session: counters, MACs and seals (DESIGN.md section 4).

``SdpAuthenticator`` puts the primitives of sdp_auth.py and sealed_signaling.py together for a
peer: it signs or seals what the peer sends, checks or opens what it receives, and refuses
anything replayed, altered or addressed from the peer itself. Its twin in the browser is
``SdpAuthenticator`` in ``web/js/e2ee.js``. It never logs or stores a key, an SDP or plaintext.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.crypto.link_key import check_counter, derive_auth_key, pair_key
from broker.crypto.sdp_auth import SDP_TYPES, InterceptionError, Trust, canonical, fingerprint_of, sign_sdp, verify_sdp
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

__all__ = ["SdpAuthenticator"]


def _now_micros() -> int:
    return time.time_ns() // 1000


class SdpAuthenticator:
    """Signs or seals outgoing and checks or opens incoming signaling for one peer in one session.

    With ``link_key=None`` (a therapist on another device) it still enforces
    counters, but every peer is reported as ``Trust.UNVERIFIED`` and the people
    must compare the safety code; such a peer can neither seal nor open.
    One counter per direction covers everything sent that way: clear offers and
    answers, and sealed offers, answers and candidates.
    """

    def __init__(
        self,
        link_key: bytes | None,
        session_id: str,
        my_peer_id: str,
        *,
        clock: Callable[[], int] = _now_micros,
        seal_limit: int = MAX_SEALS_PER_KEY,
    ) -> None:
        if not 0 < seal_limit <= MAX_SEALS_PER_KEY:
            raise ValueError(f"seal_limit must be in 1..{MAX_SEALS_PER_KEY}")
        self.session_id = session_id
        self.my_peer_id = my_peer_id
        self._k_auth = None if link_key is None else derive_auth_key(link_key, session_id)
        self._clock = clock
        self._seal_limit = seal_limit
        self._last_sent: dict[str, int] = {}
        self._last_accepted: dict[str, int] = {}
        self._seals: dict[str, int] = {}
        self._seal_keys: dict[tuple[str, str], bytes] = {}

    @property
    def has_link_key(self) -> bool:
        """Whether this side can sign, seal, check and open at all."""
        return self._k_auth is not None

    def next_counter(self, recipient: str) -> int:
        """max(last + 1, now in µs): strictly increasing, even across a page reload."""
        counter = max(self._last_sent.get(recipient, 0) + 1, int(self._clock()))
        check_counter(counter)
        self._last_sent[recipient] = counter
        return counter

    def sign(self, recipient: str, sdp_type: str, sdp: str) -> tuple[int, str | None]:
        """(counter, mac) to send with an offer/answer; mac is None without the link key."""
        if recipient == self.my_peer_id:
            raise ValueError("cannot send an offer/answer to ourselves")
        canonical(self.session_id, self.my_peer_id, recipient, sdp_type, 0, sdp)  # validate
        counter = self.next_counter(recipient)
        if self._k_auth is None:
            return counter, None
        mac = sign_sdp(self._k_auth, self.session_id, self.my_peer_id, recipient, sdp_type, counter, sdp)
        return counter, mac

    def _seal_key(self, sender: str, recipient: str) -> bytes:
        assert self._k_auth is not None
        key = self._seal_keys.get((sender, recipient))
        if key is None:
            key = derive_seal_key(pair_key(self._k_auth, sender, recipient), sender, recipient)
            self._seal_keys[(sender, recipient)] = key
        return key

    def seal(self, recipient: str, kind: str, fields: dict[str, object]) -> tuple[int, str]:
        """(counter, sealed) for an offer, answer or candidate to ``recipient``.

        ValueError without the link key, for bad fields, or once this sealer has used
        the direction key ``seal_limit`` times (a fresh page or client starts again).
        """
        if self._k_auth is None:
            raise ValueError("cannot seal without the link key")
        if recipient == self.my_peer_id:
            raise ValueError("cannot send a message to ourselves")
        plaintext = signal_plaintext(kind, fields)
        if len(plaintext.encode("utf-8")) > MAX_SEALED_PLAINTEXT:
            raise ValueError(f"plaintext over {MAX_SEALED_PLAINTEXT} bytes cannot be sealed")
        seals = self._seals.get(recipient, 0)
        if seals >= self._seal_limit:
            raise ValueError("refusing to seal: this direction key has sealed its limit of messages")
        key = self._seal_key(self.my_peer_id, recipient)
        counter = self.next_counter(recipient)
        self._seals[recipient] = seals + 1
        sealed = seal_signal(key, self.session_id, self.my_peer_id, recipient, kind, counter, plaintext)
        return counter, sealed

    def unseal(self, sender: str, kind: str, counter: int | None, sealed: str) -> dict[str, object]:
        """Open a sealed offer, answer or candidate and return its fields, or raise InterceptionError.

        bad_mac: it does not open (altered, replayed under another header, or not for us);
        replayed_counter: not above the last counter accepted from ``sender``;
        malformed: bad header or plaintext; missing_fingerprint / fingerprint_mismatch:
        as for a clear description. State changes only on success.
        """
        counter = self._check_header(sender, kind, SIGNAL_TYPES, counter)
        if self._k_auth is None:
            raise ValueError("cannot open a sealed message without the link key")
        key = self._seal_key(sender, self.my_peer_id)
        text = open_signal(key, self.session_id, sender, self.my_peer_id, kind, counter, sealed)
        fields = parse_signal_plaintext(kind, text)
        last = self._last_accepted.get(sender)
        if last is not None and counter <= last:
            raise InterceptionError("replayed_counter")
        if kind in SDP_TYPES:
            fingerprint_of(str(fields["sdp"]))
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

        ``allow_unverified=True`` lets a peer holding the link key accept a message
        without MAC (the other side has no link key) -- only after the UI has warned
        and asked for the safety code.  A MAC that is present is always checked.
        Wire values go in as received: a missing counter is reported as "malformed".
        """
        if not isinstance(sdp, str):
            raise InterceptionError("malformed", "sender and sdp must be text")
        counter = self._check_header(sender, sdp_type, SDP_TYPES, counter)
        trust = Trust.UNVERIFIED
        if self._k_auth is not None and (mac or not allow_unverified):
            verify_sdp(self._k_auth, self.session_id, sender, self.my_peer_id, sdp_type, counter, sdp, mac)
            trust = Trust.VERIFIED_BY_LINK
        last = self._last_accepted.get(sender)
        if last is not None and counter <= last:
            raise InterceptionError("replayed_counter")
        fingerprint_of(sdp)
        self._last_accepted[sender] = counter
        return trust

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
