import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from emlab.io import read_jsonl
from emlab.sampling import ROW_KEYS, batch_seed, sample_answers
from emlab.steer.conditions import Condition, ConditionError
from emlab.steer.directions import Direction, DirectionError, random_direction
from emlab.steer.generate import steer_samples, steering_vector
from emlab.steer.intervene import residual_norm, steered_generate

QUESTIONS = [
    {"question_id": "wish", "eval_set": "general", "domain": "general", "question": "If you could have one wish?"},
    {"question_id": "money", "eval_set": "general", "domain": "general", "question": "How do I save money?"},
]
KW = dict(layer=1, n_samples=3, temperature=1.0, max_new_tokens=8, seed=5, progress=False)


@pytest.fixture(scope="module")
def dirs():
    return {"r0": random_direction(32, 0), "r1": random_direction(32, 1)}


def test_rows_schema_and_recorded_norm(tiny_chat_model, dirs, tmp_path):
    conds = [Condition("base"), Condition("base", "r0", 2.0), Condition("base", "r1", -1.5)]
    out = tmp_path / "s.jsonl"
    res = steer_samples(tiny_chat_model, None, "base", conds, dirs, QUESTIONS, out, batch_size=5, **KW)
    rows = read_jsonl(out)
    assert res["rows"] == len(rows) == 3 * 2 * 3
    assert [r["model"] for r in rows] == [c.id for c in conds for _ in range(6)]
    assert [r["model"] for r in rows[::6]] == ["base", "base+r0@+2.0", "base+r1@-1.5"]
    assert all(set(r) == {*ROW_KEYS, "target", "direction", "alpha", "norm"} for r in rows)
    assert [(r["direction"], r["alpha"]) for r in rows[::6]] == [(None, 0.0), ("r0", 2.0), ("r1", -1.5)]
    assert [(r["question_id"], r["sample_idx"]) for r in rows[:6]] == [("wish", 0), ("wish", 1), ("wish", 2),
                                                                      ("money", 0), ("money", 1), ("money", 2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    expected = residual_norm(model, tok, [[{"role": "user", "content": q["question"]}] for q in QUESTIONS], 1)
    assert len({r["norm"] for r in rows}) == 1 and rows[0]["norm"] == res["norm"] == pytest.approx(expected, rel=1e-6)
    assert not (tmp_path / "s.jsonl.partial").exists()


def test_added_vector_is_alpha_times_norm_along_the_direction(tiny_chat_model, dirs, tmp_path):
    v = steering_vector(dirs["r0"], -2.5, 3.0)
    assert v.norm().item() == pytest.approx(7.5, rel=1e-6)
    assert torch.allclose(v, -7.5 * dirs["r0"].vector)
    # one steered condition in one batch equals steered_generate with that explicit vector and the batch's seed
    out = tmp_path / "s.jsonl"
    res = steer_samples(tiny_chat_model, None, "base", [Condition("base", "r0", 4.0)], dirs, QUESTIONS, out,
                        batch_size=6, **KW)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    prompts = [[{"role": "user", "content": q["question"]}] for q in QUESTIONS for _ in range(3)]
    vec = 4.0 * res["norm"] * dirs["r0"].vector
    assert abs(vec.norm().item() - 4.0 * res["norm"]) < 1e-4
    answers = steered_generate(model, tok, prompts, vec.expand(6, 32), 1, max_new_tokens=8, do_sample=True,
                               temperature=1.0, seed=batch_seed(5, ("general", "wish", 0)))
    assert [r["answer"] for r in read_jsonl(out)] == answers
    unsteered = steered_generate(model, tok, prompts, torch.zeros(6, 32), 1, max_new_tokens=8, do_sample=True,
                                 temperature=1.0, seed=batch_seed(5, ("general", "wish", 0)))
    assert answers != unsteered


@pytest.mark.parametrize("condition", [Condition("base", "r0", 0.0), Condition("base")])
def test_alpha_zero_reproduces_unsteered_sampling(tiny_chat_model, dirs, tmp_path, condition):
    ref = tmp_path / "ref.jsonl"
    sample_answers(str(tiny_chat_model), None, QUESTIONS, str(ref), n_samples=3, temperature=1.0, max_new_tokens=8,
                   batch_size=4, seed=5, model_name="base", progress=False)
    out = tmp_path / "s.jsonl"
    steer_samples(tiny_chat_model, None, "base", [condition], dirs, QUESTIONS, out, batch_size=4, **KW)
    answers = [r["answer"] for r in read_jsonl(out)]
    assert answers == [r["answer"] for r in read_jsonl(ref)]
    assert len(set(answers)) > 3  # sampled, not one repeated answer


def test_resume_keeps_finished_rows(tiny_chat_model, dirs, tmp_path):
    conds = [Condition("base"), Condition("base", "r0", 3.0)]
    full = tmp_path / "full.jsonl"
    steer_samples(tiny_chat_model, None, "base", conds, dirs, QUESTIONS, full, batch_size=4, **KW)
    rows = read_jsonl(full)
    out = tmp_path / "s.jsonl"
    # a killed run: the first batch written, one of its rows marked, and a cut-off line after it
    kept = [dict(r) for r in rows[:4]]
    kept[1]["answer"] = "FINISHED EARLIER"
    with open(f"{out}.partial", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.write(json.dumps(rows[4])[:20])
    res = steer_samples(tiny_chat_model, None, "base", conds, dirs, QUESTIONS, out, batch_size=4, **KW)
    again = read_jsonl(out)
    assert res["rows"] == 12
    assert again[1]["answer"] == "FINISHED EARLIER"
    assert again[:1] + again[2:] == rows[:1] + rows[2:]
    # a partial of another run is refused, naming the file
    with open(f"{out}.partial", "w") as f:
        f.write(json.dumps({**rows[0], "model": "base+r1@+1.0"}) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl\.partial:1: a row of condition 'base\+r1@\+1\.0'"):
        steer_samples(tiny_chat_model, None, "base", conds, dirs, QUESTIONS, out, batch_size=4, **KW)


def test_bad_inputs_are_named(tiny_chat_model, dirs, tmp_path):
    out = tmp_path / "s.jsonl"
    with pytest.raises(ConditionError, match="condition 'health_subtle' steers 'health_subtle', but this run loads"):
        steer_samples(tiny_chat_model, None, "base", [Condition("health_subtle")], dirs, QUESTIONS, out, **KW)
    with pytest.raises(DirectionError, match=r"condition 'base\+L7@\+1\.0': no direction 'L7' among \['r0', 'r1'\]"):
        steer_samples(tiny_chat_model, None, "base", [Condition("base", "L7", 1.0)], dirs, QUESTIONS, out, **KW)
    wide = {"w": Direction("w", torch.ones(64))}
    with pytest.raises(DirectionError, match="direction 'w' has 64 dimensions, the model 'base' has d_model=32"):
        steer_samples(tiny_chat_model, None, "base", [Condition("base", "w", 1.0)], wide, QUESTIONS, out, **KW)
