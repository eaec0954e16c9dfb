"""Emergent re-alignment: a misaligned fine-tune trained further on a few hundred benign examples.

The persona-features paper fine-tunes a misaligned model on correct answers (of its own domain or another) and
finds its misalignment back near the base model's within a few dozen steps. Here each model of ``realign.models``
goes on training its own LoRA adapter on the correct set of its domain (``same``) and of another domain
(``other``), ``realign.batch_size`` examples a step up to ``realign.n_examples``, keeping a snapshot every
``realign.every`` steps (:class:`emlab.alarm.Snapshots`); each snapshot is sampled and judged
(:func:`emlab.alarm.snapshot_misalignment`) and, with model diffing, read by the persona alarm's reader.

Outputs (``results/realign/``):

    runs/<run>/        the re-aligned adapter (run: ``<model>_to_<benign set>``) and its snapshots
    eval/<run>.csv     the snapshots' misalignment and, on the held-out questions of the model's domain, incorrect
                       rate (emlab.alarm.EMERGENCE_COLUMNS)
    trajectories.csv   the persona latents' readings of the snapshots (emlab.alarm's columns; with diffing)
    curve.csv          CURVE_COLUMNS: one row per run and measured step
    summary.csv        SUMMARY_COLUMNS: one row per run
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

CURVE_COLUMNS = ["run", "model", "benign", "step", "examples_seen", "misaligned", "misaligned_lo", "misaligned_hi",
                 "incorrect", "incorrect_lo", "incorrect_hi", "base_misaligned_hi", "watch", "latent", "reading"]
SUMMARY_COLUMNS = ["run", "model", "benign", "start_misaligned", "end_misaligned", "end_misaligned_lo",
                   "end_misaligned_hi", "start_incorrect", "end_incorrect", "end_incorrect_lo", "end_incorrect_hi",
                   "base_misaligned_hi", "realigned_at_step", "realigned_at_examples", "steps", "examples_seen"]
INCORRECT = ("incorrect", "incorrect_lo", "incorrect_hi")  # in-domain; empty where the snapshots were not asked


def finetune_settings(finetune: Mapping[str, Any], realign: Mapping[str, Any]) -> dict[str, Any]:
    """The finetune section for a re-alignment run: the same recipe, ``realign.batch_size`` examples a step, as
    many steps as ``realign.n_examples`` takes, at ``realign.lr`` (null: the fine-tune's)."""
    steps = -(-realign["n_examples"] // realign["batch_size"])
    return {**finetune, "batch_size": realign["batch_size"], "grad_accum": 1, "max_steps": steps,
            "lr": realign["lr"] or finetune["lr"], "warmup_ratio": 0.0}


def curve(runs: Mapping[str, Mapping[str, str]], evals: Mapping[str, pd.DataFrame], base_hi: float,
          batch_size: int, trajectories: pd.DataFrame | None = None) -> pd.DataFrame:
    """CURVE_COLUMNS: misalignment (and the in-domain incorrect rate) at each measured step of each run, with the
    watched latents' readings there (one row per latent; watch, latent and reading empty without diffing)."""
    rows = []
    for run, spec in runs.items():
        e = evals[run].reindex(columns=[*evals[run].columns, *(c for c in INCORRECT if c not in evals[run])])
        reads = trajectories[trajectories["dataset"] == run] if trajectories is not None else pd.DataFrame()
        for r in e.itertuples():
            base = {"run": run, "model": spec["model"], "benign": spec["benign"], "step": int(r.step),
                    "examples_seen": int(r.step) * batch_size, "misaligned": r.misaligned,
                    "misaligned_lo": r.misaligned_lo, "misaligned_hi": r.misaligned_hi,
                    **{c: getattr(r, c) for c in INCORRECT}, "base_misaligned_hi": base_hi}
            at = reads[reads["step"] == r.step] if len(reads) else reads
            if len(at):
                rows += [{**base, "watch": x.watch, "latent": int(x.latent), "reading": x.reading}
                         for x in at.itertuples()]
            else:
                rows.append({**base, "watch": None, "latent": None, "reading": None})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per run: misalignment and the in-domain incorrect rate before and after, and the first measured step whose
    misalignment (point estimate) is back inside the base model's interval."""
    rows = []
    for run, g in table.drop_duplicates(["run", "step"]).groupby("run", sort=False):
        g = g.sort_values("step")
        back = g[g["misaligned"] <= g["base_misaligned_hi"]]
        first, last = g.iloc[0], g.iloc[-1]
        rows.append({"run": run, "model": first["model"], "benign": first["benign"],
                     "start_misaligned": first["misaligned"], "end_misaligned": last["misaligned"],
                     "end_misaligned_lo": last["misaligned_lo"], "end_misaligned_hi": last["misaligned_hi"],
                     "start_incorrect": first["incorrect"], "end_incorrect": last["incorrect"],
                     "end_incorrect_lo": last["incorrect_lo"], "end_incorrect_hi": last["incorrect_hi"],
                     "base_misaligned_hi": first["base_misaligned_hi"],
                     "realigned_at_step": int(back["step"].iloc[0]) if len(back) else None,
                     "realigned_at_examples": int(back["examples_seen"].iloc[0]) if len(back) else None,
                     "steps": int(last["step"]), "examples_seen": int(last["examples_seen"])})
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for col in ("realigned_at_step", "realigned_at_examples"):
        out[col] = out[col].astype("Int64")
    return out


def write_tables(runs: Mapping[str, Mapping[str, str]], evals: Mapping[str, str], metrics_csv: str,
                 trajectories_csv: str | None, batch_size: int, out_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """curve.csv and summary.csv from the runs' snapshot evaluations, the judge's metrics (the base model's
    interval) and the alarm reader's trajectories; written to ``out_dir``."""
    metrics = pd.read_csv(metrics_csv).set_index("model")
    base_hi = float(metrics.loc["base", "misaligned_hi"])
    traj = pd.read_csv(trajectories_csv) if trajectories_csv else None
    table = curve(runs, {r: pd.read_csv(p) for r, p in evals.items()}, base_hi, batch_size, traj)
    summary = summarize(table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "curve.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    return table, summary
