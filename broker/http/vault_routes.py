"""The therapist's vault: labels, notes and session secrets that only the therapist's devices can read.

The browser makes a random vault key and seals every label, note and session secret with it
(web/js/vault.js); the broker keeps two kinds of opaque bytes and nothing it could open:

* the **wrapped vault key** of the account (``GET``/``POST /api/vault``), the vault key encrypted
  by the browser under a key it derived from the password with PBKDF2 (a salt and a cost the
  browser chose, stored alongside); kept in the account store, and
* the **sealed items** of each of the therapist's sessions (``POST /api/vault/items``): one
  ciphertext per slot (``session``, ``secret``, or a client seat's peer id), kept in the store
  under ``VAULT_PREFIX`` until ``ITEM_RETENTION_S`` after the session's links expire.

The shapes are checked strictly (so nothing but base64url of the expected length is stored) and
the sizes bounded. The password change that re-wraps the vault key is ``password_routes.py``.
Never logged: anything but the event and opaque session ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from broker.http.dashboard import DASHBOARD
from broker.http.json_api import json_error, read_json
from broker.http.login_sessions import auth_of, require_login
from broker.signaling.protocol import ProtocolError, Role
from broker.store.base import VAULT_PREFIX, Store

log = logging.getLogger("broker.vault")

#: Sealed items outlive the session's links by this long, so the history of ended sessions
#: (30 days) can still show its labels; then the store drops them by TTL.
ITEM_RETENTION_S = 30 * 24 * 3600
#: One sealed item: base64url of a 12-byte nonce, at most about 3 KB of plaintext and the 16-byte tag.
SEALED_MAX = 4096
#: Bounds of the browser's PBKDF2 cost (iterations of PBKDF2-SHA256).
ITERATIONS_MIN = 100_000
ITERATIONS_MAX = 10_000_000
#: The one slot of a session's label and note, and the one of its session secret.
SESSION_SLOT = "session"
SECRET_SLOT = "secret"

_B64 = "^[A-Za-z0-9_-]*$"


class VaultRecord(msgspec.Struct, forbid_unknown_fields=True):
    """A vault key wrapped under a password-derived key, as the browser sends and reads it back."""

    v: Literal[1]
    kdf: Literal["pbkdf2-sha256"]
    iterations: Annotated[int, msgspec.Meta(ge=ITERATIONS_MIN, le=ITERATIONS_MAX)]
    #: 16 random bytes, base64url.
    salt: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{22}$")]
    #: AES-GCM nonce (12 bytes), the 32-byte key and the tag (16 bytes): 60 bytes, base64url.
    wrapped: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{80}$")]


class PutItem(msgspec.Struct, forbid_unknown_fields=True):
    session: Annotated[str, msgspec.Meta(max_length=64, pattern="^[A-Za-z0-9_-]+$")]
    slot: Annotated[str, msgspec.Meta(max_length=64, pattern="^[A-Za-z0-9_-]+$")]
    #: base64url(nonce || ciphertext || tag); null removes the item.
    sealed: Annotated[str, msgspec.Meta(min_length=38, max_length=SEALED_MAX, pattern=_B64)] | None


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(VaultRecord)
_items_decoder = msgspec.json.Decoder(dict[str, str])


def encode_record(record: VaultRecord) -> str:
    return _record_encoder.encode(record).decode()


class VaultItems:
    """The sealed items of each therapist's sessions, one store key per (therapist, session)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    @staticmethod
    def key(therapist: str, session: str) -> str:
        return f"{VAULT_PREFIX}{therapist}:{session}"

    async def get(self, therapist: str, session: str) -> dict[str, str]:
        raw = await self.store.get(self.key(therapist, session))
        if raw is None:
            return {}
        try:
            return _items_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return {}

    async def put(self, therapist: str, session: str, expires: int, slot: str, sealed: str | None) -> None:
        def mutate(raw: bytes | None) -> tuple[bytes | None, None]:
            items: dict[str, str] = {}
            if raw is not None:
                try:
                    items = _items_decoder.decode(raw)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    items = {}
            if sealed is None:
                items.pop(slot, None)
            else:
                items[slot] = sealed
            return (msgspec.json.encode(items) if items else None), None

        ttl = max(1.0, expires + ITEM_RETENTION_S - self.clock())
        await self.store.update(self.key(therapist, session), mutate, ttl)

    async def forget(self, therapist: str, session: str) -> None:
        """Drop a session's sealed items (with its history)."""
        await self.store.update(self.key(therapist, session), lambda raw: (None, None), 1.0)


VAULT: web.AppKey[VaultItems] = web.AppKey("vault_items")


async def api_vault(request: web.Request) -> web.Response:
    """The wrapped vault key (or null) and the sealed items of the therapist's open sessions and of
    those in their history (ended in the last 30 days), whose labels the history shows."""
    login = await require_login(request)
    auth = auth_of(request)
    stored = await auth.accounts.vault(login.therapist)
    record = msgspec.to_builtins(_record_decoder.decode(stored)) if stored else None
    items = request.app[VAULT]
    found: dict[str, dict[str, str]] = {}
    board = request.app[DASHBOARD]
    open_ids = [entry.session for entry in await board.index.sessions(login.therapist)]
    ended_ids = [str(entry.record.get("session")) for entry in await board.hub.history.records(login.therapist)]
    for session_id in dict.fromkeys(open_ids + ended_ids):
        sealed = await items.get(login.therapist, session_id)
        if sealed:
            found[session_id] = sealed
    return web.json_response({"vault": record, "items": found})


async def api_create_vault(request: web.Request) -> web.Response:
    """Store the account's first wrapped vault key; an existing one is never replaced here."""
    login = await require_login(request)
    body: VaultRecord = await read_json(request, VaultRecord)
    if not await auth_of(request).accounts.create_vault(login.therapist, encode_record(body)):
        return json_error(
            409,
            "vault_exists",
            "Your account already has a vault key. Unlock it with your password; a new one would make your labels unreadable.",
        )
    log.info("event=vault_created")
    return web.json_response({"ok": True})


async def api_put_item(request: web.Request) -> web.Response:
    """Store (or remove) one sealed item of one of the therapist's sessions."""
    login = await require_login(request)
    body: PutItem = await read_json(request, PutItem)
    board = request.app[DASHBOARD]
    not_found = json_error(404, "not_found", "No such session or seat among yours.")
    if not await board.index.owns(login.therapist, body.session):
        return not_found
    session = await board.hub.get_session(body.session)
    if session is None:
        return not_found
    if body.slot not in (SESSION_SLOT, SECRET_SLOT):
        try:
            seat = session.seat(body.slot)
        except ProtocolError:
            return not_found
        if seat.role is not Role.CLIENT:
            return not_found
    await request.app[VAULT].put(login.therapist, body.session, session.expires, body.slot, body.sealed)
    log.info("event=vault_item_%s session=%s", "removed" if body.sealed is None else "stored", body.session)
    return web.json_response({"ok": True})


def setup_vault(app: web.Application, *, store: Store, clock: Callable[[], float] = time.time) -> None:
    """Add the vault routes; ``setup_dashboard`` must have run on ``app`` first."""
    if DASHBOARD not in app:
        raise RuntimeError("call setup_dashboard(app, ...) before setup_vault(app, ...)")
    app[VAULT] = VaultItems(store, clock)
    app.router.add_get("/api/vault", api_vault, name="api_vault")
    app.router.add_post("/api/vault", api_create_vault, name="api_vault_create")
    app.router.add_post("/api/vault/items", api_put_item, name="api_vault_item")
