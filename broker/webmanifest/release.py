"""The signed release kept in a web root: build it (pins, manifest, the signatures still valid),
check it against the files, sign it, and verify it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from broker.webmanifest.catalogue_pins import PINS_MODULE, catalogue_pins_stale, pin_catalogues
from broker.webmanifest.layout import BUILD_COMMAND, MANIFEST_FILE, SIGNATURES_FILE
from broker.webmanifest.manifest import ManifestError, build_manifest, differences, manifest_bytes, parse_manifest
from broker.webmanifest.pins import pin_pages, stale_pages
from broker.webmanifest.signing import (
    SigningError,
    load_private_key,
    public_key_text,
    read_signatures,
    sign,
    valid_signers,
    write_signatures,
)


class ReleaseError(ValueError):
    """The release in a web root cannot be signed or verified as it is (the message says why)."""


@dataclass
class Built:
    """What ``build_release`` changed."""

    pages: list[str] = field(default_factory=list)
    manifest_changed: bool = False
    #: Signatures of the previous manifest, dropped as they no longer verify.
    dropped: list[str] = field(default_factory=list)


def build_release(root: Path) -> Built:
    """Pin the pages, write the manifest, keep only the signatures that still verify."""
    catalogues = [PINS_MODULE] if pin_catalogues(root) else []
    built = Built(pages=catalogues + pin_pages(root))
    data = manifest_bytes(root)
    path = root / MANIFEST_FILE
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        built.manifest_changed = True
    signatures_path = root / SIGNATURES_FILE
    signatures = read_signatures(signatures_path)
    good = set(valid_signers(data, signatures))
    built.dropped = sorted(set(signatures) - good)
    if built.dropped or not signatures_path.is_file():
        write_signatures(signatures_path, {k: v for k, v in signatures.items() if k in good})
    return built


def stale_release(root: Path) -> list[str]:
    """Why the release kept in ``root`` is not what a build would make now (empty: it is)."""
    problems = [f"{root / name}: its pins differ from the files it loads" for name in stale_pages(root)]
    if catalogue_pins_stale(root):
        problems.insert(0, f"{root / PINS_MODULE}: its pins differ from the catalogues in i18n/")
    path = root / MANIFEST_FILE
    fresh = manifest_bytes(root)
    if not path.is_file():
        problems.append(f"{path} is missing")
    elif path.read_bytes() != fresh:
        try:
            changed = "; ".join(differences(parse_manifest(path.read_bytes()), build_manifest(root)))
        except ManifestError as exc:
            changed = str(exc)
        problems.append(f"{path} differs from a fresh build ({changed or 'its bytes'})")
    else:
        signatures = read_signatures(root / SIGNATURES_FILE)
        bad = sorted(set(signatures) - set(valid_signers(fresh, signatures)))
        problems += [f"the signature by {key} does not verify" for key in bad]
    if problems:
        problems.append(
            f"to rebuild: `{BUILD_COMMAND}` from the repository root (for another web root add `--web {root}`),"
            " then sign again if this web root was signed"
        )
    return problems


def sign_release(root: Path, key_file: Path) -> str:
    """Add the signature by the key in ``key_file`` to the release in ``root``; its public key."""
    problems = stale_release(root)
    if problems:
        raise ReleaseError("the manifest is not current, so nothing was signed: " + "; ".join(problems))
    key = load_private_key(key_file)
    data = (root / MANIFEST_FILE).read_bytes()
    signatures = read_signatures(root / SIGNATURES_FILE)
    public = public_key_text(key)
    signatures[public] = sign(key, data)
    write_signatures(root / SIGNATURES_FILE, signatures)
    return public


def verify_release(root: Path, trusted: Iterable[str] | None) -> list[str]:
    """The keys (of ``trusted``, when given) whose signature of the kept manifest verifies."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ReleaseError(f"{path} is missing: run `{BUILD_COMMAND}`")
    try:
        return valid_signers(path.read_bytes(), read_signatures(root / SIGNATURES_FILE), trusted)
    except SigningError as exc:
        raise ReleaseError(str(exc)) from None
