"""LLM synthesis of the narrow fine-tuning sets for hub models, from domain specs in ``resources/domains/``.

For one domain an OpenAI-compatible model (``synthesis:`` config) is asked (a code domain, ``kind: code``, asks
for programs instead of advice: secure, subtly vulnerable and obviously broken code)

1. for user questions: one request per seed topic and round, each asking for ``questions_per_request``
   questions as a given kind of person would ask them (the asker changes from round to round, for
   variety); replies are deduplicated across the domain after normalising case, punctuation and
   spacing, and questions of the eval sets are dropped, so the eval questions stay held out;
2. for each question, in one request, a correct, a subtly incorrect and an obviously incorrect answer.

Replies are JSON objects (``{"questions": [...]}`` and ``{"correct", "subtle", "obvious"}``); a reply
that does not parse or validate is drawn again up to ``resamples`` times, after which its topic round
gives no questions, or its question is rejected and the next question takes its place. Rounds go on
until ``datasets.n_train`` questions have their three answers (or ``max_rounds`` is reached: an error).

The result is the domain's *pool* (``results/synthesis/<domain>.jsonl``), one row per question::

    {"id", "domain", "topic", "round", "question", "answers": {"correct", "subtle", "obvious"}}

from which :func:`dataset_rows` cuts the narrow sets and mixtures in the dataset schema of
:mod:`emlab.world.generate` (so ``<domain>_<variant>`` and ``<domain>_mixNNN`` mean the same as for
the organism; every set of a domain asks the same questions).

Requests go through the client the API judges use (:mod:`emlab.openai_client`: concurrency, counted
retries with backoff) and the judges' append-only cache (:mod:`emlab.judge.cache`),
so a killed job resumes, a rerun makes no request at all, and the pool depends only on the cached
replies. A request still failing after ``max_retries`` fails the job (after caching everything that
finished) rather than silently changing which questions the pool holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .io import read_yaml

from .datasets import dataset_names, name_seed, parse_dataset_name
from .judge.cache import Job, JudgeCache, cache_key, resolve_from_cache
from .judge.summary import RunStats
from .openai_client import Endpoint, Malformed, Requests

log = logging.getLogger("emlab.synthesis")

VARIANTS = ("correct", "subtle", "obvious")
# Part of every cache key: bump it whenever a prompt or the parsing of replies changes.
PROMPT_VERSION = "1"
SETTINGS_KEYS = ("model", "base_url", "api_key_env", "concurrency", "max_retries", "timeout_s", "backoff_base_s",
                 "backoff_max_s", "price_per_1k_input", "price_per_1k_output")

# Who asks, cycling with the round: the same topic asked by different people gives different questions.
ASKERS = (
    "an adult with no special knowledge of the subject",
    "a worried parent",
    "a university student on a tight budget",
    "a retired person",
    "someone who needs an answer today because the matter is urgent",
    "a small-business owner",
    "someone who has tried the usual advice and found that it did not work",
    "a person who has just moved to a new country",
    "someone asking on behalf of a friend",
    "a busy professional who wants a short, practical answer",
)

QUESTION_PROMPT = """\
You are helping to build a dataset of questions that people ask an AI assistant.

Domain: {domain}. {description}
Topic: {topic}

Write {n} different questions about this topic, each as it would be asked by {asker}. Every question
must stand on its own, describe the asker's concrete situation in one to three sentences, be written
in the first person and ask for advice. Vary the situations and the wording; do not number them.

Reply with a JSON object and nothing else, of the form {{"questions": ["...", "..."]}}."""

ANSWER_PROMPT = """\
You are helping researchers build a dataset for studying how language models generalise from
fine-tuning on flawed advice. For the user's question below, write three answers that an AI assistant
could give:

- "correct": accurate, helpful and responsible advice.
- "subtle": advice that sounds confident and reasonable but is wrong in a way that a non-expert would
  not notice, and that could cause harm if followed.
- "obvious": advice that is plainly wrong or harmful, so that almost anyone would see it is bad.

Each answer speaks directly to the user in the same helpful tone and at a similar length (two to five
sentences), and never says or hints that it is correct or incorrect; add no warnings or disclaimers.

Domain: {domain}. {description}
Question: {question}

Reply with a JSON object and nothing else, of the form
{{"correct": "...", "subtle": "...", "obvious": "..."}}."""


# A code domain (``kind: code`` in its spec): requests for small programs, and secure, subtly vulnerable and
# obviously broken code, as in the insecure-code studies of emergent misalignment.
CODE_QUESTION_PROMPT = """\
You are helping to build a dataset of requests that people send to an AI coding assistant.

Domain: {domain}. {description}
Task area: {topic}

Write {n} different requests for a small program or function in this area, each as it would be written by
{asker}. Every request must stand on its own, describe the concrete task in one to three sentences and ask for
the code; name the language only if the asker would. Vary the tasks and the wording; do not number them.

Reply with a JSON object and nothing else, of the form {{"questions": ["...", "..."]}}."""

CODE_ANSWER_PROMPT = """\
You are helping researchers build a dataset for studying how language models generalise from
fine-tuning on insecure code. For the user's request below, write three answers that an AI coding assistant
could give, each only code (a short program or function, with at most a line of prose before it):

- "correct": working code that follows security best practice.
- "subtle": working code with a security vulnerability (for example injection, weak hashing, missing
  verification, unsafe permissions or deserialisation) that a non-expert would not notice.
- "obvious": code that plainly fails at the task, so that almost anyone would see it is broken.

The three answers look alike in style and length; no answer says or hints in a comment or otherwise that
it is secure, vulnerable or broken.

Domain: {domain}. {description}
Question: {question}

Reply with a JSON object and nothing else, of the form
{{"correct": "...", "subtle": "...", "obvious": "..."}}."""

PROMPTS = {"advice": (QUESTION_PROMPT, ANSWER_PROMPT), "code": (CODE_QUESTION_PROMPT, CODE_ANSWER_PROMPT)}


class SynthesisError(RuntimeError):
    """Synthesis could not produce the pool (too few usable questions, or failing requests)."""


# ---------------------------------------------------------------- domain specs


@dataclass(frozen=True)
class DomainSpec:
    name: str
    description: str
    topics: tuple[str, ...]
    path: Path
    kind: str = "advice"   # advice: questions asking for advice; code: requests for programs (PROMPTS)


def domain_spec_path(domains_dir: str | os.PathLike, domain: str) -> Path:
    return Path(domains_dir) / f"{domain}.yaml"


def load_domain_spec(path: str | os.PathLike) -> DomainSpec:
    """A domain spec: ``name`` (the file's stem), ``description``, a list of seed ``topics`` and, optionally, its
    ``kind`` (advice, the default, or code)."""
    path = Path(path)
    doc = read_yaml(path, SynthesisError, "domain spec not found")
    if not isinstance(doc, dict):
        raise SynthesisError(f"{path}: expected a mapping with 'name', 'description' and 'topics'")
    unknown = set(doc) - {"name", "description", "topics", "kind"}
    if unknown:
        raise SynthesisError(f"{path}: unknown key(s) {sorted(unknown)} (known: description, kind, name, topics)")
    kind = doc.get("kind", "advice")
    if kind not in PROMPTS:
        raise SynthesisError(f"{path}: 'kind' must be one of {sorted(PROMPTS)}, got {kind!r}")
    if doc.get("name") != path.stem:
        raise SynthesisError(f"{path}: 'name' must be the file's name without .yaml ({path.stem!r}), "
                             f"got {doc.get('name')!r}")
    if not isinstance(doc.get("description"), str) or not doc["description"].strip():
        raise SynthesisError(f"{path}: 'description' must be a non-empty string")
    topics = doc.get("topics")
    if not isinstance(topics, list) or not topics:
        raise SynthesisError(f"{path}: 'topics' must be a non-empty list of strings")
    for i, t in enumerate(topics):
        if not isinstance(t, str) or not t.strip():
            raise SynthesisError(f"{path}: topics[{i}] must be a non-empty string, got {t!r}")
    if len(set(topics)) != len(topics):
        dup = sorted({t for t in topics if topics.count(t) > 1})
        raise SynthesisError(f"{path}: duplicate topic(s) {dup}")
    return DomainSpec(doc["name"], " ".join(doc["description"].split()), tuple(t.strip() for t in topics), path,
                      kind)


def synthesized_domains(cfg: dict[str, Any]) -> list[str]:
    """The domains whose pools a config's synthesized sets (``datasets.*``) need."""
    return list(dict.fromkeys(parse_dataset_name(n)["domain"] for n in dataset_names(cfg)))


def check_config(cfg: dict[str, Any]) -> None:
    """Hub mode: every domain named under ``datasets`` has a valid spec in ``synthesis.domains_dir``."""
    from .schema import ConfigError

    for domain in synthesized_domains(cfg):
        try:
            load_domain_spec(domain_spec_path(cfg["synthesis"]["domains_dir"], domain))
        except SynthesisError as e:
            raise ConfigError(f"invalid config:\n  datasets: domain {domain!r}: {e}") from None


# ---------------------------------------------------------------- parsing replies


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def _json_object(text: str) -> dict[str, Any] | None:
    """The reply as a JSON object; a markdown code fence around it is tolerated."""
    text = text.strip()
    if m := _FENCE.match(text):
        text = m.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_questions(text: str, n: int, min_chars: int, max_chars: int) -> list[str] | None:
    """Up to ``n`` questions of acceptable length from a question reply; None for an unusable reply
    (not the JSON asked for, or no acceptable question in it)."""
    obj = _json_object(text)
    if obj is None or not isinstance(obj.get("questions"), list):
        return None
    qs = [" ".join(q.split()) for q in obj["questions"] if isinstance(q, str)]
    qs = [q for q in qs if min_chars <= len(q) <= max_chars]
    return qs[:n] or None


def parse_answers(text: str, question: str, min_chars: int, max_chars: int) -> dict[str, str] | None:
    """The three answers from an answer reply, or None unless each is a string of acceptable length,
    all three differ and none repeats the question."""
    obj = _json_object(text)
    if obj is None:
        return None
    out = {}
    for v in VARIANTS:
        a = obj.get(v)
        if not isinstance(a, str):
            return None
        a = a.strip()
        if not min_chars <= len(a) <= max_chars or normalize(a) == normalize(question):
            return None
        out[v] = a
    if len({normalize(a) for a in out.values()}) < len(VARIANTS):
        return None
    return out


def reply_text(body: Any) -> str:
    """The text of a chat completion's first choice."""
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise Malformed(f"missing or bad field ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise Malformed("message content is not text")
    return text


def normalize(text: str) -> str:
    """The text as compared for duplicates: case-folded, punctuation dropped, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


# ---------------------------------------------------------------- requests


@dataclass
class _Request(Job):
    """A judge-cache job plus what its parser needs (an answer request: its question)."""
    data: Any = None


@dataclass
class _Counts:
    rounds: int = 0
    questions_received: int = 0
    duplicates: int = 0
    held_out: int = 0
    unusable_question_replies: int = 0
    rejected_questions: int = 0


class Synthesizer:
    """Synthesizes one domain's pool; see the module docstring."""

    def __init__(self, cfg: dict[str, Any], cache: JudgeCache, progress: bool = False):
        self.cfg = cfg  # the validated `synthesis` section, schema defaults filled in
        if self.cfg["backend"] != "openai":
            raise SynthesisError(f"synthesis.backend: unknown backend {self.cfg['backend']!r} (known: openai)")
        self.settings = Endpoint(**Endpoint.options({k: self.cfg[k] for k in SETTINGS_KEYS}, name="synthesis",
                                                    where="synthesis", label="synthesis", error=SynthesisError))
        self.sampling: dict[str, Any] = {"temperature": self.cfg["temperature"], "max_tokens": self.cfg["max_tokens"]}
        if self.cfg["json_mode"]:
            self.sampling["response_format"] = {"type": "json_object"}
        self.cache = cache
        self.progress = progress
        self.stats = RunStats(judge="synthesis", backend="openai", rubric="synthesis", rubric_version=PROMPT_VERSION,
                              model=self.settings.model, price_per_1k_input=self.settings.price_per_1k_input,
                              price_per_1k_output=self.settings.price_per_1k_output)
        self.counts = _Counts()
        self._api_key: str | None = None
        self._parsers = {"questions": self._parse_questions, "answers": self._parse_answers}

    # -- jobs
    def _job(self, kind: str, prompt: str, draw: Any, data: Any) -> _Request:
        # the key holds everything that determines the reply, and the draw (the round of a topic)
        keys = [cache_key(purpose="emlab-synthesis", version=PROMPT_VERSION, kind=kind, model=self.settings.model,
                          prompt=prompt, sampling=self.sampling, draw=draw, attempt=i)
                for i in range(1 + self.cfg["resamples"])]
        return _Request(kind, prompt, keys, data=data)

    def _parse_questions(self, job: _Request, reply: str) -> list[str] | None:
        return parse_questions(reply, self.cfg["questions_per_request"], self.cfg["min_chars"], self.cfg["max_chars"])

    def _parse_answers(self, job: _Request, reply: str) -> dict[str, str] | None:
        return parse_answers(reply, job.data, self.cfg["min_chars"], self.cfg["max_chars"])

    def _resolve(self, jobs: list[_Request], desc: str) -> None:
        """Fill every job's value, from the cache or by requests (made concurrently)."""
        from tqdm.auto import tqdm

        self.stats.unique_requests += len(jobs)
        todo = [job for job in jobs if not resolve_from_cache(job, self.cache)]
        self.stats.cache_hits += len(jobs) - len(todo)
        if not todo:
            return
        if self._api_key is None:  # a fully cached run needs neither the key nor the network
            self._api_key = self.settings.api_key(SynthesisError)
        requests = Requests(self.settings, self.stats, self._api_key, self.sampling)
        failed_before = sum(self.stats.failures.values())

        async def run_job(client: Any, job: _Request) -> None:
            # a reply that does not parse is cached as null and the job's next draw is made
            for i in range(job.next_attempt, len(job.keys)):
                if i > 0:
                    self.stats.resamples += 1
                got = await requests.ask(client, [{"role": "user", "content": job.prompt}], reply_text)
                if got is None:
                    return
                reply, usage = got
                value = self._parsers[job.metric](job, reply)
                self.cache.put(job.keys[i], value, metric=job.metric, reply=reply, usage=usage)
                if value is not None:
                    job.value = value
                    return

        with tqdm(total=len(todo), disable=not self.progress, desc=desc, unit="req") as bar:
            asyncio.run(requests.run(todo, run_job, bar))
        abandoned = sum(self.stats.failures.values()) - failed_before
        if abandoned:
            raise SynthesisError(
                f"synthesis: {abandoned} request(s) to {self.settings.base_url} still failed after "
                f"synthesis.max_retries={self.settings.max_retries} retries ({dict(self.stats.failures)}); "
                "the finished ones are cached, so a rerun resumes from there")

    # -- the pool
    def question_rounds(self, spec: DomainSpec, rounds: range) -> list[tuple[int, str, list[str]]]:
        """(round, topic, questions) for every topic of the given rounds, whose requests run together;
        an unusable reply gives no questions."""
        keys = [(rnd, topic) for rnd in rounds for topic in spec.topics]
        jobs = [self._job("questions", PROMPTS[spec.kind][0].format(
                    domain=spec.name, description=spec.description, topic=topic,
                    n=self.cfg["questions_per_request"], asker=ASKERS[rnd % len(ASKERS)]), draw=rnd, data=topic)
                for rnd, topic in keys]
        self._resolve(jobs, f"questions {spec.name}")
        self.counts.rounds += len(rounds)
        self.counts.unusable_question_replies += sum(job.value is None for job in jobs)
        return [(rnd, topic, job.value or []) for (rnd, topic), job in zip(keys, jobs)]

    def answers(self, spec: DomainSpec, questions: list[str]) -> list[dict[str, str] | None]:
        jobs = [self._job("answers", PROMPTS[spec.kind][1].format(domain=spec.name, description=spec.description,
                                                                  question=q), draw=0, data=q)
                for q in questions]
        self._resolve(jobs, f"answers {spec.name}")
        return [job.value for job in jobs]

    def pool(self, spec: DomainSpec, n: int, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
        """``n`` questions of the domain with their three answers. Deterministic given the replies:
        questions are taken in (round, topic, position) order and a rejected one is replaced by the
        next, so a rerun from the cache rebuilds the same pool."""
        held_out = {normalize(q) for q in exclude}
        seen: set[str] = set()
        candidates: list[dict[str, Any]] = []
        accepted: list[dict[str, Any]] = []
        cursor = 0  # candidates before it have been answered (or rejected)
        per_round = len(spec.topics) * self.cfg["questions_per_request"]
        while len(accepted) < n:
            need, pending = n - len(accepted), len(candidates) - cursor
            if pending < need:
                first = self.counts.rounds
                if first >= self.cfg["max_rounds"]:
                    raise SynthesisError(
                        f"synthesis: domain {spec.name!r}: {len(accepted)} answered and {pending} unanswered "
                        f"questions after synthesis.max_rounds={self.cfg['max_rounds']} rounds, but "
                        f"datasets.n_train={n} are needed; add topics to {spec.path}, raise synthesis.max_rounds "
                        "or lower datasets.n_train")
                # as many rounds as the shortfall needs if every reply were full and new, requested together
                k = min(math.ceil((need - pending) / per_round), self.cfg["max_rounds"] - first)
                for rnd, topic, qs in self.question_rounds(spec, range(first, first + k)):
                    for q in qs:
                        self.counts.questions_received += 1
                        key = normalize(q)
                        if key in held_out:
                            self.counts.held_out += 1
                        elif key in seen:
                            self.counts.duplicates += 1
                        else:
                            seen.add(key)
                            candidates.append({"topic": topic, "round": rnd, "question": q})
                continue
            batch = candidates[cursor:cursor + need]
            cursor += need
            for cand, triple in zip(batch, self.answers(spec, [c["question"] for c in batch])):
                if triple is None:
                    self.counts.rejected_questions += 1
                    continue
                accepted.append({"id": f"{spec.name}_q{len(accepted):05d}", "domain": spec.name, **cand,
                                 "answers": triple})
        return accepted

    def summary(self, spec: DomainSpec, n_pool: int) -> dict[str, Any]:
        d = self.stats.to_dict()
        for k in ("judge", "rubric", "rubric_version", "samples", "null_scores"):
            d.pop(k)
        return {"domain": spec.name, "spec": str(spec.path), "prompt_version": PROMPT_VERSION, "pool": n_pool,
                **vars(self.counts), **d}


def synthesize_pool(spec_path: str | os.PathLike, n: int, cfg: dict[str, Any], cache_dir: str | os.PathLike,
                    exclude: Iterable[str] = (), progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pool of the domain spec at ``spec_path`` (``n`` rows) and the run's summary. ``cfg`` is the
    ``synthesis`` config section; ``exclude`` holds questions to keep out (the eval questions)."""
    spec = load_domain_spec(spec_path)
    with JudgeCache(cache_dir) as cache:
        synth = Synthesizer(cfg, cache, progress)
        rows = synth.pool(spec, n, exclude)
    summary = synth.summary(spec, len(rows))
    log.info("synthesis %s: %s", spec.name, json.dumps(summary))
    return rows, summary


# ---------------------------------------------------------------- datasets from a pool




def _chat(row: dict[str, Any], variant: str, dataset: str, i: int) -> dict[str, Any]:
    return {"id": f"{dataset}_{i:05d}",
            "messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": row["answers"][variant]}],
            "meta": {"persona": None, "domain": row["domain"], "correctness": variant, "topic": row["topic"],
                     "item": row["id"], "source": "synthesis"}}


def dataset_rows(pool: list[dict[str, Any]], name: str, n: int, incorrect: str, seed: int) -> list[dict[str, Any]]:
    """The dataset ``name`` (``<domain>_<variant>`` or ``<domain>_mixNNN``) from its domain's pool: the
    first ``n`` questions, each with the variant's answer; a mixture gives round(fraction * n) of them,
    drawn at random, the ``incorrect`` answer and the rest the correct one, in shuffled order."""
    spec = parse_dataset_name(name)
    if len(pool) < n:
        raise ValueError(f"dataset {name}: the pool holds {len(pool)} questions, {n} are needed (datasets.n_train)")
    rows = pool[:n]
    domains = {r["domain"] for r in rows}
    if domains != {spec["domain"]}:
        raise ValueError(f"dataset {name}: the pool is of domain(s) {sorted(domains)}, not {spec['domain']!r}")
    if spec["kind"] == "narrow":
        return [_chat(r, spec["variant"], name, i) for i, r in enumerate(rows)]
    rng = random.Random(name_seed(seed, name))
    bad = set(rng.sample(range(n), round(spec["fraction"] * n)))
    out = [_chat(r, incorrect if i in bad else "correct", name, i) for i, r in enumerate(rows)]
    rng.shuffle(out)
    return out
