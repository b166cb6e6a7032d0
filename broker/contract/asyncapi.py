"""The signaling WebSocket as an AsyncAPI 3.0 document: one channel (``/ws``), one message per
``type``, and an operation per message and direction, described as the broker sees them: it
*receives* what peers send and *sends* what peers receive (relayed messages go both ways).

The payloads are the schemas of broker/contract/messages.py, under ``components/schemas``;
``ErrorCode`` there is the enum of every error code.
"""

from __future__ import annotations

import inspect
from typing import Any, get_args

import msgspec

from broker.contract.messages import message_components, wire_name
from broker.signaling import protocol

ASYNCAPI_VERSION = "3.0.0"
CHANNEL = "signaling"


def _summary(struct: type[msgspec.Struct]) -> str:
    """The first paragraph of the message's docstring, or of the nearest protocol class it extends
    (``Offer`` says what it is in ``_Description``); never msgspec's own."""
    for cls in struct.__mro__:
        if cls.__module__ == protocol.__name__ and cls.__doc__:
            return " ".join(inspect.cleandoc(cls.__doc__).split("\n\n")[0].split())
    return ""


def _message(struct: type[msgspec.Struct]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": wire_name(struct),
        "title": struct.__name__,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{struct.__name__}"},
    }
    if summary := _summary(struct):
        message["summary"] = summary
    return message


def _operation(action: str, struct: type[msgspec.Struct]) -> dict[str, Any]:
    name = wire_name(struct)
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{CHANNEL}"},
        "messages": [{"$ref": f"#/channels/{CHANNEL}/messages/{name}"}],
        "summary": f"The broker {action}s `{name}`.",
    }


def asyncapi_document() -> dict[str, Any]:
    _client, _server, schemas = message_components("#/components/schemas/{name}")
    client = get_args(protocol.ClientMessage)
    server = get_args(protocol.ServerMessage)
    structs = {wire_name(s): s for s in (*client, *server)}
    operations = {f"receive_{wire_name(s)}": _operation("receive", s) for s in client}
    operations.update({f"send_{wire_name(s)}": _operation("send", s) for s in server})
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Teletherapy session broker: signaling",
            "version": str(protocol.PROTOCOL_VERSION),
            "description": (
                f"Signaling protocol version {protocol.PROTOCOL_VERSION}. Every WebSocket text frame is one JSON "
                f"object whose `type` names the message, at most {protocol.MAX_MESSAGE_BYTES} bytes. docs/protocol.md "
                "is the contract in words (phases, roles, relaying, end-to-end authentication, close codes); this "
                "document is generated from broker/signaling/protocol.py by `broker contract write`."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "{host}",
                "protocol": "wss",
                "description": "The broker's public address (ws:// only on loopback, for development).",
                "variables": {"host": {"default": "localhost:8080", "description": "host[:port] of the broker"}},
            }
        },
        "channels": {
            CHANNEL: {
                "address": "/ws",
                "title": "The signaling socket",
                "description": (
                    "One WebSocket per peer. Send `hello` first, then `join` with an invite token; "
                    "errors answer with `error` (its `code` is one of ErrorCode)."
                ),
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in structs},
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "headers": {
                            "type": "object",
                            "required": ["Origin"],
                            "properties": {
                                "Origin": {"type": "string", "description": "one of the broker's allowed origins"}
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            }
        },
        "operations": operations,
        "components": {
            "messages": {name: _message(struct) for name, struct in structs.items()},
            "schemas": schemas,
        },
    }
