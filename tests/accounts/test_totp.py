"""TOTP enrolment, verification with replay protection, and one-time recovery codes."""

from __future__ import annotations

import base64
import re
import urllib.parse

from broker.accounts import totp

NOW = 1_800_000_015.0  # a fixed instant, 15 s into its 30 s step
KEY = b"k" * 32


def test_rfc6238_reference_vector() -> None:
    # RFC 6238 appendix B, SHA-1 seed, T = 59 s: 94287082 (8 digits) -> last 6 digits.
    assert totp.code_at(b"12345678901234567890", 59) == "287082"


def test_enrol_gives_uri_with_issuer_and_svg_qr() -> None:
    enrolment = totp.enrol("dr.rivera", "Harbour Counselling")
    assert len(enrolment.secret) == 20
    parsed = urllib.parse.urlparse(enrolment.uri)
    query = urllib.parse.parse_qs(parsed.query)
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert urllib.parse.unquote(parsed.path) == "/Harbour Counselling:dr.rivera"
    assert query["issuer"] == ["Harbour Counselling"]
    assert query["digits"] == ["6"] and query["period"] == ["30"] and query["algorithm"] == ["SHA1"]
    assert query["secret"] == [totp.secret_base32(enrolment.secret)]
    assert base64.b32decode(query["secret"][0]) == enrolment.secret
    assert enrolment.qr_svg.startswith("<svg") and enrolment.qr_svg.rstrip().endswith("</svg>")
    assert "<script" not in enrolment.qr_svg


def test_secrets_are_fresh() -> None:
    assert totp.new_secret() != totp.new_secret()


def test_current_code_is_accepted_and_step_returned() -> None:
    secret = totp.new_secret()
    step = totp.verify_code(secret, totp.code_at(secret, NOW), last_used_step=None, now=NOW)
    assert step == totp.step_at(NOW)


def test_one_step_of_drift_either_way_is_accepted() -> None:
    secret = totp.new_secret()
    earlier = totp.code_at(secret, NOW - 30)
    later = totp.code_at(secret, NOW + 30)
    assert totp.verify_code(secret, earlier, last_used_step=None, now=NOW) == totp.step_at(NOW) - 1
    assert totp.verify_code(secret, later, last_used_step=None, now=NOW) == totp.step_at(NOW) + 1


def test_two_steps_away_is_refused() -> None:
    secret = b"12345678901234567890"  # fixed, so the four codes below are known to differ
    stale = totp.code_at(secret, NOW - 60)
    assert stale not in {totp.code_at(secret, NOW + d) for d in (-30, 0, 30)}
    assert totp.verify_code(secret, stale, last_used_step=None, now=NOW) is None


def test_replay_of_the_same_step_is_refused() -> None:
    secret = totp.new_secret()
    code = totp.code_at(secret, NOW)
    step = totp.verify_code(secret, code, last_used_step=None, now=NOW)
    assert step is not None
    assert totp.verify_code(secret, code, last_used_step=step, now=NOW) is None
    assert totp.verify_code(secret, code, last_used_step=step, now=NOW + 20) is None
    # An older step's code is refused once a newer step was used.
    older = totp.code_at(secret, NOW - 30)
    assert totp.verify_code(secret, older, last_used_step=step, now=NOW) is None
    # The next step's code still works.
    nxt = totp.code_at(secret, NOW + 30)
    assert totp.verify_code(secret, nxt, last_used_step=step, now=NOW + 30) == step + 1


def test_malformed_codes_are_refused() -> None:
    secret = totp.new_secret()
    for bad in ("", "12345", "1234567", "abcdef", "12 34 5x"):
        assert totp.verify_code(secret, bad, last_used_step=None, now=NOW) is None


def test_code_with_spaces_is_accepted() -> None:
    secret = totp.new_secret()
    code = totp.code_at(secret, NOW)
    assert totp.verify_code(secret, f"{code[:3]} {code[3:]}", last_used_step=None, now=NOW) is not None


def test_ten_distinct_recovery_codes() -> None:
    codes = totp.new_recovery_codes()
    assert len(codes) == 10 == len(set(codes))
    assert all(re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){3}", c) for c in codes)
    assert all(totp.looks_like_recovery_code(c) for c in codes)
    assert not totp.looks_like_recovery_code("123456")


def test_recovery_hashes_do_not_contain_codes() -> None:
    codes = totp.new_recovery_codes()
    hashes = totp.hash_recovery_codes(codes, KEY)
    blob = "".join(hashes)
    for code in codes:
        assert code not in blob and code.replace("-", "") not in blob


def test_recovery_code_is_usable_once() -> None:
    codes = totp.new_recovery_codes()
    hashes = totp.hash_recovery_codes(codes, KEY)
    left = totp.use_recovery_code(codes[3], hashes, KEY)
    assert left is not None and len(left) == 9
    assert totp.use_recovery_code(codes[3], left, KEY) is None
    # The others still work.
    assert totp.use_recovery_code(codes[0], left, KEY) is not None


def test_recovery_code_input_is_forgiving_about_case_and_separators() -> None:
    codes = totp.new_recovery_codes()
    hashes = totp.hash_recovery_codes(codes, KEY)
    typed = codes[0].lower().replace("-", " ")
    assert totp.use_recovery_code(typed, hashes, KEY) is not None


def test_recovery_code_needs_the_server_key() -> None:
    codes = totp.new_recovery_codes()
    hashes = totp.hash_recovery_codes(codes, KEY)
    assert totp.use_recovery_code(codes[0], hashes, b"other key" * 4) is None
    assert totp.use_recovery_code("not a code", hashes, KEY) is None
