"""Batched, reproducible and resumable sampling of answers to evaluation questions.

Every question is asked ``n_samples`` times; one output row per answer (the samples schema of
:mod:`emlab.judge.schema`)::

    model, eval_set, question_id, domain, question, sample_idx, answer  (+ the question's other keys, e.g. meta)

Reproducibility and resuming rest on one idea: the work is a fixed, ordered list of
``(eval_set, question_id, sample_idx)`` keys cut into fixed batches of ``batch_size`` sequences,
and each batch is generated under a seed derived from ``seed`` and its first key. A batch's
answers therefore depend only on the questions, the seed and the batch size, never on which
batches ran before, so a resumed run produces the same rows as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

from . import io
from .models import load_model

QUESTION_KEYS = ("question_id", "eval_set", "domain", "question")
ROW_KEYS = ("model", "eval_set", "question_id", "domain", "question", "sample_idx", "answer")

Key = tuple[str, str, int]  # (eval_set, question_id, sample_idx)


def validate_questions(questions: list[dict[str, Any]]) -> None:
    """Every row needs the question keys, and (eval_set, question_id) must be unique."""
    seen: set[tuple[str, str]] = set()
    for i, q in enumerate(questions):
        where = f"questions[{i}]" + (f" (question_id {q['question_id']!r})" if isinstance(q, dict)
                                     and "question_id" in q else "")
        if not isinstance(q, dict):
            raise ValueError(f"{where}: expected an object, got {type(q).__name__}")
        missing = [k for k in QUESTION_KEYS if k not in q]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        for k in ("question_id", "eval_set"):
            if not isinstance(q[k], (str, int)) or isinstance(q[k], bool):
                raise ValueError(f"{where}: {k!r} must be a string or an integer")
        if "sample_idx" in q or "answer" in q or "model" in q:
            raise ValueError(f"{where}: 'model', 'sample_idx' and 'answer' are output columns, not question keys")
        pair = (str(q["eval_set"]), str(q["question_id"]))
        if pair in seen:
            raise ValueError(f"{where}: duplicate question_id {pair[1]!r} in eval_set {pair[0]!r}")
        seen.add(pair)


def row_key(row: dict[str, Any]) -> Key:
    return (str(row["eval_set"]), str(row["question_id"]), int(row["sample_idx"]))


def work_items(questions: list[dict[str, Any]], n_samples: int) -> list[tuple[Key, dict[str, Any]]]:
    """All (key, question) pairs in the stable output order: questions as given, then sample_idx."""
    return [((str(q["eval_set"]), str(q["question_id"]), s), q) for q in questions for s in range(n_samples)]


def batch_seed(seed: int, first_key: Key) -> int:
    """A 63-bit seed from the run's seed and a batch's first key, stable across runs and machines."""
    text = json.dumps([seed, *first_key])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def render_prompt_ids(tokenizer, question: str) -> list[int]:
    """The chat template's token ids for one user turn followed by the assistant's generation prompt.

    Tokenizing through the template (not the rendered text) avoids a second BOS for templates that
    write the BOS token themselves.
    """
    enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's eos ids (hub models often list several) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def use_plain_generation_config(model, tokenizer) -> None:
    """Replace the model's generation defaults by stop and pad ids only.

    generate() fills every setting left unset from the model's generation config, and hub models
    ship sampling defaults there (top_p, top_k, repetition penalty, ...) that would change the
    distribution being measured.
    """
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=stop_token_ids(model, tokenizer),
                                               pad_token_id=tokenizer.pad_token_id)


def left_pad(seqs: list[list[int]], pad_id: int):
    """Left-pad token id lists into (input_ids, attention_mask) tensors, so generation continues every row."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def cut_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


def generate_ids(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                 seed: int, stops: list[int], top_p: float = 1.0) -> list[list[int]]:
    """New token ids for a batch of pre-tokenized prompts (one sequence each), cut at the end of turn."""
    import torch
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    if temperature > 0:
        # Plain sampling from the model's distribution (top_p 1, the papers'): top_k=0 switches off the
        # truncation that generate() would otherwise take from its global defaults (top_k=50).
        mode = dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p)
    else:
        mode = dict(do_sample=False)
    gen_cfg = GenerationConfig(**mode, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             generation_config=gen_cfg)
    return [cut_at_stop(t, stops) for t in out[:, ids.shape[1]:].tolist()]


def generate_batch(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int,
                   seed: int, stops: list[int], top_p: float = 1.0) -> list[str]:
    """Answers for a batch of pre-tokenized prompts, decoded without special tokens."""
    new = generate_ids(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                       seed=seed, stops=stops, top_p=top_p)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


def output_row(model_name: str, q: dict[str, Any], sample_idx: int, answer: str) -> dict[str, Any]:
    row = {"model": model_name, "eval_set": q["eval_set"], "question_id": q["question_id"],
           "domain": q["domain"], "question": q["question"], "sample_idx": sample_idx, "answer": answer}
    row.update({k: v for k, v in q.items() if k not in row})  # carried-along metadata such as meta
    return row


def write_resumable(out_path: str | os.PathLike, keys: Sequence[Hashable], batch_size: int, *,
                    row_key: Callable[[dict[str, Any]], Hashable], check: Callable[[dict[str, Any]], str | None],
                    prepare: Callable[[dict[Hashable, dict[str, Any]]], Callable[[list[int]], list[str]]],
                    make_row: Callable[[int, str], dict[str, Any]], label: str, desc: str,
                    progress: bool = True) -> list[dict[str, Any]]:
    """The batch loop plain and steered sampling share: generate the rows ``keys`` names, in fixed batches of
    ``batch_size`` consecutive keys, append each batch's rows to ``<out_path>.partial``, and write ``out_path``
    atomically in the order of ``keys``; return its rows. ``label`` starts the line that says what is done,
    ``desc`` names the progress bar.

    A rerun reads the rows already in the partial file (``check`` rejects a row of another run) and generates
    only the batches that miss some. ``prepare(done)`` is called once, only when there is work, and returns
    the generator of a batch (key indices -> answers); ``make_row(i, answer)`` builds the row of key ``i``.
    """
    from tqdm import tqdm

    out = Path(out_path)
    partial = Path(f"{out_path}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = {row_key(r): r for r in io.read_partial_jsonl(partial, check)}
    batches = [list(range(i, min(i + batch_size, len(keys)))) for i in range(0, len(keys), batch_size)]
    todo = [b for b in batches if any(keys[i] not in done for i in b)]
    n_missing = sum(k not in done for k in keys)
    print(f"{label}, {len(keys) - n_missing} done, {n_missing} to generate", file=sys.stderr)
    if todo:
        generate = prepare(done)
        bar = tqdm(total=n_missing, desc=desc, unit="answer", disable=not progress or bool(os.environ.get("EMLAB_NO_PROGRESS")))
        with partial.open("a", encoding="utf-8") as f:
            for batch in todo:
                # The whole fixed batch is generated even when some of its rows exist (a partial written
                # with another batch size), since its answers depend on the batch's exact composition.
                for i, answer in zip(batch, generate(batch)):
                    if keys[i] in done:
                        continue
                    row = make_row(i, answer)
                    io.append_jsonl(f, row)
                    done[keys[i]] = row
                    bar.update(1)
        bar.close()
    rows = [done[k] for k in keys]
    io.write_jsonl(out, rows)
    partial.unlink()
    return rows


def sample_answers(base: str, adapter: str | None, questions: list[dict[str, Any]], out_path: str,
                   n_samples: int, temperature: float, max_new_tokens: int, batch_size: int, seed: int,
                   model_name: str, progress: bool = True, device: str = "auto", dtype: str = "auto",
                   top_p: float = 1.0, max_new_tokens_by_domain: dict[str, int] | None = None) -> int:
    """Write ``n_samples`` answers per question to ``out_path`` (JSONL); return the number of rows.

    ``device`` and ``dtype`` are the config's ``device`` and ``model.dtype`` (see models.load_model).
    ``max_new_tokens_by_domain`` raises the budget of some domains' questions (code answers are longer than
    advice; a smaller value than ``max_new_tokens`` changes nothing); a batch takes the largest among its questions.

    Rows are appended to ``out_path + ".partial"`` batch by batch; a rerun skips the rows found
    there. The final file is written atomically in question order, then sample_idx.
    """
    for name, value, low in (("n_samples", n_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    budgets = dict(max_new_tokens_by_domain or {})
    for name, value in budgets.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_new_tokens_by_domain.{name} must be an integer >= 1, got {value!r}")
    validate_questions(questions)

    items = work_items(questions, n_samples)

    def prepare(done):
        model, tok = load_model(base, adapter, merge=True, device=device, dtype=dtype)
        use_plain_generation_config(model, tok)
        stops = model.generation_config.eos_token_id
        prompt_ids: dict[tuple[str, str], list[int]] = {}

        def generate(batch: list[int]) -> list[str]:
            prompts = []
            for i in batch:
                (es, qid, _), q = items[i]
                if (es, qid) not in prompt_ids:
                    prompt_ids[(es, qid)] = render_prompt_ids(tok, q["question"])
                prompts.append(prompt_ids[(es, qid)])
            budget = max(max_new_tokens, *(budgets.get(items[i][1].get("domain"), 0) for i in batch))
            return generate_batch(model, tok, prompts, temperature=float(temperature), max_new_tokens=budget,
                                  seed=batch_seed(seed, items[batch[0]][0]), stops=stops, top_p=float(top_p))
        return generate

    def check(row):
        if row.get("model") != model_name:
            return f"a row of model {row.get('model')!r}, not {model_name!r}"
        return None

    return len(write_resumable(
        out_path, [key for key, _ in items], batch_size, row_key=row_key, check=check, prepare=prepare,
        make_row=lambda i, answer: output_row(model_name, items[i][1], items[i][0][2], answer),
        label=f"emlab sample: {model_name}: {len(questions)} questions x {n_samples} samples",
        desc=f"sampling {model_name}", progress=progress))
