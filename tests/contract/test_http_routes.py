"""The OpenAPI document of the therapists' API is read from the application: its routes from the
router, each route's body, login and refusals from the handler's code."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from broker.contract.http_routes import ApiRoute, ContractError, api_routes, handler_facts
from broker.contract.openapi import openapi_document
from broker.http.dashboard import CreateSession
from broker.http.json_api import json_error
from broker.http.login import LoginRequest
from tests.test_protocol_doc import documented_routes


@pytest.fixture(scope="module")
async def routes() -> list[ApiRoute]:
    return await api_routes()


def by_operation(routes: list[ApiRoute]) -> dict[str, ApiRoute]:
    return {r.operation_id: r for r in routes}


async def test_every_documented_route_is_an_operation_and_nothing_else(routes: list[ApiRoute]) -> None:
    assert {f"{r.method} {r.path}" for r in routes} == documented_routes()
    document = openapi_document(routes)
    operations = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert operations == documented_routes()


async def test_the_document_is_valid_openapi_3_1(routes: list[ApiRoute]) -> None:
    document = openapi_document(routes)
    assert document["openapi"].startswith("3.1")
    validate(document)  # the official OpenAPI 3.1 schema, bundled with openapi-spec-validator


async def test_the_validator_refuses_a_broken_document(routes: list[ApiRoute]) -> None:
    """Guards the guard: the validator does look at the operations."""
    document: dict[str, Any] = openapi_document(routes)
    document["paths"]["/api/login"]["post"]["responses"]["401"] = {"content": {}}  # no description
    with pytest.raises(Exception, match="description"):
        validate(document)


async def test_bodies_logins_and_refusals_come_from_the_handlers(routes: list[ApiRoute]) -> None:
    ops = by_operation(routes)
    login = ops["api_login"]
    assert (login.body, login.login) == (LoginRequest, "none")
    assert login.errors[401] == {"invalid_credentials", "second_factor_required"}
    assert login.errors[429] == {"too_many_attempts", "locked"}
    assert ops["api_me"].login == "partial" and ops["api_me"].body is None
    assert ops["api_sessions"].login == "full" and 403 not in ops["api_sessions"].errors
    create = ops["api_session_create"]
    assert create.body is CreateSession and create.errors[429] == {"too_many_sessions"}
    assert "reauth_required" in ops["api_passkey_remove"].errors[403]
    assert ops["api_passkey_remove"].errors[409] == {"conflict", "last_second_factor", "second_factor_required"}
    revoke = ops["api_seat_action_revoke"]
    assert revoke.path == "/api/sessions/{session}/seats/{peer}/revoke"
    assert revoke.parameters == ("session", "peer")
    assert revoke.errors[404] == {"not_found", "session_ended", "not_in_session"}
    assert create.errors[503] == {"unavailable", "janus_unavailable"} and "janus_required" in create.errors[400]
    assert all(r.errors[503] == {"unavailable"} for r in routes if r is not create)


async def test_request_bodies_are_the_structs_with_their_limits(routes: list[ApiRoute]) -> None:
    document = openapi_document(routes)
    body = document["paths"]["/api/login"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/LoginRequest"}
    schemas = document["components"]["schemas"]
    assert schemas["LoginRequest"]["properties"]["username"]["maxLength"] == 256
    assert schemas["LoginRequest"]["additionalProperties"] is False
    assert schemas["CreateSession"]["properties"]["duration_min"] == {
        "type": "integer",
        "minimum": 5,
        "maximum": 720,
        "default": 50,
    }
    refusal = document["paths"]["/api/2fa/confirm"]["post"]["responses"]["400"]["content"]["application/json"]
    assert refusal["schema"]["properties"]["error"]["enum"] == ["bad_request", "invalid_code"]


async def _computed_refusal(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    return json_error(400, code, "Computed.")


def test_a_refusal_whose_code_the_contract_cannot_read_stops_the_generation() -> None:
    with pytest.raises(ContractError, match="not written out"):
        handler_facts(_computed_refusal)
