"""Where therapist account rows live: the interface both backends implement (SQLite and Redis).

``AccountStore`` (account_store.py) holds the rules (password policy, sealing, second factors, login
answers that reveal nothing); a backend only keeps rows. A row is a dict of the columns below,
with ``None`` for an empty column. Everything that identifies a person is sealed by
``AccountStore`` before it reaches a backend, so a backend never sees a name in clear.

Changes are compare-and-set where two broker processes could race (a TOTP step spent twice, a
recovery code used twice): ``update`` takes the values a row must still hold for the change to
apply, and says whether it did.
"""

from __future__ import annotations

import builtins
from typing import Any, ParamSpec, Protocol, TypeVar

Row = dict[str, Any]
P = ParamSpec("P")
T = TypeVar("T")

#: Every column, with its kind: "text", "int" or "bytes" (sealed blobs).
COLUMNS: dict[str, str] = {
    "id": "text",
    "username_key": "text",
    "username_enc": "bytes",
    "display_name_enc": "bytes",
    "password_hash": "text",
    "totp_secret_enc": "bytes",
    "totp_pending_enc": "bytes",
    "totp_last_step": "int",
    "recovery_hashes": "text",
    "passkeys_enc": "bytes",
    "disabled": "int",
    "failures": "int",
    "locked": "int",
    "created_at": "text",
    "sessions_epoch": "text",
    "vault_enc": "bytes",
}
#: Columns a new row may leave out, with the value they then hold.
DEFAULTS: Row = {
    "display_name_enc": None,
    "totp_secret_enc": None,
    "totp_pending_enc": None,
    "totp_last_step": None,
    "recovery_hashes": "[]",
    "passkeys_enc": None,
    "disabled": 0,
    "failures": 0,
    "locked": 0,
    "sessions_epoch": None,
    "vault_enc": None,
}


def check_columns(names: Any) -> None:
    """Refuse unknown column names before they get anywhere near a query."""
    unknown = set(names) - COLUMNS.keys()
    if unknown:
        raise ValueError(f"unknown account columns: {sorted(unknown)}")


class AccountRows(Protocol):
    """Durable storage of account rows; every method is safe to call from several processes."""

    async def key_check(self, sealed: bytes) -> bytes:
        """Store ``sealed`` as the key check if there is none yet; return the stored one."""
        ...

    async def by_id(self, therapist_id: str) -> Row | None: ...

    async def by_key(self, username_key: str) -> Row | None: ...

    async def all(self) -> builtins.list[Row]:
        """Every row, oldest first."""
        ...

    async def insert(self, row: Row) -> bool:
        """Add a row; False (and no change) when its ``username_key`` is taken."""
        ...

    async def update(
        self,
        therapist_id: str,
        changes: Row,
        *,
        expect: Row | None = None,
        step_below: int | None = None,
    ) -> bool:
        """Apply ``changes`` if the row exists, still holds ``expect`` and (when given) its
        ``totp_last_step`` is empty or below ``step_below``; True when it applied."""
        ...

    async def count_failure(self, therapist_id: str, lockout_after: int) -> None:
        """One more consecutive failure, locking the account at ``lockout_after``."""
        ...

    async def balance(self) -> None:
        """A write costing about what ``count_failure`` costs, touching no account."""
        ...

    async def close(self) -> None: ...
