"""Run the real Snakemake workflow in a scratch copy of the repository (shared by the end-to-end tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("Snakefile", "config.yaml", "rules", "workflow", "resources", "envs", "configs", "tests/configs")
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# Under `make test` two xdist workers share the machine: a workflow run takes its worker's share of the cores, so
# that its jobs' threads never wait at a parallel region for a core the other worker holds (on 2 cores, 2-thread
# jobs beside a busy worker ran about 3x slower than alone). Both workers' runs on every core with one-thread jobs
# were tried: the findings run then took 1610 s, its serial pretraining sharing a core with the other worker's
# second job.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = max(1, (os.cpu_count() or 1) // WORKERS)
# The one run that may take every core (spread=True): the findings run, the suite's longest test. Its jobs keep one
# thread each (--max-threads), so it fills a core the other worker leaves idle (the SLURM test waits ~8 minutes on
# its scheduler, with ~90 s of jobs) without slowing the other worker's one-thread work at a parallel region.
ALL_CORES = os.cpu_count() or 1


def copy_workflow(dest: Path) -> Path:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, configfile: str | list[str] | None = None, cores: int = CORES,
              check: bool = True, timeout: int = 1800, spread: bool = False) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "--profile", str(ROOT / "workflow" / "profiles" / "default")]
    cmd += ["--cores", str(ALL_CORES), "--max-threads", str(CORES)] if spread else ["--cores", str(cores)]
    if configfile:
        cmd += ["--configfile", *([configfile] if isinstance(configfile, str) else configfile)]
    cmd += list(args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMLAB_NO_PROGRESS": "1"}
    # as in CI, where no environment is activated: the workflow must find its interpreter itself
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != Path(sys.executable).parent.resolve())
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table that snakemake prints (its "total" row left out)."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines()[3:]:
        if m := re.match(r"^(\w+)\s+(\d+)$", line.strip()):
            counts[m[1]] = int(m[2])
    counts.pop("total", None)
    return counts
