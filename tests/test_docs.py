"""The documents stay true: every test they cite exists, and the README's commands are the real ones."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_file_named_in_the_docs_exists() -> None:
    for doc in ("docs/security.md", "docs/protocol.md", "docs/deploy.md", "README.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for path in set(re.findall(r"`(tests/[\w/]+\.(?:py|json))`", text)):
            assert (ROOT / path).is_file(), f"{doc} cites {path}, which does not exist"


def test_every_source_file_named_in_the_docs_exists() -> None:
    """Modules move (issue 20's layout): a doc that names one by path must follow it."""
    for doc in ("docs/security.md", "docs/protocol.md", "docs/deploy.md", "README.md", "benchmarks/README.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for path in set(re.findall(r"(broker/[\w/]+\.(?:py|toml|txt))", text)):
            assert (ROOT / path).is_file(), f"{doc} names {path}, which does not exist"


def test_every_test_named_in_the_docs_exists() -> None:
    """A defence's doc names the test that holds it: renaming or dropping that test must show here."""
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    for doc in ("docs/security.md", "docs/protocol.md", "docs/deploy.md", "README.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        named = set(re.findall(r"`(test_\w+)`", text))
        assert named <= defined, f"{doc} names tests that do not exist: {sorted(named - defined)}"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./scripts/test" in readme
    assert re.search(r"^exec \./scripts/test$", ci, flags=re.M)


def test_every_cli_command_in_the_readme_exists() -> None:
    from broker.cli.main import _parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = set(re.findall(r"`broker ([a-z-]+)", readme))
    parser = _parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert commands and commands <= set(choices), commands - set(choices)


def _leaf_commands() -> dict[str, set[str]]:
    """Every runnable ``broker`` command (its words) and its long options, from the real parser."""
    import argparse

    from broker.cli.main import _parser

    found: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for name, sub in subs[0].choices.items():
                walk(sub, [*words, name])
            return
        found[" ".join(words)] = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}

    walk(_parser(), [])
    return {words: options - {"--help"} for words, options in found.items()}


def test_the_readme_commands_table_lists_every_option_of_each_command() -> None:
    """A README row names a command with all of its options (``--data-dir`` included: without it a
    command reaches no broker started with one), and no option the command does not have."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Commands")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `broker ([^`]+)` \|", table, flags=re.M)
    leaves = _leaf_commands()
    documented: dict[str, set[str]] = {}
    for row in rows:
        words = []
        for word in row.split():
            if " ".join([*words, word]) not in leaves and not any(
                leaf.startswith(" ".join([*words, word]) + " ") for leaf in leaves
            ):
                break
            words.append(word)
        command = " ".join(words)
        if command in leaves:
            documented.setdefault(command, set()).update(re.findall(r"--[a-z][a-z0-9-]*", row))
        else:  # a group named with its subcommands (``therapist add|list|...``): the names must be the real ones
            named = set(row.split()[len(words)].split("\\|"))
            assert named == {leaf.split()[-1] for leaf in leaves if leaf.startswith(command + " ")}, row
    for command, options in documented.items():
        assert options == leaves[command], f"broker {command}: {sorted(options ^ leaves[command])}"
    assert {"serve", "session create", "session revoke", "join"} <= set(documented)
