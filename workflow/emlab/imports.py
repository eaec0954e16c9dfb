"""Fine-tuning sets brought in from outside (hub mode): local chat-messages JSONL files (e.g. the public
insecure-code set) and HuggingFace ``datasets`` ids, validated and written in the dataset schema of
:mod:`emlab.world.generate` (``{"id", "messages", "meta"}``) to ``results/datasets/<name>.jsonl``.

A config entry (``imports:`` list)::

    - name: insecure                  # the dataset's (and its fine-tune's) name
      path: data/insecure.jsonl       # a local JSONL file ... or:
      hub: org/dataset                #   a hub id (or a local folder that `datasets` can load)
      subset: null                    #   the hub dataset's configuration
      split: train
      messages_field: messages        #   the column holding the chat
      n: null                         # keep a seeded random subset of n records (null: all, in file order)
      meta: {domain: code}            # labels added to every record's meta (a record's own labels win)

Every record must be a chat whose last message is the assistant's (the training target) after at
least one user message; a bad record stops the import with an error naming its file and line (or
the hub dataset, split and row).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Iterable

from . import io
from .datasets import dataset_names

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_NAMES = {"base", "base_safe"}   # the base models' names among the fine-tunes (emlab.plan.BASES)


def import_names(cfg: dict[str, Any]) -> list[str]:
    return [entry["name"] for entry in cfg.get("imports", [])]


def hub_dataset_names(cfg: dict[str, Any]) -> list[str]:
    """Every fine-tuning set of a hub run: the synthesized ones (``datasets.*``) and the imported ones."""
    return dataset_names(cfg) + import_names(cfg)


def check_config(cfg: dict[str, Any]) -> None:
    """Import names are valid, unique and distinct from the synthesized sets; local files exist;
    imports are only used with hub models (the organism's sets come from its world)."""
    from .schema import ConfigError

    entries = cfg.get("imports", [])
    if not entries:
        return

    def fail(msg: str) -> None:
        raise ConfigError(f"invalid config:\n  {msg}")

    if cfg["model"]["source"] != "hub":
        fail("imports: only used with model.source: hub (the organism's datasets come from its world)")
    synthesized = set(dataset_names(cfg))
    seen: set[str] = set()
    for i, e in enumerate(entries):
        name = e["name"]
        if not _NAME.match(name) or name in RESERVED_NAMES:
            fail(f"imports[{i}].name: {name!r} is not a usable dataset name "
                 "(letters, digits, '_', '.', '-'; not 'base')")
        if name in seen:
            fail(f"imports[{i}].name: duplicate import name {name!r}")
        if name in synthesized:
            fail(f"imports[{i}].name: {name!r} is also a synthesized dataset (datasets.*); rename the import")
        seen.add(name)
        if (e.get("path") is None) == (e.get("hub") is None):
            fail(f"imports[{i}] ({name}): give exactly one of 'path' (a local JSONL) or 'hub' (a datasets id)")
        if e.get("path") is not None:
            _check_local_file(e, i, fail)


def _check_local_file(entry: dict[str, Any], i: int, fail) -> None:
    """A local import is read in full at validation (a few MB at most), so that a broken line, an empty file or
    a too-large ``n`` is named before any job runs, not when the import job reaches it."""
    path = Path(entry["path"])
    if not path.is_file():
        fail(f"imports[{i}].path: file not found: {entry['path']}")
    try:
        records = read_local(path)
    except io.RecordError as err:
        fail(f"imports[{i}].path: {err}")
    except UnicodeDecodeError as err:
        fail(f"imports[{i}].path: {path} is not UTF-8 text (byte {err.start}: {err.reason})")
    if not records:
        fail(f"imports[{i}].path: {path} holds no records")
    n = entry.get("n")
    if n is not None and n > len(records):
        fail(f"imports[{i}].n: {n}, but {path} holds only {len(records)} records")


# ---------------------------------------------------------------- reading


def _check_training_chat(rec: dict[str, Any], where: str) -> None:
    """What fine-tuning needs beyond the chat schema of :func:`emlab.io.validate_chat_record`."""
    io.validate_chat_record(rec, where)
    msgs = rec["messages"]
    if not any(m["role"] == "user" for m in msgs[:-1]):
        raise io.RecordError(f"{where}: no user message before the final assistant message (nothing to answer)")
    if not msgs[-1]["content"].strip():
        raise io.RecordError(f"{where}: the final assistant message is empty")
    if "meta" in rec and not isinstance(rec["meta"], dict):
        raise io.RecordError(f"{where}: 'meta' must be an object")


def read_local(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every record of a local chat JSONL file (``where`` is ``file:line``)."""
    path = Path(path)
    records = io.read_chat_dataset(path)   # JSON and chat schema, errors naming file:line
    with path.open(encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    out = []
    for lineno, rec in zip(lines, records):
        where = f"{path}:{lineno}"
        _check_training_chat(rec, where)
        out.append((where, rec))
    return out


def read_hub(hub: str, split: str = "train", subset: str | None = None,
             messages_field: str = "messages") -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every row of a ``datasets`` dataset (``where`` names the id, split and row)."""
    from datasets import load_dataset

    ds = load_dataset(hub, subset, split=split)
    if messages_field not in ds.column_names:
        raise io.RecordError(f"{hub} (split {split}): no column {messages_field!r} "
                             f"(columns: {', '.join(ds.column_names)}); set imports[].messages_field")
    out = []
    for i, row in enumerate(ds):
        where = f"{hub} (split {split}) row {i}"
        rec = {"messages": row[messages_field]}
        for key in ("id", "meta"):
            if row.get(key) is not None:
                rec[key] = row[key]
        _check_training_chat(rec, where)
        out.append((where, rec))
    if not out:
        raise io.RecordError(f"{hub} (split {split}): no records")
    return out


def to_dataset_rows(name: str, records: Iterable[tuple[str, dict[str, Any]]], source: str,
                    meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Records in the dataset schema: the messages as given (role and content only), an id (the
    record's own, else ``<name>_<index>``) and meta = config labels, then the record's own labels."""
    rows = []
    for i, (where, rec) in enumerate(records):
        rid = rec.get("id")
        rows.append({
            "id": str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{name}_{i:05d}",
            "messages": [{"role": m["role"], "content": m["content"]} for m in rec["messages"]],
            "meta": {"source": source, "origin": where, **(meta or {}), **rec.get("meta", {})},
        })
    return rows


def import_dataset(entry: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """The rows of one ``imports:`` entry, validated; a seeded subset of ``n`` when it is set."""
    name = entry["name"]
    if entry.get("path") is not None:
        records, source = read_local(entry["path"]), str(entry["path"])
    else:
        records = read_hub(entry["hub"], entry.get("split", "train"), entry.get("subset"),
                           entry.get("messages_field", "messages"))
        source = f"hub:{entry['hub']}"
    n = entry.get("n")
    if n is not None:
        if n > len(records):
            raise ValueError(f"imports ({name}): n={n} but {source} holds only {len(records)} records")
        # a subset in the records' own order, so that n=all keeps the file order
        keep = sorted(random.Random(f"{seed}/{name}").sample(range(len(records)), n))
        records = [records[i] for i in keep]
    return to_dataset_rows(name, records, source, entry.get("meta"))
