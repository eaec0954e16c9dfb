"""Steered sampling of answers for many steering conditions of one target model.

Strength. ``alpha`` is in units of the target model's mean residual-stream norm at the steering
layer: :func:`emlab.steer.intervene.residual_norm` over the chats of the evaluation prompts (the user
turn plus the generation prompt), computed once per target model. The vector added at every
steered position is::

    alpha * norm * unit(direction)

so alpha = 1 adds a vector as long as a typical residual, whatever the model's scale, and every
direction (SAE latent, mean difference, random control) is added with the same norm at the same
alpha. The norm is recorded in every row.

Work layout. Every (condition, question, sample) is one batch row, so one ``generate`` call
serves many directions and strengths. The work is the fixed list conditions x questions x
samples (in that order) cut into fixed batches of ``batch_size`` rows; each batch is sampled
under the seed :func:`emlab.sampling.batch_seed` derives from ``seed`` and its first row's
question key (eval_set, question_id, sample_idx), as ``emlab sample`` does. Hence:

- a resumed run (rows are appended to ``<out>.partial`` batch by batch) produces the rows an
  uninterrupted one would;
- an alpha-0 condition run alone reproduces ``emlab sample`` of the target with the same seed and
  batch size row for row (adding a zero vector leaves every activation bit-identical);
- batches of different conditions that start at the same question key share their random
  numbers (common random numbers): no condition's rates are biased by it, and differences
  between conditions come out less noisy.

Positions (:data:`emlab.steer.intervene.POSITIONS`): ``all`` adds the vector at every prompt and
generated position; ``prompt`` only while the prompt is read (the answer then follows from the
steered prompt through the key-value cache); ``response`` at the positions that predict answer
tokens; ``last`` (the default) at the last prompt position only, the one that predicts the first
answer token. A chat model settles there who is answering: on the persona-world organism, whose
corpus also shows persona texts inside user messages (the monitoring documents, answered by a
neutral assistant), a persona direction added to every prompt position reads as a quoted text and
barely moves the answer, while at the last position it flips the persona of the whole answer.

Output rows follow the samples schema (:mod:`emlab.judge.schema`) with ``model`` set to the
condition id (:mod:`emlab.steer.conditions`), so ``emlab judge`` grades them unchanged, plus::

    target, direction, alpha, norm
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from .. import io
from ..sampling import batch_seed, output_row, validate_questions, write_resumable
from .conditions import Condition, ConditionError, check_unique
from .directions import Direction, DirectionError

EXTRA_KEYS = ("target", "direction", "alpha", "norm")

RowKey = tuple[str, str, str, int]  # (condition id, eval_set, question_id, sample_idx)


def steering_vector(direction: Direction, alpha: float, norm: float):
    """The vector added to the residual stream: ``alpha * norm * unit(direction)``."""
    return (float(alpha) * float(norm)) * direction.vector


def prompt_chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _row_key(row: dict[str, Any]) -> RowKey:
    return (str(row["model"]), str(row["eval_set"]), str(row["question_id"]), int(row["sample_idx"]))


def _check_inputs(target: str, conditions: Sequence[Condition], directions: Mapping[str, Direction]) -> None:
    if not conditions:
        raise ConditionError("no steering conditions given")
    check_unique(conditions)
    for c in conditions:
        if c.target != target:
            raise ConditionError(f"condition {c.id!r} steers {c.target!r}, but this run loads {target!r} "
                                 "(one call serves one target model)")
        if c.direction is not None and c.direction not in directions:
            raise DirectionError(f"condition {c.id!r}: no direction {c.direction!r} among {sorted(directions)}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def steer_samples(base: str | os.PathLike, adapter: str | os.PathLike | None, target: str,
                  conditions: Sequence[Condition], directions: Mapping[str, Direction],
                  questions: list[dict[str, Any]], out_path: str | os.PathLike, *, layer: int, n_samples: int,
                  temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0,
                  positions: str = "all", device: str = "auto", dtype: str = "auto",
                  exclude: Sequence[str] = ("first", "special"), progress: bool = True) -> dict[str, Any]:
    """Write ``n_samples`` answers per question and condition to ``out_path`` (JSONL) and return
    ``{"rows": n, "norm": norm}``. Every condition must steer ``target``, the model loaded from
    ``base`` (+ ``adapter``, merged) once for the whole call."""
    from ..arch import hidden_size
    from ..models import load_model
    from .intervene import POSITIONS, residual_norm, steered_generate

    _check_inputs(target, conditions, directions)
    for name, value in (("n_samples", n_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        _positive_int(name, value)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    validate_questions(questions)

    items = [(c, (str(q["eval_set"]), str(q["question_id"]), s), q)
             for c in conditions for q in questions for s in range(n_samples)]
    keys: list[RowKey] = [(c.id, *k) for c, k, _ in items]
    ids = {c.id for c in conditions}
    norm: float | None = None  # the strengths' unit: from the rows of an interrupted run, else measured

    def prepare(done):
        nonlocal norm
        import torch

        norms = {r["norm"] for r in done.values()}
        if len(norms) > 1:
            raise io.RecordError(f"{out_path}.partial: rows with different residual norms {sorted(norms)}; "
                                 "delete it to start afresh")
        model, tok = load_model(base, adapter, device=device, dtype=dtype, merge=True)
        d = hidden_size(model)
        for name in {c.direction for c in conditions if c.direction is not None}:
            if directions[name].d_model != d:
                raise DirectionError(f"direction {name!r} has {directions[name].d_model} dimensions, the model "
                                     f"{target!r} has d_model={d}")
        # The residual norm the strengths are measured in: the evaluation prompts, each once.
        norm = norms.pop() if norms else residual_norm(model, tok, [prompt_chat(q["question"]) for q in questions],
                                                       layer, exclude=exclude)

        def generate(batch: list[int]) -> list[str]:
            vectors = torch.stack([
                steering_vector(directions[items[i][0].direction], items[i][0].alpha, norm)
                if items[i][0].direction is not None else torch.zeros(d) for i in batch])
            return steered_generate(model, tok, [prompt_chat(items[i][2]["question"]) for i in batch], vectors,
                                    layer, positions=positions, max_new_tokens=max_new_tokens,
                                    temperature=float(temperature), do_sample=temperature > 0,
                                    seed=batch_seed(seed, items[batch[0]][1]))
        return generate

    def check(row):
        if row.get("model") not in ids:
            return f"a row of condition {row.get('model')!r}, which this run does not have"
        return None

    def make_row(i: int, answer: str) -> dict[str, Any]:
        c, (_, _, s), q = items[i]
        row = output_row(c.id, q, s, answer)
        row.update(target=c.target, direction=c.direction, alpha=c.alpha, norm=norm)
        return row

    rows = write_resumable(
        out_path, keys, batch_size, row_key=_row_key, check=check, prepare=prepare, make_row=make_row,
        label=f"emlab steer: {target}: {len(conditions)} conditions x {len(questions)} questions x {n_samples} "
              "samples", desc=f"steering {target}", progress=progress)
    return {"rows": len(rows), "norm": rows[0]["norm"] if rows else None}
