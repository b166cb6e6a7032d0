"""The therapist's dashboard: schedule sessions, list them, move or cancel them, revoke or reissue a
client's link, and read the signed records of the sessions that ended in the last 30 days.

The broker hands out invite tokens only. The link key that completes each link is made in the
therapist's browser (``newLinkKey`` in web/js/e2ee.js), kept there in IndexedDB, and never sent
here: links, and their QR codes, are assembled and drawn in the page itself.

Sessions belong to the therapist who scheduled them through an owner index in the store: one
key per therapist listing ``(session id, expiry)`` pairs, whose TTL follows the latest expiry.
Session records themselves are not touched, and an ended session simply drops out of the list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from broker.http.arrivals_route import event_stream, stream_arrivals
from broker.http.json_api import BadRequest, json_error, read_json
from broker.http.login_sessions import AUTH, require_login
from broker.http.pages import html_page
from broker.janus.client import JanusUnavailable
from broker.janus.scheduling import JANUS_UNAVAILABLE_MESSAGE, JanusRequired
from broker.signaling import session as sm
from broker.signaling.hub import Hub
from broker.signaling.protocol import ErrorCode, ProtocolError, Role, SessionState
from broker.signaling.session_state import SessionKind
from broker.store.base import OWNER_PREFIX, Store, StoreUnavailable

log = logging.getLogger("broker.dashboard")

#: Open sessions one therapist may hold at once (a bound on the owner index, and on abuse).
MAX_SESSIONS_PER_THERAPIST = 200
_OWNER_PREFIX = OWNER_PREFIX


class CreateSession(msgspec.Struct, forbid_unknown_fields=True):
    clients: Annotated[int, msgspec.Meta(ge=1, le=sm.MAX_SEATS - 1)] = 1
    minors: Annotated[int, msgspec.Meta(ge=0, le=sm.MAX_SEATS - 1)] = 0
    #: Appointment start, Unix seconds; None = now.
    starts: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)] | None = None
    duration_min: Annotated[int, msgspec.Meta(ge=5, le=12 * 60)] = 50
    relay_only: bool = False
    #: Also one link for every client (docs/protocol.md 4: its people share one key).
    group_link: bool = False
    #: One-to-one, couple, family or group; None: one-to-one for one client, else group.
    kind: SessionKind | None = None


class Reschedule(msgspec.Struct, forbid_unknown_fields=True):
    #: The new appointment start, Unix seconds.
    starts: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    duration_min: Annotated[int, msgspec.Meta(ge=5, le=12 * 60)] = 50


#: How many client seats each kind of session may have (at least, at most).
KIND_SEATS: dict[str, tuple[int, int]] = {
    "individual": (1, 1),
    "couple": (2, 2),
    "family": (2, sm.MAX_SEATS - 1),
    "group": (2, sm.MAX_SEATS - 1),
}


def session_kind(body: CreateSession) -> SessionKind:
    """The kind asked for, checked against the seats; BadRequest when they do not fit."""
    if body.kind is None:
        return "individual" if body.clients == 1 else "group"
    low, high = KIND_SEATS[body.kind]
    if not low <= body.clients <= high:
        seats = f"{low}" if low == high else f"at least {low}"
        raise BadRequest(f"A {body.kind} session has {seats} client seat{'s' if high > 1 else ''}.")
    if body.group_link and body.kind != "group":
        raise BadRequest("A group link is only for group sessions: couples and families get a link per person.")
    return body.kind


class OwnedSession(msgspec.Struct, array_like=True):
    session: str
    expires: int


_index_encoder = msgspec.json.Encoder()
_index_decoder = msgspec.json.Decoder(list[OwnedSession])


class OwnerIndex:
    """Which sessions each therapist scheduled, kept in the store with a TTL."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    @staticmethod
    def key(therapist: str) -> str:
        return _OWNER_PREFIX + therapist

    def _live(self, raw: bytes | None) -> list[OwnedSession]:
        if raw is None:
            return []
        try:
            entries = _index_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return []
        now = self.clock()
        return [e for e in entries if e.expires > now]

    async def add(self, therapist: str, session: str, expires: int) -> None:
        def mutate(raw: bytes | None) -> tuple[bytes | None, None]:
            entries = [e for e in self._live(raw) if e.session != session]
            if len(entries) >= MAX_SESSIONS_PER_THERAPIST:
                raise TooManySessions()
            entries.append(OwnedSession(session, expires))
            return _index_encoder.encode(entries), None

        latest = max(expires, *(e.expires for e in await self.sessions(therapist)), int(self.clock()) + 1)
        await self.store.update(self.key(therapist), mutate, max(1.0, latest - self.clock()))

    async def sessions(self, therapist: str) -> list[OwnedSession]:
        return self._live(await self.store.get(self.key(therapist)))

    async def owns(self, therapist: str, session: str) -> bool:
        return any(e.session == session for e in await self.sessions(therapist))

    async def forget(self, therapist: str, gone: set[str]) -> None:
        """Drop sessions that have ended from the index."""
        if not gone:
            return

        def mutate(raw: bytes | None) -> tuple[bytes | None, None]:
            entries = [e for e in self._live(raw) if e.session not in gone]
            return (_index_encoder.encode(entries) if entries else None), None

        entries = await self.sessions(therapist)
        latest = max((e.expires for e in entries), default=int(self.clock()) + 1)
        await self.store.update(self.key(therapist), mutate, max(1.0, latest - self.clock()))


class TooManySessions(Exception):
    pass


DASHBOARD: web.AppKey[Dashboard] = web.AppKey("dashboard")


class Dashboard:
    def __init__(
        self, hub: Hub, index: OwnerIndex, *, relay_available: bool = False, languages: tuple[str, ...] = ("en",)
    ) -> None:
        self.hub = hub
        self.index = index
        #: TURN is configured: a relay-only session can connect (docs/protocol.md 15.15).
        self.relay_available = relay_available
        #: The practice's languages (BROKER_LANGUAGES): the ones a client link may name (issue 33).
        self.languages = languages

    def seat_view(self, session: sm.Session, seat: sm.Seat) -> dict[str, Any]:
        """What the owner's page needs about a seat; the token is recomputed, never stored."""
        token = self.hub.tokens.issue(sm.claims_for(session, seat)) if seat.token_id is not None else None
        return {
            "peer": seat.id,
            "role": seat.role.value,
            "minor": seat.minor,
            "state": seat.state.value,
            "connected": seat.conn is not None,
            "token": token,
        }

    def session_view(self, session: sm.Session) -> dict[str, Any]:
        return {
            "session": session.id,
            "state": session.state.value,
            "starts": session.starts,
            "not_before": session.not_before,
            "expires": session.expires,
            "relay_only": session.ice_transport_policy == "relay",
            "kind": session.kind,
            "media": session.media,
            "seats": [self.seat_view(session, seat) for seat in session.seats],
        }


def _dashboard(request: web.Request) -> Dashboard:
    board: Dashboard = request.app[DASHBOARD]
    return board


async def dashboard_page(request: web.Request) -> web.StreamResponse:
    session = await request.app[AUTH].session_of(request)
    if session is None or not session.full:
        raise web.HTTPSeeOther("/login")
    return html_page(request, "dashboard.html")


async def api_create(request: web.Request) -> web.Response:
    """Schedule a session: its seats and their invite tokens."""
    login = await require_login(request)
    board = _dashboard(request)
    body: CreateSession = await read_json(request, CreateSession)
    if body.minors > body.clients:
        raise BadRequest("There cannot be more minors than client seats.")
    kind = session_kind(body)
    if body.relay_only and not board.relay_available:
        return json_error(*RELAY_UNAVAILABLE)
    try:
        session, tokens = await board.hub.create_session(
            clients=body.clients,
            minors=body.minors,
            starts=body.starts,
            duration_s=body.duration_min * 60,
            relay_only=body.relay_only,
            group_link=body.group_link,
            owner=login.therapist,
            kind=kind,
        )
    except JanusRequired as exc:
        return json_error(400, "janus_required", str(exc))
    except JanusUnavailable:
        return json_error(503, "janus_unavailable", JANUS_UNAVAILABLE_MESSAGE)
    except ValueError as exc:
        raise BadRequest(_plain(str(exc))) from None
    try:
        await board.index.add(login.therapist, session.id, session.expires)
    except TooManySessions:
        return json_error(429, "too_many_sessions", "You have too many open sessions. End or let some expire first.")
    log.info("event=dashboard_session_created session=%s", session.id)
    return web.json_response(
        {
            "session": session.id,
            "starts": session.starts,
            "not_before": session.not_before,
            "expires": session.expires,
            "relay_only": session.ice_transport_policy == "relay",
            "kind": session.kind,
            "media": session.media,
            "seats": [
                {"peer": s.id, "role": s.role.value, "minor": s.minor, "token": tokens[s.id]} for s in session.seats
            ],
            "group_token": tokens.get("group"),
        }
    )


#: The answer to ``relay_only`` on a broker without TURN: such a session could never connect.
RELAY_UNAVAILABLE = (
    400,
    "relay_unavailable",
    "Relaying through the practice's TURN server is not set up on this broker (BROKER_TURN_URLS), "
    "so a relay-only session could not connect. Schedule it without relaying, or ask your practice admin.",
)


def _plain(message: str) -> str:
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


async def api_list(request: web.Request) -> web.Response:
    """The therapist's sessions that have not ended, by start."""
    login = await require_login(request)
    board = _dashboard(request)
    views = []
    gone: set[str] = set()
    for entry in await board.index.sessions(login.therapist):
        session = await board.hub.get_session(entry.session)
        if session is None or session.state is SessionState.ENDED:
            gone.add(entry.session)
            continue
        views.append(board.session_view(session))
    await board.index.forget(login.therapist, gone)
    views.sort(key=lambda v: (v["starts"], v["session"]))
    media = board.hub.media
    return web.json_response(
        {
            "sessions": views,
            "relay_available": board.relay_available,
            "languages": list(board.languages),
            "mesh_max_participants": media.mesh_max,
            "janus_available": media.rooms is not None,
        }
    )


@event_stream
async def api_arrivals(request: web.Request) -> web.StreamResponse:
    """How many clients wait in each of the therapist's sessions, pushed as it changes."""
    login = await require_login(request)
    board = _dashboard(request)
    owned = [entry.session for entry in await board.index.sessions(login.therapist)]
    return await stream_arrivals(request, board.hub, login.therapist, owned)


async def api_seat_action(request: web.Request) -> web.Response:
    """Revoke a client seat's link, or reissue it (a new token)."""
    login = await require_login(request)
    board = _dashboard(request)
    session_id = request.match_info["session"]
    peer = request.match_info["peer"]
    reissue = request.match_info["action"] == "reissue"
    if not await board.index.owns(login.therapist, session_id):
        return _not_found()
    session = await board.hub.get_session(session_id)
    if session is None:
        return _not_found()
    try:
        seat = session.seat(peer)
    except ProtocolError:
        return _not_found()
    if seat.role is Role.THERAPIST:
        return json_error(400, "not_allowed", "Your own link cannot be revoked; end the session instead.")
    try:
        token = await board.hub.revoke_seat(session_id, peer, reissue=reissue)
    except ProtocolError as exc:
        status = 404 if exc.code in (ErrorCode.SESSION_ENDED, ErrorCode.NOT_IN_SESSION) else 400
        return json_error(status, exc.code.value, exc.message)
    log.info("event=dashboard_seat_%s session=%s peer=%s", "reissued" if reissue else "revoked", session_id, peer)
    return web.json_response({"ok": True, "peer": peer, "token": token})


async def _owned(request: web.Request) -> tuple[Dashboard, str, str] | None:
    """The dashboard, the therapist and the session of the path, if it is one of theirs."""
    login = await require_login(request)
    board = _dashboard(request)
    session_id = request.match_info["session"]
    if not await board.index.owns(login.therapist, session_id):
        return None
    return board, login.therapist, session_id


async def api_reschedule(request: web.Request) -> web.Response:
    """Move a session nobody has joined yet to another time; its links keep working in the new window."""
    owned = await _owned(request)
    body: Reschedule = await read_json(request, Reschedule)
    if owned is None:
        return _not_found()
    board, therapist, session_id = owned
    try:
        session = await board.hub.reschedule_session(session_id, starts=body.starts, duration_s=body.duration_min * 60)
    except ValueError as exc:
        raise BadRequest(_plain(str(exc))) from None
    except ProtocolError as exc:
        if exc.code is ErrorCode.SESSION_ENDED:
            return json_error(404, "session_ended", exc.message)
        return json_error(409, "session_in_use", exc.message)
    await board.index.add(therapist, session.id, session.expires)
    log.info("event=dashboard_session_rescheduled session=%s", session.id)
    return web.json_response({"ok": True, "session": board.session_view(session)})


async def api_cancel(request: web.Request) -> web.Response:
    """Cancel a session: its links stop working at once and say it was cancelled; anyone in it is told."""
    owned = await _owned(request)
    if owned is None:
        return _not_found()
    board, _, session_id = owned
    try:
        await board.hub.cancel_session(session_id)
    except ProtocolError:
        return json_error(404, "session_ended", "This session has already ended.")
    log.info("event=dashboard_session_cancelled session=%s", session_id)
    return web.json_response({"ok": True, "session": session_id})


async def api_history(request: web.Request) -> web.Response:
    """The signed records of this therapist's sessions that ended in the last 30 days, newest first."""
    login = await require_login(request)
    board = _dashboard(request)
    entries = await board.hub.history.records(login.therapist)
    return web.json_response(
        {"records": [{"record": e.record, "signature": e.signature, "key_id": e.key_id} for e in entries]}
    )


def _not_found() -> web.Response:
    # The same answer for "not yours" and "does not exist": nothing to learn about others' sessions.
    return json_error(404, "not_found", "No such session or seat among yours.")


@web.middleware
def _store_errors(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    if not request.path.startswith("/api/"):
        return handler(request)  # without a frame of its own, which a WebSocket would keep all its life
    return _api_store_errors(request, handler)


async def _api_store_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StoreUnavailable:
        return json_error(503, "unavailable", "The service is briefly unavailable. Try again shortly.")


def setup_dashboard(
    app: web.Application,
    *,
    hub: Hub,
    store: Store,
    clock: Callable[[], float] = time.time,
    relay_available: bool = False,
    languages: tuple[str, ...] = ("en",),
) -> None:
    """Add the dashboard page and its JSON API; ``setup_auth`` must have run on ``app`` first.
    ``relay_available``: TURN is configured, so relay-only sessions can be scheduled.
    ``languages``: the practice's languages, offered for each client's link."""
    if AUTH not in app:
        raise RuntimeError("call setup_auth(app, ...) before setup_dashboard(app, ...)")
    index = OwnerIndex(store, clock)
    app[DASHBOARD] = Dashboard(hub, index, relay_available=relay_available, languages=languages)
    hub.add_end_listener(lambda owner, session_id: index.forget(owner, {session_id}))
    app.middlewares.append(_store_errors)
    app.router.add_get("/dashboard", dashboard_page, name="dashboard")
    app.router.add_get("/api/sessions", api_list, name="api_sessions")
    app.router.add_get("/api/arrivals", api_arrivals, name="api_arrivals")
    app.router.add_post("/api/sessions", api_create, name="api_session_create")
    app.router.add_post("/api/sessions/{session}/reschedule", api_reschedule, name="api_session_reschedule")
    app.router.add_post("/api/sessions/{session}/cancel", api_cancel, name="api_session_cancel")
    app.router.add_get("/api/history", api_history, name="api_history")
    app.router.add_post(
        "/api/sessions/{session}/seats/{peer}/{action:revoke|reissue}", api_seat_action, name="api_seat_action"
    )
