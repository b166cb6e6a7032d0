"""docs/protocol.md cannot drift from broker/protocol.py: same messages, same fields, same error codes."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from broker import protocol

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
COMMON_CLIENT_FIELDS = {"id"}


def sections() -> dict[str, str]:
    """Top-level ``## N. Title`` sections by title."""
    parts = re.split(r"^## \d+\. (.+)$", DOC, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def first_column(table_text: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z_]+)` \|", table_text, flags=re.M))


def documented_messages(section: str) -> dict[str, set[str]]:
    """Message name -> fields, from ``### `name``` headings and the first table under each."""
    body = sections()[section]
    chunks = re.split(r"^### `([a-z_]+)`$", body, flags=re.M)
    out = {}
    for i in range(1, len(chunks), 2):
        text = re.split(r"^.*\(object `", chunks[i + 1], flags=re.M)[0]
        out[chunks[i]] = first_column(text)
    return out


def documented_objects() -> dict[str, set[str]]:
    found = re.findall(r"\(object `(\w+)`\):\s*\n\n(\|.*?)(?:\n\n|\Z)", DOC, flags=re.S)
    return {name: first_column(table) for name, table in found}


def wire_fields(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}


RELAYED = {t.__struct_config__.tag for t in protocol.RELAYED}


def test_every_client_message_is_documented_with_its_fields() -> None:
    documented = documented_messages("Messages from a peer to the broker") | documented_messages(
        "Relayed between peers"
    )
    types = protocol.client_message_types()
    assert set(documented) == set(types)
    for name, struct in types.items():
        assert documented[name] | COMMON_CLIENT_FIELDS == wire_fields(struct), name


def test_every_broker_message_is_documented_with_its_fields() -> None:
    documented = documented_messages("Messages from the broker")
    relayed = documented_messages("Relayed between peers")
    types = protocol.server_message_types()
    assert set(documented) | RELAYED == set(types)
    assert set(relayed) == RELAYED
    for name, struct in types.items():
        if name in RELAYED:
            continue
        assert documented[name] == wire_fields(struct), name


@pytest.mark.parametrize("struct", [protocol.WaitingEntry, protocol.PeerInfo])
def test_nested_objects_are_documented(struct: type[msgspec.Struct]) -> None:
    assert documented_objects()[struct.__name__] == wire_fields(struct)


def test_every_error_code_is_documented_and_nothing_else() -> None:
    table = sections()["Error codes"]
    assert first_column(table) == {code.value for code in protocol.ErrorCode}


def test_the_documented_frame_limit_is_the_real_one() -> None:
    assert f"{protocol.MAX_MESSAGE_BYTES:,} bytes" in DOC


def test_the_parser_sees_a_missing_field() -> None:
    """Guards the guard: a table without a field really is caught."""
    text = "### `hello`\n\n| field | type |\n|---|---|\n| `protocol` | integer |\n"
    chunks = re.split(r"^### `([a-z_]+)`$", text, flags=re.M)
    assert first_column(chunks[2]) == {"protocol"} != wire_fields(protocol.Hello) - COMMON_CLIENT_FIELDS
