"""Subresource Integrity digests: one algorithm, SHA-384, for the pages' ``integrity`` attributes,
the import map, the CSP's hash of it and the manifest, so one value serves them all."""

from __future__ import annotations

import base64
import hashlib
import re

PREFIX = "sha384-"
_FORM = re.compile(r"sha384-[A-Za-z0-9+/]{64}")


def sri(data: bytes) -> str:
    """``sha384-`` and the standard base64 of the digest, as HTML's ``integrity`` attribute reads it."""
    return PREFIX + base64.b64encode(hashlib.sha384(data).digest()).decode("ascii")


def is_sri(value: object) -> bool:
    return isinstance(value, str) and _FORM.fullmatch(value) is not None
