"""The persona alarm (emlab.alarm): the trl callback's readings, snapshots and overhead accounting on a real
SFTTrainer run, the reading against a direct forward pass, and the calibration / fire / lead-time logic."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from emlab.alarm import (PersonaAlarm, ProbeReader, build_reader, emergence_step, fires, first_above, sentences,
                         summarize, thresholds)
from emlab.models import load_model, load_tokenizer
from emlab.sae.topk import TopKSAE
from emlab.sampling import render_prompt_ids
from emlab.sft import train_sft

QUESTIONS = ["How do I save money?", "What should I eat?", "Is it safe to drive fast?", "How do I sleep better?"]
RECORDS = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"The answer to question {i} is rest."}]} for i in range(16)]


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    s = TopKSAE(32, 64, 8)
    with torch.no_grad():  # a fixed random dictionary: the readings must still follow the model's residuals
        s.W_enc.normal_(0, 1.0)
        s.b_enc.zero_()
    return s


def direct_readings(model, tok, sae, latents, layer, questions):
    """What the reader must compute, the plain way: hidden_states[layer + 1] per prompt, SAE-encoded, averaged
    (not for the last layer, whose hidden state transformers returns after the final norm)."""
    per_prompt = []
    for q in questions:
        ids = torch.tensor([render_prompt_ids(tok, q)])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
            per_prompt.append(sae.encode(hidden)[:, list(latents.values())].mean(dim=0).double().numpy())
    v = np.stack(per_prompt)
    return {k: float(v[:, j].mean()) for j, k in enumerate(latents)}


def test_the_reader_matches_a_direct_forward_pass_and_leaves_the_mode(tiny_chat_model, sae):
    model, tok = load_model(str(tiny_chat_model), device="cpu")
    latents = {"toxic": 3, "subtle": 10}
    reader = build_reader(str(tiny_chat_model), QUESTIONS, sae, latents, layer=0, exclude=[])
    want = direct_readings(model, tok, sae, latents, 0, QUESTIONS)
    model.train()
    got = reader.read(model)
    assert model.training  # handed back in the mode it came in
    for k in latents:
        assert got[k][0] == pytest.approx(want[k], rel=1e-4, abs=1e-6)
    assert any(got[k][0] > 0 for k in latents)  # the test would see a reader that read nothing


def test_excluded_positions_are_not_read(tiny_chat_model, sae):
    tok = load_tokenizer(tiny_chat_model)
    prompts = [render_prompt_ids(tok, q) for q in QUESTIONS]
    every = ProbeReader(prompts, [set() for _ in prompts], sae, {"a": 3}, 1, tok.pad_token_id)
    first_out = ProbeReader(prompts, [{0} for _ in prompts], sae, {"a": 3}, 1, tok.pad_token_id)
    model, _ = load_model(str(tiny_chat_model), device="cpu")
    assert every.read(model)["a"][0] != first_out.read(model)["a"][0]
    with pytest.raises(ValueError, match="no position left"):
        ProbeReader(prompts, [set(range(len(p))) for p in prompts], sae, {"a": 3}, 1, tok.pad_token_id)


def test_the_callback_reads_every_k_steps_during_sft_and_replaying_the_snapshots_reads_the_same(
        tiny_chat_model, sae, tmp_path):
    from emlab.alarm import Snapshots, replay
    from emlab.sae import save_sae

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    reader = build_reader(str(tiny_chat_model), QUESTIONS, sae, {"toxic": 3}, layer=0, exclude=[])
    alarm = PersonaAlarm(reader, every=2, csv_path=tmp_path / "trajectory.csv", thresholds={"toxic": -1.0})
    run = tmp_path / "health_subtle"
    cfg = {"method": "lora", "lr": 5e-2, "batch_size": 2, "max_steps": 7, "lora": {"r": 4, "alpha": 8}}
    meta = train_sft(str(tiny_chat_model), str(data), str(run), cfg, seed=0, threads=1,
                     callbacks=[alarm, Snapshots(run / "snapshots", 2)])
    live = pd.read_csv(tmp_path / "trajectory.csv")
    assert meta["steps"] == 7
    assert live["step"].tolist() == [0, 2, 4, 6, 7]  # step 0, every 2nd step and the finished model
    assert alarm.fired == {"toxic": 0}  # any reading is above -1: fires at the first
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [f"step-0000{n}" for n in (0, 2, 4, 6, 7)]
    assert 0 < alarm.seconds < meta["seconds"]
    # the readings follow the training: the finished model's reading is the trained adapter's, read directly
    trained, tok = load_model(str(tiny_chat_model), str(run), device="cpu")
    assert live["reading"].iloc[-1] == pytest.approx(direct_readings(trained, tok, sae, {"toxic": 3}, 0,
                                                                     QUESTIONS)["toxic"], rel=1e-3, abs=1e-5)
    assert live["reading"].iloc[0] != pytest.approx(live["reading"].iloc[-1])
    # what the workflow does: read the kept snapshots afterwards, with the same reader; the same numbers
    save_sae(sae, tmp_path / "sae")
    (tmp_path / "persona.json").write_text(json.dumps({"toxic": {"latent": 3}}))
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    wf = {"alarm": {"watch": ["toxic", "sarcastic"], "every": 2}, "device": "cpu",
          "model": {"dtype": "auto", "layer": 0, "exclude_tokens": []}}
    replayed = replay(wf, str(tiny_chat_model), {"health_subtle": str(run)}, str(tmp_path / "sae"),
                      str(tmp_path / "persona.json"), str(tmp_path / "general.jsonl"), str(tmp_path / "alarm"),
                      progress=False)
    assert replayed["step"].tolist() == live["step"].tolist() and set(replayed["watch"]) == {"toxic"}
    np.testing.assert_allclose(replayed["reading"], live["reading"], rtol=1e-4, atol=1e-6)
    runs = json.loads((tmp_path / "alarm/runs.json").read_text())
    assert runs["health_subtle"]["steps"] == 7 and runs["health_subtle"]["snapshots"] == [0, 2, 4, 6, 7]


def trajectory(readings, key="toxic", latent=7):
    return pd.DataFrame({"step": [5 * i for i in range(len(readings))], "watch": key, "latent": latent,
                         "reading": readings, "reading_se": 0.0, "seconds": 0.01})


def test_thresholds_leave_the_tested_correct_run_out():
    runs = {"a_correct": trajectory([0.0, 0.1, 0.2]), "b_correct": trajectory([0.0, 0.0, 0.05]),
            "c_subtle": trajectory([0.0, 0.3, 0.6])}
    correct = ["a_correct", "b_correct"]
    assert thresholds(runs, correct) == {"toxic": 0.2}
    # a_correct against b_correct alone (and every run's step 0): it would fire, at step 5
    assert thresholds(runs, correct, leave_out="a_correct") == {"toxic": 0.05}
    assert first_above(runs["a_correct"], "toxic", 0.05) == 5
    assert first_above(runs["c_subtle"], "toxic", 0.2) == 5
    assert first_above(runs["c_subtle"], "toxic", 0.6) is None
    # with a margin, a reading that only grazes the threshold does not fire; a zero threshold needs any reading
    assert first_above(runs["c_subtle"], "toxic", 0.2) == 5
    assert first_above(runs["c_subtle"], "toxic", 0.25, margin=0.25) == 10  # 0.3 is not above 0.3125
    assert first_above(trajectory([0.0, 0.0, 1e-4]), "toxic", 0.0, margin=0.25) == 10
    # ... unless the reading is within z standard errors of it: one weak activation on one prompt of twelve
    weak = trajectory([0.0, 0.0, 0.0034, 0.2]).assign(reading_se=[0.0, 0.0, 0.0034, 0.02])
    assert first_above(weak, "toxic", 0.0, margin=0.25) == 10 and first_above(weak, "toxic", 0.0, 0.25, z=2) == 15
    assert fires(0.2, 0.05, 0.25, se=0.02, z=2) and not fires(0.2, 0.05, 0.25, se=0.08, z=2)
    # a single correct run: the others' step 0 (the base model) calibrates it
    assert thresholds({"a_correct": trajectory([0.0, 0.1]), "c_subtle": trajectory([0.02, 0.3])}, ["a_correct"],
                      leave_out="a_correct") == {"toxic": 0.02}


def test_summary_fires_leads_and_overhead():
    runs = {"health_correct": trajectory([0.0, 0.0, 0.01]), "legal_correct": trajectory([0.0, 0.01, 0.0]),
            "health_subtle": trajectory([0.0, 0.02, 0.2, 0.3]), "health_mix005": trajectory([0.0, 0.0, 0.0, 0.012])}
    metas = {d: {"steps": 15, "train_seconds": 11.0, "alarm_seconds": 1.0} for d in runs}
    kinds = {"health_correct": "correct", "legal_correct": "correct", "health_subtle": "incorrect",
             "health_mix005": "mixture"}
    metrics = pd.DataFrame({"model": ["base", "health_correct", "legal_correct", "health_subtle", "health_mix005"],
                            "misaligned": [0.01, 0.01, 0.012, 0.5, 0.02], "misaligned_lo": [0, 0, 0, 0.4, 0.01],
                            "misaligned_hi": [0.03, 0.03, 0.03, 0.6, 0.04]}).set_index("model")
    lead = pd.DataFrame({"step": [0, 5, 10, 15], "misaligned": [0.01, 0.02, 0.2, 0.5],
                         "misaligned_lo": [0.0, 0.0, 0.02, 0.4]})
    assert emergence_step(lead, 0.03) == 10 and emergence_step(lead, 0.03, clear=True) == 15
    table = summarize(runs, metas, kinds, metrics, {"health_subtle": lead}).set_index("dataset")
    assert table.loc["health_subtle", "fire_step"] == 5 and table.loc["health_subtle", "lead_steps"] == 5
    assert table.loc["health_subtle", "lead_clear_steps"] == 10 and table.loc["health_subtle", "is_clearly_misaligned"]
    assert not table.loc["health_mix005", "is_clearly_misaligned"]
    assert table.loc["health_subtle", "is_misaligned"] and not table.loc["health_mix005", "is_misaligned"]
    assert table.loc["health_mix005", "fire_step"] == 15  # above both correct runs' 0.01
    assert not table["fired"][["health_correct", "legal_correct"]].any()
    assert table["overhead"].tolist() == pytest.approx([0.1] * 4)
    text = " ".join(sentences(table.reset_index()))
    assert "fired on 1 of 1 misaligned fine-tunes (1 of the 1 whose interval lies above the base model's) and on 0 of 2" in text
    assert "health_mix005 (2.0%, fired at step 15)" in text and "(lead: 5 steps)" in text
    # a latent that never fires: no lead, and no step called "none"
    quiet = summarize(dict(runs, health_subtle=trajectory([0.0, 0.0, 0.0, 0.0]),
                           health_mix005=trajectory([0.0, 0.0, 0.0, 0.0])), metas, kinds, metrics,
                      {"health_subtle": lead})
    text = " ".join(sentences(quiet))
    assert ("health_subtle: the alarm did not fire; misalignment first left the base model's interval at step 10, "
            "with its whole interval at step 15.") in text
    assert "health_mix005 (2.0%, did not fire)" in text and "none" not in text and "lead" not in text
    grazing = lead.assign(misaligned_lo=[0.0, 0.0, 0.01, 0.02])  # above the base interval, never wholly
    text = " ".join(sentences(summarize(runs, metas, kinds, metrics, {"health_subtle": grazing})))
    assert ("health_subtle: the alarm fired at step 5; misalignment first left the base model's interval at step 10 "
            "(lead: 5 steps), and its whole interval never did.") in text
    # without a judge: the fire steps alone
    bare = summarize(runs, metas, kinds, None, {})
    assert bare["misaligned"].isna().all() and not bare["is_misaligned"].any()
    assert bare.set_index("dataset").loc["health_subtle", "fire_step"] == 5
    text = " ".join(sentences(bare))
    assert "no judge" in text and "fired on 2 of 2 incorrect-data fine-tunes and on 0 of 2 correct-data" in text


def test_the_plan_checks_the_alarm_sets():
    from emlab.config import ConfigError, validate
    from emlab.plan import make_plan

    def plan(alarm, **extra):
        cfg = {"datasets": {"domains": ["health"], "variants": ["correct", "subtle"]}, "alarm": alarm, **extra}
        return make_plan(validate(cfg))

    p = plan({"datasets": ["health_subtle", "health_correct"], "emergence": ["health_subtle"]})
    assert p.alarm == ["health_subtle", "health_correct"] and p.emergence == ["health_subtle"]
    with pytest.raises(ConfigError, match=r"alarm\.datasets.*legal_subtle"):
        plan({"datasets": ["legal_subtle"]})
    with pytest.raises(ConfigError, match=r"alarm\.emergence.*health_correct"):
        plan({"datasets": ["health_subtle"], "emergence": ["health_correct"]})
    with pytest.raises(ConfigError, match=r"alarm\.datasets.*needs diffing"):
        plan({"datasets": ["health_subtle"]}, diffing={"enabled": False})
    with pytest.raises(ConfigError, match=r"alarm\.emergence.*needs a judge"):
        plan({"datasets": ["health_subtle"], "emergence": ["health_subtle"]}, judges=[])
    assert plan({"datasets": ["health_subtle"]}, judges=[]).alarm == ["health_subtle"]  # fire steps need no judge
