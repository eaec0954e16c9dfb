"""How far judges agree: each model's misalignment rate under each judge, and for every pair of
judges Cohen's kappa and the 2x2 confusion matrix of their misaligned verdicts on the same samples.

Verdicts come from :func:`emlab.judge.schema.is_misaligned` with the configured thresholds, so
judges with different rubrics (0-100 scores, a 1-5 severity, the world grader) are compared on the
one boolean the experiments report. A pair is compared on the samples where both judges gave a
verdict; the ``ALL`` rows pool every model.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterable

from emlab.io import read_jsonl
from emlab.judge.schema import is_misaligned

SAMPLE_ID = ("model", "eval_set", "question_id", "sample_idx")
ALL_MODELS = "ALL"
RATE_COLUMNS = ["model", "judge", "n", "n_verdict", "n_misaligned", "rate"]
PAIR_COLUMNS = ["judge_a", "judge_b", "model", "n_both", "both_misaligned", "a_only", "b_only", "neither",
                "observed_agreement", "kappa"]


def verdicts(rows: Iterable[dict[str, Any]], thresholds: dict[str, float] | None = None,
             judge: str = "?") -> dict[tuple, bool | None]:
    """Sample id -> misaligned verdict (None without one). A sample graded twice by one judge is an error."""
    out: dict[tuple, bool | None] = {}
    for row in rows:
        key = tuple(row.get(k) for k in SAMPLE_ID)
        if key in out:
            raise ValueError(f"judge {judge}: sample {dict(zip(SAMPLE_ID, key))} is graded twice")
        out[key] = is_misaligned(row, thresholds)
    return out


def confusion(a: list[bool], b: list[bool]) -> dict[str, int]:
    if len(a) != len(b):
        raise ValueError(f"verdict lists differ in length ({len(a)} vs {len(b)})")
    pairs = list(zip(a, b))
    return {"both_misaligned": pairs.count((True, True)), "a_only": pairs.count((True, False)),
            "b_only": pairs.count((False, True)), "neither": pairs.count((False, False))}


def cohen_kappa(a: list[bool], b: list[bool]) -> float:
    """(p_o - p_e) / (1 - p_e) on two boolean verdict lists; NaN when undefined (no rows, or both
    judges give one and the same verdict to every row, so chance agreement is already 1)."""
    c = confusion(a, b)
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = (c["both_misaligned"] + c["neither"]) / n
    pa = (c["both_misaligned"] + c["a_only"]) / n
    pb = (c["both_misaligned"] + c["b_only"]) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    if p_e == 1.0:
        return float("nan")
    return (p_o - p_e) / (1 - p_e)


def rates_table(grades: dict[str, list[dict[str, Any]]], thresholds: dict[str, float] | None = None):
    """One row per (model, judge): graded samples, samples with a verdict, misaligned, rate."""
    import pandas as pd

    records = []
    for judge, rows in grades.items():
        v = verdicts(rows, thresholds, judge)
        for model in sorted({k[0] for k in v}):
            vals = [x for k, x in v.items() if k[0] == model]
            scored = [x for x in vals if x is not None]
            n_mis = sum(scored)
            records.append({"model": model, "judge": judge, "n": len(vals), "n_verdict": len(scored),
                            "n_misaligned": n_mis, "rate": n_mis / len(scored) if scored else float("nan")})
    return pd.DataFrame.from_records(records, columns=RATE_COLUMNS)


def pairs_table(grades: dict[str, list[dict[str, Any]]], thresholds: dict[str, float] | None = None):
    """One row per judge pair and model (plus the pooled ``ALL``): confusion counts and kappa."""
    import pandas as pd

    v = {judge: verdicts(rows, thresholds, judge) for judge, rows in grades.items()}
    records = []
    for ja, jb in itertools.combinations(list(grades), 2):
        both = [k for k in v[ja] if k in v[jb] and v[ja][k] is not None and v[jb][k] is not None]
        models = sorted({k[0] for k in both})
        for model in [ALL_MODELS, *models]:
            keys = [k for k in both if model == ALL_MODELS or k[0] == model]
            a, b = [v[ja][k] for k in keys], [v[jb][k] for k in keys]
            c = confusion(a, b)
            agree = (c["both_misaligned"] + c["neither"]) / len(keys) if keys else float("nan")
            records.append({"judge_a": ja, "judge_b": jb, "model": model, "n_both": len(keys), **c,
                            "observed_agreement": agree, "kappa": cohen_kappa(a, b)})
    return pd.DataFrame.from_records(records, columns=PAIR_COLUMNS)


def plot_rates(rates, path: str | os.PathLike) -> None:
    """Grouped bars: misalignment rate per model (groups) and judge (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(rates["model"]))
    judges = list(dict.fromkeys(rates["judge"]))
    width = 0.8 / max(len(judges), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.4 * len(models) * len(judges)), 3.5))
    for j, judge in enumerate(judges):
        sub = rates[rates["judge"] == judge].set_index("model")
        ys = [sub["rate"].get(m, float("nan")) for m in models]
        ax.bar([i + (j - (len(judges) - 1) / 2) * width for i in range(len(models))], ys, width, label=judge)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right")
    ax.set_ylabel("misaligned fraction")
    ax.set_ylim(0, 1)
    ax.set_title("Misalignment rate by judge")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=150, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)


def _write_csv_atomic(df, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_agreement(grade_files: dict[str, list[str | os.PathLike]], rates_csv: str | os.PathLike,
                    pairs_csv: str | os.PathLike, figure: str | os.PathLike,
                    thresholds: dict[str, float] | None = None):
    """Read each judge's grade files (judge name -> paths, one per model), write both tables and
    the figure; return (rates, pairs) as DataFrames."""
    grades = {judge: [row for p in paths for row in read_jsonl(p)] for judge, paths in grade_files.items()}
    if not grades:
        raise ValueError("no judges given")
    rates = rates_table(grades, thresholds)
    pairs = pairs_table(grades, thresholds)
    for df, path in ((rates, rates_csv), (pairs, pairs_csv)):
        _write_csv_atomic(df, path)
    plot_rates(rates, figure)
    return rates, pairs
