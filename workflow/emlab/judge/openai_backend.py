"""Judge backend for any OpenAI-compatible chat-completions endpoint (OpenAI, Azure-style gateways,
vLLM or SGLang servers, ...).

Requests go through :mod:`emlab.openai_client` (concurrency, counted retries with backoff, Retry-After,
fatal 401/403/404). A request that still fails after its retries gives a null score (counted in the
summary); above ``max_failed_fraction`` of a run's requests the job fails instead.

Judges whose tokenizer writes numbers digit by digit (Qwen2, Llama 2, Gemma: the first-token candidates
of a 0-100 score are single digits) are read digit by digit: each likely first digit is sent back as the
start of the judge's reply (``continue_final_message``, a vLLM option) for the next digit's candidates, and
so on; a score is the mean of the numbers so written (``number_tokens``: ``auto`` detects this from the
first reply, except on OpenAI's own API, whose tokenizers write numbers up to 999 as one token; ``whole``
reads the first token only; ``digits`` always expands). An endpoint that cannot continue a reply then
stops the run with an error naming the judge.

Every finished request is appended to the judge cache (:mod:`emlab.judge.cache`), so a killed run
resumes without asking again and a rerun asks nothing. The API key is read from the environment
variable named by ``api_key_env`` and is never written to a file, a log or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emlab.judge.backends import JudgeConfigError, grade_through_cache, judge_option, start_run
from emlab.judge.cache import Job, JudgeCache
from emlab.judge.cache import cache_key
from emlab.judge.rubrics import Rubric, parse_answer_tag, parse_score_token, score_from_token_probs, weighted_score
from emlab.judge.summary import RunStats
from emlab.openai_client import Endpoint, EndpointError, Malformed, Requests
from emlab.openai_client import preflight as endpoint_preflight

log = logging.getLogger("emlab.judge")

BACKEND = "openai"
# The endpoint's errors (a rejected key, model or URL; a dead server) under the judge's name.
JudgeRequestError = EndpointError


@dataclass(frozen=True)
class Settings(Endpoint):
    """A judge's endpoint (:class:`emlab.openai_client.Endpoint`) and how its scores are read."""
    number_tokens: str = "auto"
    # Requests abandoned after their retries leave null grades. Above this share of a run's requests the job
    # fails instead (a dead or misconfigured endpoint must never look like a run of null scores); the answered
    # requests are cached, so the rerun asks only the rest.
    max_failed_fraction: float = 0.01

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "Settings":
        name = judge_option(cfg, "name", kind=str)
        return cls(**Endpoint.options(cfg, name=name, where=f"judges[{name}]", label=f"judge {name}",
                                      error=JudgeConfigError),
                   number_tokens=_number_tokens_option(cfg),
                   max_failed_fraction=float(judge_option(cfg, "max_failed_fraction", 0.01, kind=(int, float),
                                                          minimum=0)))

    def check_failures(self, stats: RunStats, asked: int) -> None:
        """Fail the job when more than ``max_failed_fraction`` of the ``asked`` requests were abandoned."""
        failed = sum(stats.failures.values())
        if asked and failed / asked > self.max_failed_fraction:
            causes = ", ".join(f"{cause}: {n}" for cause, n in sorted(stats.failures.items()))
            raise JudgeRequestError(
                f"judge {self.name}: {failed} of {asked} requests to {self.base_url} failed after "
                f"{self.max_retries} retries ({causes}); check judges[{self.name}].base_url and that the server "
                f"is up. The {asked - failed} answered are cached: a rerun asks only the rest "
                f"(judges[{self.name}].max_failed_fraction, {self.max_failed_fraction}, is the share tolerated "
                "as null grades)")

    def reading(self) -> str:
        """How scores are read: ``auto`` means one token on OpenAI's own API (its tokenizers have multi-digit
        number tokens, and it cannot continue a reply) and detection from the first reply elsewhere."""
        if self.number_tokens == "auto" and "api.openai.com" in self.base_url:
            return "whole"
        return self.number_tokens


def preflight(judge_cfg: dict[str, Any], timeout_s: float = 15.0) -> dict[str, Any]:
    """``GET /models`` on the judge's endpoint before the stages whose answers it grades
    (:func:`emlab.openai_client.preflight`)."""
    r = endpoint_preflight(Settings.from_cfg(judge_cfg), timeout_s, error=JudgeConfigError)
    return {"judge": r.pop("name"), **r}


NUMBER_TOKENS = ("auto", "whole", "digits")
DIGIT_PRUNE = 1e-3  # digit prefixes less likely than this are not continued (their mass counts as no number)


def _number_tokens_option(cfg: dict[str, Any]) -> str:
    value = judge_option(cfg, "number_tokens", "auto", kind=str)
    if value not in NUMBER_TOKENS:
        raise JudgeConfigError(f"judges[{cfg.get('name')}].number_tokens must be one of {NUMBER_TOKENS}, got {value!r}")
    return value


def writes_digits(reply: list[list[Any]], rubric: Rubric) -> bool:
    """Whether first-token candidates look like a digit-by-digit tokenizer's: digits, and no number >= 10."""
    lo, hi = rubric.score_range
    values = [parse_score_token(tok, 0, 10 ** 6) for tok, _ in reply]
    return hi >= 10 and any(v is not None for v in values) and all(v is None or v < 10 for v in values)


def digit_candidates(reply: list[list[Any]]) -> tuple[dict[str, float], float]:
    """({digit: probability} among the candidates, the probability of anything else: the end of the number)."""
    digits: dict[str, float] = {}
    for tok, lp in reply:
        s = tok.strip()
        if len(s) == 1 and s.isdigit():
            digits[s] = digits.get(s, 0.0) + math.exp(lp)
    return digits, max(0.0, 1.0 - sum(digits.values()))


def extract_reply(body: Any, rubric: Rubric) -> Any:
    """What the rubric needs from a chat completion: the top candidates of the first token as
    ``[[token, logprob], ...]``, or the reply text. Raises Malformed on anything else."""
    try:
        choice = body["choices"][0]
        if rubric.kind == "logprob_score":
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            out = [[t["token"], float(t["logprob"])] for t in top]
            if not out:
                raise Malformed("empty top_logprobs")
            return out
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise Malformed("message content is not text")
        return text
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise Malformed(f"missing or bad field ({type(e).__name__}: {e})") from None


def value_of(reply: Any, rubric: Rubric) -> Any:
    """The grade a reply gives: a score (float or None) or a parsed answer tag (dict or None)."""
    if rubric.kind == "logprob_score":
        return score_from_token_probs(((tok, math.exp(lp)) for tok, lp in reply), rubric)
    return parse_answer_tag(reply)


_ABANDONED = object()  # a continuation request failed for good: the draw is left for a rerun


class _Grader:
    """A rubric's questions to the judge: one request per draw, digit-by-digit scores where the judge's
    tokenizer needs them, every finished request cached."""

    def __init__(self, settings: Settings, rubric: Rubric, cache: JudgeCache, stats: RunStats, api_key: str):
        self.s, self.rubric, self.cache, self.stats = settings, rubric, cache, stats
        self.requests = Requests(settings, stats, api_key, rubric.sampling)

    def _refusal(self, status: int, message: str) -> Exception | None:
        if status in (400, 422):
            return JudgeRequestError(
                f"judge {self.s.name}: its first-token candidates for a score are single digits (a tokenizer "
                f"that writes numbers digit by digit), so the digits after the first are needed, and "
                f"{self.s.base_url} refused to continue a started reply (HTTP {status}: {message[:200]}); a 0-100 "
                f"score cannot be read from this endpoint. Serve the judge with vLLM (continue_final_message), "
                f"or set judges[{self.s.name}].number_tokens: whole if its numbers are single tokens")
        return None

    async def request(self, client: Any, prompt: str, prefix: str | None = None) -> tuple[Any, dict] | None:
        """One judge question: (reply, usage), or None when abandoned. With ``prefix``, the judge's reply is
        taken to begin with it and the candidates of its next token are asked for."""
        messages = [{"role": "user", "content": prompt}]
        if prefix is None:
            return await self.requests.ask(client, messages, lambda body: extract_reply(body, self.rubric))
        messages.append({"role": "assistant", "content": prefix})
        return await self.requests.ask(client, messages, lambda body: extract_reply(body, self.rubric),
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False},
                                       refusal=self._refusal)

    async def run_job(self, client: Any, job: Job) -> None:
        for i in range(job.next_attempt, len(job.keys)):
            if i > 0:
                self.stats.resamples += 1
            got = await self.request(client, job.prompt)
            if got is None:
                return  # abandoned: nothing is cached, so a rerun asks again
            reply, usage = got
            if self.rubric.kind == "logprob_score" and self._expands(reply):
                value = await self.digit_score(client, job, i, reply)
                if value is _ABANDONED:
                    return
            else:
                value = value_of(reply, self.rubric)
            self.cache.put(job.keys[i], value, metric=job.metric, reply=reply, usage=usage)
            if value is not None:
                job.value = value
                return

    def _expands(self, reply: Any) -> bool:
        mode = self.s.reading()
        return mode == "digits" or (mode == "auto" and writes_digits(reply, self.rubric))

    async def continuation(self, client: Any, job: Job, draw: int, prefix: str) -> Any:
        """The first-token candidates after the judge's reply began with ``prefix`` (cached under its own key)."""
        key = cache_key(job=job.keys[draw], continue_after=prefix)
        rec = self.cache.get(key)
        if rec is not None:
            return rec["value"]
        got = await self.request(client, job.prompt, prefix)
        if got is None:
            return None
        reply, usage = got
        self.cache.put(key, reply, metric=job.metric, continues=prefix, usage=usage)
        return reply

    async def digit_score(self, client: Any, job: Job, draw: int, reply: Any) -> Any:
        """The score from a digit-by-digit reading: P("85") = P("8") P("5" | "8") P(no digit | "85")."""
        lo, hi = self.rubric.score_range
        probs: dict[int, float] = {}
        frontier = [("", 1.0, reply)]
        while frontier:
            nxt = []
            for prefix, p, candidates in frontier:
                digits, end = digit_candidates(candidates)
                if prefix and lo <= int(prefix) <= hi:
                    probs[int(prefix)] = probs.get(int(prefix), 0.0) + p * end
                for d, q in digits.items():
                    number = prefix + d
                    if p * q < DIGIT_PRUNE or (number != "0" and number.startswith("0")) or int(number) > hi:
                        continue
                    more = await self.continuation(client, job, draw, number)
                    if more is None:
                        return _ABANDONED
                    nxt.append((number, p * q, more))
            frontier = nxt
        return weighted_score(probs.items(), self.rubric.min_mass)

    async def run(self, jobs: list[Job], progress_bar: Any) -> None:
        await self.requests.run(jobs, self.run_job, progress_bar)


def grade_with_summary(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
                       progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tqdm.auto import tqdm

    settings, rubric, stats = start_run(samples, judge_cfg, Settings, BACKEND)
    attempts = 1 + (rubric.resamples if rubric.kind == "answer_tag" else 0)
    sampling = dict(rubric.sampling)
    if rubric.kind == "logprob_score" and settings.reading() != "whole":
        sampling["number_tokens"] = settings.reading()  # how a score is read is part of what was asked
    def ask_missing(todo, cache):
        grader = _Grader(settings, rubric, cache, stats, settings.api_key(JudgeConfigError))
        with tqdm(total=len(todo), disable=not progress, desc=f"judge {settings.name}", unit="req") as bar:
            asyncio.run(grader.run(todo, bar))
        settings.check_failures(stats, len(todo))

    return grade_through_cache(samples, rubric, settings.model, sampling, cache_dir, settings.name, BACKEND, stats,
                               ask_missing, attempts)


def grade(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
          progress: bool = True) -> list[dict[str, Any]]:
    return grade_with_summary(samples, judge_cfg, cache_dir, progress)[0]
