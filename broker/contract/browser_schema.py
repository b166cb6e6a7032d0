"""The schema of every message the broker sends, as an ES module for the browser client.

The page checks what it receives (web/js/wire_check.js) against the same definitions the Python
client decodes with: the JSON Schema of ``#/$defs/ServerMessage`` that ``messages`` makes from
broker/signaling/protocol.py, cut down to the definitions it reaches and to the keywords that
check something. The checker understands exactly ``KEYWORDS``: a schema that needs another one
stops the generation here, so the page can never silently check less than the schema says.
"""

from __future__ import annotations

import json
from typing import Any

from broker.contract.messages import SERVER_MESSAGE, message_components

#: The keywords web/js/wire_check.js applies. Teach it first, then add one here.
KEYWORDS = frozenset(
    {
        "$ref",
        "additionalProperties",
        "anyOf",
        "discriminator",
        "enum",
        "items",
        "maxLength",
        "maximum",
        "minLength",
        "minimum",
        "not",
        "oneOf",
        "pattern",
        "properties",
        "required",
        "type",
    }
)
#: Words for people and defaults the decoder fills in: dropped, they check nothing.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment"})
TYPES = frozenset({"array", "boolean", "integer", "null", "number", "object", "string"})
REF_PREFIX = "#/$defs/"

HEADER = """\
// Generated from broker/signaling/protocol.py by `python -m broker contract write docs/contract`: do not edit.
// The JSON Schema of every message the broker sends (docs/contract/messages.schema.json,
// #/$defs/ServerMessage), cut to what checks something; web/js/wire_check.js applies it.
"""


class UnknownKeyword(ValueError):
    """The schema uses a keyword web/js/wire_check.js does not apply."""


def _compact(node: Any, where: str) -> Any:
    """``node`` without annotations; every keyword left is one the checker applies."""
    if not isinstance(node, dict):
        raise UnknownKeyword(f"{where}: a schema must be an object, not {node!r}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ANNOTATIONS:
            continue
        if key not in KEYWORDS:
            raise UnknownKeyword(f"{where}: web/js/wire_check.js does not apply {key!r}: teach it first")
        if key == "properties":
            out[key] = {name: _compact(sub, f"{where}.{name}") for name, sub in value.items()}
        elif key in ("anyOf", "oneOf"):
            out[key] = [_compact(sub, f"{where}.{key}[{i}]") for i, sub in enumerate(value)]
        elif key in ("items", "not"):
            out[key] = _compact(value, f"{where}.{key}")
        elif key == "additionalProperties":
            out[key] = value if value is False else _compact(value, f"{where}.{key}")
        elif key == "type" and not (isinstance(value, str) and value in TYPES):
            raise UnknownKeyword(f"{where}: type {value!r} is not one web/js/wire_check.js knows")
        elif key == "$ref" and not str(value).startswith(REF_PREFIX):
            raise UnknownKeyword(f"{where}: only local references ({REF_PREFIX}...) are followed")
        else:
            out[key] = value
    return out


def _refs(node: Any) -> set[str]:
    """The definitions ``node`` names, however deep."""
    if isinstance(node, dict):
        found = set()
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.removeprefix(REF_PREFIX))
            elif key == "mapping" and isinstance(value, dict):
                found.update(str(ref).removeprefix(REF_PREFIX) for ref in value.values())
            else:
                found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    return set()


def server_definitions(components: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ServerMessage`` and every definition it reaches, compacted."""
    if components is None:
        _client, server, components = message_components(REF_PREFIX + "{name}")
        components = {**components, SERVER_MESSAGE: server}
    reached: dict[str, Any] = {}
    todo = [SERVER_MESSAGE]
    while todo:
        name = todo.pop()
        reached[name] = _compact(components[name], name)  # refuses a reference that is not local
        todo.extend(ref for ref in _refs(reached[name]) if ref not in reached and ref not in todo)
    return dict(sorted(reached.items()))


def browser_module(definitions: dict[str, Any] | None = None) -> str:
    """The text of web/js/wire_schema.js: one definition per line, so a change reads as one."""
    defs = server_definitions() if definitions is None else definitions
    lines = [
        f"  {json.dumps(name)}: {json.dumps(schema, sort_keys=True, separators=(',', ':'), ensure_ascii=True)},"
        for name, schema in defs.items()
    ]
    return (
        HEADER
        + f"\nexport const ROOT = {json.dumps(REF_PREFIX + SERVER_MESSAGE)};\n"
        + "\nexport const DEFS = {\n"
        + "\n".join(lines)
        + "\n};\n"
    )
