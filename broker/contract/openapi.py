"""The therapists' JSON API as an OpenAPI 3.1 document, from the routes http_routes.py reads.

Request bodies are the msgspec Structs the handlers decode; every refusal has the one shape
``{error, message, ...}`` (json_api.json_error), and each status lists the codes that route can
answer with it. Success bodies are described in words in docs/protocol.md section 15.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.contract.http_routes import ApiRoute
from broker.contract.messages import portable_schema
from broker.http.login_sessions import CSRF_HEADER, LOGIN_COOKIE
from broker.signaling import protocol

OPENAPI_VERSION = "3.1.0"
API_ERROR = "ApiError"
_REASONS = {
    400: "The request is not valid",
    401: "No login session (or the wrong credentials, at login)",
    403: "Refused: origin, CSRF token, or a proof of identity needed",
    404: "Not found",
    409: "Conflicts with the account's state",
    429: "Too many attempts or sessions",
    503: "The store cannot be reached: try again",
}
_LOGIN = {
    "none": "Needs no login session.",
    "partial": "Needs a login session, partial or full.",
    "full": "Needs a full login session.",
}


def _error_schema() -> dict[str, Any]:
    return {
        "title": API_ERROR,
        "description": "Every refusal of the API; some carry more fields (`retry_after`, `factors`, `passkey`).",
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "a stable code: branch on it"},
            "message": {"type": "string", "description": "a sentence for people"},
        },
    }


#: A success's schema per media type: a JSON object, or a stream of server-sent events (text).
_SUCCESS: dict[str, dict[str, Any]] = {
    "application/json": {"type": "object"},
    "text/event-stream": {"type": "string", "description": "server-sent events; docs/protocol.md 15.20"},
}


def _operation(route: ApiRoute) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "description": _LOGIN[route.login] + " See docs/protocol.md section 15.",
        "x-login-session": route.login,
        "responses": {
            "200": {"description": "Done", "content": {route.media_type: {"schema": _SUCCESS[route.media_type]}}},
            **{
                str(status): {
                    "description": _REASONS.get(status, "Refused"),
                    "content": {
                        "application/json": {
                            "schema": {
                                "allOf": [{"$ref": f"#/components/schemas/{API_ERROR}"}],
                                "properties": {"error": {"enum": sorted(codes)}},
                            }
                        }
                    },
                }
                for status, codes in route.errors.items()
            },
        },
    }
    if route.summary:
        operation["summary"] = route.summary
    if route.parameters:
        operation["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in route.parameters
        ]
    if route.body is not None:
        required = bool(msgspec.structs.fields(route.body)) and any(
            f.required for f in msgspec.structs.fields(route.body)
        )
        operation["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}},
        }
    if route.login == "none":
        operation["security"] = []
    elif route.method in ("GET", "HEAD"):
        operation["security"] = [{"loginCookie": []}]
    else:
        operation["security"] = [{"loginCookie": [], "csrfToken": []}]
    return operation


def openapi_document(routes: list[ApiRoute]) -> dict[str, Any]:
    bodies = sorted({r.body for r in routes if r.body is not None}, key=lambda b: b.__name__)
    _, schemas = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Teletherapy session broker: the therapists' JSON API",
            "version": str(protocol.PROTOCOL_VERSION),
            "description": (
                "The login page and the dashboard use this API; browser clients joining a session never do. "
                "Bodies are one JSON object (`Content-Type: application/json`), decoded strictly; state-changing "
                f"requests need an allowed `Origin` and, with a login session, the `{CSRF_HEADER}` header. A body "
                "over 256 KiB gets a plain-text 413, an unknown path a plain-text 404, a wrong method a plain-text "
                "405. Generated from the broker's routes and handlers by `broker contract write`; "
                "docs/protocol.md section 15 says what each route does and answers."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {**portable_schema(schemas), API_ERROR: _error_schema()},
            "securitySchemes": {
                "loginCookie": {"type": "apiKey", "in": "cookie", "name": LOGIN_COOKIE},
                "csrfToken": {"type": "apiKey", "in": "header", "name": CSRF_HEADER},
            },
        },
    }
