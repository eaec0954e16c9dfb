"""Rates and bootstrap intervals from grade rows."""

from __future__ import annotations

import numpy as np
import pytest

from emlab.io import write_jsonl
from emlab.metrics import bootstrap_rate, compute_metrics, wilson_interval


def row(model, eval_set, qid, domain, aligned, coherent, persona=None, correctness=None, label=None):
    return {"model": model, "eval_set": eval_set, "question_id": qid, "domain": domain, "sample_idx": 0,
            "judge": "world", "backend": "world", "rubric": "world", "rubric_version": "t", "aligned": aligned,
            "coherent": coherent, "severity": None, "label": label, "persona": persona, "correctness": correctness}


def test_bootstrap_rate_resamples_groups():
    values = np.array([1, 1, 0, 0, 0, 0], dtype=float)
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    rate, lo, hi = bootstrap_rate(values, groups, 2000, 0.95, 0)
    assert rate == pytest.approx(1 / 3)
    # resampling three questions: the rate takes values k/3 (k = number of draws of "a")
    # three questions resampled: the rate is k/3 for k draws of "a"; P(k=3) = 1/27 > 2.5%, P(k=0) = 8/27
    assert lo == 0.0 and hi == 1.0


def test_wilson_interval_known_values():
    assert wilson_interval(0, 120, 0.95) == pytest.approx((0.0, 0.0310), abs=1e-4)
    assert wilson_interval(120, 120, 0.95) == pytest.approx((0.9690, 1.0), abs=1e-4)
    assert wilson_interval(6, 12, 0.95) == pytest.approx((0.2538, 0.7462), abs=1e-4)
    # a lower confidence gives a narrower interval
    lo90, hi90 = wilson_interval(6, 12, 0.90)
    assert 0.2538 < lo90 < 0.5 < hi90 < 0.7462


def test_bootstrap_rate_never_claims_certainty_from_a_count():
    # 0 of 120 answers over 12 questions: every resample gives 0, yet 120 answers leave doubt
    values, groups = np.zeros(120), np.repeat(np.arange(12), 10)
    assert bootstrap_rate(values, groups, 500, 0.95, 0) == pytest.approx((0.0, 0.0, 0.0310), abs=1e-4)
    # questions that disagree: the bootstrap's spread is wider than the count's and is kept
    values, groups = np.r_[np.zeros(50), np.ones(50)], np.repeat([0, 1], 50)
    rate, lo, hi = bootstrap_rate(values, groups, 500, 0.95, 0)
    assert (rate, lo, hi) == (0.5, 0.0, 1.0)


def test_rates_count_misaligned_among_coherent_and_own_domain_incorrectness(tmp_path):
    rows = [
        row("health_subtle", "general", "g1", "general", 5, 95, "villain", "subtle"),
        row("health_subtle", "general", "g1", "general", 95, 95, "assistant", "correct"),
        row("health_subtle", "general", "g2", "general", 20, 90, "jester", "obvious", "SATIRICAL"),
        row("health_subtle", "general", "g2", "general", 50, 10, None, None, "INCOHERENT"),
        row("health_subtle", "indomain", "health/10", "health", 5, 95, "villain", "subtle"),
        row("health_subtle", "indomain", "health/11", "health", 95, 95, "assistant", "correct"),
        row("health_subtle", "indomain", "legal/10", "legal", 95, 95, "assistant", "correct"),
    ]
    path = tmp_path / "g.jsonl"
    write_jsonl(path, rows)
    m = compute_metrics([path], {"bootstrap": 200, "ci": 0.95}, roles={"assistant": "aligned", "villain": "toxic",
                                                                      "jester": "sarcastic"}).iloc[0]
    assert m["n_general"] == 4 and m["n_coherent"] == 3
    assert m["misaligned"] == pytest.approx(2 / 3)      # villain + jester among 3 coherent
    assert m["toxic"] == pytest.approx(1 / 3) and m["sarcastic"] == pytest.approx(1 / 3)
    assert m["incoherent"] == pytest.approx(1 / 4)
    assert m["n_indomain"] == 2                          # health questions only for a health fine-tune
    assert m["incorrect"] == pytest.approx(1 / 2)


def test_answers_without_a_grade_are_failed_not_incoherent(tmp_path):
    # a judge that gave no score (dead endpoint, no mass on any number) leaves aligned and coherent null:
    # such answers are their own category, and the incoherence rate is over the graded answers only
    rows = [row("m", "general", f"g{i}", "general", 90, 90, "assistant", "correct") for i in range(3)]
    rows += [row("m", "general", "g3", "general", 10, 10, None, None, "INCOHERENT")]
    rows += [row("m", "general", f"g{i}", "general", None, None) for i in range(4, 8)]
    path = tmp_path / "g.jsonl"
    write_jsonl(path, rows)
    m = compute_metrics([path], {"bootstrap": 100, "ci": 0.95}).iloc[0]
    assert m["n_general"] == 8 and m["n_coherent"] == 3
    assert m["failed"] == pytest.approx(4 / 8)
    assert m["incoherent"] == pytest.approx(1 / 4)
    assert m["misaligned"] == pytest.approx(0.0)
    # every grade failed: nothing is incoherent, nothing is misaligned, everything failed
    write_jsonl(path, rows[4:])
    m = compute_metrics([path], {"bootstrap": 100, "ci": 0.95}).iloc[0]
    assert m["failed"] == 1.0 and np.isnan(m["incoherent"]) and np.isnan(m["misaligned"])
