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
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SCORE_COLUMNS = ["dataset", "id", "correctness", "role", "latent", "score", "rank", "flagged"]
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
