"""The CLI speaks the terminal's language (issue 33; docs/i18n.md): the same command under a Spanish
locale prints the Spanish catalogue's words (broker/i18n/messages/es.json), and nothing of the
English ones it replaces."""

from __future__ import annotations

import os
from pathlib import Path

from broker.i18n.catalogue import messages
from tests.cli.test_cli import run


def test_check_config_speaks_spanish_under_a_spanish_locale(tmp_path: Path) -> None:
    english, spanish = messages("en"), messages("es")
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANG")}
    result = run("check-config", "--data-dir", str(tmp_path), env={**env, "LC_ALL": "es_ES.UTF-8"})
    assert result.returncode == 0, result.stderr
    # No TURN server here: the note on relay-only sessions, then "OK, with the notes above".
    for key in ("cli.not_available", "config.relay_unavailable", "cli.config_ok_notes"):
        assert spanish.text(key) in result.stdout
        assert english.text(key) not in result.stdout
    # The same command in English, as before.
    english_result = run("check-config", "--data-dir", str(tmp_path), env={**env, "LC_ALL": "en_GB.UTF-8"})
    assert english.text("cli.config_ok_notes") in english_result.stdout


def test_therapist_list_speaks_spanish_under_a_spanish_locale(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES", "LANG")}
    result = run("therapist", "list", "--data-dir", str(tmp_path), env={**env, "LANG": "es_MX.UTF-8"})
    assert result.returncode == 0, result.stderr
    assert messages("es").text("cli.therapist.none") in result.stdout
