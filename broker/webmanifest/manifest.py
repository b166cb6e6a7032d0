"""The release manifest of the browser client (docs/protocol.md section 18).

Every file a browser can load from the broker, each with its SHA-384: the files of the web root at
``/static/...``, the pages at their own addresses (``/``, ``/login``, ``/dashboard``), the page each
invite-link prefix serves, and every notice page (fixed per code, from the notice template), with
the headers that must come with every response. Its shape follows WEBCAT's manifest (``app``,
``version``, ``default_csp``, ``extra_csp``, ``files``, ``default_index``, ``wasm``) so a practice
can enroll there later; ``format``, ``headers``, ``routes`` and ``notices`` are ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker import __version__
from broker.http.client_pages import EXIT_PATH, JOIN_PATH
from broker.http.notice_pages import NOTICES, render_notice
from broker.http.pages import LINK_PAGES, PAGES, STATIC_PREFIX
from broker.http.security_headers import security_headers
from broker.webmanifest.canonical import canonical_json, strict_loads
from broker.webmanifest.integrity import is_sri, sri
from broker.webmanifest.layout import RELEASE_DIR
from broker.webmanifest.pins import import_map_hash

FORMAT = "broker-web-manifest/1"
#: WEBCAT's ``app`` names the upstream project: ours is the Python package's name.
APP = "teletherapy-broker"
_STRING_MAPS = ("extra_csp", "headers", "files", "routes", "notices")
_DIGEST_MAPS = ("files", "notices")


#: The client's pages at their own addresses (broker/http/client_pages.py), with the built-in
#: choices (no practice title, no exit address): a practice that sets them signs its own manifest.
CLIENT_ADDRESSES = {JOIN_PATH: "join.html", EXIT_PATH: "today.html"}


class ManifestError(ValueError):
    """A manifest that cannot be read as one (the message says what is wrong)."""


def served_files(root: Path) -> list[str]:
    """Every file of the web root the broker serves under /static/ (paths relative to it, sorted),
    the release folder apart: a manifest cannot list itself or its signatures."""
    return sorted(
        rel
        for p in root.rglob("*")
        if p.is_file() and (rel := p.relative_to(root).as_posix()).split("/")[0] != RELEASE_DIR
    )


def build_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the web root ``root`` as it is now (pin the pages first: see ``release``)."""
    headers = security_headers([import_map_hash(root)])
    csp = headers.pop("Content-Security-Policy")
    files = {STATIC_PREFIX + rel: sri((root / rel).read_bytes()) for rel in served_files(root)}
    files.update({route: sri((root / name).read_bytes()) for route, name in PAGES.items()})
    # The join page's own address after it read its link (a reload lands there) and the quick
    # exit's page: pages a browser is sent to by the client's own page (the extension checks them).
    files.update({path: sri((root / name).read_bytes()) for path, name in CLIENT_ADDRESSES.items()})
    return {
        "format": FORMAT,
        "app": APP,
        "version": __version__,
        "default_csp": csp,
        "extra_csp": {},
        "headers": headers,
        "default_index": STATIC_PREFIX + PAGES["/"],
        "files": files,
        "routes": {prefix: STATIC_PREFIX + name for prefix, name in LINK_PAGES.items()},
        "notices": {code: sri(render_notice(root, code)[1].encode("utf-8")) for code in NOTICES},
        "wasm": [],
    }


def manifest_bytes(root: Path) -> bytes:
    """The manifest as it is kept, served and signed: its canonical JSON."""
    return canonical_json(build_manifest(root))


def parse_manifest(data: bytes) -> dict[str, Any]:
    """A manifest read strictly, its shape checked; ManifestError says what is wrong."""
    try:
        manifest = strict_loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"not a JSON manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError("not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
    for name in ("app", "version", "default_csp", "default_index"):
        if not isinstance(manifest.get(name), str):
            raise ManifestError(f"{name} is not a string")
    for name in _STRING_MAPS:
        value = manifest.get(name)
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ManifestError(f"{name} is not an object of strings")
    for name in _DIGEST_MAPS:
        bad = [key for key, value in manifest[name].items() if not is_sri(value)]
        if bad:
            raise ManifestError(f"{name}[{bad[0]!r}] is not a sha384- digest")
    if not all(path.startswith("/") for path in (*manifest["files"], *manifest["routes"])):
        raise ManifestError("a path in files or routes does not start with /")
    if not all(target in manifest["files"] for target in manifest["routes"].values()):
        raise ManifestError("a route names a file the manifest does not list")
    return manifest


def expected_headers(manifest: dict[str, Any]) -> dict[str, str]:
    """The security headers every response of the origin must carry, by name."""
    return {"Content-Security-Policy": manifest["default_csp"], **manifest["headers"]}


def acceptable_digests(manifest: dict[str, Any], path: str) -> set[str]:
    """The digests a document at ``path`` may have: its file's, or a link prefix's page; any
    notice page as well (a link that does not work, an address that names nothing, an outage)."""
    notices = set(manifest["notices"].values())
    if path in manifest["files"]:
        return {manifest["files"][path], *notices}
    for prefix, target in manifest["routes"].items():
        if path.startswith(prefix):
            return {manifest["files"][target], *notices}
    return notices


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two manifests, as short phrases (for a check that fails)."""
    out = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            out.append(f"{name}: {', '.join(changed)}")
        else:
            out.append(name)
    return out
