"""The therapists' JSON API as the aiohttp application serves it: its routes, and per route the
request body, the login it needs and the errors it can answer, read from the handlers' code.

Nothing here is a list to keep up by hand: the routes come from the application's router, and
each handler's source (and that of the broker.http functions it calls) is read with ``ast``:
``read_json(request, Struct)`` names the body, ``require_login(request, allow_partial=True)``
the login, every ``json_error(status, "code", ...)`` an answer. The one refusal whose code is
not written out in the call is listed in ``COMPUTED_ERRORS``; another one is an error here, so a
new route or a new refusal cannot be left out of the contract.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import tempfile
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
from aiohttp import web

from broker.config import Config
from broker.http.app import build_app, create_broker
from broker.http.arrivals_route import MEDIA_TYPE_ATTRIBUTE
from broker.http.json_api import BadRequest, json_error, read_json
from broker.http.login_sessions import LoginRequired, require_login
from broker.signaling.protocol import ErrorCode

Login = Literal["none", "partial", "full"]

#: Refusals whose code the handler computes: the handler's qualified name -> status -> codes.
#: A seat action passes on the ProtocolError of Hub.revoke_seat (404 for these two).
COMPUTED_ERRORS: dict[str, dict[int, frozenset[str]]] = {
    "broker.http.dashboard.api_seat_action": {
        404: frozenset({ErrorCode.SESSION_ENDED.value, ErrorCode.NOT_IN_SESSION.value})
    },
}
#: Methods the CSRF guard lets through without Origin and token checks (login_sessions.csrf_middleware).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ALTERNATION = re.compile(r"\(\?P<(\w+)>([\w-]+(?:\|[\w-]+)+)\)")


class ContractError(Exception):
    """The code does something the contract generator cannot describe: teach it, or change the code."""


@dataclass
class HandlerFacts:
    """What one handler's code says about its route."""

    body: type[msgspec.Struct] | None = None
    login: Login = "none"
    errors: dict[int, set[str]] = field(default_factory=dict)

    def add(self, status: int, code: str) -> None:
        self.errors.setdefault(status, set()).add(code)


@dataclass(frozen=True)
class ApiRoute:
    """One operation of the API: a method on a concrete path (a ``{name:a|b}`` part is one route each)."""

    method: str
    path: str
    operation_id: str
    summary: str
    parameters: tuple[str, ...]
    body: type[msgspec.Struct] | None
    login: Login
    errors: dict[int, frozenset[str]]
    #: What a success answers: JSON, or a stream (``EVENT_STREAM`` on the handler says which).
    media_type: str = "application/json"


def _login_required_answer() -> tuple[int, str]:
    refusal = LoginRequired()
    return refusal.status, str(json.loads(refusal.text or "{}")["error"])


def _resolve(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """The object a called name stands for in the function's module (``name`` or ``module.name``)."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = namespace.get(node.value.id)
        if isinstance(owner, types.ModuleType):
            return getattr(owner, node.attr, None)
    return None


def _json_error_answer(call: ast.Call, namespace: dict[str, Any]) -> tuple[int, str] | None:
    """``json_error(403, "forbidden", ...)`` or ``json_error(*NAME)``: status and code, when written out."""
    args = call.args
    if args and isinstance(args[0], ast.Starred):
        constant = _resolve(args[0].value, namespace)
        if isinstance(constant, tuple) and isinstance(constant[0], int) and isinstance(constant[1], str):
            return constant[0], constant[1]
        return None
    if len(args) >= 2 and isinstance(args[0], ast.Constant) and isinstance(args[1], ast.Constant):
        status, code = args[0].value, args[1].value
        if isinstance(status, int) and isinstance(code, str):
            return status, code
    return None


def _read(function: Callable[..., Any], facts: HandlerFacts, seen: set[Any]) -> None:
    if function in seen:
        return
    seen.add(function)
    namespace = function.__globals__
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = _resolve(node.func, namespace)
        if callee is json_error:
            answer = _json_error_answer(node, namespace)
            if answer is None:
                name = f"{function.__module__}.{function.__qualname__}"
                if name not in COMPUTED_ERRORS:
                    raise ContractError(f"{name} answers a json_error whose code is not written out: list it")
                for status, codes in COMPUTED_ERRORS[name].items():
                    for code in codes:
                        facts.add(status, code)
            else:
                facts.add(*answer)
        elif callee is read_json:
            body = _resolve(node.args[1], namespace) if len(node.args) > 1 else None
            if not (isinstance(body, type) and issubclass(body, msgspec.Struct)):
                raise ContractError(f"{function.__qualname__} reads a body that is not a msgspec Struct")
            facts.body = body
            facts.add(400, "bad_request")  # BadRequest, answered by the CSRF middleware
        elif callee is require_login:
            partial = any(k.arg == "allow_partial" and getattr(k.value, "value", False) for k in node.keywords)
            facts.login = "partial" if partial or facts.login == "partial" else "full"
            facts.add(*_login_required_answer())
        elif callee is LoginRequired:
            facts.add(*_login_required_answer())
        elif isinstance(callee, type) and issubclass(callee, BadRequest):
            facts.add(400, "bad_request")
        elif inspect.isfunction(callee) and callee.__module__.startswith("broker.http."):
            _read(callee, facts, seen)


def handler_facts(handler: Callable[..., Any]) -> HandlerFacts:
    """Read a handler and the broker.http functions it calls, however deep."""
    facts = HandlerFacts()
    _read(handler, facts, set())
    return facts


def _concrete_paths(resource: web.AbstractResource) -> list[tuple[str, str]]:
    """(path, suffix) per path a resource serves: a ``{name:a|b}`` part becomes one path per alternative."""
    info = resource.get_info()
    if "path" in info:
        return [(str(info["path"]), "")]
    paths = [(str(info["formatter"]), "")]
    for name, alternatives in _ALTERNATION.findall(info["pattern"].pattern):
        paths = [(p.replace("{" + name + "}", alt), f"{s}_{alt}") for p, s in paths for alt in alternatives.split("|")]
    return paths


def routes_of(app: web.Application) -> list[ApiRoute]:
    """Every ``/api/`` operation of ``app``, sorted by path and method."""
    found = []
    for route in app.router.routes():
        resource = route.resource
        if route.method == "HEAD" or resource is None or not resource.canonical.startswith("/api/"):
            continue
        facts = handler_facts(route.handler)
        errors = {status: set(codes) for status, codes in facts.errors.items()}
        # Answers of the middlewares (login_sessions.csrf_middleware): a store outage on every
        # route, the Origin and token checks on every state-changing one.
        errors.setdefault(503, set()).add(ErrorCode.UNAVAILABLE.value)
        if route.method not in SAFE_METHODS:
            errors.setdefault(403, set()).add("forbidden")
        doc = inspect.getdoc(route.handler)
        for path, suffix in _concrete_paths(resource):
            found.append(
                ApiRoute(
                    method=route.method,
                    path=path,
                    operation_id=f"{route.name or route.handler.__name__}{suffix}",
                    summary=doc.splitlines()[0] if doc else "",
                    parameters=tuple(re.findall(r"\{(\w+)\}", path)),
                    body=facts.body,
                    login=facts.login,
                    errors={status: frozenset(codes) for status, codes in sorted(errors.items())},
                    media_type=getattr(route.handler, MEDIA_TYPE_ATTRIBUTE, "application/json"),
                )
            )
    return sorted(found, key=lambda r: (r.path, r.method))


async def api_routes() -> list[ApiRoute]:
    """The routes of the application a broker with the default settings serves (built in a
    throw-away data directory, never started)."""
    with tempfile.TemporaryDirectory(prefix="broker-contract-") as data_dir:
        broker = await create_broker(dataclasses.replace(Config(), data_dir=Path(data_dir)))
        try:
            return routes_of(build_app(broker))
        finally:
            await broker.close()
