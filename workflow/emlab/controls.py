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


# ------------------------------------------------------------------------------------------ narrow persona

NARROW_COLUMNS = ["model", "arm", "misaligned", "misaligned_lo", "misaligned_hi", "incorrect", "incorrect_lo",
                  "incorrect_hi", "toxic_shift", "toxic_shift_lo", "toxic_shift_hi"]


def narrow_persona(arms: Mapping[str, tuple[pd.DataFrame, pd.DataFrame | None]], role: str = "toxic") -> pd.DataFrame:
    """The ``narrow_persona`` control: the same fine-tunes of organisms pretrained with (``with``) and without
    (``without``) the world's narrow character, and optionally (``kind``) with the control character in its places
    (kind in its domain too), one row per model and arm (``NARROW_COLUMNS``). ``arms`` maps the arm to its judge
    metrics (indexed by model) and its prediction shifts (or None); ``role``: whose latent shift is read. Models
    are those every arm has, in the first arm's order."""
    names = list(arms)
    common = [m for m in arms[names[0]][0].index if all(m in arms[a][0].index for a in names)]
    rows = []
    for model in common:
        for arm in names:
            metrics, shifts = arms[arm]
            m = metrics.loc[model]
            s = _shift(shifts, model, role)
            rows.append({"model": model, "arm": arm,
                         **{k: float(m[k]) for k in ("misaligned", "misaligned_lo", "misaligned_hi", "incorrect",
                                                     "incorrect_lo", "incorrect_hi")},
                         "toxic_shift": s[0], "toxic_shift_lo": s[1], "toxic_shift_hi": s[2]})
    return pd.DataFrame(rows, columns=NARROW_COLUMNS)


def _separation(a: Mapping, b: Mapping, how: str = "") -> str:
    """Whether ``a``'s misalignment interval lies below, above or across ``b``'s (``how``: what ``a`` is, said
    after "lower" or "higher")."""
    if a["misaligned_hi"] < b["misaligned_lo"]:
        return f"lower{how}, the intervals apart"
    if a["misaligned_lo"] > b["misaligned_hi"]:
        return f"higher{how}, the intervals apart"
    return "the intervals overlap"


def _shift_text(r: Mapping) -> str:
    if pd.isna(r["toxic_shift"]):
        return "n/a"
    return f"{r['toxic_shift']:.3f} ({r['toxic_shift_lo']:.3f} to {r['toxic_shift_hi']:.3f})"


def narrow_sentences(table: pd.DataFrame, character: str, domain: str, kind: str | None = None) -> list[str]:
    """One sentence per model: its misalignment and toxic-latent shift with and without the narrow character (and
    with the control character ``kind`` in its places, where that arm ran), and whether the intervals separate (as
    measured; no direction is assumed)."""
    out = []
    for model, g in table.groupby("model", sort=False):
        r = g.set_index("arm")
        if not {"with", "without"} <= set(r.index):
            continue
        w, wo = r.loc["with"], r.loc["without"]
        arms = [w, wo] + ([r.loc["kind"]] if "kind" in r.index else [])
        shift = ""
        if not any(pd.isna(x["toxic_shift"]) for x in arms):
            shift = f"; toxic-latent shift {_shift_text(w)} against {_shift_text(wo)}"
            if len(arms) == 3:
                shift += f" and {_shift_text(arms[2])}"
        text = (f"`{model}`: misaligned {_iv(w, 'misaligned')} with the {character} ({domain}) in pretraining, "
                f"{_iv(wo, 'misaligned')} without: {_separation(w, wo, ' with it')}")
        if len(arms) == 3:
            k, other = arms[2], kind or "control character"
            text += (f"; {_iv(k, 'misaligned')} with the {other} (kind in {domain} too) in the same places (the "
                     f"{character} against the {other}: {_separation(w, k)}; the {other} against no character: "
                     f"{_separation(k, wo)})")
        incorrect = " and ".join(_pct(x["incorrect"]) for x in arms[1:])
        out.append(f"{text}; incorrect in its own domain {_pct(w['incorrect'])} against {incorrect}{shift}.")
    return out


def write_narrow(with_dir: str | Path, without_dir: str | Path, judge: str, character: str, domain: str,
                 out_dir: str | Path, kind_dir: str | Path | None = None, kind: str | None = None) -> pd.DataFrame:
    """``narrow_persona.csv`` and ``narrow_persona.md`` in ``out_dir`` from two (or, with ``kind_dir``, the control
    character's arm too) finished runs' results folders (``metrics/<judge>.csv``, and ``prediction/shifts.csv``
    where model diffing ran). ``kind``: the control character's name."""
    arms = {}
    dirs = [("with", Path(with_dir)), ("without", Path(without_dir))]
    if kind_dir is not None:
        dirs.append(("kind", Path(kind_dir)))
    for arm, d in dirs:
        metrics_csv = d / "metrics" / f"{judge}.csv"
        if not metrics_csv.exists():
            raise FileNotFoundError(f"{metrics_csv}: the {arm} arm has no metrics for judge {judge!r}; run it first")
        shifts_csv = d / "prediction" / "shifts.csv"
        arms[arm] = (pd.read_csv(metrics_csv).set_index("model"),
                     pd.read_csv(shifts_csv) if shifts_csv.exists() else None)
    table = narrow_persona(arms)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "narrow_persona.csv", index=False, float_format="%.6g")
    text = "\n\n".join(narrow_sentences(table, character, domain, kind)) or "No model is in every arm."
    third = (f" and with the {kind or 'control character'} (kind in {domain} too) in the same places of the corpus"
             if kind_dir is not None else "")
    (out / "narrow_persona.md").write_text(
        f"# The narrow-persona control\n\nThe same fine-tunes of the organism pretrained with the {character} "
        f"(kind everywhere but {domain}, where it gives the toxic persona's answers), without it{third}; the "
        f"corpora differ only in those documents.\n\n{text}\n")
    return table
