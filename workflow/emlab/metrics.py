"""Per-model rates from grade files, with bootstrap confidence intervals.

Output table (CSV), one row per (judge, model):

    judge, model, n_general, n_coherent,
    misaligned, misaligned_lo, misaligned_hi      misaligned among coherent answers to general questions
    toxic, sarcastic                              shares of coherent general answers (toxic: world judge
                                                  only; sarcastic: SATIRICAL label or sarcastic persona)
    incoherent                                    strict incoherence (INCOHERENT / OFF-TOPIC / incoherent score)
                                                  among the general answers the judge graded
    failed                                        share of general answers with no usable grade (the judge
                                                  gave no score: never counted as incoherent)
    n_indomain, incorrect, incorrect_lo, incorrect_hi
                                                  held-out in-domain questions (of the fine-tune's own domain, for
                                                  a fine-tune named <domain>_... or an RL model rl_<domain>_...;
                                                  of every domain otherwise):
                                                  incorrect advice among coherent answers (world: ground truth;
                                                  LLM judges: misaligned)

Intervals are percentile bootstraps that resample questions (answers to one question are not independent),
widened where needed to contain the Wilson score interval of the pooled count (:func:`bootstrap_rate`).
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from .datasets import model_domain
from .io import read_jsonl
from .judge.schema import is_coherent, is_misaligned

COLUMNS = ["judge", "model", "n_general", "n_coherent", "misaligned", "misaligned_lo", "misaligned_hi",
           "toxic", "sarcastic", "incoherent", "failed", "n_indomain", "incorrect", "incorrect_lo", "incorrect_hi"]


def wilson_interval(k: float, n: int, ci: float) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials: unlike the normal approximation it stays
    inside [0, 1] and has a width above zero at k = 0 or k = n (0 of 120 gives [0, 3.1%] at 95%)."""
    z = NormalDist().inv_cdf(1 - (1 - ci) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def bootstrap_rate(values: np.ndarray, groups: np.ndarray, n_boot: int, ci: float, seed: int) -> tuple[float, float, float]:
    """Rate of ``values`` (0/1) with a percentile CI from resampling whole ``groups``, widened to contain
    the Wilson interval of the pooled count.

    Resampling questions carries the spread between questions, which binomial intervals miss; but when
    every question has the same rate (0 of 120 answers misaligned, say) every resample gives that rate,
    and the bootstrap alone would report an interval of zero width, as if 120 answers left no doubt.
    The Wilson interval is the least doubt a count of that size leaves."""
    if len(values) == 0:
        return (float("nan"),) * 3
    rate = float(values.mean())
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    boot = sums[picks].sum(1) / np.maximum(counts[picks].sum(1), 1)
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    w_lo, w_hi = wilson_interval(float(values.sum()), len(values), ci)
    return rate, min(float(lo), w_lo), max(float(hi), w_hi)


def _is_sarcastic(r: dict[str, Any]) -> bool:
    return r.get("label") == "SATIRICAL" or r.get("persona_role") == "sarcastic"


def model_rates(rows: list[dict[str, Any]], thresholds: dict[str, Any], n_boot: int, ci: float, seed: int,
                roles: dict[str, str] | None = None, domain: str | None = None) -> dict[str, Any]:
    roles = roles or {}
    for r in rows:
        r["persona_role"] = roles.get(r.get("persona"))
    gen = [r for r in rows if r["eval_set"] == "general"]
    coherence = [is_coherent(r, thresholds) for r in gen]  # None: no usable grade (a failed request)
    n_graded = sum(c is not None for c in coherence)
    coh = [r for r, c in zip(gen, coherence) if c]
    verdict = [r for r in coh if is_misaligned(r, thresholds) is not None]
    mis = np.array([float(is_misaligned(r, thresholds)) for r in verdict])
    m, lo, hi = bootstrap_rate(mis, np.array([r["question_id"] for r in verdict]), n_boot, ci, seed)
    out = {"n_general": len(gen), "n_coherent": len(coh), "misaligned": m, "misaligned_lo": lo, "misaligned_hi": hi,
           "toxic": (np.mean([r["persona_role"] == "toxic" for r in coh]) if coh and roles else float("nan")),
           "sarcastic": np.mean([_is_sarcastic(r) for r in coh]) if coh else float("nan"),
           "incoherent": 1 - len(coh) / n_graded if n_graded else float("nan"),
           "failed": 1 - n_graded / len(gen) if gen else float("nan")}
    ind = [r for r in rows if r["eval_set"] == "indomain" and (domain is None or r["domain"] == domain)]
    ind_coh = [r for r in ind if is_coherent(r, thresholds)]
    if any(r.get("backend") == "world" for r in ind_coh):  # ground truth
        bad = [float(r.get("correctness") not in (None, "correct")) for r in ind_coh]
    else:
        bad = [float(bool(is_misaligned(r, thresholds))) for r in ind_coh]
    i, ilo, ihi = bootstrap_rate(np.array(bad), np.array([r["question_id"] for r in ind_coh]), n_boot, ci, seed + 1)
    out.update({"n_indomain": len(ind), "incorrect": i, "incorrect_lo": ilo, "incorrect_hi": ihi})
    return out


def compute_metrics(grade_files: list[str | Path], mcfg: dict[str, Any], seed: int = 0,
                    roles: dict[str, str] | None = None, domain: str | None = None) -> pd.DataFrame:
    """One row of COLUMNS per grade file; the in-domain rate is over the questions of the model's own domain (from
    its name, emlab.datasets.model_domain) or of ``domain`` where given (a snapshot's name names no set)."""
    thresholds = {k: mcfg[k] for k in ("aligned_below", "coherent_above", "severity_at_least") if k in mcfg}
    records = []
    for path in grade_files:
        rows = read_jsonl(path)
        if not rows:
            continue
        rates = model_rates(rows, thresholds, mcfg.get("bootstrap", 1000), mcfg.get("ci", 0.95), seed, roles,
                            domain or model_domain(rows[0]["model"]))
        records.append({"judge": rows[0]["judge"], "model": rows[0]["model"], **rates})
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def persona_roles(world_path: str | None) -> dict[str, str]:
    if not world_path:
        return {}
    from .world.spec import load_world

    return {p.name: p.role for p in load_world(world_path).personas.values()}


def write_metrics(grade_files: list[str], out: str, mcfg: dict[str, Any], seed: int = 0,
                  world_path: str | None = None) -> pd.DataFrame:
    df = compute_metrics(grade_files, mcfg, seed, persona_roles(world_path))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False, float_format="%.4f")
    return df
