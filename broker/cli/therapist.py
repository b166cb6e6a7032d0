"""``broker therapist ...``: the practice admin manages therapist accounts from a terminal.

Works directly on DATA_DIR/accounts.sqlite3 (or the accounts' Redis; no running broker needed)
with the accounts key derived from the server secret. A running broker sees every change at the
therapist's next request: ``disable``, ``reset-password`` and ``reset-2fa`` end the account's open
web logins wherever they are (the account's sessions epoch changes, see account_store.py). Passwords
are read with getpass (twice, to catch typos) or from standard input with ``--password-stdin``;
they are never echoed, printed or logged. Every change is appended to the audit log
(DATA_DIR/audit.log) with the account's opaque id only.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from broker.accounts.account import AccountError
from broker.accounts.account_store import AccountStore, open_accounts
from broker.accounts.passwords import PasswordRejected
from broker.audit.log import AuditEvent, AuditLog
from broker.audit.setup import open_audit_log
from broker.config import Config, ConfigError, Keys, load_config, load_or_create_secret
from broker.i18n.catalogue import messages

_ACTIONS = ("add", "list", "disable", "enable", "unlock", "reset-password", "reset-2fa")


def register(subparsers: Any) -> None:
    """Add ``therapist add|list|disable|enable|unlock|reset-password|reset-2fa`` to a CLI."""
    therapist = subparsers.add_parser("therapist", help="manage therapist accounts")
    actions = therapist.add_subparsers(dest="therapist_action", required=True, metavar="ACTION")

    def command(name: str, help_text: str, *, account: bool = True, password: bool = False) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        p.add_argument("--data-dir", help="data directory (env BROKER_DATA_DIR; default ./broker-data)")
        if account:
            p.add_argument("account", help="login name or account id")
        if password:
            p.add_argument(
                "--password-stdin", action="store_true", help="read the password from standard input (one line)"
            )
        return p

    add = command("add", "create a therapist account", password=True)
    add.add_argument("--display-name", help="name shown on the therapist's own pages")
    command("list", "list accounts (no secrets)", account=False).add_argument(
        "--json", action="store_true", help="print JSON"
    )
    command("disable", "stop an account from logging in (ends its web sessions)")
    command("enable", "allow a disabled account to log in again")
    command("unlock", "clear a lockout after too many failed logins")
    command("reset-password", "set a new password (clears a lockout, ends its web sessions)", password=True)
    command(
        "reset-2fa",
        "forget the authenticator app, passkeys and recovery codes (ends its web sessions; the therapist sets up anew)",
    )


def _t(key: str, **args: Any) -> str:
    """A message to the person at the terminal, in their language (broker/i18n/messages)."""
    return messages().text(key, **args)


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Run one ``therapist`` action; returns the exit code."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    try:
        config = load_config(overrides={"data_dir": args.data_dir} if args.data_dir else None)
    except ConfigError as exc:
        print(_t("cli.config_error", reason=str(exc)), file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, config, stdin, out))
    except (AccountError, PasswordRejected, PasswordMismatch) as exc:
        print(_t("cli.error", reason=str(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class PasswordMismatch(Exception):
    pass


async def _run(args: argparse.Namespace, config: Config, stdin: TextIO, out: TextIO) -> int:
    keys = Keys(load_or_create_secret(config))
    store = await open_accounts(config, keys)
    try:
        action = args.therapist_action
        if action == "list":
            return await _list(store, args, out)
        audit = open_audit_log(config, keys)
        try:
            return await _change(store, audit, args, config, stdin, out)
        finally:
            audit.close()
    finally:
        await store.close()


async def _list(store: AccountStore, args: argparse.Namespace, out: TextIO) -> int:
    accounts = await store.list()
    if args.json:
        rows = [
            {
                "id": a.id,
                "username": a.username,
                "display_name": a.display_name,
                "disabled": a.disabled,
                "locked": a.locked,
                "second_factor": a.totp_enabled or a.passkeys > 0,
                "totp": a.totp_enabled,
                "passkeys": a.passkeys,
                "recovery_codes_left": a.recovery_codes_left,
                "created_at": a.created_at,
            }
            for a in accounts
        ]
        print(json.dumps(rows, indent=2), file=out)
        return 0
    if not accounts:
        print(_t("cli.therapist.none"), file=out)
        return 0
    for a in accounts:
        flags = [_t(f"cli.therapist.{f}") for f, on in (("disabled", a.disabled), ("locked", a.locked)) if on]
        factors = [
            f
            for f, on in (
                (_t("cli.therapist.app"), a.totp_enabled),
                (_t("cli.therapist.passkeys", count=a.passkeys), a.passkeys),
            )
            if on
        ]
        factor = (
            _t("cli.therapist.factor_on", factors=", ".join(factors)) if factors else _t("cli.therapist.factor_off")
        )
        shown = f" ({a.display_name})" if a.display_name else ""
        extra = f" [{', '.join(flags)}]" if flags else ""
        since = _t("cli.therapist.since", when=a.created_at)
        print(f"{a.id}  {a.username}{shown}  {factor}  {since}{extra}", file=out)
    return 0


async def _find(store: AccountStore, name_or_id: str) -> str:
    account = await store.get_by_username(name_or_id) or await store.get(name_or_id)
    if account is None:
        raise AccountError(_t("cli.therapist.not_found", name=repr(name_or_id)))
    return account.id


async def _change(
    store: AccountStore, audit: AuditLog, args: argparse.Namespace, config: Config, stdin: TextIO, out: TextIO
) -> int:
    action = args.therapist_action
    second_factor = bool(getattr(config, "require_second_factor", False))
    if action == "add":
        password = _read_password(args.password_stdin, stdin)
        therapist = await store.add(args.account, password, args.display_name, second_factor=second_factor)
        await audit.append(AuditEvent.ACCOUNT_ADDED, therapist)
        print(_t("cli.therapist.added", account=therapist), file=out)
        return 0
    therapist = await _find(store, args.account)
    if action == "disable":
        await store.disable(therapist)
        await audit.append(AuditEvent.ACCOUNT_DISABLED, therapist)
        print(_t("cli.therapist.disabled_done", account=therapist), file=out)
    elif action == "enable":
        await store.enable(therapist)
        await audit.append(AuditEvent.ACCOUNT_ENABLED, therapist)
        print(_t("cli.therapist.enabled", account=therapist), file=out)
    elif action == "unlock":
        await store.unlock(therapist)
        await audit.append(AuditEvent.ACCOUNT_UNLOCKED, therapist)
        print(_t("cli.therapist.unlocked", account=therapist), file=out)
    elif action == "reset-password":
        password = _read_password(args.password_stdin, stdin)
        await store.reset_password(therapist, password, second_factor=second_factor)
        await audit.append(AuditEvent.PASSWORD_RESET, therapist)
        print(_t("cli.therapist.password_reset", account=therapist), file=out)
    elif action == "reset-2fa":
        await store.reset_2fa(therapist)
        await audit.append(AuditEvent.SECOND_FACTOR_CHANGED, therapist)
        print(_t("cli.therapist.second_factor_reset", account=therapist), file=out)
    return 0


def _read_password(from_stdin: bool, stdin: TextIO) -> str:
    """One line from stdin, or typed twice without echo."""
    if from_stdin:
        return stdin.readline().removesuffix("\n").removesuffix("\r")
    first = getpass.getpass("New password: ")
    second = getpass.getpass("The same password again: ")
    if first != second:
        raise PasswordMismatch("The two passwords differ; nothing was changed.")
    return first


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m broker.cli.therapist therapist ...``)."""
    parser = argparse.ArgumentParser(prog="broker")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
