"""Sessions for the suite, scheduled the way a practice admin does: the running broker's admin socket.

That is what ``broker session create`` uses (README, "Commands"): it needs the broker's data
directory (or the ``BROKER_*`` settings that place its admin socket and server secret), so the
suite runs on the broker's machine as the broker's user. The link key is made here and never
sent to the broker, as the therapist's side makes it (docs/protocol.md section 4).
"""

from __future__ import annotations

from broker.config import load_config
from broker.conformance.report import Seat, Session
from broker.crypto.link_key import decode_link_key, new_link_key
from broker.http.admin_socket import AdminClient


class AdminSessions:
    """Schedules sessions and revokes links through the admin socket of the broker on ``data_dir``."""

    def __init__(self, data_dir: str | None = None) -> None:
        self.client = AdminClient(load_config(overrides={"data_dir": data_dir} if data_dir else None))

    async def create(self, clients: int = 1, starts: int | None = None) -> Session:
        created = await self.client.create_session(clients=clients, starts=starts)
        seats = tuple(Seat(s["peer"], s["role"], s["token"]) for s in created["seats"])
        return Session(created["session"], decode_link_key(new_link_key()), seats)

    async def revoke(self, session: str, peer: str) -> None:
        await self.client.revoke(session, peer)
