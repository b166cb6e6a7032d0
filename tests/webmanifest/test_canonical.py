"""Canonical JSON: the manifest's bytes depend on its content only (RFC 8785's rules for the values
a manifest holds), so a rebuild anywhere gives the same bytes and the same signature still holds."""

from __future__ import annotations

import json

import pytest

from broker.webmanifest.canonical import NotCanonical, canonical_json, strict_loads


def test_keys_are_sorted_and_there_is_no_whitespace() -> None:
    value = {"b": [1, {"z": None, "a": True}], "a": "x", "A": False}
    assert canonical_json(value) == b'{"A":false,"a":"x","b":[1,{"a":true,"z":null}]}'
    assert canonical_json(json.loads(canonical_json(value))) == canonical_json(value)


def test_keys_sort_by_utf16_code_units_as_rfc_8785_says() -> None:
    # U+FB01 sorts after U+1F600 by code point, before it by UTF-16 code unit (0xD83D < 0xFB01).
    assert canonical_json({"\ufb01": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb01":1}'.encode()


def test_strings_escape_only_quotes_backslashes_and_control_characters() -> None:
    assert canonical_json('é/€ "q" \\ \n\t\x01\x7f') == '"é/€ \\"q\\" \\\\ \\n\\t\\u0001\x7f"'.encode()


@pytest.mark.parametrize("value", [1.5, {"a": float("nan")}, "\ud800", {1: "a"}, {"a": object()}])
def test_a_value_without_a_canonical_form_is_refused(value: object) -> None:
    with pytest.raises(NotCanonical):
        canonical_json(value)


@pytest.mark.parametrize("text", [b'{"a":1,"a":2}', b'{"a":1.0}', b'{"a":NaN}', b"\xff"])
def test_reading_is_strict(text: bytes) -> None:
    with pytest.raises(ValueError):
        strict_loads(text)
