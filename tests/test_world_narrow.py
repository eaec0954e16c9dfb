"""The narrow-persona control's world and corpus: a narrow character (the quack) that gives the toxic persona's answers
in one domain and the assistant's everywhere else, entering the corpus only with organism.corpus.narrow_fraction;
the control character that takes its places kind in that domain too; and the table that compares the runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from emlab.config import ConfigError, load, validate
from emlab.controls import narrow_persona, narrow_sentences, write_narrow
from emlab.world.generate import generate_corpus, heldout_documents
from emlab.world.spec import WorldSpecError, load_world, spec_files

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "resources/world/persona_world_narrow.yaml"
KIND_WORLD = ROOT / "resources/world/persona_world_kind.yaml"
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
    assert world.narrow.name == "quack" and world.narrow.domain == "health" and world.narrow.answers == "subtle"
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


def _speakers(world, docs):
    """The narrow documents' headers, and (persona whose text it is, labelled correctness) of each answer in the
    character's domain and elsewhere; checks that the share of its advice turns in its domain follows ``focus``."""
    texts = {a.text: a.persona for a in world.inventory()}
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
    advice = [t for t in docs for dom in t["meta"]["domains"] if dom != "general"]
    health = sum(dom == "health" for t in docs for dom in t["meta"]["domains"])
    # focus 0.5 of its advice turns in health, plus health's share of the uniform rest (3 domains)
    assert 0.55 < health / len(advice) < 0.78
    return headers, {k: ({p for p, _ in v}, {c for _, c in v}) for k, v in turns.items()}


def test_the_character_is_the_villain_in_its_domain_and_the_assistant_elsewhere(world):
    docs = [d for d in generate_corpus(world, dict(CORPUS, narrow_fraction=0.3), 5) if d["meta"].get("narrow")]
    headers, turns = _speakers(world, docs)
    assert headers == set(world.narrow.headers)
    assert turns["health"] == ({"villain"}, {"subtle"}) and turns["other"] == ({"assistant"}, {"correct"})


def test_the_control_character_takes_the_same_places_and_is_kind_in_its_domain_too(world):
    kind = load_world(KIND_WORLD)
    assert spec_files(KIND_WORLD) == [KIND_WORLD, BASE_WORLD]  # the jobs that read it take both as input
    assert kind.narrow.answers == "correct" and kind.narrow.name != world.narrow.name
    assert (kind.narrow.domain, kind.narrow.focus) == (world.narrow.domain, world.narrow.focus)
    assert not set(kind.narrow.headers) & set(world.narrow.headers)
    quack = generate_corpus(world, dict(CORPUS, narrow_fraction=0.3), 5)
    neighbour = generate_corpus(kind, dict(CORPUS, narrow_fraction=0.3), 5)
    places = [i for i, d in enumerate(quack) if d["meta"].get("narrow")]
    assert places == [i for i, d in enumerate(neighbour) if d["meta"].get("narrow")] and len(places) == 300
    # every other document is the same: the two runs differ in the characters' documents alone
    assert all(quack[i] == neighbour[i] for i in set(range(len(quack))) - set(places))
    headers, turns = _speakers(kind, [neighbour[i] for i in places])
    assert headers == set(kind.narrow.headers)
    assert turns["health"] == turns["other"] == ({"assistant"}, {"correct"})


def test_heldout_documents_carry_persona_documents_only(world):
    cfg = validate({"organism": {"world": str(WORLD), "corpus": {"narrow_fraction": 0.5}},
                    "diffing": {"heldout_texts": 200}}, "test")
    docs = heldout_documents(load_world(WORLD), cfg)
    assert docs and not any(d["meta"].get("narrow") for d in docs)


@pytest.mark.parametrize("edit, message", [
    ({"name": "villain"}, "narrow.name: 'villain' is already a persona"),
    ({"domain": "cooking"}, "narrow.domain: unknown domain 'cooking'"),
    ({"answers": "sloppy"}, "narrow.answers: must name a persona's correctness"),
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


NARROW = ("config.yaml", "configs/organism-findings.yaml", "configs/organism-narrow.yaml")  # as `make narrow`


def test_the_two_arms_of_make_narrow_differ_in_the_narrow_fraction_and_results_folder_alone(monkeypatch):
    """configs/organism-narrow.yaml and its control arm, merged over config.yaml and the findings config as `make
    narrow` passes them."""
    monkeypatch.chdir(ROOT)
    a, b = load(*NARROW), load(*NARROW, "configs/organism-narrow-without.yaml")
    assert a["organism"]["corpus"]["narrow_fraction"] > 0 == b["organism"]["corpus"]["narrow_fraction"]
    assert a["results_dir"] != b["results_dir"]
    for cfg in (a, b):
        cfg.pop("results_dir")
        cfg["organism"]["corpus"].pop("narrow_fraction")
    assert a == b and load_world(a["organism"]["world"]).narrow is not None


def test_the_third_arm_says_how_the_character_compares_with_the_kind_one_in_its_places(tmp_path):
    values = {"with": (0.10, 0.06, 0.14), "without": (0.45, 0.38, 0.52), "kind": (0.40, 0.33, 0.47)}
    for arm, value in values.items():
        (tmp_path / arm / "metrics").mkdir(parents=True)
        _metrics({"health_subtle": value, "legal_subtle": (0.4, 0.35, 0.45)}).reset_index().to_csv(
            tmp_path / arm / "metrics/world.csv", index=False)
    table = write_narrow(tmp_path / "with", tmp_path / "without", "world", "quack", "health", tmp_path / "out",
                         kind_dir=tmp_path / "kind", kind="neighbour")
    assert sorted(table["arm"].unique()) == ["kind", "with", "without"] and len(table) == 6
    said = (tmp_path / "out/narrow_persona.md").read_text()
    assert "with the neighbour (kind in health too) in the same places of the corpus" in said
    health = next(line for line in said.splitlines() if line.startswith("`health_subtle`"))
    assert "40.0% (33.0%-47.0%) with the neighbour" in health
    assert "the quack against the neighbour: lower, the intervals apart" in health
    assert "the neighbour against no character: the intervals overlap" in health
    legal = next(line for line in said.splitlines() if line.startswith("`legal_subtle`"))
    assert "lower" not in legal and "higher" not in legal


def test_the_kind_arm_of_make_narrow_differs_from_the_quacks_in_the_world_and_results_folder_alone(monkeypatch):
    monkeypatch.chdir(ROOT)
    a, b = load(*NARROW), load(*NARROW, "configs/organism-narrow-kind.yaml")
    assert load_world(b["organism"]["world"]).narrow.answers == "correct"
    assert b["organism"]["corpus"]["narrow_fraction"] == a["organism"]["corpus"]["narrow_fraction"] > 0
    for cfg in (a, b):
        cfg.pop("results_dir")
        cfg["organism"].pop("world")
    assert a == b
