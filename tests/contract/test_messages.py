"""The generated JSON Schema of the wire messages says what the broker's decoder enforces:
every message the encoder writes fits it, what the decoder refuses it refuses, and its patterns
mean in ECMA-262 (JSON Schema's regex dialect) what they mean to the broker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import msgspec
import pytest

from broker.contract.asyncapi import asyncapi_document
from broker.contract.messages import CLIENT_MESSAGE, SERVER_MESSAGE, messages_schema, portable_pattern
from broker.signaling import protocol
from tests.contract.samples import SEALED, client_samples, server_samples, wire_type

SCHEMA = messages_schema()


def validator(definition: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": SCHEMA["$defs"]})


CLIENT = validator(CLIENT_MESSAGE)
SERVER = validator(SERVER_MESSAGE)


def test_the_message_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_samples_cover_every_message_type() -> None:
    assert {wire_type(m) for m in client_samples()} == set(protocol.client_message_types())
    assert {wire_type(m) for m in server_samples()} == set(protocol.server_message_types())


@pytest.mark.parametrize("message", client_samples(), ids=wire_type)
def test_every_client_message_the_encoder_writes_fits_the_schema(message: msgspec.Struct) -> None:
    frame = json.loads(protocol.encode(message))
    CLIENT.validate(frame)
    protocol.decode_client(protocol.encode(message))  # the sample is one the broker accepts


@pytest.mark.parametrize("message", server_samples(), ids=wire_type)
def test_every_broker_message_the_encoder_writes_fits_the_schema(message: msgspec.Struct) -> None:
    frame = json.loads(protocol.encode(message))
    SERVER.validate(frame)
    protocol.decode_server(protocol.encode(message))


def test_the_asyncapi_payload_of_each_message_is_the_same_schema() -> None:
    document = asyncapi_document()
    components = document["components"]
    for message in client_samples() + server_samples():
        payload = components["messages"][wire_type(message)]["payload"]
        check = jsonschema.Draft7Validator({**payload, "components": components})
        check.validate(json.loads(protocol.encode(message)))


def test_the_error_codes_are_an_enum_of_every_code() -> None:
    codes = {code.value for code in protocol.ErrorCode}
    assert set(SCHEMA["$defs"]["ErrorCode"]["enum"]) == codes
    assert set(asyncapi_document()["components"]["schemas"]["ErrorCode"]["enum"]) == codes


def test_limits_survive_into_the_schema() -> None:
    join = SCHEMA["$defs"]["Join"]["properties"]
    assert join["token"]["maxLength"] == 256 and join["token"]["minLength"] == 1
    assert join["resume_secret"]["anyOf"][0]["minLength"] == join["resume_secret"]["anyOf"][0]["maxLength"] == 43
    assert SCHEMA["$defs"]["PreflightOffer"]["properties"]["sdp"]["maxLength"] == 48 * 1024
    assert SCHEMA["$defs"]["Hello"]["additionalProperties"] is False
    assert SCHEMA["$defs"]["Hello"]["properties"]["type"] == {"enum": ["hello"]}


LONG = "x" * 257
#: Frames the broker's decoder refuses with bad_message; the schema must refuse each.
REFUSED = [
    '{"type":"ping","extra":1}',
    '{"type":"nope"}',
    '{"protocol":1}',
    '{"type":"hello"}',
    '{"type":"hello","protocol":"1"}',
    '{"type":"join","token":""}',
    '{"type":"join","token":"' + LONG + '"}',
    '{"type":"join","token":"t","resume_secret":"short"}',
    '{"type":"join","token":"t","resume":-1}',
    '{"type":"admit","peer":"a b"}',
    '{"type":"ping","id":"a b"}',
    '{"type":"ping","n":9007199254740992}',
    '{"type":"offer","to":"P","sdp":"v=0","sealed":"' + SEALED + '","counter":1}',
    '{"type":"offer","to":"P","sealed":"' + SEALED + '"}',
    '{"type":"offer","to":"P"}',
    '{"type":"answer","to":"P","sealed":"' + SEALED + '","counter":1,"mac":"m"}',
    '{"type":"candidate","to":"P","sealed":"' + SEALED + '","counter":1,"sdp_mid":"0"}',
    '{"type":"candidate","to":"P","candidate":"x","counter":1}',
    '{"type":"candidate","to":"P","candidate":"x","sdp_mline_index":256}',
    '{"type":"offer","to":"P","counter":1,"sealed":"' + "A" * 41 + 'B"}',
    '{"type":"offer","to":"P","counter":1,"sealed":"' + "A" * 41 + '"}',
    '{"type":"offer","to":"P","counter":1,"sealed":"' + "A" * 38 + '"}',
    '{"type":"report","event":"other","peer":"P","reason":"bad_mac"}',
    '{"type":"checklist","policy_version":"1","answers":{"Bad-Item":true}}',
    '{"type":"end","verification":{"P":"maybe"}}',
    "[]",
    "1",
]
#: Frames it accepts (at the decoder: a later check may still refuse them); the schema must too.
ACCEPTED = [
    '{"type":"ping"}',
    '{"type":"hello","protocol":2}',
    '{"type":"offer","to":"P","sdp":"v=0","sealed":null,"counter":null}',
    '{"type":"offer","to":"P","sealed":"' + SEALED + '","counter":1,"sdp":null,"mac":null}',
    '{"type":"offer","to":"P","counter":1,"sealed":"' + "A" * 41 + 'A"}',
    '{"type":"candidate","to":"P","candidate":""}',
    '{"type":"checklist","policy_version":"1","answers":{}}',
    '{"type":"end"}',
]


@pytest.mark.parametrize("frame", REFUSED)
def test_what_the_decoder_refuses_the_schema_refuses(frame: str) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_client(frame)
    assert not CLIENT.is_valid(json.loads(frame))


@pytest.mark.parametrize("frame", ACCEPTED)
def test_what_the_decoder_accepts_the_schema_accepts(frame: str) -> None:
    protocol.decode_client(frame)
    CLIENT.validate(json.loads(frame))


def _patterns(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return found.union(*(_patterns(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(v) for v in node))
    return set()


PROBES = ["abc", "abc\n", "a b", "", "a_b-c", "x" * 70, "A" * 44, "A" * 43 + "w", "A" * 41 + "B", "ok_1\nmore"]


def test_patterns_mean_in_ecma_262_what_they_mean_to_the_broker() -> None:
    """The broker matches with Python's ``re.search``; a JSON Schema validator with ECMA-262
    (here Node's RegExp, with the ``u`` flag as JSON Schema asks). Same answers for every probe,
    a trailing newline included (where Python's ``$`` would differ)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (scripts/test installs it with npm)")
    _, raw = msgspec.json.schema_components([protocol.ClientMessage, protocol.ServerMessage])
    originals = sorted(_patterns(raw))
    assert originals and all(p.endswith("\\Z") for p in originals)
    assert sorted(_patterns(SCHEMA)) == sorted({portable_pattern(p) for p in originals})
    script = (
        "const [patterns, probes] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "console.log(JSON.stringify(patterns.map(p => probes.map(s => new RegExp(p, 'u').test(s)))));"
    )
    request = json.dumps([[portable_pattern(p) for p in originals], PROBES])
    answer = subprocess.run([node, "-e", script], input=request, capture_output=True, text=True, timeout=30, check=True)
    ecma = json.loads(answer.stdout)
    python = [[re.search(p, s) is not None for s in PROBES] for p in originals]
    assert ecma == python
    assert not ecma[originals.index(r"^[A-Za-z0-9_\-]+\Z")][PROBES.index("abc\n")]
