"""The Python client's reading of its peers' data-channel messages (broker/client/peers.py)."""

from __future__ import annotations

import pytest

from broker.client.peers import nesting


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('{"t": "chat", "text": "hello"}', 1),
        ('{"t": "board", "op": "stroke", "pts": [1, 2, 3]}', 2),
        ('{"t": "chat", "text": "[[[[[[[[ {{{{ ]]"}', 1),  # brackets in a string are text
        ('{"t": "chat", "text": "a \\" [[[[ quote"}', 1),  # an escaped quote does not end the string
        ('{"t": "chat", "text": "\\\\"}', 1),  # an escaped backslash before the closing quote
        ("[" * 8000, 8000),
        ("", 0),
    ],
)
def test_nesting_counts_brackets_outside_strings_only(text: str, depth: int) -> None:
    assert nesting(text) == depth
