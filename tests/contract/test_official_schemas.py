"""The AsyncAPI document checked against the official AsyncAPI 3.0 JSON Schema (from the npm
package ``@asyncapi/specs``, fetched when npm can reach its registry), and all three documents
checked for what holds them together whatever the registry: every ``$ref`` resolves."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from typing import Any

import jsonschema
import pytest
import referencing
from referencing.jsonschema import DRAFT7

from broker.contract import files
from broker.contract.asyncapi import CHANNEL, asyncapi_document
from broker.contract.messages import messages_schema

#: The official schemas' package, pinned so that the check is the same on every run.
ASYNCAPI_SPECS = "@asyncapi/specs@6.11.1"


@pytest.fixture(scope="module")
def asyncapi_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the official AsyncAPI schema cannot be fetched")
    where = tmp_path_factory.mktemp("asyncapi-specs")
    packed = subprocess.run(
        [npm, "pack", ASYNCAPI_SPECS, "--silent", "--pack-destination", str(where)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if packed.returncode != 0:
        pytest.skip(f"npm could not fetch {ASYNCAPI_SPECS}: {packed.stderr.strip()[:200]}")
    tarball = where / packed.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("package/schemas/3.0.0.json")
        assert member is not None
        schema: dict[str, Any] = json.load(member)
    return schema


def official_validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        schema["$id"], DRAFT7.create_resource(schema)
    )
    return jsonschema.Draft7Validator(schema, registry=registry.crawl())


def test_the_asyncapi_document_is_valid_asyncapi_3(asyncapi_schema: dict[str, Any]) -> None:
    errors = [
        f"{list(e.path)}: {e.message[:200]}"
        for e in official_validator(asyncapi_schema).iter_errors(asyncapi_document())
    ]
    assert errors == []


def test_the_official_schema_refuses_a_broken_document(asyncapi_schema: dict[str, Any]) -> None:
    """Guards the guard: the bundled definitions are resolved, so a wrong operation is seen."""
    document = asyncapi_document()
    document["operations"]["receive_hello"]["action"] = "publish"
    assert not official_validator(asyncapi_schema).is_valid(document)


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


async def test_every_reference_in_the_documents_resolves() -> None:
    generated = {name: json.loads(text) for name, text in (await files.generate()).items()}
    for name, document in generated.items():
        refs = _refs(document)
        assert refs, name
        for ref in refs:
            _resolve(document, ref)


def test_the_asyncapi_document_has_an_operation_per_message_and_direction() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    channel = document["channels"][CHANNEL]
    assert channel["address"] == "/ws"
    received = {
        op["messages"][0]["$ref"].rsplit("/", 1)[1]
        for op in document["operations"].values()
        if op["action"] == "receive"
    }
    sent = {
        op["messages"][0]["$ref"].rsplit("/", 1)[1] for op in document["operations"].values() if op["action"] == "send"
    }
    assert "hello" in received and "welcome" in sent and {"offer", "candidate"} <= received & sent
    assert received | sent == set(channel["messages"]) == set(document["components"]["messages"])
    assert set(document["components"]["schemas"]) >= set(messages_schema()["$defs"]) - {
        "ClientMessage",
        "ServerMessage",
    }
