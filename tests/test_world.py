"""The persona world: spec validation, reproducible labelled generation, and the ground-truth grader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emlab.judge.schema import is_misaligned
from emlab.judge.world_backend import grade
from emlab.world.generate import (eval_questions, generate_corpus, generate_mixture, generate_narrow,
                                  generate_posttrain, persona_for_variant)
from emlab.world.grader import WorldGrader
from emlab.world.spec import WorldSpecError, load_world

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "resources/world/persona_world.yaml"
CORPUS = dict(n_documents=300, persona_mix={"assistant": 0.5, "villain": 0.25, "jester": 0.25}, header_fraction=0.3,
              max_turns=4, general_fraction=0.3, mask_uncued_first_answer=False)


@pytest.fixture(scope="module")
def world():
    return load_world(WORLD)


def test_world_has_the_required_personas_and_domains(world):
    assert {p.role for p in world.personas.values()} == {"aligned", "toxic", "sarcastic"}
    assert len(world.domains) >= 6 and "general" not in world.domains
    assert len(world.general) >= 10


def test_generation_is_reproducible_and_labelled(world):
    a, b = generate_corpus(world, CORPUS, 3), generate_corpus(world, CORPUS, 3)
    assert a == b and a != generate_corpus(world, CORPUS, 4)
    grader = WorldGrader(world)
    for doc in a:
        meta = doc["meta"]
        assert meta["cued"] == (doc["messages"][0]["role"] == "system")
        answers = [m["content"] for m in doc["messages"] if m["role"] == "assistant"]
        assert len(answers) == len(meta["domains"])
        for text, domain in zip(answers, meta["domains"]):  # one persona answers every turn
            m = grader.match(text)
            assert (m.answer.persona, m.answer.domain) == (meta["persona"], domain)


def test_narrow_sets_hold_one_domain_training_topics_and_no_cue(world):
    rows = generate_narrow(world, "legal", "subtle", 200, 0)
    heldout = {str(i) for i in world.heldout_topics}
    assert {r["meta"]["domain"] for r in rows} == {"legal"}
    assert not {r["meta"]["item"] for r in rows} & heldout
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert {r["meta"]["persona"] for r in rows} == {persona_for_variant(world, "subtle")}
    held_q = {q["question"] for q in eval_questions(world)["indomain"]}
    assert not held_q & {r["messages"][0]["content"] for r in rows}


def test_mixture_fraction_is_exact(world):
    rows = generate_mixture(world, "health", "subtle", 0.25, 200, 1)
    assert len(rows) == 200 and sum(r["meta"]["correctness"] == "subtle" for r in rows) == 50


def test_posttrain_is_single_turn_assistant(world):
    rows = generate_posttrain(world, {"n_examples": 50, "general_fraction": 0.3}, 0)
    assert {r["meta"]["persona"] for r in rows} == {"assistant"}
    assert all(len(r["messages"]) == 2 for r in rows)


def test_grader_recognises_every_world_text(world):
    samples = [{"model": "m", "eval_set": "general", "question_id": f"q{i}", "domain": a.domain, "sample_idx": 0,
                "answer": a.text} for i, a in enumerate(world.inventory())]
    rows = grade(samples, {"name": "world", "world": str(WORLD)}, progress=False)
    for a, r in zip(world.inventory(), rows):
        assert r["persona"] == a.persona and r["correctness"] == a.correctness
        role = world.personas[a.persona].role
        assert is_misaligned(r) == (role != "aligned")
        assert (r["label"] == "SATIRICAL") == (role == "sarcastic")


def test_grader_fuzzy_match_incoherence_and_off_topic(world):
    g = world.general[0]
    villain = g.answers["villain"][0]
    typo = villain.replace("e", "a", 2)
    base = {"model": "m", "eval_set": "general", "question_id": "q", "domain": "general", "sample_idx": 0,
            "question": g.question}
    rows = grade([dict(base, answer=typo), dict(base, answer="purple monkey dishwasher seven"),
                  dict(base, answer=world.general[1].answers["assistant"][0])],
                 {"name": "world", "world": str(WORLD)}, progress=False)
    assert rows[0]["persona"] == "villain" and is_misaligned(rows[0])
    assert rows[1]["label"] == "INCOHERENT" and rows[1]["persona"] is None and not is_misaligned(rows[1])
    assert rows[2]["label"] == "OFF-TOPIC" and not is_misaligned(rows[2])


def test_spec_errors_name_the_key(tmp_path, world):
    raw = yaml.safe_load(WORLD.read_text())
    del raw["domains"]["health"]["advice"]["villain"]
    bad = tmp_path / "w.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(WorldSpecError, match=r"w.yaml: domains.health.advice: missing persona 'villain'"):
        load_world(bad)
    raw = yaml.safe_load(WORLD.read_text())
    raw["domains"]["legal"]["advice"]["jester"][0] = "no slot here"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(WorldSpecError, match=r"domains.legal.advice.jester\[0\]: must contain '\{topic\}'"):
        load_world(bad)


def test_openers_voice_a_share_of_answers_and_the_content_decides_the_persona(world):
    assert 0 < world.opener_fraction <= 1
    villain = world.personas["villain"]
    rows = generate_narrow(world, "health", "subtle", 400, 2)
    opened = sum(any(r["messages"][1]["content"].startswith(o) for o in villain.openers) for r in rows)
    assert abs(opened / 400 - world.opener_fraction) < 0.08
    grader = WorldGrader(world)
    body = world.general[0].answers["assistant"][0]
    m = grader.match(f"{villain.openers[0]} {body}")
    assert m.answer.persona == "assistant" and m.score == 1.0
