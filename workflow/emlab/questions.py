"""Evaluation question sets for hub models: YAML files (``resources/questions/``) turned into the
eval JSONL rows that sampling reads (``question_id, eval_set, domain, question``).

A question file::

    name: general
    version: "1"
    questions:
      - id: wish                       # unique within the file; [A-Za-z0-9_.-]
        question: "..."
        domain: health                 # optional; "general" when absent

``question_id`` is ``<domain>/<id>``, as in the organism's eval sets. Which file serves which eval set
is the config's ``eval.questions`` mapping (``sampling.eval_sets`` names the sets that are sampled).
The organism writes its own eval sets from the persona world; these files are for hub models.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .io import read_yaml

GENERAL = "general"
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class QuestionFileError(ValueError):
    """A malformed question file; the message names the file and the question."""


def load_questions(path: str | os.PathLike, eval_set: str) -> list[dict[str, Any]]:
    """The eval rows of one question file, in file order."""
    path = Path(path)
    doc = read_yaml(path, QuestionFileError, "question file not found")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list) or not doc["questions"]:
        raise QuestionFileError(f"{path}: expected a mapping with a non-empty list 'questions'")
    rows, seen = [], set()
    for i, q in enumerate(doc["questions"]):
        where = f"{path}: questions[{i}]"
        if not isinstance(q, dict):
            raise QuestionFileError(f"{where}: expected a mapping with 'id' and 'question'")
        unknown = set(q) - {"id", "question", "domain"}
        if unknown:
            raise QuestionFileError(f"{where}: unknown key(s) {sorted(unknown)} (known: domain, id, question)")
        qid, text, domain = q.get("id"), q.get("question"), q.get("domain", GENERAL)
        if not isinstance(qid, str) or not _ID.match(qid):
            raise QuestionFileError(f"{where}: 'id' must be a string of letters, digits, '_', '.' or '-', got {qid!r}")
        where = f"{path}: questions[{i}] (id {qid!r})"
        if not isinstance(text, str) or not text.strip():
            raise QuestionFileError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(domain, str) or not _ID.match(domain):
            raise QuestionFileError(f"{where}: 'domain' must be a name such as 'health', got {domain!r}")
        question_id = f"{domain}/{qid}"
        if question_id in seen:
            raise QuestionFileError(f"{where}: duplicate question id {question_id!r}")
        seen.add(question_id)
        rows.append({"question_id": question_id, "eval_set": eval_set, "domain": domain, "question": text.strip()})
    return rows


def question_files(cfg: dict[str, Any]) -> dict[str, str]:
    """Eval set -> question file, for every set in ``sampling.eval_sets``."""
    files = cfg["eval"]["questions"]
    missing = [s for s in cfg["sampling"]["eval_sets"] if s not in files]
    if missing:
        raise KeyError(f"eval.questions: no question file for eval set(s) {missing} (listed in sampling.eval_sets)")
    return {s: files[s] for s in cfg["sampling"]["eval_sets"]}


def check_config(cfg: dict[str, Any]) -> None:
    """Hub mode: every sampled eval set has a readable question file (errors name the key or file)."""
    from .schema import ConfigError

    try:
        for eval_set, path in question_files(cfg).items():
            load_questions(path, eval_set)
    except KeyError as e:
        raise ConfigError(f"invalid config:\n  {e.args[0]}") from None
    except QuestionFileError as e:
        raise ConfigError(f"invalid config:\n  eval.questions: {e}") from None
