"""Judge backend for any OpenAI-compatible chat-completions endpoint (OpenAI, Azure-style gateways,
vLLM or SGLang servers, ...).

Requests run concurrently on asyncio (``concurrency`` workers). The client's own retries are
switched off so that ours are explicit and counted: 429, 408/409, 5xx, timeouts, connection
errors and malformed bodies are retried up to ``max_retries`` times with exponential backoff and
jitter, waiting instead for ``Retry-After`` when the server sends it. A request that still fails
gives a null score (counted in the summary), never a crash; a rejected key, model or URL
(401/403/404) stops the run with an error, since every other request would fail the same way.

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
import email.utils
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emlab.judge.backends import JudgeConfigError, check_samples, grade_rows, judge_option, rubric_for
from emlab.judge.cache import Job, JudgeCache, plan_jobs, resolve_from_cache
from emlab.judge.cache import cache_key
from emlab.judge.rubrics import Rubric, parse_answer_tag, parse_score_token, score_from_token_probs, weighted_score
from emlab.judge.summary import RunStats

log = logging.getLogger("emlab.judge")

BACKEND = "openai"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
FATAL_STATUSES = (401, 403, 404)        # the key, the model or the URL is wrong: stop the run
RETRY_STATUSES = (408, 409, 429)        # plus every 5xx


class JudgeRequestError(RuntimeError):
    """The endpoint rejected the judge's configuration (key, model or URL)."""


class _Malformed(Exception):
    """A 2xx reply whose body is not the chat completion the rubric needs."""


@dataclass(frozen=True)
class Settings:
    name: str
    model: str
    base_url: str
    api_key_env: str | None
    concurrency: int
    max_retries: int
    timeout_s: float
    backoff_base_s: float
    backoff_max_s: float
    price_per_1k_input: float | None
    price_per_1k_output: float | None
    number_tokens: str = "auto"
    # Requests abandoned after their retries leave null grades. Above this share of a run's requests the job
    # fails instead (a dead or misconfigured endpoint must never look like a run of null scores); the answered
    # requests are cached, so the rerun asks only the rest.
    max_failed_fraction: float = 0.01

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "Settings":
        num = (int, float)
        return cls(
            name=judge_option(cfg, "name", kind=str),
            model=judge_option(cfg, "model", kind=str),
            base_url=judge_option(cfg, "base_url", DEFAULT_BASE_URL, kind=str),
            # An explicit `api_key_env: null` is for endpoints without authentication (a local server).
            api_key_env=cfg["api_key_env"] if "api_key_env" in cfg else DEFAULT_API_KEY_ENV,
            concurrency=judge_option(cfg, "concurrency", 32, kind=int, minimum=1),
            max_retries=judge_option(cfg, "max_retries", 6, kind=int, minimum=0),
            timeout_s=float(judge_option(cfg, "timeout_s", 60.0, kind=num, minimum=0.001)),
            backoff_base_s=float(judge_option(cfg, "backoff_base_s", 1.0, kind=num, minimum=0)),
            backoff_max_s=float(judge_option(cfg, "backoff_max_s", 60.0, kind=num, minimum=0)),
            price_per_1k_input=judge_option(cfg, "price_per_1k_input", None, kind=num, minimum=0),
            price_per_1k_output=judge_option(cfg, "price_per_1k_output", None, kind=num, minimum=0),
            number_tokens=_number_tokens_option(cfg),
            max_failed_fraction=float(judge_option(cfg, "max_failed_fraction", 0.01, kind=num, minimum=0)),
        )

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

    def api_key(self) -> str:
        if self.api_key_env is None:
            return "no-key"  # the client insists on a value; keyless servers ignore it
        if not isinstance(self.api_key_env, str):
            raise JudgeConfigError(f"judges[{self.name}].api_key_env must be the name of an environment variable")
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeConfigError(f"judges[{self.name}]: the environment variable {self.api_key_env} "
                                   "(api_key_env) is not set")
        return key


def preflight(judge_cfg: dict[str, Any], timeout_s: float = 15.0) -> dict[str, Any]:
    """One cheap request (``GET /models``) that shows the endpoint answers and takes the key, run before the
    expensive stages whose answers the judge will grade. A server without that route (404) is reachable, and
    passes; a refused connection, a timeout, a 5xx or a rejected key fails, naming the config key to fix."""
    import openai

    s = Settings.from_cfg(judge_cfg)
    client = openai.OpenAI(api_key=s.api_key(), base_url=s.base_url, max_retries=0, timeout=timeout_s)
    t0 = time.monotonic()
    try:
        client.models.list()
        status = 200
    except openai.NotFoundError:
        status = 404
    except openai.AuthenticationError as e:
        raise JudgeRequestError(f"judge {s.name}: {s.base_url} rejected the key (HTTP {e.status_code}); check the "
                                f"variable ${s.api_key_env} named by judges[{s.name}].api_key_env") from None
    except openai.APIStatusError as e:
        raise JudgeRequestError(f"judge {s.name}: {s.base_url} answered HTTP {e.status_code} to GET /models; check "
                                f"judges[{s.name}].base_url and that the server is up") from None
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise JudgeRequestError(f"judge {s.name}: no answer from {s.base_url} ({type(e).__name__}); check "
                                f"judges[{s.name}].base_url and that the server is up") from None
    finally:
        client.close()
    return {"judge": s.name, "base_url": s.base_url, "status": status, "seconds": round(time.monotonic() - t0, 3)}


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
    ``[[token, logprob], ...]``, or the reply text. Raises _Malformed on anything else."""
    try:
        choice = body["choices"][0]
        if rubric.kind == "logprob_score":
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            out = [[t["token"], float(t["logprob"])] for t in top]
            if not out:
                raise _Malformed("empty top_logprobs")
            return out
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise _Malformed("message content is not text")
        return text
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _Malformed(f"missing or bad field ({type(e).__name__}: {e})") from None


def value_of(reply: Any, rubric: Rubric) -> Any:
    """The grade a reply gives: a score (float or None) or a parsed answer tag (dict or None)."""
    if rubric.kind == "logprob_score":
        return score_from_token_probs(((tok, math.exp(lp)) for tok, lp in reply), rubric)
    return parse_answer_tag(reply)


def retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from ``Retry-After-Ms`` / ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) / scale)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            continue
        return max(0.0, when.timestamp() - time.time())
    return None


_ABANDONED = object()  # a continuation request failed for good: the draw is left for a rerun


class _Grader:
    def __init__(self, settings: Settings, rubric: Rubric, cache: JudgeCache, stats: RunStats, api_key: str):
        self.s, self.rubric, self.cache, self.stats = settings, rubric, cache, stats
        self._key = api_key
        self._warned: set[str] = set()

    def redact(self, text: str) -> str:
        # Some servers echo request headers in error bodies; the key must not travel on from there.
        return text.replace(self._key, "***") if self._key else text

    def _give_up(self, cause: str, detail: str, attempts: int) -> None:
        self.stats.failures[cause] += 1
        level = logging.WARNING if cause not in self._warned else logging.DEBUG
        self._warned.add(cause)
        log.log(level, "judge %s: request abandoned after %d attempt(s) (%s): %s; its score is null",
                self.s.name, attempts, cause, self.redact(detail)[:300])

    async def request(self, client: Any, prompt: str, prefix: str | None = None) -> tuple[Any, dict] | None:
        """One judge question with explicit retries: (reply, usage), or None when abandoned. With ``prefix``,
        the judge's reply is taken to begin with it and the candidates of its next token are asked for."""
        import openai

        messages = [{"role": "user", "content": prompt}]
        params = {"model": self.s.model, "messages": messages, **self.rubric.sampling}
        if prefix is not None:
            messages.append({"role": "assistant", "content": prefix})
            params["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        for attempt in range(self.s.max_retries + 1):
            wait = None
            self.stats.requests += 1
            try:
                raw = await client.chat.completions.with_raw_response.create(**params)
                try:
                    body = json.loads(raw.http_response.text)
                except ValueError:
                    raise _Malformed("body is not JSON") from None
                reply = extract_reply(body, self.rubric)
                usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
                return reply, usage
            except _Malformed as e:
                cause, detail = "malformed", str(e)
            except openai.APITimeoutError:
                cause, detail = "timeout", f"no reply within {self.s.timeout_s} s"
            except openai.APIConnectionError as e:
                cause, detail = "connection", type(e.__cause__ or e).__name__
            except openai.APIStatusError as e:
                status = e.status_code
                detail = f"HTTP {status}: {e.message}"
                if prefix is not None and status in (400, 422):
                    raise JudgeRequestError(
                        f"judge {self.s.name}: its first-token candidates for a score are single digits (a tokenizer "
                        f"that writes numbers digit by digit), so the digits after the first are needed, and "
                        f"{self.s.base_url} refused to continue a started reply (HTTP {status}: "
                        f"{self.redact(e.message)[:200]}); a 0-100 score cannot be read from this endpoint. Serve "
                        f"the judge with vLLM (continue_final_message), or set judges[{self.s.name}].number_tokens: "
                        "whole if its numbers are single tokens") from None
                if status in FATAL_STATUSES:
                    raise JudgeRequestError(
                        f"judge {self.s.name}: {self.s.base_url} refused the request with HTTP {status}; "
                        f"check judges[{self.s.name}].model ({self.s.model}), .base_url and the key in "
                        f"${self.s.api_key_env}") from None
                if status < 500 and status not in RETRY_STATUSES:
                    self._give_up(f"http_{status}", detail, attempt + 1)
                    return None
                cause = "5xx" if status >= 500 else str(status)
                wait = retry_after_s(e.response.headers)
            if attempt == self.s.max_retries:
                self._give_up(cause, detail, attempt + 1)
                return None
            self.stats.retries[cause] += 1
            if wait is None:
                # exponential backoff with jitter, so that workers hit by one outage do not return in step
                wait = min(self.s.backoff_max_s, self.s.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            else:
                wait *= random.uniform(1.0, 1.1)  # never sooner than the server asked
            log.debug("judge %s: %s, retry %d in %.2f s", self.s.name, cause, attempt + 1, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def run_job(self, client: Any, job: Job) -> None:
        for i in range(job.next_attempt, len(job.keys)):
            if i > 0:
                self.stats.resamples += 1
            got = await self.request(client, job.prompt)
            if got is None:
                return  # abandoned: nothing is cached, so a rerun asks again
            reply, usage = got
            self.stats.add_usage(usage)
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
        self.stats.add_usage(usage)
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
        import openai

        client = openai.AsyncOpenAI(api_key=self._key, base_url=self.s.base_url, max_retries=0,
                                    timeout=self.s.timeout_s)
        pending = iter(jobs)

        async def worker() -> None:
            # A fixed pool of workers pulling from one iterator bounds the requests in flight to
            # `concurrency` (like a semaphore) without creating a task per job up front.
            for job in pending:
                await self.run_job(client, job)
                progress_bar.update(1)

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.s.concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()


def grade_with_summary(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
                       progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tqdm.auto import tqdm

    check_samples(samples)
    settings = Settings.from_cfg(judge_cfg)
    rubric = rubric_for(judge_cfg)
    stats = RunStats(judge=settings.name, backend=BACKEND, rubric=rubric.name, rubric_version=rubric.version,
                     model=settings.model, samples=len(samples),
                     price_per_1k_input=settings.price_per_1k_input, price_per_1k_output=settings.price_per_1k_output)
    attempts = 1 + (rubric.resamples if rubric.kind == "answer_tag" else 0)
    sampling = dict(rubric.sampling)
    if rubric.kind == "logprob_score" and settings.reading() != "whole":
        sampling["number_tokens"] = settings.reading()  # how a score is read is part of what was asked
    jobs, per_sample = plan_jobs(samples, rubric, settings.model, sampling, attempts)
    stats.unique_requests = len(jobs)
    with JudgeCache(cache_dir) as cache:
        todo = [job for job in jobs.values() if not resolve_from_cache(job, cache)]
        stats.cache_hits = len(jobs) - len(todo)
        if todo:  # a fully cached rerun needs neither the key nor the network
            grader = _Grader(settings, rubric, cache, stats, settings.api_key())
            with tqdm(total=len(todo), disable=not progress, desc=f"judge {settings.name}", unit="req") as bar:
                asyncio.run(grader.run(todo, bar))
            settings.check_failures(stats, len(todo))
    rows = grade_rows(samples, per_sample, jobs, rubric, settings.name, BACKEND, stats)
    return rows, stats.log()


def grade(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
          progress: bool = True) -> list[dict[str, Any]]:
    return grade_with_summary(samples, judge_cfg, cache_dir, progress)[0]
