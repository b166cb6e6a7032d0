"""The benchmark scripts' contract (benchmarks/README.md): each one prints one JSON line with
``--json`` (its figures and its goals' verdicts), keeps its run as an uncommitted JSON record,
measures only the shipped broker (no monkeypatching option), and results.md stays one short
page naming every benchmark with the command that made its figure.

No benchmark is run here: they measure speed, which the suite never asserts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def test_every_benchmark_can_measure_the_broker_of_another_tree(tmp_path: Path) -> None:
    for script in SCRIPTS:
        result = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
        )
        assert "--broker-tree" in result.stdout, script.name
    # A directory without a broker package is refused before anything starts.
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "relay.py"), "--quick", "--no-record", "--broker-tree", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert refused.returncode == 2
    assert "no broker package there" in refused.stderr


def test_a_broker_process_runs_the_broker_tree_and_the_record_names_its_commit(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(common.BROKER_TREE_ENV, raising=False)
    own = common.BrokerProcess(tmp_path / "own").environment()["PYTHONPATH"].split(os.pathsep)
    assert own[0] == str(ROOT)
    assert "--broker-tree" not in common.broker_commit()

    other = tmp_path / "other"
    (other / "broker").mkdir(parents=True)
    monkeypatch.setenv(common.BROKER_TREE_ENV, str(other))
    path = common.BrokerProcess(tmp_path / "theirs").environment()["PYTHONPATH"].split(os.pathsep)
    assert path[:2] == [str(other), str(ROOT)], "the other tree's broker first, this tree's scripts after it"
    assert f"--broker-tree {other}" in common.broker_commit()


def test_serve_imports_a_module_by_its_package_path_or_else_its_flat_one(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flat, layered = tmp_path / "flat", tmp_path / "layered"
    (flat / "bench_pkg_flat").mkdir(parents=True)
    (flat / "bench_pkg_flat" / "__init__.py").write_text("")
    (flat / "bench_pkg_flat" / "serve.py").write_text("WHERE = 'flat'\n")
    (layered / "bench_pkg_layered" / "http").mkdir(parents=True)
    (layered / "bench_pkg_layered" / "__init__.py").write_text("")
    (layered / "bench_pkg_layered" / "http" / "__init__.py").write_text("")
    (layered / "bench_pkg_layered" / "http" / "serve.py").write_text("WHERE = 'layered'\n")
    (layered / "bench_pkg_layered" / "serve.py").write_text("WHERE = 'stale'\n")
    (layered / "bench_pkg_layered" / "broken.py").write_text("import bench_no_such_module\n")
    monkeypatch.syspath_prepend(str(flat))
    monkeypatch.syspath_prepend(str(layered))

    assert common.import_first("bench_pkg_flat.http.serve", "bench_pkg_flat.serve").WHERE == "flat"
    assert common.import_first("bench_pkg_layered.http.serve", "bench_pkg_layered.serve").WHERE == "layered"
    with pytest.raises(ModuleNotFoundError, match="bench_no_such_module"):
        common.import_first("bench_pkg_layered.broken", "bench_pkg_layered.serve")
    with pytest.raises(ModuleNotFoundError):
        common.import_first("bench_pkg_flat.nowhere", "bench_pkg_flat.neither")


def test_the_node_relay_is_committed_and_its_ws_install_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _common
    import relay

    assert (BENCHMARKS / "node_relay.mjs").is_file()
    assert relay.NODE_MODULES.is_relative_to(_common.RUNS), "ws is installed under benchmarks/runs/ (gitignored)"
    assert relay.WS_PACKAGE == f"ws@{relay.WS_MAJOR}", "one pinned major version"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "relay.py"), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    for option in ("--no-node", "--node-modules", "--no-npm-install"):
        assert option in result.stdout, option
    command = (ROOT / "scripts" / "test").read_text()
    assert "npm install" not in command and "npm i " not in command, "the test command never installs from npm"


def test_without_node_or_ws_the_node_figures_are_null_with_the_reason(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import relay

    with monkeypatch.context() as without_node:
        without_node.setenv("PATH", str(tmp_path / "empty"))
        modules, reason = relay.node_ws(tmp_path / "modules")
    assert modules is None and "node is not installed" in reason

    if shutil.which("node") is not None:  # with Node present: ws missing and installs refused -> the reason
        modules, reason = relay.node_ws(tmp_path / "modules", install=False)
        assert modules is None and "--no-npm-install" in reason
        assert not (tmp_path / "modules").exists(), "nothing was installed"

    # A failed install's reason is npm's telling line, not its error codes, stack or log path.
    failed = (
        "npm error code ECONNREFUSED\nnpm error syscall connect\n"
        "npm error FetchError: request to http://127.0.0.1:9/ws failed, reason: connect ECONNREFUSED\n"
        "npm error     at ClientRequest.<anonymous> (/usr/lib/node_modules/npm/lib/index.js:130:14)\n"
        "npm error A complete log of this run can be found in: /root/.npm/_logs/debug-0.log\n"
    )
    assert (
        relay.npm_error(failed) == "FetchError: request to http://127.0.0.1:9/ws failed, reason: connect ECONNREFUSED"
    )
    assert relay.npm_error("") == "no message"

    args = argparse.Namespace(quick=True, json=True, no_record=True)
    report = common.Report("relay", "P1 relay cost", args)
    report.add("node_msgs_per_s", "bare Node ws relay: throughput", None, "msg/s")
    report.add("node_ws", "Node ws relay", "not measured: node is not installed")
    report.finish()
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert record["figures"] == {"node_msgs_per_s": None, "node_ws": "not measured: node is not installed"}
    assert "| bare Node ws relay: throughput | - |" in err
