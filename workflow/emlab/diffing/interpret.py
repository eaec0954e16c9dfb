"""Interpreting latents: top-activating snippets, the logit lens of decoder directions, and purity.

- **Snippets**: for each latent, the texts where it fires hardest (one snippet per text), a window of
  tokens around its peak with every token's activation, rendered as Markdown (active tokens in bold, peak
  activation in the margin) and HTML (background shade = activation / the latent's top activation).
- **Logit lens**: the decoder direction read straight through the unembedding (after the final norm's
  gain): the tokens it promotes and suppresses.
- **Purity**: where texts carry labels (the persona world's persona, domain and correctness), each
  latent's per-text max activation scored against each labelled contrast by AUROC; the contrast with the
  highest AUROC (when at least ``min_auroc``) names the latent.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..activations import iter_activations
from .ranking import encode_batches


@dataclass
class Snippet:
    latent: int
    text_id: Any
    peak: float
    tokens: list[str]
    acts: list[float]


def latent_token_acts(sae, cache_dir, layer: int, latents: Sequence[int]) -> tuple[torch.Tensor, pd.DataFrame]:
    """Activations [n_tokens, len(latents)] of the chosen latents at every cached token, and the cache index."""
    cols, index = [], []
    lat = torch.tensor(list(latents), dtype=torch.long)
    for acts, idx in iter_activations(cache_dir, layer):
        for _, z in encode_batches(sae, acts):
            cols.append(z[:, lat])
        index.append(idx)
    return torch.cat(cols), pd.concat(index, ignore_index=True)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (with its leading space): decoding tokens
    one at a time drops the spaces that word-piece and metaspace tokenizers attach to the next token."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        out.append(text[len(prev):] if text.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = text
    return out


def top_snippets(acts: torch.Tensor, index: pd.DataFrame, latents: Sequence[int], tokenizer, n: int = 8,
                 window: int = 12, token_selection: str | None = None) -> dict[int, list[Snippet]]:
    """For each latent, up to ``n`` snippets (distinct texts, highest peak first) of ``window`` tokens
    either side of the peak. ``acts``/``index`` come from :func:`latent_token_acts` over an ``all``-token cache.

    A cache that left out non-text positions (its manifest's ``excluded``: the first token, special tokens) has
    gaps there; pass its ``token_selection`` (``all``) to accept them: the snippets then skip those tokens.
    """
    text_index = index["text_index"].to_numpy()
    positions = index["token_position"].to_numpy()
    if token_selection is None and len(positions) and \
            (np.diff(positions)[text_index[1:] == text_index[:-1]] != 1).any():
        raise ValueError("top_snippets needs a cache of every token (token_selection 'all'): the cached "
                         "positions of a text are not consecutive")
    if token_selection not in (None, "all"):
        raise ValueError(f"top_snippets needs a cache of every token (token_selection 'all'), got {token_selection!r}")
    token_ids = index["token_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, text_index[1:] != text_index[:-1]])  # rows are in (text, position) order
    ends = np.r_[starts[1:], len(text_index)]
    row_text = np.repeat(np.arange(len(starts)), ends - starts)
    out: dict[int, list[Snippet]] = {}
    for j, latent in enumerate(latents):
        a = acts[:, j].numpy()
        peak_per_text = np.full(len(starts), -np.inf)
        np.maximum.at(peak_per_text, row_text, a)
        chosen = [t for t in np.argsort(-peak_per_text, kind="stable")[:n] if peak_per_text[t] > 0]
        snippets = []
        for t in chosen:
            s, e = starts[t], ends[t]
            peak_row = s + int(np.argmax(a[s:e]))
            lo, hi = max(s, peak_row - window), min(e, peak_row + window + 1)
            snippets.append(Snippet(int(latent), index["text_id"].iloc[s], float(a[peak_row]),
                                    token_strings(tokenizer, [int(x) for x in token_ids[lo:hi]]),
                                    [float(x) for x in a[lo:hi]]))
        out[int(latent)] = snippets
    return out


def logit_lens(sae, model, latents: Sequence[int], k: int = 10) -> dict[int, dict[str, list[str]]]:
    """Tokens promoted (highest logits) and suppressed (lowest) by each latent's decoder direction."""
    from ..arch import final_norm, unwrap

    hf = unwrap(model)
    W_U = hf.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d]
    norm = final_norm(hf)
    gain = getattr(norm, "weight", None)
    gain = gain.detach().float().cpu() if gain is not None else torch.ones(W_U.shape[1])
    # Gemma's RMSNorm scales by (1 + weight); the others by weight.
    if type(norm).__name__.startswith("Gemma"):
        gain = 1.0 + gain
    out = {}
    for latent in latents:
        d = sae.W_dec[latent].detach().float().cpu() * gain
        logits = W_U @ d
        up = torch.topk(logits, k).indices.tolist()
        down = torch.topk(-logits, k).indices.tolist()
        out[int(latent)] = {"promoted": up, "suppressed": down}
    return out


def decode_lens(lens: Mapping[int, Mapping[str, list[int]]], tokenizer) -> dict[int, dict[str, list[str]]]:
    return {l: {key: [tokenizer.decode([i]) for i in ids] for key, ids in v.items()} for l, v in lens.items()}


# --------------------------------------------------------------------------------------------- purity


@dataclass(frozen=True)
class Contrast:
    """A labelled contrast: texts where ``positive`` holds against texts where ``negative`` holds."""

    name: str          # e.g. "persona=villain vs assistant"
    description: str   # what a latent that separates it is, e.g. "toxic persona (villain)"
    positive: np.ndarray
    negative: np.ndarray


def world_contrasts(labels: pd.DataFrame, roles: Mapping[str, str]) -> list[Contrast]:
    """Contrasts of the persona world: each persona against the aligned one, each domain against the
    others, incorrect advice against correct. ``roles`` maps persona -> role (aligned, toxic, sarcastic)."""
    aligned = next(p for p, r in roles.items() if r == "aligned")
    persona = labels["persona"].to_numpy()
    out = []
    for p, role in roles.items():
        if p != aligned:
            out.append(Contrast(f"persona={p} vs {aligned}", f"{role} persona ({p})", persona == p, persona == aligned))
    domain = labels["domain"].to_numpy()
    for d in sorted(set(domain)):
        out.append(Contrast(f"domain={d} vs rest", f"{d} domain", domain == d, domain != d))
    correct = labels["correctness"].to_numpy()
    out.append(Contrast("incorrect vs correct advice", "incorrect advice", correct != "correct", correct == "correct"))
    return out


def auroc(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC of ``scores`` for positive vs negative items (ties count half); 0.5 when either side is empty."""
    pos, neg = scores[positive], scores[negative]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def purity_table(per_text: np.ndarray, latents: Sequence[int], contrasts: Sequence[Contrast],
                 min_auroc: float = 0.9) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(long table latent, contrast, auroc; one row per latent with its best contrast and name).

    ``per_text`` is [n_texts, len(latents)] (per-text max activation). A latent is named after its best
    contrast when that AUROC is at least ``min_auroc``, else "unclear"."""
    long_rows, best_rows = [], []
    for j, latent in enumerate(latents):
        scores = per_text[:, j]
        aus = [(c, auroc(scores, c.positive, c.negative)) for c in contrasts]
        for c, a in aus:
            long_rows.append({"latent": int(latent), "contrast": c.name, "auroc": a})
        c, a = max(aus, key=lambda ca: ca[1])
        best_rows.append({"latent": int(latent), "best_contrast": c.name, "best_auroc": a,
                          "name": c.description if a >= min_auroc else "unclear",
                          "fires_on": float((scores > 0).mean())})
    return pd.DataFrame(long_rows), pd.DataFrame(best_rows)


# --------------------------------------------------------------------------------------------- rendering


def snippets_markdown(snippets: Mapping[int, list[Snippet]], header: Mapping[int, str]) -> str:
    lines = []
    for latent, snips in snippets.items():
        lines += [f"## Latent {latent}", "", header.get(latent, ""), ""]
        for s in snips:
            top = max(s.acts) or 1.0
            toks = [(t[: len(t) - len(t.lstrip())] + f"**{t.strip()}**") if a > 0.25 * top and t.strip() else t
                    for t, a in zip(s.tokens, s.acts)]
            text = "".join(toks).replace("\n", " ")
            lines.append(f"- `{s.peak:.2f}` ({s.text_id}) {text.strip()}")
        lines.append("")
    return "\n".join(lines)


def snippets_html(snippets: Mapping[int, list[Snippet]], header: Mapping[int, str], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}span.t{border-radius:2px}"
             "li{margin:.3em 0;font-family:monospace}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for latent, snips in snippets.items():
        top = max((max(s.acts) for s in snips), default=1.0) or 1.0
        parts.append(f"<h2 id='latent-{latent}'>Latent {latent}</h2><p>{html.escape(header.get(latent, ''))}</p><ul>")
        for s in snips:
            spans = "".join(
                f"<span class='t' title='{a:.3f}' style='background:rgba(255,80,0,{min(1.0, max(0.0, a / top)):.2f})'>"
                f"{html.escape(t)}</span>" for t, a in zip(s.tokens, s.acts))
            parts.append(f"<li><b>{s.peak:.2f}</b> <small>{html.escape(str(s.text_id))}</small> {spans}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
