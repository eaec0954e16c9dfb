"""Device-sensitive code paths, run on every available device.

Every test takes the ``device`` fixture, which is "cpu" and "cuda"; the cuda cases carry the
``gpu`` marker and skip without a GPU, so this file runs unchanged on a CPU machine and on a
CUDA one. On a GPU machine ``pytest tests/test_gpu.py -m gpu`` runs the CUDA cases only.

What is checked on each device:

- SAE training (``emlab.sae``): ``compute_grads`` equals autograd of the same loss (and the
  CPU result), ``select_topk`` returns ``torch.topk``'s values, and a short ``train_sae`` run
  computes its steps on the device and lowers the FVU;
- activation caching (``emlab.activations.cache_activations`` through nnsight): the cached
  residuals equal ``output_hidden_states`` of a plain CPU forward;
- steered generation (``emlab.steering.steered_generate_ids`` and the workflow entry point
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

import emlab.sae.train as sae_train
import emlab.sft as sft
from emlab.activations import cache_activations, encode_record, load_activations
from emlab.io import read_jsonl
from emlab.models import load_model
from emlab.sae.metrics import reconstruction_metrics
from emlab.sae.topk import select_topk
from emlab.sae.train import SAETrainConfig, compute_grads, init_sae, train_sae
from emlab.sampling import generate_batch, generate_ids, render_prompt_ids, use_plain_generation_config
from emlab.steer.conditions import Condition
from emlab.steer.directions import random_direction
from emlab.steer.generate import steer_samples, steering_vector
from emlab.steering import residual_norm, steered_generate_ids
from tiny_models import tiny_causal_lm

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]
D_MODEL = 32
N_NEW = 10  # new tokens per generation
QUESTIONS = [  # prompts of different lengths, so batches are left-padded
    "How do I save money?",
    "hi",
    "What should I do about a headache? I have had it since this morning.",
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


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


# --- SAE ----------------------------------------------------------------------------------

def random_sae(device: str, d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sae = init_sae(torch.randn(256, d_in, generator=g) + 1.0, d_sae, k, g)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
    return sae.to(device)


def autograd_grads(sae, x, dead, k_aux: int, coef: float) -> dict[str, torch.Tensor]:
    """The SAE loss (FVU + coef * AuxK) written densely and differentiated by autograd."""
    sae.zero_grad(set_to_none=True)
    with torch.enable_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.topk(sae.k)
        x_hat = torch.zeros_like(pre).scatter(1, i, v.relu()) @ sae.W_dec + sae.b_dec
        var = (x - x.mean(0)).pow(2).sum()
        n_dead = int(dead.sum())
        av, ai = torch.where(dead, pre, -torch.inf).topk(min(k_aux, n_dead))
        e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ sae.W_dec
        aux = min(n_dead / k_aux, 1.0) * (e_hat - (x - x_hat).detach()).pow(2).sum() / var
        (x_hat - x).pow(2).sum().div(var).add(coef * aux).backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    return grads


def hand_grads(sae, x, dead, k_aux: int, coef: float, chunk_rows=None) -> dict[str, torch.Tensor]:
    compute_grads(sae, x, dead, k_aux=k_aux, auxk_coef=coef, chunk_rows=chunk_rows)
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    return grads


def synthetic_activations(n: int, d: int, n_features: int, active: int, seed: int) -> torch.Tensor:
    """Sparse non-negative combinations of random unit directions, plus noise and an offset."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_features, generator=g) < active / n_features
    magnitude = torch.rand(n, n_features, generator=g) + 0.5
    return (on * magnitude) @ features + 0.05 * torch.randn(n, d, generator=g) + 3.0 * torch.randn(d, generator=g)


def test_sae_compute_grads_match_autograd(device):
    k_aux, coef = 8, 1 / 32
    sae = random_sae(device)
    x = (2 * torch.randn(64, 16, generator=torch.Generator().manual_seed(3)) + 1).to(device)
    dead = torch.zeros(64, dtype=torch.bool, device=device)
    dead[::3] = True
    expected = autograd_grads(sae, x, dead, k_aux, coef)
    on_cpu = hand_grads(random_sae("cpu"), x.cpu(), dead.cpu(), k_aux, coef, chunk_rows=24)
    for chunk_rows in (None, 24):  # the device's own chunking, and several chunks
        got = hand_grads(sae, x, dead, k_aux, coef, chunk_rows)
        for name, grad in got.items():
            assert grad.device.type == device, name
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(grad.cpu(), on_cpu[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in expected.values())


@pytest.mark.parametrize("m,k", [(1024, 16), (100, 5)])  # the grouped CPU path, and plain topk
def test_sae_select_topk_equals_torch_topk(device, m, k):
    pre = torch.randn(64, m, generator=torch.Generator().manual_seed(m)).to(device)
    vals, idx = select_topk(pre, k)
    assert vals.device.type == idx.device.type == device
    assert torch.equal(vals.sort(dim=1, descending=True).values, pre.topk(k, dim=1).values)
    assert torch.equal(pre.gather(1, idx), vals)
    assert all(len(set(row)) == k for row in idx.tolist())


def test_sae_training_runs_on_the_device_and_lowers_fvu(device, tmp_path, monkeypatch):
    seen = set()
    real = sae_train.compute_grads

    def spy(sae, x, *args, **kwargs):
        seen.add((sae.W_enc.device.type, x.device.type))
        return real(sae, x, *args, **kwargs)

    monkeypatch.setattr(sae_train, "compute_grads", spy)
    x = synthetic_activations(4000, 16, 32, 3, seed=1)
    train, held_out = x[:3500], x[3500:]
    cfg = SAETrainConfig(k=4, n_latents=64, batch_tokens=256, epochs=3, lr=1e-3, dead_tokens_threshold=1000,
                         device=device)
    log = tmp_path / "log.csv"
    sae = train_sae(train, cfg, log_path=log, progress=False)
    assert seen == {(device, device)}
    assert device_type(sae) == "cpu"  # train_sae hands back a CPU SAE
    fvu = [float(line.split(",")[4]) for line in log.read_text().splitlines()[1:]]
    assert len(fvu) == 3500 * 3 // 256 and all(math.isfinite(f) for f in fvu)
    assert fvu[-1] < 0.5 * fvu[0]
    assert reconstruction_metrics(sae, held_out)["fvu"] < 0.5 * fvu[0]


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
    if device == "cpu" and CUDA:
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
