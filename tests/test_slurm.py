"""The execution profiles, and the workflow end to end on a real one-node SLURM cluster.

Fast tests check the profiles on the toy workflow (tests/slurm_toy): the SLURM profile's
partition/account templating (dry run) and the default profile's retry of a failed job.

The SLURM tests (markers slow, slurm): scripts/slurm/start-local-cluster.sh starts slurmctld,
slurmd and munged (installing them with apt when missing) in a private state dir on free ports;
the DAG then runs through workflow/profiles/slurm, polling with squeue (the test cluster has no
accounting), with EMLAB_FAIL_ONCE making one rule fail on its first run. They check what a
cluster user relies on: every output is made, GPU jobs share the node at the same time on
different devices, and a failed job is retried by the profile instead of ending the run.
They need root and Debian's apt (or SLURM already installed) and are skipped otherwise, except
under CI (env var CI set), where a machine that cannot host the cluster is an error.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_DIR = ROOT / "tests" / "slurm_toy"
# The DAG under test: the reduced organism DAG once its config exists, else the toy workflow with
# the same shape (tests/slurm_toy). FAIL_ONCE_RULE names the rule that fails on its first run;
# None picks the alphabetically first rule of the DAG.
TINY_CONFIG = ROOT / "tests" / "configs" / "tiny.yaml"
if TINY_CONFIG.exists():
    WORKFLOW_DIR, CONFIGFILE, FAIL_ONCE_RULE = ROOT, TINY_CONFIG, None
    EXTRA_CONFIG: list[str] = []
else:
    WORKFLOW_DIR, CONFIGFILE, FAIL_ONCE_RULE = TOY_DIR, None, "report"
    EXTRA_CONFIG = ["gpu_seconds=5"]

DEFAULT_PROFILE = ROOT / "workflow" / "profiles" / "default"
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
START_SCRIPT = ROOT / "scripts" / "slurm" / "start-local-cluster.sh"
STOP_SCRIPT = ROOT / "scripts" / "slurm" / "stop-local-cluster.sh"
UNSUPPORTED_EXIT = 3  # start-local-cluster.sh: this machine cannot host a cluster
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
RUN_TIMEOUT_S = 1200
# Copying the workflow leaves out the checkout's outputs, caches and environment.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "results", "logs", ".snakemake", "__pycache__", ".pytest_cache", "*.egg-info"
)
JOB_LINE = re.compile(r"^emlab-job (.*)$")
RESOURCES_LINE = re.compile(r"^\s*resources: (.*)$", re.MULTILINE)
GPU_DEVICES = re.compile(r"^\d+(,\d+)*$")


def _toy_copy(tmp_path: Path) -> Path:
    workdir = tmp_path / "workflow"
    shutil.copytree(TOY_DIR, workdir, ignore=COPY_IGNORE)
    return workdir


def _dry_run_resources(workdir: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "--dry-run"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return RESOURCES_LINE.findall(out.stdout + out.stderr)


def test_slurm_profile_takes_partition_and_account_from_sbatch_variables(tmp_path):
    workdir = _toy_copy(tmp_path)
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "SLURM_"))}
    with_vars = _dry_run_resources(workdir, dict(bare, SBATCH_PARTITION="gpu", SBATCH_ACCOUNT="myproj"))
    assert len(with_vars) == 5  # prepare, 2 x gpu_work, report, all
    assert all("slurm_partition=gpu" in r and "slurm_account=myproj" in r for r in with_vars), with_vars
    without = _dry_run_resources(workdir, bare)
    assert len(without) == 5
    assert not any("slurm_partition" in r or "slurm_account" in r for r in without), without


def test_default_profile_retries_a_failed_job(tmp_path):
    workdir = _toy_copy(tmp_path)
    marker = tmp_path / "fail_once.marker"
    env = dict(os.environ, EMLAB_FAIL_ONCE=f"report:{marker}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(DEFAULT_PROFILE), "--cores", "2",
         "--config", "gpu_seconds=0"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert marker.exists()
    assert (workdir / "results" / "report.txt").read_text() == "\n\n"  # no GPUs: empty device lists
    assert run.stderr.count("Error in rule report") == 1
    assert run.stderr.count("Trying to restart job") == 1


# --- End to end on the local SLURM cluster ---


def slurm_test(test):
    """Marks a test that needs the local SLURM cluster (slow, slurm)."""
    return pytest.mark.slow(pytest.mark.slurm(test))


def _cannot_host_cluster() -> str | None:
    """Why this machine cannot run the local cluster, or None if it can (as far as we can tell)."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    if all(shutil.which(b) for b in SLURM_BINARIES):
        return None
    if not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        return "SLURM is not installed and there is no Debian apt-get to install it"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the SLURM test must run, but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """Starts a private cluster; yields the environment that points SLURM's clients at it."""
    reason = _cannot_host_cluster()
    if reason:
        _skip_or_fail(reason)
    state = tmp_path_factory.mktemp("slurm_state")
    # Free ports, so a cluster someone already runs here (on the script's defaults) is untouched.
    env = dict(os.environ, EMLAB_SLURMCTLD_PORT=str(_free_port()), EMLAB_SLURMD_PORT=str(_free_port()))
    start = subprocess.run(
        ["bash", str(START_SCRIPT), str(state)], env=env, capture_output=True, text=True, timeout=600
    )
    try:
        if start.returncode == UNSUPPORTED_EXIT:
            _skip_or_fail(start.stderr.strip())
        assert start.returncode == 0, f"start-local-cluster.sh failed:\n{start.stderr}"
        # The cluster's env.sh says how to reach it (SLURM_CONF, an srun wrapper on PATH).
        sourced = subprocess.run(
            ["bash", "-c", 'source "$1" && env -0', "_", str(state / "env.sh")],
            env=env, capture_output=True, text=True, check=True,
        )
        yield dict(item.split("=", 1) for item in sourced.stdout.split("\0") if "=" in item)
    finally:
        stop = subprocess.run(
            ["bash", str(STOP_SCRIPT), str(state)], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, f"stop-local-cluster.sh failed:\n{stop.stderr}"


def _snakemake_args(workdir: Path) -> list[str]:
    args = [sys.executable, "-m", "snakemake", "--snakefile", str(workdir / "Snakefile")]
    if CONFIGFILE is not None:
        args += ["--configfile", str(CONFIGFILE)]
    if EXTRA_CONFIG:
        args += ["--config", *EXTRA_CONFIG]
    return args


def _planned_outputs(workdir: Path, env: dict[str, str]) -> dict[str, str]:
    """Output file -> rule for every job of the DAG, from `snakemake --summary` before the run."""
    out = subprocess.run(
        [*_snakemake_args(workdir), "--summary"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, f"snakemake --summary failed:\n{out.stderr[-4000:]}"
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    return {row.split("\t")[0]: row.split("\t")[2] for row in lines[header + 1 :] if row.strip()}


@dataclass(frozen=True)
class JobRecord:
    """One `emlab-job` audit line."""

    rule: str
    start: datetime
    end: datetime
    devices: str
    log: Path


def _job_records(workdir: Path) -> list[JobRecord]:
    records = []
    for log in sorted((workdir / "logs").rglob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            match = JOB_LINE.match(line.strip())
            if not match:
                continue
            # Fields are key=value separated by spaces; a value may be empty (no GPU).
            fields = dict(token.partition("=")[::2] for token in match.group(1).split())
            records.append(
                JobRecord(
                    rule=fields["rule"],
                    start=datetime.fromisoformat(fields["start"]),
                    end=datetime.fromisoformat(fields["end"]),
                    devices=fields.get("CUDA_VISIBLE_DEVICES", ""),
                    log=log,
                )
            )
    return records


@dataclass(frozen=True)
class SlurmJob:
    """One SLURM job of the run, as slurmctld remembers it (for MinJobAge after it ends)."""

    job_id: int
    state: str
    comment: str  # the executor plugin writes `rule_<name>` or `rule_<name>_wildcards_<...>`
    wants_gpu: bool


def _slurm_jobs(workdir: Path, env: dict[str, str]) -> list[SlurmJob]:
    out = subprocess.run(
        ["scontrol", "--oneliner", "show", "job"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )
    jobs = []
    for line in out.stdout.splitlines():
        fields = dict(token.partition("=")[::2] for token in line.split())
        if fields.get("WorkDir") != str(workdir):
            continue
        requested = fields.get("TresPerJob", "") + fields.get("TresPerNode", "")
        jobs.append(
            SlurmJob(
                job_id=int(fields["JobId"]),
                state=fields["JobState"],
                comment=fields.get("Comment", ""),
                wants_gpu="gpu" in requested,
            )
        )
    return sorted(jobs, key=lambda j: j.job_id)


@pytest.fixture(scope="session")
def slurm_run(slurm_env, tmp_path_factory):
    """Runs the DAG once through the SLURM profile; the tests below inspect the result."""
    workdir = tmp_path_factory.mktemp("slurm_run") / "workflow"
    shutil.copytree(WORKFLOW_DIR, workdir, ignore=COPY_IGNORE)
    env = dict(slurm_env, HF_HUB_OFFLINE="1")
    # With --export=ALL a GPU variable of the submitting shell would leak into CPU jobs.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    planned = _planned_outputs(workdir, env)
    assert planned, "snakemake --summary listed no outputs"
    fail_rule = FAIL_ONCE_RULE or sorted(set(planned.values()))[0]
    assert fail_rule in planned.values(), (
        f"FAIL_ONCE_RULE {fail_rule!r} has no job in the DAG (rules: {sorted(set(planned.values()))})"
    )
    marker = workdir.parent / "fail_once.marker"
    env["EMLAB_FAIL_ONCE"] = f"{fail_rule}:{marker}"
    run = subprocess.run(
        [
            *_snakemake_args(workdir),
            "--profile", str(PROFILE),
            "--slurm-status-command", "squeue",
            # The first status check 2 s after submission (and after each finished job) rather
            # than the profile's 10 s: the DAG has several levels and the test waits for each.
            "--slurm-init-seconds-before-status-checks", "2",
        ],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    return {
        "workdir": workdir,
        "planned": planned,
        "fail_rule": fail_rule,
        "marker": marker,
        "run": run,
        "slurm_jobs": _slurm_jobs(workdir, env),
    }


@slurm_test
def test_run_completes_with_every_output(slurm_run):
    run = slurm_run["run"]
    assert run.returncode == 0, f"snakemake on SLURM failed:\n{run.stderr[-6000:]}"
    missing = [f for f in slurm_run["planned"] if not (slurm_run["workdir"] / f).exists()]
    assert not missing, f"outputs missing after the run: {missing}"


def _rule_of(job: SlurmJob) -> str:
    return re.sub(r"_wildcards_.*$", "", job.comment.removeprefix("rule_"))


@slurm_test
def test_gpu_jobs_run_concurrently_on_different_devices(slurm_run):
    records = _job_records(slurm_run["workdir"])
    assert records, "no emlab-job lines found under logs/"
    gpu = [r for r in records if GPU_DEVICES.match(r.devices)]
    assert len(gpu) >= 2, f"fewer than two jobs ran with a GPU: {records}"
    overlapping = [
        (a, b)
        for i, a in enumerate(gpu)
        for b in gpu[i + 1 :]
        if max(a.start, b.start) < min(a.end, b.end)
    ]
    assert overlapping, f"no two GPU jobs overlapped in time: {gpu}"
    assert any(a.devices != b.devices for a, b in overlapping), (
        f"overlapping GPU jobs shared a device: {overlapping}"
    )


@slurm_test
def test_only_jobs_that_asked_for_a_gpu_got_one(slurm_run):
    # The devices come from SLURM's allocation, not from the submitting environment.
    wants_gpu = {_rule_of(j): j.wants_gpu for j in slurm_run["slurm_jobs"]}
    assert any(wants_gpu.values()), f"no SLURM job asked for a GPU: {slurm_run['slurm_jobs']}"
    for record in _job_records(slurm_run["workdir"]):
        if record.rule in wants_gpu:  # local rules never reach SLURM
            got_gpu = bool(GPU_DEVICES.match(record.devices))
            assert got_gpu == wants_gpu[record.rule], record


@slurm_test
def test_failed_job_is_retried_and_the_run_completes(slurm_run):
    rule = slurm_run["fail_rule"]
    assert slurm_run["marker"].exists(), f"rule {rule} never ran its fail-once first attempt"
    jobs = slurm_run["slurm_jobs"]
    assert jobs, "slurmctld knows no jobs of this run"
    not_completed = [j for j in jobs if j.state != "COMPLETED"]
    # Exactly the injected failure, as a SLURM job of that rule, followed by its successful retry.
    assert len(not_completed) == 1, f"expected one failed job, got: {jobs}"
    failed = not_completed[0]
    assert failed.state == "FAILED" and _rule_of(failed) == rule, jobs
    retries = [j for j in jobs if j.job_id > failed.job_id and j.comment == failed.comment]
    assert retries and retries[0].state == "COMPLETED", f"no successful retry of {rule}: {jobs}"
    assert slurm_run["run"].returncode == 0, slurm_run["run"].stderr[-6000:]
