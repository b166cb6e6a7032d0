"""The generated documents as files: made the same way every time (sorted keys, fixed indent), so
that a checked-in copy can be compared byte for byte with a fresh generation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.contract.asyncapi import asyncapi_document
from broker.contract.http_routes import api_routes
from broker.contract.messages import messages_schema
from broker.contract.openapi import openapi_document

#: Where the documents live in the repository (relative to its root).
DEFAULT_DIRECTORY = Path("docs/contract")
MESSAGES = "messages.schema.json"
ASYNCAPI = "asyncapi.json"
OPENAPI = "openapi.json"
REGENERATE = "python -m broker contract write docs/contract"


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


async def generate() -> dict[str, str]:
    """Each document's file name and text."""
    return {
        MESSAGES: render(messages_schema()),
        ASYNCAPI: render(asyncapi_document()),
        OPENAPI: render(openapi_document(await api_routes())),
    }


async def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (await generate()).items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


async def stale(directory: Path) -> list[str]:
    """The documents missing from ``directory`` or different from a fresh generation."""
    out = []
    for name, text in (await generate()).items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out
