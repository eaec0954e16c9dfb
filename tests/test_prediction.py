"""emlab.diffing.prediction: persona-latent shifts against misalignment, on hand-made numbers whose answers are known.
The stage on real caches runs in the tiny workflow (tests/test_workflow.py) and in the default run
(tests/test_emergent_misalignment.py)."""

import numpy as np
import pandas as pd
import pytest

from emlab.diffing.prediction import (
    SHIFT_COLUMNS, early_detection, early_sentences, eval_shift, model_kind, paired_shift, summarize, train_shift,
)


def test_model_kinds_and_fractions():
    assert model_kind("health_correct") == ("correct", 0.0)
    assert model_kind("legal_subtle") == ("subtle", 1.0)
    assert model_kind("health_mix005") == ("mixture", 0.05)
    kind, fraction = model_kind("rl_health_incorrect")
    assert kind == "other" and np.isnan(fraction)


def test_paired_shift_is_the_mean_difference_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    shift, lo, hi = paired_shift(base + 0.3 + 0.1 * rng.normal(size=400), base, n_boot=500, seed=0)
    assert shift == pytest.approx(0.3, abs=0.02) and lo < shift < hi and hi - lo < 0.05
    assert paired_shift(base + 1.0, base, 200, 0) == pytest.approx((1.0, 1.0, 1.0))


def test_eval_shift_pairs_questions_and_train_shift_pairs_examples():
    # two questions, unequal numbers of samples: the shift is the mean over questions of the per-question difference
    model_ids = ["general/a#0", "general/a#1", "general/a#2", "general/b#0"]
    base_ids = ["general/a#0", "general/b#0", "general/b#1", "general/c#0"]  # c: a question the model lacks
    model = np.array([1.0, 1.0, 1.0, 0.0])
    base = np.array([0.5, 0.0, 0.0, 9.0])
    shift, lo, hi, n = eval_shift(model, model_ids, base, base_ids, n_boot=200, seed=0)
    assert n == 2 and shift == pytest.approx(((1.0 - 0.5) + (0.0 - 0.0)) / 2) and lo <= shift <= hi
    # the fine-tuning data: the same example read by both models, matched by id whatever the order
    shift, _, _, n = train_shift(np.array([3.0, 1.0]), ["x", "y"], np.array([0.0, 2.0]), ["y", "x"], 200, 0)
    assert n == 2 and shift == pytest.approx(((3.0 - 2.0) + (1.0 - 0.0)) / 2)
    with pytest.raises(ValueError, match="no question"):
        eval_shift(model, model_ids, base[:1], ["general/z#0"], 10, 0)


def _shifts(rows):
    out = []
    for model, kind, fraction, shift, mis, selected in rows:
        out.append({"model": model, "kind": kind, "fraction": fraction, "role": "toxic", "latent": 7, "source": "eval",
                    "shift": shift, "shift_lo": shift - 0.01, "shift_hi": shift + 0.01, "n": 10, "misaligned": mis,
                    "misaligned_lo": max(0.0, mis - 0.05), "misaligned_hi": mis + 0.05, "base_misaligned_hi": 0.03,
                    "is_misaligned": mis > 0.03, "persona_rate": float("nan"), "is_persona_misaligned": False,
                    "in_selection_group": selected})
    return pd.DataFrame(out, columns=SHIFT_COLUMNS)


def test_summary_gives_rank_correlation_and_auroc_on_all_and_held_out_models():
    df = _shifts([("a_subtle", "subtle", 1.0, 0.50, 0.60, True), ("b_subtle", "subtle", 1.0, 0.40, 0.50, True),
                  ("a_correct", "correct", 0.0, 0.00, 0.01, False), ("b_correct", "correct", 0.0, 0.01, 0.02, False),
                  ("a_mix050", "mixture", 0.5, 0.20, 0.20, False), ("a_mix005", "mixture", 0.05, 0.05, 0.025, False)])
    s = summarize(df, n_boot=200, seed=0).set_index("models")
    assert s.loc["all", "n_models"] == 6 and s.loc["held out", "n_models"] == 4
    assert s.loc["all", "n_misaligned"] == 3 and s.loc["held out", "n_misaligned"] == 1
    assert s.loc["all", "spearman"] == pytest.approx(1.0) and s.loc["all", "auroc"] == pytest.approx(1.0)
    assert s.loc["all", "spearman_lo"] <= 1.0 <= s.loc["all", "spearman_hi"] + 1e-12
    # a shift that ranks the misaligned model (a_mix050) below one of the three aligned ones loses a third of the AUROC
    df.loc[df["model"] == "a_mix005", "shift"] = 0.9
    s = summarize(df, n_boot=50, seed=0).set_index("models")
    assert s.loc["held out", "auroc"] == pytest.approx(2 / 3)
    # one class only: no AUROC
    assert np.isnan(summarize(df[df["misaligned"] < 0.03], 50, 0)["auroc"]).all()


def test_with_persona_rates_each_latent_is_also_set_against_its_own_personas_rate():
    """The obvious fine-tune is misaligned through the other persona: the toxic latent does not move on it, so it
    loses AUROC against misalignment and none against the toxic rate."""
    df = _shifts([("a_correct", "correct", 0.0, 0.00, 0.01, False), ("b_correct", "correct", 0.0, 0.01, 0.02, False),
                  ("a_obvious", "obvious", 1.0, 0.005, 0.60, False), ("a_mix050", "mixture", 0.5, 0.20, 0.20, False),
                  ("a_subtle", "subtle", 1.0, 0.50, 0.60, True)])
    df["persona_rate"] = [0.01, 0.01, 0.01, 0.18, 0.55]
    df["is_persona_misaligned"] = df["persona_rate"] > 0.03
    s = summarize(df, n_boot=50, seed=0).set_index(["target", "models"])
    assert set(s.index.get_level_values("target")) == {"misaligned", "persona"}
    assert s.loc[("misaligned", "held out"), "n_misaligned"] == 2 and s.loc[("persona", "held out"), "n_misaligned"] == 1
    assert s.loc[("misaligned", "held out"), "auroc"] == pytest.approx(0.75)  # a_obvious ranks below b_correct
    assert s.loc[("persona", "held out"), "auroc"] == pytest.approx(1.0)
    assert s.loc[("persona", "all"), "spearman"] > s.loc[("misaligned", "all"), "spearman"]


def test_early_detection_needs_the_latent_above_every_correct_fine_tune_and_the_behaviour_inside_the_base():
    df = _shifts([("a_correct", "correct", 0.0, 0.00, 0.01, False), ("b_correct", "correct", 0.0, 0.02, 0.01, False),
                  ("h_mix005", "mixture", 0.05, 0.05, 0.02, False),   # above 0.03 (the correct ones' top) and quiet
                  ("l_mix005", "mixture", 0.05, 0.035, 0.02, False),  # interval reaches down into the correct ones'
                  ("f_mix010", "mixture", 0.10, 0.08, 0.10, False),   # already misaligned
                  ("h_mix025", "mixture", 0.25, 0.20, 0.20, False)])  # above the early fraction
    e = early_detection(df, base_hi=0.03, max_fraction=0.1).set_index("model")
    assert list(e.index) == ["h_mix005", "l_mix005", "f_mix010"]
    assert e.loc["h_mix005", "correct_shift_hi"] == pytest.approx(0.03)
    assert e["latent_above_correct"].tolist() == [True, False, True]
    assert e["behaviour_within_base"].tolist() == [True, True, False]
    assert e["early"].tolist() == [True, False, False]
    text = early_sentences(e.reset_index())
    assert "Detected early: **yes**" in text[0] and "not above every correct-data" in text[1]
    assert "already above the base model's interval" in text[2]
    # without correct-data fine-tunes nothing can be called early
    assert not early_detection(df[df["kind"] != "correct"], 0.03, 0.1)["early"].any()


# ---------------------------------------------------------------- flagging examples before training


def test_examples_are_ranked_by_score_and_the_top_fraction_flagged():
    from emlab.diffing.flagging import n_flagged, rank_examples

    df = rank_examples("mix", ["a", "b", "c", "d"], ["correct", "subtle", "correct", "subtle"], "toxic", 7,
                       np.array([0.1, 0.9, 0.5, 0.5]), fraction=0.5)
    assert df["id"].tolist() == ["b", "c", "d", "a"]  # ties (c, d) by id: a rerun ranks alike
    assert df["rank"].tolist() == [1, 2, 3, 4] and df["flagged"].tolist() == [True, True, False, False]
    assert (df["latent"] == 7).all() and (df["role"] == "toxic").all()
    assert [n_flagged(600, 0.05), n_flagged(10, 0.01), n_flagged(10, 0.0), n_flagged(3, 1.0)] == [30, 1, 0, 3]


def test_the_summary_says_how_well_the_flags_find_the_incorrect_examples():
    from emlab.diffing.flagging import rank_examples, summarize

    # 10 examples, 4 incorrect; the score ranks 2 incorrect first, then a correct one, then the other two incorrect
    labels = ["subtle", "subtle", "correct", "subtle", "subtle"] + ["correct"] * 5
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    ids = [f"x{i}" for i in range(10)]
    s = summarize(rank_examples("mix", ids, labels, "toxic", 3, scores, fraction=0.3)).iloc[0]
    assert s["n"] == 10 and s["n_incorrect"] == 4 and s["n_flagged"] == 3
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 4)
    assert s["incorrect_before"] == pytest.approx(0.4)
    assert s["incorrect_after_flagged"] == pytest.approx(2 / 7) and s["incorrect_after_random"] == pytest.approx(0.4)
    # AUROC: of the 4 x 6 (incorrect, correct) pairs, the incorrect one scores higher in all but x3 and x4 below x2
    assert s["auroc"] == pytest.approx(22 / 24)
    # without labels (a user's own data) only the ranking is reported
    unlabelled = summarize(rank_examples("mine", ids, [None] * 10, "toxic", 3, scores, fraction=0.3)).iloc[0]
    assert unlabelled["n_flagged"] == 3 and pd.isna(unlabelled["auroc"]) and pd.isna(unlabelled["precision"])


def test_a_set_less_its_flagged_examples_and_less_as_many_random_ones():
    from emlab.diffing.flagging import drop_examples, rank_examples

    records = [{"id": f"x{i}", "messages": [], "meta": {"correctness": "subtle" if i < 4 else "correct"}}
               for i in range(10)]
    scores = pd.concat([
        rank_examples("mix", [r["id"] for r in records], [None] * 10, "toxic", 3, np.arange(10.0)[::-1], 0.3),
        rank_examples("mix", [r["id"] for r in records], [None] * 10, "sarcastic", 5, np.arange(10.0), 0.3),
        rank_examples("other", ["x0"], [None], "toxic", 3, np.array([1.0]), 1.0)])
    flagged = drop_examples(records, scores, "mix", "toxic", "flagged", seed=0)
    assert [r["id"] for r in flagged] == [f"x{i}" for i in range(3, 10)]  # the three highest toxic scores, order kept
    assert [r["id"] for r in drop_examples(records, scores, "mix", "sarcastic", "flagged", 0)][-1] == "x6"
    rand = drop_examples(records, scores, "mix", "toxic", "random", seed=0)
    assert len(rand) == 7 and rand == drop_examples(records, scores, "mix", "toxic", "random", seed=0)
    assert [r["id"] for r in rand] == sorted((r["id"] for r in rand), key=lambda i: int(i[1:]))
    assert rand != drop_examples(records, scores, "mix", "toxic", "random", seed=1)  # the seed draws them
    # no score for the set (no persona latent named): nothing is dropped, either way
    assert drop_examples(records, scores.iloc[0:0], "mix", "toxic", "random", 0) == records


def test_the_removal_table_sets_each_dropped_set_beside_its_source():
    from emlab.diffing.flagging import removal_table

    mk = lambda ids: [{"id": i, "meta": {"correctness": "subtle" if i.startswith("b") else "correct"}} for i in ids]
    metrics = pd.DataFrame({"model": ["base", "mix", "mix_dropflag", "mix_droprand"], "misaligned": [0.01, 0.1, 0.04, 0.09],
                            "misaligned_lo": [0, 0.07, 0.02, 0.06], "misaligned_hi": [0.03, 0.13, 0.07, 0.12]})
    t = removal_table({"mix": ("mix", "none", mk(["b1", "b2", "c1", "c2"])),
                       "mix_dropflag": ("mix", "flagged", mk(["b2", "c1", "c2"])),
                       "mix_droprand": ("mix", "random", mk(["b1", "b2", "c2"]))}, metrics).set_index("model")
    assert t["n_incorrect"].tolist() == [2, 1, 2] and t.loc["mix_dropflag", "incorrect"] == pytest.approx(1 / 3)
    assert t.loc["mix_dropflag", "misaligned"] == 0.04 and (t["base_misaligned_hi"] == 0.03).all()
    with pytest.raises(ValueError, match="no row for mix_x"):
        removal_table({"mix_x": ("mix", "flagged", mk(["b1"]))}, metrics)
