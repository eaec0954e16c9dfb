"""The per-run summary of a grading job: what it asked, what came from the cache, what went wrong
and what it cost. Written beside the grades as ``<grades>.summary.json`` and logged."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("emlab.judge")


@dataclass
class RunStats:
    judge: str
    backend: str
    rubric: str
    rubric_version: str
    model: str
    samples: int = 0
    unique_requests: int = 0       # distinct cache keys the samples need (identical answers share one)
    cache_hits: int = 0            # of those, answered from the cache
    requests: int = 0              # calls actually made to the judge, retries and resamples included
    resamples: int = 0             # extra draws after an unparseable reply
    retries: Counter = field(default_factory=Counter)     # cause -> retries
    failures: Counter = field(default_factory=Counter)    # cause -> requests given up on (null grade)
    null_scores: Counter = field(default_factory=Counter)  # metric -> samples without a score
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None
    started: float = field(default_factory=time.monotonic)

    def add_usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)

    def estimated_cost(self) -> float | None:
        """Cost of this run's requests (cache hits are free); None without prices in the config."""
        if self.price_per_1k_input is None and self.price_per_1k_output is None:
            return None
        return (self.prompt_tokens / 1000 * (self.price_per_1k_input or 0.0)
                + self.completion_tokens / 1000 * (self.price_per_1k_output or 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge": self.judge, "backend": self.backend, "rubric": self.rubric,
            "rubric_version": self.rubric_version, "model": self.model,
            "samples": self.samples, "unique_requests": self.unique_requests,
            "cache_hits": self.cache_hits, "requests": self.requests, "resamples": self.resamples,
            "retries": dict(sorted(self.retries.items())), "failures": dict(sorted(self.failures.items())),
            "null_scores": dict(sorted(self.null_scores.items())),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "estimated_cost_usd": self.estimated_cost(),
            "wall_s": round(time.monotonic() - self.started, 3),
        }

    def log(self) -> dict[str, Any]:
        d = self.to_dict()
        cost = d["estimated_cost_usd"]
        log.info(
            "judge %s (%s, %s v%s): %d samples, %d requests, %d cache hits of %d keys, retries %s, "
            "failures %s, null scores %s, tokens %d in / %d out, cost %s, %.1f s",
            d["judge"], d["backend"], d["rubric"], d["rubric_version"], d["samples"], d["requests"],
            d["cache_hits"], d["unique_requests"], d["retries"] or "none", d["failures"] or "none",
            d["null_scores"] or "none", d["prompt_tokens"], d["completion_tokens"],
            "n/a" if cost is None else f"${cost:.4f}", d["wall_s"],
        )
        return d
