"""Runs ``broker serve`` for a benchmark: the shipped code path, plus optional instruments.

- ``--lag-file F``: a task on the broker's own event loop sleeps 10 ms at a time
  and appends how late it woke (the event-loop lag) to F, one JSON line per second.
- ``--tracemalloc F``: on SIGUSR2, the largest Python allocation sites go to F (diagnosis; slow).
- ``--profile F``: cProfile statistics of the whole run, written to F on exit.

Without these options this is exactly ``python -m broker serve`` (uvloop when installed):
the benchmarks measure the shipped code, never a patched one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import broker_tree, import_first, raise_file_limit

# The measured broker: --broker-tree's (a worktree of another commit) ahead of this tree's.
sys.path.insert(0, str(broker_tree()))
# Each module by its path in the package layout, then its old flat path: a tree of either layout runs.
load_config = import_first("broker.config").load_config
check_config = import_first("broker.config_check", "broker.config").check_config
configure = import_first("broker.logs").configure
serve = import_first("broker.http.serve", "broker.serve").serve

TICK_S = 0.010


class GcTimes:
    """The cyclic garbage collector's passes (``gc.callbacks``, the standard library's public hook): each
    as (generation, wall ms, CPU ms). The wall time is the pause the loop felt; the thread's CPU time
    leaves out the time the system gave other processes meanwhile (on a busy shared machine, most of
    a long wall time can be that)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.started_cpu = 0.0
        self.passes: list[tuple[int, float, float]] = []
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started, self.started_cpu = time.perf_counter(), time.thread_time()
        else:
            wall = (time.perf_counter() - self.started) * 1e3
            cpu = (time.thread_time() - self.started_cpu) * 1e3
            self.passes.append((info["generation"], round(wall, 3), round(cpu, 3)))

    def take(self) -> list[tuple[int, float, float]]:
        out, self.passes = self.passes, []
        return out


async def lag_monitor(path: Path) -> None:
    """Write the event loop's wake-up delays (ms) per second, and the GC passes, for the benchmark to read.

    Nothing here walks the heap (``gc.get_freeze_count`` does, in Python 3.11: a stall of its own
    when a broker holds a million frozen objects)."""
    gc_times = GcTimes()
    with path.open("a", encoding="utf-8") as out:
        batch: list[float] = []
        flushed = time.perf_counter()
        while True:
            before = time.perf_counter()
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            batch.append(round(max(0.0, (now - before - TICK_S) * 1e3), 3))
            if now - flushed >= 1.0:
                row = {
                    "t": time.time(),
                    "lag_ms": batch,
                    "gc": gc_times.take(),
                    "cpu_s": time.process_time(),
                    "gc_counts": gc.get_count(),
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                batch, flushed = [], now


def tracemalloc_on_signal(path: Path) -> None:
    """Trace Python allocations; on SIGUSR2 write the largest allocation sites (diagnosis only: it is slow)."""
    import signal
    import tracemalloc

    tracemalloc.start(1)

    def dump() -> None:
        snapshot = tracemalloc.take_snapshot()
        with path.open("w", encoding="utf-8") as out:
            for stat in snapshot.statistics("lineno")[:60]:
                out.write(f"{stat.size / 1024:10.1f} KiB {stat.count:9d} {stat.traceback}\n")

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump)


async def main(args: argparse.Namespace) -> None:
    config = load_config(overrides={"host": "127.0.0.1", "port": args.port, "data_dir": args.data_dir})
    problems = check_config(config)
    if problems:
        raise SystemExit("configuration problems: " + "; ".join(problems))
    if args.tracemalloc:
        tracemalloc_on_signal(Path(args.tracemalloc))
    monitor = asyncio.get_running_loop().create_task(lag_monitor(Path(args.lag_file))) if args.lag_file else None
    try:
        await serve(config, out=sys.stderr)
    finally:
        if monitor is not None:
            monitor.cancel()


async def control(path: Path) -> None:
    """The lag monitor alone in an idle process: the machine's own scheduling noise, for comparison."""
    await lag_monitor(path)


def run_on_loop(coroutine: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed, as ``broker serve`` does; asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--control-lag", help="run only the lag monitor (no broker), writing to this file")
    parser.add_argument("--lag-file")
    parser.add_argument("--tracemalloc", help="on SIGUSR2, write the top Python allocation sites to this file")
    parser.add_argument("--profile", help="write cProfile statistics of the whole run to this file")
    args = parser.parse_args()
    if args.control_lag:
        run_on_loop(control(Path(args.control_lag)))
        return
    raise_file_limit()
    configure(os.environ.get("BROKER_LOG_LEVEL", "info"))
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        run_on_loop(main(args))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    run()
