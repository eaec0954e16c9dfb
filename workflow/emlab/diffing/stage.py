"""The model-diffing stages as the workflow calls them (one function per rule; the CLI is a thin wrapper).

Outputs (``results/``):

    activations/corpus/{train,heldout}/     base model, every token of corpus texts (see emlab.activations)
    activations/eval/<model>/               each model on its own sampled answers (diffing.token_selection)
    activations/train/<dataset>/{model,base}/  fine-tune and base model on the fine-tuning set's answers
    sae/                                    SAELens folder (cfg.json, sae_weights.safetensors) + metrics.json
    diffing/latent_means.parquet            model, source ("eval" | "train" | "train_base"), latent, mean
    diffing/changes.csv, changes_unsupervised.csv, ranking.csv, ranking_unsupervised.csv  (see .ranking)
    diffing/latents.csv                     per interpreted latent: ranks, name, best contrast, logit lens
    diffing/purity.csv                      latent, contrast, auroc
    diffing/latents.md, latents.html        top-activating snippets
    diffing/persona_latents.json            the named persona latents for steering and monitors
    prediction/shifts.csv, summary.csv, early.csv, early.md   persona latents' shifts against misalignment
                                            (see .prediction)
    flagging/scores.csv, summary.csv        each fine-tuning example's persona score as the base model reads it
                                            (see .flagging)
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from ..activations import cache_activations, read_manifest
from ..io import read_jsonl, write_json
from .records import sample_records, text_records

log = logging.getLogger(__name__)


def cache_texts(base: str, path: str, out: str, *, n: int | None, skip: int, layer: int, sae_cfg: Mapping[str, Any],
                exclude: Sequence[str] = (), device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Every text token of ``n`` texts of a JSONL (after ``skip``), read by the base model (``exclude``: the
    positions that are not text, model.exclude_tokens)."""
    from ..models import load_model

    model, tok = load_model(base, device=device)
    records = text_records(path, n=n, skip=skip)
    return cache_activations(model, tok, records, [layer], out, token_selection="all",
                             batch_size=sae_cfg["batch_size"], max_len=sae_cfg["max_len"], exclude=exclude,
                             meta={"model": "base", "source": str(path)}, progress=progress)


def cache_model(base: str, adapter: str | None, model_name: str, samples: str, dataset: str | None,
                out_eval: str, out_train: str | None, out_train_base: str | None, *, cfg: Mapping[str, Any],
                full_model: str | None = None, progress: bool = True) -> None:
    """One model's caches: on its own sampled answers and, for a fine-tune, on (a sample of) its
    fine-tuning set, read both by the fine-tune and by the base model (the unsupervised ranking).
    The model is ``base`` (+ the LoRA ``adapter``), or the fully fine-tuned folder ``full_model``."""
    from ..models import load_model

    d, layer, s = cfg["diffing"], cfg["model"]["layer"], cfg["sae"]
    kw = dict(batch_size=s["batch_size"], max_len=s["max_len"], exclude=cfg["model"]["exclude_tokens"],
              progress=progress)
    model, tok = load_model(full_model or base, adapter, device=cfg["device"])
    cache_activations(model, tok, sample_records(samples, d["eval_sets"]), [layer], out_eval,
                      token_selection=d["token_selection"], meta={"model": model_name, "texts": "samples"}, **kw)
    if dataset is None:
        return
    train = text_records(dataset, n=d["unsupervised_texts"], seed=cfg["seed"])
    cache_activations(model, tok, train, [layer], out_train, token_selection="response",
                      meta={"model": model_name, "texts": "finetuning"}, **kw)
    if adapter is not None and hasattr(model, "disable_adapter"):
        reference, as_base = model, model.disable_adapter()  # the base weights, without loading them again
    else:
        reference, as_base = load_model(base, device=cfg["device"])[0], nullcontext()
    with as_base:
        cache_activations(reference, tok, train, [layer], out_train_base, token_selection="response",
                          meta={"model": "base", "texts": f"finetuning:{model_name}"}, **kw)


def fit_sae(cfg: Mapping[str, Any], train_cache: str | None, heldout_cache: str, heldout_texts: str, base: str,
            out: str, *, heldout_skip: int = 0, progress: bool = True, checkpoint_dir: str | None = None,
            checkpoint_steps: int = 0, keep_checkpoint: bool = False) -> dict[str, Any]:
    """Fit the TopK SAE on the corpus cache (or load ``sae.pretrained``), save it in SAELens format and
    measure it on held-out texts: FVU, L0, dead fraction and CE loss recovered. A fitted SAE's training
    curve (one row per step: :data:`emlab.sae.train.LOG_COLUMNS`) goes to ``train_log.csv`` beside it."""
    from ..activations import iter_activations, load_activations
    from ..arch import residual_module
    from ..models import load_model, pick_device
    from ..sae import SAETrainConfig, ce_loss_recovered, reconstruction_metrics, resolve_pretrained, save_sae, train_sae

    s, layer = cfg["sae"], cfg["model"]["layer"]
    device = pick_device(cfg["device"])
    model, tok = load_model(base, device=cfg["device"])
    if s["pretrained"] is not None:
        sae = resolve_pretrained(s["pretrained"], device=device)
        source = {"pretrained": s["pretrained"]}
    else:
        tcfg = SAETrainConfig.from_dict({"seed": cfg["seed"], "device": cfg["device"], **s["train"]}, where="sae.train")
        acts, _ = load_activations(train_cache, layer)
        sae = train_sae(acts, tcfg, progress=progress, log_path=Path(out) / "train_log.csv",
                        checkpoint_dir=checkpoint_dir, checkpoint_steps=checkpoint_steps)
        source = {"fitted_on": str(train_cache), "n_tokens": len(acts), "train": s["train"]}
    sae.meta.update({"model_name": str(base), "hook_name": f"layer_{layer}", "hook_layer": layer})
    if sae.d_in != acts_dim(heldout_cache):
        raise ValueError(f"sae: the SAE reads d_in={sae.d_in} but layer {layer} of {base} has width {acts_dim(heldout_cache)}")
    held = [a for a, _ in iter_activations(heldout_cache, layer)]
    metrics = reconstruction_metrics(sae, held)
    # CE loss recovered on (at most 200 of) the held-out texts, batched as the model reads them
    from ..activations import encode_record, non_text_positions, pad_batch, read_manifest, special_token_ids

    recs = text_records(heldout_texts, n=min(200, cfg["diffing"]["heldout_texts"]), skip=heldout_skip)
    ids = [encode_record(tok, r, r["id"]).ids[: s["max_len"]] for r in recs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    exclude, special = cfg["model"]["exclude_tokens"], special_token_ids(tok)
    batches = []
    for i in range(0, len(ids), 32):
        chunk = ids[i:i + 32]
        input_ids, mask, _, _ = pad_batch(chunk, pad, "right")
        splice = mask.bool().clone()  # the SAE replaces the residual stream at text positions only
        for b, row in enumerate(chunk):
            for p in non_text_positions(row, special, exclude):
                splice[b, p] = False
        batches.append({"input_ids": input_ids, "attention_mask": mask, "splice_mask": splice})
    metrics.update(ce_loss_recovered(model, sae.to(device), batches, site=residual_module, layer=layer))
    manifest = read_manifest(heldout_cache)
    metrics["tokens"] = {"excluded": list(exclude), "n_excluded": manifest.get("excluded", {}).get("n_positions", 0),
                         "covered": "text positions of the held-out texts" + (f" (not: {', '.join(exclude)})"
                                                                                if exclude else "")}
    metrics.update({"k": sae.k, "d_sae": sae.d_sae, "d_in": sae.d_in, "layer": layer, **source})
    save_sae(sae.cpu(), out)
    write_json(Path(out) / "metrics.json", metrics)
    from ..checkpoints import finish

    finish(checkpoint_dir, keep_checkpoint)
    return metrics


def acts_dim(cache_dir: str) -> int:
    from ..activations import read_manifest

    return int(read_manifest(cache_dir)["d_model"])


def rank_latents(cfg: Mapping[str, Any], sae_dir: str, eval_caches: Mapping[str, str],
                 train_caches: Mapping[str, tuple[str, str]], out_dir: str) -> dict[str, pd.DataFrame]:
    """Latent means of every cache, per-fine-tune changes against the base, and group rankings
    (supervised-by-nothing on the eval answers; unsupervised on the fine-tuning data)."""
    from ..sae import load_sae
    from .ranking import changes_table, group_ranking, latent_means, resolve_group

    layer = cfg["model"]["layer"]
    sae = load_sae(sae_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    means = {m: latent_means(sae, d, layer) for m, d in eval_caches.items()}
    train_means = {m: latent_means(sae, ft, layer) for m, (ft, _) in train_caches.items()}
    train_base = {m: latent_means(sae, b, layer) for m, (_, b) in train_caches.items()}
    rows = [pd.DataFrame({"model": m, "source": src, "latent": range(len(v)), "mean": v.numpy()})
            for src, table in (("eval", means), ("train", train_means), ("train_base", train_base))
            for m, v in table.items()]
    pd.concat(rows, ignore_index=True).to_parquet(out / "latent_means.parquet", index=False)

    finetunes = [m for m in eval_caches if m != "base"]
    groups = {}
    for name, patterns in cfg["diffing"]["groups"].items():
        try:
            groups[name] = resolve_group(patterns, finetunes, f"diffing.groups.{name}")
        except ValueError as e:  # e.g. the default "obvious" group in a run without obvious fine-tunes
            log.warning("%s; the group is skipped", e)
    if not groups:
        raise ValueError(f"diffing.groups: no group matches any of the fine-tunes {finetunes}")
    changes = changes_table(means)
    ranking = group_ranking(changes, groups)
    changes.to_csv(out / "changes.csv", index=False)
    ranking.to_csv(out / "ranking.csv", index=False)
    result = {"changes": changes, "ranking": ranking}
    if train_caches:
        unsup = changes_table(train_means, reference=train_base)
        unsup_groups = {g: [m for m in members if m in train_means] for g, members in groups.items()}
        unsup_ranking = group_ranking(unsup, {g: ms for g, ms in unsup_groups.items() if ms})
        unsup.to_csv(out / "changes_unsupervised.csv", index=False)
        unsup_ranking.to_csv(out / "ranking_unsupervised.csv", index=False)
        result.update(changes_unsupervised=unsup, ranking_unsupervised=unsup_ranking)
    return result


def predict(cfg: Mapping[str, Any], sae_dir: str, eval_caches: Mapping[str, str],
            train_caches: Mapping[str, tuple[str, str]], persona_json: str, metrics_csv: str,
            out_dir: str) -> dict[str, pd.DataFrame]:
    """The prediction tables (emlab.diffing.prediction's doc) from the SAE, the activation caches, the named persona
    latents and a judge's metrics; written to ``out_dir`` and returned."""
    import json

    import numpy as np

    from ..sae import load_sae
    from .prediction import (SHIFT_COLUMNS, early_detection, early_sentences, eval_shift, model_kind, summarize,
                             train_shift)
    from .ranking import per_text_latents, resolve_group

    layer, seed = cfg["model"]["layer"], cfg["seed"]
    n_boot = cfg["metrics"]["bootstrap"]
    personas = json.loads(Path(persona_json).read_text())
    roles = {role: personas[role]["latent"] for role in ("toxic", "sarcastic") if role in personas}
    metrics = pd.read_csv(metrics_csv).set_index("model")
    if "base" not in metrics.index:
        raise ValueError(f"{metrics_csv}: no row for the base model, which the misalignment threshold needs")
    base_hi = float(metrics.loc["base", "misaligned_hi"])
    finetunes = [m for m in eval_caches if m != "base"]
    selection = {}
    for role, p in personas.items():
        if role in roles and p.get("group") in cfg["diffing"]["groups"]:
            try:
                selection[role] = set(resolve_group(cfg["diffing"]["groups"][p["group"]], finetunes, "diffing.groups"))
            except ValueError:
                selection[role] = set()

    sae = load_sae(sae_dir)
    cols = list(roles.values())

    def read(cache: str) -> tuple[np.ndarray, list[str]]:
        vals, ids = per_text_latents(sae, cache, layer, "mean")
        return vals[:, cols].double().numpy(), ids

    rows = []
    measured = finetunes if roles else []  # no named persona latent: no cache needs reading
    base_vals, base_ids = read(eval_caches["base"]) if measured else (None, [])
    for model in measured:
        if model not in metrics.index:
            raise ValueError(f"{metrics_csv}: no row for {model}, whose latent shift was measured")
        kind, fraction = model_kind(model)
        mis = metrics.loc[model]
        reads = {"eval": (eval_shift, read(eval_caches[model]), (base_vals, base_ids))}
        if model in train_caches:
            reads["train"] = (train_shift, read(train_caches[model][0]), read(train_caches[model][1]))
        for source, (shift_fn, (mv, mids), (bv, bids)) in reads.items():
            for j, (role, latent) in enumerate(roles.items()):
                shift, lo, hi, n = shift_fn(mv[:, j], mids, bv[:, j], bids, n_boot, seed)
                rows.append({"model": model, "kind": kind, "fraction": fraction, "role": role, "latent": latent,
                             "source": source, "shift": shift, "shift_lo": lo, "shift_hi": hi, "n": n,
                             "misaligned": float(mis["misaligned"]), "misaligned_lo": float(mis["misaligned_lo"]),
                             "misaligned_hi": float(mis["misaligned_hi"]), "base_misaligned_hi": base_hi,
                             "is_misaligned": bool(mis["misaligned"] > base_hi),
                             "persona_rate": float(mis[role]) if role in mis.index else float("nan"),
                             "is_persona_misaligned": bool(role in mis.index and mis[role] > base_hi),
                             "in_selection_group": model in selection.get(role, set())})
    shifts = pd.DataFrame(rows, columns=SHIFT_COLUMNS)
    summary = summarize(shifts, n_boot, seed)
    early = early_detection(shifts, base_hi, cfg["prediction"]["early_max_fraction"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shifts.to_csv(out / "shifts.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    early.to_csv(out / "early.csv", index=False, float_format="%.6g")
    if not roles:
        lines = [f"No persona latent was named ({persona_json} has no toxic or sarcastic role: the SAE's texts carry "
                 "no persona labels, or no latent passed diffing.name_min_auroc), so nothing was predicted."]
    else:
        lines = early_sentences(early) or [
            f"No mixture at or below {cfg['prediction']['early_max_fraction']:.0%} incorrect data in this run "
            "(datasets.mixtures.fractions), so early detection was not measured."]
    (out / "early.md").write_text("# Early detection\n\n" + "\n\n".join(lines) + "\n")
    return {"shifts": shifts, "summary": summary, "early": early}


def flag_examples(cfg: Mapping[str, Any], base: str, sae_dir: str, persona_json: str, datasets: Mapping[str, str],
                  out_dir: str, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Score every example of each fine-tuning set by the named persona latents, as the base model reads its answer
    (emlab.diffing.flagging's doc); the tables go to ``out_dir`` and are returned."""
    import json
    import tempfile

    from ..models import load_model
    from ..sae import load_sae
    from .flagging import SCORE_COLUMNS, rank_examples, summarize
    from .ranking import per_text_latents

    layer, s = cfg["model"]["layer"], cfg["sae"]
    personas = json.loads(Path(persona_json).read_text())
    roles = {role: personas[role]["latent"] for role in ("toxic", "sarcastic") if role in personas}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    if roles:  # no named persona latent: nothing to score with, and no model to load
        sae = load_sae(sae_dir)
        model, tok = load_model(base, device=cfg["device"])
        for name, path in datasets.items():
            records = text_records(path)
            labels = {r["id"]: (r.get("meta") or {}).get("correctness") for r in records}
            with tempfile.TemporaryDirectory(dir=out) as tmp:  # the cache is read once: not kept
                cache_activations(model, tok, records, [layer], tmp, token_selection="response",
                                  batch_size=s["batch_size"], max_len=s["max_len"],
                                  exclude=cfg["model"]["exclude_tokens"], meta={"model": "base", "texts": name},
                                  progress=progress)
                values, ids = per_text_latents(sae, tmp, layer, "mean")
            for role, latent in roles.items():
                frames.append(rank_examples(name, ids, [labels.get(i) for i in ids], role, latent,
                                            values[:, latent].double().numpy(), cfg["flagging"]["fraction"]))
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCORE_COLUMNS)
    summary = summarize(scores)
    scores.to_csv(out / "scores.csv", index=False, float_format="%.6g")
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    return {"scores": scores, "summary": summary}


def interpret_latents(cfg: Mapping[str, Any], sae_dir: str, heldout_cache: str, heldout_texts: str, base: str,
                      ranking_csv: str, out_dir: str, *, world_path: str | None) -> pd.DataFrame:
    """Top snippets, logit lens and (with a world) purity of the top-ranked latents of every group."""
    from ..models import load_model
    from ..sae import load_sae
    from .interpret import (decode_lens, latent_token_acts, logit_lens, purity_table, snippets_html,
                            snippets_markdown, top_snippets, world_contrasts)
    from .ranking import top_latents

    d, layer = cfg["diffing"], cfg["model"]["layer"]
    out = Path(out_dir)
    sae = load_sae(sae_dir)
    ranking = pd.read_csv(ranking_csv)
    ranks = []  # one row per (latent, group, direction) with rank <= top_n
    for (group, direction), sub in ranking.groupby(["group", "direction"], sort=False):
        for latent in top_latents(ranking, group, d["top_n"], direction):
            r = sub[sub["latent"] == latent].iloc[0]
            ranks.append({"latent": latent, "group": group, "direction": direction, "rank": int(r["rank"]),
                          "mean_change": float(r["mean_change"])})
    ranks = pd.DataFrame(ranks)
    latents = list(dict.fromkeys(ranks.sort_values("rank", kind="stable")["latent"].tolist()))

    model, tok = load_model(base, device="cpu")
    lens = decode_lens(logit_lens(sae, model, latents, d["logit_lens_k"]), tok)
    acts, index = latent_token_acts(sae, heldout_cache, layer, latents)
    # per-text max activation of each latent: [n_texts, len(latents)]
    n_texts = int(index["text_index"].max()) + 1
    ti = torch.from_numpy(index["text_index"].to_numpy().copy())
    per_text = torch.zeros(n_texts, len(latents)).scatter_reduce_(0, ti[:, None].expand_as(acts), acts, "amax").numpy()

    table = pd.DataFrame({"latent": latents})
    if world_path is not None:
        from ..world.spec import load_world

        world = load_world(world_path)
        roles = {p.name: p.role for p in world.personas.values()}
        recs = read_jsonl(heldout_texts)[:n_texts]
        labels = pd.DataFrame([r["meta"] for r in recs])
        long, best = purity_table(per_text, latents, world_contrasts(labels, roles), d["name_min_auroc"])
        long.to_csv(out / "purity.csv", index=False)
        table = table.merge(best, on="latent")
    else:
        table["name"] = "unlabelled"
    table["promoted"] = [" ".join(repr(t) for t in lens[l]["promoted"]) for l in latents]
    table["suppressed"] = [" ".join(repr(t) for t in lens[l]["suppressed"]) for l in latents]
    wide = ranks.pivot_table(index="latent", columns=["group", "direction"], values="rank", aggfunc="min")
    wide.columns = [f"rank_{g}_{dr}" for g, dr in wide.columns]
    table = table.merge(wide.reset_index(), on="latent", how="left")
    table.to_csv(out / "latents.csv", index=False)

    snippets = top_snippets(acts, index, latents, tok, d["n_snippets"], d["snippet_window"],
                            token_selection=read_manifest(heldout_cache)["token_selection"])
    header = {}
    for _, row in table.iterrows():
        where = ", ".join(f"{c.removeprefix('rank_')} #{int(row[c])}" for c in wide.columns if pd.notna(row.get(c)))
        what = f"{row['name']} (AUROC {row['best_auroc']:.2f} on {row['best_contrast']})" if "best_auroc" in row else row["name"]
        header[int(row["latent"])] = (f"{what}. Ranked: {where}. Promotes: {row['promoted']}. "
                                      f"Suppresses: {row['suppressed']}.")
    (out / "latents.md").write_text("# Top latents\n\n" + snippets_markdown(snippets, header), encoding="utf-8")
    (out / "latents.html").write_text(snippets_html(snippets, header, "emlab: top latents"), encoding="utf-8")
    write_json(out / "persona_latents.json", persona_latents(table, ranks))
    return table


def persona_latents(table: pd.DataFrame, ranks: pd.DataFrame) -> dict[str, Any]:
    """The latent that best stands for each group's change: with world labels, the highest-ranked latent of
    the group whose name is a persona (e.g. "toxic persona (villain)"); without, the group's top latent.
    Keyed by group, plus by persona role where one was named (``toxic``, ``sarcastic``): the role's latent is
    the one of the group where it ranks highest (ties: the larger change), whatever order the groups come in."""
    out: dict[str, Any] = {}
    inc = ranks[ranks["direction"] == "increase"].sort_values("rank", kind="stable")
    for group, sub in inc.groupby("group", sort=False):
        chosen = None
        for _, r in sub.iterrows():
            row = table[table["latent"] == r["latent"]].iloc[0]
            if "persona" in str(row["name"]):
                chosen = (r, row)
                break
        if chosen is None:
            r = sub.iloc[0]
            chosen = (r, table[table["latent"] == r["latent"]].iloc[0])
        r, row = chosen
        entry = {"latent": int(r["latent"]), "rank": int(r["rank"]), "mean_change": float(r["mean_change"]),
                 "name": str(row["name"])}
        if "best_auroc" in row:
            entry.update(best_contrast=str(row["best_contrast"]), auroc=float(row["best_auroc"]))
        out[group] = entry
        role = str(row["name"]).split(" persona")[0] if "persona" in str(row["name"]) else None
        if role and (role not in out or (entry["rank"], -entry["mean_change"]) <
                     (out[role]["rank"], -out[role]["mean_change"])):
            out[role] = {**entry, "group": group}
    return out
