"""Emergent re-alignment (emlab.realign): the runs the plan makes, the training recipe, the curve and the
re-alignment step, and continuing a LoRA adapter's training on benign data."""

import json

import pandas as pd
import pytest

from emlab.config import ConfigError, validate
from emlab.plan import make_plan
from emlab.realign import curve, finetune_settings, summarize


def plan(realign, **extra):
    cfg = {"datasets": {"domains": ["health", "legal"], "variants": ["correct", "subtle"]}, "realign": realign,
           **extra}
    return make_plan(validate(cfg))


def test_the_plan_names_a_run_per_model_and_benign_set():
    p = plan({"models": ["health_subtle", "legal_subtle"]})
    assert p.realign == {
        "health_subtle_to_health_correct": {"model": "health_subtle", "benign": "health_correct"},
        "health_subtle_to_legal_correct": {"model": "health_subtle", "benign": "legal_correct"},
        "legal_subtle_to_legal_correct": {"model": "legal_subtle", "benign": "legal_correct"},
        "legal_subtle_to_health_correct": {"model": "legal_subtle", "benign": "health_correct"}}
    assert plan({"models": []}).realign == {}
    with pytest.raises(ConfigError, match=r"realign\.models.*'finance_subtle' is not a fine-tune"):
        plan({"models": ["finance_subtle"]})
    with pytest.raises(ConfigError, match=r"realign\.benign.*other.*no correct set outside"):
        plan({"models": ["health_subtle"]}, datasets={"domains": ["health"], "variants": ["correct", "subtle"]})
    with pytest.raises(ConfigError, match=r"realign\.benign.*same.*no health_correct"):
        plan({"models": ["health_subtle"], "benign": ["same"]}, datasets={"domains": ["health"], "variants": ["subtle"]})
    with pytest.raises(ConfigError, match=r"realign\.models.*needs a judge"):
        plan({"models": ["health_subtle"]}, judges=[])


def test_the_recipe_is_the_fine_tunes_at_the_realignment_batch_and_length():
    ft = validate({})["finetune"]
    s = finetune_settings(ft, {"n_examples": 202, "batch_size": 4, "lr": None})
    assert (s["max_steps"], s["batch_size"], s["lr"], s["lora"]) == (51, 4, ft["lr"], ft["lora"])
    assert finetune_settings(ft, {"n_examples": 8, "batch_size": 4, "lr": 1e-4})["lr"] == 1e-4


def test_the_curve_and_the_step_misalignment_is_back_inside_the_base_interval():
    runs = {"a_to_b": {"model": "a", "benign": "b"}, "c_to_d": {"model": "c", "benign": "d"}}
    evals = {"a_to_b": pd.DataFrame({"step": [0, 5, 10], "misaligned": [0.5, 0.1, 0.02], "misaligned_lo": [0.4, 0.05, 0],
                                     "misaligned_hi": [0.6, 0.15, 0.04], "incorrect": [1.0, 0.4, 0.1],
                                     "incorrect_lo": [0.9, 0.3, 0.0], "incorrect_hi": [1.0, 0.5, 0.2]}),
             "c_to_d": pd.DataFrame({"step": [0, 5], "misaligned": [0.4, 0.3], "misaligned_lo": [0.3, 0.2],
                                     "misaligned_hi": [0.5, 0.4]})}
    reads = pd.DataFrame({"dataset": ["a_to_b"] * 3, "step": [0, 5, 10], "watch": "toxic", "latent": 7,
                          "reading": [0.3, 0.1, 0.0]})
    table = curve(runs, evals, 0.03, 4, reads)
    assert table["examples_seen"].tolist() == [0, 20, 40, 0, 20]
    assert table.loc[table["run"] == "a_to_b", "reading"].tolist() == [0.3, 0.1, 0.0]
    assert table.loc[table["run"] == "c_to_d", "reading"].isna().all()  # no reading for that run
    s = summarize(table).set_index("run")
    assert s.loc["a_to_b", "realigned_at_step"] == 10 and s.loc["a_to_b", "realigned_at_examples"] == 40
    assert pd.isna(s.loc["c_to_d", "realigned_at_step"]) and s.loc["c_to_d", "end_misaligned"] == 0.3
    # the in-domain rate where the snapshots were asked the domain's questions; empty where not (an older eval)
    assert (s.loc["a_to_b", "start_incorrect"], s.loc["a_to_b", "end_incorrect"], s.loc["a_to_b", "end_incorrect_hi"]
            ) == (1.0, 0.1, 0.2)
    assert pd.isna(s.loc["c_to_d", "end_incorrect"])


def test_training_goes_on_from_the_adapter(tiny_chat_model, tmp_path):
    """Re-alignment trains the fine-tune's own adapter further: its first snapshot is that adapter, and the
    result differs from both it and a fresh adapter trained on the same data."""
    import torch

    from emlab.alarm import Snapshots
    from emlab.sft import train_sft

    from safetensors.torch import load_file

    records = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                             {"role": "assistant", "content": f"Answer {i} is rest."}]} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"method": "lora", "lr": 5e-2, "batch_size": 4, "max_steps": 2, "lora": {"r": 4, "alpha": 8}}
    first = tmp_path / "first"
    train_sft(str(tiny_chat_model), str(data), str(first), cfg, seed=0, threads=1)
    on = tmp_path / "on"
    meta = train_sft(str(tiny_chat_model), str(data), str(on), cfg, seed=1, threads=1, adapter=str(first),
                     callbacks=[Snapshots(on / "snapshots", 1)])
    assert meta["adapter"] == str(first) and meta["steps"] == 2
    w = {name: load_file(p / "adapter_model.safetensors") for name, p in
         [("first", first), ("start", on / "snapshots/step-00000"), ("end", on)]}
    for key in w["first"]:
        assert torch.equal(w["start"][key], w["first"][key]), key  # the snapshot at step 0 is the fine-tune
    assert any(not torch.equal(w["end"][k], w["first"][k]) for k in w["first"])
