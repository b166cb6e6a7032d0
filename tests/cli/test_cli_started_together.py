"""Eight ``broker therapist add`` started at once on a new data directory all succeed (issue 32).

Processes that start together create the data directory's files together: the server secret
(one must win and all must use it, none may read it half written) and the accounts file's
schema (two adding the same later column at once failed with ``duplicate column name``).

Started plainly, Python's start-up spreads eight processes over a second on two cores and they
seldom meet. So each process first loads the CLI, says it is ready, and waits for one byte on
its standard input, which the test sends to all eight at once: they then open the data
directory within a few milliseconds of each other, and run ``broker therapist add`` exactly as
``python -m broker`` does. A few rounds, each on a new directory, make a meeting near certain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cli.test_cli_therapist import REPO, cli, login_ok
from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture

PROCESSES = 8
ROUNDS = 4
PASSWORD = "Seven yellow kites over the harbour"
STARTER = """
import os, sys
import broker.accounts.account_store, broker.audit.setup, broker.cli.main, broker.cli.therapist
print("ready", flush=True)
os.read(0, 1)  # the go byte, sent to every process at once
sys.exit(broker.cli.main.main(sys.argv[1:]))
"""


def add_together(data_dir: Path, env: dict[str, str]) -> list[tuple[int, str]]:
    """``PROCESSES`` therapist adds, released together; each one's exit code and standard error."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, "therapist", "add", f"therapist{n}", "--data-dir", str(data_dir)]
            + ["--password-stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        for n in range(PROCESSES)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"G" + PASSWORD.encode() + b"\n")
            process.stdin.flush()
        results = []
        for process in processes:
            _, err = process.communicate(timeout=120)
            results.append((process.returncode, err.decode(errors="replace")))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def clean_env(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")} | extra


def listed(data_dir: Path, **env: str) -> list[str]:
    shown = cli(data_dir, "list", "--json", **env)
    assert shown.returncode == 0, shown.stderr
    return sorted(account["username"] for account in json.loads(shown.stdout))


def test_eight_therapist_adds_at_once_on_a_new_data_directory_all_succeed(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        data_dir = tmp_path / f"data-{round_}"
        results = add_together(data_dir, clean_env())
        failed = [err.strip().splitlines()[-1] for code, err in results if code != 0]
        assert failed == [], f"round {round_}: {failed}"
        assert listed(data_dir) == [f"therapist{n}" for n in range(PROCESSES)]
        assert login_ok(data_dir, "therapist3", PASSWORD), "all under the one server secret"
    verified = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_eight_therapist_adds_at_once_with_accounts_in_redis_all_succeed(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    for round_ in range(2):
        url = redis_server.empty_database(13)
        data_dir = tmp_path / f"data-{round_}"
        results = add_together(data_dir, clean_env(BROKER_ACCOUNTS_REDIS_URL=url))
        failed = [err.strip().splitlines()[-1] for code, err in results if code != 0]
        assert failed == [], f"round {round_}: {failed}"
        assert listed(data_dir, BROKER_ACCOUNTS_REDIS_URL=url) == [f"therapist{n}" for n in range(PROCESSES)]
        assert not (data_dir / "accounts.sqlite3").exists()
