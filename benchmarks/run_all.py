"""Every benchmark of emlab at a size that fits in a few minutes on a 2-core laptop, gathered in one table.

Each benchmark runs in its own process and measures emlab against its baseline in that same run (see each
script's docstring); this collects their rows (benchmarks/rows.py) into results/bench/summary.csv and prints
the table. `make bench` runs it.

    python benchmarks/run_all.py [--out results/bench] [--only judge,sae]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent

# script, arguments: the benchmark-sized runs (each script's defaults are larger)
BENCHMARKS = {
    "judge": ("bench_judge.py", []),
    "world_grader": ("bench_world_grader.py", ["--answers", "200"]),
    "activations": ("bench_activations.py", ["--rounds", "3"]),
    "steering": ("bench_steering.py", ["--rounds", "3"]),
    "probe": ("bench_probe.py", ["--rounds", "3", "--pairs", "16"]),
    "pretrain": ("bench_pretrain.py", ["--steps", "30", "--rounds", "3"]),
    "sae": ("bench_sae.py", ["--tokens", "262144", "--held-out", "16384", "--n-latents", "1024", "--k", "16",
                             "--batch", "2048", "--threads", "1", "--only", "emlab,sparsify,saelens"]),
    "workflow": ("bench_workflow.py", []),
    "resume": ("bench_resume.py", ["--steps", "500", "--every", "50"]),
    "alarm": ("bench_alarm.py", ["--steps", "75", "--every", "5", "--rounds", "3"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"--only: unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.jsonl"
    rows_file.unlink(missing_ok=True)
    failed = []
    for name in names:
        script, extra = BENCHMARKS[name]
        start = time.perf_counter()
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *extra, "--json", str(rows_file)])
        print(f"== {name}: {time.perf_counter() - start:.0f} s{'' if proc.returncode == 0 else ' (FAILED)'}\n",
              flush=True)
        if proc.returncode:
            failed.append(name)
    table = pd.read_json(rows_file, lines=True) if rows_file.exists() else pd.DataFrame()
    table.to_csv(args.out / "summary.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_colwidth", 70, "display.max_rows", 100):
        print(table.drop(columns=["note"], errors="ignore").to_string(index=False))
    print(f"\nwritten: {args.out / 'summary.csv'}")
    if failed:
        sys.exit(f"benchmarks below their goal or failed: {failed}")


if __name__ == "__main__":
    main()
