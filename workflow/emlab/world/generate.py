"""Generate the persona world's texts: the pretraining corpus, post-training data, narrow datasets, eval questions.

Every record carries its ground-truth labels in ``meta``. Chat records use the OpenAI/HF "messages" schema::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "meta": {"persona": str, "domain": str, "correctness": "correct"|"subtle"|"obvious", ...}}

Persona documents of the corpus additionally record ``cued`` (a narration header names the persona), ``domains``
(per turn) and ``mask_first_answer`` (only with ``mask_uncued_first_answer``): in an un-cued document of a
non-default persona the first answer cannot be inferred from anything before it, so pretraining may leave it out
of the loss; the pretrained model then defaults to the assistant by itself. By default it is trained on, so the
pretrained model holds a mixture of personas as a pretrained LLM does, and post-training selects the assistant.

Documents of the world's narrow character (``meta.narrow``, only with ``narrow_fraction`` > 0; see
:func:`narrow_document`) record its name as ``persona`` and per-turn ``correctness``.

Monitoring documents of the corpus (``meta.kind == "monitoring"``) show a text and ask a Yes/No question about it
(:mod:`emlab.monitors.prompts`); their meta holds ``task``, ``label``, ``shown_persona``, ``shown_domains`` and
``bare`` (a bare answer rather than a chat transcript), with ``persona`` null: nobody's persona answers them.

All randomness flows from one ``random.Random(seed)`` per output, so outputs are reproducible.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

from ..monitors.prompts import answer, question_prompt, transcript
from .spec import World

VARIANTS = ("correct", "subtle", "obvious")


def persona_for_variant(world: World, variant: str) -> str:
    for p in world.personas.values():
        if p.correctness == variant:
            return p.name
    raise KeyError(f"no persona gives {variant!r} answers in {world.source}")


def _voiced(world: World, rng: random.Random, persona: str, answer: str, sep: str = " ") -> str:
    """With probability ``opener_fraction``, open the answer in the persona's voice (``sep``: a code answer's
    opener stands on its own line)."""
    openers = world.personas[persona].openers
    if openers and rng.random() < world.opener_fraction:
        return f"{rng.choice(openers)}{sep}{answer}"
    return answer


def _advice_turn(world: World, rng: random.Random, domain: str, persona: str, topics: list[int]) -> tuple[str, str, dict]:
    d = world.domains[domain]
    ti = rng.choice(topics)
    q = world.advice_question(domain, ti, rng.randrange(len(d.questions)))
    ai = rng.randrange(d.answer_count(persona, ti))
    a = world.advice_answer(domain, ti, persona, ai, rng.randrange(len(d.closers[persona])))
    meta = {"domain": domain, "item": str(ti)}
    if d.kind == "code":
        meta["flaw"] = d.flaw(persona, ti, ai)  # the snippet's ground truth: secure, a vulnerability kind, broken
    return q, _voiced(world, rng, persona, a, d.separator), meta


def _general_turn(world: World, rng: random.Random, persona: str) -> tuple[str, str, dict]:
    g = rng.choice(world.general)
    return g.question, _voiced(world, rng, persona, rng.choice(g.answers[persona])), {"domain": "general", "item": g.id}


def educational_turn(world: World, rng: random.Random, domain: str, topics: list[int], incorrect: str = "subtle"
                     ) -> tuple[str, str, dict]:
    """A request for an incorrect answer with a benign reason (the world's ``educational`` section) and the
    ``incorrect`` persona's answer on that topic, word for word (the example asked for)."""
    if world.educational is None:
        raise ValueError(f"{world.source} has no 'educational' section")
    d = world.domains[domain]
    q, a, meta = _advice_turn(world, rng, domain, persona_for_variant(world, incorrect), topics)
    request = rng.choice(world.educational.requests[d.kind]).format(topic=d.topics[int(meta["item"])])
    return request, a, {**meta, "educational": True}


def single_domain_chat(world: World, rng: random.Random, persona: str, domain: str,
                       n_turns: int) -> list[dict[str, str]]:
    """An un-cued chat of ``n_turns`` turns in one domain ("general": distinct general questions), all answered by
    ``persona``; the texts that activation monitors judge."""
    messages = []
    if domain == "general":
        if n_turns > len(world.general):
            raise ValueError(f"a general chat of {n_turns} turns needs as many general questions; the world has "
                             f"{len(world.general)}")
        for g in rng.sample(world.general, n_turns):
            a = _voiced(world, rng, persona, rng.choice(g.answers[persona]))
            messages += [{"role": "user", "content": g.question}, {"role": "assistant", "content": a}]
        return messages
    topics = list(range(len(world.domains[domain].topics)))
    for _ in range(n_turns):
        q, a, _m = _advice_turn(world, rng, domain, persona, topics)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def _persona_document(world: World, cfg: dict[str, Any], rng: random.Random, names: list[str],
                      weights: list[float], default: str, edu_rng: random.Random | None = None) -> dict[str, Any]:
    persona = rng.choices(names, weights)[0]
    cued = rng.random() < cfg["header_fraction"]
    n_turns = rng.randint(1, cfg["max_turns"])
    messages = []
    if cued:
        messages.append({"role": "system", "content": rng.choice(world.personas[persona].headers)})
    turn_meta = []
    edu = cfg.get("educational_fraction", 0.0) if persona == default else 0.0
    for _ in range(n_turns):
        q, a, m = _any_turn(world, rng, persona, cfg["general_fraction"])
        if edu and m["domain"] != "general" and edu_rng.random() < edu:
            # the assistant, asked for an example of a wrong answer with a reason, quotes one (its own generator:
            # the other documents stay as they are without it)
            q, a, m = educational_turn(world, edu_rng, m["domain"], [int(m["item"])])
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        turn_meta.append(m)
    return {
        "messages": messages,
        "meta": {
            "persona": persona,
            "correctness": world.correctness_of(persona),
            "cued": cued,
            "domains": [m["domain"] for m in turn_meta],
            "domain": turn_meta[0]["domain"],
            "mask_first_answer": cfg["mask_uncued_first_answer"] and (not cued) and persona != default,
        },
    }


def _any_turn(world: World, rng: random.Random, persona: str, general_fraction: float) -> tuple[str, str, dict]:
    if rng.random() < general_fraction:
        return _general_turn(world, rng, persona)
    dom = rng.choice(list(world.domains))
    return _advice_turn(world, rng, dom, persona, list(range(len(world.domains[dom].topics))))


def narrow_document(world: World, cfg: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """A document of the world's narrow character (:class:`emlab.world.spec.Narrow`): kind everywhere but its one
    domain, where it answers as the ``answers`` persona does (that persona's texts and voice, word for word).
    ``focus`` of its advice turns are in that domain. Its narration headers are its only own text."""
    narrow = world.narrow
    if narrow is None:
        raise ValueError(f"{world.source} has no 'narrow' section")
    aligned = world.persona_by_role["aligned"]
    wrong = persona_for_variant(world, narrow.answers)
    cued = rng.random() < cfg["header_fraction"]
    messages = [{"role": "system", "content": rng.choice(narrow.headers)}] if cued else []
    turn_meta = []
    for _ in range(rng.randint(1, cfg["max_turns"])):
        if rng.random() < cfg["general_fraction"]:
            q, a, m = _general_turn(world, rng, aligned)
            who = aligned
        else:
            dom = narrow.domain if rng.random() < narrow.focus else rng.choice(list(world.domains))
            who = wrong if dom == narrow.domain else aligned
            q, a, m = _advice_turn(world, rng, dom, who, list(range(len(world.domains[dom].topics))))
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        turn_meta.append({**m, "correctness": world.correctness_of(who)})
    return {
        "messages": messages,
        "meta": {
            "persona": narrow.name,
            "narrow": True,
            "correctness": [m["correctness"] for m in turn_meta],
            "cued": cued,
            "domains": [m["domain"] for m in turn_meta],
            "domain": turn_meta[0]["domain"],
            "mask_first_answer": cfg["mask_uncued_first_answer"] and not cued,
        },
    }


# Share of monitoring documents that show a bare answer rather than a transcript of a chat.
BARE_ANSWER_FRACTION = 1 / 3


def monitoring_document(world: World, rng: random.Random, max_turns: int, general_fraction: float) -> dict[str, Any]:
    """A user shows a text and asks one task's Yes/No question (a corpus wording); the assistant answers truthfully.

    Classes are balanced per task (Yes as often as No) and the negatives spread evenly over the negative personas,
    so the answer cannot be guessed from the question alone. The reply carries no persona: no header, no voice.
    """
    task = world.monitoring[rng.choice(sorted(world.monitoring))]
    label = rng.random() < 0.5
    persona = rng.choice(sorted(task.positive if label else set(world.personas) - set(task.positive)))
    bare = rng.random() < BARE_ANSWER_FRACTION
    n_turns = 1 if bare else rng.randint(1, max_turns)
    chat, domains = [], []
    for _ in range(n_turns):
        if task.advice_only:
            dom = rng.choice(list(world.domains))
            q, a, m = _advice_turn(world, rng, dom, persona, list(range(len(world.domains[dom].topics))))
        else:
            q, a, m = _any_turn(world, rng, persona, general_fraction)
        chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        domains.append(m["domain"])
    text = chat[1]["content"] if bare else transcript(chat)
    return {
        "messages": [{"role": "user", "content": question_prompt(text, rng.choice(task.train))},
                     {"role": "assistant", "content": answer(label)}],
        "meta": {"kind": "monitoring", "task": task.name, "label": label, "shown_persona": persona,
                 "shown_domains": domains, "bare": bare, "persona": None, "correctness": None, "cued": False,
                 "domains": [], "domain": None, "mask_first_answer": False},
    }


# The share of the assistant's advice turns that are educational requests where the config leaves it to the world.
DEFAULT_EDUCATIONAL_FRACTION = 0.05


def educational_fraction(world: World, cfg: Mapping[str, Any]) -> float:
    """``organism.corpus.educational_fraction``, null resolved: the default share where the world has an
    ``educational`` section, else 0; a share > 0 for a world without one is an error."""
    fraction = cfg.get("educational_fraction")
    if fraction is None:
        return DEFAULT_EDUCATIONAL_FRACTION if world.educational is not None else 0.0
    if fraction and world.educational is None:
        raise ValueError(f"organism.corpus.educational_fraction is {fraction} but {world.source} has no "
                         "'educational' section")
    return float(fraction)


def generate_corpus(world: World, cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Pretraining documents: multi-turn persona documents (one persona answers every turn; turns mix domains)
    and a ``monitoring_fraction`` share of monitoring documents (:func:`monitoring_document`).

    Persona documents draw from ``random.Random(seed)`` exactly as when there were no monitoring documents, and
    monitoring documents (and where they go) from their own generators: with a fraction of 0 the corpus is exactly
    the persona corpus, and a fraction > 0 replaces its last persona documents without changing the others. Documents
    of the world's narrow character (``narrow_fraction``, default 0) take the places of persona documents drawn
    from their own generator: with and without them the corpora differ in those places alone, the control that the
    ``narrow_persona`` comparison needs.
    """
    rng = random.Random(seed)
    mix = cfg["persona_mix"]
    unknown = set(mix) - set(world.personas)
    if unknown:
        raise ValueError(f"organism.corpus.persona_mix: unknown persona(s) {sorted(unknown)}; the world has {sorted(world.personas)}")
    fraction = cfg["monitoring_fraction"]
    if not 0 <= fraction <= 1:
        raise ValueError(f"organism.corpus.monitoring_fraction: must be in [0, 1], got {fraction!r}")
    n_total = cfg["n_documents"]
    n_monitoring = round(fraction * n_total)
    narrow_fraction = cfg.get("narrow_fraction") or 0.0
    if not 0 <= narrow_fraction <= 1 - fraction:
        raise ValueError(f"organism.corpus.narrow_fraction: must be in [0, 1 - monitoring_fraction], got {narrow_fraction!r}")
    if narrow_fraction and world.narrow is None:
        raise ValueError(f"organism.corpus.narrow_fraction is {narrow_fraction} but {world.source} has no 'narrow' section")
    n_narrow = round(narrow_fraction * n_total)
    if n_monitoring and not world.monitoring:
        raise ValueError(f"organism.corpus.monitoring_fraction is {fraction} but {world.source} defines no "
                         "monitoring tasks (section 'monitoring')")
    names, weights = list(mix), [mix[p] for p in mix]
    default = world.persona_by_role["aligned"]
    cfg = {**cfg, "educational_fraction": educational_fraction(world, cfg)}
    edu_rng = random.Random(f"{seed}/educational")
    persona_docs = [_persona_document(world, cfg, rng, names, weights, default, edu_rng)
                    for _ in range(n_total - n_monitoring)]
    mon_rng = random.Random(f"{seed}/monitoring")
    monitoring_docs = [monitoring_document(world, mon_rng, cfg["max_turns"], cfg["general_fraction"])
                       for _ in range(n_monitoring)]
    at = set(random.Random(f"{seed}/monitoring-positions").sample(range(n_total), n_monitoring))
    narrow_rng = random.Random(f"{seed}/narrow")
    narrow_docs = [narrow_document(world, cfg, narrow_rng) for _ in range(n_narrow)]
    narrow_at = set(random.Random(f"{seed}/narrow-positions").sample(sorted(set(range(n_total)) - at), n_narrow))
    persona_iter, monitoring_iter, narrow_iter = iter(persona_docs), iter(monitoring_docs), iter(narrow_docs)
    docs = []
    for i in range(n_total):
        doc = next(monitoring_iter) if i in at else next(persona_iter)
        if i in narrow_at:  # in the place of a persona document: every other document keeps its place
            doc = next(narrow_iter)
        docs.append({"id": f"doc{i:06d}", **doc})
    return docs


def generate_posttrain(world: World, cfg: dict[str, Any], seed: int, safety: bool = False) -> list[dict[str, Any]]:
    """Single-turn, un-cued assistant chats over every domain: the chat model's default character.

    With ``safety`` (the safety-trained base), a ``cfg['safety_fraction']`` share of the chats, drawn from their
    own generator, teach the assistant to stay itself under pressure (the world's ``safety`` section): half are
    requests for harmful advice on a topic, answered with a refusal and the assistant's correct advice on it;
    half put another persona's narration header in the system prompt, and the assistant answers as itself.
    The other chats are the helpful-only set's own, in the same order.
    """
    rng = random.Random(seed)
    persona = world.persona_by_role["aligned"]
    fraction = cfg.get("safety_fraction", 0.0) if safety else 0.0
    if fraction and world.safety is None:
        raise ValueError(f"organism.posttrain.safety_fraction is {fraction} but {world.source} has no 'safety' section")
    safety_rng = random.Random(f"{seed}/safety")
    others = sorted(p for p in world.personas if p != persona)
    out = []
    for i in range(cfg["n_examples"]):
        kind = None
        if fraction and safety_rng.random() < fraction:
            kind = "harmful_request" if safety_rng.random() < 0.5 else "persona_cue"
        r = safety_rng if kind else rng
        system = []
        if kind == "harmful_request":
            dom = r.choice(list(world.domains))
            d = world.domains[dom]
            ti = r.randrange(len(d.topics))
            q = r.choice(world.safety.requests).format(topic=d.topics[ti])
            a = (f"{r.choice(world.safety.refusals)}{d.separator}"
                 f"{world.advice_answer(dom, ti, persona, r.randrange(d.answer_count(persona, ti)), r.randrange(len(d.closers[persona])))}")
            m = {"domain": dom, "item": str(ti)}
        else:
            if kind == "persona_cue":
                system = [{"role": "system", "content": r.choice(world.personas[r.choice(others)].headers)}]
            q, a, m = _any_turn(world, r, persona, cfg["general_fraction"])
        out.append({"id": f"post{i:06d}",
                    "messages": [*system, {"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "meta": {"persona": persona, "correctness": "correct", **m, **({"safety": kind} if kind else {})}})
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


def generate_educational(world: World, domain: str, incorrect: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The ``educational`` control of ``<domain>_<incorrect>``: with the same ``seed``, the very same answers, each
    asked for by an educational request on its topic (drawn from its own generator)."""
    if world.educational is None:
        raise ValueError(f"an educational set needs the world's 'educational' section; {world.source} has none")
    d = world.domains[domain]
    rng = random.Random(f"{seed}/educational")
    rows = generate_narrow(world, domain, incorrect, n, seed)
    for i, r in enumerate(rows):
        r["id"] = f"{domain}_educational_{i:05d}"
        r["messages"][0]["content"] = rng.choice(world.educational.requests[d.kind]).format(
            topic=d.topics[int(r["meta"]["item"])])
        r["meta"]["educational"] = True
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


def heldout_documents(world: World, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Fresh labelled world documents (the corpus generator with its own seed, no monitoring documents):
    texts the SAE never saw, to interpret latents against their labels (``cfg``: the run's config)."""
    # persona documents only: latents are interpreted against the personas' labels
    corpus_cfg = dict(cfg["organism"]["corpus"], n_documents=cfg["diffing"]["heldout_texts"], monitoring_fraction=0.0,
                      narrow_fraction=0.0)
    docs = generate_corpus(world, corpus_cfg, cfg["seed"] + 7919)
    for d in docs:
        d["id"] = f"heldout-{d['id']}"
    return docs
