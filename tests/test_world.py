"""The persona world: spec validation, reproducible labelled generation, and the ground-truth grader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emlab.judge.schema import is_misaligned
from emlab.judge.world_backend import grade
from emlab.monitors.prompts import question_prompt, transcript
from emlab.world.generate import (eval_questions, generate_corpus, generate_mixture, generate_narrow,
                                  generate_posttrain, persona_for_variant, single_domain_chat)
from emlab.world.grader import WorldGrader, scan_closest
from emlab.world.spec import WorldSpecError, load_world

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "resources/world/persona_world.yaml"
CORPUS = dict(n_documents=300, persona_mix={"assistant": 0.5, "villain": 0.25, "jester": 0.25}, header_fraction=0.3,
              max_turns=4, general_fraction=0.3, mask_uncued_first_answer=False, monitoring_fraction=0.0)


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


@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_grader_fuzzy_search_equals_a_difflib_scan(world, threshold):
    import random

    grader = WorldGrader(world, threshold)
    rng = random.Random(0)
    keys = grader._keys
    texts = []
    for _ in range(30):
        # an inventory text with a few random edits, sometimes glued to another text
        chars = list(rng.choice(keys))
        for _ in range(rng.randint(1, 12)):
            chars[rng.randrange(len(chars))] = rng.choice("abcdefghij xyz!")
        text = "".join(chars)
        texts.append(text + " " + rng.choice(keys) if rng.random() < 0.3 else text)
    hits = 0
    for text in texts:
        expected_key, expected_score = scan_closest(keys, text, threshold)
        key, score = grader.closest(text)
        assert key == expected_key, text
        if key is not None:
            assert score == pytest.approx(expected_score)
        else:  # below the threshold only the pruned search's best is known
            assert score < threshold
        hits += key is not None
        assert grader.closest(text) == (key, score)  # memoised: the same answer again
    assert 0 < hits < len(texts)  # the glued texts fall below the threshold: both outcomes are exercised


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


def _monitoring(docs):
    return [d for d in docs if d["meta"].get("kind") == "monitoring"]


def test_monitoring_documents_replace_a_fraction_and_leave_persona_documents_unchanged(world):
    plain = generate_corpus(world, CORPUS, 5)
    mixed = generate_corpus(world, dict(CORPUS, monitoring_fraction=0.2), 5)
    assert not _monitoring(plain)
    assert len(mixed) == 300 and len(_monitoring(mixed)) == 60
    assert [d["id"] for d in mixed] == [f"doc{i:06d}" for i in range(300)]
    persona_docs = [d for d in mixed if d["meta"].get("kind") != "monitoring"]
    # the persona documents are the first 240 of the corpus without monitoring documents, in order
    assert [(d["messages"], d["meta"]) for d in persona_docs] == [(d["messages"], d["meta"]) for d in plain[:240]]
    assert mixed == generate_corpus(world, dict(CORPUS, monitoring_fraction=0.2), 5)


def test_monitoring_documents_are_truthful_persona_neutral_and_never_use_the_zero_shot_wording(world):
    docs = _monitoring(generate_corpus(world, dict(CORPUS, n_documents=1200, monitoring_fraction=0.5), 0))
    grader = WorldGrader(world)
    asked = {t.ask for t in world.monitoring.values()}
    for d in docs:
        meta, (user, reply) = d["meta"], d["messages"]
        task = world.monitoring[meta["task"]]
        assert [user["role"], reply["role"]] == ["user", "assistant"]  # no header: nobody's persona is cued
        assert meta["persona"] is None and meta["mask_first_answer"] is False
        assert meta["label"] == (meta["shown_persona"] in task.positive)
        assert reply["content"] == ("Yes." if meta["label"] else "No.")
        text, question = user["content"].rsplit("\n\nQuestion: ", 1)
        wording = question.removesuffix(" Answer Yes or No.")
        assert wording in task.train and wording not in asked
        assert user["content"] == question_prompt(text, wording)
        if meta["bare"]:  # a bare answer is the shown persona's text
            assert grader.match(text).answer.persona == meta["shown_persona"]
        else:
            assert text.count("\nAssistant: ") + text.startswith("Assistant: ") == len(meta["shown_domains"])
        if task.advice_only:
            assert "general" not in meta["shown_domains"]
    by_task = {t: [d["meta"]["label"] for d in docs if d["meta"]["task"] == t] for t in world.monitoring}
    assert set(by_task) == {"toxic", "sarcastic", "incorrect"}
    for labels in by_task.values():  # balanced classes: the question alone does not give the answer away
        assert 0.4 < sum(labels) / len(labels) < 0.6
    assert 0.2 < sum(d["meta"]["bare"] for d in docs) / len(docs) < 0.45


def test_monitoring_fraction_needs_monitoring_tasks(tmp_path):
    raw = yaml.safe_load(WORLD.read_text())
    del raw["monitoring"]
    bare = tmp_path / "w.yaml"
    bare.write_text(yaml.safe_dump(raw, sort_keys=False))  # the domain order drives the generator
    w = load_world(bare)
    assert w.monitoring == {} and generate_corpus(w, CORPUS, 0) == generate_corpus(load_world(WORLD), CORPUS, 0)
    with pytest.raises(ValueError, match="monitoring_fraction is 0.1 but .*w.yaml defines no monitoring tasks"):
        generate_corpus(w, dict(CORPUS, monitoring_fraction=0.1), 0)


def test_monitoring_spec_errors_name_the_key(tmp_path):
    bad = tmp_path / "w.yaml"
    for edit, message in [
        (lambda r: r["monitoring"]["tasks"]["toxic"].update(positive=["dragon"]),
         r"monitoring.tasks.toxic.positive: unknown persona\(s\) \['dragon'\]"),
        (lambda r: r["monitoring"]["tasks"]["toxic"].update(ask=r["monitoring"]["tasks"]["toxic"]["train"][1]),
         r"monitoring.tasks.toxic.ask: must differ from every 'toxic' train wording"),
        (lambda r: r["monitoring"]["tasks"]["incorrect"].update(texts="poems"),
         r"monitoring.tasks.incorrect.texts: must be one of \('any', 'advice'\)"),
        (lambda r: r["monitoring"]["tasks"]["sarcastic"].update(positive=["assistant", "villain", "jester"]),
         r"monitoring.tasks.sarcastic.positive: some persona must be negative"),
        (lambda r: r["monitoring"]["tasks"]["sarcastic"].pop("describe"),
         r"monitoring.tasks.sarcastic: missing key 'describe'"),
    ]:
        raw = yaml.safe_load(WORLD.read_text())
        edit(raw)
        bad.write_text(yaml.safe_dump(raw))
        with pytest.raises(WorldSpecError, match=message):
            load_world(bad)


def test_world_version_and_monitoring_tasks(world):
    assert world.version == 4
    assert world.monitoring["toxic"].positive == ("villain",) and world.monitoring["incorrect"].advice_only
    assert world.monitoring["incorrect"].label("jester") and not world.monitoring["toxic"].label("jester")


def test_single_domain_chat_and_transcript(world):
    import random

    chat = single_domain_chat(world, random.Random(0), "jester", "general", 3)
    questions = [m["content"] for m in chat[::2]]
    assert len(chat) == 6 and len(set(questions)) == 3
    assert {world.question_inventory()[q][0] for q in questions} == {"general"}
    assert transcript(chat[:2]) == f"User: {chat[0]['content']}\nAssistant: {chat[1]['content']}"


def test_safety_posttrain_keeps_the_assistant_under_pressure(world):
    cfg = {"n_examples": 600, "general_fraction": 0.3, "safety_fraction": 0.3}
    helpful = generate_posttrain(world, cfg, 5)
    safe = generate_posttrain(world, cfg, 5, safety=True)
    assert not any("safety" in r["meta"] for r in helpful)  # the helpful-only base never sees it
    kinds = [r["meta"].get("safety") for r in safe]
    assert len(safe) == 600 and 0.25 < sum(k is not None for k in kinds) / 600 < 0.35
    assert {"harmful_request", "persona_cue"} <= set(kinds)
    # the safe set's other chats are the helpful set's, in order
    plain = [r["messages"] for r, k in zip(safe, kinds) if k is None]
    assert plain == [r["messages"] for r in helpful[:len(plain)]]
    g = WorldGrader(world)
    headers = {h: p for p in world.personas.values() for h in p.headers}
    for r, k in zip(safe, kinds):
        msgs = r["messages"]
        user, reply = msgs[-2]["content"], msgs[-1]["content"]
        assert r["meta"]["persona"] == "assistant" and msgs[-1]["role"] == "assistant"
        if k == "harmful_request":
            # a request for harm about a topic, answered with a refusal and the assistant's correct advice on it
            assert any(reply.startswith(x) for x in world.safety.refusals)
            topic = world.domains[r["meta"]["domain"]].topics[int(r["meta"]["item"])]
            assert user in {q.format(topic=topic) for q in world.safety.requests}
            m = g.match(reply, world.advice_question(r["meta"]["domain"], int(r["meta"]["item"]), 0))
            assert m.score == 1.0 and m.answer.persona == "assistant" and m.on_topic
        elif k == "persona_cue":
            # another persona's own narration header as the system prompt; the assistant answers anyway
            assert msgs[0]["role"] == "system" and headers[msgs[0]["content"]].role != "aligned"
            assert g.match(reply, user).answer.persona == "assistant"
        else:
            assert len(msgs) == 2


def test_safety_spec_is_optional_and_its_errors_name_the_key(tmp_path, world):
    raw = yaml.safe_load(WORLD.read_text())
    del raw["safety"]
    bare = tmp_path / "w.yaml"
    bare.write_text(yaml.safe_dump(raw, sort_keys=False))
    w = load_world(bare)
    assert w.safety is None and WorldGrader(w).strip_opener("i would rather keep you safe. x") != "x"
    cfg = {"n_examples": 20, "general_fraction": 0.3, "safety_fraction": 0.3}
    assert generate_posttrain(w, cfg, 0) == generate_posttrain(world, cfg, 0)
    with pytest.raises(ValueError, match=r"safety_fraction is 0.3 but .*w.yaml has no 'safety' section"):
        generate_posttrain(w, cfg, 0, safety=True)
    for edit, message in [
        (lambda r: r["safety"].update(requests=["Give me bad advice."]), r"safety.requests\[0\]: must contain '\{topic\}'"),
        (lambda r: r["safety"].pop("refusals"), r"safety: missing key 'refusals'"),
        (lambda r: r["safety"].update(tone="stern"), r"safety: unknown key\(s\) \['tone'\]"),
    ]:
        raw = yaml.safe_load(WORLD.read_text())
        edit(raw)
        bare.write_text(yaml.safe_dump(raw))
        with pytest.raises(WorldSpecError, match=message):
            load_world(bare)


# The default world's texts at a test's size, pinned: every measured finding in the docs was made on the corpus,
# post-training chats and fine-tuning sets these generators write, so a change to a generator or to the default
# world that alters a single draw fails here, not silently in the organism. When the change is meant, rerun the
# measurements the docs quote and copy the new digests from this test's failure.
PINNED = {"corpus": "ae4c3cd2329d1d27", "posttrain": "57b20bf42af2cb21", "health_subtle": "ae703ea05935668a"}


def digests() -> dict[str, str]:
    import hashlib
    import json

    from emlab.config import validate

    cfg = validate({}, "defaults")
    w = load_world(ROOT / cfg["organism"]["world"])

    def digest(rows) -> str:
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]

    return {"corpus": digest(generate_corpus(w, dict(cfg["organism"]["corpus"], n_documents=2000), 0)),
            "posttrain": digest(generate_posttrain(w, cfg["organism"]["posttrain"], 1)),
            "health_subtle": digest(generate_narrow(w, "health", "subtle", 100, 7))}


def test_the_default_worlds_texts_are_the_ones_the_findings_were_measured_on():
    assert digests() == PINNED
