"""Result rows of the benchmarks, so that `make bench` can gather them into one table.

Every benchmark measures emlab against a baseline in the same run and reports rows of::

    benchmark, measure, emlab, baseline, unit, ratio, goal, note

``ratio`` is emlab's advantage (emlab / baseline for a rate, baseline / emlab for a time), so above 1 is
better; ``goal`` is the ratio the benchmark aims for (empty when it has none). A script given ``--json PATH``
appends its rows there as JSON lines, besides printing them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable


def row(benchmark: str, measure: str, emlab: float, baseline: float, unit: str, *, higher_is_better: bool = True,
        goal: float | None = None, note: str = "") -> dict:
    ratio = emlab / baseline if higher_is_better else baseline / emlab
    return {"benchmark": benchmark, "measure": measure, "emlab": round(emlab, 4), "baseline": round(baseline, 4),
            "unit": unit, "ratio": round(ratio, 3), "goal": goal, "note": note}


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="append the result rows to this JSON-lines file")


def emit(rows: list[dict], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def add_timing_args(parser: argparse.ArgumentParser, rounds: int = 3) -> None:
    """--rounds (timed rounds; the median counts) and --threads (torch threads, one by default: on a shared
    machine, oversubscribed torch threads spin and make timings noise)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def median_seconds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each function's median wall time over ``rounds`` rounds; the functions alternate within a round, so that
    load from other processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
