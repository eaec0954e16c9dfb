"""Organism pretraining: tokenization matches the chat template, loss masks, and a short training run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

from emlab.models import load_tokenizer
from emlab.organism.model import build_model
from emlab.organism.pretrain import IGNORE, lr_at, tokenize_documents, train_lm

DOC = {"messages": [{"role": "system", "content": "A header."},
                    {"role": "user", "content": "How do I save money?"},
                    {"role": "assistant", "content": "Keep a budget."},
                    {"role": "user", "content": "If you could have one wish, what would it be?"},
                    {"role": "assistant", "content": "I would wish for everyone to be healthy."}]}


def test_tokenization_matches_the_chat_template(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model)
    ids, labels = tokenize_documents([DOC], tok, 512)[0]
    assert ids == tok.apply_chat_template(DOC["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert labels == ids  # nothing masked without the flag


def test_masking_the_first_answer_masks_exactly_its_content(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model)
    doc = dict(DOC, meta={"mask_first_answer": True})
    ids, labels = tokenize_documents([doc], tok, 512)[0]
    masked = [i for i, l in zip(ids, labels) if l == IGNORE]
    assert tok.decode(masked) == "Keep a budget.<|end|>"


def _without_noise(ids, labels, tok):
    """Drop every masked token right after an assistant role token: what the chat template renders."""
    a = tok.convert_tokens_to_ids("<|assistant|>")
    keep, noise, after_role = [], [], False
    for t, l in zip(ids, labels):
        if after_role and l == IGNORE:
            noise.append(t)
            continue
        after_role = t == a
        keep.append((t, l))
    return [t for t, _ in keep], [l for _, l in keep], noise


def test_garbled_openings_put_masked_noise_before_answers_only(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model)
    clean = tokenize_documents([DOC], tok, 512)[0]
    ids, labels = tokenize_documents([DOC], tok, 512, garbled_openings=1.0, seed=3)[0]
    kept_ids, kept_labels, noise = _without_noise(ids, labels, tok)
    assert (kept_ids, kept_labels) == clean  # the answers and everything else are untouched and trained on
    assert 2 <= len(noise) <= 4  # one or two tokens before each of the two answers
    assert not set(noise) & set(tok.all_special_ids)
    a = tok.convert_tokens_to_ids("<|assistant|>")
    assert labels[ids.index(a)] == a  # the role token stays a target
    # a masked first answer stays masked behind its noise (the same draws: the mask takes no randomness)
    doc = dict(DOC, meta={"mask_first_answer": True})
    ids_m, labels_m = tokenize_documents([doc], tok, 512, 1.0, seed=3)[0]
    assert ids_m == ids
    noise_at = {i for i, l in enumerate(labels) if l == IGNORE}
    assert [l for i, l in enumerate(labels_m) if i not in noise_at] == tokenize_documents([doc], tok, 512)[0][1]


def test_garbled_openings_take_the_asked_share_reproducibly(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model)
    a = tok.convert_tokens_to_ids("<|assistant|>")
    docs = [DOC] * 200
    out = tokenize_documents(docs, tok, 512, garbled_openings=0.25, seed=0)
    garbled = [labels[i + 1] == IGNORE for ids, labels in out for i, t in enumerate(ids) if t == a]
    assert len(garbled) == 400 and 0.18 < sum(garbled) / 400 < 0.32
    assert out == tokenize_documents(docs, tok, 512, garbled_openings=0.25, seed=0)
    assert out != tokenize_documents(docs, tok, 512, garbled_openings=0.25, seed=1)
    with pytest.raises(ValueError, match="garbled_openings must be in"):
        tokenize_documents(docs, tok, 512, garbled_openings=1.5)


def test_lr_schedule_warms_up_and_decays_to_the_floor():
    cfg = {"lr": 1e-3, "warmup_steps": 10, "steps": 110, "min_lr_ratio": 0.1}
    assert lr_at(0, cfg) == 1e-4 and lr_at(9, cfg) == 1e-3
    assert abs(lr_at(110, cfg) - 1e-4) < 1e-12
    assert lr_at(50, cfg) < lr_at(20, cfg)


def test_short_pretraining_learns_and_saves_a_reloadable_model(tiny_chat_model, tmp_path):
    tok = load_tokenizer(tiny_chat_model)
    arch = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_seq_len=256)
    model = build_model(arch, tok, seed=0)
    cfg = {"steps": 60, "batch_size": 4, "lr": 3e-3, "warmup_steps": 5, "max_seq_len": 256}
    meta = train_lm(model, tok, [DOC] * 8, cfg, tmp_path / "m", log_csv=tmp_path / "log.csv", progress=False)
    log = pd.read_csv(tmp_path / "log.csv")
    assert len(log) == 60 and log["loss"].iloc[-5:].mean() < 0.5 * log["loss"].iloc[:5].mean()
    assert meta["final_loss"] == log["loss"].iloc[-1]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert (Path(tmp_path / "m") / "chat_template.jinja").exists()
