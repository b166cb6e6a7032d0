"""The benchmark scripts' contract (benchmarks/README.md): each one prints one JSON line with
``--json`` (its figures and its goals' verdicts), keeps its run as an uncommitted JSON record,
measures only the shipped broker (no monkeypatching option), and results.md stays one short
page naming every benchmark with the command that made its figure.

No benchmark is run here: they measure speed, which the suite never asserts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    """benchmarks/_common.py, with its run records going to a scratch directory."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common

    monkeypatch.setattr(_common, "RUNS", tmp_path / "runs")
    return _common


def _report(common: ModuleType, **options: bool) -> Any:
    """A P1-like report with one goal met and one missed."""
    args = argparse.Namespace(**{"quick": True, "json": False, "no_record": False, **options})
    report = common.Report("relay", "P1 relay throughput", args)
    report.add("pairs", "peer pairs", 50)
    report.add("ratio", "throughput ratio broker / bare", 0.91, "", ">= 0.8", True)
    report.add("latency_ratio", "p95 latency ratio", 2.4, "", "<= 2", False)
    report.add("lag_max_ms", "lag max (no samples)", float("nan"), "ms")
    return report


def test_json_prints_one_line_with_the_figures_and_each_goals_verdict(
    common: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    _report(common, json=True).finish()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, "stdout holds the JSON line alone; the table goes to stderr"
    record = json.loads(lines[0], parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert record["benchmark"] == "relay"
    assert record["figures"] == {"pairs": 50, "ratio": 0.91, "latency_ratio": 2.4, "lag_max_ms": None}
    assert record["goals"] == {
        "ratio": {"goal": ">= 0.8", "met": True, "value": 0.91},
        "latency_ratio": {"goal": "<= 2", "met": False, "value": 2.4},
    }
    assert record["goals_met"] is False
    for key in ("when", "command", "machine", "load", "versions", "broker_commit"):
        assert record[key] not in (None, ""), key
    assert "| throughput ratio broker / bare | 0.91 | >= 0.8 | yes |" in err


def test_a_run_is_kept_as_a_json_record_unless_no_record(
    common: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _report(common).finish()
    assert path is not None and path.parent == common.RUNS
    record = json.loads(path.read_text())
    assert record["goals"]["latency_ratio"]["met"] is False
    assert "| p95 latency ratio | 2.40 | <= 2 | **no** |" in capsys.readouterr().out
    assert _report(common, no_record=True).finish() is None
    assert list(common.RUNS.iterdir()) == [path]


def test_run_records_are_not_committed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common

    relative = _common.RUNS.relative_to(ROOT).as_posix() + "/"
    assert relative in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_takes_quick_json_and_no_record_and_no_monkeypatching(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--json", "--no-record"):
        assert option in result.stdout, option
    assert "--experiment" not in result.stdout


def test_results_is_one_short_page_naming_every_benchmark_with_its_command() -> None:
    page = (BENCHMARKS / "results.md").read_text()
    readme = (BENCHMARKS / "README.md").read_text()
    assert len(page.splitlines()) < 200
    assert len(SCRIPTS) >= 6
    for script in SCRIPTS:
        assert f"python benchmarks/{script.name}" in page, script.name
        assert f"python benchmarks/{script.name}" in readme, script.name
    assert not (BENCHMARKS / "experiments.py").exists()
