"""How much bad data it takes: misalignment against the share of incorrect examples, per domain.

Every domain with mixture fine-tunes (``datasets.mixtures``) gets one curve from a judge's metrics table: the
correct-data fine-tune at 0%, each mixture at its fraction, and the fully incorrect fine-tune of the mixtures'
variant (``datasets.mixtures.incorrect``, subtle by default) at 100%, where those fine-tunes exist. The onset is
the smallest fraction whose misalignment leaves the base model's interval: ``onset`` when the rate is above the
interval's upper end (the criterion the prediction tables use to call a model misaligned), ``onset_clear`` when
the rate's own interval lies above it as well.

Outputs (``results/mixtures/``, written by :func:`write_mixtures`):

    curve.csv     judge, domain, fraction, model, misaligned, misaligned_lo, misaligned_hi, base_misaligned_hi,
                  above_base, clearly_above_base
    onsets.csv    judge, domain, n_fractions, onset, onset_clear  (empty cells: no fraction left the interval)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .datasets import parse_dataset_name

CURVE_COLUMNS = ["judge", "domain", "fraction", "model", "misaligned", "misaligned_lo", "misaligned_hi",
                 "base_misaligned_hi", "above_base", "clearly_above_base"]
ONSET_COLUMNS = ["judge", "domain", "n_fractions", "onset", "onset_clear"]


def curve_points(metrics: pd.DataFrame, incorrect: str = "subtle") -> pd.DataFrame:
    """One row per (domain, fraction) for the domains that have at least one mixture in ``metrics`` (one judge)."""
    rates = metrics.set_index("model")
    if "base" not in rates.index:
        raise ValueError("the metrics table has no row for the base model, whose interval the onset needs")
    base_hi = float(rates.loc["base", "misaligned_hi"])
    points: dict[str, dict[float, str]] = {}
    for model in rates.index:
        try:
            d = parse_dataset_name(model)
        except ValueError:  # base models, RL models
            continue
        if d["kind"] == "mixture":
            points.setdefault(d["domain"], {})[d["fraction"]] = model
    for domain, by_fraction in points.items():
        for fraction, name in ((0.0, f"{domain}_correct"), (1.0, f"{domain}_{incorrect}")):
            if name in rates.index:
                by_fraction.setdefault(fraction, name)
    rows = []
    for domain in sorted(points):
        for fraction, model in sorted(points[domain].items()):
            r = rates.loc[model]
            rows.append({"judge": r.get("judge", ""), "domain": domain, "fraction": fraction, "model": model,
                         "misaligned": float(r["misaligned"]), "misaligned_lo": float(r["misaligned_lo"]),
                         "misaligned_hi": float(r["misaligned_hi"]), "base_misaligned_hi": base_hi,
                         "above_base": bool(r["misaligned"] > base_hi),
                         "clearly_above_base": bool(r["misaligned_lo"] > base_hi)})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def onsets(curve: pd.DataFrame) -> pd.DataFrame:
    """Per domain, the smallest fraction above the base model's interval (point; whole interval)."""
    rows = []
    for (judge, domain), g in curve.groupby(["judge", "domain"], sort=False):
        first = g[g["above_base"]]["fraction"]
        clear = g[g["clearly_above_base"]]["fraction"]
        rows.append({"judge": judge, "domain": domain, "n_fractions": len(g),
                     "onset": float(first.min()) if len(first) else None,
                     "onset_clear": float(clear.min()) if len(clear) else None})
    return pd.DataFrame(rows, columns=ONSET_COLUMNS)


def write_mixtures(metrics_csv: str | Path, out_dir: str | Path, incorrect: str = "subtle") -> dict[str, pd.DataFrame]:
    curve = curve_points(pd.read_csv(metrics_csv), incorrect)
    table = onsets(curve)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curve.to_csv(out / "curve.csv", index=False, float_format="%.4f")
    table.to_csv(out / "onsets.csv", index=False, float_format="%.4g")
    return {"curve": curve, "onsets": table}
