import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs two xdist workers on the machine's cores: each worker's in-process torch takes its share of
# them. Two workers each running as many threads as there are cores wait on each other at every parallel
# region (on 2 cores the SmolLM2 LoRA test took 213 s beside the findings run, about 30 s alone).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))



# Files whose tests read one session-scoped run (tests/conftest.py's tiny_run): under `make test` (--dist loadfile)
# they go to the same worker, so that the run is built once.
SHARED_RUN_FILES = {"tests/test_report.py": "tests/test_workflow.py"}
# The files with the longest runs, handed out first and in this order (xdist's own order is by number of tests,
# which sent the findings run, the suite's longest test, out after a few minutes of other files): the findings run
# takes one worker from the start; the other builds the SmolLM2 DAG and then the tiny DAG (test_workflow.py's)
# while the findings run's serial pretraining (~700 s at one thread) holds one core, and only then waits on the
# SLURM test's scheduler, while the findings run's later jobs use the core it leaves idle. (With the SLURM test
# right after the SmolLM2 DAG, its waiting began ~150 s before the pretraining ended, with one core idle.)
LONGEST_FIRST = ("tests/test_emergent_misalignment.py", "tests/test_real_models.py", "tests/test_workflow.py",
                 "tests/test_slurm.py")


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
