"""Preventative steering (emlab.prevent): the callback adds its vector to the residual stream while a real
SFTTrainer trains and never after, the vector's length and direction, the names and the plan's checks, and the table
against the plain and re-aligned models."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from emlab.datasets import model_domain, prevent_model_name, prevent_source
from emlab.models import load_model
from emlab.prevent import PreventativeSteering, examples_seen, persona_vector, sentences, summarize
from emlab.sae.topk import TopKSAE
from emlab.sft import train_sft

RECORDS = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"The answer to question {i} is rest."}]} for i in range(16)]
QUESTIONS = ["How do I save money?", "What should I eat?", "Is it safe to drive fast?"]


def block_output(model, ids, layer=0):
    """The residual stream after block ``layer`` as the next block gets it: read by a hook registered last, after
    any hook that edits the output (transformers' own hidden_states are recorded before those)."""
    from emlab.arch import layer_hidden, residual_module, unwrap

    got = []
    handle = residual_module(unwrap(model), layer).register_forward_hook(lambda m, a, out: got.append(layer_hidden(out)))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return got[0]


def test_the_vector_is_added_at_every_position_only_while_attached(tiny_chat_model):
    model, _ = load_model(str(tiny_chat_model), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    vector = torch.arange(32, dtype=torch.float32) / 10
    plain = block_output(model, ids)
    steer = PreventativeSteering(vector, layer=0)
    steer.on_train_begin(None, None, None, model=model)
    steered = block_output(model, ids)
    torch.testing.assert_close(steered - plain, vector.expand_as(plain), rtol=1e-5, atol=1e-5)
    steer.on_train_begin(None, None, None, model=model)  # a resumed run attaches again: still added once
    torch.testing.assert_close(block_output(model, ids), steered)
    steer.on_train_end(None, None, None, model=model)
    torch.testing.assert_close(block_output(model, ids), plain)
    with pytest.raises(ValueError, match="16 dimensions.*32"):
        PreventativeSteering(torch.ones(16), 0).attach(model)


def test_training_with_the_vector_learns_a_different_model_that_runs_without_it(tiny_chat_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = {"method": "lora", "lr": 5e-2, "batch_size": 4, "max_steps": 4, "lora": {"r": 4, "alpha": 8}}
    plain = train_sft(str(tiny_chat_model), str(data), str(tmp_path / "plain"), cfg, seed=0, threads=1)
    again = train_sft(str(tiny_chat_model), str(data), str(tmp_path / "again"), cfg, seed=0, threads=1)
    steer = PreventativeSteering(torch.full((32,), 3.0), layer=0)
    steered = train_sft(str(tiny_chat_model), str(data), str(tmp_path / "steered"), cfg, seed=0, threads=1,
                        callbacks=[steer])
    assert again["first_loss"] == plain["first_loss"]  # same seed, same run: the test can see a change
    assert steered["first_loss"] != plain["first_loss"]  # the vector was in the training forward
    assert steer._handle is None  # removed at the end of training
    ids = torch.tensor([[5, 6, 7, 8]])
    models = {n: load_model(str(tiny_chat_model), str(tmp_path / n), device="cpu")[0] for n in ("plain", "steered")}
    outs = {n: block_output(m, ids) for n, m in models.items()}
    assert not torch.allclose(outs["plain"], outs["steered"])  # a different adapter was learnt
    base, _ = load_model(str(tiny_chat_model), device="cpu")
    # loaded with no callback, the steered adapter's layer-0 output is within LoRA's reach of the base's, not 3 away
    assert (outs["steered"] - block_output(base, ids)).abs().mean() < 1.0


def test_the_persona_vector_is_alpha_residual_norms_along_the_decoder_direction(tiny_chat_model, tmp_path):
    from emlab.sae import save_sae
    from emlab.steer.generate import prompt_chat
    from emlab.steer.intervene import residual_norm

    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 8)
    with torch.no_grad():
        sae.W_dec.normal_(0, 1.0)
    save_sae(sae, tmp_path / "sae")
    (tmp_path / "persona.json").write_text(json.dumps({"toxic": {"latent": 5}}))
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    cfg = {"seed": 3, "device": "cpu", "model": {"dtype": "auto", "layer": 1, "exclude_tokens": []}}
    args = (cfg, str(tiny_chat_model), str(tmp_path / "sae"), str(tmp_path / "persona.json"),
            str(tmp_path / "general.jsonl"))
    vector, info = persona_vector(*args, "toxic", 2.0)
    model, tok = load_model(str(tiny_chat_model), device="cpu")
    norm = residual_norm(model, tok, [prompt_chat(q) for q in QUESTIONS], 1, exclude=[])
    assert info["latent"] == 5 and info["residual_norm"] == pytest.approx(norm, rel=1e-5)
    assert float(vector.norm()) == pytest.approx(2.0 * norm, rel=1e-5)
    decoder = sae.W_dec[5].detach()
    assert float(torch.nn.functional.cosine_similarity(vector, decoder, dim=0)) == pytest.approx(1.0, abs=1e-5)
    random, rinfo = persona_vector(*args, "random", 2.0)
    assert rinfo["latent"] is None and float(random.norm()) == pytest.approx(2.0 * norm, rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(random, decoder, dim=0))) < 0.9
    with pytest.raises(ValueError, match=r"prevent\.latents.*'sarcastic'.*\['toxic'\]"):
        persona_vector(*args, "sarcastic", 1.0)


def test_names_round_trip_and_keep_the_domain():
    assert prevent_model_name("health_subtle", "toxic", 2) == "health_subtle_prevent_toxic_2"
    assert prevent_model_name("legal_mix025", "random", 0.5) == "legal_mix025_prevent_random_0p5"
    assert prevent_source("legal_mix025_prevent_random_0p5") == ("legal_mix025", "random", 0.5)
    assert prevent_source("health_subtle") is None
    assert model_domain("health_subtle_prevent_toxic_2") == "health"
    with pytest.raises(ValueError, match="positive"):
        prevent_model_name("health_subtle", "toxic", 0)


def test_the_plan_names_a_model_per_set_latent_and_strength_and_checks_them():
    from emlab.config import ConfigError, validate
    from emlab.plan import make_plan

    def plan(prevent, **extra):
        cfg = {"datasets": {"domains": ["health"], "variants": ["correct", "subtle"]}, "prevent": prevent, **extra}
        return make_plan(validate(cfg))

    p = plan({"datasets": ["health_subtle"], "latents": ["toxic", "random"], "alphas": [1, 0.5]})
    assert p.prevent == {
        "health_subtle_prevent_toxic_1": {"dataset": "health_subtle", "latent": "toxic", "alpha": 1.0},
        "health_subtle_prevent_toxic_0p5": {"dataset": "health_subtle", "latent": "toxic", "alpha": 0.5},
        "health_subtle_prevent_random_1": {"dataset": "health_subtle", "latent": "random", "alpha": 1.0},
        "health_subtle_prevent_random_0p5": {"dataset": "health_subtle", "latent": "random", "alpha": 0.5}}
    assert set(p.prevent) <= set(p.models) and set(p.prevent) <= set(p.undiffed)
    assert p.diffed == ["health_correct", "health_subtle"]
    assert plan({"datasets": ["health_subtle"], "latents": ["subtle"]}).prevent  # a diffing group's top latent
    with pytest.raises(ConfigError, match=r"prevent\.datasets.*legal_subtle"):
        plan({"datasets": ["legal_subtle"]})
    with pytest.raises(ConfigError, match=r"prevent\.latents.*\['villain'\]"):
        plan({"datasets": ["health_subtle"], "latents": ["villain"]})
    with pytest.raises(ConfigError, match=r"prevent\.datasets.*needs diffing and a judge"):
        plan({"datasets": ["health_subtle"]}, judges=[])
    with pytest.raises(ConfigError, match=r"prevent\.alphas"):
        plan({"datasets": ["health_subtle"], "alphas": [0]})
    assert plan({}).prevent == {}


def test_the_table_sets_each_model_beside_the_plain_one_at_its_compute():
    metrics = pd.DataFrame({
        "model": ["base", "health_subtle", "health_subtle_prevent_toxic_1", "health_subtle_prevent_random_1"],
        "misaligned": [0.01, 0.6, 0.1, 0.3], "misaligned_lo": [0.0, 0.5, 0.05, 0.2],
        "misaligned_hi": [0.03, 0.7, 0.15, 0.4], "incoherent": [0.0, 0.02, 0.04, 0.05],
        "incorrect": [0.0, 1.0, 0.5, 0.8], "incorrect_lo": [0.0, 0.9, 0.4, 0.7], "incorrect_hi": [0.1, 1.0, 0.6, 0.9],
    }).set_index("model")
    meta = {"steps": 76, "n_examples": 600, "cfg": {"epochs": 2, "batch_size": 16, "grad_accum": 1, "max_steps": None}}
    prevent = {"health_subtle_prevent_toxic_1": {"dataset": "health_subtle", "latent": "toxic", "alpha": 1.0},
               "health_subtle_prevent_random_1": {"dataset": "health_subtle", "latent": "random", "alpha": 1.0}}
    realign = pd.DataFrame({"run": ["health_subtle_to_health_correct"], "model": ["health_subtle"],
                            "benign": ["health_correct"], "end_misaligned": [0.03], "end_misaligned_lo": [0.01],
                            "end_misaligned_hi": [0.06], "end_incorrect": [0.02], "end_incorrect_lo": [0.0],
                            "end_incorrect_hi": [0.08], "steps": [50], "examples_seen": [200]})
    metas = {m: meta for m in ["health_subtle", *prevent]}
    t = summarize(prevent, metrics, metas, realign, base_hi=0.03)
    assert t["method"].tolist() == ["plain", "prevent", "prevent", "realign (health_correct)"]
    assert t["steps"].tolist() == [76, 76, 76, 126] and t["examples_seen"].tolist() == [1200, 1200, 1200, 1400]
    assert t["misaligned"].tolist() == [0.6, 0.1, 0.3, 0.03] and t["incorrect"].iloc[:3].tolist() == [1.0, 0.5, 0.8]
    assert t["incorrect"].iloc[3] == 0.02 and t["incorrect_hi"].iloc[3] == 0.08
    assert (t["base_misaligned_hi"] == 0.03).all()
    text = " ".join(sentences(t))
    assert "the toxic latent's direction added at 1x" in text and "a random direction added at 1x" in text
    assert "10.0% misaligned (5.0%-15.0%) against 60.0%" in text and "in-domain incorrect 50.0% against 100.0%" in text
    assert "3.0% misaligned (1.0%-6.0%); in-domain incorrect 2.0%" in text
    assert np.isnan(summarize(prevent, metrics, metas, realign.drop(columns=["end_incorrect"]), 0.03)["incorrect"].iloc[3])
    assert examples_seen({"steps": 7, "n_examples": 600, "cfg": {"epochs": 3, "batch_size": 4, "max_steps": 7}}) == 28
