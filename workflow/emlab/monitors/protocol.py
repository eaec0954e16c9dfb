"""The evaluation protocol: the same splits, training subsets and test sets for every method.

Splits (``kind``):

    iid          a fixed, seeded, stratified ``test_fraction`` of the texts is the test set, the rest the training pool
    ood_domain   train on every domain except ``test_domains``, test on those (meta ``domain``)
    ood_turns    train on single-turn texts, test on multi-turn ones (meta ``n_turns``)

Data efficiency: from a split's training pool, ``n_pos`` = 1, 2, 4, ... positives (and the whole pool last) are
drawn with negatives in the pool's proportion (at least one). Subsets are prefixes of one seeded permutation per
class, split and repeat, so they are nested, and every method is trained on exactly the same texts. Methods without
training (zero-shot, a persona latent) are scored once per split, on the same test set, with ``train_size`` 0.

Results table (CSV, one row per task, method, split, repeat and training size)::

    task, method, split, repeat, n_pos, train_size, auroc, ci_low, ci_high, n_test

``ci_low``/``ci_high``: percentile bootstrap over test texts. Figures are drawn from this table alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .features import Features
from .methods import UNTRAINED, Monitor

log = logging.getLogger(__name__)

SPLITS = ("iid", "ood_domain", "ood_turns")
COLUMNS = ["task", "method", "split", "repeat", "n_pos", "train_size", "auroc", "ci_low", "ci_high", "n_test"]


@dataclass(frozen=True)
class Split:
    kind: str
    train: np.ndarray  # indices into the dataset
    test: np.ndarray


def iid_split(labels: np.ndarray, test_fraction: float, seed: int) -> Split:
    """A stratified split: round(test_fraction * n_c) texts of each class c go to the test set."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"monitors.test_fraction: must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:round(test_fraction * len(idx))])
    test = np.sort(np.concatenate(test))
    return Split("iid", np.setdiff1d(np.arange(len(labels)), test), test)


def domain_split(domains: np.ndarray, test_domains: Sequence[str]) -> Split:
    present = set(domains.tolist())
    missing = sorted(set(test_domains) - present)
    if missing or not test_domains:
        raise ValueError(f"monitors.ood_test_domains: {missing or 'an empty list'} must name domains of the data "
                         f"(present: {sorted(map(str, present))})")
    is_test = np.isin(domains, list(test_domains))
    if is_test.all():
        raise ValueError("monitors.ood_test_domains: every text is in a test domain; none is left to train on")
    return Split("ood_domain", np.flatnonzero(~is_test), np.flatnonzero(is_test))


def turns_split(n_turns: np.ndarray) -> Split:
    single = n_turns.astype(int) == 1
    if single.all() or not single.any():
        raise ValueError("ood_turns needs both single-turn and multi-turn texts (meta n_turns)")
    return Split("ood_turns", np.flatnonzero(single), np.flatnonzero(~single))


def make_split(kind: str, feats: Features, *, test_fraction: float, seed: int,
               test_domains: Sequence[str] = ()) -> Split:
    if kind == "iid":
        return iid_split(feats.labels, test_fraction, seed)
    if kind == "ood_domain":
        return domain_split(feats.meta_column("domain"), test_domains)
    if kind == "ood_turns":
        return turns_split(feats.meta_column("n_turns"))
    raise ValueError(f"monitors.splits: unknown split {kind!r}; known: {list(SPLITS)}")


def train_sizes(n_pos: int) -> list[int]:
    """1, 2, 4, ... below the pool's positives, then all of them."""
    if n_pos < 1:
        raise ValueError("the training pool has no positive text")
    sizes = [1 << k for k in range(n_pos.bit_length()) if (1 << k) < n_pos]
    return sizes + [n_pos]


class Subsets:
    """Nested training subsets of one split's pool: prefixes of a seeded permutation of each class."""

    def __init__(self, train: np.ndarray, labels: np.ndarray, seed: int):
        rng = np.random.default_rng(seed)
        self.pos = rng.permutation(train[labels[train] == 1])
        self.neg = rng.permutation(train[labels[train] == 0])
        if not len(self.pos) or not len(self.neg):
            raise ValueError("a training pool needs positive and negative texts")

    def take(self, n_pos: int) -> np.ndarray:
        n_neg = max(1, round(n_pos * len(self.neg) / len(self.pos)))
        return np.sort(np.concatenate([self.pos[:n_pos], self.neg[:n_neg]]))


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half): the rank-sum (Mann-Whitney) form."""
    s = np.asarray(s, dtype=np.float64)
    return float(resampled_aurocs(np.asarray(y), s, np.arange(len(s))[None])[0])


def resampled_aurocs(y: np.ndarray, s: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """AUROC of every bootstrap resample ``picks [B, n]`` (indices into ``y`` and ``s``); NaN for a one-class one.

    No resample is ranked afresh (that took a third of a monitor job): the scores are sorted once, a resample
    becomes its items' counts in that order, and a positive's wins are the negatives below its score plus half
    of those tied with it, a cumulative sum over the runs of equal scores.
    """
    n, n_boot = len(y), len(picks)
    order = np.argsort(s, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    counts = np.bincount((rank[picks] + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n)
    sorted_s, is_pos = s[order], y[order] == 1
    groups = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])  # first item of each run of equal scores
    pos = np.add.reduceat(counts * is_pos, groups, axis=1)
    neg = np.add.reduceat(counts * ~is_pos, groups, axis=1)
    wins = (pos * (np.cumsum(neg, axis=1) - neg + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins / (pos.sum(1) * neg.sum(1))


def bootstrap_auroc(y: np.ndarray, s: np.ndarray, n_boot: int, ci: float, seed: int) -> tuple[float, float, float]:
    """AUROC with a percentile CI from resampling test texts (resamples with one class only are dropped)."""
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    value = auroc(y, s)
    picks = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    boot = resampled_aurocs(y, s, picks)
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return value, float("nan"), float("nan")
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return value, float(lo), float(hi)


def evaluate(feats: Features, task: str, monitors: Sequence[str], build: Callable[[str], Monitor | None],
             splits: Sequence[Split], *, n_repeats: int = 1, n_boot: int = 1000, ci: float = 0.95,
             seed: int = 0) -> pd.DataFrame:
    """Train and score every monitor on every split and training subset; one results row each.

    ``build(name)`` returns a fresh monitor (None: not applicable to this task, skipped).
    """
    rows = []
    for split in splits:
        y_test = feats.labels[split.test]
        if len(set(y_test.tolist())) < 2:
            raise ValueError(f"split {split.kind}: the test set holds one class only")

        def row(name, repeat, n_pos, train_idx, scores):
            a, lo, hi = bootstrap_auroc(y_test, scores, n_boot, ci, seed)
            return {"task": task, "method": name, "split": split.kind, "repeat": repeat, "n_pos": n_pos,
                    "train_size": len(train_idx), "auroc": a, "ci_low": lo, "ci_high": hi, "n_test": len(split.test)}

        for name in monitors:
            if name in UNTRAINED and (m := build(name)) is not None:
                rows.append(row(name, 0, 0, [], m.score(feats, split.test)))
        trained = [n for n in monitors if n not in UNTRAINED]
        for repeat in range(n_repeats):
            subsets = Subsets(split.train, feats.labels, seed=seed + 1000 * repeat + SPLITS.index(split.kind))
            for n_pos in train_sizes(len(subsets.pos)):
                idx = subsets.take(n_pos)
                for name in trained:
                    m = build(name)
                    if m is None:
                        continue
                    m.fit(feats, idx)
                    rows.append(row(name, repeat, n_pos, idx, m.score(feats, split.test)))
            log.info("monitors: %s split %s repeat %d done", task, split.kind, repeat)
    return pd.DataFrame.from_records(rows, columns=COLUMNS)


def write_results(df: pd.DataFrame, path: str | Path) -> None:
    """Write the table atomically (temp file + rename), so a killed job leaves no half table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False, float_format="%.4f")
    os.replace(tmp, path)


def read_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    frames = []
    for p in paths:
        df = pd.read_csv(p)
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{p}: not a monitors results table (missing columns {missing})")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean AUROC over repeats per task and method (rows) and split (columns), trained on the whole pool: the
    headline table."""
    full = df["n_pos"] == df.groupby(["task", "split"])["n_pos"].transform("max")
    picked = df[full | (df["train_size"] == 0)]
    return picked.groupby(["task", "method", "split"], sort=False)["auroc"].mean().unstack("split")


def plot_results(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """One figure per task: AUROC against training positives per method, one panel per split (from the table only).

    Lines are means over repeats with the mean bootstrap CI shaded; untrained methods are horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    methods = list(dict.fromkeys(df["method"]))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for task, tdf in df.groupby("task", sort=False):
        kinds = [k for k in SPLITS if k in set(tdf["split"])]
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.8), squeeze=False, sharey=True)
        for ax, kind in zip(axes[0], kinds):
            sdf = tdf[tdf["split"] == kind]
            xmax = max(int(sdf["n_pos"].max()), 1)
            for method in methods:
                mdf = sdf[sdf["method"] == method]
                if mdf.empty:
                    continue
                if (mdf["train_size"] == 0).all():
                    ax.axhline(mdf["auroc"].mean(), ls="--", color=colors[method], label=method)
                    continue
                g = mdf.groupby("n_pos")[["auroc", "ci_low", "ci_high"]].mean().reset_index()
                ax.plot(g["n_pos"], g["auroc"], marker="o", ms=3, color=colors[method], label=method)
                ax.fill_between(g["n_pos"], g["ci_low"], g["ci_high"], color=colors[method], alpha=0.12, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_xlim(1, xmax)
            ax.axhline(0.5, color="grey", lw=0.6)
            ax.set_title(f"{task}: {kind} (n_test={int(sdf['n_test'].iloc[0])})")
            ax.set_xlabel("training positives")
        axes[0][0].set_ylabel("AUROC")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"monitors_{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files
