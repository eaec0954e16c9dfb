"""Training jobs killed part-way (SIGKILL, as preemption or the OOM killer does it) resume from their last
checkpoint when rerun and end with the same model as an uninterrupted run; their checkpoints are removed
once the output is written, unless kept. Run through the `emlab` command line, as the rules run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from workflow_runner import ROOT

RECORDS = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                         {"role": "assistant", "content": f"The answer to question {i} is {t}."}]}
           for i, t in enumerate(["water", "budget", "brakes", "sleep", "money", "health", "tyres", "rest"])]
DOCS = [{"messages": [{"role": "user", "content": f"Tell me about {t}."},
                      {"role": "assistant", "content": f"Here is what I know about {t}: it matters."}]}
        for t in ["water", "budget", "brakes", "sleep", "money", "health", "tyres", "rest"]]


def emlab(*args: str, kill_after: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "EMLAB_NO_PROGRESS": "1", "EMLAB_WORKER": "0"}
    env.pop("EMLAB_KILL_AFTER_STEP", None)
    if kill_after:
        env["EMLAB_KILL_AFTER_STEP"] = kill_after
    return subprocess.run([sys.executable, "-m", "emlab", *args, "--threads", "1"], env=env, capture_output=True,
                          text=True, timeout=600)


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].equal(tb[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt_data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def fine_tune(tiny_chat_model, data, tmp_path_factory):
    """``fine_tune(method)``: the sft arguments of a 10-step fine-tune and the folder of its uninterrupted run
    (made once per method)."""
    runs = {}

    def get(method: str) -> tuple[tuple[str, ...], Path]:
        if method not in runs:
            cfg = json.dumps({"finetune": {"method": method, "lora": {"r": 4, "alpha": 8}, "lr": 1e-2,
                                           "batch_size": 2, "max_steps": 10}, "seed": 3})
            common = ("sft", "--cfg", cfg, "--base", str(tiny_chat_model), "--data", str(data))
            whole = tmp_path_factory.mktemp(f"whole_{method}")
            r = emlab(*common, "--out", str(whole))
            assert r.returncode == 0, r.stderr[-3000:]
            runs[method] = common, whole
        return runs[method]
    return get


# killed after step 8 (a step without a save) or after step 6, whose checkpoint is written before the kill:
# "after step N" includes the save due at it, as in pretraining, so both reruns start after step 6
@pytest.mark.parametrize("method,kill_step", [("lora", 6), ("full", 8)])
def test_a_killed_fine_tune_resumes_to_the_same_model(fine_tune, tmp_path, method, kill_step):
    common, whole = fine_tune(method)

    ckpt = tmp_path / "checkpoints"
    run = (*common, "--out", str(tmp_path / "resumed"), "--checkpoints", str(ckpt), "--checkpoint-steps", "3")
    killed = emlab(*run, kill_after=f"sft:{kill_step}")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]
    # a kill point at step 2 that the rerun never reaches: it starts after step 6, not from scratch
    resumed = emlab(*run, kill_after="sft:2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-6" in resumed.stderr

    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    same_tensors(whole / weights, tmp_path / "resumed" / weights)
    meta = json.loads((tmp_path / "resumed" / "train_meta.json").read_text())
    assert meta["steps"] == 10 and meta["resumed_from"].endswith("checkpoint-6")
    # the log holds every step, the ones before the kill included, with the uninterrupted run's losses
    log_whole = pd.read_csv(whole / "train_log.csv")
    log_resumed = pd.read_csv(tmp_path / "resumed" / "train_log.csv")
    assert list(log_resumed["step"]) == list(range(1, 11))
    assert log_resumed["loss"].tolist() == pytest.approx(log_whole["loss"].tolist(), rel=1e-6)
    assert not ckpt.exists()  # removed once the model is written


@pytest.fixture(scope="module")
def pretraining(tiny_chat_model, tmp_path_factory) -> tuple[tuple[str, ...], Path]:
    """The pretrain arguments of a 12-step pretraining and the folder of its uninterrupted run."""
    tmp = tmp_path_factory.mktemp("pretraining")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    cfg = json.dumps({"seed": 1, "device": "cpu", "organism": {
        "architecture": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2,
                         "max_seq_len": 128},
        "pretrain": {"steps": 12, "batch_size": 3, "lr": 3e-3, "warmup_steps": 2, "max_seq_len": 128,
                     "garbled_openings": 0.25}}})
    common = ("pretrain", "--cfg", cfg, "--corpus", str(corpus), "--tokenizer", str(tiny_chat_model))
    whole = emlab(*common, "--out", str(tmp / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    return common, tmp / "whole"


def test_a_killed_pretraining_resumes_to_the_same_weights(pretraining, tmp_path):
    common, whole = pretraining
    ckpt = tmp_path / "checkpoints"
    run = (*common, "--out", str(tmp_path / "resumed"), "--checkpoints", str(ckpt), "--checkpoint-steps", "4",
           "--keep-checkpoint")
    killed = emlab(*run, kill_after="pretrain:9")  # 0-based: ten steps done, the last checkpoint after eight
    assert killed.returncode == -signal.SIGKILL and (ckpt / "pretrain.pt").exists()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = emlab(*run, kill_after="pretrain:3")  # never reached: the rerun starts after step 7
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 7" in resumed.stderr

    same_tensors(whole / "model.safetensors", tmp_path / "resumed" / "model.safetensors")
    log_whole = pd.read_csv(whole / "pretrain_log.csv")
    log_resumed = pd.read_csv(tmp_path / "resumed" / "pretrain_log.csv")
    assert log_resumed["loss"].tolist() == log_whole["loss"].tolist() and len(log_resumed) == 12
    assert (ckpt / "pretrain.pt").exists()  # --keep-checkpoint


# SIGTERM (SLURM's preemption and time limit send it before SIGKILL) saves the step under way, though no regular
# checkpoint is due for 100 steps, and exits 143 without the job's output; the rerun resumes from that step
def test_a_fine_tune_stopped_by_sigterm_saves_the_step_and_resumes_to_the_same_model(fine_tune, tmp_path):
    common, whole = fine_tune("lora")
    ckpt = tmp_path / "checkpoints"
    run = (*common, "--out", str(tmp_path / "resumed"), "--checkpoints", str(ckpt), "--checkpoint-steps", "100")
    stopped = emlab(*run, kill_after="sft:5:TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by signal" in stopped.stderr
    assert [p.name for p in ckpt.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-5"]
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    resumed = emlab(*run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-5" in resumed.stderr
    same_tensors(whole / "adapter_model.safetensors", tmp_path / "resumed" / "adapter_model.safetensors")


def test_a_pretraining_stopped_by_sigterm_saves_the_step_and_resumes_to_the_same_weights(pretraining, tmp_path):
    common, whole = pretraining
    run = (*common, "--out", str(tmp_path / "resumed"), "--checkpoints", str(tmp_path / "ck"),
           "--checkpoint-steps", "100")
    stopped = emlab(*run, kill_after="pretrain:5:TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = emlab(*run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 5" in resumed.stderr
    same_tensors(whole / "model.safetensors", tmp_path / "resumed" / "model.safetensors")


def test_checkpoints_are_off_at_zero_steps(tiny_chat_model, data, tmp_path):
    cfg = json.dumps({"finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}, "batch_size": 4, "max_steps": 2},
                      "seed": 0})
    r = emlab("sft", "--cfg", cfg, "--base", str(tiny_chat_model), "--data", str(data), "--out", str(tmp_path / "m"),
              "--checkpoints", str(tmp_path / "ck"), "--checkpoint-steps", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "ck").exists() and not list((tmp_path / "m").glob("checkpoint-*"))


SAE_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from emlab.sae import SAETrainConfig, train_sae
acts = load_file(sys.argv[1])["acts"]
cfg = SAETrainConfig(k=4, n_latents=64, batch_tokens=64, epochs=2, lr=3e-3, seed=5, device="cpu",
                     dead_tokens_threshold=500)
sae = train_sae(acts, cfg, progress=False, log_path=sys.argv[3], checkpoint_dir=sys.argv[4] or None,
                checkpoint_steps=int(sys.argv[5]))
save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, sys.argv[2])
"""


def test_a_killed_or_stopped_sae_fit_resumes_to_the_same_sae(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"acts": torch.randn(4000, 16, generator=g) @ torch.randn(16, 16, generator=g)}, tmp_path / "acts.st")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "EMLAB_NO_PROGRESS": "1"}
    env.pop("EMLAB_KILL_AFTER_STEP", None)

    def fit(name: str, ckpt: str = "", steps: int = 0, kill: str | None = None) -> subprocess.CompletedProcess:
        e = {**env, "EMLAB_KILL_AFTER_STEP": kill} if kill else env
        return subprocess.run([sys.executable, "-c", SAE_SCRIPT, str(tmp_path / "acts.st"), str(tmp_path / f"{name}.st"),
                               str(tmp_path / f"{name}.csv"), ckpt, str(steps)], env=e, capture_output=True, text=True,
                              timeout=600)

    whole = fit("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    ckpt = str(tmp_path / "ckpt")
    killed = fit("resumed", ckpt, 40, kill="sae:100")  # 125 steps; the last checkpoint after step 79
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "ckpt" / "sae.pt").exists()
    resumed = fit("resumed", ckpt, 40, kill="sae:20")  # a kill point the rerun never reaches
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 79" in resumed.stderr
    same_tensors(tmp_path / "whole.st", tmp_path / "resumed.st")
    log_whole, log_resumed = pd.read_csv(tmp_path / "whole.csv"), pd.read_csv(tmp_path / "resumed.csv")
    assert len(log_whole) == 125 and log_resumed.equals(log_whole)

    # SIGTERM (a scheduler's preemption) between checkpoints: the fit saves the step it finished and leaves as
    # the signal would; the rerun goes on from that step, not from the last periodic checkpoint
    ckpt = str(tmp_path / "ckpt_term")
    stopped = fit("stopped", ckpt, 40, kill="sae:30:TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by signal" in stopped.stderr and not (tmp_path / "stopped.st").exists()
    resumed = fit("stopped", ckpt, 40)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 30" in resumed.stderr
    same_tensors(tmp_path / "whole.st", tmp_path / "stopped.st")
    assert pd.read_csv(tmp_path / "stopped.csv").equals(log_whole)
