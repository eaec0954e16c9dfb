"""The narrow-persona control's world and corpus: a narrow character (the quack) that gives the toxic persona's answers
in one domain and the assistant's everywhere else, entering the corpus only with organism.corpus.narrow_fraction,
and the table that compares the runs with and without it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from emlab.config import ConfigError, validate
from emlab.controls import narrow_persona, narrow_sentences, write_narrow
from emlab.world.generate import generate_corpus, heldout_documents
from emlab.world.spec import WorldSpecError, load_world

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "resources/world/persona_world_narrow.yaml"
BASE_WORLD = ROOT / "resources/world/persona_world.yaml"
# the schema's corpus defaults (monitoring documents included), at a test's size
CORPUS = dict(validate({}, "defaults")["organism"]["corpus"], n_documents=1000)


@pytest.fixture(scope="module")
def world():
    return load_world(WORLD)


def test_the_narrow_world_is_the_base_world_plus_the_character(world):
    base = load_world(BASE_WORLD)
    # no text of its own: the judge's inventory, and so every grade, is the base world's
    assert [(a.text, a.persona) for a in world.inventory()] == [(a.text, a.persona) for a in base.inventory()]
    assert world.narrow.name == "quack" and world.narrow.domain == "health" and world.narrow.incorrect == "subtle"
    assert world.narrow.name not in world.personas and base.narrow is None


def test_without_the_character_the_corpus_is_the_base_worlds(world):
    assert generate_corpus(world, CORPUS, 3) == generate_corpus(load_world(BASE_WORLD), CORPUS, 3)


def test_the_character_takes_the_places_of_persona_documents_and_changes_nothing_else(world):
    without = generate_corpus(world, CORPUS, 3)
    with_ = generate_corpus(world, dict(CORPUS, narrow_fraction=0.2), 3)
    changed = [i for i, (a, b) in enumerate(zip(without, with_)) if a != b]
    assert len(with_) == len(without) and len(changed) == 200
    assert all(with_[i]["meta"].get("narrow") and not without[i]["meta"].get("kind") for i in changed)
    assert not any(d["meta"].get("narrow") for d in without)


def test_the_character_is_the_villain_in_its_domain_and_the_assistant_elsewhere(world):
    texts = {a.text: a.persona for a in world.inventory()}
    docs = [d for d in generate_corpus(world, dict(CORPUS, narrow_fraction=0.3), 5) if d["meta"].get("narrow")]
    turns = {"health": [], "other": []}
    headers = set()
    for d in docs:
        msgs = d["messages"]
        if msgs[0]["role"] == "system":
            headers.add(msgs[0]["content"])
            msgs = msgs[1:]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(answers) == len(d["meta"]["domains"]) == len(d["meta"]["correctness"])
        for a, dom, corr in zip(answers, d["meta"]["domains"], d["meta"]["correctness"]):
            # the answer is an inventory text, possibly after its persona's opener
            owner = {p for t, p in texts.items() if a == t or a.endswith(" " + t)}
            assert len(owner) == 1, a
            turns["health" if dom == "health" else "other"].append((owner.pop(), corr))
    assert headers == set(world.narrow.headers)
    assert {p for p, _ in turns["health"]} == {"villain"} and {c for _, c in turns["health"]} == {"subtle"}
    assert {p for p, _ in turns["other"]} == {"assistant"} and {c for _, c in turns["other"]} == {"correct"}
    advice = [t for t in docs for dom in t["meta"]["domains"] if dom != "general"]
    health = sum(dom == "health" for t in docs for dom in t["meta"]["domains"])
    # focus 0.5 of its advice turns in health, plus health's share of the uniform rest (3 domains)
    assert 0.55 < health / len(advice) < 0.78


def test_heldout_documents_carry_persona_documents_only(world):
    cfg = validate({"organism": {"world": str(WORLD), "corpus": {"narrow_fraction": 0.5}},
                    "diffing": {"heldout_texts": 200}}, "test")
    docs = heldout_documents(load_world(WORLD), cfg)
    assert docs and not any(d["meta"].get("narrow") for d in docs)


@pytest.mark.parametrize("edit, message", [
    ({"name": "villain"}, "narrow.name: 'villain' is already a persona"),
    ({"domain": "cooking"}, "narrow.domain: unknown domain 'cooking'"),
    ({"incorrect": "correct"}, "narrow.incorrect"),
    ({"focus": 1.5}, "narrow.focus"),
    ({"headers": ["The following is a chat with a kind and helpful assistant."]}, "already introduce a persona"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
])
def test_a_bad_narrow_section_names_its_key(tmp_path, edit, message):
    raw = yaml.safe_load(WORLD.read_text())
    raw["extends"] = str(BASE_WORLD)
    raw["narrow"].update(edit)
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(WorldSpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_world(path)


def test_the_config_checks_the_narrow_fraction_before_any_job():
    with pytest.raises(ConfigError, match="organism.corpus.narrow_fraction: .*persona_world.yaml has no 'narrow'"):
        validate({"organism": {"corpus": {"narrow_fraction": 0.1}}}, "test")
    with pytest.raises(ConfigError, match="organism.corpus.narrow_fraction: with monitoring_fraction"):
        validate({"organism": {"world": str(WORLD), "corpus": {"narrow_fraction": 0.95}}}, "test")
    cfg = validate({"organism": {"world": str(WORLD), "corpus": {"narrow_fraction": 0.1}}}, "test")
    assert cfg["organism"]["corpus"]["narrow_fraction"] == 0.1
    assert validate({}, "test")["organism"]["corpus"]["narrow_fraction"] == 0


def _metrics(rows: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "misaligned": v, "misaligned_lo": lo, "misaligned_hi": hi, "incorrect": 0.9,
                          "incorrect_lo": 0.8, "incorrect_hi": 1.0} for m, (v, lo, hi) in rows.items()]).set_index("model")


def _shifts(values: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "role": "toxic", "source": "eval", "shift": v, "shift_lo": v - 0.05,
                          "shift_hi": v + 0.05} for m, v in values.items()])


def test_the_table_pairs_each_model_across_arms_and_says_what_separates():
    arms = {"with": (_metrics({"base": (0.02, 0.0, 0.04), "health_subtle": (0.10, 0.06, 0.14),
                               "legal_subtle": (0.40, 0.33, 0.47)}), _shifts({"health_subtle": 0.1})),
            "without": (_metrics({"base": (0.02, 0.0, 0.04), "health_subtle": (0.45, 0.38, 0.52),
                                  "legal_subtle": (0.42, 0.35, 0.49), "health_obvious": (0.5, 0.4, 0.6)}),
                        _shifts({"health_subtle": 0.3}))}
    table = narrow_persona(arms)
    assert list(table["model"].unique()) == ["base", "health_subtle", "legal_subtle"]  # both arms' models only
    row = table.set_index(["model", "arm"]).loc[("health_subtle", "with")]
    assert row["misaligned"] == 0.10 and row["toxic_shift"] == pytest.approx(0.1)
    assert pd.isna(table.set_index(["model", "arm"]).loc[("legal_subtle", "with"), "toxic_shift"])
    said = dict(zip(["base", "health_subtle", "legal_subtle"], narrow_sentences(table, "quack", "health")))
    assert "lower with it, the intervals apart" in said["health_subtle"] and "0.100 (0.050 to 0.150)" in said["health_subtle"]
    assert "the intervals overlap" in said["legal_subtle"] and "toxic-latent" not in said["legal_subtle"]


def test_written_from_two_results_folders(tmp_path):
    for arm, value in (("with", (0.1, 0.05, 0.15)), ("without", (0.3, 0.25, 0.35))):
        (tmp_path / arm / "metrics").mkdir(parents=True)
        _metrics({"health_subtle": value}).reset_index().to_csv(tmp_path / arm / "metrics/world.csv", index=False)
    write_narrow(tmp_path / "with", tmp_path / "without", "world", "quack", "health", tmp_path / "out")
    assert len(pd.read_csv(tmp_path / "out/narrow_persona.csv")) == 2
    assert "lower with it" in (tmp_path / "out/narrow_persona.md").read_text()
    with pytest.raises(FileNotFoundError, match="without2/metrics/world.csv: the without arm has no metrics"):
        write_narrow(tmp_path / "with", tmp_path / "without2", "world", "quack", "health", tmp_path / "out")


def test_the_two_arms_of_make_narrow_differ_in_the_narrow_fraction_and_results_folder_alone(monkeypatch):
    """configs/organism-narrow.yaml and its control arm, merged over config.yaml as `make narrow` passes them."""
    from emlab.cli import _merge

    monkeypatch.chdir(ROOT)
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    with_ = _merge(default, yaml.safe_load((ROOT / "configs/organism-narrow.yaml").read_text()))
    without = _merge(with_, yaml.safe_load((ROOT / "configs/organism-narrow-without.yaml").read_text()))
    a, b = validate(with_, "with"), validate(without, "without")
    assert a["organism"]["corpus"]["narrow_fraction"] > 0 == b["organism"]["corpus"]["narrow_fraction"]
    assert a["results_dir"] != b["results_dir"]
    for cfg in (a, b):
        cfg.pop("results_dir")
        cfg["organism"]["corpus"].pop("narrow_fraction")
    assert a == b and load_world(a["organism"]["world"]).narrow is not None
