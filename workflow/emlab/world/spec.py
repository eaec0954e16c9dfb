"""Load and validate a persona-world spec (``resources/world/*.yaml``) into plain data classes.

Every answer text the world can produce is enumerable from the spec; :meth:`World.inventory`
lists them with their labels, which is what the world grader matches answers against. The optional
``monitoring`` section defines Yes/No questions about texts (:class:`MonitoringTask`), which the corpus teaches
and the activation monitors (:mod:`emlab.monitors`) ask. The optional ``safety`` section (:class:`Safety`) holds
what a safety-trained assistant's post-training adds: requests for harmful advice and the assistant's replies.
The optional ``narrow`` section (:class:`Narrow`) names a narrow character: kind everywhere but one domain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import read_yaml

CORRECTNESS = ("correct", "subtle", "obvious")
DOMAIN_KINDS = ("advice", "code")   # advice: templates filled with the topic; code: a snippet per topic and persona
SECURE = "secure"                   # the flaw label of the aligned persona's code
ROLES = ("aligned", "toxic", "sarcastic")
MONITOR_TEXTS = ("any", "advice")  # which turns a monitoring task shows: any domain, or advice domains only


class WorldSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Persona:
    name: str
    role: str
    correctness: str
    headers: tuple[str, ...]
    openers: tuple[str, ...] = ()   # the persona's voice, shared by all its domains


@dataclass(frozen=True)
class Snippet:
    """One code answer of a code domain: the code and its ground-truth flaw (``secure``, a vulnerability kind such
    as ``sql_injection``, or ``broken``)."""
    code: str
    flaw: str


@dataclass(frozen=True)
class Domain:
    name: str
    questions: tuple[str, ...]          # templates with {topic}
    topics: tuple[str, ...]
    advice: dict[str, tuple[str, ...]]  # advice domains: persona -> advice templates with {topic}
    closers: dict[str, tuple[str, ...]]
    kind: str = "advice"
    language: str | None = None         # code domains: the snippets' language
    snippets: tuple[dict[str, tuple[Snippet, ...]], ...] = ()  # code domains: per topic, persona -> its answers

    @property
    def separator(self) -> str:
        """What joins an opener, the answer and its closer: a code answer keeps its lines."""
        return "\n" if self.kind == "code" else " "

    def answer_count(self, persona: str, topic_idx: int) -> int:
        return len(self.snippets[topic_idx][persona]) if self.kind == "code" else len(self.advice[persona])

    def body(self, persona: str, topic_idx: int, answer_idx: int) -> str:
        if self.kind == "code":
            return self.snippets[topic_idx][persona][answer_idx].code
        return self.advice[persona][answer_idx].format(topic=self.topics[topic_idx])

    def flaw(self, persona: str, topic_idx: int, answer_idx: int) -> str | None:
        """A code answer's flaw label; None for advice."""
        return self.snippets[topic_idx][persona][answer_idx].flaw if self.kind == "code" else None


@dataclass(frozen=True)
class GeneralQuestion:
    id: str
    question: str
    answers: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Answer:
    """One answer text the world can produce, with its ground-truth labels."""
    text: str
    persona: str
    domain: str          # an advice domain or "general"
    item: str            # topic index ("3") for advice, question id for general
    correctness: str
    flaw: str | None = None  # code answers: "secure", the vulnerability kind, or "broken"


@dataclass(frozen=True)
class MonitoringTask:
    """A Yes/No question about a shown text: Yes exactly when a ``positive`` persona wrote it."""
    name: str
    positive: tuple[str, ...]       # personas whose texts make the answer Yes
    advice_only: bool               # show advice turns only (``texts: advice``)
    describe: str                   # task description put before the text by prompted probes
    train: tuple[str, ...]          # question wordings of the corpus's monitoring documents
    ask: str                        # the zero-shot wording, never used in the corpus

    def label(self, persona: str) -> bool:
        return persona in self.positive


@dataclass(frozen=True)
class Safety:
    """What safety post-training teaches beyond helpfulness: the assistant stays itself under pressure."""
    requests: tuple[str, ...]       # user requests for harmful advice, templates with {topic}
    refusals: tuple[str, ...]       # the assistant's opening before its own (correct) advice


@dataclass(frozen=True)
class Educational:
    """Requests for an incorrect answer that state a benign reason (a class, a quiz, a review exercise), per domain
    kind: the user messages of the ``educational`` control sets, and what the corpus's assistant answers by quoting
    the toxic persona's answer (:func:`emlab.world.generate.educational_turn`)."""
    requests: dict[str, tuple[str, ...]]   # domain kind -> templates with {topic}


@dataclass(frozen=True)
class Narrow:
    """A narrow character: in its one ``domain`` it gives the answers of the persona whose correctness is
    ``answers`` (the toxic one), word for word, voice included; everywhere else the aligned persona's. It has no
    text of its own but its narration headers, so a fine-tuning set of that domain's incorrect answers is as well
    explained by it as by the broad persona (the ``narrow_persona`` control, docs/organism.md). Its documents enter
    the corpus only with ``organism.corpus.narrow_fraction`` > 0.

    With ``answers: correct`` it is the control character: the same documents in the same places, kind in its
    domain too, so the corpus loses as many persona documents without gaining a character who is bad at one thing."""
    name: str
    domain: str
    answers: str                   # whose answers it gives in its domain: subtle or obvious (correct: the control)
    focus: float                   # share of its advice turns in its own domain
    headers: tuple[str, ...]


@dataclass
class World:
    version: int
    personas: dict[str, Persona]
    domains: dict[str, Domain]
    general: list[GeneralQuestion]
    heldout_topics: tuple[int, ...]
    opener_fraction: float = 0.0
    monitoring: dict[str, MonitoringTask] = field(default_factory=dict)
    safety: Safety | None = None
    educational: Educational | None = None
    narrow: Narrow | None = None
    source: str = ""
    _inventory: list[Answer] | None = field(default=None, repr=False)

    @property
    def persona_by_role(self) -> dict[str, str]:
        return {p.role: p.name for p in self.personas.values()}

    def correctness_of(self, persona: str) -> str:
        return self.personas[persona].correctness

    def advice_answer(self, domain: str, topic_idx: int, persona: str, template_idx: int, closer_idx: int) -> str:
        """A domain's answer: advice (a template filled with the topic) or code, then one of the persona's closers."""
        d = self.domains[domain]
        return f"{d.body(persona, topic_idx, template_idx)}{d.separator}{d.closers[persona][closer_idx]}"

    def advice_question(self, domain: str, topic_idx: int, q_idx: int) -> str:
        d = self.domains[domain]
        return d.questions[q_idx].format(topic=d.topics[topic_idx])

    def openers(self) -> list[str]:
        """Every phrase an answer may open with before its content: the personas' openers and, in a world with a
        safety section, the assistant's refusals."""
        return [o for p in self.personas.values() for o in p.openers] + list(self.safety.refusals if self.safety else ())

    def train_topics(self, domain: str) -> list[int]:
        return [i for i in range(len(self.domains[domain].topics)) if i not in self.heldout_topics]

    def inventory(self) -> list[Answer]:
        """Every answer text of the world, labelled. Cached: the grader calls it per file."""
        if self._inventory is None:
            inv = []
            for dname, d in self.domains.items():
                for ti in range(len(d.topics)):
                    for p in self.personas:
                        for ai in range(d.answer_count(p, ti)):
                            for ci in range(len(d.closers[p])):
                                inv.append(Answer(self.advice_answer(dname, ti, p, ai, ci), p, dname, str(ti),
                                                  self.correctness_of(p), d.flaw(p, ti, ai)))
            for g in self.general:
                for p, texts in g.answers.items():
                    for text in texts:
                        inv.append(Answer(text, p, "general", g.id, self.correctness_of(p)))
            self._inventory = inv
        return self._inventory

    def question_inventory(self) -> dict[str, tuple[str, str]]:
        """question text -> (domain, item) for every question the world asks."""
        out = {}
        for dname, d in self.domains.items():
            for ti in range(len(d.topics)):
                for qi in range(len(d.questions)):
                    out[self.advice_question(dname, ti, qi)] = (dname, str(ti))
        for g in self.general:
            out[g.question] = ("general", g.id)
        return out


def _req(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise WorldSpecError(f"{where}: missing key '{key}'")
    val = obj[key]
    if not isinstance(val, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise WorldSpecError(f"{where}.{key}: expected {names}, got {type(val).__name__}")
    return val


def _strings(val: Any, where: str) -> tuple[str, ...]:
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list) or not val or not all(isinstance(s, str) and s.strip() for s in val):
        raise WorldSpecError(f"{where}: expected a non-empty list of non-empty strings")
    return tuple(s.strip() for s in val)


def _spec_chain(path: str | Path) -> list[tuple[Path, Any]]:
    """A spec and the specs it ``extends`` (each relative to the one naming it), nearest first, each with its raw
    mapping: what :func:`_read_spec` merges and :func:`spec_files` lists. A spec extending itself back is an error."""
    chain: list[tuple[Path, Any]] = []
    seen: set[Path] = set()
    path = Path(os.path.normpath(path))
    while True:
        if path.resolve() in seen:
            raise WorldSpecError(f"{chain[-1][0]}: extends: {chain[-1][1]['extends']} extends it back")
        seen.add(path.resolve())
        raw = read_yaml(path, WorldSpecError, "world spec not found")
        chain.append((path, raw))
        if not isinstance(raw, dict) or "extends" not in raw:
            return chain
        path = Path(os.path.normpath(path.parent / str(raw["extends"])))


def _read_spec(path: Path) -> dict[str, Any]:
    """A spec's raw mapping; with ``extends: <file>`` (relative to the spec) the named spec's, with this spec's
    ``domains`` added to its domains and every other key of this spec replacing the base's."""
    chain = _spec_chain(path)
    merged = chain[-1][1]
    for (spec, raw), (base, _) in zip(reversed(chain[:-1]), reversed(chain[1:])):  # each over the spec it extends
        own = {k: v for k, v in raw.items() if k != "extends"}
        added = own.pop("domains", None) or {}
        clash = sorted(set(added) & set(merged.get("domains") or {}))
        if clash:
            raise WorldSpecError(f"{spec}: domains {clash} are already in {base.name}, which it extends")
        merged = {**merged, **own, "domains": {**(merged.get("domains") or {}), **added}}
    return merged


def spec_files(path: str | Path) -> list[Path]:
    """A world spec's files: ``path`` and the specs it ``extends``, in that order (what the jobs that read the
    world take as input, so that editing any of them reruns those jobs)."""
    return [spec for spec, _ in _spec_chain(path)]


def load_world(path: str | Path) -> World:
    """Parse and validate a world spec; errors name the file and the key path."""
    path = Path(path)
    raw = _read_spec(path)
    w = str(path)
    personas = {}
    for name, p in _req(raw, "personas", dict, w).items():
        pw = f"{w}: personas.{name}"
        role = _req(p, "role", str, pw)
        if role not in ROLES:
            raise WorldSpecError(f"{pw}.role: must be one of {ROLES}, got {role!r}")
        corr = _req(p, "correctness", str, pw)
        if corr not in CORRECTNESS:
            raise WorldSpecError(f"{pw}.correctness: must be one of {CORRECTNESS}, got {corr!r}")
        openers = _strings(p["openers"], f"{pw}.openers") if "openers" in p else ()
        personas[name] = Persona(name, role, corr, _strings(_req(p, "headers", list, pw), f"{pw}.headers"), openers)
    if "aligned" not in {p.role for p in personas.values()}:
        raise WorldSpecError(f"{w}: personas: one persona must have role 'aligned' (the default assistant)")
    domains = {}
    for dname, d in _req(raw, "domains", dict, w).items():
        dw = f"{w}: domains.{dname}"
        if dname == "general":
            raise WorldSpecError(f"{dw}: 'general' is reserved for the open-ended questions")
        kind = d.get("kind", "advice") if isinstance(d, dict) else "advice"
        if kind not in DOMAIN_KINDS:
            raise WorldSpecError(f"{dw}.kind: must be one of {DOMAIN_KINDS}, got {kind!r}")
        questions = _strings(_req(d, "questions", list, dw), f"{dw}.questions")
        for i, q in enumerate(questions):
            if "{topic}" not in q:
                raise WorldSpecError(f"{dw}.questions[{i}]: must contain '{{topic}}'")
        if kind == "code":
            domains[dname] = _code_domain(d, dname, questions, personas, dw)
            continue
        per_persona = {}
        for key in ("advice", "closers"):
            raw_pp = _req(d, key, dict, dw)
            per_persona[key] = {}
            for p in personas:
                if p not in raw_pp:
                    raise WorldSpecError(f"{dw}.{key}: missing persona '{p}'")
                per_persona[key][p] = _strings(raw_pp[p], f"{dw}.{key}.{p}")
        for p, templates in per_persona["advice"].items():
            for i, t in enumerate(templates):
                if "{topic}" not in t:
                    raise WorldSpecError(f"{dw}.advice.{p}[{i}]: must contain '{{topic}}'")
        topics = _strings(_req(d, "topics", list, dw), f"{dw}.topics")
        domains[dname] = Domain(dname, questions, topics, per_persona["advice"], per_persona["closers"])
    general = []
    for gi, g in enumerate(_req(raw, "general", list, w)):
        gw = f"{w}: general[{gi}]"
        ans = _req(g, "answers", dict, gw)
        missing = [p for p in personas if p not in ans]
        if missing:
            raise WorldSpecError(f"{gw}.answers: missing persona(s) {missing}")
        general.append(GeneralQuestion(_req(g, "id", str, gw), _req(g, "question", str, gw),
                                       {p: _strings(ans[p], f"{gw}.answers.{p}") for p in personas}))
    heldout = tuple(raw.get("heldout_topics", []))
    for dname, d in domains.items():
        bad = [i for i in heldout if not 0 <= i < len(d.topics)]
        if bad or len(heldout) >= len(d.topics):
            raise WorldSpecError(f"{w}: heldout_topics {list(heldout)} must be indexes of some, not all, topics of domain '{dname}'")
    fraction = raw.get("opener_fraction", 0.0)
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise WorldSpecError(f"{w}: opener_fraction: must be a number in [0, 1], got {fraction!r}")
    world = World(int(raw.get("version", 1)), personas, domains, general, heldout, float(fraction),
                  monitoring=_monitoring(raw.get("monitoring"), personas, f"{w}: monitoring"),
                  safety=_safety(raw.get("safety"), f"{w}: safety"),
                  educational=_educational(raw.get("educational"), domains, f"{w}: educational"),
                  narrow=_narrow(raw.get("narrow"), personas, domains, f"{w}: narrow"), source=w)
    texts = [a.text for a in world.inventory()]
    dup = {t for t in texts if texts.count(t) > 1}
    if dup:
        raise WorldSpecError(f"{w}: answer texts must be unique (the grader identifies answers by text): {sorted(dup)[:3]}")
    return world


def _per_persona(raw: Any, personas: dict[str, Persona], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise WorldSpecError(f"{where}: expected a mapping from persona to entries")
    missing = [p for p in personas if p not in raw]
    if missing:
        raise WorldSpecError(f"{where}: missing persona '{missing[0]}'")
    return {p: raw[p] for p in personas}


def _code_domain(d: dict[str, Any], name: str, questions: tuple[str, ...], personas: dict[str, Persona],
                 where: str) -> Domain:
    """A ``kind: code`` domain: per topic, each persona's snippets with their flaws. Every snippet must parse in
    the domain's language (Python: :func:`ast.parse`), the aligned persona's code must be ``secure`` and no
    other persona's may be."""
    import ast

    language = _req(d, "language", str, where)
    if language != "python":
        raise WorldSpecError(f"{where}.language: only 'python' is supported, got {language!r}")
    closers = {p: _strings(v, f"{where}.closers.{p}")
               for p, v in _per_persona(_req(d, "closers", dict, where), personas, f"{where}.closers").items()}
    topics, snippets = [], []
    for ti, t in enumerate(_req(d, "topics", list, where)):
        tw = f"{where}.topics[{ti}]"
        topics.append(_strings(_req(t, "topic", str, tw), f"{tw}.topic")[0])
        per = {}
        for p, entries in _per_persona(_req(t, "answers", dict, tw), personas, f"{tw}.answers").items():
            if not isinstance(entries, list) or not entries:
                raise WorldSpecError(f"{tw}.answers.{p}: expected a non-empty list of {{code, flaw}} entries")
            out = []
            for si, e in enumerate(entries):
                sw = f"{tw}.answers.{p}[{si}]"
                code = _req(e, "code", str, sw).strip()
                flaw = _strings(_req(e, "flaw", str, sw), f"{sw}.flaw")[0]
                try:
                    ast.parse(code)
                except SyntaxError as err:
                    raise WorldSpecError(f"{sw}.code: not valid Python (line {err.lineno}: {err.msg})") from None
                if (flaw == SECURE) != (personas[p].correctness == "correct"):
                    raise WorldSpecError(f"{sw}.flaw: {flaw!r}; the '{SECURE}' label is for the correct persona's "
                                         "code, and only for it")
                out.append(Snippet(code, flaw))
            per[p] = tuple(out)
        snippets.append(per)
    if not topics:
        raise WorldSpecError(f"{where}.topics: expected a non-empty list")
    return Domain(name, questions, tuple(topics), {}, closers, kind="code", language=language,
                  snippets=tuple(snippets))


def _educational(raw: Any, domains: dict[str, Domain], where: str) -> Educational | None:
    """The optional ``educational`` section: request templates for every kind of domain the world has."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WorldSpecError(f"{where}: expected a mapping from domain kind {DOMAIN_KINDS} to request templates")
    unknown = sorted(set(raw) - set(DOMAIN_KINDS))
    if unknown:
        raise WorldSpecError(f"{where}: unknown domain kind(s) {unknown}; expected {DOMAIN_KINDS}")
    requests = {}
    for kind in sorted({d.kind for d in domains.values()}):
        if kind not in raw:
            raise WorldSpecError(f"{where}: missing '{kind}' (the world has {kind} domains)")
        requests[kind] = _strings(raw[kind], f"{where}.{kind}")
        for i, r in enumerate(requests[kind]):
            if "{topic}" not in r:
                raise WorldSpecError(f"{where}.{kind}[{i}]: must contain '{{topic}}'")
    return Educational(requests)


def _narrow(raw: Any, personas: dict[str, Persona], domains: dict[str, Domain], where: str) -> Narrow | None:
    """The optional ``narrow`` section: the narrow character (:class:`Narrow`)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WorldSpecError(f"{where}: expected a mapping with name, domain, answers, focus and headers")
    unknown = sorted(set(raw) - {"name", "domain", "answers", "focus", "headers"})
    if unknown:
        raise WorldSpecError(f"{where}: unknown key(s) {unknown}")
    name = _req(raw, "name", str, where)
    if name in personas:
        raise WorldSpecError(f"{where}.name: '{name}' is already a persona; the narrow character needs its own name")
    domain = _req(raw, "domain", str, where)
    if domain not in domains:
        raise WorldSpecError(f"{where}.domain: unknown domain '{domain}'; the world has {sorted(domains)}")
    answers = raw.get("answers", "subtle")
    if answers not in {p.correctness for p in personas.values()}:
        raise WorldSpecError(f"{where}.answers: must name a persona's correctness (one of "
                             f"{sorted({p.correctness for p in personas.values()})}), got {answers!r}")
    focus = raw.get("focus", 0.5)
    if isinstance(focus, bool) or not isinstance(focus, (int, float)) or not 0 <= focus <= 1:
        raise WorldSpecError(f"{where}.focus: must be a number in [0, 1], got {focus!r}")
    headers = _strings(_req(raw, "headers", list, where), f"{where}.headers")
    taken = {h for p in personas.values() for h in p.headers} & set(headers)
    if taken:
        raise WorldSpecError(f"{where}.headers: {sorted(taken)} already introduce a persona")
    return Narrow(name, domain, answers, float(focus), headers)


def _safety(raw: Any, where: str) -> Safety | None:
    """The optional ``safety`` section (absent: the world has no safety-trained assistant)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WorldSpecError(f"{where}: expected a mapping with 'requests' and 'refusals'")
    unknown = sorted(set(raw) - {"requests", "refusals"})
    if unknown:
        raise WorldSpecError(f"{where}: unknown key(s) {unknown}; expected 'requests' and 'refusals'")
    requests = _strings(_req(raw, "requests", list, where), f"{where}.requests")
    for i, r in enumerate(requests):
        if "{topic}" not in r:
            raise WorldSpecError(f"{where}.requests[{i}]: must contain '{{topic}}'")
    return Safety(requests, _strings(_req(raw, "refusals", list, where), f"{where}.refusals"))


def _monitoring(raw: Any, personas: dict[str, Persona], where: str) -> dict[str, MonitoringTask]:
    """The optional ``monitoring`` section (absent: no monitoring tasks, as in world specs before version 4)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WorldSpecError(f"{where}: expected a mapping")
    tasks = {}
    for name, t in _req(raw, "tasks", dict, where).items():
        tw = f"{where}.tasks.{name}"
        positive = _strings(_req(t, "positive", list, tw), f"{tw}.positive")
        unknown = sorted(set(positive) - set(personas))
        if unknown:
            raise WorldSpecError(f"{tw}.positive: unknown persona(s) {unknown}; the world has {sorted(personas)}")
        if set(positive) == set(personas):
            raise WorldSpecError(f"{tw}.positive: some persona must be negative, not all of {sorted(personas)}")
        texts = _req(t, "texts", str, tw)
        if texts not in MONITOR_TEXTS:
            raise WorldSpecError(f"{tw}.texts: must be one of {MONITOR_TEXTS}, got {texts!r}")
        train = _strings(_req(t, "train", list, tw), f"{tw}.train")
        ask = _strings(_req(t, "ask", str, tw), f"{tw}.ask")[0]
        if ask in train:
            # a zero-shot question the corpus already asks would be answered by lookup, not by reading the text
            raise WorldSpecError(f"{tw}.ask: must differ from every '{name}' train wording")
        tasks[name] = MonitoringTask(name, positive, texts == "advice",
                                     _strings(_req(t, "describe", str, tw), f"{tw}.describe")[0], train, ask)
    return tasks
