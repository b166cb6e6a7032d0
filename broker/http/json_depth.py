"""How deeply a JSON text nests, found without parsing it.

Decoders recurse once per level of nesting: msgspec (and Python's json, which the ``webauthn``
package uses) raise RecursionError around a thousand levels, which an HTTP body of a few KiB
reaches. The API's bodies need a handful of levels (a WebAuthn credential inside a request body is
five deep at most, with client extension results), so anything deeper than ``MAX_DEPTH`` is
refused before any decoder sees it.

The check is linear in the text and runs in C for all but the last step: string literals are cut
out with one regular expression (possessive quantifiers, so no backtracking), the remaining
brackets are turned into +1/-1 steps, and the deepest running sum is the depth. An unterminated
string runs to the end of the text, as a decoder would reject it there anyway.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

#: Deepest nesting of objects and arrays any API body may have (the body itself is level 1).
MAX_DEPTH = 32

_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when ``raw`` nests objects and arrays more than ``limit`` levels deep (brackets inside
    strings do not count). Invalid JSON may be called too deep; it is refused either way."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot be deeper than the number of brackets it opens
    steps = array("b", _STRING.sub(b"", raw).translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0) > limit
