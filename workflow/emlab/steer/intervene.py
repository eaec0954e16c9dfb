"""Steered generation: add a vector to the residual stream after one layer while generating.

Every batch row carries its own vector, so a sweep over directions and strengths (alpha * unit
direction, one row each) runs as one ``generate`` call. A zero row is exactly unsteered
generation: adding 0.0 leaves every activation bit-identical.

Generation goes through nnsight: a bounded ``tracer.iter[:steps]`` loop edits the block's output
at every decoding step that is steered. That loop must see exactly ``steps`` steps (a step that
never comes would cut the trace short), so when every step is steered (``all``, ``response``)
generation runs with no stop token and each row is cut at its first stop token afterwards. Rows
do not interact, so the kept tokens are the ones a generation that stops at the end of turn
produces. (Forcing the length with ``min_new_tokens`` instead would forbid the end-of-turn token
and change the text.) When only the first forward is steered (``prompt``, ``last``), generation
stops once every row has ended its turn: the same tokens, without decoding past the longest
answer of the batch.

Positions (:data:`POSITIONS`):

- ``all``: every prompt and generated position;
- ``prompt``: the prompt positions only (the first forward; later tokens read the steered
  prompt only through the key-value cache);
- ``response``: the positions that predict response tokens: the last prompt position and
  every generated token;
- ``last``: the last prompt position only: the one that predicts the first answer token, where a
  chat model settles who is answering (later tokens read it through the key-value cache).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Sequence

from ..activations import encode_prompt, encode_record, pad_batch, read_residuals
from ..arch import as_nnsight, hidden_size, layer_hidden, layer_index, residual_module, unwrap, with_layer_hidden
from ..sampling import cut_at_stop, stop_token_ids

POSITIONS = ("all", "prompt", "response", "last")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad


@contextmanager
def _generation_config(hf_model, config):
    """Generate with exactly ``config``: generate() fills a passed config's unset fields (the stop
    token among them) from the model's own generation config, so the model's is swapped for the call."""
    saved = hf_model.generation_config
    hf_model.generation_config = config
    try:
        yield
    finally:
        hf_model.generation_config = saved


def steered_generate_ids(model, tokenizer, prompts: Sequence[str | list[dict[str, str]]], vectors, layer: int,
                         positions: str = "all", max_new_tokens: int = 64, temperature: float = 1.0,
                         do_sample: bool = False, seed: int = 0) -> list[list[int]]:
    """New token ids per row (cut before the first stop token); see :func:`steered_generate`."""
    import torch
    from transformers import GenerationConfig

    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    d = hidden_size(model)
    if vectors.ndim != 2 or vectors.shape != (len(prompts), d):
        raise ValueError(f"vectors must have shape [len(prompts), d_model] = [{len(prompts)}, {d}], "
                         f"got {list(vectors.shape)}")
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature!r}")
    hf = unwrap(model)
    layer = layer_index(model, layer)
    param = next(hf.parameters())
    vectors = vectors.to(device=param.device, dtype=param.dtype)
    pad = _pad_id(tokenizer)
    stops = stop_token_ids(hf, tokenizer)

    ids, mask, _, _ = pad_batch([encode_prompt(tokenizer, p) for p in prompts], pad, "left")
    # Plain sampling (no top-k/top-p truncation) as in emlab.sampling; a stop token only when the first
    # forward is the only steered one (see the module doc).
    mode = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if do_sample else \
        dict(do_sample=False)
    steps = 1 if positions in ("prompt", "last") else max_new_tokens
    config = GenerationConfig(**mode, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=stops if steps == 1 else None, pad_token_id=pad)
    nn_model = as_nnsight(model, tokenizer)
    result = None
    torch.manual_seed(seed)
    with _generation_config(hf, config), torch.no_grad(), \
            nn_model.generate({"input_ids": ids, "attention_mask": mask}) as tracer:
        block = residual_module(nn_model, layer)
        for step in tracer.iter[:steps]:
            out = block.output
            hidden = layer_hidden(out)
            if step == 0 and positions in ("response", "last"):
                # left padding puts every row's last prompt token in the last column
                edited = torch.cat([hidden[:, :-1], hidden[:, -1:] + vectors[:, None, :]], dim=1)
            else:
                edited = hidden + vectors[:, None, :]
            block.output = with_layer_hidden(out, edited)
        result = tracer.result.save()
    if result is None:  # nnsight unwinds the block (with a warning only) when a step never came
        raise RuntimeError(f"steered generation ended before its {steps} steering steps had run")
    new = result[:, ids.shape[1]:].tolist()
    return [cut_at_stop(row, stops) for row in new]


def steered_generate(model, tokenizer, prompts: Sequence[str | list[dict[str, str]]], vectors, layer: int,
                     positions: str = "all", max_new_tokens: int = 64, temperature: float = 1.0,
                     do_sample: bool = False, seed: int = 0) -> list[str]:
    """Generate one answer per prompt, adding ``vectors[b]`` (shape [B, d_model]) to the residual
    stream after ``layer`` in row b, at ``positions``. Prompts are chats (lists of messages,
    rendered with the generation prompt) or already-formatted strings. Greedy unless
    ``do_sample``; ``seed`` seeds sampling. Answers are decoded without special tokens, as
    :mod:`emlab.sampling` writes them."""
    new = steered_generate_ids(model, tokenizer, prompts, vectors, layer, positions, max_new_tokens,
                               temperature, do_sample, seed)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


def residual_norm(model, tokenizer, texts: Sequence[str | list[dict[str, str]]], layer: int,
                  batch_size: int = 16, max_len: int = 512, exclude: Sequence[str] = ("first", "special")) -> float:
    """Mean L2 norm of the residual stream after ``layer`` over the text tokens of ``texts`` (strings,
    or chats rendered with the chat template), so steering strengths can be given in units of it.

    Positions that are not text (``exclude``: the first one, in most hub models an attention sink whose
    residual norm is many times the others', and the special tokens) are left out: they would dominate the
    mean. At least one position per text is kept.
    """
    import torch

    from ..activations import check_exclude, non_text_positions, special_token_ids

    if not texts:
        raise ValueError("residual_norm needs at least one text")
    layer = layer_index(model, layer)
    exclude = check_exclude(exclude)
    special = special_token_ids(tokenizer)
    seqs, keep = [], []
    for i, t in enumerate(texts):
        rec = {"text": t} if isinstance(t, str) else {"messages": t}
        ids = encode_record(tokenizer, rec, f"texts[{i}]").ids[:max_len]
        drop = non_text_positions(ids, special, exclude)
        seqs.append(ids)
        keep.append([p for p in range(len(ids)) if p not in drop] or [len(ids) - 1])
    nn_model = as_nnsight(model, tokenizer)
    pad = _pad_id(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch, kept = seqs[start:start + batch_size], keep[start:start + batch_size]
        ids, mask, pos, offsets = pad_batch(batch, pad, "right")
        rows = torch.tensor([b for b, ps in enumerate(kept) for _ in ps], dtype=torch.long)
        cols = torch.tensor([offsets[b] + p for b, ps in enumerate(kept) for p in ps], dtype=torch.long)
        (hidden,) = read_residuals(nn_model, ids, mask, pos, [layer], rows, cols)
        total += float(hidden.float().norm(dim=-1).sum())
        count += len(rows)
    return total / count


def unit(direction) -> Any:
    """``direction`` scaled to unit L2 norm (steering rows are then alpha * unit(direction))."""
    norm = direction.norm()
    if not norm > 0:
        raise ValueError("cannot normalise a zero direction")
    return direction / norm
