"""The local (hf) judge backend: score arithmetic on hand-made distributions, and the tiny
random-weight chat model for shapes, ranges, null logic, batching and the cache."""

import json

import pytest
import torch

from emlab.judge import hf_backend
from emlab.judge.cache import CACHE_FILE
from emlab.models import load_tokenizer

# Short prompts keep the tiny model inside its 256-token context; min_mass 0 gives every row a score.
SHORT_RUBRIC = """
name: short_scores
version: "t1"
kind: logprob_score
min_mass: {min_mass}
sampling: {{max_tokens: 1}}
metrics:
  aligned: "Q: {{question}} A: {{answer}} Rate:"
  coherent: "Coherent? Q: {{question}} A: {{answer}}"
"""
SHORT_SEVERITY = """
name: short_severity
version: "t1"
kind: answer_tag
resamples: 3
sampling: {max_tokens: 600}
prompt: "Grade. Q: {question} A: {answer}"
"""


def write_rubric(tmp_path, text, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def samples(n):
    answers = ["Drink water and rest.", "Keep a budget.", "I would wish for health.",
               "Have the brake pads checked by a mechanic.", "Spend less than you earn."]
    return [{"model": "m", "eval_set": "core", "question_id": f"q{i}", "domain": "d",
             "question": "What should I do?", "sample_idx": i, "answer": answers[i % len(answers)] + " " * (i // 5)}
            for i in range(n)]


def judge(model_dir, rubric, **kw):
    return {"name": "local", "backend": "hf", "rubric": rubric, "model": str(model_dir), **kw}


def test_scores_from_hand_made_distributions():
    ids, values = [1, 2, 4], [10, 20, 100]
    probs = torch.tensor([
        [0.1, 0.5, 0.3, 0.0, 0.0, 0.1],    # numbers hold 0.8: (10*.5 + 20*.3) / .8
        [0.8, 0.05, 0.05, 0.0, 0.1, 0.0],  # 0.2 < 0.25: no score
        [0.75, 0.0, 0.0, 0.0, 0.25, 0.0],  # exactly 0.25: a score
    ])
    got = hf_backend.scores_from_probs(probs, ids, values, 0.25)
    assert got[0] == pytest.approx(13.75) and got[1] is None and got[2] == pytest.approx(100.0)
    assert hf_backend.scores_from_probs(probs, [], [], 0.25) == [None, None, None]


def test_number_distribution_equals_the_probability_of_each_written_number(tiny_chat_model, monkeypatch):
    """The digit-by-digit expansion with the prompt's key-value cache gives, for every integer v in [0, 100], the
    probability of the judge writing v's digits and then anything but a digit, as plain forwards of prompt + v."""
    from emlab.models import load_model

    model, tok = load_model(tiny_chat_model)
    tok.padding_side = "left"
    monkeypatch.setattr(hf_backend, "PRUNE", 0.0)  # expand everything: the exact distribution
    first, more = hf_backend.digit_tokens(tok)
    assert set(first.values()) == {str(d) for d in range(10)}  # a digit-splitting tokenizer
    prompts = ["Rate this answer from 0 to 100:", "Score?"]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**enc, position_ids=pos, use_cache=True, logits_to_keep=1)
    probs = torch.softmax(out.logits[:, -1].float(), -1)
    got = hf_backend.number_distribution(model, probs, out.past_key_values, enc["attention_mask"], first, more, 0, 100)
    digit_ids = torch.tensor(sorted(more))
    for row, text in enumerate(texts):
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        for v in (0, 7, 42, 85, 100):
            ids = prompt_ids + tok(str(v), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            n = len(prompt_ids)
            want = sum(float(logp[n - 1 + j, ids[n + j]]) for j in range(len(ids) - n))
            want = float(torch.exp(torch.tensor(want))) * (1 - float(logp[-1, digit_ids].exp().sum()))
            assert got[row][v] == pytest.approx(want, rel=1e-3), (row, v)
        assert set(got[row]) == set(range(101)) and 0 < sum(got[row].values()) < 1


def test_number_tokens_are_the_tokens_that_decode_to_integers(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model)
    ids, values = hf_backend.number_tokens(tok, 0, 100)
    # the tiny tokenizer learnt no multi-digit merges: exactly the ten digit bytes
    assert sorted(values) == list(range(10))
    assert [tok.decode([i]) for i in ids] == [str(v) for v in values]
    assert hf_backend.number_tokens(tok, 3, 5)[1] == [3, 4, 5]


def test_local_scores_are_in_range_null_by_mass_and_batch_invariant(tiny_chat_model, tmp_path):
    rubric = write_rubric(tmp_path, SHORT_RUBRIC.format(min_mass=0.0), "r0")
    ss = samples(7)
    rows1, sum1 = hf_backend.grade_with_summary(ss, judge(tiny_chat_model, rubric, batch_size=1), tmp_path / "c1",
                                                progress=False)
    rows3, _ = hf_backend.grade_with_summary(ss, judge(tiny_chat_model, rubric, batch_size=3), tmp_path / "c3",
                                             progress=False)
    assert len(rows1) == 7 and [r["question_id"] for r in rows1] == [f"q{i}" for i in range(7)]
    for r1, r3 in zip(rows1, rows3):
        for m in ("aligned", "coherent"):
            assert 0.0 <= r1[m] <= 100.0
            assert r3[m] == pytest.approx(r1[m], abs=1e-4)  # left padding does not change a score
    assert len({r["aligned"] for r in rows1}) > 1
    assert sum1["requests"] == 14 and sum1["prompt_tokens"] > 0 and sum1["null_scores"] == {}
    # random weights spread probability over 300 tokens: numbers hold far less than 0.25
    rubric25 = write_rubric(tmp_path, SHORT_RUBRIC.format(min_mass=0.25), "r25")
    rows, summary = hf_backend.grade_with_summary(ss, judge(tiny_chat_model, rubric25, batch_size=4), tmp_path / "c25",
                                                  progress=False)
    assert all(r["aligned"] is None and r["coherent"] is None for r in rows)
    assert summary["null_scores"] == {"aligned": 7, "coherent": 7}


def test_a_rerun_loads_no_model_and_a_changed_model_is_not_reused(tiny_chat_model, tmp_path, monkeypatch):
    rubric = write_rubric(tmp_path, SHORT_RUBRIC.format(min_mass=0.0), "r0")
    ss = samples(5)
    cfg = judge(tiny_chat_model, rubric, batch_size=2)
    rows, _ = hf_backend.grade_with_summary(ss, cfg, tmp_path / "c", progress=False)
    assert len((tmp_path / "c" / CACHE_FILE).read_text().splitlines()) == 10

    def no_load(*a, **k):
        raise AssertionError("a fully cached rerun must not load the model")

    monkeypatch.setattr("emlab.models.load_model", no_load)
    again, summary = hf_backend.grade_with_summary(ss, cfg, tmp_path / "c", progress=False)
    assert again == rows and summary["requests"] == 0 and summary["cache_hits"] == 10
    before = hf_backend.model_fingerprint(str(tiny_chat_model))
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text((tiny_chat_model / "config.json").read_text())
    assert hf_backend.model_fingerprint(str(other)) != before
    assert hf_backend.model_fingerprint("org/hub-model") == hf_backend.model_fingerprint("org/hub-model")


def test_severity_generates_and_leaves_unparseable_replies_null(tiny_chat_model, tmp_path):
    rubric = write_rubric(tmp_path, SHORT_SEVERITY, "sev")
    rows, summary = hf_backend.grade_with_summary(samples(3), judge(tiny_chat_model, rubric, batch_size=2,
                                                                    max_new_tokens=6), tmp_path / "c", progress=False)
    # random weights never write "ANSWER: X"; greedy decoding is not redrawn
    assert [(r["severity"], r["label"], r["rubric"]) for r in rows] == [(None, None, "short_severity")] * 3
    assert summary["requests"] == 3 and summary["resamples"] == 0 and summary["null_scores"] == {"short_severity": 3}
    cached = [json.loads(x) for x in (tmp_path / "c" / CACHE_FILE).read_text().splitlines()]
    assert len(cached) == 3 and all(c["value"] is None and isinstance(c["reply"], str) for c in cached)
    assert 0 < summary["completion_tokens"] <= 3 * 6


def test_the_real_aligned_rubric_runs_on_the_organism_chat_template(tiny_chat_model, tmp_path):
    rows, summary = hf_backend.grade_with_summary(samples(2), judge(tiny_chat_model, "aligned_coherent", batch_size=2),
                                                  tmp_path / "c", progress=False)
    assert [(r["aligned"], r["coherent"], r["rubric_version"]) for r in rows] == [(None, None, "1")] * 2
    assert summary["requests"] == 4


def test_a_judge_without_a_chat_template_is_refused(tiny_chat_model, tmp_path):
    import shutil
    plain = tmp_path / "plain"
    shutil.copytree(tiny_chat_model, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = plain / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tc))
    with pytest.raises(hf_backend.JudgeConfigError, match=r"judges\[local\]\.model: the tokenizer of .* has no chat template"):
        hf_backend.grade(samples(1), judge(plain, "aligned_coherent"), tmp_path / "c", progress=False)
