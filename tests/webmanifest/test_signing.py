"""Ed25519 signatures of the manifest: a round trip, and what must not verify (a changed byte of the
manifest or of the signature, another key), keys made and read safely, nothing signed when stale."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.webmanifest.layout import MANIFEST_FILE, SIGNATURES_FILE
from broker.webmanifest.release import ReleaseError, sign_release, verify_release
from broker.webmanifest.signing import (
    SigningError,
    generate_key,
    load_private_key,
    parse_public_key,
    public_key_text,
    read_signatures,
    valid_signers,
)
from tests.webmanifest.web_copies import copy_web, flip_byte


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of web/ signed by a new key: (web root, public key, private key file)."""
    root = copy_web(tmp_path)
    public = generate_key(tmp_path / "practice.pem")
    assert sign_release(root, tmp_path / "practice.pem") == public
    return root, public, tmp_path / "practice.pem"


def test_sign_then_verify_round_trip(signed: tuple[Path, str, Path]) -> None:
    root, public, _ = signed
    assert verify_release(root, [public]) == [public]
    assert verify_release(root, None) == [public]


def test_one_changed_byte_of_the_manifest_fails_verification(signed: tuple[Path, str, Path]) -> None:
    root, public, _ = signed
    for offset in (0, 1000, (root / MANIFEST_FILE).stat().st_size - 2):
        manifest = root / MANIFEST_FILE
        original = manifest.read_bytes()
        flip_byte(manifest, offset)
        assert verify_release(root, [public]) == []
        manifest.write_bytes(original)
    assert verify_release(root, [public]) == [public]


def test_a_changed_signature_or_another_key_does_not_verify(signed: tuple[Path, str, Path], tmp_path: Path) -> None:
    root, public, _ = signed
    data = (root / MANIFEST_FILE).read_bytes()
    signatures = read_signatures(root / SIGNATURES_FILE)
    other = generate_key(tmp_path / "other.pem")
    assert valid_signers(data, signatures, [other]) == []
    assert valid_signers(data, {other: signatures[public]}) == []  # a signature listed under another key
    tampered = signatures[public][:-2] + ("A" if signatures[public][-2] != "A" else "B") + signatures[public][-1]
    assert valid_signers(data, {public: tampered}) == []


def test_nothing_is_signed_while_the_manifest_is_stale(signed: tuple[Path, str, Path]) -> None:
    root, public, key = signed
    flip_byte(root / "js" / "call.js")
    before = (root / SIGNATURES_FILE).read_bytes()
    with pytest.raises(ReleaseError, match="nothing was signed"):
        sign_release(root, key)
    assert (root / SIGNATURES_FILE).read_bytes() == before


def test_a_new_key_is_private_to_its_owner_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    public = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_text(load_private_key(path)) == public
    before = path.read_bytes()
    with pytest.raises(SigningError, match="exists already"):
        generate_key(path)
    assert path.read_bytes() == before


def test_a_public_key_is_read_as_text_pem_or_a_file(tmp_path: Path) -> None:
    public = generate_key(tmp_path / "k.pem")
    pem = (
        load_private_key(tmp_path / "k.pem").public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "k.pub").write_text(public + "\n")
    (tmp_path / "k.pub.pem").write_bytes(pem)
    for given in (public, pem.decode(), str(tmp_path / "k.pub"), str(tmp_path / "k.pub.pem")):
        assert public_key_text(parse_public_key(given)) == public
    for bad in ("", "not-a-key", public[:-1], str(tmp_path / "k.pem")):
        with pytest.raises(SigningError):
            parse_public_key(bad)


def test_a_key_file_that_is_not_an_ed25519_key_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "junk.pem")
    with pytest.raises(SigningError, match="cannot read the key"):
        load_private_key(tmp_path / "missing.pem")
