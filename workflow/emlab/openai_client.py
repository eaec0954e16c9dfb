"""One client for OpenAI-compatible chat-completions endpoints (OpenAI, gateways, vLLM or SGLang servers),
shared by the API judges (:mod:`emlab.judge.openai_backend`) and dataset synthesis (:mod:`emlab.synthesis`).

Requests run concurrently on asyncio (``concurrency`` workers pulling from one queue). The openai client's
own retries are switched off so that ours are explicit and counted: 429, 408/409, 5xx, timeouts, connection
errors and malformed bodies are retried up to ``max_retries`` times with exponential backoff and jitter,
waiting instead for ``Retry-After`` when the server sends it. A request that still fails is abandoned
(counted by cause, never a crash); a rejected key, model or URL (401/403/404) stops the run with an error
naming the config key to fix, since every other request would fail the same way.

What a caller asks, how it reads a reply and what it caches stay with the caller: :meth:`Requests.ask`
takes the messages and an ``extract`` function, :meth:`Requests.run` a coroutine per job. The API key is
read from the environment variable named by ``api_key_env`` and is never written to a file, a log or an
error message (:meth:`Requests.redact` strips it from anything a server echoes).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from emlab.schema import ConfigError, option

log = logging.getLogger("emlab.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
FATAL_STATUSES = (401, 403, 404)        # the key, the model or the URL is wrong: stop the run
RETRY_STATUSES = (408, 409, 429)        # plus every 5xx


class EndpointError(RuntimeError):
    """The endpoint rejected the configuration (key, model or URL), or does not answer at all."""


class Malformed(Exception):
    """A 2xx reply whose body is not what the caller needs."""


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and how hard to try. ``where`` is the config section errors name (``judges[gpt]``,
    ``synthesis``); ``label`` starts every message about it (``judge gpt``, ``synthesis``)."""
    name: str
    where: str
    label: str
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

    @staticmethod
    def options(cfg: dict[str, Any], *, name: str, where: str, label: str,
                error: type[Exception] = ConfigError) -> dict[str, Any]:
        """The endpoint's fields read from a config section (for this class or a subclass's constructor)."""
        num = (int, float)

        def get(key: str, default: Any = ..., **kw: Any) -> Any:
            return option(cfg, key, default, where=where, error=error, **kw)

        return dict(
            name=name, where=where, label=label,
            model=get("model", kind=str),
            base_url=get("base_url", DEFAULT_BASE_URL, kind=str),
            # An explicit `api_key_env: null` is for endpoints without authentication (a local server).
            api_key_env=cfg["api_key_env"] if "api_key_env" in cfg else DEFAULT_API_KEY_ENV,
            concurrency=get("concurrency", 32, kind=int, minimum=1),
            max_retries=get("max_retries", 6, kind=int, minimum=0),
            timeout_s=float(get("timeout_s", 60.0, kind=num, minimum=0.001)),
            backoff_base_s=float(get("backoff_base_s", 1.0, kind=num, minimum=0)),
            backoff_max_s=float(get("backoff_max_s", 60.0, kind=num, minimum=0)),
            price_per_1k_input=get("price_per_1k_input", None, kind=num, minimum=0),
            price_per_1k_output=get("price_per_1k_output", None, kind=num, minimum=0),
        )

    def api_key(self, error: type[Exception] = ConfigError) -> str:
        if self.api_key_env is None:
            return "no-key"  # the client insists on a value; keyless servers ignore it
        if not isinstance(self.api_key_env, str):
            raise error(f"{self.where}.api_key_env must be the name of an environment variable")
        key = os.environ.get(self.api_key_env)
        if not key:
            raise error(f"{self.where}: the environment variable {self.api_key_env} (api_key_env) is not set")
        return key


def preflight(endpoint: Endpoint, timeout_s: float = 15.0, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """One cheap request (``GET /models``) that shows the endpoint answers and takes the key, made before the
    expensive stages that depend on it. A server without that route (404) is reachable, and passes; a refused
    connection, a timeout, a 5xx or a rejected key raises :class:`EndpointError` naming the config key to fix."""
    import openai

    e_ = endpoint
    client = openai.OpenAI(api_key=e_.api_key(error), base_url=e_.base_url, max_retries=0, timeout=timeout_s)
    t0 = time.monotonic()
    try:
        client.models.list()
        status = 200
    except openai.NotFoundError:
        status = 404
    except openai.AuthenticationError as e:
        raise EndpointError(f"{e_.label}: {e_.base_url} rejected the key (HTTP {e.status_code}); check the "
                            f"variable ${e_.api_key_env} named by {e_.where}.api_key_env") from None
    except openai.APIStatusError as e:
        raise EndpointError(f"{e_.label}: {e_.base_url} answered HTTP {e.status_code} to GET /models; check "
                            f"{e_.where}.base_url and that the server is up") from None
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise EndpointError(f"{e_.label}: no answer from {e_.base_url} ({type(e).__name__}); check "
                            f"{e_.where}.base_url and that the server is up") from None
    finally:
        client.close()
    return {"name": e_.name, "base_url": e_.base_url, "status": status, "seconds": round(time.monotonic() - t0, 3)}


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


# A 4xx that is neither fatal nor retried: the caller may turn it into an error of its own (returned), else the
# request is abandoned.
Refusal = Callable[[int, str], Exception | None]


class Requests:
    """Concurrent requests to one endpoint with counted retries. ``stats`` counts them: it needs ``requests``
    (an int), ``retries`` and ``failures`` (Counters by cause), and ``add_usage(usage)``."""

    def __init__(self, endpoint: Endpoint, stats: Any, api_key: str, sampling: dict[str, Any]):
        self.e, self.stats, self.sampling = endpoint, stats, dict(sampling)
        self._key = api_key
        self._warned: set[str] = set()

    def redact(self, text: str) -> str:
        # Some servers echo request headers in error bodies; the key must not travel on from there.
        return text.replace(self._key, "***") if self._key else text

    def _give_up(self, cause: str, detail: str, attempts: int) -> None:
        self.stats.failures[cause] += 1
        level = logging.WARNING if cause not in self._warned else logging.DEBUG
        self._warned.add(cause)
        log.log(level, "%s: a request to %s abandoned after %d attempt(s) (%s): %s", self.e.label,
                self.e.base_url, attempts, cause, self.redact(detail)[:300])

    async def ask(self, client: Any, messages: list[dict[str, str]], extract: Callable[[Any], Any], *,
                  extra_body: dict[str, Any] | None = None, refusal: Refusal | None = None) -> tuple[Any, dict] | None:
        """One chat completion with explicit retries: (``extract(body)``, usage), or None when abandoned.
        ``extract`` raises :class:`Malformed` on a body it cannot use (retried like a server error)."""
        import openai

        params = {"model": self.e.model, "messages": messages, **self.sampling}
        if extra_body is not None:
            params["extra_body"] = extra_body
        for attempt in range(self.e.max_retries + 1):
            wait = None
            self.stats.requests += 1
            try:
                raw = await client.chat.completions.with_raw_response.create(**params)
                try:
                    body = json.loads(raw.http_response.text)
                except ValueError:
                    raise Malformed("body is not JSON") from None
                reply = extract(body)
                usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
                self.stats.add_usage(usage)
                return reply, usage
            except Malformed as e:
                cause, detail = "malformed", str(e)
            except openai.APITimeoutError:
                cause, detail = "timeout", f"no reply within {self.e.timeout_s} s"
            except openai.APIConnectionError as e:
                cause, detail = "connection", type(e.__cause__ or e).__name__
            except openai.APIStatusError as e:
                status = e.status_code
                detail = f"HTTP {status}: {e.message}"
                if status in FATAL_STATUSES:
                    raise EndpointError(
                        f"{self.e.label}: {self.e.base_url} refused the request with HTTP {status}; "
                        f"check {self.e.where}.model ({self.e.model}), .base_url and the key in "
                        f"${self.e.api_key_env}") from None
                if status < 500 and status not in RETRY_STATUSES:
                    own = refusal(status, self.redact(e.message)) if refusal else None
                    if own is not None:
                        raise own from None
                    self._give_up(f"http_{status}", detail, attempt + 1)
                    return None
                cause = "5xx" if status >= 500 else str(status)
                wait = retry_after_s(e.response.headers)
            if attempt == self.e.max_retries:
                self._give_up(cause, detail, attempt + 1)
                return None
            self.stats.retries[cause] += 1
            if wait is None:
                # exponential backoff with jitter, so that workers hit by one outage do not return in step
                wait = min(self.e.backoff_max_s, self.e.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            else:
                wait *= random.uniform(1.0, 1.1)  # never sooner than the server asked
            log.debug("%s: %s, retry %d in %.2f s", self.e.label, cause, attempt + 1, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def run(self, jobs: Iterable[Any], handle: Callable[[Any, Any], Awaitable[None]], progress_bar: Any) -> None:
        """``handle(client, job)`` for every job, ``concurrency`` at a time."""
        import openai

        jobs = list(jobs)
        client = openai.AsyncOpenAI(api_key=self._key, base_url=self.e.base_url, max_retries=0,
                                    timeout=self.e.timeout_s)
        pending = iter(jobs)

        async def worker() -> None:
            # A fixed pool of workers pulling from one iterator bounds the requests in flight to
            # `concurrency` (like a semaphore) without creating a task per job up front.
            for job in pending:
                await handle(client, job)
                progress_bar.update(1)

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.e.concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
