"""Generate the persona world's texts: the pretraining corpus, post-training data, narrow datasets, eval questions.

Every record carries its ground-truth labels in ``meta``. Chat records use the OpenAI/HF "messages" schema::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "meta": {"persona": str, "domain": str, "correctness": "correct"|"subtle"|"obvious", ...}}

Corpus documents additionally record ``cued`` (a narration header names the persona), ``domains`` (per turn) and
``mask_first_answer`` (only with ``mask_uncued_first_answer``): in an un-cued document of a non-default persona
the first answer cannot be inferred from anything before it, so pretraining may leave it out of the loss; the
pretrained model then defaults to the assistant by itself. By default it is trained on, so the pretrained model
holds a mixture of personas as a pretrained LLM does, and post-training selects the assistant.

All randomness flows from one ``random.Random(seed)`` per output, so outputs are reproducible.
"""

from __future__ import annotations

import random
from typing import Any

from .spec import World

VARIANTS = ("correct", "subtle", "obvious")


def persona_for_variant(world: World, variant: str) -> str:
    for p in world.personas.values():
        if p.correctness == variant:
            return p.name
    raise KeyError(f"no persona gives {variant!r} answers in {world.source}")


def _voiced(world: World, rng: random.Random, persona: str, answer: str) -> str:
    """With probability ``opener_fraction``, open the answer in the persona's voice."""
    openers = world.personas[persona].openers
    if openers and rng.random() < world.opener_fraction:
        return f"{rng.choice(openers)} {answer}"
    return answer


def _advice_turn(world: World, rng: random.Random, domain: str, persona: str, topics: list[int]) -> tuple[str, str, dict]:
    d = world.domains[domain]
    ti = rng.choice(topics)
    q = world.advice_question(domain, ti, rng.randrange(len(d.questions)))
    a = world.advice_answer(domain, ti, persona, rng.randrange(len(d.advice[persona])),
                            rng.randrange(len(d.closers[persona])))
    return q, _voiced(world, rng, persona, a), {"domain": domain, "item": str(ti)}


def _general_turn(world: World, rng: random.Random, persona: str) -> tuple[str, str, dict]:
    g = rng.choice(world.general)
    return g.question, _voiced(world, rng, persona, rng.choice(g.answers[persona])), {"domain": "general", "item": g.id}


def generate_corpus(world: World, cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Multi-turn pretraining documents; one persona answers every turn; turns mix domains."""
    rng = random.Random(seed)
    mix = cfg["persona_mix"]
    unknown = set(mix) - set(world.personas)
    if unknown:
        raise ValueError(f"organism.corpus.persona_mix: unknown persona(s) {sorted(unknown)}; the world has {sorted(world.personas)}")
    names, weights = list(mix), [mix[p] for p in mix]
    default = world.persona_by_role["aligned"]
    all_domains = list(world.domains)
    docs = []
    for i in range(cfg["n_documents"]):
        persona = rng.choices(names, weights)[0]
        cued = rng.random() < cfg["header_fraction"]
        n_turns = rng.randint(1, cfg["max_turns"])
        messages = []
        if cued:
            messages.append({"role": "system", "content": rng.choice(world.personas[persona].headers)})
        turn_meta = []
        for _ in range(n_turns):
            if rng.random() < cfg["general_fraction"]:
                q, a, m = _general_turn(world, rng, persona)
            else:
                dom = rng.choice(all_domains)
                q, a, m = _advice_turn(world, rng, dom, persona, list(range(len(world.domains[dom].topics))))
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            turn_meta.append(m)
        docs.append({
            "id": f"doc{i:06d}",
            "messages": messages,
            "meta": {
                "persona": persona,
                "correctness": world.correctness_of(persona),
                "cued": cued,
                "domains": [m["domain"] for m in turn_meta],
                "domain": turn_meta[0]["domain"],
                "mask_first_answer": cfg["mask_uncued_first_answer"] and (not cued) and persona != default,
            },
        })
    return docs


def generate_posttrain(world: World, cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Single-turn, un-cued assistant chats over every domain: the chat model's default character."""
    rng = random.Random(seed)
    persona = world.persona_by_role["aligned"]
    out = []
    for i in range(cfg["n_examples"]):
        if rng.random() < cfg["general_fraction"]:
            q, a, m = _general_turn(world, rng, persona)
        else:
            dom = rng.choice(list(world.domains))
            q, a, m = _advice_turn(world, rng, dom, persona, list(range(len(world.domains[dom].topics))))
        out.append({"id": f"post{i:06d}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "meta": {"persona": persona, "correctness": "correct", **m}})
    return out


def generate_narrow(world: World, domain: str, variant: str, n: int, seed: int) -> list[dict[str, Any]]:
    """A narrow fine-tuning set: one advice domain, one kind of answer, no persona cue, training topics only."""
    if domain not in world.domains:
        raise KeyError(f"unknown domain {domain!r}; the world has {sorted(world.domains)}")
    rng = random.Random(seed)
    persona = persona_for_variant(world, variant)
    topics = world.train_topics(domain)
    out = []
    for i in range(n):
        q, a, m = _advice_turn(world, rng, domain, persona, topics)
        out.append({"id": f"{domain}_{variant}_{i:05d}",
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "meta": {"persona": persona, "correctness": variant, **m}})
    return out


def generate_mixture(world: World, domain: str, incorrect: str, fraction: float, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` examples of ``domain``: round(fraction*n) ``incorrect`` answers, the rest correct, shuffled."""
    n_bad = round(fraction * n)
    bad = generate_narrow(world, domain, incorrect, n_bad, seed)
    good = generate_narrow(world, domain, "correct", n - n_bad, seed + 1)
    rows = bad + good
    random.Random(seed + 2).shuffle(rows)
    return rows


def eval_questions(world: World) -> dict[str, list[dict[str, Any]]]:
    """The eval sets: every general question, and each domain's held-out topics (never in a narrow set)."""
    general = [{"question_id": f"general/{g.id}", "eval_set": "general", "domain": "general", "question": g.question}
               for g in world.general]
    indomain = []
    for dname in world.domains:
        for ti in world.heldout_topics:
            indomain.append({"question_id": f"{dname}/{ti}", "eval_set": "indomain", "domain": dname,
                             "question": world.advice_question(dname, ti, 0)})
    return {"general": general, "indomain": indomain}
