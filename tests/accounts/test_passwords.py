"""Password policy (NIST SP 800-63B-4) and scrypt hash format."""

from __future__ import annotations

import base64
import unicodedata
from importlib import resources

import pytest

from broker.accounts import passwords
from broker.accounts.passwords import (
    MAX_LENGTH,
    MIN_LENGTH_SINGLE_FACTOR,
    MIN_LENGTH_WITH_SECOND_FACTOR,
    PasswordRejected,
    ScryptParams,
    check_password,
    hash_password,
    needs_rehash,
    verify_password,
)

# Cheap cost for tests that are about the format, not the strength.
CHEAP = ScryptParams(n=2**10, r=8, p=1)
# Random-looking letters that match no blocklist pattern; sliced to any length.
FILLER = "tqvmzkrwjphxbnlcgfdsyeoaiu" * 6


def test_single_factor_minimum_is_15() -> None:
    assert MIN_LENGTH_SINGLE_FACTOR == 15
    with pytest.raises(PasswordRejected, match="at least 15"):
        check_password(FILLER[:14])
    assert check_password(FILLER[:15]) == FILLER[:15]


def test_second_factor_minimum_is_8() -> None:
    assert MIN_LENGTH_WITH_SECOND_FACTOR == 8
    with pytest.raises(PasswordRejected, match="at least 8"):
        check_password(FILLER[:7], second_factor=True)
    assert check_password(FILLER[:8], second_factor=True) == FILLER[:8]


def test_maximum_is_128_code_points() -> None:
    assert MAX_LENGTH == 128
    assert check_password(FILLER[:128]) == FILLER[:128]
    with pytest.raises(PasswordRejected, match="at most 128"):
        check_password(FILLER[:129])


def test_length_counts_code_points_after_nfkc() -> None:
    decomposed = "e\u0301" * 8 + FILLER[:7]  # 8 accented e's written as two code points each
    assert len(decomposed) == 23
    assert len(check_password(decomposed)) == 15
    with pytest.raises(PasswordRejected, match="it has 14"):
        check_password("e\u0301" * 7 + FILLER[:7])
    # Non-ASCII characters count one each; nothing is truncated.
    assert check_password("ĉŝĝĥĵŭ" * 3) == "ĉŝĝĥĵŭ" * 3


def test_no_composition_rules() -> None:
    for candidate in (
        "all lowercase words here",
        "739184620571936",
        "ЖЩФЫВАПРОЛДЯЧСМ",
        "🦊🐢🌵🪁🧭🎻🛶🍋🪴🧩🦉🌋🎈🪐🛸",
    ):
        assert check_password(candidate) == unicodedata.normalize("NFKC", candidate)


def test_blocklist_is_shipped_and_lowercase() -> None:
    text = resources.files("broker.accounts").joinpath("common_passwords.txt").read_text("utf-8")
    entries = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert 1000 <= len(entries) <= 10000
    assert all(e == e.lower() for e in entries)
    assert "passwordpassword" in passwords.blocklist()


@pytest.mark.parametrize(
    "common",
    ["passwordpassword", "PassWordPassWord", "qwertyuiopasdfghjkl", "correcthorsebatterystaple", "IloveyouIloveyou"],
)
def test_blocklisted_passwords_are_rejected_case_insensitively(common: str) -> None:
    with pytest.raises(PasswordRejected, match="too common"):
        check_password(common)


def test_blocklisted_word_with_short_decoration_is_rejected() -> None:
    with pytest.raises(PasswordRejected, match="too common"):
        check_password("Password2024!", second_factor=True)
    with pytest.raises(PasswordRejected, match="too common"):
        check_password("!!Sunshine99", second_factor=True)


def test_repeated_short_unit_is_rejected() -> None:
    with pytest.raises(PasswordRejected, match="repeated"):
        check_password("xk7@" * 4)
    with pytest.raises(PasswordRejected, match="repeated"):
        check_password("z" * 17)


def test_password_containing_username_is_rejected() -> None:
    with pytest.raises(PasswordRejected, match="login name"):
        check_password(f"zz{FILLER[:10]}Jane.Doe{FILLER[:4]}", username="jane.doe")
    assert check_password(FILLER[:16], username="jane.doe") == FILLER[:16]


def test_username_check_is_case_insensitive_and_ignores_tiny_names() -> None:
    with pytest.raises(PasswordRejected, match="login name"):
        check_password("qvmzkr" + "DRJONES", username="drjones", second_factor=True)
    assert check_password("ab" + FILLER[:14], username="ab")


def test_control_characters_are_rejected() -> None:
    with pytest.raises(PasswordRejected, match="control character"):
        check_password(FILLER[:10] + "\x00" + FILLER[10:16])


def test_rejection_reason_is_a_sentence_for_the_user() -> None:
    with pytest.raises(PasswordRejected) as info:
        check_password("short")
    assert info.value.reason == str(info.value)
    assert info.value.reason.endswith(".")


def test_hash_format_stores_parameters_and_salt() -> None:
    encoded = hash_password(FILLER[:16], CHEAP)
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "1024", "8", "1")
    assert len(base64.urlsafe_b64decode(salt + "==")) == 16
    assert len(base64.urlsafe_b64decode(digest + "=")) == 32
    assert FILLER[:16] not in encoded


def test_salt_is_per_hash() -> None:
    assert hash_password(FILLER[:16], CHEAP) != hash_password(FILLER[:16], CHEAP)


def test_verify_accepts_right_and_refuses_wrong() -> None:
    encoded = hash_password(FILLER[:16], CHEAP)
    assert verify_password(FILLER[:16], encoded)
    assert not verify_password(FILLER[:15], encoded)
    assert not verify_password(FILLER[:16].upper(), encoded)


def test_verify_uses_nfkc_so_equivalent_input_matches() -> None:
    composed = "caf\u00e9 " + FILLER[:12]
    decomposed = "cafe\u0301 " + FILLER[:12]
    assert verify_password(decomposed, hash_password(composed, CHEAP))


def test_verify_refuses_absurdly_long_input() -> None:
    encoded = hash_password(FILLER[:16], CHEAP)
    assert not verify_password("x" * 100_000, encoded)


def test_malformed_hash_raises() -> None:
    for bad in (
        "",
        "bcrypt$1$2$3$a$b",
        "scrypt$1000$8$1$c2FsdA$aGFzaA",
        "scrypt$1024$8$1$$",
        "scrypt$2097152$8$1$c2FsdA$aGFzaA",
    ):
        with pytest.raises(ValueError):
            verify_password("anything", bad)


def test_needs_rehash_when_cost_is_raised() -> None:
    cheap = hash_password(FILLER[:16], CHEAP)
    assert needs_rehash(cheap)  # against the default cost
    assert not needs_rehash(cheap, CHEAP)
    assert needs_rehash(cheap, ScryptParams(n=2**10, r=16, p=1))
    assert needs_rehash("not a hash")


def test_default_cost_hash_round_trips() -> None:
    encoded = hash_password(FILLER[:16])
    assert encoded.startswith(f"scrypt${passwords.DEFAULT_PARAMS.n}$")
    assert not needs_rehash(encoded)
    assert verify_password(FILLER[:16], encoded)


def test_scrypt_params_are_validated() -> None:
    for bad in ({"n": 1000}, {"n": 2**21}, {"r": 0}, {"p": 0}):
        with pytest.raises(ValueError):
            ScryptParams(**bad)
