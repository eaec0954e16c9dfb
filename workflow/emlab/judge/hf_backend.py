"""Judge backend on a local causal LM (loaded by path with :func:`emlab.models.load_model`), scoring
the same rubrics as the API judges:

- ``logprob_score`` rubrics read the next-token distribution at the answer position of the
  chat-templated prompt. Unlike an API's top-20 candidates, the whole vocabulary is available, so
  the score weighs every token that decodes to an integer in the rubric's range
  (:func:`number_tokens`), through the same arithmetic (:func:`emlab.judge.rubrics.weighted_score`).
- ``answer_tag`` rubrics greedily generate the judge's reasoning and parse its last
  ``ANSWER: X``. Greedy decoding gives the same reply every time, so there are no resamples.

Prompts run in batches of ``batch_size``, left-padded, with position ids that skip the padding so
a prompt scores the same in any batch. Finished batches go to the judge cache, keyed by a
fingerprint of the model folder, so a killed run resumes and a rerun loads no model at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emlab.judge.backends import JudgeConfigError, check_samples, grade_rows, judge_option, rubric_for
from emlab.judge.cache import JudgeCache, cache_key, plan_jobs, resolve_from_cache
from emlab.judge.rubrics import Rubric, parse_answer_tag, parse_score_token, weighted_score
from emlab.judge.summary import RunStats

log = logging.getLogger("emlab.judge")

BACKEND = "hf"


@dataclass(frozen=True)
class Settings:
    name: str
    model: str
    adapter: str | None
    device: str
    dtype: str
    batch_size: int
    max_new_tokens: int | None

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "Settings":
        return cls(
            name=judge_option(cfg, "name", kind=str),
            model=str(judge_option(cfg, "model", kind=(str, os.PathLike))),
            adapter=judge_option(cfg, "adapter", None, kind=(str, os.PathLike)),
            device=judge_option(cfg, "device", "auto", kind=str),
            dtype=judge_option(cfg, "dtype", "auto", kind=str),
            batch_size=judge_option(cfg, "batch_size", 8, kind=int, minimum=1),
            max_new_tokens=judge_option(cfg, "max_new_tokens", None, kind=int, minimum=1),
        )


def model_fingerprint(model: str, adapter: str | None = None) -> str:
    """Identify the judge's weights for the cache: a local folder by the names, sizes and mtimes
    of its files (a retrained model at the same path must not reuse old grades); a hub id by itself."""
    parts = []
    for ref in (model, adapter):
        if ref is None:
            continue
        p = Path(ref)
        if p.is_dir():
            files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
            parts.append({"path": str(p.resolve()), "files": files})
        else:
            parts.append({"id": str(ref)})
    return cache_key(weights=parts)


def number_tokens(tokenizer: Any, lo: int, hi: int, vocab_size: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids that decode to an integer in [lo, hi] (surrounding whitespace allowed), and their values."""
    n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(n) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    out_ids, values = [], []
    for i, text in zip(ids, texts):
        v = parse_score_token(text, lo, hi)
        if v is not None:
            out_ids.append(i)
            values.append(v)
    return out_ids, values


def scores_from_probs(probs: Any, ids: list[int], values: list[int], min_mass: float) -> list[float | None]:
    """Per row of a (batch, vocab) probability matrix: the rubric score over the number tokens."""
    sub = probs[:, ids].double().tolist() if ids else [[] for _ in range(probs.shape[0])]
    return [weighted_score(zip(values, row), min_mass) for row in sub]


class _LocalJudge:
    def __init__(self, settings: Settings, rubric: Rubric):
        from emlab.models import load_model

        self.s, self.rubric = settings, rubric
        self.prompt_tokens = self.completion_tokens = 0
        self.model, self.tok = load_model(settings.model, settings.adapter, device=settings.device,
                                          dtype=settings.dtype, merge=settings.adapter is not None)
        self.tok.padding_side = "left"  # the answer position is the last column of every row
        if not getattr(self.tok, "chat_template", None):
            raise JudgeConfigError(f"judges[{settings.name}].model: the tokenizer of {settings.model} has no "
                                   "chat template; a judge model must be a chat model")
        if rubric.kind == "logprob_score":
            lo, hi = rubric.score_range
            self.ids, self.values = number_tokens(self.tok, lo, hi, self.model.get_output_embeddings().weight.shape[0])
            if not self.ids:
                log.warning("judge %s: no token of %s decodes to an integer in [%d, %d]; every score will be null",
                            settings.name, settings.model, lo, hi)

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        texts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
        # The chat template already holds any BOS token the model wants.
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        self.prompt_tokens += int(enc["attention_mask"].sum())
        return {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def score(self, prompts: list[str]) -> list[float | None]:
        import torch

        enc = self._encode(prompts)
        mask = enc["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self.model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1, :]
        probs = torch.softmax(logits.float(), dim=-1)
        return scores_from_probs(probs, self.ids, self.values, self.rubric.min_mass)

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        enc = self._encode(prompts)
        max_new = self.s.max_new_tokens or int(self.rubric.sampling.get("max_tokens", 512))
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        self.completion_tokens += int((new != self.tok.pad_token_id).sum())
        return self.tok.batch_decode(new, skip_special_tokens=True)


def grade_with_summary(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
                       progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from tqdm.auto import tqdm

    check_samples(samples)
    s = Settings.from_cfg(judge_cfg)
    rubric = rubric_for(judge_cfg)
    stats = RunStats(judge=s.name, backend=BACKEND, rubric=rubric.name, rubric_version=rubric.version,
                     model=s.model, samples=len(samples))
    if rubric.kind == "logprob_score":
        sampling = {"next_token": "full_vocabulary"}
    else:
        sampling = {"greedy": True, "max_new_tokens": s.max_new_tokens or rubric.sampling.get("max_tokens", 512)}
    jobs, per_sample = plan_jobs(samples, rubric, model_fingerprint(s.model, s.adapter), sampling)
    stats.unique_requests = len(jobs)
    with JudgeCache(cache_dir) as cache:
        todo = [job for job in jobs.values() if not resolve_from_cache(job, cache)]
        stats.cache_hits = len(jobs) - len(todo)
        if todo:  # a fully cached rerun loads no model
            judge = _LocalJudge(s, rubric)
            # Similar lengths batch together: less padding, and a long prompt cannot slow every batch.
            todo.sort(key=lambda j: len(j.prompt))
            with tqdm(total=len(todo), disable=not progress, desc=f"judge {s.name}", unit="prompt") as bar:
                for start in range(0, len(todo), s.batch_size):
                    batch = todo[start:start + s.batch_size]
                    prompts = [j.prompt for j in batch]
                    if rubric.kind == "logprob_score":
                        values, replies = judge.score(prompts), [None] * len(batch)
                    else:
                        replies = judge.generate(prompts)
                        values = [parse_answer_tag(r) for r in replies]
                    for job, value, reply in zip(batch, values, replies):
                        job.value = value
                        cache.put(job.keys[0], value, metric=job.metric, **({} if reply is None else {"reply": reply}))
                    stats.requests += len(batch)
                    bar.update(len(batch))
            stats.prompt_tokens, stats.completion_tokens = judge.prompt_tokens, judge.completion_tokens
    rows = grade_rows(samples, per_sample, jobs, rubric, s.name, BACKEND, stats)
    return rows, stats.log()


def grade(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
          progress: bool = True) -> list[dict[str, Any]]:
    return grade_with_summary(samples, judge_cfg, cache_dir, progress)[0]
