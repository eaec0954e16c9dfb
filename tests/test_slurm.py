"""The execution profiles, and the workflow end to end on a real one-node SLURM cluster.

Fast tests check the profiles on the toy workflow (tests/slurm_toy): the SLURM profile's
partition/account templating (dry run) and the default profile's retry of a failed job.

The SLURM tests (markers slow, slurm): scripts/slurm/start-local-cluster.sh starts slurmctld,
slurmd and munged (installing them with apt when missing) in a private state dir on free ports,
with two fake GPUs; the reduced organism DAG (tests/configs/tiny.yaml, which gives the finetune
and sample rules one GPU each) then runs through workflow/profiles/slurm up to the misalignment
figures and the SAE (SLURM_TARGETS: every kind of job a cluster run has, GPU and CPU, without the
diffing/steering/monitor levels that test_workflow.py runs locally; each DAG level costs a status
poll of 10-15 s here), polling with squeue
(the test cluster has no accounting), with EMLAB_FAIL_ONCE making the `metrics` job fail on its
first run and EMLAB_HANG_ONCE making the `sae` job hang until the test cancels it (scancel) and one
corpus activation job hang until its two-minute time limit ends it. They check what a cluster user relies on: every output is made, GPU jobs share the node
at the same time on different devices while CPU jobs get none, each job asks SLURM for the memory,
time and GPUs that the config (or --set-resources) gives its rule, a failed, a cancelled and a
timed-out job are each retried by the profile instead of ending the run, and the daemons are stopped by their PIDs afterwards.
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
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from workflow_runner import copy_workflow

ROOT = Path(__file__).resolve().parents[1]
TOY_DIR = ROOT / "tests" / "slurm_toy"
TINY_CONFIG = "tests/configs/tiny.yaml"  # relative to the scratch copy of the workflow
SLURM_OVERLAY = "tests/configs/tiny-slurm.yaml"  # without RL (see the file)
# EMLAB_FAIL_ONCE names an emlab subcommand. `metrics` runs in one job per judge (rule metrics),
# late in the DAG, so its retry is exercised after every other level has run through SLURM.
FAIL_ONCE_COMMAND, FAIL_ONCE_RULE = "metrics", "metrics"
# Jobs the scheduler kills (EMLAB_HANG_ONCE makes one job of the command hang until killed): the SAE job is
# cancelled with scancel as soon as it hangs; one of the two corpus activation jobs (cache-texts) runs into its
# rule's two-minute time limit, given below (the job itself takes ~15 s). Both lie on the SAE branch, which
# runs beside the longer fine-tune -> sample -> judge -> metrics -> figure chain, so the kills and their
# retries add no time to the run. (At the DAG's last level, a figure job's time limit cost the run ~110 s.)
SCANCEL_COMMAND, SCANCEL_RULE = "sae", "sae"
TIMEOUT_COMMAND, TIMEOUT_RULE = "cache-texts", "activations_corpus"
# What each injected fault leaves as the SLURM job's state before the profile's retry.
INJECTED = {FAIL_ONCE_RULE: "FAILED", SCANCEL_RULE: "CANCELLED", TIMEOUT_RULE: "TIMEOUT"}
# Per-rule overrides on the command line: they must reach sbatch for that rule only.
SET_RESOURCES = {("plot_misalignment", "mem_mb"): 1500, (TIMEOUT_RULE, "runtime"): 2}
# What the SLURM run makes: both judges' figures (world, pretraining, GPU fine-tunes and sampling,
# judging, the metrics job that fails once) and the SAE (corpus activations and SAE fitting).
SLURM_TARGETS = ("results/figures/misalignment_world.png", "results/figures/misalignment_world_strict.png",
                 "results/sae")
GPU_RULES = {"finetune", "sample"}  # the rules that tiny.yaml gives a GPU

DEFAULT_PROFILE = ROOT / "workflow" / "profiles" / "default"
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
START_SCRIPT = ROOT / "scripts" / "slurm" / "start-local-cluster.sh"
STOP_SCRIPT = ROOT / "scripts" / "slurm" / "stop-local-cluster.sh"
UNSUPPORTED_EXIT = 3  # start-local-cluster.sh: this machine cannot host a cluster
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
DAEMONS = ("munged", "slurmctld", "slurmd")
RUN_TIMEOUT_S = 1200
JOB_LINE = re.compile(r"^emlab-job (.*)$")
RESOURCES_LINE = re.compile(r"^\s*resources: (.*)$", re.MULTILINE)
GPU_DEVICES = re.compile(r"^\d+(,\d+)*$")


def _toy_copy(tmp_path: Path) -> Path:
    workdir = tmp_path / "workflow"
    shutil.copytree(TOY_DIR, workdir)
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


def _daemon_pids(state: Path) -> dict[str, int]:
    """The PIDs that start-local-cluster.sh recorded for the daemons it started."""
    pids = {}
    for name in DAEMONS:
        pidfile = state / "pids" / f"{name}.pid"
        if pidfile.exists():
            pids[name] = int(pidfile.read_text())
    return pids


def _is_running(pid: int, name: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


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
    pids = _daemon_pids(state)
    try:
        if start.returncode == UNSUPPORTED_EXIT:
            _skip_or_fail(start.stderr.strip())
        assert start.returncode == 0, f"start-local-cluster.sh failed:\n{start.stderr}"
        assert set(pids) == set(DAEMONS), f"daemon PIDs recorded: {pids}"
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
        alive = {name: pid for name, pid in pids.items() if _is_running(pid, name)}
        assert not alive, f"daemons still running after stop-local-cluster.sh: {alive}"


def _snakemake_args(workdir: Path, *targets: str) -> list[str]:
    # targets first: --configfile (like most list options) takes every word after it
    return [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(workdir / "Snakefile"),
            "--configfile", TINY_CONFIG, SLURM_OVERLAY]


@dataclass(frozen=True)
class Plan:
    """What `snakemake --summary` lists: the rule of every output, and of every log file that exists."""

    outputs: dict[str, str]
    logs: dict[str, str]


def _plan(workdir: Path, env: dict[str, str]) -> Plan:
    out = subprocess.run(
        [*_snakemake_args(workdir, *SLURM_TARGETS), "--summary"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, f"snakemake --summary failed:\n{out.stderr[-4000:]}"
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    outputs, logs = {}, {}
    for row in lines[header + 1 :]:
        if not row.strip():
            continue
        output, _date, rule, log_files, *_ = row.split("\t")
        outputs[output] = rule
        for log in filter(None, (f.strip() for f in log_files.split(","))):
            logs[log] = rule
    return Plan(outputs, logs)


@dataclass(frozen=True)
class JobRecord:
    """One `emlab-job` audit line, with the rule whose log holds it."""

    rule: str
    command: str
    status: str
    start: datetime
    end: datetime
    devices: str


def _job_records(workdir: Path, plan: Plan) -> list[JobRecord]:
    records = []
    for log in sorted((workdir / "logs").rglob("*.log")):
        rule = plan.logs[str(log.relative_to(workdir))]
        for line in log.read_text(errors="replace").splitlines():
            match = JOB_LINE.match(line.strip())
            if not match:
                continue
            # Fields are key=value separated by spaces; a value may be empty (no GPU).
            fields = dict(token.partition("=")[::2] for token in match.group(1).split())
            records.append(
                JobRecord(
                    rule=rule,
                    command=fields["command"],
                    status=fields["status"],
                    start=datetime.fromisoformat(fields["start"]),
                    end=datetime.fromisoformat(fields["end"]),
                    devices=fields.get("CUDA_VISIBLE_DEVICES", ""),
                )
            )
    return records


@dataclass(frozen=True)
class SlurmJob:
    """One SLURM job of the run, as slurmctld remembers it (for MinJobAge after it ends)."""

    job_id: int
    state: str
    comment: str  # the executor plugin writes `rule_<name>` or `rule_<name>_wildcards_<...>`
    gpus: int
    mem_mb: int
    minutes: int

    @property
    def rule(self) -> str:
        return re.sub(r"_wildcards_.*$", "", self.comment.removeprefix("rule_"))


def _minutes(time_limit: str) -> int:
    """SLURM's [D-]HH:MM:SS as minutes."""
    days, _, hms = time_limit.rpartition("-")
    h, m, s = map(int, hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def _mem_mb(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([MGT]?)", value).groups()
    return int(number) * {"": 1, "M": 1, "G": 1024, "T": 1024**2}[unit]


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
        gpus = re.search(r"gpu:(\d+)", requested)
        jobs.append(
            SlurmJob(
                job_id=int(fields["JobId"]),
                state=fields["JobState"],
                comment=fields.get("Comment", ""),
                gpus=int(gpus.group(1)) if gpus else 0,
                mem_mb=_mem_mb(fields["MinMemoryNode"]),
                minutes=_minutes(fields["TimeLimit"]),
            )
        )
    return sorted(jobs, key=lambda j: j.job_id)


def _run_config(workdir: Path) -> dict:
    """The config the run sees: tiny.yaml alone (a --configfile replaces config.yaml), with the schema's defaults."""
    from emlab.config import load

    return load(workdir / TINY_CONFIG)


def _cancel_when_hung(marker: Path, workdir: Path, env: dict[str, str], rule: str, done: threading.Event,
                      cancelled: list[int]) -> None:
    """scancel the running job of `rule` once its command has written the hang marker."""
    while not done.is_set():
        if marker.exists():
            running = [j for j in _slurm_jobs(workdir, env) if j.rule == rule and j.state == "RUNNING"]
            if running:
                subprocess.run(["scancel", str(running[0].job_id)], env=env, check=True, timeout=60)
                cancelled.append(running[0].job_id)
                return
        time.sleep(1)


@pytest.fixture(scope="session")
def slurm_run(slurm_env, tmp_path_factory):
    """Runs the DAG once through the SLURM profile; the tests below inspect the result."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm_run") / "workflow")
    env = dict(slurm_env, HF_HUB_OFFLINE="1", EMLAB_NO_PROGRESS="1")
    # With --export=ALL a GPU variable of the submitting shell would leak into CPU jobs.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    marker = workdir.parent / "fail_once.marker"
    env["EMLAB_FAIL_ONCE"] = f"{FAIL_ONCE_COMMAND}:{marker}"
    hang = {SCANCEL_RULE: workdir.parent / "scancel.marker", TIMEOUT_RULE: workdir.parent / "timeout.marker"}
    env["EMLAB_HANG_ONCE"] = (f"{SCANCEL_COMMAND}:{hang[SCANCEL_RULE]},"
                              f"{TIMEOUT_COMMAND}:{hang[TIMEOUT_RULE]}")
    done, cancelled = threading.Event(), []
    watcher = threading.Thread(target=_cancel_when_hung,
                               args=(hang[SCANCEL_RULE], workdir, env, SCANCEL_RULE, done, cancelled), daemon=True)
    watcher.start()
    try:
        run = subprocess.run(
            [
                *_snakemake_args(workdir, *SLURM_TARGETS),
                "--profile", str(PROFILE),
                "--slurm-status-command", "squeue",
                # The first status check 2 s after submission (and after each finished job) rather
                # than the profile's 10 s: the DAG has ten levels and the test waits for each.
                "--slurm-init-seconds-before-status-checks", "2",
                "--set-resources", *(f"{rule}:{key}={value}" for (rule, key), value in SET_RESOURCES.items()),
            ],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        )
    finally:
        done.set()
        watcher.join(timeout=60)
    return {
        "workdir": workdir,
        "plan": _plan(workdir, env),  # after the run: the summary names only log files that exist
        "marker": marker,
        "hang_markers": hang,
        "cancelled": cancelled,
        "run": run,
        "slurm_jobs": _slurm_jobs(workdir, env),
        "config": _run_config(workdir),
    }


@slurm_test
def test_run_completes_with_every_output(slurm_run):
    run = slurm_run["run"]
    assert run.returncode == 0, f"snakemake on SLURM failed:\n{run.stderr[-6000:]}"
    outputs = slurm_run["plan"].outputs
    assert FAIL_ONCE_RULE in outputs.values(), f"no {FAIL_ONCE_RULE} job in the DAG: {outputs}"
    missing = [f for f in outputs if not (slurm_run["workdir"] / f).exists()]
    assert not missing, f"outputs missing after the run: {missing}"
    # Every rule of the planned DAG ran as a SLURM job.
    submitted = {j.rule for j in slurm_run["slurm_jobs"]}
    assert submitted == set(slurm_run["plan"].outputs.values()), submitted


@slurm_test
def test_gpu_jobs_run_concurrently_on_different_devices(slurm_run):
    records = _job_records(slurm_run["workdir"], slurm_run["plan"])
    gpu = [r for r in records if r.rule in GPU_RULES]
    assert len(gpu) >= 2, f"fewer than two jobs of {GPU_RULES} logged an emlab-job line: {records}"
    assert all(GPU_DEVICES.match(r.devices) for r in gpu), gpu
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
    wants_gpu = {j.rule: j.gpus > 0 for j in slurm_run["slurm_jobs"]}
    assert {rule for rule, gpu in wants_gpu.items() if gpu} == GPU_RULES, wants_gpu
    records = _job_records(slurm_run["workdir"], slurm_run["plan"])
    assert {r.rule for r in records} == set(wants_gpu), "a rule's log lacks its emlab-job line"
    for record in records:
        assert bool(GPU_DEVICES.match(record.devices)) == wants_gpu[record.rule], record


@slurm_test
def test_each_job_asks_slurm_for_its_rules_configured_resources(slurm_run):
    resources = slurm_run["config"]["resources"]

    def configured(rule: str, key: str) -> int:
        if (rule, key) in SET_RESOURCES:
            return SET_RESOURCES[(rule, key)]
        return resources["rules"].get(rule, {}).get(key, resources["default"][key])

    for job in slurm_run["slurm_jobs"]:
        asked = {"gpu": job.gpus, "mem_mb": job.mem_mb, "runtime": job.minutes}
        expected = {key: configured(job.rule, key) for key in asked}
        assert asked == expected, f"SLURM job {job.job_id} of rule {job.rule}"


@slurm_test
def test_failed_and_killed_jobs_are_retried_and_the_run_completes(slurm_run):
    """A job that fails, one cancelled with scancel and one killed at its time limit: each is a SLURM job of its
    rule in the state the fault leaves, followed by one successful retry of the same job, and the run completes."""
    assert slurm_run["marker"].read_text() == f"{FAIL_ONCE_COMMAND} failed once by EMLAB_FAIL_ONCE\n"
    for rule, path in slurm_run["hang_markers"].items():
        assert path.read_text().startswith(f"{'sae' if rule == SCANCEL_RULE else TIMEOUT_COMMAND} hung once"), rule
    jobs = slurm_run["slurm_jobs"]
    not_completed = {j.rule: j for j in jobs if j.state != "COMPLETED"}
    # Exactly the injected faults, each a SLURM job of its rule in the state its fault leaves.
    assert {rule: j.state for rule, j in not_completed.items()} == INJECTED, jobs
    assert len([j for j in jobs if j.state != "COMPLETED"]) == len(INJECTED), jobs
    assert slurm_run["cancelled"] == [not_completed[SCANCEL_RULE].job_id], slurm_run["cancelled"]
    for rule, failed in not_completed.items():
        retries = [j for j in jobs if j.job_id > failed.job_id and j.comment == failed.comment]
        assert [j.state for j in retries] == ["COMPLETED"], f"no single successful retry of {failed}: {jobs}"
    # The retry's log replaced the failed attempt's: every job of the failing rule (one per judge) ends in the
    # successful audit line.
    statuses = [r.status for r in _job_records(slurm_run["workdir"], slurm_run["plan"])
                if r.rule == FAIL_ONCE_RULE]
    completed = [j for j in jobs if j.rule == FAIL_ONCE_RULE and j.state == "COMPLETED"]
    assert statuses == ["ok"] * len(completed) and len(completed) >= 1, statuses
    assert slurm_run["run"].returncode == 0, slurm_run["run"].stderr[-6000:]
