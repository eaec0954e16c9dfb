"""Reading and writing the workflow's record files (JSONL), with errors that name file and line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


class RecordError(ValueError):
    """A malformed record in an input file; the message names the file and line."""


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    for _, rec in iter_jsonl_numbered(path):
        yield rec


def iter_jsonl_numbered(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line: callers validating records name the line in errors."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` through libyaml's C parser where PyYAML was built with it (the same documents, about
    ten times faster): the world spec and the config schema are read each time Snakemake parses the Snakefile,
    and the pure-Python parser made that about three seconds of every `snakemake` call."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_yaml(path: str | os.PathLike, error: type[Exception] = ValueError, missing: str = "file not found") -> Any:
    """Parse a YAML input file; a missing or malformed file raises ``error`` naming the file (and line)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {missing}")
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise error(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def read_partial_jsonl(path: str | os.PathLike, check: Callable[[dict[str, Any]], str | None]) -> list[dict[str, Any]]:
    """Rows finished by an earlier, interrupted run of a job that appends rows to ``path``.

    A job killed while writing leaves at most a cut-off last line, which is dropped (its row is made
    again); the file is then rewritten without it, so that new rows start on a fresh line. ``check``
    returns why a row does not belong to this run (or None), which is raised naming file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        problem = check(rows[-1])
        if problem:
            raise RecordError(f"{path}:{lineno}: {problem}; delete this partial file to start afresh")
    write_jsonl(path, rows)
    return rows


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions the user's umask gives any new file."""
    return 0o666 & ~_umask()


def replace_as_new_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temp file into place with the permissions of a new file (safetensors writes its
    files 0600 whatever the umask)."""
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)


def give_new_file_modes(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` (a model saved by transformers or peft) the permissions of a new file:
    their safetensors weights are written 0600 whatever the umask."""
    mode = new_file_mode()
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temp file in ``path``'s folder (for an atomic write-then-rename), with the permissions the user's
    umask gives any new file: mkstemp's own 0600 would make results unreadable to collaborators on a shared
    cluster once the temp file is renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, new_file_mode())
    return fd, tmp


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (temp file + rename): a killed job never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def append_jsonl(f, rec: dict[str, Any]) -> None:
    """Append one record to an open file and flush it, so that a resumed job finds every finished row."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()


def _write_text_atomically(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it into place; on any failure (a full disk,
    a kill) the temp file is removed and ``path`` keeps what it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _write_text_atomically(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as CSV with exactly ``columns`` (in that order), written atomically."""
    import csv

    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    _write_text_atomically(path, write)


CHAT_ROLES = {"system", "user", "assistant"}


def validate_chat_record(rec: dict[str, Any], where: str) -> None:
    """Check one record of the chat "messages" schema; ``where`` is "file:line" for the error."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"{where}: messages[{i}] must be an object")
        if m.get("role") not in CHAT_ROLES:
            raise RecordError(f"{where}: messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"{where}: messages[{i}].content must be a string")
    if msgs[-1]["role"] != "assistant":
        raise RecordError(f"{where}: the last message must be the assistant's (the training target)")


def read_chat_dataset(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a chat-messages JSONL dataset, validating every record (errors name file and line)."""
    out = []
    for lineno, rec in iter_jsonl_numbered(path):
        validate_chat_record(rec, f"{path}:{lineno}")
        out.append(rec)
    if not out:
        raise RecordError(f"{path}: no records")
    return out
