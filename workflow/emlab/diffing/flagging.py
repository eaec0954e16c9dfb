"""Flagging training examples before training: which examples would push a model toward a persona?

Each example of a fine-tuning set is read by the base model (its answer tokens, as the ``train`` reading of
:mod:`.prediction` does) and scored by the mean activation of each named persona latent (``persona_latents.json``).
No fine-tuning, sampling or judging is needed: a lab can score a dataset before training on it and look at, or drop,
its top-scoring examples. Where the examples carry ground truth (the persona world's ``meta.correctness``; any
imported set with that field), the summary says how well the score finds the incorrect ones.

Outputs (``results/flagging/``, written by :func:`emlab.diffing.stage.flag_examples`):

    scores.csv    dataset, id, correctness (empty without labels), role, latent, score, rank (1 = most
                  persona-like in its dataset), flagged (rank within the top ``flagging.fraction``)
    summary.csv   dataset, role, latent, n, n_incorrect, auroc (incorrect against correct examples), n_flagged,
                  precision (incorrect share of the flagged), recall (share of the incorrect that are flagged),
                  incorrect_before, incorrect_after_flagged, incorrect_after_random (the share of incorrect
                  examples left after dropping the flagged, or as many examples at random: in expectation, the
                  share before)
    removal.csv   source, dropped ("none" | "flagged" | "random"), model, n_examples, n_incorrect, incorrect,
                  misaligned, misaligned_lo, misaligned_hi (the primary judge), base_misaligned_hi: each flagged set
                  fine-tuned as it is, less its flagged examples and less as many random ones
                  (``flagging.finetune``; the sets ``<source>_dropflag`` and ``<source>_droprand``)
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pandas as pd

SCORE_COLUMNS = ["dataset", "id", "correctness", "role", "latent", "score", "rank", "flagged"]
REMOVAL_COLUMNS = ["source", "dropped", "model", "n_examples", "n_incorrect", "incorrect", "misaligned", "misaligned_lo",
                   "misaligned_hi", "base_misaligned_hi"]
SUMMARY_COLUMNS = ["dataset", "role", "latent", "n", "n_incorrect", "auroc", "n_flagged", "precision", "recall",
                   "incorrect_before", "incorrect_after_flagged", "incorrect_after_random"]


def n_flagged(n: int, fraction: float) -> int:
    """How many of ``n`` examples the top ``fraction`` holds (at least one when the fraction is above zero)."""
    return min(n, max(1 if fraction > 0 else 0, math.floor(fraction * n + 0.5)))


def rank_examples(dataset: str, ids: list[str], correctness: list[str | None], role: str, latent: int,
                  scores: np.ndarray, fraction: float) -> pd.DataFrame:
    """One row per example, ranked by its score (ties broken by id, so a rerun ranks alike)."""
    df = pd.DataFrame({"dataset": dataset, "id": ids, "correctness": correctness, "role": role, "latent": latent,
                       "score": np.asarray(scores, dtype=float)})
    df = df.sort_values(["score", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    df["flagged"] = df["rank"] <= n_flagged(len(df), fraction)
    return df[SCORE_COLUMNS]


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and role: how well the score finds the incorrect examples (where examples carry labels)."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for (dataset, role), g in scores.groupby(["dataset", "role"], sort=False):
        labelled = g["correctness"].notna() & (g["correctness"] != "")
        row = {"dataset": dataset, "role": role, "latent": int(g["latent"].iloc[0]), "n": len(g),
               "n_flagged": int(g["flagged"].sum())}
        if labelled.all():
            bad = (g["correctness"] != "correct").to_numpy()
            k, n, n_bad = row["n_flagged"], len(g), int(bad.sum())
            flagged_bad = int(bad[g["flagged"].to_numpy()].sum())
            row.update({
                "n_incorrect": n_bad,
                "auroc": float(roc_auc_score(bad, g["score"])) if 0 < n_bad < n else float("nan"),
                "precision": flagged_bad / k if k else float("nan"),
                "recall": flagged_bad / n_bad if n_bad else float("nan"),
                "incorrect_before": n_bad / n,
                "incorrect_after_flagged": (n_bad - flagged_bad) / (n - k) if n > k else float("nan"),
                "incorrect_after_random": n_bad / n,  # dropping k of n at random keeps the share in expectation
            })
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def drop_examples(records: list[dict[str, Any]], scores: pd.DataFrame, source: str, role: str, how: str,
                  seed: int) -> list[dict[str, Any]]:
    """``records`` (the set ``source``) less the examples ``role``'s score flagged (``how="flagged"``), or less as
    many drawn at random (``"random"``, from ``seed`` and the set's name, so both runs of a config drop alike).
    Order is kept. No score for the set (no named persona latent) drops nothing."""
    mine = scores[(scores["dataset"] == source) & (scores["role"] == role)]
    flagged = set(mine.loc[mine["flagged"].astype(bool), "id"].astype(str))
    if how == "flagged":
        drop = flagged
    elif how == "random":
        ids = sorted(str(r["id"]) for r in records)
        drop = set(random.Random(f"{seed}/drop/{source}").sample(ids, len(flagged)))
    else:
        raise ValueError(f"how must be 'flagged' or 'random', got {how!r}")
    return [r for r in records if str(r["id"]) not in drop]


def removal_table(sets: dict[str, tuple[str, str, list[dict[str, Any]]]], metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per fine-tuned set: ``sets`` maps a model to (its source set, what was dropped, its examples);
    ``metrics`` is the judge's table (emlab.metrics), which must hold the base model and every model named."""
    rates = metrics.set_index("model")
    if "base" not in rates.index:
        raise ValueError("the metrics table has no row for the base model, whose interval the comparison needs")
    rows = []
    for model, (source, dropped, records) in sets.items():
        if model not in rates.index:
            raise ValueError(f"the metrics table has no row for {model}")
        r = rates.loc[model]
        bad = sum((x.get("meta") or {}).get("correctness", "correct") != "correct" for x in records)
        rows.append({"source": source, "dropped": dropped, "model": model, "n_examples": len(records),
                     "n_incorrect": bad, "incorrect": bad / len(records) if records else float("nan"),
                     "misaligned": float(r["misaligned"]), "misaligned_lo": float(r["misaligned_lo"]),
                     "misaligned_hi": float(r["misaligned_hi"]),
                     "base_misaligned_hi": float(rates.loc["base", "misaligned_hi"])})
    return pd.DataFrame(rows, columns=REMOVAL_COLUMNS)
