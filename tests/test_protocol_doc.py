"""docs/protocol.md cannot drift from broker/signaling/protocol.py: same messages, same fields, same error codes."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.signaling import protocol

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


def test_every_group_of_test_vectors_is_named_in_section_7() -> None:
    """An outside implementer finds the vectors for each rule of section 7 by name (the fingerprint
    rules and the link key's strictness included), and every name there is a real group."""
    import json

    vectors = json.loads((Path(__file__).resolve().parent / "vectors" / "e2ee.json").read_text(encoding="utf-8"))
    groups = {name for name, value in vectors.items() if isinstance(value, (list, dict))}
    section = sections()["End-to-end authentication (done by the peers; the broker only relays)"]
    listed = section.split("Test vectors: `tests/vectors/e2ee.json`,")[1].split(".\n")[0]
    assert set(re.findall(r"`(\w+)`", listed)) == groups


def test_the_parser_sees_a_missing_field() -> None:
    """Guards the guard: a table without a field really is caught."""
    text = "### `hello`\n\n| field | type |\n|---|---|\n| `protocol` | integer |\n"
    chunks = re.split(r"^### `([a-z_]+)`$", text, flags=re.M)
    assert first_column(chunks[2]) == {"protocol"} != wire_fields(protocol.Hello) - COMMON_CLIENT_FIELDS


# ---------------------------------------------------------------- the therapists' HTTP API (section 15)

ROOT = Path(__file__).resolve().parent.parent
API_SECTION = "HTTP API for therapists' pages"
API_MODULES = (
    "broker/http/login.py",
    "broker/http/login_sessions.py",
    "broker/http/json_api.py",
    "broker/http/reauth.py",
    "broker/http/totp_routes.py",
    "broker/http/passkey_routes.py",
    "broker/http/dashboard.py",
    "broker/http/vault_routes.py",
    "broker/http/password_routes.py",
)
#: The one json_error call whose code is not a literal: seat actions pass on the ProtocolError of
#: Hub.revoke_seat, which can only be one of these (session.revoke / reissue and Hub._mutate).
DYNAMIC_CODES = {"dashboard.py": {"session_ended", "not_in_session", "not_allowed"}}
_ALTERNATION = re.compile(r"\(\?P<(\w+)>([\w-]+(?:\|[\w-]+)+)\)")


def api_section() -> str:
    return sections()[API_SECTION]


def documented_routes() -> set[str]:
    """``METHOD /api/...`` as written in the section (``.../revoke`` and ``.../reissue`` both count)."""
    return set(re.findall(r"`((?:GET|POST|PUT|PATCH|DELETE) /api/[^`\s]+)`", api_section()))


def concrete_paths(route: Any) -> list[str]:
    """A route's path; a ``{name:a|b}`` part becomes one path per alternative, as the doc names them."""
    info = route.resource.get_info()
    if "path" in info:
        return [info["path"]]
    paths = [info["formatter"]]
    for name, alternatives in _ALTERNATION.findall(info["pattern"].pattern):
        paths = [p.replace("{" + name + "}", alt) for p in paths for alt in alternatives.split("|")]
    return paths


@pytest.fixture
async def api_routes(tmp_path: Path) -> set[str]:
    from broker.config import Config
    from broker.http.app import build_app, create_broker

    broker = await create_broker(dataclasses.replace(Config(), data_dir=tmp_path))
    try:
        app = build_app(broker)
        return {
            f"{route.method} {path}"
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None and route.resource.canonical.startswith("/api/")
            for path in concrete_paths(route)
        }
    finally:
        await broker.close()


def _tuple_constants(tree: ast.Module) -> dict[str, ast.Tuple]:
    """Module-level ``NAME = (status, "code", "message")`` tuples, for ``json_error(*NAME)``."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value
    return out


def handler_error_codes() -> dict[str, set[str]]:
    """Every error code the API handlers can answer, by source file, read from their source."""
    found: dict[str, set[str]] = {}
    for relative in API_MODULES:
        source = (ROOT / relative).read_text(encoding="utf-8")
        tree = ast.parse(source)
        constants = _tuple_constants(tree)
        codes = set(DYNAMIC_CODES.get(Path(relative).name, set()))
        dynamic = 0
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "json_error"):
                continue
            args = list(node.args)
            if args and isinstance(args[0], ast.Starred) and isinstance(args[0].value, ast.Name):
                args = list(constants[args[0].value.id].elts)
            code = args[1] if len(args) > 1 else None
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                codes.add(code.value)
            else:
                dynamic += 1
        assert dynamic == (1 if Path(relative).name in DYNAMIC_CODES else 0), relative
        # Refusals built by hand rather than through json_error (LoginRequired's body).
        codes |= set(re.findall(r"\"error\": \"([a-z_]+)\"", source))
        found[relative] = codes
    return found


async def test_every_api_route_is_documented_and_nothing_else(api_routes: set[str]) -> None:
    assert {"POST /api/login", "POST /api/sessions/{session}/seats/{peer}/reissue"} <= api_routes
    assert api_routes == documented_routes()


def test_every_api_error_code_is_documented() -> None:
    section = api_section()
    codes = set().union(*handler_error_codes().values())
    assert {"login_required", "forbidden", "bad_request", "too_many_attempts", "locked"} <= codes
    missing = {code for code in codes if f"`{code}`" not in section}
    assert not missing, f"error codes missing from section 15: {sorted(missing)}"


def test_the_dynamic_seat_action_codes_are_real_error_codes() -> None:
    """Guards the guard: the codes assumed for the one non-literal json_error exist on the wire."""
    assert DYNAMIC_CODES["dashboard.py"] <= {code.value for code in protocol.ErrorCode}


def test_the_api_section_names_the_cookie_and_headers() -> None:
    from broker.http import login_sessions as web_auth

    section = api_section()
    for name in (web_auth.LOGIN_COOKIE, web_auth.CSRF_HEADER, web_auth.BACKGROUND_HEADER, "Retry-After"):
        assert f"`{name}" in section, name
