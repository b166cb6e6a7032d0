"""The files that run ``broker verify-web`` from outside (deploy/monitor/): the systemd units verify
and are locked down, the CronJob validates against the Kubernetes API schemas, both run every five
minutes, a failure alerts, and docs/deploy.md shows exactly these files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.webmanifest.web_copies import REPO

MONITOR = REPO / "deploy" / "monitor"
UNITS = ("verify-web.service", "verify-web.timer", "verify-web-alert.service")


def _keys(name: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (MONITOR / name).read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_the_systemd_units_verify_and_the_check_runs_locked_down(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian package systemd) is required"
    for name in UNITS:  # ExecStart must name a binary that exists here for verify
        text = (MONITOR / name).read_text()
        text = text.replace("/opt/teletherapy-broker/bin/broker", "/bin/true").replace("/usr/bin/curl", "/bin/true")
        (tmp_path / name).write_text(text)
    verify = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(tmp_path / "verify-web.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score and float(score.group(1)) <= 2.0, security.stdout[-400:]
    service = _keys("verify-web.service")
    assert service["ExecStart"] == ["/opt/teletherapy-broker/bin/broker verify-web $BROKER_URL $VERIFY_WEB_ARGS"]
    assert service["OnFailure"] == ["verify-web-alert.service"] and service["Type"] == ["oneshot"]
    timer = _keys("verify-web.timer")
    assert timer["OnUnitActiveSec"] == ["5min"] and timer["RandomizedDelaySec"] == ["90s"]


def test_the_cronjob_validates_and_fails_its_job_on_a_difference() -> None:
    import kubernetes_validate

    (cronjob,) = [d for d in yaml.safe_load_all((MONITOR / "verify-web-cronjob.yaml").read_text()) if d]
    kubernetes_validate.validate(cronjob, kubernetes_validate.latest_version(), strict=True)
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["schedule"] == "*/5 * * * *"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a difference must fail the Job, not be retried away"
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["broker", "verify-web"] and "--key" in container["args"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_docs_show_exactly_these_files() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    section = docs.split("## Watching what the broker serves")[1].split("\n## ")[0]
    assert (MONITOR / "verify-web.timer").read_text().rstrip() in section
    assert (MONITOR / "verify-web-cronjob.yaml").read_text().rstrip() in section
    for name in UNITS:
        assert name in section
