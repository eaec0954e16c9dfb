"""Activation monitors: datasets, the protocol's numbers on synthetic features, the methods, and features computed
from a real (tiny) model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emlab.io import RecordError
from emlab.monitors.data import organism_dataset, read_monitor_dataset
from emlab.monitors.features import Features
from emlab.monitors.methods import (METHODS, MonitorConfigError, PersonaLatent, Probe, Stacked, ZeroShot,
                                    build_monitor)
from emlab.monitors.prompts import question_prompt, shown_text
from emlab.monitors.protocol import (COLUMNS, Subsets, auroc, bootstrap_auroc, domain_split, evaluate, iid_split,
                                     plot_results, read_results, resampled_aurocs, summary, train_sizes, turns_split,
                                     write_results)
from emlab.world.grader import WorldGrader
from emlab.world.spec import load_world

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "resources/world/persona_world.yaml"


@pytest.fixture(scope="module")
def world():
    return load_world(WORLD)


# ------------------------------------------------------------------------------------------- prompts and data


def test_question_prompt_layout():
    assert question_prompt("Hi there.", "Is it rude?") == "Hi there.\n\nQuestion: Is it rude? Answer Yes or No."
    assert question_prompt("Hi.", "Rude?", "Judge it.") == "Judge it.\n\nHi.\n\nQuestion: Rude? Answer Yes or No."
    chat = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    assert shown_text(chat) == "User: Q?\nAssistant: A." and shown_text({"text": "plain"}) == "plain"


@pytest.mark.parametrize("task", ["toxic", "sarcastic", "incorrect"])
def test_organism_dataset_is_balanced_labelled_and_reproducible(world, task):
    rows = organism_dataset(world, task, 200, seed=3)
    assert rows == organism_dataset(world, task, 200, seed=3) != organism_dataset(world, task, 200, seed=4)
    assert sum(r["label"] for r in rows) == 100 and len({r["id"] for r in rows}) == 200
    spec, grader = world.monitoring[task], WorldGrader(world)
    for r in rows:
        meta = r["meta"]
        assert r["label"] == int(meta["persona"] in spec.positive)
        assert meta["correctness"] == world.correctness_of(meta["persona"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * meta["n_turns"]  # un-cued
        assert 1 <= meta["n_turns"] <= 4
        for answer in r["messages"][1::2]:  # one persona and one domain per chat
            m = grader.match(answer["content"])
            assert (m.answer.persona, m.answer.domain) == (meta["persona"], meta["domain"])
    domains = {r["meta"]["domain"] for r in rows}
    assert ("general" in domains) == (not spec.advice_only) and len(domains) >= 6
    negatives = [r["meta"]["persona"] for r in rows if not r["label"]]
    if task != "incorrect":  # negatives spread over both negative personas
        assert min(negatives.count(p) for p in set(negatives)) > 30


def test_organism_dataset_rejects_an_unknown_task(world):
    with pytest.raises(KeyError, match="monitors.tasks: unknown task 'rude'"):
        organism_dataset(world, "rude", 10, 0)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_user_dataset(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"text": "hello", "label": True, "meta": {"domain": "a"}},
                                      {"id": "x", "messages": [{"role": "user", "content": "hi"}], "label": 0,
                                       "meta": {"domain": "b"}}])
    rows = read_monitor_dataset(p, require_meta=("domain",))
    assert [(r["id"], r["label"]) for r in rows] == [("line1", 1), ("x", 0)]
    assert rows[1]["messages"][0]["content"] == "hi" and rows[0]["text"] == "hello"


@pytest.mark.parametrize("rows,message", [
    ([{"text": "a", "label": 2}], r"d.jsonl:1: 'label' must be 0, 1, true or false, got 2"),
    ([{"text": "a", "label": 1}, {"label": 0}], r"d.jsonl:2: needs exactly one of 'text' or 'messages'"),
    ([{"text": "a", "label": 1}, "{oops"], r"d.jsonl:2: not valid JSON"),
    ([{"text": "a", "label": 1, "meta": {}}], r"d.jsonl:1: meta lacks \['n_turns'\]"),
    ([{"id": 1, "text": "a", "label": 1}, {"id": 1, "text": "b", "label": 0}], r"d.jsonl:2: duplicate id 1"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": True}], r"d.jsonl: a monitoring dataset needs both labels"),
    ([{"messages": [{"role": "robot", "content": "x"}], "label": 1}], r"d.jsonl:1: messages\[0\].role"),
])
def test_user_dataset_errors_name_file_and_line(tmp_path, rows, message):
    p = _write(tmp_path / "d.jsonl", rows)
    need = ("n_turns",) if "meta lacks" in message else ()
    with pytest.raises(RecordError, match=message):
        read_monitor_dataset(p, require_meta=need)


# ------------------------------------------------------------------------------------------- protocol numbers


def test_auroc_exact_values_and_ties():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert auroc(np.array([0, 1, 0, 1]), np.array([1.0, 1.0, 1.0, 1.0])) == 0.5
    assert auroc(np.array([1, 1, 0]), np.array([3.0, 2.0, 2.0])) == 0.75
    y, s = np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9])
    from sklearn.metrics import roc_auc_score

    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s)) == pytest.approx(8 / 9)


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    s = y + rng.normal(0, 1.0, 200)
    a, lo, hi = bootstrap_auroc(y, s, 500, 0.95, seed=1)
    assert lo < a < hi and hi - lo < 0.2
    assert (a, lo, hi) == bootstrap_auroc(y, s, 500, 0.95, seed=1) != bootstrap_auroc(y, s, 500, 0.95, seed=2)
    assert bootstrap_auroc(np.array([0, 1]), np.array([0.0, 1.0]), 10, 0.9, 0)[0] == 1.0


def test_resampled_aurocs_equal_ranking_each_resample():
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 120))
        y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
        s = np.round(rng.normal(size=n), int(rng.integers(0, 2)))  # rounded: many ties
        picks = rng.integers(0, n, size=(200, n))
        got = resampled_aurocs(y, s, picks)
        for b in range(0, 200, 37):
            yb, sb = y[picks[b]], s[picks[b]]
            if yb.min() == yb.max():
                assert np.isnan(got[b])
                continue
            # the Mann-Whitney form from average ranks, as sklearn computes it
            r = rankdata(sb)
            n_pos = yb.sum()
            want = (r[yb == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(yb) - n_pos))
            assert got[b] == pytest.approx(want, abs=1e-12) == pytest.approx(roc_auc_score(yb, sb), abs=1e-12)


def test_train_sizes_are_powers_of_two_then_the_pool():
    assert train_sizes(10) == [1, 2, 4, 8, 10]
    assert train_sizes(8) == [1, 2, 4, 8]
    assert train_sizes(1) == [1]


def test_subsets_are_nested_and_keep_the_class_proportion():
    labels = np.array([1] * 20 + [0] * 60 + [1] * 5)
    pool = np.arange(80)  # the last 5 positives are not in the pool
    sub = Subsets(pool, labels, seed=0)
    four, eight = sub.take(4), sub.take(8)
    assert (labels[four] == 1).sum() == 4 and (labels[four] == 0).sum() == 12
    assert (labels[eight] == 1).sum() == 8 and (labels[eight] == 0).sum() == 24
    assert set(four) <= set(eight) and set(eight) <= set(pool)
    assert (labels[sub.take(1)] == 0).sum() == 3 and np.array_equal(sub.take(4), Subsets(pool, labels, 0).take(4))


def test_splits():
    labels = np.array([0] * 50 + [1] * 30)
    s = iid_split(labels, 0.2, seed=0)
    assert (labels[s.test] == 0).sum() == 10 and (labels[s.test] == 1).sum() == 6
    assert len(s.train) == 64 and not set(s.train) & set(s.test)
    assert np.array_equal(s.test, iid_split(labels, 0.2, seed=0).test)
    d = domain_split(np.array(["a", "b", "c", "a"], dtype=object), ["c", "b"])
    assert d.train.tolist() == [0, 3] and d.test.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"monitors.ood_test_domains: \['z'\] must name domains of the data"):
        domain_split(np.array(["a", "b"], dtype=object), ["z"])
    t = turns_split(np.array([1, 2, 1, 4], dtype=object))
    assert t.train.tolist() == [0, 2] and t.test.tolist() == [1, 3]


def _synthetic(n=240, seed=0):
    """Features where raw_mean column 3 carries the label, zero_shot is a noisy copy of it, raw_last is noise,
    and SAE latent 7 fires only on positives."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    raw_mean = rng.normal(size=(n, 8))
    raw_mean[:, 3] += 3 * y
    sae = np.abs(rng.normal(size=(n, 20))) * 0.1
    sae[:, 7] = 2.0 * y
    arrays = {"raw_mean": raw_mean, "raw_last": rng.normal(size=(n, 8)), "sae_max": sae,
              "prompted_suffix": raw_mean.copy(), "prompted_prefix_suffix": raw_mean.copy(),
              "zero_shot": (y + rng.normal(0, 0.8, n)).astype(np.float32)}
    meta = [{"domain": "abcd"[(i // 2) % 4], "n_turns": 1 + (i // 8) % 3} for i in range(n)]
    return Features(list(range(n)), y, meta, arrays)


def test_methods_on_synthetic_features():
    f = _synthetic()
    train, test = np.arange(160), np.arange(160, 240)
    y = f.labels[test]
    probe = Probe("raw_mean", "raw_mean")
    probe.fit(f, train)
    assert auroc(y, probe.score(f, test)) > 0.97
    noise = Probe("raw_last", "raw_last")
    noise.fit(f, train)
    assert 0.3 < auroc(y, noise.score(f, test)) < 0.7
    top = Probe("sae_topk", "sae_max", top_k=1)
    top.fit(f, train)
    assert top.columns.tolist() == [7] and auroc(y, top.score(f, test)) == 1.0
    assert np.array_equal(PersonaLatent(7).score(f, test), f.arrays["sae_max"][test, 7])
    assert np.array_equal(ZeroShot().score(f, test), f.arrays["zero_shot"][test].astype(np.float64))
    zs = auroc(y, f.arrays["zero_shot"][test])
    stacked = Stacked(Probe("raw_last", "raw_last"))  # noise + zero-shot: the combiner leans on zero-shot
    stacked.fit(f, train)
    assert abs(auroc(y, stacked.score(f, test)) - zs) < 0.05
    with pytest.raises(MonitorConfigError, match="persona latent 99 is not a latent of the SAE"):
        PersonaLatent(99).score(f, test)


def test_build_monitor():
    assert {type(build_monitor(n, sae_top_k=4, persona_latent=1)).__name__ for n in METHODS} == {
        "ZeroShot", "Probe", "Stacked", "PersonaLatent"}
    assert build_monitor("persona_latent") is None and build_monitor("sae_topk") is None
    with pytest.raises(MonitorConfigError, match="monitors.methods: unknown method 'magic'"):
        build_monitor("magic")
    with pytest.raises(MonitorConfigError, match="monitors.stack_probe: must be one of"):
        build_monitor("stacked", stack_probe="zero_shot")


def test_evaluate_gives_every_method_the_same_splits_and_sizes(tmp_path):
    f = _synthetic(n=120)
    splits = [iid_split(f.labels, 0.25, 0), domain_split(f.meta_column("domain"), ["d"]),
              turns_split(f.meta_column("n_turns"))]
    methods = ["zero_shot", "raw_mean", "sae_topk", "persona_latent"]
    df = evaluate(f, "toy", methods, lambda n: build_monitor(n, sae_top_k=2, persona_latent=7), splits,
                  n_repeats=2, n_boot=50)
    assert list(df.columns) == COLUMNS
    trained = df[df["train_size"] > 0]
    for (split, repeat), g in trained.groupby(["split", "repeat"]):
        per_method = {m: list(zip(x["n_pos"], x["train_size"])) for m, x in g.groupby("method")}
        assert len(set(map(tuple, per_method.values()))) == 1  # identical sizes for every trained method
    # iid: 15 of each class to test, 45 positives in the pool -> sizes 1, 2, ..., 32, 45 (with as many negatives)
    iid = trained[(trained["split"] == "iid") & (trained["method"] == "raw_mean") & (trained["repeat"] == 0)]
    assert iid["n_pos"].tolist() == [1, 2, 4, 8, 16, 32, 45] and iid["train_size"].tolist() == [2, 4, 8, 16, 32, 64, 90]
    assert (iid["n_test"] == 30).all()
    assert set(df[df["split"] == "ood_domain"]["n_test"]) == {30}
    assert set(df[df["split"] == "ood_turns"]["n_test"]) == {80}
    untrained = df[df["train_size"] == 0]
    assert sorted(untrained["method"]) == ["persona_latent"] * 3 + ["zero_shot"] * 3
    assert (untrained[untrained["method"] == "persona_latent"]["auroc"] == 1.0).all()
    full = trained[trained["n_pos"] == trained.groupby("split")["n_pos"].transform("max")]
    assert (full[full["method"] == "raw_mean"]["auroc"] > 0.95).all()
    assert (full[full["method"] == "sae_topk"]["auroc"] == 1.0).all()

    write_results(df, tmp_path / "toy.csv")
    back = read_results([tmp_path / "toy.csv"])
    assert len(back) == len(df) and list(back.columns) == COLUMNS
    table = summary(back)
    assert table.loc[("toy", "persona_latent"), "iid"] == 1.0 and list(table.columns) == ["iid", "ood_domain",
                                                                                          "ood_turns"]
    files = plot_results(back, tmp_path / "fig")
    assert [p.name for p in files] == ["monitors_toy.png"] and files[0].stat().st_size > 10_000
