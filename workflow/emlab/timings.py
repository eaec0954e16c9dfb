"""The per-job time table of a run, from the ``emlab-job`` records in the job logs (:mod:`emlab.jobs`).

``results/timings.csv``, one row per job whose log holds a record::

    stage, job, status, seconds, cpu_seconds, import_seconds, work_seconds, max_rss_mb, start, end

``stage`` is the emlab command the job ran (``sft``, ``sample``, ``cache-model``, ...), ``job`` its log's path
under ``logs/`` without ``.log``, ``seconds`` the job's wall time (interpreter start included), ``import_seconds``
what it spent starting Python and importing modules, ``work_seconds`` the rest. A job rerun overwrites its log,
so the table describes the jobs that made the current results (and any left from earlier configs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from .jobs import parse

COLUMNS = ["stage", "job", "status", "seconds", "cpu_seconds", "import_seconds", "work_seconds", "max_rss_mb",
           "start", "end"]


def job_table(logs_dir: str | Path) -> pd.DataFrame:
    """One row per ``emlab-job`` record under ``logs_dir`` (the last record of a log, if it has several)."""
    rows = []
    logs_dir = Path(logs_dir)
    for log in sorted(logs_dir.rglob("*.log")):
        fields = None
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = parse(line) or fields
        if fields is None or "wall" not in fields:  # not an emlab job, or a record from before these fields
            continue
        wall, imports = float(fields["wall"]), float(fields["import"])
        rows.append({"stage": fields["command"], "job": str(log.relative_to(logs_dir).with_suffix("")),
                     "status": fields["status"], "seconds": wall, "cpu_seconds": float(fields["cpu"]),
                     "import_seconds": imports, "work_seconds": max(0.0, wall - imports),
                     "max_rss_mb": float(fields["max_rss_mb"]), "start": fields["start"], "end": fields["end"]})
    return pd.DataFrame(rows, columns=COLUMNS)


def stage_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Seconds summed over each stage's jobs, slowest stage first."""
    stages = jobs.groupby("stage", sort=False).agg(
        jobs=("job", "count"), seconds=("seconds", "sum"), cpu_seconds=("cpu_seconds", "sum"),
        import_seconds=("import_seconds", "sum"), work_seconds=("work_seconds", "sum"),
        max_job_seconds=("seconds", "max"))
    return stages.sort_values("seconds", ascending=False).reset_index()


def write_timings(logs_dir: str | Path, out: str | Path) -> pd.DataFrame:
    jobs = job_table(logs_dir)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    jobs.to_csv(out, index=False, float_format="%.1f")
    stages = stage_table(jobs)
    print("emlab job seconds per stage (wall; CPU; Python start-up and imports; the rest):", file=sys.stderr)
    print(stages.to_string(index=False, float_format=lambda x: f"{x:.1f}"), file=sys.stderr)
    total = jobs[["seconds", "cpu_seconds", "import_seconds"]].sum()
    span = (pd.to_datetime(jobs["end"]).max() - pd.to_datetime(jobs["start"]).min()).total_seconds() if len(jobs) else 0
    print(f"{len(jobs)} jobs: {total['seconds']:.0f} job-seconds, {total['cpu_seconds']:.0f} CPU-seconds, "
          f"{total['import_seconds']:.0f} in start-up and imports; first start to last end {span:.0f} s",
          file=sys.stderr)
    return jobs
