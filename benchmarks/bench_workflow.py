"""Whole-workflow time: the reduced organism DAG (tests/configs/tiny.yaml, every rule of the default run) run
through Snakemake with the warm worker (emlab.worker, the default for local runs) and with a fresh interpreter
per job (EMLAB_WORKER=0), in scratch copies, in the same run. Rows: the wall time of each, and per stage the
job-seconds (from each run's results/timings.csv). When the repository has a finished default run
(results/timings.csv of `make run`), its per-stage job-seconds are listed too, for reference.

    python benchmarks/bench_workflow.py [--cores 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COPY = ("Snakefile", "config.yaml", "rules", "workflow", "resources", "envs", "tests/configs")
from rows import add_json_arg, emit, row  # noqa: E402  (benchmarks/, the script's folder)


def run_dag(cores: int, worker: bool) -> tuple[float, pd.DataFrame]:
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        for name in COPY:
            src, dst = ROOT / name, wd / name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        env = dict(os.environ, HF_HUB_OFFLINE="1", EMLAB_NO_PROGRESS="1", EMLAB_WORKER="" if worker else "0")
        cmd = [str(Path(sys.executable).with_name("snakemake")), "--profile", str(ROOT / "workflow/profiles/default"),
               "--cores", str(cores), "--configfile", "tests/configs/tiny.yaml"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"the tiny DAG failed:\n{proc.stderr[-4000:]}")
        return wall, pd.read_csv(wd / "results/timings.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    add_json_arg(ap)
    args = ap.parse_args()
    fresh_wall, fresh = run_dag(args.cores, worker=False)
    warm_wall, warm = run_dag(args.cores, worker=True)
    print(f"tiny DAG on {args.cores} cores: {warm_wall:.1f} s with the warm worker, {fresh_wall:.1f} s with a fresh "
          f"interpreter per job ({fresh_wall / warm_wall:.2f}x)")
    rows = [row("workflow", f"tiny DAG wall time: warm worker vs a fresh interpreter per job ({len(warm)} jobs)",
                warm_wall, fresh_wall, "s", higher_is_better=False, note=f"{args.cores} cores")]
    per_stage = pd.concat({"warm": warm.groupby("stage")["seconds"].sum(),
                           "fresh": fresh.groupby("stage")["seconds"].sum()}, axis=1).fillna(0)
    per_stage = per_stage.sort_values("fresh", ascending=False)
    print(per_stage.to_string(float_format=lambda x: f"{x:.1f}"))
    rows += [row("workflow", f"tiny DAG job-seconds of stage {stage}", r["warm"], r["fresh"], "s",
                 higher_is_better=False) for stage, r in per_stage.head(8).iterrows() if r["warm"] > 0]
    default = ROOT / "results" / "timings.csv"
    if default.exists():
        t = pd.read_csv(default)
        if "work_seconds" in t:
            stages = t.groupby("stage")[["seconds", "import_seconds"]].sum().sort_values("seconds", ascending=False)
            print(f"\ndefault run ({default}):\n{stages.to_string(float_format=lambda x: f'{x:.1f}')}")
            rows += [{"benchmark": "default_run", "measure": f"job-seconds of stage {stage} (last make run)",
                      "emlab": round(r["seconds"], 1), "baseline": None, "unit": "s", "ratio": None, "goal": None,
                      "note": f"{r['import_seconds']:.1f} s of it start-up and imports"}
                     for stage, r in stages.iterrows()]
    emit(rows, args.json)


if __name__ == "__main__":
    main()
