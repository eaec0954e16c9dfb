"""A persistent cache of judge replies, so that a killed grading stage resumes where it stopped and
a rerun asks the judge nothing; and the planning of which judge questions a run needs.

The cache is an append-only JSONL file (``<cache_dir>/judge_cache.jsonl``): one line per finished
request, ``{"key": ..., "value": ..., ...}``, written with a single ``write`` on an ``O_APPEND``
descriptor under an exclusive ``flock``, so that lines from grading jobs sharing the directory never
interleave and each line reaches the kernel before the next request is counted as done. Keys are
sha256 digests of a canonical JSON of everything that determines the reply (:func:`cache_key`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emlab.io import RecordError

if TYPE_CHECKING:
    from emlab.judge.rubrics import Rubric

CACHE_FILE = "judge_cache.jsonl"


def cache_key(**parts: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Read the whole cache on opening; :meth:`put` appends one record and keeps it in memory."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.path = Path(cache_dir) / CACHE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A writer killed mid-line leaves an incomplete last record: drop it (its request
                # is simply made again) so that the next append starts on a fresh line.
                data = data[: data.rfind(b"\n") + 1]
                os.truncate(self.path, len(data))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{self.path}:{lineno}: not valid JSON ({e.msg}); "
                                  "delete the line (or the file) to redo that request") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or "value" not in rec:
                raise RecordError(f"{self.path}:{lineno}: expected an object with 'key' and 'value'")
            # Two jobs sharing the directory may both have answered a key; the first answer wins.
            self._records.setdefault(rec["key"], rec)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        """The whole cached record (``value`` plus whatever the backend stored beside it), or None."""
        return self._records.get(key)

    def put(self, key: str, value: Any, **extra: Any) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: cache is closed")
        rec = {"key": key, "value": value, **extra}
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:  # a regular-file write is whole in practice; loop in case it is not
                n = os.write(self._fd, view)
                view = view[n:]
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._records.setdefault(key, rec)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)  # durable across a machine crash, not only a killed process
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Job:
    """One judge question (a metric of an answer); identical question/answer pairs share one job."""
    metric: str
    prompt: str
    keys: list[str]          # cache key per draw: one, or 1 + resamples when unparseable replies are redrawn
    next_attempt: int = 0    # first draw not yet in the cache
    value: Any = None        # the grade: a score, a parsed answer tag, or None


def plan_jobs(samples: list[dict[str, Any]], rubric: "Rubric", judge_model: str, sampling: dict[str, Any],
              attempts: int = 1) -> tuple[dict[str, Job], list[list[str]]]:
    """The distinct judge questions the samples need (by id), and per sample the job id of each
    rubric metric. A key covers everything that determines the reply: the judge model, the rubric
    name and version, the metric, the question and answer, the sampling parameters and the draw."""
    jobs: dict[str, Job] = {}
    per_sample: list[list[str]] = []
    for s in samples:
        ids = []
        for metric in rubric.metrics:
            keys = [cache_key(model=judge_model, rubric=rubric.name, version=rubric.version, metric=metric,
                              question=s["question"], answer=s["answer"], sampling=sampling, attempt=i)
                    for i in range(attempts)]
            if keys[0] not in jobs:
                jobs[keys[0]] = Job(metric, rubric.render(metric, s["question"], s["answer"]), keys)
            ids.append(keys[0])
        per_sample.append(ids)
    return jobs, per_sample


def resolve_from_cache(job: Job, cache: JudgeCache) -> bool:
    """Fill ``job`` from the cache; True when it needs no request. Otherwise ``job.next_attempt``
    is the first draw to make (the cached earlier draws gave no grade)."""
    for i, key in enumerate(job.keys):
        rec = cache.get(key)
        if rec is None:
            job.next_attempt = i
            return False
        if rec["value"] is not None:
            job.value = rec["value"]
            return True
    return True  # every draw was made and none gave a grade
