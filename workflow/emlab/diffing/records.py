"""The texts that activations are cached on, as records for :func:`emlab.activations.cache_activations`.

Record ids tie activations back to their source rows:

- sampled answers: ``"<question_id>#<sample_idx>"`` (the key of a samples/grades row);
- chats (corpus documents, fine-tuning examples): the row's own ``id``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable

from ..io import RecordError, iter_jsonl_numbered


def sample_id(row: dict[str, Any]) -> str:
    return f"{row['question_id']}#{row['sample_idx']}"


def sample_records(path: str | Path, eval_sets: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """A model's sampled answers as single-turn chats (question, answer), optionally limited to some eval sets."""
    keep = set(eval_sets) if eval_sets is not None else None
    out = []
    for i, row in iter_jsonl_numbered(path):
        missing = [k for k in ("question_id", "sample_idx", "question", "answer") if k not in row]
        if missing:
            raise RecordError(f"{path}:{i}: sample row lacks {missing}")
        if keep is not None and row.get("eval_set") not in keep:
            continue
        out.append({"id": sample_id(row), "messages": [{"role": "user", "content": row["question"]},
                                                      {"role": "assistant", "content": row["answer"]}]})
    if not out:
        raise RecordError(f"{path}: no sampled answers" + (f" in eval sets {sorted(keep)}" if keep else ""))
    return out


def text_records(path: str | Path, n: int | None = None, skip: int = 0, seed: int | None = None) -> list[dict[str, Any]]:
    """Chat or text records of a JSONL file (``id`` plus ``messages`` or ``text``; ``meta`` kept).

    Rows ``skip .. skip+n`` of the file, or, with ``seed``, ``n`` rows drawn at random from all rows
    after ``skip`` (a fine-tuning set is ordered by nothing, but a corpus may be)."""
    rows = []
    for record, (i, row) in enumerate(iter_jsonl_numbered(path)):
        if record < skip:  # skip counts records, not lines
            continue
        if "id" not in row or not ("messages" in row or "text" in row):
            raise RecordError(f"{path}:{i}: a record needs 'id' and 'messages' or 'text'")
        rows.append(row)
    if seed is not None and n is not None and n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    elif n is not None:
        rows = rows[:n]
    if not rows:
        raise RecordError(f"{path}: no records after skipping {skip}")
    return [{k: r[k] for k in ("id", "messages", "text", "meta") if k in r} for r in rows]
