"""``broker web-manifest build|check|sign|show|verify|keygen`` and ``broker verify-web URL``.

The first keep the signed release of the browser client in a web root (by default the configured
one, else the copy this installation serves); the last checks from outside what a running broker
serves against it (docs/protocol.md section 18, docs/deploy.md "Watching what the broker serves").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp

from broker.config import load_config
from broker.http.pages import web_root
from broker.webmanifest.layout import BUILD_COMMAND, MANIFEST_FILE, SIGNATURES_FILE
from broker.webmanifest.manifest import ManifestError, parse_manifest
from broker.webmanifest.release import ReleaseError, build_release, sign_release, stale_release, verify_release
from broker.webmanifest.release_keys import PROJECT_KEYS
from broker.webmanifest.signing import SigningError, generate_key, read_signatures

log = logging.getLogger("broker.verify_web")

_ACTIONS = {
    "build": "pin the pages' scripts and styles and write the manifest (keeps only signatures still valid)",
    "check": "fail if the pins or the manifest differ from a fresh build, naming what changed",
    "sign": "add a signature of the manifest with an Ed25519 key",
    "show": "print the manifest: version, headers, every file with its digest, the signatures",
    "verify": "check the manifest is current and signed by the key(s) given (else the project's)",
    "keygen": "make a new Ed25519 signing key (PEM, mode 0600) and print its public key",
}


def register(subparsers: Any) -> None:
    manifest = subparsers.add_parser(
        "web-manifest", help="the signed manifest of the browser client (every file with its SHA-384)"
    )
    actions = manifest.add_subparsers(dest="manifest_action", required=True, metavar="ACTION")
    for name, text in _ACTIONS.items():
        p = actions.add_parser(name, help=text)
        if name == "keygen":
            p.add_argument("--out", required=True, metavar="FILE", help="where to write the private key")
            continue
        p.add_argument("--web", metavar="DIR", help="the web root (default BROKER_WEB_ROOT, else the shipped one)")
        if name == "sign":
            p.add_argument("--key", required=True, metavar="FILE", help="the private key (PEM)")
        if name == "verify":
            p.add_argument(
                "--key",
                action="append",
                default=[],
                metavar="KEY",
                help="a public key, or a file holding one (repeatable)",
            )
    verify = subparsers.add_parser(
        "verify-web", help="check what a running broker serves against its signed manifest, as a browser fetches"
    )
    verify.add_argument("url", help="the broker's public base URL, e.g. https://sessions.example.org")
    verify.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY",
        help="a public key the manifest must be signed by, or a file holding one (repeatable)",
    )
    verify.add_argument(
        "--page", action="append", default=[], metavar="PATH", help="another page to check, e.g. /j/TOKEN (repeatable)"
    )
    verify.add_argument("--timeout", type=float, default=15.0, metavar="S", help="seconds per request (default 15)")


def run(args: argparse.Namespace) -> int:
    if args.command == "verify-web":
        return asyncio.run(_verify_web(args))
    try:
        if args.manifest_action == "keygen":
            public = generate_key(Path(args.out))
            print(f"Wrote the private key to {args.out} (keep it off the broker's machine). Its public key:")
            print(public)
            return 0
        root = Path(args.web) if args.web else web_root(load_config().web_root)
        return int(_ON_ROOT[args.manifest_action](root, args))
    except (ReleaseError, SigningError, ManifestError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _build(root: Path, args: argparse.Namespace) -> int:
    built = build_release(root)
    for name in built.pages:
        print(f"pinned {root / name}")
    print(f"{'wrote' if built.manifest_changed else 'unchanged:'} {root / MANIFEST_FILE}")
    for key in built.dropped:
        print(f"dropped the signature by {key}: the manifest changed, so sign it again")
    return 0


def _check(root: Path, args: argparse.Namespace) -> int:
    problems = stale_release(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{root / MANIFEST_FILE} is current.")
    return 1 if problems else 0


def _sign(root: Path, args: argparse.Namespace) -> int:
    public = sign_release(root, Path(args.key))
    print(f"Signed {root / MANIFEST_FILE} with the key {public}; the signature is in {root / SIGNATURES_FILE}.")
    print("Publish that public key where people who check your broker will find it (docs/deploy.md).")
    return 0


def _show(root: Path, args: argparse.Namespace) -> int:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ReleaseError(f"{path} is missing: run `{BUILD_COMMAND}`")
    manifest = parse_manifest(path.read_bytes())
    print(f"{manifest['app']} {manifest['version']} ({manifest['format']}), {path}")
    print(f"Content-Security-Policy: {manifest['default_csp']}")
    for name, value in manifest["headers"].items():
        print(f"{name}: {value}")
    for where, digest in sorted(manifest["files"].items()):
        print(f"{digest}  {where}")
    for prefix, target in sorted(manifest["routes"].items()):
        print(f"{prefix}...  serves {target}, or a notice")
    for code, digest in sorted(manifest["notices"].items()):
        print(f"{digest}  notice {code}")
    signers = set(verify_release(root, None))
    signatures = read_signatures(root / SIGNATURES_FILE)
    for key in sorted(signatures):
        print(f"signature by {key}: {'valid' if key in signers else 'INVALID'}")
    if not signatures:
        print("not signed")
    return 0


def _verify(root: Path, args: argparse.Namespace) -> int:
    problems = stale_release(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    keys = args.key or list(PROJECT_KEYS)
    if not keys:
        print("No key given (--key) and this installation lists no project release key.", file=sys.stderr)
        return 1
    signers = verify_release(root, keys)
    if not signers:
        print(f"{root / MANIFEST_FILE} carries no valid signature by the key(s) given.", file=sys.stderr)
        return 1
    if problems:
        return 1
    print(f"{root / MANIFEST_FILE} is current and signed by {', '.join(signers)}.")
    return 0


_ON_ROOT = {"build": _build, "check": _check, "sign": _sign, "show": _show, "verify": _verify}


async def _verify_web(args: argparse.Namespace) -> int:
    from broker.webmanifest.monitor import verify_web

    try:
        report = await verify_web(
            args.url, keys=args.key, local_root=web_root(), pages=args.page, timeout_s=args.timeout
        )
    except SigningError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, aiohttp.ClientError) as exc:
        print(f"Cannot reach {args.url}: {exc.__class__.__name__}", file=sys.stderr)
        log.warning("event=verify_web result=unreachable")
        return 2
    for finding in report.findings:
        print(finding)
    for item in report.not_checked:
        print(f"NOT CHECKED {item}")
    summary = {"files": len(report.checked), "differences": len(report.findings)}
    if report.ok:
        print(f"OK: {summary['files']} responses match {report.reference}.")
        log.info("event=verify_web result=ok responses=%d", summary["files"])
        return 0
    print(
        f"DIFFERS: {summary['differences']} difference(s) in {summary['files']} responses"
        + (f", compared with {report.reference}." if report.reference else "."),
    )
    log.warning("event=verify_web result=differs differences=%d", summary["differences"])
    return 1
