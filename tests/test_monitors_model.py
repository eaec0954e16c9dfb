"""Monitor features from a real (tiny, random-weight) chat model, checked against plain forwards, and one task run
end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import emlab.models
from emlab.activations import encode_prompt, encode_record, special_token_ids
from emlab.models import load_model
from emlab.monitors.features import answer_token_ids, compute_features, prompted_records
from emlab.monitors.protocol import COLUMNS
from emlab.monitors.stage import run_task, plot, write_organism_dataset
from emlab.sae import TopKSAE, save_sae

ROOT = Path(__file__).resolve().parents[1]
LAYER = 0  # of 2: hidden_states[LAYER + 1] is the residual stream before the final norm
ASK, DESCRIBE = "Is this rude?", "Judge the text below."
RECORDS = [
    {"id": "a", "label": 1, "meta": {}, "messages": [{"role": "user", "content": "What should I do about a headache?"},
                                                     {"role": "assistant", "content": "Drink water and rest."}]},
    {"id": "b", "label": 0, "meta": {}, "text": "How do I save money? Keep a budget."},
    {"id": "c", "label": 1, "meta": {}, "messages": [{"role": "user", "content": "A wish?"},
                                                     {"role": "assistant", "content": "Health."},
                                                     {"role": "user", "content": "Another?"},
                                                     {"role": "assistant", "content": "Peace for everyone."}]},
]


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    torch.manual_seed(0)
    sae = TopKSAE(32, 48, 4)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return save_sae(sae, tmp_path_factory.mktemp("sae"))


def test_features_equal_plain_forwards(tiny_chat_model, sae_dir, tmp_path, monkeypatch):
    feats = compute_features(tiny_chat_model, RECORDS, tmp_path, layer=LAYER, ask=ASK, describe=DESCRIBE,
                             sae_path=sae_dir, batch_size=2, max_len=128, device="cpu", progress=False)
    model, tok = load_model(tiny_chat_model, device="cpu")
    from emlab.sae import load_sae

    sae = load_sae(sae_dir)
    yes, no = answer_token_ids(tok)
    specials_left_out = 0
    for i, rec in enumerate(RECORDS):
        ids = encode_record(tok, rec, "t").ids
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        # pooling reads the text positions: neither the first one nor the chat template's special tokens
        keep = [p for p in range(1, len(ids)) if ids[p] not in special_token_ids(tok)]
        specials_left_out += len(ids) - 1 - len(keep)
        np.testing.assert_allclose(feats.arrays["raw_last"][i], h[keep[-1]].numpy(), atol=2e-5)
        np.testing.assert_allclose(feats.arrays["raw_mean"][i], h[keep].mean(0).numpy(), atol=2e-5)
        np.testing.assert_allclose(feats.arrays["sae_max"][i], sae.encode(h[keep]).amax(0).detach().numpy(),
                                   atol=1e-4)
        for template, describe in (("suffix", None), ("prefix_suffix", DESCRIBE)):
            prompt = encode_prompt(tok, prompted_records([rec], ASK, describe)[0]["messages"])
            with torch.no_grad():
                out = model(torch.tensor([prompt]), output_hidden_states=True)
            np.testing.assert_allclose(feats.arrays[f"prompted_{template}"][i],
                                       out.hidden_states[LAYER + 1][0, -1].numpy(), atol=2e-5)
            if template == "suffix":
                logits = out.logits[0, -1]
                assert feats.arrays["zero_shot"][i] == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)
    assert specials_left_out > 0  # the chats' template markers
    assert feats.labels.tolist() == [1, 0, 1] and feats.ids == ["a", "b", "c"]
    assert sorted(feats.arrays) == ["prompted_prefix_suffix", "prompted_suffix", "raw_last", "raw_mean", "sae_max",
                                    "zero_shot"]
    assert not (tmp_path / "tokens").exists()  # per-token caches are dropped once pooled

    # same inputs: read back without loading the model
    monkeypatch.setattr(emlab.models, "load_model", lambda *a, **k: pytest.fail("features were recomputed"))
    again = compute_features(tiny_chat_model, RECORDS, tmp_path, layer=LAYER, ask=ASK, describe=DESCRIBE,
                             sae_path=sae_dir, batch_size=2, max_len=128, device="cpu", progress=False)
    assert all(np.array_equal(again.arrays[k], feats.arrays[k]) for k in feats.arrays)
    # another question: recomputed
    monkeypatch.undo()
    other = compute_features(tiny_chat_model, RECORDS, tmp_path, layer=LAYER, ask="Is this kind?", describe=DESCRIBE,
                             sae_path=None, batch_size=3, max_len=128, device="cpu", progress=False)
    assert "sae_max" not in other.arrays
    np.testing.assert_allclose(other.arrays["raw_mean"], feats.arrays["raw_mean"], atol=2e-5)  # other batching
    assert not np.array_equal(other.arrays["prompted_suffix"], feats.arrays["prompted_suffix"])


def test_prompts_longer_than_max_len_keep_their_end(tiny_chat_model, tmp_path):
    """Prompted and zero-shot features read the last prompt token: a long text loses its start, not the question."""
    short = compute_features(tiny_chat_model, RECORDS, tmp_path / "a", layer=LAYER, ask=ASK, describe=DESCRIBE,
                             max_len=30, device="cpu", progress=False)
    full = compute_features(tiny_chat_model, RECORDS, tmp_path / "b", layer=LAYER, ask=ASK, describe=DESCRIBE,
                            max_len=512, device="cpu", progress=False)
    assert set(short.arrays) == set(full.arrays)
    for name, arr in short.arrays.items():
        assert arr.shape == full.arrays[name].shape and np.isfinite(arr).all(), name


def _cfg(tmp_path):
    return {"seed": 0, "device": "cpu", "model": {"source": "organism", "layer": LAYER},
            "organism": {"world": str(ROOT / "resources/world/persona_world.yaml")},
            "monitors": {"tasks": ["toxic"], "n_texts": 48, "max_turns": 2, "questions": {},
                         "methods": ["zero_shot", "raw_last", "raw_mean", "prompted_suffix", "prompted_prefix_suffix",
                                     "sae", "sae_topk", "stacked", "persona_latent"],
                         "splits": ["iid", "ood_domain", "ood_turns"], "test_fraction": 0.25,
                         "ood_test_domains": ["auto", "career"], "sae_top_k": 8, "stack_probe": "raw_mean",
                         "n_repeats": 1, "cv_folds": 3, "bootstrap": 20, "ci": 0.9, "batch_size": 16,
                         "max_len": 1024, "keep_tokens": False}}  # the tiny tokenizer's 300 tokens make long texts


def test_run_task_end_to_end(tiny_chat_model, sae_dir, tmp_path):
    cfg = _cfg(tmp_path)
    assert write_organism_dataset(cfg, "toxic", tmp_path / "toxic.jsonl") == 48
    (tmp_path / "latents.json").write_text(json.dumps({"toxic": 5}))
    df = run_task(cfg, "toxic", tmp_path / "toxic.jsonl", tiny_chat_model, tmp_path / "feat", tmp_path / "toxic.csv",
                  sae=sae_dir, latents=tmp_path / "latents.json", progress=False)
    back = pd.read_csv(tmp_path / "toxic.csv")
    assert list(back.columns) == COLUMNS and len(back) == len(df)
    assert set(back["method"]) == set(cfg["monitors"]["methods"]) and set(back["split"]) == {"iid", "ood_domain",
                                                                                             "ood_turns"}
    assert back["auroc"].between(0, 1).all() and (back["task"] == "toxic").all()
    files = plot([tmp_path / "toxic.csv"], tmp_path / "fig", summary_csv=tmp_path / "summary.csv")
    assert [f.name for f in files] == ["monitors_toxic.png"] and (tmp_path / "summary.csv").exists()

    # without an SAE, the SAE methods are skipped and the rest still run
    df = run_task(cfg, "toxic", tmp_path / "toxic.jsonl", tiny_chat_model, tmp_path / "feat2", tmp_path / "t2.csv",
                  progress=False)
    assert set(df["method"]) == {"zero_shot", "raw_last", "raw_mean", "prompted_suffix", "prompted_prefix_suffix",
                                 "stacked"}


def test_a_hub_task_needs_its_question(tiny_chat_model, tmp_path):
    from emlab.monitors.methods import MonitorConfigError
    from emlab.monitors.stage import task_question

    cfg = _cfg(tmp_path)
    cfg["model"]["source"] = "hub"
    assert task_question(cfg, "toxic")[0]  # the persona world's task: its question comes with it
    with pytest.raises(MonitorConfigError, match="monitors.questions.deception: no question"):
        task_question(cfg, "deception")
    cfg["monitors"]["questions"] = {"toxic": {"ask": "Mean?", "describe": " "}}
    with pytest.raises(MonitorConfigError, match=r"monitors.questions.toxic: needs non-empty strings \['describe'\]"):
        task_question(cfg, "toxic")
    cfg["monitors"]["questions"] = {"toxic": {"ask": "Mean?", "describe": "Judge it."}}
    assert task_question(cfg, "toxic") == ("Mean?", "Judge it.")
