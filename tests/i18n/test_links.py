"""The client's language in the invite link (issue 33): ``broker session create --lang es`` puts
``?lang=es`` in every client link, before the fragment (so the broker sees the tag and nothing
else new: docs/security.md), never in the therapist's link, and refuses a language the practice
does not offer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from broker.i18n.links import link_language_problem
from tests.cli.test_cli import run, start_serve


def test_a_link_language_must_be_a_tag_the_practice_offers() -> None:
    assert link_language_problem("es", ("en", "es")) is None
    assert "not one of the practice's languages" in (link_language_problem("fr", ("en", "es")) or "")
    assert "not a language tag" in (link_language_problem("es#x", ("en", "es")) or "")


async def status(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            return response.status


def test_session_create_with_a_language_puts_it_in_the_client_links_only(tmp_path: Path) -> None:
    served = start_serve(tmp_path / "data")
    try:
        result = run(
            "session",
            "create",
            "--data-dir",
            str(served.data_dir),
            "--seats",
            "2",
            "--group-link",
            "--lang",
            "es",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        created = json.loads(result.stdout)
        for seat in created["seats"]:
            parts = urlsplit(seat["link"])
            if seat["role"] == "client":
                assert parts.query == "lang=es" and parts.path.startswith("/j/") and len(parts.fragment) == 43
            else:
                assert parts.query == "" and parts.path.startswith("/t/")
        assert urlsplit(created["group_link"]).query == "lang=es"
        # The broker serves the join page for it: the query changes nothing it checks.
        client = next(s["link"] for s in created["seats"] if s["role"] == "client")
        assert asyncio.run(status(client.split("#")[0])) == 200
        refused = run("session", "create", "--data-dir", str(served.data_dir), "--lang", "fr")
        assert refused.returncode != 0
        assert "--lang: fr is not one of the practice's languages (en, es; BROKER_LANGUAGES)." in refused.stderr
    finally:
        served.process.terminate()
        served.process.wait(10)
