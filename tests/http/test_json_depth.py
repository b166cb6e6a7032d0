"""The nesting check in front of every JSON body of the HTTP API (broker/http/json_depth.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.http.json_depth import MAX_DEPTH, too_deep

# Strings full of what the check must not mistake for structure.
_TRICKY = st.text(alphabet='[]{}"\\ab\u00e9\n', max_size=12)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
    max_leaves=60,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@given(_VALUES, st.integers(min_value=0, max_value=8), st.booleans())
@settings(max_examples=400)
def test_the_check_agrees_with_a_real_parse(value: Any, limit: int, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert too_deep(raw, limit) == (depth(value) > limit)


def test_the_limit_and_the_edges() -> None:
    assert not too_deep(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert too_deep(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert too_deep(b'{"a":' * 2000 + b"1" + b"}" * 2000)
    assert not too_deep(json.dumps({"password": "[{" * 5000}).encode())
    assert not too_deep(json.dumps({"password": '\\"[' * 5000}).encode())
    assert not too_deep(b'{"a": "unterminated ' + b"[" * 100)  # a decoder refuses it anyway
    assert not too_deep(b"") and not too_deep(b"{}")


def test_bodies_as_large_as_the_api_accepts_are_handled() -> None:
    """256 KiB of the worst shapes for a string scanner (escaped quotes without end, many tiny
    strings) and for the bracket count."""
    size = 256 * 1024
    assert not too_deep(b'"' + b'\\"' * (size // 2))
    assert too_deep(b"[" * size)
    assert not too_deep(b"[" + b'"",' * (size // 3) + b'""]')
    assert not too_deep(b"[" + b"[]," * (size // 3) + b"[]]")
    assert too_deep(b'""' * (size // 2) + b"[" * (MAX_DEPTH + 1))
