"""JSON Schema of every signaling message, made from the msgspec Structs in broker/signaling/protocol.py.

msgspec writes the fields, their types and limits (lengths, ranges, patterns) and the ``type`` tag
of each message. Two things are added here so that the schema says what the decoder enforces:

- Patterns are written for Python's ``re`` and end in ``\\Z`` (``$`` there also matches before a
  final newline). JSON Schema patterns are ECMA-262, where ``\\Z`` is not an anchor and ``$``
  without the multiline flag means the end of the input: the schema gets ``$``.
- Offers, answers and candidates come in two forms (in clear or sealed, ``message_forms``),
  checked in ``__post_init__`` where msgspec cannot see them: the schema gets a ``oneOf``.
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec

from broker.signaling import protocol

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: The two unions, named as the schema's definitions name them.
CLIENT_MESSAGE = "ClientMessage"
SERVER_MESSAGE = "ServerMessage"


def portable_pattern(pattern: str) -> str:
    r"""A pattern for ``re`` anchored with ``\Z`` as ECMA-262 writes it (``$``, end of input)."""
    if "\\Z" in pattern[:-2]:
        raise ValueError(f"\\Z is only understood at the end of a pattern: {pattern!r}")
    return pattern[:-2] + "$" if pattern.endswith("\\Z") else pattern


def portable_schema(node: Any) -> Any:
    """A schema with every pattern written as ECMA-262 reads it."""
    if isinstance(node, dict):
        return {
            key: portable_pattern(value) if key == "pattern" and isinstance(value, str) else portable_schema(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [portable_schema(item) for item in node]
    return node


def _forms_schema(struct: type[msgspec.Struct]) -> list[dict[str, Any]]:
    """One subschema per form: its fields present and not null, the forbidden ones absent or null."""
    out = []
    for form in protocol.message_forms(struct):
        properties: dict[str, Any] = {name: {"not": {"type": "null"}} for name in sorted(form.required)}
        properties.update({name: {"type": "null"} for name in sorted(form.forbidden)})
        out.append({"title": form.name, "required": sorted(form.required), "properties": properties})
    return out


def wire_types() -> list[type[msgspec.Struct]]:
    """Every message type once, client messages first, in the order protocol.py lists them."""
    seen: dict[type[msgspec.Struct], None] = {}
    for union in (protocol.ClientMessage, protocol.ServerMessage):
        seen.update(dict.fromkeys(get_args(union)))
    return list(seen)


def message_components(ref_template: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The client union, the server union and every named schema they use, with refs written by
    ``ref_template`` (``"#/$defs/{name}"``, ``"#/components/schemas/{name}"``)."""
    (client, server), components = msgspec.json.schema_components(
        [protocol.ClientMessage, protocol.ServerMessage], ref_template=ref_template
    )
    for struct in wire_types():
        forms = _forms_schema(struct)
        if forms:
            components[struct.__name__]["oneOf"] = forms
    return portable_schema(client), portable_schema(server), portable_schema(components)


def wire_name(struct: type[msgspec.Struct]) -> str:
    """A message's ``type`` on the wire."""
    return str(struct.__struct_config__.tag)


def messages_schema() -> dict[str, Any]:
    """One JSON Schema (2020-12) for every frame: ``#/$defs/ClientMessage`` for what a peer sends,
    ``#/$defs/ServerMessage`` for what the broker sends, one definition per message and object."""
    client, server, components = message_components("#/$defs/{name}")
    defs = {**components, CLIENT_MESSAGE: client, SERVER_MESSAGE: server}
    defs[CLIENT_MESSAGE]["description"] = "A message from a peer to the broker (docs/protocol.md 5 and 6)."
    defs[SERVER_MESSAGE]["description"] = "A message from the broker to a peer (docs/protocol.md 6 and 10)."
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": f"Signaling protocol {protocol.PROTOCOL_VERSION}: every WebSocket message",
        "description": (
            "Each WebSocket text frame is one JSON object whose `type` names the message, at most "
            f"{protocol.MAX_MESSAGE_BYTES} bytes. Generated from broker/signaling/protocol.py by "
            "`broker contract write`; docs/protocol.md says what each message and field means."
        ),
        "anyOf": [{"$ref": f"#/$defs/{CLIENT_MESSAGE}"}, {"$ref": f"#/$defs/{SERVER_MESSAGE}"}],
        "$defs": defs,
    }
