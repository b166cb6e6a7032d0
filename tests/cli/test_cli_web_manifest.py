"""``broker web-manifest ...`` as a developer and a practice use it (real processes): a changed file
is named with the command that fixes it; build, sign, verify and show; and the web_root setting."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.webmanifest.web_copies import copy_web, flip_byte

BROKER = [sys.executable, "-m", "broker"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=60, env=env)


def test_a_practice_changes_web_then_builds_signs_and_verifies_it(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    web = ["--web", str(root)]
    keygen = run("web-manifest", "keygen", "--out", str(tmp_path / "practice.pem"))
    assert keygen.returncode == 0, keygen.stderr
    public = keygen.stdout.strip().splitlines()[-1]
    assert stat.S_IMODE((tmp_path / "practice.pem").stat().st_mode) == 0o600

    flip_byte(root / "css" / "app.css", 50)  # the practice changes its colours
    check = run("web-manifest", "check", *web)
    assert check.returncode == 1 and "css/app.css" not in check.stdout
    assert "/static/css/app.css" in check.stderr and "python -m broker web-manifest build" in check.stderr
    refused = run("web-manifest", "sign", "--key", str(tmp_path / "practice.pem"), *web)
    assert refused.returncode == 1 and "nothing was signed" in refused.stderr and "Traceback" not in refused.stderr

    build = run("web-manifest", "build", *web)
    assert build.returncode == 0 and "pinned" in build.stdout and "wrote" in build.stdout
    assert run("web-manifest", "check", *web).returncode == 0
    unsigned = run("web-manifest", "verify", "--key", public, *web)
    assert unsigned.returncode == 1 and "no valid signature" in unsigned.stderr

    sign = run("web-manifest", "sign", "--key", str(tmp_path / "practice.pem"), *web)
    assert sign.returncode == 0 and public in sign.stdout
    verify = run("web-manifest", "verify", "--key", public, *web)
    assert verify.returncode == 0 and f"signed by {public}" in verify.stdout
    show = run("web-manifest", "show", *web)
    assert show.returncode == 0 and f"signature by {public}: valid" in show.stdout
    assert "/static/js/e2ee.js" in show.stdout and "Integrity-Policy: blocked-destinations=(script)" in show.stdout

    other = run("web-manifest", "keygen", "--out", str(tmp_path / "other.pem")).stdout.strip().splitlines()[-1]
    assert run("web-manifest", "verify", "--key", other, *web).returncode == 1
    again = run("web-manifest", "keygen", "--out", str(tmp_path / "practice.pem"))
    assert again.returncode == 1 and "exists already" in again.stderr


def test_the_web_root_setting_must_hold_the_pages(tmp_path: Path) -> None:
    root = copy_web(tmp_path)
    (root / "join.html").unlink()
    for value, words in ((str(tmp_path / "none"), "is not a directory"), (str(root), "lacks the page(s) join.html")):
        result = run("check-config", "--data-dir", str(tmp_path / "data"), env={**os.environ, "BROKER_WEB_ROOT": value})
        assert result.returncode == 1 and words in result.stderr, result.stderr
