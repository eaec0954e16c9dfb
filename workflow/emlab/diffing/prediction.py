"""Prediction: does a persona latent's shift tell which fine-tunes turned misaligned, and does it show early?

For every model but the base, the shift of each named persona latent (``persona_latents.json``: toxic, sarcastic)
over the base model, read two ways, neither of which needs a judge:

    eval    the model reading its own sampled answers to the eval prompts, minus the base model reading its own,
            question by question (the interval resamples questions);
    train   the fine-tune reading its fine-tuning examples, minus the base model reading the same examples
            (no sampling at all: what a lab could check before or during training; the interval resamples examples).

Each shift is set against the model's misalignment rate from the judge's metrics (target ``misaligned``): a model
counts as misaligned when its rate is above the base model's interval. Where the judge also gives the rate of each
persona's answers (the world judge's ``toxic`` and ``sarcastic`` columns), each latent is also set against the rate
of its own persona (target ``persona``: above the base model's misalignment interval counts). The distinction
matters in the organism: obviously incorrect advice turns the model sarcastic, which the toxic latent is not meant
to see. The persona latents were picked by ranking one group of
fine-tunes (e.g. the subtle ones), so their shift on that group is large by construction; the summary therefore
also gives every number on the models outside that group ("held out").

Outputs (``results/prediction/``, written by :func:`emlab.diffing.stage.predict`):

    shifts.csv    model, kind, fraction, role, latent, source, shift, shift_lo, shift_hi, n (questions or
                  examples), misaligned, misaligned_lo, misaligned_hi, base_misaligned_hi, is_misaligned,
                  persona_rate, is_persona_misaligned (NaN / empty without persona rates), in_selection_group
    summary.csv   role, source, target ("misaligned" | "persona"), models ("all" | "held out"), n_models,
                  n_misaligned (above the base model's interval on the target), spearman, spearman_lo, spearman_hi,
                  auroc
    early.csv     model, fraction, source, shift, shift_lo, shift_hi, correct_shift_hi, misaligned,
                  base_misaligned_hi, latent_above_correct, behaviour_within_base, early
    early.md      one sentence per low-fraction mixture and source: detected early, yes or no, with the numbers

``early``: the toxic latent's shift interval lies above every correct-data fine-tune's (its lower bound above
their highest upper bound) while the mixture's misalignment is still inside the base model's interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..datasets import parse_dataset_name

SHIFT_COLUMNS = ["model", "kind", "fraction", "role", "latent", "source", "shift", "shift_lo", "shift_hi", "n",
                 "misaligned", "misaligned_lo", "misaligned_hi", "base_misaligned_hi", "is_misaligned",
                 "persona_rate", "is_persona_misaligned", "in_selection_group"]
SUMMARY_COLUMNS = ["role", "source", "target", "models", "n_models", "n_misaligned", "spearman", "spearman_lo",
                   "spearman_hi", "auroc"]
# what a shift is set against: the model's misalignment (either persona), or its rate of answers in the latent's own
# persona (the judge's `toxic` / `sarcastic` columns; the world judge gives both)
TARGETS = {"misaligned": ("misaligned", "is_misaligned"), "persona": ("persona_rate", "is_persona_misaligned")}
EARLY_COLUMNS = ["model", "fraction", "source", "shift", "shift_lo", "shift_hi", "correct_shift_hi", "misaligned",
                 "base_misaligned_hi", "latent_above_correct", "behaviour_within_base", "early"]


def model_kind(name: str) -> tuple[str, float]:
    """(kind, fraction of incorrect data) of a model name: correct / subtle / obvious (fraction 0 or 1), mixture
    (its fraction), educational (1), or ``other`` (RL models, a second base, imports) with no fraction."""
    try:
        d = parse_dataset_name(name)
    except ValueError:
        return "other", float("nan")
    if d["kind"] == "mixture":
        return "mixture", d["fraction"]
    if d["kind"] == "dropped":  # a set less some examples: its incorrect share is in results/flagging/removal.csv
        return "other", float("nan")
    if d["kind"] == "educational":  # incorrect answers, asked for with a benign reason
        return "educational", 1.0
    return d["variant"], 0.0 if d["variant"] == "correct" else 1.0


def paired_shift(model: np.ndarray, base: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean of ``model - base`` over paired units (questions or examples) and its 95% bootstrap interval."""
    d = np.asarray(model, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.quantile(d[picks].mean(axis=1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def _question_means(values: np.ndarray, text_ids: list[str]) -> pd.Series:
    """Per question (a text id is ``<question id>#<sample>``): the mean over its samples."""
    return pd.Series(values, index=[t.rsplit("#", 1)[0] for t in text_ids]).groupby(level=0).mean()


def _paired(model: pd.Series, base: pd.Series, n_boot: int, seed: int, none_shared: str) -> tuple[float, float, float, int]:
    """:func:`paired_shift` over the units (index values) both series have, and their number."""
    shared = model.index.intersection(base.index)
    if shared.empty:
        raise ValueError(none_shared)
    return (*paired_shift(model[shared].to_numpy(), base[shared].to_numpy(), n_boot, seed), len(shared))


def eval_shift(model_vals, model_ids, base_vals, base_ids, n_boot: int, seed: int) -> tuple[float, float, float, int]:
    """Paired by question: each model read its own samples of the same questions."""
    return _paired(_question_means(model_vals, model_ids), _question_means(base_vals, base_ids), n_boot, seed,
                   "the model's and the base model's eval answers share no question")


def train_shift(model_vals, model_ids, base_vals, base_ids, n_boot: int, seed: int) -> tuple[float, float, float, int]:
    """Paired by example: the fine-tune and the base model read the same fine-tuning examples."""
    return _paired(pd.Series(model_vals, index=model_ids), pd.Series(base_vals, index=base_ids), n_boot, seed,
                   "the fine-tune and the base model read no common fine-tuning example")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def summarize(shifts: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (role, source), target and model set: Spearman's rho of shift against the target's rate (bootstrap over
    models) and the AUROC of the shift for telling the models above the base model's interval from the others
    (NaN without both kinds). Targets (``TARGETS``): misalignment, and the rate of the latent's own persona where
    the judge gives it."""
    from sklearn.metrics import roc_auc_score

    rows = []
    groups = [(role, source, target, g) for (role, source), g in shifts.groupby(["role", "source"], sort=False)
              for target in TARGETS]
    for role, source, target, g in groups:
        rate, label = TARGETS[target]
        if g[rate].isna().any():  # a judge without persona rates: the misalignment target only
            continue
        for subset, part in (("all", g), ("held out", g[~g["in_selection_group"].astype(bool)])):
            x, y = part["shift"].to_numpy(), part[rate].to_numpy(dtype=float)
            labels = part[label].to_numpy(dtype=bool)
            rho, lo, hi = _spearman(x, y), float("nan"), float("nan")
            if not np.isnan(rho):
                picks = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
                boot = np.array([_spearman(x[p], y[p]) for p in picks])
                boot = boot[~np.isnan(boot)]
                if len(boot):
                    lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
            auroc = float(roc_auc_score(labels, x)) if 0 < labels.sum() < len(labels) else float("nan")
            rows.append({"role": role, "source": source, "target": target, "models": subset, "n_models": len(part),
                         "n_misaligned": int(labels.sum()), "spearman": rho, "spearman_lo": lo, "spearman_hi": hi,
                         "auroc": auroc})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def early_detection(shifts: pd.DataFrame, base_hi: float, max_fraction: float, role: str = "toxic") -> pd.DataFrame:
    """The low-fraction mixtures (fraction <= ``max_fraction``): is the role's shift above every correct-data
    fine-tune's while the mixture's misalignment is still inside the base model's interval?"""
    rows = []
    s = shifts[shifts["role"] == role]
    for source, g in s.groupby("source", sort=False):
        correct = g[g["kind"] == "correct"]
        ceiling = float(correct["shift_hi"].max()) if len(correct) else float("nan")
        low = g[(g["kind"] == "mixture") & (g["fraction"] <= max_fraction)]
        for r in low.itertuples():
            above = bool(len(correct)) and r.shift_lo > ceiling
            within = bool(r.misaligned <= base_hi)
            rows.append({"model": r.model, "fraction": r.fraction, "source": source, "shift": r.shift,
                         "shift_lo": r.shift_lo, "shift_hi": r.shift_hi, "correct_shift_hi": ceiling,
                         "misaligned": r.misaligned, "base_misaligned_hi": base_hi, "latent_above_correct": above,
                         "behaviour_within_base": within, "early": above and within})
    return pd.DataFrame(rows, columns=EARLY_COLUMNS)


SOURCE_WORDS = {"eval": "on its own eval answers", "train": "on its fine-tuning data"}


def early_sentences(early: pd.DataFrame, role: str = "toxic") -> list[str]:
    out = []
    for r in early.itertuples():
        verdict = "yes" if r.early else "no"
        reasons = []
        if not r.latent_above_correct:
            reasons.append("the shift is not above every correct-data fine-tune's")
        if not r.behaviour_within_base:
            reasons.append("the misalignment is already above the base model's interval")
        out.append(
            f"{r.model} ({r.fraction:.0%} incorrect), {SOURCE_WORDS.get(r.source, r.source)}: the {role} latent's "
            f"shift is {r.shift:.4f} [{r.shift_lo:.4f}, {r.shift_hi:.4f}] against at most {r.correct_shift_hi:.4f} "
            f"for the correct-data fine-tunes, and its misalignment is {r.misaligned:.1%} (base model's interval up "
            f"to {r.base_misaligned_hi:.1%}). Detected early: **{verdict}**"
            + (f" ({'; '.join(reasons)})." if reasons else "."))
    return out
