"""The generated documents as files: made the same way every time (sorted keys, fixed indent), so
that a checked-in copy can be compared byte for byte with a fresh generation.

The browser's copy of the server messages' schema (``browser_schema``) is generated with them. It
belongs to the page, in ``web/js/``: when the directory is a checkout's ``docs/contract``, it is
written to that checkout's ``web/js/``; into any other directory, next to the documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker.contract.asyncapi import asyncapi_document
from broker.contract.browser_schema import browser_module
from broker.contract.http_routes import api_routes
from broker.contract.messages import messages_schema
from broker.contract.openapi import openapi_document

#: Where the documents live in the repository (relative to its root).
DEFAULT_DIRECTORY = Path("docs/contract")
MESSAGES = "messages.schema.json"
ASYNCAPI = "asyncapi.json"
OPENAPI = "openapi.json"
BROWSER_MODULE = "wire_schema.js"
#: Where the browser module lives relative to the repository root.
WEB_DIRECTORY = Path("web/js")
REGENERATE = "python -m broker contract write docs/contract"


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


async def generate() -> dict[str, str]:
    """Each JSON document's file name and text."""
    return {
        MESSAGES: render(messages_schema()),
        ASYNCAPI: render(asyncapi_document()),
        OPENAPI: render(openapi_document(await api_routes())),
    }


async def generate_all() -> dict[str, str]:
    """Every generated file's name and text: the documents and the browser module."""
    return {**await generate(), BROWSER_MODULE: browser_module()}


def path_of(directory: Path, name: str) -> Path:
    """Where a generated file goes: the browser module of a checkout's docs/contract to its web/js/."""
    if name == BROWSER_MODULE and directory.parts[-2:] == DEFAULT_DIRECTORY.parts:
        return directory.parent.parent / WEB_DIRECTORY / name
    return directory / name


async def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (await generate_all()).items():
        path = path_of(directory, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


async def stale(directory: Path) -> list[str]:
    """The documents missing from ``directory`` or different from a fresh generation (by file name)."""
    out = []
    for name, text in (await generate_all()).items():
        path = path_of(directory, name)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out
