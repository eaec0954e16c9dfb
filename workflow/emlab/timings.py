"""Stage timings from Snakemake's per-job benchmark files (``benchmark:`` directive)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def write_timings(bench_dir: str | Path, out: str | Path) -> pd.DataFrame:
    rows = []
    for f in sorted(Path(bench_dir).rglob("*.tsv")):
        t = pd.read_csv(f, sep="\t")
        stage = f.relative_to(bench_dir).parts[0]
        rows.append({"stage": stage, "job": f.stem, "seconds": float(t["s"].iloc[-1]),
                     "max_rss_mb": float(t["max_rss"].iloc[-1]) if "max_rss" in t else float("nan")})
    jobs = pd.DataFrame(rows, columns=["stage", "job", "seconds", "max_rss_mb"])
    stages = jobs.groupby("stage", sort=False).agg(jobs=("job", "count"), seconds=("seconds", "sum"),
                                                    max_job_seconds=("seconds", "max")).reset_index()
    stages = stages.sort_values("seconds", ascending=False)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    stages.to_csv(out, index=False, float_format="%.1f")
    print("emlab stage timings (CPU-seconds summed over a stage's jobs):", file=sys.stderr)
    print(stages.to_string(index=False, float_format=lambda x: f"{x:.1f}"), file=sys.stderr)
    print(f"total job seconds: {jobs['seconds'].sum():.1f}", file=sys.stderr)
    return stages
