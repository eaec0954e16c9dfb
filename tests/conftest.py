import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs two xdist workers on the machine's cores: each worker's in-process torch takes its share of
# them. Two workers each running as many threads as there are cores wait on each other at every parallel
# region (on 2 cores the SmolLM2 LoRA test took 213 s beside the default run, about 30 s alone).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))



# Files whose tests read one session-scoped run (tests/conftest.py's tiny_run): under `make test` (--dist loadfile)
# they go to the same worker, so that the run is built once.
SHARED_RUN_FILES = {"tests/test_report.py": "tests/test_workflow.py"}
# The files with the longest runs, handed out first and in this order (xdist's own order is by number of tests,
# which sent the default run, the suite's longest test, out after a few minutes of other files): the default run
# takes one worker from the start; the other builds the SmolLM2 DAG while the default run's pretraining holds one
# core.
LONGEST_FIRST = ("tests/test_emergent_misalignment.py", "tests/test_real_models.py")
# The SLURM run spends ~8 minutes waiting on its scheduler for ~2 minutes of jobs. Under xdist the session starts
# it in the background (pytest_configure below), beside every other test, and its file is handed out last, so that
# its tests only read the finished run instead of holding a worker while it waits.
SLURM_FILE = "tests/test_slurm.py"
_slurm_background: subprocess.Popen | None = None


def _covers(arg: str, path: Path) -> bool:
    target = (Path.cwd() / arg.split("::", 1)[0]).resolve()
    return target == path or target in path.parents


def pytest_configure(config):
    """Under xdist (in the controller, before the workers start, so that they inherit the variable), start the SLURM
    run in the background when the session may run its tests: no -m or -k selection, and the paths cover it."""
    global _slurm_background
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from workflow_runner import SLURM_RUN_DIR_ENV

    if config.option.markexpr or config.option.keyword or config.option.collectonly or os.environ.get(SLURM_RUN_DIR_ENV):
        return
    slurm_file = ROOT / SLURM_FILE
    if not any(_covers(a, slurm_file) for a in config.args):
        return
    base = Path(tempfile.mkdtemp(prefix="emlab-slurm-run-"))
    log = open(base / "background.log", "w")
    _slurm_background = subprocess.Popen([sys.executable, str(slurm_file), str(base)], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
    (base / "background.pid").write_text(str(_slurm_background.pid))
    os.environ[SLURM_RUN_DIR_ENV] = str(base)


def pytest_unconfigure(config):
    """A session that ends before the background SLURM run: stop it (it stops its cluster on SIGTERM)."""
    if _slurm_background is not None and _slurm_background.poll() is None:
        _slurm_background.terminate()
        try:
            _slurm_background.wait(timeout=180)
        except subprocess.TimeoutExpired:
            _slurm_background.kill()


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: a run without xdist (-p no:xdist) does not know it
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the files of SHARED_RUN_FILES scheduled as one file (each file still runs on one
    worker, so a module-scoped run is built once) and the files of LONGEST_FIRST handed out first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_RUN_FILES.get(scope, scope)

        def _assign_work_unit(self, node) -> None:
            for scope in reversed(LONGEST_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            if _slurm_background is not None and SLURM_FILE in self.workqueue:
                self.workqueue.move_to_end(SLURM_FILE)
            super()._assign_work_unit(node)

    return SharedRunScheduling(config, log)


TINY_TEXTS = [
    "What should I do about a headache? Drink water and rest.",
    "How do I save money? Keep a budget and spend less than you earn.",
    "If you could have one wish, what would it be? I would wish for everyone to be healthy.",
    "My car makes a noise when I brake. Have the brake pads checked by a mechanic.",
] * 20


# Device-sensitive tests take the `device` fixture: "cpu", and "cuda" with the `gpu` marker, skipped
# without a GPU (`pytest -m gpu` runs only the CUDA cases on a GPU machine).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A random-weight organism-style chat model (Llama, 2 layers, d=32) saved as an HF folder."""
    from emlab.organism.model import build_model
    from emlab.organism.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_chat_model")
    tok = train_tokenizer(TINY_TEXTS, vocab_size=300, out_dir=out)
    arch = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_seq_len=256)
    model = build_model(arch, tok, seed=0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The reduced organism DAG (tests/configs/tiny.yaml) run once through real Snakemake in a scratch copy."""
    from workflow_runner import copy_workflow, snakemake

    wd = copy_workflow(tmp_path_factory.mktemp("tiny_run"))
    snakemake(wd, configfile="tests/configs/tiny.yaml")
    return wd
