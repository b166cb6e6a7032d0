"""The documents in docs/contract/ are exactly what the code generates now."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from broker.contract import files

ROOT = Path(__file__).resolve().parents[2]


async def test_the_checked_in_documents_are_a_fresh_generation() -> None:
    outdated = await files.stale(ROOT / files.DEFAULT_DIRECTORY)
    assert outdated == [], (
        f"docs/contract/ differs from the code for {outdated}: regenerate it with `{files.REGENERATE}` "
        "(from the repository root) and commit the result"
    )


async def test_generation_is_deterministic() -> None:
    assert await files.generate_all() == await files.generate_all()
    first, second = await files.generate(), await files.generate()
    assert first == second
    for text in first.values():
        document = json.loads(text)
        assert text == json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def broker(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (a process of its own: the CLI sets up the process's logging)."""
    command = [sys.executable, "-m", "broker", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_command_writes_and_checks(tmp_path: Path) -> None:
    """``broker contract write`` makes the documents; ``check`` fails on an edited one and says how to fix it."""
    assert broker("contract", "write", str(tmp_path)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [files.MESSAGES, files.ASYNCAPI, files.OPENAPI, files.BROWSER_MODULE]
    )
    assert broker("contract", "check", str(tmp_path)).returncode == 0
    edited = tmp_path / files.OPENAPI
    edited.write_text(edited.read_text(encoding="utf-8").replace("3.1.0", "3.1.1"), encoding="utf-8")
    refused = broker("contract", "check", str(tmp_path))
    assert refused.returncode == 1
    assert files.OPENAPI in refused.stderr and files.REGENERATE in refused.stderr


async def test_a_checkouts_browser_module_goes_to_its_web_js_and_is_checked_there(tmp_path: Path) -> None:
    """Into a checkout's docs/contract the page's module is written to web/js/, where the page loads it, and
    ``check`` compares that copy: an edited web/js/wire_schema.js is stale like an edited document."""
    docs = tmp_path / files.DEFAULT_DIRECTORY
    written = await files.write(docs)
    module = tmp_path / files.WEB_DIRECTORY / files.BROWSER_MODULE
    assert module in written and not (docs / files.BROWSER_MODULE).exists()
    assert await files.stale(docs) == []
    module.write_text(module.read_text(encoding="utf-8").replace('"maxLength":64', '"maxLength":65'), encoding="utf-8")
    assert await files.stale(docs) == [files.BROWSER_MODULE]
    refused = broker("contract", "check", str(docs))
    assert refused.returncode == 1 and str(module) in refused.stderr
