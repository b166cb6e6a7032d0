"""The JSON API's common shapes: a strict body reader and one form of every refusal.

Every JSON body of the HTTP API (login, second factors, dashboard) is read here, so the limits on
a body (size of its strings, depth of its nesting) hold everywhere at once.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from broker.http.json_depth import MAX_DEPTH, too_deep

Secret = Annotated[str, msgspec.Meta(max_length=1024)]
Code = Annotated[str, msgspec.Meta(max_length=64)]


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass


def json_error(status: int, error: str, message: str, **extra: Any) -> web.Response:
    """The one shape of every API refusal: a stable code and a sentence for people."""
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra["retry_after"])
    return web.json_response({"error": error, "message": message, **extra}, status=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def read_json(request: web.Request, kind: type[Any]) -> Any:
    """Decode a JSON body strictly; anything else is a BadRequest with a plain message.

    Every JSON body of the API comes through here, so here is where nesting is bounded: a decoder
    recursing a thousand levels into a ``dict[str, Any]`` field (a passkey) would otherwise end in
    RecursionError and a 500.
    """
    if request.content_type != "application/json":
        raise BadRequest("Send the request as application/json.")
    raw = await request.read()
    if too_deep(raw):
        raise BadRequest(f"The request nests objects or arrays too deeply (at most {MAX_DEPTH} levels).")
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"The request is not valid: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    except RecursionError:  # not reachable past too_deep; kept so that no body can ever cause a 500
        raise BadRequest("The request nests objects or arrays too deeply.") from None
