"""The steering stages as the workflow calls them (one function per rule; the CLI is a thin wrapper).

Outputs (``results/steering/``):

    directions.safetensors   candidate latents ``L<i>`` (SAE decoder rows), ``meandiff``, ``random<seed>``
    directions.json          {"candidates": [...], "meandiff": "meandiff", "random": [...], "group": ...}
    samples/<stage>/<target>.jsonl, grades/<judge>/<stage>/<target>.jsonl
                             stage: screen_add (base + each candidate at each grid strength),
                             screen_sub (each target fine-tune - each candidate at its subtracting strength:
                             steer.screen.subtract_alpha, else its chosen adding strength),
                             sweep (signed strengths of the kept latents, meandiff and the random control)
    screen.csv, screen.json  the screen table (see emlab.steer.analysis.screen_table); chosen (adding) and
                             subtracting strengths, kept list
    sweep.csv                misalignment and incoherence per (direction, alpha)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..io import read_jsonl, write_json
from .analysis import (choose_alphas, phase1_conditions, phase2_conditions, plot_sweep, rates_from_files,
                       screen_table, subtract_alphas, sweep_conditions, sweep_table)

# The screen and sweep tables run in the analysis env (no torch): this module imports emlab.steer.directions
# (torch) only in the functions that build or load directions.

log = logging.getLogger(__name__)


def thresholds(cfg: Mapping[str, Any]) -> dict[str, float]:
    m = cfg["metrics"]
    return {k: m[k] for k in ("aligned_below", "coherent_above", "severity_at_least")}


def _rates(cfg: Mapping[str, Any], grade_files: Sequence[str]) -> pd.DataFrame:
    m = cfg["metrics"]
    return rates_from_files(grade_files, thresholds(cfg), m["bootstrap"], m["ci"], cfg["seed"])


def build_directions(cfg: Mapping[str, Any], sae_dir: str, ranking_csv: str, caches: Sequence[str],
                     grade_files: Sequence[str], out: str, out_json: str, *, base: str | None = None,
                     questions: Sequence[str] = ()) -> dict[str, Any]:
    """Candidate latents (the top of the group's averaged ranking), the mean-difference direction
    (misaligned minus aligned answers of the base and the group's fine-tunes, as graded; without a judge,
    the likelihood probe's misaligned minus aligned reference answers read by the ``base`` model) and the
    random controls."""
    from ..diffing.ranking import top_latents
    from ..sae import load_sae
    from .directions import (DirectionError, mean_difference, orthogonal_to, random_direction, sae_latent,
                             save_directions)

    s = cfg["steer"]
    sae = load_sae(sae_dir)
    latents = top_latents(pd.read_csv(ranking_csv), s["screen"]["group"], s["screen"]["top_n"])
    dirs = [sae_latent(sae, l) for l in latents]
    try:
        if grade_files:
            meandiff = [mean_difference(caches, grade_files, cfg["model"]["layer"], thresholds(cfg))]
        else:
            meandiff = [_reference_mean_difference(cfg, base, questions)]
    except DirectionError as e:  # e.g. no coherent misaligned answer at all: there is nothing to average
        log.warning("no mean-difference direction: %s", e)
        meandiff = []
    # random controls of equal norm, orthogonal to every direction they are a control for
    randoms = [orthogonal_to(random_direction(sae.d_in, seed), dirs + meandiff) for seed in s["sweep"]["random_seeds"]]
    save_directions(out, dirs + meandiff + randoms)
    info = {"group": s["screen"]["group"], "candidates": [d.name for d in dirs], "latents": latents,
            "meandiff": meandiff[0].name if meandiff else None, "random": [d.name for d in randoms]}
    write_json(out_json, info)
    return info


def _reference_mean_difference(cfg: Mapping[str, Any], base: str, questions: Sequence[str]):
    from ..models import load_model
    from ..probe import reference_mean_difference, reference_rows, references_for

    refs, source = references_for(dict(cfg))
    qs = [q for path in questions for q in read_jsonl(path)]
    model, tok = load_model(base, device=cfg["device"])
    return reference_mean_difference(model, tok, reference_rows(qs, refs, source), cfg["model"]["layer"],
                                     exclude=cfg["model"]["exclude_tokens"])


def probe_directions(info: Mapping[str, Any]) -> list[str]:
    """What a probe sweep steers with: every candidate latent (no screen picks among them without a judge),
    the mean-difference direction and the random controls."""
    return list(info["candidates"]) + ([info["meandiff"]] if info["meandiff"] else []) + list(info["random"])


def probe_stage(cfg: Mapping[str, Any], target: str, base: str, adapter: str | None, directions: str,
                directions_json: str, questions: Sequence[str], out: str) -> dict[str, Any]:
    """The likelihood probe of one target under every (direction, strength) of the sweep: one row per reference,
    as emlab.probe writes them, plus ``direction`` and ``alpha`` (strength 0 once, direction ``none``)."""
    from ..io import write_jsonl
    from ..models import load_model
    from ..probe import reference_rows, references_for, steered_answer_logprobs
    from .intervene import residual_norm
    from .directions import load_directions
    from .generate import prompt_chat, steering_vector

    s, layer = cfg["steer"], cfg["model"]["layer"]
    info = json.loads(Path(directions_json).read_text(encoding="utf-8"))
    dirs = load_directions(directions)
    refs, source = references_for(dict(cfg))
    qs = [q for path in questions for q in read_jsonl(path)]
    rows = reference_rows(qs, refs, source)
    model, tok = load_model(base, adapter, device=cfg["device"], dtype=cfg["model"]["dtype"], merge=True)
    norm = residual_norm(model, tok, [prompt_chat(q["question"]) for q in qs], layer,
                         exclude=cfg["model"]["exclude_tokens"])
    alphas = [float(a) for a in s["sweep"]["alphas"] if float(a) != 0.0]
    conditions = [("none", 0.0)] + [(d, a) for d in probe_directions(info) for a in alphas]
    import torch

    vectors = [torch.zeros(dirs[probe_directions(info)[0]].d_model) if d == "none" else
               steering_vector(dirs[d], a, norm) for d, a in conditions]
    scores = steered_answer_logprobs(model, tok, [(r["question"], r["answer"]) for r in rows], layer, vectors,
                                     positions=s["positions"], batch_size=cfg["probe"]["batch_size"])
    out_rows = [{"model": target, "direction": d, "alpha": a, "norm": norm,
                 **{k: r[k] for k in ("question_id", "kind", "persona", "ref")}, "n_tokens": n, "logprob_mean": lp}
                for (d, a), per in zip(conditions, scores) for r, (n, lp) in zip(rows, per)]
    write_jsonl(out, out_rows)
    return {"rows": len(out_rows), "conditions": len(conditions), "norm": norm}


def write_probe_sweep(cfg: Mapping[str, Any], files: Sequence[str], out_csv: str, figure: str) -> pd.DataFrame:
    """Per target, direction and strength: the probe's margin and its shift from the unsteered target."""
    from ..probe import margins_table
    from .analysis import plot_probe_sweep

    m = cfg["metrics"]
    parts = []
    for f in files:
        rows = pd.DataFrame(read_jsonl(f))
        t = margins_table(rows, ["direction", "alpha"], {"direction": "none", "alpha": 0.0}, m["bootstrap"], cfg["seed"])
        t.insert(0, "target", rows["model"].iloc[0])
        parts.append(t)
    table = pd.concat(parts, ignore_index=True)
    table.to_csv(out_csv, index=False, float_format="%.4f")
    plot_probe_sweep(table, figure, title=f"Steering at layer {cfg['model']['layer']}: likelihood probe "
                                          "(misaligned minus aligned log-probability)")
    return table


def stage_conditions(cfg: Mapping[str, Any], stage: str, target: str, directions_json: str,
                     screen_add_grades: Sequence[str] = (), screen_json: str | None = None) -> list:
    s = cfg["steer"]
    info = json.loads(Path(directions_json).read_text(encoding="utf-8"))
    if stage == "screen_add":
        return phase1_conditions(info["candidates"], s["screen"]["alphas"], target)
    if stage == "screen_sub":
        chosen = choose_alphas(_rates(cfg, screen_add_grades), info["candidates"], s["screen"]["alphas"],
                               s["screen"]["max_incoherence"])
        return phase2_conditions(chosen, [target], s["screen"]["subtract_alpha"])
    if stage == "sweep":
        return sweep_conditions(sweep_directions(info, screen_json), sweep_alphas(cfg, screen_json), target)
    raise ValueError(f"unknown steering stage {stage!r}")


def sweep_alphas(cfg: Mapping[str, Any], screen_json: str | None) -> list[float]:
    """The configured sweep strengths plus +/- each swept latent's screen strengths (adding and subtracting),
    so that the controls are measured at the strengths the screen used."""
    alphas = {float(a) for a in cfg["steer"]["sweep"]["alphas"]}
    if screen_json:
        screen = json.loads(Path(screen_json).read_text(encoding="utf-8"))
        for name in screen["kept"][:MAX_SWEPT_LATENTS]:
            for a in (screen["chosen"].get(name), screen.get("subtract", {}).get(name)):
                if a is not None:
                    alphas |= {float(a), -float(a)}
    return sorted(alphas)


MAX_SWEPT_LATENTS = 2  # the best-ranked kept latents; sweeping every candidate would multiply the cost


def sweep_directions(info: Mapping[str, Any], screen_json: str | None) -> list[str]:
    """The best-ranked kept latents (or, when the screen kept none, its top candidates, so that the sweep
    still shows them), the mean-difference direction and the random controls."""
    kept = json.loads(Path(screen_json).read_text(encoding="utf-8"))["kept"] if screen_json else []
    meandiff = [info["meandiff"]] if info["meandiff"] else []
    return (kept or info["candidates"])[:MAX_SWEPT_LATENTS] + meandiff + list(info["random"])


def sample_stage(cfg: Mapping[str, Any], stage: str, target: str, base: str, adapter: str | None,
                 directions: str, directions_json: str, questions: Sequence[str], out: str, *,
                 screen_add_grades: Sequence[str] = (), screen_json: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    from .directions import load_directions
    from .generate import steer_samples

    s = cfg["steer"]
    conditions = stage_conditions(cfg, stage, target, directions_json, screen_add_grades, screen_json)
    qs = [q for path in questions for q in read_jsonl(path)]
    return steer_samples(base, adapter, target, conditions, load_directions(directions), qs, out,
                         layer=cfg["model"]["layer"], n_samples=s["n_samples"], temperature=s["temperature"],
                         max_new_tokens=s["max_new_tokens"] or cfg["sampling"]["max_new_tokens"],
                         batch_size=s["batch_size"], seed=cfg["seed"], positions=s["positions"],
                         device=cfg["device"], exclude=cfg["model"]["exclude_tokens"], progress=progress)


def write_screen(cfg: Mapping[str, Any], directions_json: str, add_grades: Sequence[str], sub_grades: Sequence[str],
                 targets: Sequence[str], out_csv: str, out_json: str) -> pd.DataFrame:
    s = cfg["steer"]["screen"]
    info = json.loads(Path(directions_json).read_text(encoding="utf-8"))
    add_rates = _rates(cfg, add_grades)
    chosen = choose_alphas(add_rates, info["candidates"], s["alphas"], s["max_incoherence"])
    rates = pd.concat([add_rates, _rates(cfg, sub_grades)], ignore_index=True)
    table = screen_table(rates, chosen, targets, add_margin=s["add_margin"], min_cut=s["min_cut"],
                         subtract_alpha=s["subtract_alpha"])
    table.insert(1, "rank", range(1, len(table) + 1))
    table.to_csv(out_csv, index=False)
    write_json(out_json, {"chosen": chosen, "subtract": subtract_alphas(chosen, s["subtract_alpha"]),
                          "kept": [str(x) for x in table.loc[table["kept"], "latent"]], "targets": list(targets)})
    return table


POOLED_RANDOM = "random"


def pooled_random_rows(rows: Sequence[dict[str, Any]], random_names: Sequence[str]) -> list[dict[str, Any]]:
    """The grade rows of every random control relabelled as one pooled direction ``random``: the expected
    effect of a random direction. One random direction is one draw; in a small residual stream a single draw
    can move a finely balanced fine-tune by a few points either way, so the control is judged on the pool."""
    from .conditions import Condition, parse_condition_id

    out = []
    for r in rows:
        c = parse_condition_id(str(r["model"]))
        if c.direction in random_names:
            out.append({**r, "model": Condition(c.target, POOLED_RANDOM, c.alpha).id})
    return out


def write_sweep(cfg: Mapping[str, Any], directions_json: str, screen_json: str, grades: Mapping[str, Sequence[str]],
                out_csv: str, figure: str) -> pd.DataFrame:
    """The sweep table of every swept target (``grades`` maps target -> its grade files) and its figure.
    Besides each random control, the table has the pooled control ``random`` (see :func:`pooled_random_rows`)."""
    from .analysis import condition_rates

    m = cfg["metrics"]
    info = json.loads(Path(directions_json).read_text(encoding="utf-8"))
    dirs = sweep_directions(info, screen_json)
    parts = []
    for target, files in grades.items():
        rows = [r for f in files for r in read_jsonl(f)]
        pooled = pooled_random_rows(rows, info["random"])
        rates = condition_rates(rows + pooled, thresholds(cfg), m["bootstrap"], m["ci"], cfg["seed"])
        t = sweep_table(rates, dirs + ([POOLED_RANDOM] if pooled else []), sweep_alphas(cfg, screen_json), target)
        t.insert(0, "target", target)
        parts.append(t)
    table = pd.concat(parts, ignore_index=True)
    table.to_csv(out_csv, index=False)
    shown = table[~table["direction"].isin(info["random"]) | (len(info["random"]) == 1)]
    plot_sweep(shown.assign(direction=shown["direction"] + " on " + shown["target"]), figure,
               title=f"Steering at layer {cfg['model']['layer']} (alpha in units of the mean residual norm)")
    return table
