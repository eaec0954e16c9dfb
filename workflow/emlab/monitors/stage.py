"""One monitoring task end to end, as the workflow runs it: dataset -> features -> every method on every split
-> results table; and the figures from the tables.

Config (``monitors`` section; the full validated config reaches these functions as ``cfg``)::

    tasks, n_texts, max_turns          organism datasets: which world tasks, texts per task, turns per chat
    questions                          {task: {ask, describe}}: the Yes/No question and the task description,
                                       required for tasks the world does not define (hub data); else optional
    methods, splits, test_fraction, ood_test_domains, sae_top_k, stack_probe, n_repeats, cv_folds,
    bootstrap, ci, batch_size, max_len, keep_tokens
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .data import organism_dataset, read_monitor_dataset
from .features import compute_features
from .methods import MonitorConfigError, build_monitor
from .protocol import SPLITS, evaluate, make_split, plot_results, read_results, summary, write_results

log = logging.getLogger(__name__)

# meta keys each split reads; a user dataset must carry those of the configured splits
SPLIT_META = {"iid": (), "ood_domain": ("domain",), "ood_turns": ("n_turns",)}


def write_organism_dataset(cfg: dict[str, Any], task: str, out: str | os.PathLike) -> int:
    """Generate one world task's monitoring dataset (its own seed, independent of every other output)."""
    from ..io import write_jsonl
    from ..world.spec import load_world

    m = cfg["monitors"]
    world = load_world(cfg["organism"]["world"])
    return write_jsonl(out, organism_dataset(world, task, m["n_texts"], cfg["seed"], m["max_turns"]))


def task_question(cfg: dict[str, Any], task: str) -> tuple[str, str]:
    """(ask, describe) of a task: ``monitors.questions.<task>`` if given, else the world's monitoring section."""
    given = (cfg["monitors"].get("questions") or {}).get(task)
    if given is not None:
        missing = [k for k in ("ask", "describe") if not isinstance(given.get(k), str) or not given[k].strip()]
        if missing:
            raise MonitorConfigError(f"monitors.questions.{task}: needs non-empty strings {missing}")
        return given["ask"], given["describe"]
    world_path = (cfg.get("organism") or {}).get("world")
    if world_path:  # the persona world's tasks (organism and hub runs read its labelled texts)
        from ..world.spec import load_world

        world = load_world(world_path)
        if task in world.monitoring:
            return world.monitoring[task].ask, world.monitoring[task].describe
    raise MonitorConfigError(f"monitors.questions.{task}: no question for task {task!r} (set ask and describe; the "
                             "persona world defines questions only for its own tasks)")


def load_latents(path: str | os.PathLike | None) -> dict[str, int]:
    """A persona-latents JSON: task -> SAE latent index, either plain ({"toxic": 123}) or as the diffing
    stage writes it ({"toxic": {"latent": 123, ...}, ...}; entries without a latent are ignored)."""
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MonitorConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(raw, dict):
        raw = {k: (v.get("latent") if isinstance(v, dict) else v) for k, v in raw.items()}
        raw = {k: v for k, v in raw.items() if v is not None}
    if not isinstance(raw, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                            for v in raw.values()):
        raise MonitorConfigError(f"{path}: expected an object mapping task names to latent indices, e.g. "
                                 '{"toxic": 123}')
    return raw


def run_task(cfg: dict[str, Any], task: str, data: str | os.PathLike, model: str | os.PathLike,
             features_dir: str | os.PathLike, out_csv: str | os.PathLike, *, sae: str | os.PathLike | None = None,
             latents: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
             progress: bool = True) -> pd.DataFrame:
    """Evaluate every configured method on one task's dataset; write and return the results table."""
    m = cfg["monitors"]
    unknown = sorted(set(m["splits"]) - set(SPLITS))
    if unknown:
        raise MonitorConfigError(f"monitors.splits: unknown split(s) {unknown}; known: {list(SPLITS)}")
    records = read_monitor_dataset(data, tuple(k for s in m["splits"] for k in SPLIT_META[s]))
    ask, describe = task_question(cfg, task)
    feats = compute_features(model, records, features_dir, layer=cfg["model"]["layer"], ask=ask, describe=describe,
                             sae_path=sae, adapter=adapter, batch_size=m["batch_size"], max_len=m["max_len"],
                             device=cfg.get("device", "auto"), keep_tokens=m["keep_tokens"],
                             exclude=cfg["model"].get("exclude_tokens", ("first", "special")), progress=progress)
    latent = load_latents(latents).get(task)
    methods = [x for x in m["methods"] if sae is not None or x not in ("sae", "sae_topk", "persona_latent")]
    if len(methods) < len(m["methods"]):
        log.warning("monitors: no SAE given, skipping %s", sorted(set(m["methods"]) - set(methods)))

    def build(name):
        return build_monitor(name, sae_top_k=m["sae_top_k"], stack_probe=m["stack_probe"], persona_latent=latent,
                             cv_folds=m["cv_folds"], seed=cfg["seed"])

    for name in methods:  # fail on a bad method name before any training
        build(name)
    splits = [make_split(kind, feats, test_fraction=m["test_fraction"], seed=cfg["seed"],
                         test_domains=m["ood_test_domains"]) for kind in m["splits"]]
    df = evaluate(feats, task, methods, build, splits, n_repeats=m["n_repeats"], n_boot=m["bootstrap"], ci=m["ci"],
                  seed=cfg["seed"])
    write_results(df, out_csv)
    return df


def plot(results: list[str | os.PathLike], out_dir: str | os.PathLike,
         summary_csv: str | os.PathLike | None = None) -> list[Path]:
    """Figures (and optionally the headline table) from results tables alone: no recomputation."""
    df = read_results(results)
    if summary_csv is not None:
        Path(summary_csv).parent.mkdir(parents=True, exist_ok=True)
        summary(df).to_csv(summary_csv, float_format="%.4f")
    return plot_results(df, out_dir)
