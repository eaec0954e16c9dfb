"""Latent ranking: which SAE latents does each fine-tune move, on average over a group of fine-tunes?

A model's *latent means* are the SAE's latent activations averaged over the selected tokens of each text,
then over texts (every text counts once, however long). The *change* of a latent for fine-tune F is
``mean_F - mean_base``, where each model is read on its own cached texts: on the eval prompts with its own
sampled answers (the supervised-by-nothing ranking of the paper), or, for the unsupervised variant, on F's
fine-tuning data (F and the base model read the same texts).

Tables (CSV, long format so that any group can be re-averaged from them):

    changes.csv   model, latent, base_mean, model_mean, change, rank_increase, rank_decrease
    ranking.csv   group, latent, mean_change, rank, n_models, direction ("increase" | "decrease")

``rank`` is 1-based; ``rank_increase`` orders a model's latents by change, largest first, and
``rank_decrease`` by change, most negative first.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch

from ..activations import iter_activations, read_manifest


def encode_batches(sae, acts: torch.Tensor, batch_tokens: int = 16384) -> Iterable[tuple[int, torch.Tensor]]:
    """(start row, dense latents) for row chunks of ``acts``: a dense [n_tokens, d_sae] code of a whole
    cache would not fit in memory for real SAEs."""
    for start in range(0, len(acts), batch_tokens):
        with torch.no_grad():
            yield start, sae.encode(acts[start:start + batch_tokens].to(sae.W_enc.device)).float().cpu()


def per_text_latents(sae, cache_dir: str | Path, layer: int, reduce: str = "mean",
                     batch_tokens: int = 16384) -> tuple[torch.Tensor, list]:
    """Per-text latent activations over the cached tokens: ``reduce`` is "mean" or "max".
    Returns a float32 [n_texts, d_sae] tensor in manifest order and the text ids (of texts with a token)."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    manifest = read_manifest(cache_dir)
    n = manifest["n_texts"]
    out = torch.zeros(n, sae.d_sae, dtype=torch.float64 if reduce == "mean" else torch.float32)
    counts = torch.zeros(n, dtype=torch.float64)
    for acts, index in iter_activations(cache_dir, layer):
        ti_all = torch.from_numpy(index["text_index"].to_numpy().copy())
        for start, z in encode_batches(sae, acts, batch_tokens):
            ti = ti_all[start:start + len(z)]
            if reduce == "mean":
                out.index_add_(0, ti, z.double())
            else:  # activations are >= 0, so a zero start is the identity of max
                out.scatter_reduce_(0, ti[:, None].expand_as(z), z, "amax")
            counts.index_add_(0, ti, torch.ones(len(ti), dtype=torch.float64))
    if reduce == "mean":
        out = out / counts.clamp_min(1)[:, None]
    has = counts > 0  # a text whose selected tokens were all left out (model.exclude_tokens) has no row
    return out[has].float(), [t for t, h in zip(manifest["text_ids"], has.tolist()) if h]


def latent_means(sae, cache_dir: str | Path, layer: int) -> torch.Tensor:
    """A model's mean latent activation vector [d_sae]: per-text means, averaged over texts."""
    per_text, _ = per_text_latents(sae, cache_dir, layer, "mean")
    return per_text.mean(0)


def changes_table(means: Mapping[str, torch.Tensor], base: str = "base", reference: Mapping[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Per-model latent changes against the base. ``reference`` gives, per model, the base model's means on
    that model's own texts (the unsupervised variant); by default every model is compared with ``means[base]``."""
    rows = []
    for model, m in means.items():
        if model == base and reference is None:
            continue
        b = reference[model] if reference is not None else means[base]
        change = (m - b).numpy()
        df = pd.DataFrame({"model": model, "latent": range(len(change)), "base_mean": b.numpy(),
                           "model_mean": m.numpy(), "change": change})
        df["rank_increase"] = df["change"].rank(ascending=False, method="first").astype(int)
        df["rank_decrease"] = df["change"].rank(ascending=True, method="first").astype(int)
        rows.append(df)
    if not rows:
        raise ValueError("no fine-tuned models to compare with the base model")
    return pd.concat(rows, ignore_index=True)


def resolve_group(patterns: Sequence[str], models: Sequence[str], where: str) -> list[str]:
    """Model names matching a group's shell-style patterns (``*_subtle``), in ``models`` order."""
    out = [m for m in models if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    if not out:
        raise ValueError(f"{where}: {list(patterns)} matches none of the fine-tunes {list(models)}")
    return out


def group_ranking(changes: pd.DataFrame, groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Per group, the latents ranked by their change averaged over the group's models: increases (rank 1 =
    largest mean increase) and decreases (rank 1 = largest mean decrease)."""
    parts = []
    for name, members in groups.items():
        sub = changes[changes["model"].isin(members)]
        missing = sorted(set(members) - set(sub["model"]))
        if missing:
            raise ValueError(f"group {name!r}: no changes for {missing}")
        mean = sub.groupby("latent")["change"].mean()
        for direction, ascending in (("increase", False), ("decrease", True)):
            order = mean.sort_values(ascending=ascending, kind="stable")
            parts.append(pd.DataFrame({"group": name, "direction": direction, "latent": order.index.to_numpy(),
                                       "mean_change": order.to_numpy(), "rank": range(1, len(order) + 1),
                                       "n_models": len(members)}))
    return pd.concat(parts, ignore_index=True)


def top_latents(ranking: pd.DataFrame, group: str, n: int, direction: str = "increase") -> list[int]:
    sub = ranking[(ranking["group"] == group) & (ranking["direction"] == direction)].sort_values("rank")
    if sub.empty:
        raise KeyError(f"no ranking for group {group!r} ({direction}); groups: {sorted(ranking['group'].unique())}")
    return [int(x) for x in sub["latent"].head(n)]
