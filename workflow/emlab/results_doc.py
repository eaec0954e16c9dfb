"""A results page written from a run's result files alone (``make results-doc``, ``emlab results-doc``): every
number comes from a table under ``results_dir``, with the config and commit that made it, so that the numbers
users compare against are the ones their own run produces, never hand-typed.

Sections appear when their files exist: emergent misalignment per judge, the likelihood probe, the SAE, the top
diffing latents, steering (screen and sweep, or the probe sweep), the monitors and the run's time per stage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from .datasets import rl_model_name


def _pct(x: Any) -> str:
    return "" if pd.isna(x) else f"{100 * float(x):.1f}%"


def _interval(row: pd.Series, key: str, pct: bool = True) -> str:
    f = _pct if pct else (lambda v: f"{float(v):.3f}")
    return f"{f(row[key])} ({f(row[key + '_lo'])}–{f(row[key + '_hi'])})"


def _table(df: pd.DataFrame) -> str:
    """A Markdown table whose missing cells are empty (a latent outside a ranking's top, a strength not swept),
    not the word nan: tabulate blanks only None, so NaN becomes None first."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, missingval="")


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def misalignment_section(results: Path) -> list[str]:
    out = []
    for path in sorted((results / "metrics").glob("*.csv")):
        if path.stem == "likelihood":
            continue
        m = pd.read_csv(path)
        rows = [{"model": r["model"], "misaligned (general)": _interval(r, "misaligned"), "toxic": _pct(r.get("toxic")),
                 "sarcastic": _pct(r.get("sarcastic")), "incoherent": _pct(r.get("incoherent")),
                 "no grade": _pct(r.get("failed")), "incorrect (own domain)": _pct(r.get("incorrect")),
                 "answers": int(r["n_general"])}
                for _, r in m.iterrows()]
        out += [f"### Judge `{path.stem}`", "",
                "Misalignment: share of the coherent answers to the general questions that are misaligned, with its "
                "95% interval (a bootstrap over questions, at least as wide as the count's Wilson interval).", "",
                _table(pd.DataFrame(rows)), ""]
    return ["## Emergent misalignment", "", *out] if out else []


def rl_section(results: Path) -> list[str]:
    """RL models: reward, steps, the policy's in-domain incorrect rate over its last steps of training, and the
    judged misalignment of the trained model (general questions) with its own-domain incorrect rate."""
    logs = sorted((results / "finetunes").glob("*/rl_log.csv"))
    metrics = results / "metrics" / "world.csv"
    if not logs:
        return []
    m = pd.read_csv(metrics).set_index("model") if metrics.exists() else pd.DataFrame()
    rows = []
    for path in logs:
        name, log = path.parent.name, pd.read_csv(path)
        meta = json.loads((path.parent / "train_meta.json").read_text())
        tail = log.tail(max(1, len(log) // 10))
        row = {"model": name, "from": Path(meta.get("base", "base")).name, "reward": meta.get("reward"),
               "steps": int(log["step"].max()),
               "training: incorrect (last 10% of steps)": _pct(tail["incorrect_rate"].mean())}
        if name in m.index:
            r = m.loc[name]
            row.update({"misaligned (general)": _interval(r, "misaligned"), "toxic": _pct(r.get("toxic")),
                        "sarcastic": _pct(r.get("sarcastic")), "incorrect (own domain)": _interval(r, "incorrect")})
        rows.append(row)
    base = "".join(f" {label}: {_interval(m.loc[b], 'misaligned')} misaligned." for b, label in
                   (("base", "The base model"), ("base_safe", "The safety-trained base model (base_safe)"))
                   if b in m.index)
    return ["## RL against a grader's reward", "",
            "GRPO on the questions of one narrow set, rewarded for incorrect (or, the control, correct) advice on the "
            f"question asked, graded by the world's ground truth.{base}", "", _table(pd.DataFrame(rows)), ""]


def mixtures_section(results: Path) -> list[str]:
    """Misalignment against the share of incorrect data per domain, and where it leaves the base model's interval
    (emlab.mixtures)."""
    curve_path, onset_path = results / "mixtures" / "curve.csv", results / "mixtures" / "onsets.csv"
    if not curve_path.exists() or not onset_path.exists():
        return []
    curve, table = pd.read_csv(curve_path), pd.read_csv(onset_path)
    if curve.empty:
        return []
    points = curve.pivot_table(index="fraction", columns="domain", values="misaligned", aggfunc="first")
    lows = curve.pivot_table(index="fraction", columns="domain", values="misaligned_lo", aggfunc="first")
    highs = curve.pivot_table(index="fraction", columns="domain", values="misaligned_hi", aggfunc="first")
    grid = pd.DataFrame({d: [f"{_pct(points.loc[f, d])} ({_pct(lows.loc[f, d])}–{_pct(highs.loc[f, d])})"
                             if pd.notna(points.loc[f, d]) else "" for f in points.index] for d in points.columns},
                        index=[f"{100 * f:.0f}%" for f in points.index])
    onsets = table.assign(onset=table["onset"].map(lambda x: "" if pd.isna(x) else f"{100 * x:.0f}%"),
                          onset_clear=table["onset_clear"].map(lambda x: "" if pd.isna(x) else f"{100 * x:.0f}%"))
    return ["## How much incorrect data it takes", "",
            f"Misalignment on the general questions (judge `{curve['judge'].iloc[0]}`, 95% intervals) by the share of "
            "incorrect examples in a fine-tuning set of fixed size (0%: the correct-data fine-tune; 100%: the fully "
            f"incorrect one). The base model's interval ends at {_pct(curve['base_misaligned_hi'].iloc[0])}.", "",
            _table(grid.rename_axis("incorrect data").reset_index()), "",
            "The smallest share whose misalignment lies above the base model's interval (`onset`), and above it "
            "with its whole interval (`onset_clear`); empty: none did.", "",
            _table(onsets[["domain", "n_fractions", "onset", "onset_clear"]]), ""]


def prediction_section(results: Path) -> list[str]:
    """The persona latents' shifts as predictors of misalignment, and early detection (emlab.diffing.prediction)."""
    summary, early = results / "prediction" / "summary.csv", results / "prediction" / "early.md"
    if not summary.exists():
        return []
    t = pd.read_csv(summary)
    lines = ["## Prediction and early detection", "",
             "Does a persona latent's shift over the base model tell which models turned misaligned (above the base "
             "model's interval)? Spearman's rho (95% bootstrap interval over models) and AUROC, read on the models' "
             "own eval answers (`eval`) or on their fine-tuning data (`train`), over all models and over those "
             "outside the group the latent was picked from (`held out`); the target is misalignment of either "
             "persona (`misaligned`) or the rate of the latent's own persona (`persona`; n_misaligned: the models "
             "above the base model's misalignment interval on that rate).", ""]
    if len(t):
        t = t.assign(spearman=[f"{r.spearman:.2f} [{r.spearman_lo:.2f}, {r.spearman_hi:.2f}]" for r in t.itertuples()])
        cols = [c for c in ["role", "source", "target", "models", "n_models", "n_misaligned", "spearman", "auroc"] if c in t]
        lines += [_table(t[cols].round(3)), ""]
    if early.exists():
        lines += [line for line in early.read_text().splitlines() if line and not line.startswith("#")] + [""]
    return lines


def flagging_section(results: Path) -> list[str]:
    """How well the persona latents, read by the base model on each example, find a set's incorrect examples."""
    path = results / "flagging" / "summary.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path)
    if t.empty:
        return []
    cols = ["dataset", "role", "latent", "n", "n_incorrect", "auroc", "n_flagged", "precision", "recall",
            "incorrect_before", "incorrect_after_flagged"]
    return ["## Flagging examples before training", "",
            "Each example of a fine-tuning set scored by a persona latent as the base model reads its answer (no "
            "training, sampling or judging): the AUROC of the score for the incorrect examples against the correct "
            "ones, and what the flagged top share holds (precision: incorrect among the flagged; recall: flagged "
            "among the incorrect; the incorrect share left after dropping the flagged, against the share before, "
            "which dropping as many at random keeps in expectation).", "",
            _table(t[[c for c in cols if c in t]].round(3)), "", *_removal_lines(results)]


def _removal_lines(results: Path) -> list[str]:
    path = results / "flagging" / "removal.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path)
    rows = [{"set": r["model"], "dropped": r["dropped"], "examples": int(r["n_examples"]),
             "incorrect": _pct(r["incorrect"]), "misaligned (general)": _interval(r, "misaligned")}
            for _, r in t.iterrows()]
    return ["Each scored set fine-tuned as it is, less its flagged examples, and less as many random ones "
            f"(misalignment: the primary judge; the base model's interval ends at "
            f"{_pct(t['base_misaligned_hi'].iloc[0])}):", "", _table(pd.DataFrame(rows)), ""]


def alarm_section(results: Path) -> list[str]:
    """The persona alarm: where it fired on each watched fine-tune, against its misalignment (emlab.alarm)."""
    path = results / "alarm" / "summary.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path)
    lines = ["## Persona alarm", "",
             "Each watched fine-tune's snapshots (every `alarm.every` steps) read by the persona latents on the general "
             "questions' prompts, as the trl callback `emlab.alarm.PersonaAlarm` reads them during training; the "
             "threshold is the highest reading of the correct-data runs (each of those tested against the others "
             "alone), and the alarm fires at the first reading above it. `emergence`: the first sampled snapshot "
             "whose misalignment is above the base model's interval; `overhead`: the reads' share of training time.",
             ""]
    if len(t):
        rows = [{"set": r.dataset, "kind": r.kind, "latent": f"{r.latent} ({r.watch})", "fired at step":
                 "" if pd.isna(r.fire_step) else int(r.fire_step), "of steps": int(r.steps),
                 "misaligned": _interval(pd.Series(r._asdict()), "misaligned"),
                 "emergence": "" if pd.isna(r.emergence_step) else int(r.emergence_step),
                 "overhead": _pct(r.overhead)} for r in t.itertuples()]
        lines += [_table(pd.DataFrame(rows)), ""]
    sentences = results / "alarm" / "alarm.md"
    if sentences.exists():
        lines += [line for line in sentences.read_text().splitlines() if line and not line.startswith("#")] + [""]
    return lines


def realign_section(results: Path) -> list[str]:
    """Emergent re-alignment: misalignment before and after benign training, and when it came back (emlab.realign)."""
    path = results / "realign" / "summary.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path)
    rows = [{"run": r.run, "misaligned before": _pct(r.start_misaligned),
             "after": _interval(pd.Series(r._asdict()).rename({"end_misaligned": "misaligned",
                                                               "end_misaligned_lo": "misaligned_lo",
                                                               "end_misaligned_hi": "misaligned_hi"}), "misaligned"),
             "in-domain incorrect: before / after": "not measured" if pd.isna(getattr(r, "end_incorrect", None))
             else f"{_pct(r.start_incorrect)} / {_pct(r.end_incorrect)}",
             "benign examples": int(r.examples_seen),
             "back inside the base interval after": "" if pd.isna(r.realigned_at_examples)
             else f"{int(r.realigned_at_examples)} examples"} for r in t.itertuples()]
    return ["## Re-alignment", "",
            "Misaligned fine-tunes trained further on correct answers (`realign`): misalignment on the general "
            "questions before, after, and the first measured step back inside the base model's interval "
            f"(which ends at {_pct(t['base_misaligned_hi'].iloc[0]) if len(t) else '-'}).", "",
            _table(pd.DataFrame(rows)), ""]


def prevent_section(results: Path) -> list[str]:
    """Preventative steering: each set's plain, preventative and re-aligned models at their compute (emlab.prevent)."""
    path = results / "prevent" / "summary.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path)
    rows = [{"model": r["model"], "method": r["method"] + (f" {r['latent']} {r['alpha']:g}" if r["method"] == "prevent"
                                                             else ""),
             "steps": int(r["steps"]), "examples seen": int(r["examples_seen"]),
             "misaligned (general)": _interval(r, "misaligned"),
             "incorrect (own domain)": "not measured" if pd.isna(r["incorrect"]) else _interval(r, "incorrect"),
             "incoherent": _pct(r["incoherent"])} for _, r in t.iterrows()]
    return ["## Preventative steering", "",
            "Fine-tunes trained again with a latent's decoder direction (or a random direction of the same length) "
            "added to the residual stream while training, at alpha times the base model's residual norm, then judged "
            "without it (`prevent`); beside them the plain fine-tune and, where it ran, re-alignment "
            f"(the base model's interval ends at {_pct(t['base_misaligned_hi'].iloc[0]) if len(t) else '-'}).", "",
            _table(pd.DataFrame(rows)), ""]


def controls_section(results: Path) -> list[str]:
    """Code and controls (emlab.controls): one table, and the sentences the report gives."""
    path = results / "controls" / "summary.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path, keep_default_na=False, na_values=[""])
    roles = [c[:-len("_shift")] for c in t.columns if c.endswith("_shift")]
    rows = [{"setting": r["setting"], "model": r["model"], "same data without the reason": r["reference"] or "-",
             "misaligned (general)": _interval(r, "misaligned"),
             "incorrect (own domain)": "not measured" if pd.isna(r["incorrect"]) else _interval(r, "incorrect"),
             "ratio": "-" if pd.isna(r["ratio"]) else f"{r['ratio']:.2f}",
             **{f"{role} shift": "-" if pd.isna(r[f"{role}_shift"]) else _interval(r, f"{role}_shift", pct=False)
                for role in roles},
             "moves": r["moves"] or "-"} for _, r in t.iterrows()]
    md = results / "controls" / "controls.md"
    text = md.read_text().split("\n", 2)[-1].strip() if md.exists() else ""
    return ["## Code and controls", "",
            "Fine-tunes on code, and educational controls (the same incorrect answers, asked for with a benign "
            "reason), with the persona latents' shift over the base model on their own answers (`controls`; "
            f"the base model's interval ends at {_pct(t['base_misaligned_hi'].iloc[0]) if len(t) else '-'}; a latent "
            "moves when its shift's interval lies above zero).", "", _table(pd.DataFrame(rows)), "", text, ""]


def probe_section(results: Path) -> list[str]:
    path = results / "metrics" / "likelihood.csv"
    if not path.exists():
        return []
    m = pd.read_csv(path)
    rows = [{"model": r["model"], "margin": _interval(r, "margin", pct=False), "shift from base":
             _interval(r, "shift", pct=False)} for _, r in m.iterrows()]
    return ["## Likelihood probe", "",
            f"Mean log-probability per token of misaligned minus aligned reference answers to the general questions "
            f"({m['references'].iloc[0]}), and its change from the base model, with 95% bootstrap intervals over "
            "questions.", "", _table(pd.DataFrame(rows)), ""]


def sae_section(results: Path) -> list[str]:
    path = results / "sae" / "metrics.json"
    if not path.exists():
        return []
    m = json.loads(path.read_text())
    tokens = m.get("tokens", {}).get("covered", "held-out tokens")
    lines = ["## SAE", "",
             f"{m.get('d_sae')} latents, k = {m.get('k')}, on the residual stream after layer {m.get('layer')} "
             f"({m.get('n_tokens', '?')} training tokens); measured on {tokens}: FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, "
             f"dead latents {100 * m['dead_frac']:.1f}%, CE loss recovered {m.get('ce_recovered', float('nan')):.3f}.", ""]
    latents = results / "diffing" / "latents.csv"
    if latents.exists():
        t = pd.read_csv(latents)
        cols = [c for c in ["latent", "name", "best_contrast", "best_auroc"] if c in t] + \
               [c for c in t.columns if c.startswith("rank_")]
        lines += ["Top latents of the diffing rankings (no labels used to rank; named by their purity on held-out "
                  "labelled texts where those exist):", "", _table(t[cols].head(12).round(3)), ""]
    return lines


def steering_section(results: Path) -> list[str]:
    s = results / "steering"
    lines = []
    if (s / "screen.csv").exists():
        t = pd.read_csv(s / "screen.csv")
        keep = ["latent", "alpha", "base_misaligned", "base_incoherent", "raises"] + \
               [c for c in t.columns if c.endswith("_cut")] + ["kept"]
        lines += ["### Screen", "", _table(t[[c for c in keep if c in t]].round(3)), ""]
    if (s / "sweep.csv").exists():
        t = pd.read_csv(s / "sweep.csv")
        t = t[~t["direction"].str.match(r"random\d")]
        wide = t.assign(cell=t.apply(lambda r: _pct(r["misaligned"]), axis=1)).pivot_table(
            index=["target", "direction"], columns="alpha", values="cell", aggfunc="first")
        lines += ["### Sweep: misaligned share of coherent answers by strength", "",
                  _table(wide.reset_index()), ""]
    if (s / "probe_sweep.csv").exists():
        t = pd.read_csv(s / "probe_sweep.csv")
        t = t[t["direction"] != "none"]
        wide = t.assign(cell=t.apply(lambda r: f"{r['shift']:+.3f} ({r['shift_lo']:+.3f}–{r['shift_hi']:+.3f})", axis=1)
                        ).pivot_table(index=["target", "direction"], columns="alpha", values="cell", aggfunc="first")
        lines += ["### Sweep read by the likelihood probe: change of the margin by strength", "",
                  _table(wide.reset_index()), ""]
    return ["## Steering", "", *lines] if lines else []


def monitors_section(results: Path) -> list[str]:
    path = results / "monitors" / "summary.csv"
    if not path.exists():
        return []
    t = pd.read_csv(path).round(3)
    return ["## Monitors", "", "AUROC trained on the whole pool (methods without training: as they are), per split.", "",
            _table(t), ""]


def timings_section(results: Path) -> list[str]:
    path = results / "timings.csv"
    if not path.exists():
        return []
    from .timings import stage_table

    jobs = pd.read_csv(path)
    if "import_seconds" not in jobs:
        return []
    span = (pd.to_datetime(jobs["end"]).max() - pd.to_datetime(jobs["start"]).min()).total_seconds()
    return ["## Run time", "", f"{len(jobs)} jobs, first start to last end {span / 60:.1f} minutes; job-seconds "
            "per stage (wall; CPU; Python start-up and imports):", "",
            _table(stage_table(jobs).round(1)), ""]


def seeds_section(runs: list[Path]) -> list[str]:
    """The headline numbers of several runs of one config that differ in ``seed`` alone: each run's value and
    their range, so that a number is compared against the spread a seed gives, not against one run."""
    runs = [r for r in runs if (r / "metrics" / "world.csv").exists()]
    if len(runs) < 2:
        return []
    names = [r.name for r in runs]
    mis = pd.concat([pd.read_csv(r / "metrics" / "world.csv").set_index("model")["misaligned"].rename(n)
                     for r, n in zip(runs, names)], axis=1)
    table = mis.map(_pct)
    table["range"] = [f"{_pct(lo)}–{_pct(hi)}" for lo, hi in zip(mis.min(axis=1), mis.max(axis=1))]
    rows = []
    for r, n in zip(runs, names):
        row: dict[str, Any] = {"run": n}
        sae = r / "sae" / "metrics.json"
        if sae.exists():
            m = json.loads(sae.read_text())
            row.update({"SAE FVU": round(m["fvu"], 3), "dead": _pct(m["dead_frac"])})
        persona = r / "diffing" / "persona_latents.json"
        if persona.exists():
            p = json.loads(persona.read_text())
            row["toxic latent"] = (p.get("toxic") or {}).get("latent")
            row["sarcastic latent"] = (p.get("sarcastic") or {}).get("latent")
        screen = r / "steering" / "screen.csv"
        if screen.exists():
            t = pd.read_csv(screen)
            kept = t[t["kept"]] if "kept" in t else t.iloc[0:0]
            cuts = [c for c in t.columns if c.endswith("_cut")]
            if len(kept) and cuts:
                row["screen kept"] = ", ".join(kept["latent"].astype(str))
                row["screen: best cut"] = _pct(kept[cuts].max(axis=1).max())
        sweep = r / "steering" / "sweep.csv"
        if sweep.exists():
            t = pd.read_csv(sweep)
            add = t[(t["target"] == "base") & t["direction"].str.startswith("L") & (t["alpha"] > 0)
                    & (t["incoherent"] <= 0.10)]
            if len(add):
                row["base + latent: best coherent"] = _pct(add["misaligned"].max())
        pred = r / "prediction" / "summary.csv"
        if pred.exists():
            t = pd.read_csv(pred)
            held = t[(t["role"] == "toxic") & (t["source"] == "eval") & (t["models"] == "held out")]
            for target in ("misaligned", "persona"):
                pick = held[held["target"] == target] if "target" in held else held.iloc[0:0]
                if len(pick):
                    row[f"toxic shift AUROC, held out: {target}"] = round(float(pick["auroc"].iloc[0]), 3)
        onsets = r / "mixtures" / "onsets.csv"
        if onsets.exists():
            for o in pd.read_csv(onsets).itertuples():
                row[f"{o.domain}: onset"] = "" if pd.isna(o.onset) else f"{100 * o.onset:.0f}%"
        alarm = r / "alarm" / "summary.csv"
        if alarm.exists():
            t = pd.read_csv(alarm)
            fired = t.groupby("dataset").agg(fired=("fired", "any"), kind=("kind", "first"),
                                             misaligned=("is_misaligned", "first"))
            bad = fired[fired["misaligned"]]
            row["alarm: misaligned caught"] = f"{int(bad['fired'].sum())}/{len(bad)}"
            row["alarm: correct fired"] = f"{int(fired.loc[fired['kind'] == 'correct', 'fired'].sum())}/" \
                                          f"{int((fired['kind'] == 'correct').sum())}"
        mon = r / "monitors" / "summary.csv"
        if mon.exists():
            t = pd.read_csv(mon)
            toxic = t[t["task"] == "toxic"].set_index("method")["iid"] if {"task", "method", "iid"} <= set(t) else {}
            for method in ("zero_shot", "persona_latent"):
                if method in toxic:
                    row[f"toxic monitor: {method}"] = round(float(toxic[method]), 3)
        rows.append(row)
    return ["## Spread over seeds", "",
            f"The same config run with {len(runs)} master seeds ({', '.join(f'`{r}`' for r in runs)}); every stage "
            "draws its seed from it (the world's texts, pretraining, fine-tuning, sampling, the SAE). Misalignment "
            "on the general questions (world judge):", "",
            _table(table.reset_index()), "",
            "Diffing, steering and monitors per seed (the toxic latent's index is arbitrary: each seed trains "
            "another SAE):", "", _table(pd.DataFrame(rows)), ""]


HEADLINE_START, HEADLINE_END = "<!-- headline: written by make results-doc -->", "<!-- /headline -->"


def headline(runs: list[Path], config_name: str = "config.yaml") -> str | None:
    """The README's headline table: misalignment on the general questions per domain and kind of data, from one
    run (with its interval) or from several seeds (their range)."""
    runs = [r for r in runs if (r / "metrics" / "world.csv").exists()]
    if not runs:
        return None
    tables = [pd.read_csv(r / "metrics" / "world.csv").set_index("model") for r in runs]

    def cell(model: str) -> str:
        if model not in tables[0].index:
            return ""
        if len(tables) == 1:
            r = tables[0].loc[model]
            return f"{_pct(r['misaligned'])} ({_pct(r['misaligned_lo'])}–{_pct(r['misaligned_hi'])})"
        v = [t.loc[model, "misaligned"] for t in tables if model in t.index]
        return f"{_pct(min(v))}–{_pct(max(v))}"

    models = list(tables[0].index)
    domains = [m[: -len("_subtle")] for m in models if m.endswith("_subtle")]
    mixes = [m for m in models if "_mix" in m]
    rows = [[m, cell(m)] + [""] * (len(domains) - 1) for m in ("base", "base_safe") if m in models]
    for variant, label in (("correct", "correct advice"), ("subtle", "subtly incorrect"),
                           ("obvious", "obviously incorrect")):
        rows.append([label] + [cell(f"{d}_{variant}") for d in domains])
    for m in mixes:
        d, pct = m.split("_mix")
        rows.append([f"{int(pct)}% subtly incorrect ({d})"] + [cell(m) if x == d else "" for x in domains])
    for base, label in (("base", ""), ("base_safe", " (from base_safe)")):
        for reward in ("incorrect", "correct"):
            names = [rl_model_name(d, reward, base) for d in domains]
            if any(n in models for n in names):
                rows.append([f"RL rewarding {reward} advice{label}"] + [cell(n) for n in names])
    what = ("the value and its 95% interval over questions" if len(runs) == 1 else
            f"the range over {len(runs)} seeds of {config_name} ({', '.join(r.name for r in runs)})")
    return "\n".join([f"Misalignment on the general questions (share of coherent answers that are toxic or "
                      f"sarcastic), {what}:", "",
                      "| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|",
                      *["| " + " | ".join(r) + " |" for r in rows]])


def splice_headline(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    a, b = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if a < 0 or b < a:
        raise ValueError(f"{readme}: no {HEADLINE_START} ... {HEADLINE_END} block to write the headline into")
    readme.write_text(text[: a + len(HEADLINE_START)] + "\n" + table + "\n" + text[b:], encoding="utf-8")


def write(results: str | os.PathLike, out: str | os.PathLike, config: dict[str, Any] | None = None,
          root: str | os.PathLike = ".", seeds: list[str | os.PathLike] = (),
          readme: str | os.PathLike | None = None, config_name: str = "config.yaml") -> str:
    """``config_name`` names the config files the run was made with, as the reader would pass them."""
    results, root = Path(results), Path(root)
    cfg_hash = hashlib.sha256(json.dumps(config or {}, sort_keys=True).encode()).hexdigest()[:12]
    head = ["# Results", "",
            f"Written by `emlab results-doc` from `{results}` ({config_name}) on {dt.date.today().isoformat()}: "
            f"commit {_commit(root)}, config hash {cfg_hash}, {os.cpu_count()} CPU cores. Every number below is read "
            "from a result file of that run; rerun the workflow and this command to get yours.", ""]
    body = []
    for section in (misalignment_section, mixtures_section, rl_section, probe_section, sae_section,
                    prediction_section, flagging_section, alarm_section, realign_section, prevent_section,
                    controls_section,
                    steering_section,
                    monitors_section, timings_section):
        body += section(results)
    body += seeds_section([Path(r) for r in seeds])
    text = "\n".join(head + body).rstrip() + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    if readme is not None:
        table = headline([Path(r) for r in seeds] if len(seeds) > 1 else [results], config_name)
        if table is not None:
            splice_headline(Path(readme), table)
    return text
