"""web/js/wire_schema.js is the published schema of the server messages, and nothing the page's
checker cannot apply gets into it (browser/contract/browser_schema.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from broker.contract.browser_schema import ANNOTATIONS, KEYWORDS, UnknownKeyword, browser_module, server_definitions
from broker.contract.files import DEFAULT_DIRECTORY, MESSAGES
from broker.contract.messages import SERVER_MESSAGE

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "web" / "js" / "wire_check.js"


def module_definitions(text: str) -> dict[str, Any]:
    """The DEFS of the generated module, read back (one ``"Name": {json},`` line each)."""
    body = text[text.index("export const DEFS = {") :]
    return {m[1]: json.loads(m[2]) for m in re.finditer(r'^  "(\w+)": (\{.*\}),$', body, re.MULTILINE)}


def without_annotations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_annotations(v) for k, v in node.items() if k not in ANNOTATIONS}
    if isinstance(node, list):
        return [without_annotations(v) for v in node]
    return node


def test_the_module_holds_the_published_schema_of_every_server_message() -> None:
    published = json.loads((ROOT / DEFAULT_DIRECTORY / MESSAGES).read_text(encoding="utf-8"))["$defs"]
    defs = module_definitions(browser_module())
    assert SERVER_MESSAGE in defs and defs == server_definitions()
    for name, schema in defs.items():
        assert schema == without_annotations(published[name]), name
    mapping = defs[SERVER_MESSAGE]["discriminator"]["mapping"]
    assert {ref.removeprefix("#/$defs/") for ref in mapping.values()} <= set(defs)
    assert "Hello" not in defs and "ChecklistSubmit" not in defs  # client messages are the broker's to check


def test_the_checker_applies_every_keyword_the_generator_lets_through() -> None:
    """KEYWORDS is the checker's list: each one is read in web/js/wire_check.js."""
    source = CHECKER.read_text(encoding="utf-8")
    for keyword in KEYWORDS:
        assert re.search(rf"(schema\.|\b){re.escape(keyword)}\b", source), keyword


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "format": "email"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "object", "propertyNames": {"pattern": "^a$"}},
        {"type": "integer", "exclusiveMinimum": 0},
        {"type": ["string", "null"]},
        {"$ref": "https://example.com/other.json"},
        {"anyOf": [{"type": "string"}, {"const": 1}]},
        {"type": "object", "additionalProperties": {"type": "string", "maxItems": 2}},
    ],
)
def test_a_keyword_the_checker_does_not_apply_stops_the_generation(schema: dict[str, Any]) -> None:
    with pytest.raises(UnknownKeyword):
        server_definitions(
            {SERVER_MESSAGE: {"$ref": "#/$defs/M"}, "M": {"type": "object", "properties": {"f": schema}}}
        )
