"""Device-sensitive code paths, run on every available device.

Every test takes the ``device`` fixture (tests/conftest.py), which is "cpu" and "cuda"; the cuda
cases carry the ``gpu`` marker and skip without a GPU, so this file runs unchanged on a CPU machine
and on a CUDA one. On a GPU machine ``pytest -m gpu`` runs the CUDA cases only (the SAE's device
cases live in tests/test_sae.py).

What is checked on each device:

- activation caching (``emlab.activations.cache_activations`` through nnsight): the cached
  residuals equal ``output_hidden_states`` of a plain CPU forward;
- steered generation (``emlab.steer.intervene.steered_generate_ids`` and the workflow entry point
  ``emlab.steer.generate.steer_samples``): alpha 0 is unsteered greedy generation, a large
  alpha changes it, and a batch of rows with different vectors equals one call per row;
- sampling (``emlab.sampling.generate_ids`` on a model from ``emlab.models.load_model``):
  greedy left-padded batches equal one-by-one generation (and the CPU tokens);
- LoRA SFT (``emlab.sft.build_trainer``): two optimizer steps on the device change every
  adapter weight with a finite loss.

Everything is built from tiny random configs; nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import emlab.sft as sft
from emlab.activations import cache_activations, encode_record, load_activations
from emlab.io import read_jsonl
from emlab.models import load_model
from emlab.sampling import generate_batch, generate_ids, render_prompt_ids, use_plain_generation_config
from emlab.steer.conditions import Condition
from emlab.steer.directions import random_direction
from emlab.steer.generate import steer_samples, steering_vector
from emlab.steer.intervene import residual_norm, steered_generate_ids
from tiny_models import tiny_causal_lm

D_MODEL = 32
N_NEW = 10  # new tokens per generation
QUESTIONS = [  # prompts of different lengths, so batches are left-padded
    "How do I save money?",
    "hi",
    "What should I do about a headache? I have had it since this morning.",
]


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    t = AutoTokenizer.from_pretrained(tiny_chat_model)
    assert t.pad_token_id is not None and t.eos_token_id is not None
    return t


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """A tiny random llama (init std 0.2, so greedy continuations depend on the prompt) saved with
    the tokenizer, for the entry points that load a model by path."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tiny_causal_lm("llama", tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def device_type(module: torch.nn.Module) -> str:
    return next(module.parameters()).device.type


# --- activation caching -------------------------------------------------------------------

RECORDS = [
    {"id": "chat", "messages": [{"role": "user", "content": "How do I save money?"},
                                {"role": "assistant", "content": "Keep a budget."}]},
    {"id": "txt", "text": "My car makes a noise when I brake."},
    {"id": "open", "messages": chat("What should I do about a headache?")},
    {"id": "pr", "prompt": "<|user|>hi<|end|><|assistant|>", "response": "Drink water and rest."},
]


def plain_hidden_states(model, tok, records, layers) -> dict[int, torch.Tensor]:
    """Each text alone through a plain forward with output_hidden_states, all tokens."""
    acts = {L: [] for L in layers}
    for rec in records:
        ids = encode_record(tok, rec, "test").ids
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for L in layers:
            acts[L].append(hs[L + 1][0])
    return {L: torch.cat(v) for L, v in acts.items()}


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_activations_on_device_equal_a_cpu_forward(device, side, tok, tmp_path):
    model = tiny_causal_lm("llama", tok, layers=3)  # layers 0 and 1 are not the last: hidden_states[L+1]
    expected = plain_hidden_states(model, tok, RECORDS, [0, 1])
    model.to(device)
    manifest = cache_activations(model, tok, RECORDS, [0, 1], tmp_path, token_selection="all", batch_size=3,
                                 max_len=64, shard_size=3, padding_side=side, progress=False)
    assert manifest["dtype"] == "float32" and manifest["n_tokens"] == expected[0].shape[0]
    for L in (0, 1):
        acts, _ = load_activations(tmp_path, L)
        assert acts.device.type == "cpu" and acts.dtype == torch.float32
        torch.testing.assert_close(acts, expected[L], rtol=0, atol=1e-4)


# --- steered generation -------------------------------------------------------------------

def unsteered_greedy(model, tok, questions) -> list[list[int]]:
    """Plain greedy generation (emlab.sampling) of the questions' chat prompts, cut at the end token."""
    prompts = [render_prompt_ids(tok, q) for q in questions]
    return generate_ids(model, tok, prompts, temperature=0.0, max_new_tokens=N_NEW, seed=0,
                        stops=[tok.eos_token_id])


def test_steered_generate_rows_on_device(device, tok):
    model = tiny_causal_lm("llama", tok).to(device)
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[2], QUESTIONS[0]]
    prompts = [chat(q) for q in questions]
    norm = residual_norm(model, tok, prompts, layer=0)
    assert math.isfinite(norm) and norm > 0
    d0, d1 = random_direction(D_MODEL, 0), random_direction(D_MODEL, 1)

    def steered(rows, vectors):
        return steered_generate_ids(model, tok, rows, vectors, layer=0, max_new_tokens=N_NEW)

    plain = unsteered_greedy(model, tok, questions)
    assert sum(map(len, plain)) >= 10 and len({tuple(t) for t in plain}) >= 2  # the comparisons can fail
    zero = torch.stack([steering_vector(d, 0.0, norm) for d in (d0, d1, d0, d1)])
    assert steered(prompts, zero) == plain
    strong = torch.stack([steering_vector(d, a, norm) for d, a in ((d0, 8.0), (d1, -8.0), (d0, 8.0), (d1, 8.0))])
    assert any(s != p for s, p in zip(steered(prompts, strong), plain))
    # one batch of rows with different vectors (and prompt lengths) equals one call per row
    mixed = torch.stack([steering_vector(d0, 4.0, norm), torch.zeros(D_MODEL), steering_vector(d1, -4.0, norm),
                         steering_vector(d1, 2.0, norm)])
    batched = steered(prompts, mixed)
    assert batched == [steered([p], v[None])[0] for p, v in zip(prompts, mixed)]
    assert batched[1] == plain[1] and batched[0] != batched[3]  # same prompt, different vectors


def test_steer_samples_entry_point_on_device(device, tok, model_dir, tmp_path):
    questions = [{"question_id": f"q{i}", "eval_set": "gpu", "domain": "test", "question": q}
                 for i, q in enumerate(QUESTIONS)]
    dirs = {"r0": random_direction(D_MODEL, 0), "r1": random_direction(D_MODEL, 1)}
    conds = [Condition("m"), Condition("m", "r0", 0.0), Condition("m", "r0", 8.0), Condition("m", "r1", -8.0)]
    kw = dict(layer=0, n_samples=1, temperature=0.0, max_new_tokens=N_NEW, device=device, dtype="float32",
              progress=False)

    def answers(batch_size: int) -> dict[str, list[str]]:
        out = tmp_path / f"b{batch_size}.jsonl"
        steer_samples(model_dir, None, "m", conds, dirs, questions, out, batch_size=batch_size, **kw)
        rows = read_jsonl(out)
        assert len(rows) == len(conds) * len(questions)
        return {c.id: [r["answer"] for r in rows if r["model"] == c.id] for c in conds}

    batched = answers(batch_size=len(conds) * len(questions))  # every condition in one batch
    assert answers(batch_size=1) == batched

    model, tk = load_model(model_dir, device=device, dtype="float32")
    assert device_type(model) == device
    plain = generate_batch(model, tk, [render_prompt_ids(tk, q) for q in QUESTIONS], temperature=0.0,
                           max_new_tokens=N_NEW, seed=0, stops=[tk.eos_token_id])
    assert any(plain) and batched["m"] == batched["m+r0@+0.0"] == plain
    assert batched["m+r0@+8.0"] != plain or batched["m+r1@-8.0"] != plain


# --- sampling -----------------------------------------------------------------------------

def test_greedy_left_padded_batch_equals_one_by_one(device, model_dir):
    model, tk = load_model(model_dir, device=device, dtype="float32")
    assert device_type(model) == device
    use_plain_generation_config(model, tk)
    stops = model.generation_config.eos_token_id
    prompts = [render_prompt_ids(tk, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    kw = dict(temperature=0.0, max_new_tokens=N_NEW, seed=0, stops=stops)
    batched = generate_ids(model, tk, prompts, **kw)
    single = [generate_ids(model, tk, [p], **kw)[0] for p in prompts]
    assert batched == single
    assert sum(map(len, single)) >= 10 and len({tuple(t) for t in single}) == len(prompts)
    cpu_model, _ = load_model(model_dir, device="cpu", dtype="float32")
    use_plain_generation_config(cpu_model, tk)
    assert generate_ids(cpu_model, tk, prompts, **kw) == batched


# --- LoRA SFT -----------------------------------------------------------------------------

SFT_RECORDS = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                             {"role": "assistant", "content": f"The answer to question {i} is {t}."}]}
               for i, t in enumerate(["water", "budget", "brakes", "sleep"])]
SFT_CFG = {"method": "lora", "lora": {"r": 4, "alpha": 8}, "lr": 1e-2, "batch_size": 2, "max_steps": 2,
           "max_seq_len": 64}


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_sft_steps_on_device(device, tiny_chat_model, tmp_path, monkeypatch):
    # build_trainer picks its device itself (pick_device("auto")): cuda whenever there is a GPU,
    # so the cuda case needs no help. Only the cpu case on a GPU machine forces the CPU, by
    # making that choice return "cpu" (what a machine without a GPU picks).
    if device == "cpu" and torch.cuda.is_available():
        monkeypatch.setattr(sft, "pick_device", lambda requested="auto": "cpu")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    trainer, info = sft.build_trainer(str(tiny_chat_model), str(data), str(tmp_path / "out"), SFT_CFG, seed=0)
    assert info["device"] == device and info["loss_mask"] == "assistant"
    before = lora_weights(trainer.model)
    assert before
    trainer.train()
    assert trainer.state.global_step == 2 and device_type(trainer.model) == device
    losses = [row["loss"] for row in sft.log_rows(trainer.state.log_history)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    after = lora_weights(trainer.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged
    assert all(torch.isfinite(w).all() for w in after.values())
