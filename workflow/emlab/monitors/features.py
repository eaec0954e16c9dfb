"""Per-text features of one monitoring dataset, computed once and shared by every method, split and training size.

Feature arrays (rows in dataset order), stored in ``<out_dir>/features.safetensors``:

    raw_last                [n, d]      residual stream at model.layer, last text token (chat template applied)
    raw_mean                [n, d]      the same, mean over the text's tokens
    sae_max                 [n, d_sae]  each SAE latent max-pooled over the text's tokens (only with an SAE)
    prompted_suffix         [n, d]      residual stream at the last token of the monitoring prompt (the text, then the
                                        task's question; :func:`emlab.monitors.prompts.question_prompt`)
    prompted_prefix_suffix  [n, d]      the same with the task description before the text
    zero_shot               [n]         logit(Yes) - logit(No) where the answer to the suffix prompt starts

Pooling covers the text positions only (``exclude``, the config's model.exclude_tokens: the first position and the
special tokens by default): on many hub models the first token's residual stream has a huge norm unrelated to the
text, which would dominate a mean and a max.

Residual streams are cached per text set with :func:`emlab.activations.cache_activations` under
``<out_dir>/tokens/<set>`` (sharded and resumable: a killed job keeps its finished shards) and pooled from there;
the zero-shot scores have their own file. ``features.safetensors`` is stamped with a fingerprint of its inputs
(model, layer, SAE, texts, questions), so a rerun with the same inputs reads it and computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .prompts import NO, TEMPLATES, YES, question_prompt, shown_text

log = logging.getLogger(__name__)

FEATURES_FILE = "features.safetensors"
ZERO_SHOT_FILE = "zero_shot.safetensors"
FORMAT = "emlab-monitor-features/1"


@dataclass
class Features:
    """The feature arrays of one dataset, with its labels and per-text meta (rows in dataset order)."""

    ids: list
    labels: np.ndarray                 # int 0/1 [n]
    meta: list[dict[str, Any]]
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def meta_column(self, key: str) -> np.ndarray:
        return np.array([m.get(key) for m in self.meta], dtype=object)


def prompted_records(records: Sequence[dict[str, Any]], ask: str, describe: str | None) -> list[dict[str, Any]]:
    """Each text wrapped in the monitoring prompt, as a one-message chat (the generation prompt follows it)."""
    return [{"id": r["id"], "messages": [{"role": "user", "content": question_prompt(shown_text(r), ask, describe)}]}
            for r in records]


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """The first token of "Yes" and of "No" as an answer starts (right after the generation prompt)."""
    yes = tokenizer(YES, add_special_tokens=False)["input_ids"]
    no = tokenizer(NO, add_special_tokens=False)["input_ids"]
    if not yes or not no or yes[0] == no[0]:
        raise ValueError(f"the tokenizer cannot tell {YES!r} from {NO!r} by their first tokens ({yes}, {no})")
    return yes[0], no[0]


def zero_shot_scores(model, tokenizer, records: Sequence[dict[str, Any]], batch_size: int = 16,
                     max_len: int = 512, progress: bool = True) -> np.ndarray:
    """logit(Yes) - logit(No) at the answer position of each (already prompted) chat record."""
    import torch
    from tqdm import tqdm

    from ..activations import encode_prompt, pad_batch
    from ..arch import unwrap

    yes, no = answer_token_ids(tokenizer)
    hf = unwrap(model)
    device = next(hf.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [encode_prompt(tokenizer, r["messages"]) for r in records]
    long = sum(len(s) > max_len for s in seqs)
    if long:
        # keep the end: the question and the answer position; the start of the shown text is cut
        log.warning("zero-shot: %d of %d prompts are longer than monitors.max_len=%d tokens; their start is cut",
                    long, len(seqs), max_len)
        seqs = [s[-max_len:] for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = np.zeros(len(seqs), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", unit="batch",
                      disable=not progress or bool(os.environ.get("EMLAB_NO_PROGRESS"))):
        idx = order[start:start + batch_size]
        # left padding puts every prompt's last token in the last column
        ids, mask, pos, _ = pad_batch([seqs[i] for i in idx], pad_id, "left")
        with torch.no_grad():
            logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        logits_to_keep=1).logits[:, -1].float()
        out[idx] = (logits[:, yes] - logits[:, no]).cpu().numpy()
    return out


def _pool(token_dir: Path, layer: int, n_texts: int, sae=None, chunk: int = 4096):
    """(last, mean, sae max) per text from a token cache; ``sae`` None skips the SAE pooling."""
    import torch

    from ..activations import iter_activations, read_manifest

    d = read_manifest(token_dir)["d_model"]
    last = torch.zeros(n_texts, d)
    sums = torch.zeros(n_texts, d, dtype=torch.float64)
    counts = torch.zeros(n_texts, dtype=torch.float64)
    # TopK latents are >= 0, so 0 is the max-pool of a latent that never fires on a text
    smax = torch.zeros(n_texts, sae.d_sae) if sae is not None else None
    for acts, index in iter_activations(token_dir, layer):
        ti = torch.from_numpy(index["text_index"].to_numpy().copy())
        acts = acts.float()
        if not len(ti):
            continue
        # rows are ordered by (text, position): a text's last row is where the next text starts, minus one
        ends = torch.cat([(ti[1:] != ti[:-1]).nonzero().squeeze(1), torch.tensor([len(ti) - 1])])
        last[ti[ends]] = acts[ends]
        sums.index_add_(0, ti, acts.double())
        counts.index_add_(0, ti, torch.ones(len(ti), dtype=torch.float64))
        if sae is not None:
            with torch.no_grad():
                for s in range(0, len(ti), chunk):
                    vals, lat = sae.encode_sparse(acts[s:s + chunk].to(sae.W_enc.device))
                    flat = (ti[s:s + chunk, None] * sae.d_sae + lat.cpu()).reshape(-1)
                    smax.view(-1).scatter_reduce_(0, flat, vals.cpu().float().reshape(-1), "amax")
    if (counts == 0).any():
        raise ValueError(f"{token_dir}: {int((counts == 0).sum())} texts have no tokens left to pool")
    mean = (sums / counts[:, None]).float()
    return last.numpy(), mean.numpy(), (smax.numpy() if smax is not None else None)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _signature(path: str | os.PathLike | None) -> Any:
    """What identifies a model, adapter or SAE: its files' names, sizes and modification times (a rebuilt folder
    at the same path gets new ones; hashing the weights of a hub model would take longer than the features)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():  # a hub id
        return str(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [str(path), [(str(f.relative_to(p)) if f != p else f.name, f.stat().st_size, f.stat().st_mtime_ns)
                        for f in files]]


def _read_stamped(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - an unreadable file is recomputed
        return None


def _write_stamped(path: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    from safetensors.numpy import save_file
    from emlab.io import replace_as_new_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
              metadata={"fingerprint": fingerprint, "format": FORMAT})
    replace_as_new_file(tmp, path)


def compute_features(model_path: str | os.PathLike, records: Sequence[dict[str, Any]], out_dir: str | os.PathLike,
                     *, layer: int, ask: str, describe: str, sae_path: str | os.PathLike | None = None,
                     adapter: str | os.PathLike | None = None, batch_size: int = 16, max_len: int = 512,
                     shard_size: int = 1024, device: str = "auto", keep_tokens: bool = False,
                     exclude: Sequence[str] = ("first", "special"), progress: bool = True) -> Features:
    """Compute (or read back) the feature arrays of ``records`` (see the module docstring).

    ``ask`` is the task's Yes/No question and ``describe`` its description (prompted probes, zero-shot);
    ``keep_tokens`` keeps the per-token caches (they can be large for hub models: one vector per token).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError("no records to compute monitor features for")
    texts = hashlib.sha256(json.dumps([[r["id"], r.get("messages"), r.get("text")] for r in records]).encode())
    fingerprint = _fingerprint({"format": FORMAT, "model": _signature(model_path), "adapter": _signature(adapter),
                                "sae": _signature(sae_path), "layer": layer, "ask": ask, "describe": describe,
                                "max_len": max_len, "texts": texts.hexdigest(), "exclude": sorted(exclude)})
    labels = np.array([r["label"] for r in records], dtype=np.int64)
    meta = [r.get("meta", {}) for r in records]
    ids = [r["id"] for r in records]
    stored = _read_stamped(out_dir / FEATURES_FILE, fingerprint)
    if stored is not None:
        log.info("monitor features: reusing %s", out_dir / FEATURES_FILE)
        return Features(ids, labels, meta, stored)

    import torch

    from ..activations import cache_activations
    from ..arch import hidden_size
    from ..models import load_model

    model, tok = load_model(model_path, adapter, device=device, merge=True)
    sae = None
    if sae_path is not None:
        from ..sae import load_sae

        sae = load_sae(sae_path, device=next(model.parameters()).device, dtype=torch.float32)
        if sae.d_in != hidden_size(model):
            raise ValueError(f"{sae_path}: the SAE reads {sae.d_in}-dim activations, the model's residual stream "
                             f"is {hidden_size(model)}-dim")
    common = dict(batch_size=batch_size, max_len=max_len, shard_size=shard_size, progress=progress,
                  meta={"model": str(model_path), "adapter": str(adapter)}, dtype="float32")
    arrays: dict[str, np.ndarray] = {}

    raw_dir = out_dir / "tokens" / "raw"
    cache_activations(model, tok, records, [layer], raw_dir, token_selection="all", exclude=exclude, **common)
    arrays["raw_last"], arrays["raw_mean"], smax = _pool(raw_dir, layer, len(records), sae)
    if smax is not None:
        arrays["sae_max"] = smax

    prompted = {}
    for template in TEMPLATES:
        prompted[template] = prompted_records(records, ask, describe if template == "prefix_suffix" else None)
        tdir = out_dir / "tokens" / f"prompted_{template}"
        cache_activations(model, tok, prompted[template], [layer], tdir, token_selection="last", **common)
        arrays[f"prompted_{template}"] = _pool(tdir, layer, len(records))[0]

    zs_print = _fingerprint({"features": fingerprint, "zero_shot": True})
    zs = _read_stamped(out_dir / ZERO_SHOT_FILE, zs_print)
    if zs is None:
        zs = {"zero_shot": zero_shot_scores(model, tok, prompted["suffix"], batch_size, max_len, progress)}
        _write_stamped(out_dir / ZERO_SHOT_FILE, zs, zs_print)
    arrays["zero_shot"] = zs["zero_shot"]

    _write_stamped(out_dir / FEATURES_FILE, arrays, fingerprint)
    if not keep_tokens:
        shutil.rmtree(out_dir / "tokens", ignore_errors=True)
    return Features(ids, labels, meta, arrays)
