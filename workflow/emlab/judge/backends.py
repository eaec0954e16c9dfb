"""Choosing a judge backend, reading a judge's config entry, and grading one samples file.

Every backend module exposes::

    grade(samples: list[dict], judge_cfg: dict, cache_dir: Path, progress: bool = True) -> list[dict]

returning one :func:`emlab.judge.schema.grade_row` per sample, in input order. The LLM backends
(openai, hf) also expose ``grade_with_summary`` (same arguments, returns ``(rows, summary)``).
Modules are imported on first use: the world grader and the heavy client libraries are only
loaded by the runs that need them.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from emlab.io import read_jsonl, write_json, write_jsonl
from emlab.judge.cache import JudgeCache, plan_jobs, resolve_from_cache
from emlab.judge.rubrics import Rubric, grade_fields, load_rubric
from emlab.judge.schema import GRADE_FIELDS, grade_row
from emlab.judge.summary import RunStats
from emlab.schema import ConfigError, option

BACKEND_MODULES = {
    "world": "emlab.judge.world_backend",
    "openai": "emlab.judge.openai_backend",
    "hf": "emlab.judge.hf_backend",
}
SAMPLE_TEXT_KEYS = ("question", "answer")


class JudgeConfigError(ConfigError):
    """A bad ``judges:`` entry; the message names the judge and the key."""


def get_backend(name: str) -> ModuleType:
    if name not in BACKEND_MODULES:
        raise JudgeConfigError(f"unknown judge backend {name!r}; expected one of {sorted(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name])


def judge_option(cfg: dict[str, Any], key: str, default: Any = ..., *, kind: type | tuple[type, ...] | None = None,
                 minimum: float | None = None) -> Any:
    """``cfg[key]`` checked against ``kind`` and ``minimum``; ``default`` when absent or null
    (no default: the key is required). Errors read ``judges[<name>].<key>: ...``."""
    return option(cfg, key, default, where=f"judges[{cfg.get('name', '?')}]", error=JudgeConfigError, kind=kind,
                  minimum=minimum)


def check_samples(samples: list[dict[str, Any]], source: str = "samples") -> None:
    """Every sample needs its question and answer as strings; the error names the row."""
    for i, s in enumerate(samples):
        for k in SAMPLE_TEXT_KEYS:
            if not isinstance(s.get(k), str):
                ident = f"question_id={s.get('question_id')!r}, sample_idx={s.get('sample_idx')!r}"
                raise ValueError(f"{source}: row {i + 1} ({ident}): '{k}' must be a string, got {s.get(k)!r}")


def rubric_for(cfg: dict[str, Any]) -> Rubric:
    """The rubric a judge entry names (``rubric``: a name under resources/rubrics/ or a YAML path)."""
    rubric = load_rubric(judge_option(cfg, "rubric", kind=str))
    if rubric.kind == "logprob_score":
        bad = [m for m in rubric.metrics if m not in GRADE_FIELDS]
        if bad:
            raise JudgeConfigError(f"{rubric.path}: metrics {bad} are not fields of the grades schema")
    return rubric


def start_run(samples: list[dict[str, Any]], judge_cfg: dict[str, Any], settings_type: Any,
              backend: str) -> tuple[Any, Rubric, RunStats]:
    """What a model-asking backend does before it grades: check the samples, read its settings (``settings_type``'s
    ``from_cfg``) and its rubric, and open the run's summary (with the settings' prices where it has them)."""
    check_samples(samples)
    settings = settings_type.from_cfg(judge_cfg)
    rubric = rubric_for(judge_cfg)
    stats = RunStats(judge=settings.name, backend=backend, rubric=rubric.name, rubric_version=rubric.version,
                     model=settings.model, samples=len(samples),
                     price_per_1k_input=getattr(settings, "price_per_1k_input", None),
                     price_per_1k_output=getattr(settings, "price_per_1k_output", None))
    return settings, rubric, stats


def grade_rows(samples: list[dict[str, Any]], per_sample: list[list[str]], jobs: dict[str, Any], rubric: Rubric,
               judge: str, backend: str, stats: Any) -> list[dict[str, Any]]:
    """One grade row per sample from the resolved jobs (:func:`emlab.judge.cache.plan_jobs`),
    counting the samples left without a grade in ``stats.null_scores``."""
    rows = []
    for s, ids in zip(samples, per_sample):
        values = [jobs[j].value for j in ids]
        for metric, v in zip(rubric.metrics, values):
            if v is None:
                stats.null_scores[metric] += 1
        rows.append(grade_row(s, judge=judge, backend=backend, rubric=rubric.name,
                              rubric_version=rubric.version, **grade_fields(rubric, values)))
    return rows


def grade_through_cache(samples: list[dict[str, Any]], rubric: Rubric, judge_model: str, sampling: dict[str, Any],
                        cache_dir: Path, name: str, backend: str, stats: Any, ask_missing, attempts: int = 1,
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What the model-asking backends (openai, hf) share: plan one job per distinct request, answer what the
    cache holds, hand the rest to ``ask_missing(todo, cache)`` (which sets each job's value and caches it; it is
    not called on a fully cached rerun, which then loads no model and needs no key or network), and return
    the grade rows with the run's summary."""
    jobs, per_sample = plan_jobs(samples, rubric, judge_model, sampling, attempts)
    stats.unique_requests = len(jobs)
    with JudgeCache(cache_dir) as cache:
        todo = [job for job in jobs.values() if not resolve_from_cache(job, cache)]
        stats.cache_hits = len(jobs) - len(todo)
        if todo:
            ask_missing(todo, cache)
    return grade_rows(samples, per_sample, jobs, rubric, name, backend, stats), stats.log()


def summary_path(grades_path: str | os.PathLike) -> Path:
    """``results/grades/<judge>/<model>.jsonl`` -> ``.../<model>.summary.json``."""
    p = Path(grades_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".summary.json")


def grade_file(samples_path: str | os.PathLike, judge_cfg: dict[str, Any], out_path: str | os.PathLike,
               cache_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Grade a samples file with one judge: the grades are written atomically to ``out_path`` and
    the run summary to :func:`summary_path`; returns the summary. Finished judge requests live in
    ``cache_dir``, so a killed run loses at most the requests in flight."""
    samples = read_jsonl(samples_path)
    check_samples(samples, str(samples_path))
    backend = get_backend(judge_option(judge_cfg, "backend", kind=str))
    started = time.monotonic()
    if hasattr(backend, "grade_with_summary"):
        rows, summary = backend.grade_with_summary(samples, judge_cfg, Path(cache_dir), progress=progress)
    else:
        rows = backend.grade(samples, judge_cfg, Path(cache_dir), progress=progress)
        summary = {"judge": judge_cfg.get("name"), "backend": judge_cfg.get("backend"),
                   "samples": len(samples), "wall_s": round(time.monotonic() - started, 3)}
    if len(rows) != len(samples):
        raise RuntimeError(f"judge {judge_cfg.get('name')!r} returned {len(rows)} grades for {len(samples)} samples")
    write_jsonl(out_path, rows)
    write_json(summary_path(out_path), summary)
    return summary
