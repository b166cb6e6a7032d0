"""The ``broker`` command: serve, check the configuration, schedule sessions, join from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from broker.accounts.account import AccountsKeyMismatch
from broker.cli import therapist as cli_therapist
from broker.cli import web_manifest as cli_web_manifest
from broker.config import Config, ConfigError, load_config
from broker.config_check import check_config, unavailable_choices, untranslated_texts

#: A command that talks to Redis itself (the therapist accounts) when Redis cannot be reached.
REDIS_UNREACHABLE_MESSAGE = (
    "This command cannot reach Redis (BROKER_ACCOUNTS_REDIS_URL, else BROKER_REDIS_URL), so nothing was changed: "
    "check that Redis is running, then try again."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="Teletherapy session broker.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_data_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data-dir", help="data directory (env BROKER_DATA_DIR; default ./broker-data)")
        return p

    serve = with_data_dir(sub.add_parser("serve", help="run the broker"))
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument(
        "--tls", choices=["self-signed"], help="serve HTTPS with a self-signed certificate (LAN trials only)"
    )

    with_data_dir(sub.add_parser("check-config", help="report every configuration problem"))

    session = sub.add_parser("session", help="schedule and manage sessions").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = with_data_dir(session.add_parser("create", help="schedule a session and print its links"))
    create.add_argument("--base-url", help="base of the links (default: the broker's public URL)")
    create.add_argument("--seats", type=int, default=1, help="client seats (1 = individual; more for couples/groups)")
    create.add_argument("--minors", type=int, default=0, help="how many of the seats are for minors")
    create.add_argument("--starts", help="appointment start, ISO 8601 (default: now)")
    create.add_argument("--duration", type=int, default=50, help="length in minutes (default 50)")
    create.add_argument("--relay-only", action="store_true", help="route media through TURN (hides IP addresses)")
    create.add_argument(
        "--group-link",
        action="store_true",
        help="also print one link for every client (they then share one key: not for couples or families)",
    )
    create.add_argument(
        "--lang",
        help="the client's language, carried in the client links as ?lang=TAG (for example es): the page starts in it",
    )
    create.add_argument("--json", action="store_true", help="print JSON instead of text")

    revoke = with_data_dir(session.add_parser("revoke", help="revoke (or reissue) a client's link"))
    revoke.add_argument("session")
    revoke.add_argument("peer")
    revoke.add_argument("--reissue", action="store_true", help="print a new link for the seat")
    revoke.add_argument("--base-url")

    cancel = with_data_dir(session.add_parser("cancel", help="cancel a session: its links stop working at once"))
    cancel.add_argument("session")

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True, metavar="ACTION")
    verify_audit = with_data_dir(
        audit.add_parser("verify", help="check the audit log has not been edited, cut or reordered")
    )
    verify_audit.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="ANCHOR",
        help="an anchor printed earlier by 'broker audit anchor': the log must still hold that entry (repeatable)",
    )
    with_data_dir(audit.add_parser("anchor", help="print the log's last entry compactly, to keep off this machine"))
    acknowledge = with_data_dir(
        audit.add_parser("acknowledge", help="record that the integrity warnings verify reports were looked into")
    )
    acknowledge.add_argument(
        "--through", type=int, required=True, metavar="ENTRY", help="the last warning entry you looked into"
    )

    record = sub.add_parser("record", help="session records").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    verify_record = record.add_parser("verify", help="check a session record's signature")
    verify_record.add_argument("file", help="the record as downloaded: JSON with record, signature, key_id")
    verify_record.add_argument("--key", required=True, help="the broker's public key (the 'x' of its JWK)")

    cli_therapist.register(sub)
    cli_web_manifest.register(sub)

    contract = sub.add_parser("contract", help="the protocol as JSON Schema, AsyncAPI and OpenAPI").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for action, text in (
        ("write", "generate the documents from the code into DIR"),
        ("check", "fail if the documents in DIR differ from a fresh generation"),
    ):
        contract.add_parser(action, help=text).add_argument(
            "directory", nargs="?", metavar="DIR", help="where they live (default docs/contract)"
        )

    conformance = with_data_dir(
        sub.add_parser("conformance", help="check a running broker against docs/protocol.md, one line per rule")
    )
    conformance.add_argument("url", help="the broker's base URL, e.g. http://127.0.0.1:8080")
    conformance.add_argument("--origin", help="an Origin the broker allows (default: the URL's own)")
    conformance.add_argument(
        "--only", action="append", default=[], metavar="PREFIX", help="run only rules whose id starts so (repeatable)"
    )

    join = sub.add_parser("join", help="join a session from a terminal to diagnose a connection")
    join.add_argument("link", help="a client or therapist link, including its #fragment")
    join.add_argument(
        "--broker-url",
        action="append",
        default=[],
        metavar="URL",
        help="another broker of the same deployment (repeatable): used in turn when one stops answering",
    )
    join.add_argument("--seconds", type=float, default=20.0, help="how long to stay connected")
    join.add_argument("--admit-all", action="store_true", help="as therapist: admit every client who waits")
    join.add_argument("--media", action="store_true", help="send a test tone and test picture")
    join.add_argument("--location", help="as client: the location to seal for the therapist (default: a test text)")
    join.add_argument("--contact", help="as client: the emergency contact to seal (default: a test text)")
    return parser


def _t(key: str, **args: Any) -> str:
    """A message to the person at the terminal, in their language (broker/i18n/messages)."""
    from broker.i18n.catalogue import messages

    return messages().text(key, **args)


def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return load_config(overrides=overrides)


def _parse_time(text: str | None) -> int | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(_t("cli.starts_invalid", text=repr(text))) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return int(moment.timestamp())


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _language_query(lang: str | None, config: Config) -> str:
    """``?lang=TAG`` for a client link (empty without --lang); SystemExit for a language the
    practice does not offer. The tag reaches the broker with the link's path (docs/security.md)."""
    if lang is None:
        return ""
    from broker.i18n.links import link_language_problem

    problem = link_language_problem(lang, config.languages)
    if problem:
        raise SystemExit(f"--lang: {problem}")
    return f"?lang={lang}"


def _links(base: str, session: str, seats: list[dict[str, Any]], secret: str, query: str = "") -> list[dict[str, Any]]:
    """Each seat's link: the therapist's carries the session secret, each client's only its own seat
    key (and ``query``, the client's language)."""
    from broker.crypto.link_key import b64url_encode, decode_link_key
    from broker.crypto.seat_keys import seat_key

    out = []
    for seat in seats:
        if seat["role"] == "therapist":
            path, key = "t", secret
        else:
            path, key = "j", b64url_encode(seat_key(decode_link_key(secret), session, seat["peer"]))
        tail = "" if seat["role"] == "therapist" else query
        out.append({**seat, "link": f"{base.rstrip('/')}/{path}/{seat['token']}{tail}#{key}"})
    return out


def _group_link(base: str, session: str, token: str, secret: str, query: str = "") -> str:
    from broker.crypto.link_key import b64url_encode, decode_link_key
    from broker.crypto.seat_keys import group_key

    return f"{base.rstrip('/')}/j/{token}{query}#{b64url_encode(group_key(decode_link_key(secret), session))}"


async def _create(args: argparse.Namespace) -> int:
    from broker.crypto.link_key import new_link_key
    from broker.http.admin_socket import AdminClient

    config = _config(args)
    query = _language_query(args.lang, config)
    fields: dict[str, Any] = {
        "clients": args.seats,
        "minors": args.minors,
        "starts": _parse_time(args.starts),
        "duration_s": args.duration * 60,
        "relay_only": args.relay_only,
    }
    if args.group_link:
        fields["group_link"] = True
    created = await AdminClient(config).create_session(**fields)
    # The session secret is made here, on the therapist's side, and never sent to the broker;
    # each client's link gets only the key of its own seat (docs/protocol.md 7.1).
    secret = new_link_key()
    base = args.base_url or created["base_url"]
    seats = _links(base, created["session"], created["seats"], secret, query)
    group_token = created.pop("group_token", None)
    group = _group_link(base, created["session"], group_token, secret, query) if group_token else None
    if args.json:
        shown = [{k: v for k, v in s.items() if k != "token"} for s in seats]
        print(json.dumps({**created, "seats": shown, "group_link": group}))
        return 0
    print(_t("cli.session_created", session=created["session"], starts=_when(created["starts"])))
    print(_t("cli.links_window", start=_when(created["not_before"]), end=_when(created["expires"])) + "\n")
    clients = [s for s in seats if s["role"] == "client"]
    for i, seat in enumerate(clients, 1):
        label = _t("cli.client_link_n", number=i) if len(clients) > 1 else _t("cli.client_link")
        if seat["minor"]:
            label = _t("cli.minor", label=label)
        print(_t("cli.client_link_send", label=label) + f"\n  {seat['link']}\n")
    if group is not None:
        print(_t("cli.group_link") + f"\n  {group}\n" + _t("cli.group_link_warning") + "\n")
    therapist = next(s for s in seats if s["role"] == "therapist")
    print(_t("cli.therapist_link") + f"\n  {therapist['link']}")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    from broker.http.admin_socket import AdminClient

    config = _config(args)
    result = await AdminClient(config).revoke(args.session, args.peer, reissue=args.reissue)
    if args.reissue:
        print(_t("cli.reissued"))
        print(f"  {(args.base_url or config.base_url).rstrip('/')}/j/{result['token']}#<{_t('cli.seat_key')}>")
    else:
        print(_t("cli.revoked"))
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    from broker.http.admin_socket import AdminClient

    await AdminClient(_config(args)).cancel(args.session)
    print(_t("cli.cancelled"))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from broker.audit.format import rotated_numbers
    from broker.audit.log import Anchor, head_path, verify
    from broker.audit.setup import audit_key

    config = _config(args)
    path = config.audit_path
    try:
        anchors = [Anchor.parse(text) for text in getattr(args, "anchor", [])]
    except ValueError as exc:
        print(f"--anchor: {exc}", file=sys.stderr)
        return 2
    report = None
    if path.exists() or head_path(path).exists() or rotated_numbers(path):
        report = verify(path, audit_key(config, create_secret=False), anchors=anchors)
    if args.action == "acknowledge" and report is not None:
        return int(_run(_audit_acknowledge(config, args.through)))
    if report is None or report.kind == "no_log":
        print(_t("cli.audit_no_log", path=str(path)), file=sys.stderr)
        return 1
    if args.action == "anchor":
        if not report.ok:
            print(_t("cli.anchor_not_intact", problem=report.problem), file=sys.stderr)
            return 1
        if report.last is None:
            print(_t("cli.anchor_empty"), file=sys.stderr)
            return 1
        print(report.last)
        print(_t("cli.anchor_keep", seq=report.last.seq, path=str(path)), file=sys.stderr)
        return 0
    return _print_audit_report(report, config)


def _print_audit_report(report: Any, config: Config) -> int:
    from broker.audit.setup import describe_key, has_separate_audit_key

    for warning in report.warnings:
        state = (
            _t("cli.audit_acknowledged_at", seq=warning.acknowledged_at)
            if warning.acknowledged_at is not None
            else _t("cli.audit_not_acknowledged")
        )
        print(_t("cli.audit_warning", seq=warning.seq, time=warning.time, meaning=warning.meaning, state=state))
    if not report.ok:
        if report.first_bad_seq is not None:
            print(_t("cli.audit_not_intact_at", seq=report.first_bad_seq, problem=report.problem), file=sys.stderr)
        else:
            print(_t("cli.audit_not_intact", problem=report.problem), file=sys.stderr)
        for problem in report.problems[1:]:
            print(_t("cli.also", problem=problem), file=sys.stderr)
        return 1
    span = _t("cli.audit_span", first=report.first_time, last=report.last.time) if report.last is not None else ""
    files = _t("cli.audit_files", count=report.files) if report.files > 1 else ""
    print(_t("cli.audit_intact", entries=report.entries, files=files, span=span, signer=describe_key(config)))
    if report.anchors_checked:
        print(_t("cli.anchors_ok", count=report.anchors_checked))
    if not has_separate_audit_key(config):
        print(_t("cli.audit_key_note"))
    return 0


async def _audit_acknowledge(config: Config, through: int) -> int:
    from broker.audit.log import AcknowledgeRefused
    from broker.audit.setup import open_audit_log

    audit = open_audit_log(config, create_secret=False)
    try:
        seq, warnings = await audit.acknowledge_warnings(through)
    except AcknowledgeRefused as exc:
        print(_t("cli.not_acknowledged", reason=str(exc)), file=sys.stderr)
        return 1
    finally:
        await audit.aclose()
    listed = ", ".join(str(w.seq) for w in warnings)
    print(_t("cli.acknowledged", entries=listed, seq=seq))
    return 0


def _record_verify(file: str, key: str) -> int:
    from broker.signaling.record import RecordRefused, parse_signed_record, verify_record

    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        print(_t("cli.record_unreadable", reason=exc.strerror), file=sys.stderr)
        return 1
    try:
        record, signature = parse_signed_record(data)
    except RecordRefused as exc:
        print(_t("cli.record_refused", reason=str(exc)), file=sys.stderr)
        return 1
    if verify_record(record, signature, key):
        print(_t("cli.record_valid", session=str(record.get("session"))))
        return 0
    print(_t("cli.record_invalid"), file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from broker.logs import LOG_FORMATS, configure

    def usable(log_format: str) -> str:
        return log_format if log_format in LOG_FORMATS else "text"  # check_config reports another value

    configure(os.environ.get("BROKER_LOG_LEVEL", "info"), log_format=usable(os.environ.get("BROKER_LOG_FORMAT", "")))
    try:
        config = _config(args)  # also honours log_level and log_format from a BROKER_CONFIG file
        configure(config.log_level, log_format=usable(config.log_format))
    except ConfigError:
        pass  # reported below, where the command loads its configuration
    try:
        if args.command == "serve":
            from broker.http.serve import serve

            config = _config(args, host=args.host, port=args.port)
            problems = check_config(config)
            if problems:
                print(_t("cli.config_problems") + "\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
                return 2
            try:
                _run(serve(config, self_signed_tls=args.tls == "self-signed"))
            except AccountsKeyMismatch as exc:
                print(_t("cli.cannot_start", reason=str(exc)), file=sys.stderr)
                return 2
            return 0
        if args.command == "check-config":
            config = _config(args)
            problems = check_config(config)
            choices = unavailable_choices(config)
            if choices:
                print(_t("cli.not_available"))
                for choice in choices:
                    print(f"  - {choice}")
            untranslated = untranslated_texts(config)
            if untranslated:
                print(_t("cli.untranslated_heading", languages=", ".join(config.languages)))
                for text in untranslated:
                    print(f"  - {text}")
            if problems:
                print(_t("cli.problems_found", count=len(problems)), file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
                return 1
            print(_t("cli.config_ok" if not (choices or untranslated) else "cli.config_ok_notes"))
            return 0
        if args.command == "session":
            actions = {"create": _create, "revoke": _revoke, "cancel": _cancel}
            return _run(actions[args.action](args))
        if args.command == "therapist":
            return cli_therapist.run(args)
        if args.command in ("web-manifest", "verify-web"):
            return cli_web_manifest.run(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "contract":
            return _run(_contract(args.action, args.directory))
        if args.command == "record":
            return _record_verify(args.file, args.key)
        if args.command == "conformance":
            from broker.conformance.suite import conformance_command

            return _run(conformance_command(args.url, data_dir=args.data_dir, origin=args.origin, only=args.only))
        if args.command == "join":
            from broker.client.diagnostic import join_from_terminal

            details = None
            if args.location or args.contact:
                details = {"location": args.location or "", "contact": args.contact or ""}
            return _run(
                join_from_terminal(
                    args.link,
                    seconds=args.seconds,
                    admit_all=args.admit_all,
                    media=args.media,
                    details=details,
                    broker_urls=args.broker_url,
                )
            )
    except ConfigError as exc:
        print(_t("cli.config_error", reason=str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from redis.exceptions import RedisError

        from broker.http.admin_socket import AdminError
        from broker.store.base import StoreUnavailable

        if isinstance(exc, AdminError):
            print(_t("cli.error", reason=str(exc)), file=sys.stderr)
            return 1
        if isinstance(exc, (StoreUnavailable, RedisError, ConnectionError, TimeoutError)):
            # A command that talks to Redis itself (the therapist accounts): one line, no traceback.
            print(_t("cli.error", reason=REDIS_UNREACHABLE_MESSAGE), file=sys.stderr)
            return 1
        raise
    return 0


async def _contract(action: str, directory: str | None) -> int:
    import logging
    from pathlib import Path

    from broker.contract import files

    # The throw-away broker whose routes are read says it opened its store and audit log: not news here.
    logging.getLogger("broker").setLevel(logging.WARNING)
    target = Path(directory) if directory else files.DEFAULT_DIRECTORY
    if action == "write":
        for path in await files.write(target):
            print(f"wrote {path}")
        return 0
    outdated = await files.stale(target)
    for name in outdated:
        print(f"{files.path_of(target, name)} differs from the code: run `{files.REGENERATE}`", file=sys.stderr)
    return 1 if outdated else 0


T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        result: T = uvloop.run(coro)  # uvloop is optional and not type-checked here
        return result
    except ImportError:
        return asyncio.run(coro)
