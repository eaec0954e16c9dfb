"""Caching residual-stream activations to sharded safetensors, read through nnsight.

Input records (dicts) carry an ``id`` and one of three bodies:

- ``messages``: a chat, rendered with the tokenizer's chat template. When the last message
  is the assistant's, its tokens (as the template renders them after the generation prompt,
  end-of-turn marker included) are the *response*; otherwise the whole chat plus the
  generation prompt is the prompt.
- ``prompt`` + ``response``: already-formatted strings, tokenized separately (the prompt with
  the tokenizer's special tokens, the response without) and joined, which is exactly how a
  sampled answer follows its prompt.
- ``text``: plain text; all of it counts as prompt.

Token selections (:data:`TOKEN_SELECTIONS`): ``response`` (response tokens only), ``prompt``
(prompt tokens only), ``last`` (the last prompt token: the position that predicts the
response) and ``all``.

Positions that are not text (``exclude``, :data:`EXCLUDE`; the config's ``model.exclude_tokens``):
``first``, the first position, where most pretrained models park an attention sink whose residual
norm is a hundred times the others' (it would hold nearly all of an SAE's variance), and
``special``, the tokenizer's special tokens (BOS, the chat template's role and end-of-turn markers).
They are left out of ``all``, ``prompt`` and ``response`` selections; a ``last`` selection keeps its
one position, the one that predicts the answer, whatever token it is. The manifest records the rule
and how many positions it left out.

On disk, ``out_dir`` holds ``shard-00000.safetensors``, ... and ``manifest.json``. Shard k
covers texts ``[k * shard_size, (k + 1) * shard_size)`` of the input order and holds, one row
per selected token ordered by (text, position):

    layer_{L}       float [n_tokens, d_model]   residual stream after block L (see emlab.arch)
    text_index      int64 [n_tokens]            index into manifest["text_ids"]
    token_position  int64 [n_tokens]            0-based position in the text's token sequence
    token_id        int64 [n_tokens]

A shard is written atomically and stamped with a fingerprint of everything that determines
its contents (model, layers, selection, the shard's token ids), so a rerun after a crash
keeps the finished shards and computes only the missing ones. The manifest is written last:
its presence means the cache is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .arch import as_nnsight, hidden_size, layer_hidden, layer_index, num_layers, residual_module, unwrap
from .io import RecordError, write_json
from .models import pick_dtype

log = logging.getLogger(__name__)

TOKEN_SELECTIONS = ("response", "prompt", "last", "all")
EXCLUDE = ("first", "special")
FORMAT = "emlab-activations/1"
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# Tokenization: records -> token ids with the prompt/response boundary


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    prompt_len: int  # the first prompt_len ids are the prompt, the rest the response


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a generation prompt: a chat (list of messages, rendered with the chat template
    and its generation prompt) or an already-formatted string."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return _chat_ids(tokenizer, prompt, add_generation_prompt=True)


def _chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(enc["input_ids"])


def encode_record(tokenizer, rec: dict[str, Any], where: str) -> Encoded:
    """Token ids and prompt length of one record; ``where`` names it in errors."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise RecordError(f"{where}: 'messages' must be a non-empty list of message objects")
        if msgs[-1].get("role") != "assistant":
            ids = _chat_ids(tokenizer, msgs, add_generation_prompt=True)
            return Encoded(ids, len(ids))
        prompt = _chat_ids(tokenizer, msgs[:-1], add_generation_prompt=True)
        full = _chat_ids(tokenizer, msgs, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise RecordError(f"{where}: the chat template does not render the conversation without its last "
                              "assistant turn (plus generation prompt) as a prefix of the whole conversation, so "
                              "the response tokens cannot be located")
        return Encoded(full, len(prompt))
    if "prompt" in rec or "response" in rec:
        prompt, response = rec.get("prompt"), rec.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise RecordError(f"{where}: 'prompt' and 'response' must both be strings")
        p = list(tokenizer(prompt)["input_ids"])
        r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        return Encoded(p + r, len(p))
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise RecordError(f"{where}: 'text' must be a string")
        ids = list(tokenizer(rec["text"])["input_ids"])
        return Encoded(ids, len(ids))
    raise RecordError(f"{where}: needs 'messages', 'prompt' and 'response', or 'text'")


def select_positions(enc: Encoded, selection: str) -> list[int]:
    """Positions (into ``enc.ids``) picked by a token selection."""
    if selection == "all":
        return list(range(len(enc.ids)))
    if selection == "prompt":
        return list(range(enc.prompt_len))
    if selection == "last":
        return [enc.prompt_len - 1] if enc.prompt_len > 0 else []
    if selection == "response":
        return list(range(enc.prompt_len, len(enc.ids)))
    raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {selection!r}")


@dataclass(frozen=True)
class Item:
    """One text ready for a forward: its (truncated) ids and selected positions."""

    index: int
    ids: list[int]
    positions: list[int]


def special_token_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: the named ones (BOS, EOS, pad, ...) and every added token flagged special.
    A tokenizer read from a GGUF file (Gemma 3's) lists its chat markers (``<start_of_turn>``) only among the
    latter, so ``all_special_ids`` alone would leave them in the text."""
    return set(tokenizer.all_special_ids) | {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                                             if getattr(t, "special", False)}


def non_text_positions(ids: Sequence[int], special_ids: set[int], exclude: Sequence[str]) -> set[int]:
    """The positions of ``ids`` that an ``exclude`` rule leaves out (see the module doc)."""
    out = {0} if "first" in exclude and ids else set()
    if "special" in exclude:
        out |= {p for p, t in enumerate(ids) if t in special_ids}
    return out


def check_exclude(exclude: Sequence[str]) -> list[str]:
    bad = sorted(set(exclude) - set(EXCLUDE))
    if bad:
        raise ValueError(f"exclude: unknown rule(s) {bad}; known: {list(EXCLUDE)}")
    return sorted(set(exclude))


def prepare_items(tokenizer, records: Sequence[dict[str, Any]], token_selection: str, max_len: int,
                  exclude: Sequence[str] = ()) -> tuple[list[Item], int]:
    """The records ready for forwards, and how many selected positions ``exclude`` left out. A text whose
    every selected position is left out (an empty answer: only its end-of-turn token) is skipped."""
    if token_selection not in TOKEN_SELECTIONS:
        raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
    exclude = check_exclude(exclude) if token_selection != "last" else []
    special = special_token_ids(tokenizer)
    items, seen, truncated, n_excluded, emptied = [], {}, 0, 0, 0
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = f"record #{i} (id={rid!r})"
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise RecordError(f"{where}: every record needs an 'id' (string or integer)")
        if rid in seen:
            raise RecordError(f"{where}: duplicate id, first used by record #{seen[rid]}")
        seen[rid] = i
        enc = encode_record(tokenizer, rec, where)
        if len(enc.ids) > max_len:
            truncated += 1
            if token_selection == "last" and enc.prompt_len > max_len:
                # The last prompt token is the point of a "last" selection (e.g. a task prompt wrapped around a
                # long text): keep the end of the prompt rather than its start.
                cut = enc.prompt_len - max_len
                enc = Encoded(enc.ids[cut:enc.prompt_len], max_len)
        # otherwise truncation keeps the start: the prompt, then as much response as fits
        positions = [p for p in select_positions(enc, token_selection) if p < max_len]
        if not positions:
            raise RecordError(f"{where}: no tokens left for token_selection={token_selection!r} "
                              f"(text of {len(enc.ids)} tokens, prompt {enc.prompt_len}, max_len {max_len})")
        if exclude:
            drop = non_text_positions(enc.ids, special, exclude)
            kept = [p for p in positions if p not in drop]
            n_excluded += len(positions) - len(kept)
            positions = kept
            if not positions:
                emptied += 1
                continue
        items.append(Item(i, enc.ids[:max_len], positions))
    if truncated:
        log.warning("%d of %d texts were longer than max_len=%d tokens and were truncated",
                    truncated, len(items), max_len)
    if emptied:
        log.warning("%d texts hold no selected position but non-text ones (%s) and are skipped", emptied,
                    ", ".join(exclude))
    return items, n_excluded


# ---------------------------------------------------------------------------------------------
# Batching and the nnsight forward


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str):
    """Pad token sequences to one [B, T] batch. Returns (input_ids, attention_mask, position_ids,
    offsets) where ``offsets[b]`` is the column of row b's first real token.

    Position ids are passed explicitly so that a left-padded row sees the same positions as it
    would alone (absolute-position models such as GPT-2 would otherwise read the pads as positions).
    """
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        start = width - len(s) if side == "left" else 0
        ids[b, start:start + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, start:start + len(s)] = 1
        offsets.append(start)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids, offsets


def length_sorted_batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Batches of similar length (longest first, so an out-of-memory error shows up at once)."""
    order = sorted(items, key=lambda it: -len(it.ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def read_residuals(nn_model, input_ids, attention_mask, position_ids, layers: Sequence[int], rows, cols) -> list:
    """One nnsight forward; returns, per layer, the residual stream at the (row, col) pairs
    as a [len(rows), d] tensor. The forward stops after the last requested block."""
    import torch

    device = next(unwrap(nn_model).parameters()).device
    rows, cols = rows.to(device), cols.to(device)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    order = sorted(range(len(layers)), key=lambda i: layers[i])  # nnsight reads blocks in execution order
    got = {}
    with torch.no_grad(), nn_model.trace(batch) as tracer:
        for i in order:
            hidden = layer_hidden(residual_module(nn_model, layers[i]).output)
            got[i] = hidden[rows, cols].save()
        tracer.stop()  # nothing after the deepest block is needed (that includes the unembedding)
    return [got[i] for i in range(len(layers))]


# ---------------------------------------------------------------------------------------------
# Caching


def _fingerprint(common: dict[str, Any], items: Sequence[Item]) -> str:
    h = hashlib.sha256(json.dumps(common, sort_keys=True, default=str).encode())
    for it in items:
        h.update(json.dumps([it.index, it.ids, it.positions]).encode())
    return h.hexdigest()


def _shard_fingerprint_on_disk(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:  # noqa: BLE001 - an unreadable shard is simply recomputed
        return None


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_activations(model, tokenizer, records: Sequence[dict[str, Any]], layers: Sequence[int],
                      out_dir: str | os.PathLike, token_selection: str = "response", batch_size: int = 16,
                      max_len: int = 512, shard_size: int = 1024, meta: dict[str, Any] | None = None, *,
                      padding_side: str | None = None, dtype: str | None = None, exclude: Sequence[str] = (),
                      progress: bool = True) -> dict[str, Any]:
    """Cache the residual stream after each of ``layers`` at the selected tokens of every record.

    ``model`` may be plain, peft-wrapped or nnsight-wrapped. ``padding_side`` defaults to the
    tokenizer's; ``dtype`` ("float32", "bfloat16", ...) to the model's. ``meta`` is stored in the
    manifest and is part of each shard's fingerprint (put the emlab model name / adapter there).
    Returns the manifest.
    """
    from tqdm import tqdm

    if batch_size < 1 or shard_size < 1 or max_len < 1:
        raise ValueError(f"batch_size, shard_size and max_len must be positive "
                         f"(got {batch_size}, {shard_size}, {max_len})")
    if not records:
        raise ValueError("no records to cache activations for")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # present only once every shard is complete

    hf = unwrap(model)
    layers = sorted({layer_index(model, L) for L in layers})
    if not layers:
        raise ValueError("no layers requested")
    side = padding_side or tokenizer.padding_side or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    param = next(hf.parameters())
    try:
        out_dtype = param.dtype if dtype is None else pick_dtype(dtype, str(param.device))
    except KeyError:
        raise ValueError(f"dtype must be null (the model's), 'auto', 'float32', 'bfloat16' or 'float16'; "
                         f"got {dtype!r}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")

    items, n_excluded = prepare_items(tokenizer, records, token_selection, max_len, exclude)
    if not items:
        raise ValueError(f"no text has a selected position left (token_selection={token_selection!r}, "
                         f"exclude={list(exclude)})")
    excluded = sorted(set(exclude)) if token_selection != "last" else []
    common = {"format": FORMAT, "model": hf.config._name_or_path, "model_type": hf.config.model_type,
              "n_params": sum(p.numel() for p in hf.parameters()), "layers": layers,
              "token_selection": token_selection, "max_len": max_len, "dtype": _dtype_name(out_dtype),
              "meta": meta or {}, **({"exclude": excluded} if excluded else {})}
    shards = [items[k:k + shard_size] for k in range(0, len(items), shard_size)]
    prints = [_fingerprint(common, shard) for shard in shards]

    # stale shard files from a run over more records would otherwise sit next to the new cache
    for path in out_dir.iterdir():
        m = _SHARD_RE.match(path.name)
        if m and int(m.group(1)) >= len(shards):
            path.unlink()

    todo = [k for k, fp in enumerate(prints) if _shard_fingerprint_on_disk(out_dir / shard_name(k)) != fp]
    if len(todo) < len(shards):
        log.info("activations: %d of %d shards already cached in %s", len(shards) - len(todo), len(shards), out_dir)
    nn_model = as_nnsight(model, tokenizer) if todo else None
    n_batches = sum(-(-len(shards[k]) // batch_size) for k in todo)
    bar = tqdm(total=n_batches, desc="activations", unit="batch",
               disable=not progress or bool(os.environ.get("EMLAB_NO_PROGRESS")))
    for k in todo:
        _write_shard(nn_model, shards[k], layers, side, pad_id, batch_size, out_dtype,
                     out_dir / shard_name(k), prints[k], bar)
    bar.close()

    shard_entries, n_tokens = [], 0
    for k, shard in enumerate(shards):
        n = sum(len(it.positions) for it in shard)
        shard_entries.append({"file": shard_name(k), "text_start": shard[0].index, "text_end": shard[-1].index + 1,
                              "n_tokens": n})
        n_tokens += n
    manifest = {
        "format": FORMAT,
        "model": hf.config._name_or_path,
        "model_type": hf.config.model_type,
        "num_layers": num_layers(hf),
        "layers": layers,
        "token_selection": token_selection,
        "max_len": max_len,
        "padding_side": side,
        "d_model": hidden_size(hf),
        "dtype": _dtype_name(out_dtype),
        "n_texts": len(records),  # text_index counts every record; a text emptied by `exclude` has no rows
        "n_texts_with_tokens": len(items),
        "n_tokens": n_tokens,
        "excluded": {"rules": excluded, "n_positions": n_excluded},
        "text_ids": [rec["id"] for rec in records],
        "shards": shard_entries,
        "meta": meta or {},
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _write_shard(nn_model, items, layers, side, pad_id, batch_size, out_dtype, path: Path, fingerprint: str,
                 bar) -> None:
    import torch
    from safetensors.torch import save_file
    from emlab.io import replace_as_new_file

    parts: list[list[Any]] = [[] for _ in layers]
    text_index, token_position, token_id = [], [], []
    for batch in length_sorted_batches(items, batch_size):
        ids, mask, pos, offsets = pad_batch([it.ids for it in batch], pad_id, side)
        rows = torch.tensor([b for b, it in enumerate(batch) for _ in it.positions])
        cols = torch.tensor([offsets[b] + p for b, it in enumerate(batch) for p in it.positions])
        for part, h in zip(parts, read_residuals(nn_model, ids, mask, pos, layers, rows, cols)):
            part.append(h.to(device="cpu", dtype=out_dtype))
        for it in batch:
            text_index.extend([it.index] * len(it.positions))
            token_position.extend(it.positions)
            token_id.extend(it.ids[p] for p in it.positions)
        bar.update(1)
    # rows come in length-sorted batch order; store them in (text, position) order
    text_index_t, token_position_t = torch.tensor(text_index), torch.tensor(token_position)
    order = torch.argsort(text_index_t * (int(token_position_t.max()) + 1) + token_position_t)
    tensors = {f"layer_{L}": torch.cat(part)[order].contiguous() for L, part in zip(layers, parts)}
    tensors.update(text_index=text_index_t[order], token_position=token_position_t[order],
                   token_id=torch.tensor(token_id)[order])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "format": FORMAT})
        replace_as_new_file(tmp, path)
    except BaseException:  # a full disk or a kill mid-write: leave no torn temp file behind
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Reading a cache


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no activation manifest (the cache is missing or was not completed)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def _cached_layer(manifest: dict[str, Any], layer: int, out_dir) -> int:
    n = manifest["num_layers"]
    if not -n <= layer < n or layer % n not in manifest["layers"]:
        raise KeyError(f"layer {layer} is not cached in {out_dir} (cached layers: {manifest['layers']})")
    return layer % n


def iter_activations(out_dir: str | os.PathLike, layer: int) -> Iterator[tuple[Any, Any]]:
    """Stream (activations [n, d], index DataFrame) shard by shard. The index has columns
    text_index, text_id, token_position, token_id."""
    import pandas as pd
    from safetensors import safe_open

    manifest = read_manifest(out_dir)
    layer = _cached_layer(manifest, layer, out_dir)
    text_ids = manifest["text_ids"]
    for shard in manifest["shards"]:
        with safe_open(str(Path(out_dir) / shard["file"]), framework="pt") as f:
            acts = f.get_tensor(f"layer_{layer}")
            ti = f.get_tensor("text_index")
            index = pd.DataFrame({
                "text_index": ti.numpy(),
                "text_id": [text_ids[i] for i in ti.tolist()],
                "token_position": f.get_tensor("token_position").numpy(),
                "token_id": f.get_tensor("token_id").numpy(),
            })
        yield acts, index


def load_activations(out_dir: str | os.PathLike, layer: int) -> tuple[Any, Any]:
    """All cached activations of ``layer`` as one [n_tokens, d] tensor and its index DataFrame."""
    import pandas as pd
    import torch

    parts = list(iter_activations(out_dir, layer))
    return torch.cat([a for a, _ in parts]), pd.concat([i for _, i in parts], ignore_index=True)


def mean_activations(out_dir: str | os.PathLike, layer: int) -> tuple[Any, list]:
    """Per-text mean over the selected tokens: a float32 [n_texts, d] tensor in manifest order
    and the list of text ids (texts without a selected token are left out)."""
    import torch

    manifest = read_manifest(out_dir)
    sums = torch.zeros(manifest["n_texts"], manifest["d_model"], dtype=torch.float64)
    counts = torch.zeros(manifest["n_texts"], dtype=torch.float64)
    for acts, index in iter_activations(out_dir, layer):
        ti = torch.from_numpy(index["text_index"].to_numpy().copy())
        sums.index_add_(0, ti, acts.double())
        counts.index_add_(0, ti, torch.ones(len(ti), dtype=torch.float64))
    has = counts > 0
    ids = [t for t, h in zip(manifest["text_ids"], has.tolist()) if h]
    return (sums[has] / counts[has, None]).float(), ids
