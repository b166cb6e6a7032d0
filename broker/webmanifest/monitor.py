"""``broker verify-web URL``: an outside monitor of what a broker serves to browsers.

It fetches the signed manifest from the broker's well-known address, checks its signature with the
key(s) it was given (else the project's release keys; with none, it compares the manifest with the
one this installation ships), then fetches, as a browser would, every file the manifest lists and
every page a browser can reach without a login or a link (a link that does not work, an address
that names nothing), follows what each page and module loads, and compares each body and the
security headers of each response with the manifest. A broker that serves other code to everyone,
or to this monitor, is caught; one that serves it only to chosen people is not (docs/security.md 4).
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.webmanifest.fetcher import BrowserFetch, Fetched
from broker.webmanifest.integrity import sri
from broker.webmanifest.layout import MANIFEST_FILE, MANIFEST_URL, SIGNATURES_URL
from broker.webmanifest.manifest import (
    ManifestError,
    acceptable_digests,
    differences,
    expected_headers,
    parse_manifest,
)
from broker.webmanifest.references import PageRefs, module_imports
from broker.webmanifest.release_keys import PROJECT_KEYS
from broker.webmanifest.signing import SigningError, parse_signatures, valid_signers

log = logging.getLogger("broker.verify_web")

_KINDS = {".html": "document", ".js": "script", ".css": "style", ".json": "json"}


@dataclass
class Finding:
    """One difference between what the broker serves and what the manifest says."""

    path: str
    what: str

    def __str__(self) -> str:
        return f"DIFF {self.path}: {self.what}"


@dataclass
class Report:
    #: What the broker was compared with (the signers' keys, or this installation's manifest).
    reference: str = ""
    findings: list[Finding] = field(default_factory=list)
    #: Paths fetched and compared.
    checked: list[str] = field(default_factory=list)
    #: Paths the monitor cannot reach as a browser without a login (each with why).
    not_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.reference) and not self.findings


class _Run:
    def __init__(self, fetch: BrowserFetch, manifest: dict[str, Any], report: Report) -> None:
        self.fetch = fetch
        self.manifest = manifest
        self.report = report
        self.origin = urlsplit(fetch.base_url)
        self.seen: dict[str, Fetched] = {}
        self.headers = expected_headers(manifest)
        self.header_differences: dict[tuple[str, str], list[str]] = defaultdict(list)

    def differ(self, path: str, what: str) -> None:
        self.report.findings.append(Finding(path, what))

    async def get(self, path: str, kind: str) -> Fetched:
        if path not in self.seen:
            fetched = await self.fetch.get(path, kind)
            self.seen[path] = fetched
            self.report.checked.append(path)
            self.check_headers(path, fetched)
        return self.seen[path]

    def check_headers(self, path: str, fetched: Fetched) -> None:
        for name, value in self.headers.items():
            served = fetched.headers.get(name.lower(), [])
            if served != [value]:
                shown = " | ".join(served) if served else "missing"
                self.header_differences[(name, shown)].append(path)

    async def check_file(self, path: str) -> None:
        kind = "document" if not path.startswith("/static/") else _KINDS.get(Path(path).suffix, "image")
        fetched = await self.get(path, kind)
        expected = self.manifest["files"][path]
        if fetched.location is not None:
            target = fetched.location
            if kind == "document" and target.startswith("/") and not target.startswith("//"):
                if target in self.manifest["files"]:
                    self.report.not_checked.append(f"{path} (answers {fetched.status} to {target} without a login)")
                    return
            self.differ(path, f"redirects ({fetched.status}) to {target}")
            return
        if fetched.status != 200:
            self.differ(path, f"answered status {fetched.status}, not the file")
            return
        if sri(fetched.body) != expected:
            self.differ(path, f"served {sri(fetched.body)} ({len(fetched.body)} bytes), the manifest says {expected}")
        await self.follow(path, kind, fetched)

    async def follow(self, path: str, kind: str, fetched: Fetched) -> None:
        """What the file makes a browser load: each one must be a file of the manifest."""
        text = fetched.body.decode("utf-8", errors="replace")
        loads: list[tuple[str, str]] = []
        if kind == "document":
            refs = PageRefs(fetched.url, text)
            loads = refs.loads + [("script", url) for url in refs.import_map_integrity]
            for url in refs.unpinned:
                self.differ(path, f"loads the script {url} without integrity")
            for script_type, _ in refs.inline_scripts:
                if script_type != "importmap":
                    self.differ(path, f"has an inline script (type {script_type or 'classic'!r})")
        elif kind == "script":
            loads = [("script", url) for url in module_imports(fetched.url, text)]
        for load_kind, url in loads:
            parts = urlsplit(url)
            if (parts.scheme, parts.netloc) != (self.origin.scheme, self.origin.netloc):
                if parts.scheme not in ("data", "blob"):
                    self.differ(path, f"loads {url} from another origin")
                continue
            if parts.path not in self.manifest["files"]:
                self.differ(path, f"loads {parts.path}, which the manifest does not list")
                await self.get(parts.path, load_kind)

    async def check_document(self, path: str, why: str) -> None:
        """A page the manifest lists by prefix or as a notice: its body must be one of those."""
        fetched = await self.get(path, "document")
        if fetched.location is not None:
            self.differ(path, f"redirects ({fetched.status}) to {fetched.location}")
            return
        if sri(fetched.body) not in acceptable_digests(self.manifest, path):
            self.differ(path, f"{why}: served {sri(fetched.body)}, which is no page the manifest lists here")
            return
        await self.follow(path, "document", fetched)

    def report_headers(self) -> None:
        for (name, shown), paths in sorted(self.header_differences.items()):
            where = paths[0] if len(paths) == 1 else f"{len(paths)} responses, e.g. {paths[0]}"
            self.differ(where, f"header {name} is {shown!r}, the manifest says {self.headers[name]!r}")


async def _reference(
    fetch: BrowserFetch, keys: Sequence[str], local_root: Path | None, report: Report
) -> dict[str, Any] | None:
    """The manifest to compare with: the served one once a trusted key's signature verifies, or,
    with no key at all, the one this installation ships (the served one must be the same)."""
    served = await fetch.get(MANIFEST_URL, "json")
    if served.status != 200:
        report.findings.append(Finding(MANIFEST_URL, f"no manifest served (status {served.status})"))
        return None
    trusted = list(keys) or list(PROJECT_KEYS)
    if trusted:
        signatures = await fetch.get(SIGNATURES_URL, "json")
        try:
            given = parse_signatures(signatures.body) if signatures.status == 200 else {}
            signers = valid_signers(served.body, given, trusted)
        except SigningError as exc:
            report.findings.append(Finding(SIGNATURES_URL, str(exc)))
            return None
        if not signers:
            report.findings.append(Finding(MANIFEST_URL, "carries no valid signature by the key(s) given"))
            return None
        report.reference = "the manifest signed by " + ", ".join(signers)
        body = served.body
    else:
        if local_root is None or not (local_root / MANIFEST_FILE).is_file():
            report.findings.append(Finding(MANIFEST_URL, "no key given and no manifest in this installation"))
            return None
        body = (local_root / MANIFEST_FILE).read_bytes()
        report.reference = f"the manifest this installation ships ({local_root / MANIFEST_FILE}, unsigned)"
        if served.body != body:
            try:
                changed = "; ".join(differences(parse_manifest(body), parse_manifest(served.body)))
            except ManifestError as exc:
                changed = str(exc)
            report.findings.append(Finding(MANIFEST_URL, f"differs from this installation's ({changed})"))
    try:
        return parse_manifest(body)
    except ManifestError as exc:
        report.findings.append(Finding(MANIFEST_URL, str(exc)))
        return None


async def verify_web(
    base_url: str,
    *,
    keys: Sequence[str] = (),
    local_root: Path | None = None,
    pages: Sequence[str] = (),
    timeout_s: float = 15.0,
) -> Report:
    """Compare what the broker at ``base_url`` serves with its manifest (see the module's docstring)."""
    report = Report()
    async with BrowserFetch(base_url, timeout_s) as fetch:
        manifest = await _reference(fetch, keys, local_root, report)
        if manifest is None:
            report.reference = ""
            return report
        run = _Run(fetch, manifest, report)
        for path in sorted(manifest["files"]):
            await run.check_file(path)
        for prefix in sorted(manifest["routes"]):
            await run.check_document(prefix + secrets.token_urlsafe(51), "a link that does not work")
        await run.check_document("/" + secrets.token_hex(8), "an address that names nothing")
        for path in pages:
            await run.check_document(path, "a page asked for with --page")
        run.report_headers()
    return report
