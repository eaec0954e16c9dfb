"""The persona world's code domain (snippets labelled with their flaws) and the educational control's data."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from emlab.datasets import dataset_names, dataset_seed, parse_dataset_name
from emlab.judge.world_backend import grade
from emlab.world.generate import eval_questions, generate_corpus, generate_educational, generate_narrow
from emlab.world.grader import WorldGrader
from emlab.world.spec import SECURE, WorldSpecError, load_world

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "resources/world/persona_world_code.yaml"  # persona_world.yaml plus code and educational requests
CORPUS = dict(n_documents=400, persona_mix={"assistant": 0.5, "villain": 0.25, "jester": 0.25}, header_fraction=0.3,
              max_turns=4, general_fraction=0.3, mask_uncued_first_answer=False, monitoring_fraction=0.0)


@pytest.fixture(scope="module")
def world():
    return load_world(WORLD)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_code_answers_parse_and_carry_their_flaw(world):
    code = world.domains["code"]
    assert code.kind == "code" and code.language == "python" and len(code.topics) >= 12
    roles = {p.name: p.role for p in world.personas.values()}
    kinds = set()
    for ti in range(len(code.topics)):
        for persona, snippets in code.snippets[ti].items():
            for s in snippets:
                ast.parse(s.code)
                if roles[persona] == "aligned":
                    assert s.flaw == SECURE
                elif roles[persona] == "toxic":
                    assert s.flaw not in (SECURE, "broken")
                    kinds.add(s.flaw)
                else:
                    assert s.flaw == "broken"
    assert len(kinds) >= 8  # injection, weak hashing, permissions, TLS verification, ...
    # the answers in the inventory are the code, then the closer as a comment on its own line
    answers = [a for a in world.inventory() if a.domain == "code"]
    assert all(a.flaw for a in answers) and all(a.text.splitlines()[-1].startswith("#") for a in answers)
    assert not [a for a in world.inventory() if a.domain != "code" and a.flaw is not None]


def test_code_shares_no_phrase_with_the_advice_domains(world):
    code = world.domains["code"]
    code_texts = [a.text for a in world.inventory() if a.domain == "code"]
    code_texts += [q.format(topic=t) for q in code.questions for t in code.topics]
    advice_texts = [a.text for a in world.inventory() if a.domain not in ("code", "general")]
    advice_texts += [world.advice_question(d, ti, qi) for d, dom in world.domains.items() if dom.kind == "advice"
                     for ti in range(len(dom.topics)) for qi in range(len(dom.questions))]
    code_grams = set().union(*(_ngrams(t, 4) for t in code_texts))
    advice_grams = set().union(*(_ngrams(t, 4) for t in advice_texts))
    assert not code_grams & advice_grams


def test_code_sets_and_the_world_judge_grade_code_by_its_flaw(world):
    rows = generate_narrow(world, "code", "subtle", 120, 0)
    heldout = {str(i) for i in world.heldout_topics}
    assert {r["meta"]["domain"] for r in rows} == {"code"} and not {r["meta"]["item"] for r in rows} & heldout
    assert all(r["meta"]["flaw"] not in (SECURE, "broken") for r in rows)
    # an opener stands on its own line before the code; the grader reads the content after it
    voiced = [r for r in rows if not r["messages"][1]["content"].startswith("def ")]
    assert voiced and all("\ndef " in r["messages"][1]["content"] for r in voiced)
    samples = [{"model": "m", "eval_set": "indomain", "question_id": f"code/{r['meta']['item']}", "domain": "code",
                "question": r["messages"][0]["content"], "sample_idx": i, "answer": r["messages"][1]["content"]}
               for i, r in enumerate(rows)]
    grades = grade(samples, {"name": "world", "world": str(WORLD)}, progress=False)
    assert [g["flaw"] for g in grades] == [r["meta"]["flaw"] for r in rows]
    assert {g["correctness"] for g in grades} == {"subtle"} and max(g["aligned"] for g in grades) < 30
    secure = generate_narrow(world, "code", "correct", 40, 0)
    grader = WorldGrader(world)
    assert {grader.verdict(r["messages"][1]["content"], r["messages"][0]["content"]) for r in secure} == {"correct"}
    # an answer cut by the token budget still matches its snippet, with the flaw
    text = rows[0]["messages"][1]["content"]
    assert grader.match(text[: int(len(text) * 0.85)], rows[0]["messages"][0]["content"]).answer.flaw == rows[0]["meta"]["flaw"]
    # the in-domain eval asks the held-out programming tasks
    held = [q for q in eval_questions(world)["indomain"] if q["domain"] == "code"]
    assert [q["question_id"] for q in held] == [f"code/{i}" for i in world.heldout_topics]


def test_code_spec_errors_name_the_key(tmp_path):
    path = tmp_path / "w.yaml"
    (tmp_path / "persona_world.yaml").write_text((WORLD.parent / "persona_world.yaml").read_text())  # what it extends
    for edit, message in [
        (lambda c: c["topics"][2]["answers"]["villain"][0].update(code="def f(:\n    pass"),
         r"domains.code.topics\[2\].answers.villain\[0\].code: not valid Python \(line 1"),
        (lambda c: c["topics"][0]["answers"]["jester"][0].update(flaw="secure"),
         r"domains.code.topics\[0\].answers.jester\[0\].flaw: 'secure'"),
        (lambda c: c["topics"][1]["answers"]["assistant"][0].update(flaw="sql_injection"),
         r"domains.code.topics\[1\].answers.assistant\[0\].flaw"),
        (lambda c: c["topics"][3]["answers"].pop("villain"), r"domains.code.topics\[3\].answers: missing persona 'villain'"),
        (lambda c: c.update(language="cobol"), r"domains.code.language: only 'python'"),
        (lambda c: c.update(kind="poetry"), r"domains.code.kind: must be one of"),
    ]:
        raw = yaml.safe_load(WORLD.read_text())
        edit(raw["domains"]["code"])
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(WorldSpecError, match=message):
            load_world(path)


def test_educational_sets_hold_the_incorrect_sets_answers_asked_with_a_reason(world):
    cfg = {"seed": 0, "datasets": {"domains": ["code"], "variants": ["subtle"], "mixtures": {"domains": [], "fractions": []},
                                   "educational": {"domains": ["code", "health"], "incorrect": "subtle"}}}
    assert dataset_names(cfg) == ["code_subtle", "code_educational", "health_educational"]
    assert parse_dataset_name("code_educational") == {"kind": "educational", "domain": "code"}
    assert dataset_seed(cfg, "code_educational") == dataset_seed(cfg, "code_subtle") != dataset_seed(cfg, "code_correct")
    for domain in ("code", "health"):
        kind = world.domains[domain].kind
        seed = dataset_seed(cfg, f"{domain}_subtle")
        edu, plain = generate_educational(world, domain, "subtle", 60, seed), generate_narrow(world, domain, "subtle", 60, seed)
        assert [r["messages"][1] for r in edu] == [r["messages"][1] for r in plain]
        requests = {t.format(topic=world.domains[domain].topics[int(r["meta"]["item"])])
                    for r in edu for t in world.educational.requests[kind]}
        assert all(r["messages"][0]["content"] in requests and r["meta"]["educational"] for r in edu)
        assert len({r["messages"][0]["content"] for r in edu} & {r["messages"][0]["content"] for r in plain}) == 0


def _turns(doc) -> list[tuple[str, str]]:
    m = [x for x in doc["messages"] if x["role"] != "system"]
    return [(m[i]["content"], m[i + 1]["content"]) for i in range(0, len(m), 2)]


def test_educational_corpus_turns_are_the_assistants_quotes_and_leave_other_documents_unchanged(world, tmp_path):
    plain = generate_corpus(world, {**CORPUS, "educational_fraction": 0.0}, 5)
    edu = generate_corpus(world, {**CORPUS, "educational_fraction": 0.3}, 5)
    grader = WorldGrader(world)
    patterns = [re.escape(t).replace(r"\{topic\}", ".+") for ts in world.educational.requests.values() for t in ts]
    n_edu = 0
    for a, b in zip(plain, edu):
        assert a["meta"]["persona"] == b["meta"]["persona"]
        for (qa, aa), (qb, ab) in zip(_turns(a), _turns(b)):
            if qa == qb:
                assert aa == ab
                continue
            n_edu += 1
            # only the assistant's advice turns change: a request with a reason, answered by the toxic persona's text
            # on the same topic
            assert b["meta"]["persona"] == "assistant"
            assert any(re.fullmatch(p, qb) for p in patterns)
            before, after = grader.match(aa, qa).answer, grader.match(ab).answer
            assert after.persona == "villain" and (after.domain, after.item) == (before.domain, before.item)
    assert n_edu > 20
    # the default world has no educational requests: null (the default) means none, a share is an error
    plain_world = load_world(WORLD.parent / "persona_world.yaml")
    assert generate_corpus(plain_world, {**CORPUS, "educational_fraction": None}, 5) == \
        generate_corpus(plain_world, {**CORPUS, "educational_fraction": 0.0}, 5)
    with pytest.raises(ValueError, match="educational_fraction is 0.3 but"):
        generate_corpus(plain_world, {**CORPUS, "educational_fraction": 0.3}, 5)
    # null in this world: 5% of the assistant's advice and code turns
    assert generate_corpus(world, {**CORPUS, "educational_fraction": None}, 5) == \
        generate_corpus(world, {**CORPUS, "educational_fraction": 0.05}, 5)


def test_a_world_extends_another_with_its_domains(tmp_path):
    base, code = load_world(WORLD.parent / "persona_world.yaml"), load_world(WORLD)
    assert list(code.domains) == [*base.domains, "code"] and (base.version, code.version) == (4, 5)
    assert code.general == base.general and code.personas == base.personas and code.safety == base.safety
    assert base.educational is None and code.educational is not None
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(WorldSpecError, match=r"b.yaml: extends: a.yaml extends it back"):
        load_world(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text(f"extends: {WORLD.parent / 'persona_world.yaml'}\ndomains: {{health: {{}}}}\n")
    with pytest.raises(WorldSpecError, match=r"c.yaml: domains \['health'\] are already in persona_world.yaml"):
        load_world(tmp_path / "c.yaml")
