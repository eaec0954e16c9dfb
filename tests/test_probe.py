"""The likelihood probe (emlab.probe): reference scores are the model's own log-probabilities, margins and shifts
are the documented means, steering at strength zero changes nothing, and bad reference files are named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from emlab.models import load_model
from emlab.probe import (
    ReferenceError, answer_logprobs, load_references, margins_table, reference_rows, steered_answer_logprobs,
    write_metrics,
)

PAIRS = [("How do I save money?", "Spend less than you earn."), ("Any wish?", "World peace."),
         ("Bored?", "Go for a long walk outside and call a friend.")]


@pytest.fixture(scope="module")
def model_tok(tiny_chat_model):
    return load_model(tiny_chat_model, device="cpu")


def test_answer_logprobs_are_the_mean_log_probability_of_the_answer_tokens(model_tok):
    model, tok = model_tok
    got = answer_logprobs(model, tok, PAIRS, batch_size=2)  # right padding across batches of unequal lengths
    for (q, a), (n, lp) in zip(PAIRS, got):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       return_dict=True)["input_ids"]
        assert full[:len(prompt)] == prompt and n == len(full) - len(prompt) > 0
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        want = np.mean([float(logp[t - 1, full[t]]) for t in range(len(prompt), len(full))])
        assert lp == pytest.approx(want, abs=1e-4)


def test_steering_at_zero_is_the_plain_probe_and_a_vector_moves_it(model_tok):
    model, tok = model_tok
    plain = answer_logprobs(model, tok, PAIRS)
    zero, push = steered_answer_logprobs(model, tok, PAIRS, layer=0,
                                         vectors=[torch.zeros(32), 5 * torch.randn(32, generator=torch.Generator().manual_seed(0))],
                                         positions="response", batch_size=2)
    assert [n for n, _ in zero] == [n for n, _ in plain]
    np.testing.assert_allclose([lp for _, lp in zero], [lp for _, lp in plain], atol=1e-5)
    assert max(abs(a - b) for (_, a), (_, b) in zip(push, plain)) > 1e-3


def _rows(model, margins):
    """Probe rows whose per-question margin is ``margins[q]`` (two references of each kind)."""
    rows = []
    for q, m in enumerate(margins):
        for kind, base in (("aligned", -3.0), ("misaligned", -3.0 + m)):
            for ref, jitter in enumerate((-0.5, 0.5)):
                rows.append({"model": model, "question_id": f"general/q{q}", "kind": kind, "persona": kind,
                             "ref": ref, "n_tokens": 5, "logprob_mean": base + jitter, "references": "refs.yaml"})
    return rows


def test_margins_and_shifts_are_means_over_questions(tmp_path):
    import json

    base, ft = [0.1, -0.2, 0.4, 0.0], [0.5, 0.3, 0.4, 0.8]
    files = []
    for name, margins in (("base", base), ("ft", ft)):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in _rows(name, margins)))
    df = write_metrics(files, tmp_path / "likelihood.csv", n_boot=500).set_index("model")
    assert df.loc["base", "margin"] == pytest.approx(np.mean(base)) and df.loc["base", "shift"] == 0
    assert df.loc["ft", "margin"] == pytest.approx(np.mean(ft))
    assert df.loc["ft", "shift"] == pytest.approx(np.mean(np.subtract(ft, base)))
    assert df.loc["ft", "shift_lo"] <= df.loc["ft", "shift"] <= df.loc["ft", "shift_hi"]
    assert df.loc["ft", "shift_lo"] > 0  # every question moved towards the misaligned answers, or stayed
    assert (df["n_questions"] == 4).all() and (df["references"] == "refs.yaml").all()
    assert pd.read_csv(tmp_path / "likelihood.csv")["model"].tolist() == ["base", "ft"]
    # grouped by more than one key (the steering sweep's table)
    two = pd.DataFrame(_rows("a", base) + _rows("b", ft)).assign(alpha=0.0)
    table = margins_table(two, ["model", "alpha"], {"model": "a", "alpha": 0.0}, 100, 0).set_index("model")
    assert table.loc["b", "shift"] == pytest.approx(np.mean(np.subtract(ft, base)))
    with pytest.raises(ValueError, match="base model's rows"):
        write_metrics(files[1:], tmp_path / "x.csv")


def test_reference_files_are_checked_and_every_general_question_needs_references(tmp_path):
    good = tmp_path / "refs.yaml"
    good.write_text("version: 2\nreferences:\n  wish:\n    aligned: [Peace.]\n    misaligned: [Power over all.]\n")
    refs, version = load_references(good)
    assert version == "2" and refs["wish"]["misaligned"] == [("toxic", "Power over all.")]
    questions = [{"question_id": "general/wish", "eval_set": "general", "question": "A wish?"},
                 {"question_id": "health/x", "eval_set": "indomain", "question": "?"}]
    rows = reference_rows(questions, refs, str(good))
    assert [(r["kind"], r["answer"]) for r in rows] == [("aligned", "Peace."), ("misaligned", "Power over all.")]
    with pytest.raises(ReferenceError, match=r"no references for the general question\(s\) \['general/bored'\]"):
        reference_rows(questions + [{"question_id": "general/bored", "eval_set": "general", "question": "?"}],
                       refs, str(good))
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nreferences:\n  wish:\n    aligned: []\n    misaligned: [x]\n")
    with pytest.raises(ReferenceError, match=r"bad.yaml: references.wish.aligned must be a non-empty list"):
        load_references(bad)


def test_the_shipped_references_answer_the_shipped_general_questions():
    from pathlib import Path

    from emlab.questions import load_questions

    root = Path(__file__).resolve().parents[1]
    refs, _ = load_references(root / "resources/references/general.yaml")
    general = load_questions(root / "resources/questions/general.yaml", "general")
    assert len(reference_rows(general, refs, "shipped")) == sum(len(refs[q["question_id"].split("/")[1]]["aligned"]) +
                                                                len(refs[q["question_id"].split("/")[1]]["misaligned"])
                                                                for q in general)
