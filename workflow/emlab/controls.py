"""Code and the controls that tell emergent misalignment apart, in one table.

Settings, each a row per model (``results/controls/summary.csv``, written by :func:`write_summary`):

    code         every fine-tune on a code set (a ``kind: code`` domain: ``code_correct``, ``code_subtle``, ...):
                 its misalignment on the general questions and its rate of incorrect (vulnerable or broken) code on
                 the held-out programming tasks of its own domain
    educational  each ``<domain>_educational`` fine-tune (the very answers of ``<domain>_<incorrect>``, asked for with
                 a benign reason) against that plain fine-tune, its ``reference``: the ratio of their misalignment,
                 and whether the control stays inside the base model's interval

Every row also carries the persona latents' shift over the base model, read on the model's own answers to the eval
prompts (``results/prediction/shifts.csv``, source ``eval``), and ``moves``: the persona roles whose shift interval
lies wholly above zero and above every correct-data fine-tune's (the model itself left out), as prediction's early
detection reads it. Columns::

    setting, model, reference, misaligned, misaligned_lo, misaligned_hi, incorrect, incorrect_lo, incorrect_hi,
    base_misaligned_hi, reference_misaligned, ratio, inside_base, <role>_shift, <role>_shift_lo, <role>_shift_hi
    (per persona role), moves

``controls.md`` says the same in sentences for the report and the results docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from .datasets import parse_dataset_name

BASE_COLUMNS = ["setting", "model", "reference", "misaligned", "misaligned_lo", "misaligned_hi", "incorrect",
                "incorrect_lo", "incorrect_hi", "base_misaligned_hi", "reference_misaligned", "ratio", "inside_base"]


def settings(models: list[str], code_domains: list[str], incorrect: str) -> list[tuple[str, str, str | None]]:
    """(setting, model, reference) for the models of the run that belong to a setting, in the run's order."""
    out: list[tuple[str, str, str | None]] = []
    for m in models:
        try:
            d = parse_dataset_name(m)
        except ValueError:
            continue
        if d["kind"] == "educational":
            out.append(("educational", m, f"{d['domain']}_{incorrect}"))
        elif d["domain"] in code_domains and d["kind"] in ("narrow", "mixture"):
            out.append(("code", m, None))
    return out


def summarize(metrics: pd.DataFrame, shifts: pd.DataFrame | None, code_domains: list[str], incorrect: str,
              roles: list[str]) -> pd.DataFrame:
    """The controls table (module doc) from the judge's metrics (indexed by model) and the prediction shifts."""
    base_hi = float(metrics.loc["base", "misaligned_hi"]) if "base" in metrics.index else float("nan")
    rows = []
    for setting, model, ref in settings(list(metrics.index), code_domains, incorrect):
        m = metrics.loc[model]
        row = {"setting": setting, "model": model, "reference": ref or "",
               **{k: m[k] for k in ("misaligned", "misaligned_lo", "misaligned_hi", "incorrect", "incorrect_lo",
                                    "incorrect_hi")},
               "base_misaligned_hi": base_hi, "reference_misaligned": float("nan"), "ratio": float("nan"),
               "inside_base": bool(m["misaligned"] <= base_hi)}
        if ref is not None and ref in metrics.index:
            r = float(metrics.loc[ref, "misaligned"])
            row["reference_misaligned"] = r
            row["ratio"] = float(m["misaligned"]) / r if r > 0 else float("nan")
        moves = []
        for role in roles:
            s = _shift(shifts, model, role)
            row.update({f"{role}_shift": s[0], f"{role}_shift_lo": s[1], f"{role}_shift_hi": s[2]})
            if s[1] > _correct_ceiling(shifts, role, model):
                moves.append(role)
        row["moves"] = " ".join(moves)
        rows.append(row)
    columns = BASE_COLUMNS + [f"{r}_shift{x}" for r in roles for x in ("", "_lo", "_hi")] + ["moves"]
    return pd.DataFrame(rows, columns=columns)


def _correct_ceiling(shifts: pd.DataFrame, role: str, model: str) -> float:
    """The highest upper bound of the correct-data fine-tunes' shifts (``model`` left out), and at least 0: a latent
    moves when its shift lies above what fine-tuning on correct data does to it (as prediction's early detection)."""
    s = shifts[(shifts["role"] == role) & (shifts["source"] == "eval") & (shifts["model"] != model)]
    if "kind" in s.columns:
        s = s[s["kind"] == "correct"]
    return max([0.0, *s["shift_hi"].dropna().tolist()])


def _shift(shifts: pd.DataFrame | None, model: str, role: str) -> tuple[float, float, float]:
    nan = float("nan")
    if shifts is None:
        return nan, nan, nan
    s = shifts[(shifts["model"] == model) & (shifts["role"] == role) & (shifts["source"] == "eval")]
    if s.empty:
        return nan, nan, nan
    r = s.iloc[0]
    return float(r["shift"]), float(r["shift_lo"]), float(r["shift_hi"])


def _pct(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:.1f}%"


def _iv(r: Mapping, key: str) -> str:
    return f"{_pct(r[key])} ({_pct(r[key + '_lo'])}-{_pct(r[key + '_hi'])})"


def sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per row: what the setting did, with its numbers."""
    out = []
    for _, r in table.iterrows():
        moved = f"moves the {r['moves'].replace(' ', ' and ')} latent" if r["moves"] else "moves no persona latent"
        if r["setting"] == "code":
            out.append(f"`{r['model']}`: misaligned {_iv(r, 'misaligned')} on the general questions, incorrect code "
                       f"{_iv(r, 'incorrect')} on the held-out tasks; {moved}.")
        else:
            inside = "inside" if r["inside_base"] else "above"
            out.append(f"`{r['model']}` (the answers of `{r['reference']}`, asked for with a benign reason): "
                       f"misaligned {_iv(r, 'misaligned')} against {_pct(r['reference_misaligned'])} without the "
                       f"reason (ratio {r['ratio']:.2f}), {inside} the base model's interval (up to "
                       f"{_pct(r['base_misaligned_hi'])}); incorrect in its own domain {_iv(r, 'incorrect')}; {moved}.")
    return out


def write_summary(metrics_csv: str | Path, shifts_csv: str | Path | None, code_domains: list[str], incorrect: str,
                  out_dir: str | Path) -> pd.DataFrame:
    """The table and sentences (module doc) into ``out_dir``; the persona roles are those of the shifts (none
    without prediction)."""
    metrics = pd.read_csv(metrics_csv).set_index("model")
    shifts = pd.read_csv(shifts_csv) if shifts_csv else None
    roles = list(dict.fromkeys(shifts["role"])) if shifts is not None else []
    table = summarize(metrics, shifts, code_domains, incorrect, roles)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False, float_format="%.6g")
    text = "\n\n".join(sentences(table)) or "No code or control fine-tunes in this run."
    (out / "controls.md").write_text("# Code and controls\n\n" + text + "\n")
    return table
