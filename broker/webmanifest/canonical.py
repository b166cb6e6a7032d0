"""Canonical JSON: one byte string per value, so that building the manifest twice from the same
files gives the same bytes, and anyone can rebuild it and compare.

The rules are RFC 8785's (JSON Canonicalization Scheme) for the values a manifest holds: objects
with keys sorted by their UTF-16 code units, no whitespace, strings in UTF-8 with only ``"``, ``\\``
and control characters escaped (``\\b \\t \\n \\f \\r``, else ``\\u00xx``), integers in decimal.
Floating-point numbers have no place in a manifest and are refused, as are lone surrogates.
"""

from __future__ import annotations

import json
from typing import Any


class NotCanonical(ValueError):
    """A value with no canonical form here (a float, a lone surrogate, a key that is not a string)."""


def canonical_json(value: Any) -> bytes:
    return "".join(_parts(value)).encode("utf-8", errors="strict")


def _parts(value: Any) -> list[str]:
    if value is None or isinstance(value, bool):
        return [json.dumps(value)]
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, str):
        return [_string(value)]
    if isinstance(value, (list, tuple)):
        out = ["["]
        for i, item in enumerate(value):
            if i:
                out.append(",")
            out.extend(_parts(item))
        return [*out, "]"]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise NotCanonical("an object key is not a string")
        out = ["{"]
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be", errors="surrogatepass"))):
            if i:
                out.append(",")
            out.extend([_string(key), ":", *_parts(value[key])])
        return [*out, "}"]
    raise NotCanonical(f"{type(value).__name__} has no canonical form in a manifest")


def _string(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NotCanonical("a string holds a lone surrogate") from None
    return json.dumps(text, ensure_ascii=False)


def strict_loads(data: bytes) -> Any:
    """JSON read strictly: UTF-8, no duplicate key, no float, NaN or Infinity (ValueError otherwise)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, item in items:
            if key in obj:
                raise ValueError(f"the key {key!r} appears twice")
            obj[key] = item
        return obj

    def no_float(text: str) -> Any:
        raise ValueError(f"a number that is not an integer ({text})")

    return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_float=no_float, parse_constant=no_float)
