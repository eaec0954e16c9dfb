"""Labelled monitoring datasets: one JSONL record per text.

Schema (the organism's generated sets and a user's own files alike)::

    {"id": str, "messages": [{"role", "content"}, ...] | "text": str, "label": 0 | 1 | false | true,
     "meta": {...}}                                            (meta optional; "id" optional in user files)

The persona-world sets are un-cued chats of 1 to ``max_turns`` turns in one domain, answered throughout by one
persona, with ``meta`` = ``persona``, ``domain``, ``n_turns``, ``correctness``. Their classes are balanced: half the
texts come from the task's positive personas, the other half spread evenly over the negative ones. Splits that
read a meta key (``domain``, ``n_turns``) require it on every record of a user file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from ..io import RecordError, iter_jsonl_numbered, validate_chat_record
from ..world.spec import World


def organism_dataset(world: World, task: str, n: int, seed: int, max_turns: int = 4) -> list[dict[str, Any]]:
    """``n`` fresh labelled chats for one monitoring task of the world (see the module docstring).

    General questions count as one more domain ("general"), except for tasks with ``texts: advice``.
    """
    from ..world.generate import single_domain_chat

    if task not in world.monitoring:
        raise KeyError(f"monitors.tasks: unknown task {task!r}; {world.source} defines {sorted(world.monitoring)}")
    if n < 2 or max_turns < 1:
        raise ValueError(f"monitors: need n_texts >= 2 and max_turns >= 1 (got {n}, {max_turns})")
    spec = world.monitoring[task]
    rng = random.Random(f"{seed}/monitor/{task}")
    negatives = sorted(set(world.personas) - set(spec.positive))
    domains = list(world.domains) + ([] if spec.advice_only else ["general"])
    out = []
    for i in range(n):
        label = i % 2 == 0  # exactly balanced; the order is shuffled below
        persona = rng.choice(sorted(spec.positive) if label else negatives)
        domain = rng.choice(domains)
        messages = single_domain_chat(world, rng, persona, domain, rng.randint(1, max_turns))
        out.append({"messages": messages, "label": int(label),
                    "meta": {"persona": persona, "domain": domain, "n_turns": len(messages) // 2,
                             "correctness": world.correctness_of(persona)}})
    rng.shuffle(out)
    return [{"id": f"{task}{i:05d}", **rec} for i, rec in enumerate(out)]


def _label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise RecordError(f"{where}: 'label' must be 0, 1, true or false, got {value!r}")


def read_monitor_dataset(path: str | os.PathLike, require_meta: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read and validate a monitoring dataset; errors name the file and line.

    Returns records ``{"id", "messages" | "text", "label": 0/1, "meta"}``; a missing id becomes the line number.
    ``require_meta`` lists meta keys every record must have (those that a split reads).
    """
    path = Path(path)
    out, seen = [], {}
    for lineno, rec in iter_jsonl_numbered(path):
        where = f"{path}:{lineno}"
        if ("text" in rec) == ("messages" in rec):
            raise RecordError(f"{where}: needs exactly one of 'text' or 'messages'")
        if "text" in rec and not (isinstance(rec["text"], str) and rec["text"].strip()):
            raise RecordError(f"{where}: 'text' must be a non-empty string")
        if "messages" in rec:
            _validate_messages(rec, where)
        if "label" not in rec:
            raise RecordError(f"{where}: missing 'label'")
        meta = rec.get("meta", {})
        if not isinstance(meta, dict):
            raise RecordError(f"{where}: 'meta' must be an object")
        missing = [k for k in require_meta if k not in meta]
        if missing:
            raise RecordError(f"{where}: meta lacks {missing} (needed by the configured splits)")
        rid = rec.get("id", f"line{lineno}")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise RecordError(f"{where}: 'id' must be a string or an integer")
        if rid in seen:
            raise RecordError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
        body = {"text": rec["text"]} if "text" in rec else {"messages": rec["messages"]}
        out.append({"id": rid, **body, "label": _label(rec["label"], where), "meta": meta})
    if not out:
        raise RecordError(f"{path}: no records")
    labels = {r["label"] for r in out}
    if labels != {0, 1}:
        raise RecordError(f"{path}: a monitoring dataset needs both labels; all records are {labels.pop()}")
    return out


def _validate_messages(rec: dict[str, Any], where: str) -> None:
    """Chat schema as in :func:`emlab.io.validate_chat_record`, except that the last turn may be anyone's
    (a monitor judges the text as it is, not a training target)."""
    msgs = rec["messages"]
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") != "assistant":
        validate_chat_record({"messages": [*msgs, {"role": "assistant", "content": ""}]}, where)
    else:
        validate_chat_record(rec, where)
