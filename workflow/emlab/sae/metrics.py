"""How good an SAE is: reconstruction (FVU, L0, dead latents) on held-out activations, and the
language-model loss recovered when the SAE's reconstruction replaces the residual stream.

    FVU          sum |x - x_hat|^2 / sum |x - mean(x)|^2 over all held-out tokens
    L0           mean number of active (> 0) latents per token
    dead_frac    fraction of latents active on no held-out token
    ce_recovered (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = the model loses nothing with the
                 SAE spliced in, 0 = as bad as zeroing the layer's output
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .topk import TopKSAE


@torch.no_grad()
def reconstruction_metrics(sae: TopKSAE, acts: Tensor | Iterable[Tensor], batch_tokens: int = 8192) -> dict[str, float]:
    """FVU, L0, dead fraction and MSE of ``sae`` on held-out activations (a tensor [tokens, d_in]
    or shards of them), accumulated in float64 so that many tokens add up exactly enough."""
    shards = [acts] if isinstance(acts, Tensor) else acts
    device = sae.W_enc.device
    n = 0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    sum_sq, sse, active = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for i, shard in enumerate(shards):
        if shard.ndim != 2 or shard.shape[1] != sae.d_in:
            raise ValueError(f"activation shard {i}: expected [tokens, {sae.d_in}], got {tuple(shard.shape)}")
        for s in range(0, shard.shape[0], batch_tokens):
            x = shard[s:s + batch_tokens].to(device=device, dtype=sae.W_enc.dtype)
            vals, idx = sae.encode_sparse(x)
            x_hat = sae.decode_sparse(vals, idx)
            on = vals > 0
            fired[idx[on]] = True
            active += on.sum()
            sse += (x_hat - x).double().pow(2).sum()
            sum_x += x.double().sum(0)
            sum_sq += x.double().pow(2).sum()
            n += x.shape[0]
    if n == 0:
        raise ValueError("no held-out activations given")
    total_var = sum_sq - sum_x.pow(2).sum() / n
    return {
        "fvu": (sse / total_var).item(),
        "mse": (sse / (n * sae.d_in)).item(),
        "l0": (active / n).item(),
        "dead_frac": 1.0 - fired.double().mean().item(),
        "n_tokens": n,
    }


@contextmanager
def replaced_output(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While active, ``module``'s output hidden states ``h`` are replaced by ``fn(h)``.

    transformers >= 5 decoder layers return the hidden states as a plain tensor; older ones
    return a tuple whose first element is the hidden states: both are handled.
    """
    def hook(_mod, _inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_splice(sae: nn.Module) -> Callable[[Tensor], Tensor]:
    """The replacement h -> SAE(h), run in the SAE's dtype and cast back to the model's."""
    dtype = next(sae.parameters()).dtype

    def fn(h: Tensor) -> Tensor:
        return sae(h.to(dtype)).to(h.dtype)

    return fn


def _ce_sum(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy and its count; a target counts when it and its input are real tokens."""
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum").item(), int(keep.sum())


@torch.no_grad()
def ce_loss_recovered(model, reconstruct: nn.Module | Callable[[Tensor], Tensor],
                      batches: Iterable[Mapping[str, Tensor] | Tensor], *,
                      site: nn.Module | Callable[[Any, int], nn.Module], layer: int | None = None) -> dict[str, float]:
    """CE loss with the layer output replaced by ``reconstruct(output)`` vs clean and zero-ablated.

    ``site`` is the module whose output is the residual stream to replace, or a resolver
    ``site(model, layer)`` returning it (e.g. ``emlab.arch.residual_module``). ``reconstruct``
    is an SAE (run in its own dtype) or any function of the hidden states. ``batches`` yields
    dicts with ``input_ids`` (and ``attention_mask``; and ``splice_mask``, a [B, T] bool marking
    the positions to replace, all of them when absent), or plain ``input_ids`` tensors.
    With a ``layer`` (a decoder block, as ``emlab.arch.residual_module`` numbers them) the three forwards of a
    batch share one pass through the blocks up to it (``emlab.arch.reusing_prefix``).
    """
    from ..arch import prefix_output, residual_module, reusing_prefix

    module = site if isinstance(site, nn.Module) else site(model, layer)
    try:
        shared = layer is not None and module is residual_module(model, layer)
    except Exception:  # noqa: BLE001 - not a decoder-block model emlab can read: three full forwards
        shared = False
    fn = sae_splice(reconstruct) if isinstance(reconstruct, nn.Module) else reconstruct
    batches = [b if isinstance(b, Mapping) else {"input_ids": b} for b in batches]
    model.eval()
    device = next(model.parameters()).device
    edits = {"clean": None, "sae": fn, "zero": torch.zeros_like}
    totals = dict.fromkeys(edits, 0.0)
    n = 0
    for b in batches:
        ids = b["input_ids"].to(device)
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        splice = b.get("splice_mask")
        prefix = prefix_output(model, layer, **inputs) if shared else None
        for name, f in edits.items():
            with ExitStack() as stack:
                if prefix is not None:
                    stack.enter_context(reusing_prefix(model, layer, prefix))
                if f is not None:
                    # positions the batch marks False in "splice_mask" (not text: an attention sink, a special
                    # token, which the SAE never saw) keep their own residual stream
                    stack.enter_context(replaced_output(module, lambda h, f=f: f(h) if splice is None else
                                                        torch.where(splice[..., None].to(h.device), f(h), h)))
                total, count = _ce_sum(model(**inputs).logits, ids, mask)
            totals[name] += total
        n += count
    if n == 0:
        raise ValueError("the token batches hold no next-token targets")
    ce_clean, ce_sae, ce_zero = (totals[k] / n for k in ("clean", "sae", "zero"))
    gap = ce_zero - ce_clean
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        # Undefined when zeroing the layer costs nothing (the layer carries no information).
        "ce_recovered": (ce_zero - ce_sae) / gap if gap != 0 else float("nan"),
        "n_tokens": n,
    }
