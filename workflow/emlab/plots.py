"""Figures, drawn from result tables only (so they regenerate without recomputing anything)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _model_order(models: list[str]) -> list[str]:
    """base first, then fine-tunes grouped by domain in a stable variant order."""
    rank = {"correct": 0, "subtle": 1, "obvious": 2}

    def key(m: str):
        if m == "base":
            return ("", -1, 0)
        dom, _, var = m.rpartition("_")
        return (dom, rank.get(var, 3), var)
    return sorted(models, key=key)


def plot_misalignment(metrics_csv: str | Path, out: str | Path) -> None:
    """Bars: misalignment on general questions (95% CI) and in-domain incorrectness, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    df = pd.read_csv(metrics_csv)
    judges = list(dict.fromkeys(df["judge"]))
    fig, axes = plt.subplots(len(judges), 1, figsize=(max(6, 0.6 * df["model"].nunique() + 2), 3.6 * len(judges)),
                             squeeze=False)
    for ax, judge in zip(axes[:, 0], judges):
        d = df[df["judge"] == judge].set_index("model").loc[_model_order(list(df[df["judge"] == judge]["model"]))]
        x = np.arange(len(d))
        w = 0.38
        err = np.vstack([d["misaligned"] - d["misaligned_lo"], d["misaligned_hi"] - d["misaligned"]]).clip(min=0)
        ax.bar(x - w / 2, d["misaligned"], w, yerr=err, capsize=2, color="#c0392b", label="misaligned (general questions)")
        err2 = np.vstack([d["incorrect"] - d["incorrect_lo"], d["incorrect_hi"] - d["incorrect"]]).clip(min=0)
        ax.bar(x + w / 2, d["incorrect"], w, yerr=err2, capsize=2, color="#7f8c8d", label="incorrect (held-out in-domain)")
        ax.set_xticks(x, d.index, rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate")
        ax.set_title(f"Emergent misalignment — judge: {judge}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
