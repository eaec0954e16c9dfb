"""Judge backend on a local causal LM (loaded by path with :func:`emlab.models.load_model`), scoring
the same rubrics as the API judges:

- ``logprob_score`` rubrics read the distribution of the number the judge would answer, from the
  chat-templated prompt: the probability of every integer in the rubric's range, written as the
  judge's tokenizer writes it (:func:`number_distribution`). Tokenizers that split numbers into
  single digits (Llama 2, Qwen2, Gemma, SmolLM2) need the digits after the first: "85" is "8", then
  "5", then the end of the answer, and reading the first token alone would cap every score at 9.
  The distribution is expanded digit by digit over the whole vocabulary, pruning continuations
  below ``PRUNE`` probability, and weighed through the same arithmetic as the API judges
  (:func:`emlab.judge.rubrics.weighted_score`).
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

from emlab.judge.backends import JudgeConfigError, grade_through_cache, judge_option, start_run
from emlab.judge.cache import cache_key
from emlab.judge.rubrics import Rubric, parse_answer_tag, parse_score_token, weighted_score

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


def _special(tokenizer):
    from ..activations import special_token_ids

    return special_token_ids(tokenizer)


def number_tokens(tokenizer: Any, lo: int, hi: int, vocab_size: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids that decode to an integer in [lo, hi] (surrounding whitespace allowed), and their values."""
    n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    special = _special(tokenizer)
    ids = [i for i in range(n) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    out_ids, values = [], []
    for i, text in zip(ids, texts):
        v = parse_score_token(text, lo, hi)
        if v is not None:
            out_ids.append(i)
            values.append(v)
    return out_ids, values


def digit_tokens(tokenizer: Any, vocab_size: int | None = None) -> tuple[dict[int, str], dict[int, str]]:
    """({id: digits} of tokens that can open a number (digits after optional whitespace), {id: digits} of tokens
    that can continue one (digits only))."""
    n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    special = _special(tokenizer)
    ids = [i for i in range(n) if i not in special]
    first, more = {}, {}
    for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])):
        digits = text.lstrip()
        if digits and digits.isascii() and digits.isdigit():
            first[i] = digits
            if digits == text:
                more[i] = digits
    return first, more


PRUNE = 1e-4       # continuations less likely than this are not expanded (their mass counts as no number)
NODE_BATCH = 32    # prefixes expanded per forward


def _valid_prefix(digits: str, hi: int) -> bool:
    """Digits that start (or are) an integer in [0, hi] written canonically (no leading zero)."""
    return (digits == "0" or not digits.startswith("0")) and int(digits) <= hi


def number_distribution(model: Any, first_probs: Any, cache: Any, prompt_mask: Any, first: dict[int, str],
                        more: dict[int, str], lo: int, hi: int) -> list[dict[int, float]]:
    """Per prompt row: ``{value: probability}`` that the judge answers the integer ``value`` in [lo, hi] and ends
    its answer there, given the next-token probabilities ``first_probs [B, V]`` at the answer position and the
    prompts' key-value ``cache``. A number is followed token by token: P("85") = P("8") P("5" | "8")
    P(no further digit | "85"). Where a tokenizer has multi-digit tokens, "85" is one token and the tree is
    one level deep."""
    import copy

    import torch

    first_ids = torch.tensor(sorted(first))
    more_ids = torch.tensor(sorted(more))
    n_real = prompt_mask.sum(-1)
    out: list[dict[int, float]] = [{} for _ in range(first_probs.shape[0])]
    # a node: (row, token path, digits so far, probability of the path)
    nodes = []
    p0 = first_probs[:, first_ids]
    for row, col in (p0 >= PRUNE).nonzero().tolist():
        tid = int(first_ids[col])
        if _valid_prefix(first[tid], hi):
            nodes.append((row, [tid], first[tid], float(p0[row, col])))
    while nodes:
        children = []
        for start in range(0, len(nodes), NODE_BATCH):
            chunk = nodes[start:start + NODE_BATCH]
            rows = torch.tensor([n[0] for n in chunk])
            depth = len(chunk[0][1])
            step = copy.copy(cache)  # this chunk's rows of the prompts' cache, the prompts' own left untouched
            step.layers = [copy.copy(layer) for layer in cache.layers]
            step.reorder_cache(rows)
            ids = torch.tensor([n[1] for n in chunk], device=first_probs.device)
            mask = torch.cat([prompt_mask[rows], torch.ones(len(chunk), depth, dtype=prompt_mask.dtype)], dim=1)
            pos = n_real[rows, None] + torch.arange(depth)[None, :]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask.to(ids.device), position_ids=pos.to(ids.device),
                               past_key_values=step, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1).cpu()
            cont = probs[:, more_ids]
            for k, (row, path, digits, p) in enumerate(chunk):
                if lo <= int(digits) <= hi:
                    out[row][int(digits)] = out[row].get(int(digits), 0.0) + p * max(0.0, 1.0 - float(cont[k].sum()))
                for col in (cont[k] * p >= PRUNE).nonzero().flatten().tolist():
                    tid = int(more_ids[col])
                    if _valid_prefix(digits + more[tid], hi):
                        children.append((row, path + [tid], digits + more[tid], p * float(cont[k, col])))
        nodes = children
    return out


def scores_from_distributions(dists: list[dict[int, float]], min_mass: float) -> list[float | None]:
    """The rubric score of each row's number distribution (None below ``min_mass``)."""
    return [weighted_score(d.items(), min_mass) for d in dists]


def scores_from_probs(probs: Any, ids: list[int], values: list[int], min_mass: float) -> list[float | None]:
    """Per row of a (batch, vocab) probability matrix: the rubric score over single number tokens."""
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
            self.first, self.more = digit_tokens(self.tok, self.model.get_output_embeddings().weight.shape[0])
            if not self.first:
                raise JudgeConfigError(f"judges[{settings.name}].model: no token of {settings.model} writes a "
                                       "digit, so the judge cannot answer with a score")

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
            out = self.model(**enc, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
        lo, hi = self.rubric.score_range
        dists = number_distribution(self.model, probs, out.past_key_values, mask.cpu(), self.first, self.more, lo, hi)
        return scores_from_distributions(dists, self.rubric.min_mass)

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

    s, rubric, stats = start_run(samples, judge_cfg, Settings, BACKEND)
    if rubric.kind == "logprob_score":
        sampling = {"next_token": "full_vocabulary"}
    else:
        sampling = {"greedy": True, "max_new_tokens": s.max_new_tokens or rubric.sampling.get("max_tokens", 512)}
    def ask_missing(todo, cache):
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

    return grade_through_cache(samples, rubric, model_fingerprint(s.model, s.adapter), sampling, cache_dir, s.name,
                               BACKEND, stats, ask_missing)


def grade(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], cache_dir: Path,
          progress: bool = True) -> list[dict[str, Any]]:
    return grade_with_summary(samples, judge_cfg, cache_dir, progress)[0]
