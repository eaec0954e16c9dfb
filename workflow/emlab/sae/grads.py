"""One training step's gradients, written by hand: only k of d_sae latents are active per token, so the true
gradient touches k encoder and decoder rows per token, where autograd through a dense ``[tokens, d_sae]``
code would cost as much as the encoder matmul (checked against autograd in the tests). The work runs in row
chunks so that the pre-activations stay in the CPU cache; :mod:`emlab.sae.cpu_kernels` compiles the
per-token part on a CPU. Also the decoder's unit-norm constraint and the gradient normalisation."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import cpu_kernels
from .topk import TopKSAE, select_topk

class StepStats(NamedTuple):
    loss: Tensor        # fvu + auxk_coef * aux_loss (scalar)
    fvu: Tensor         # sum |x - x_hat|^2 / sum |x - mean(x)|^2 over the batch
    aux_loss: Tensor    # AuxK term before its coefficient (0 when no latent is dead)
    l0: Tensor          # mean number of active (> 0) latents per token
    fired: Tensor       # bool [d_sae]: latents active on at least one token of the batch


def _chunk_rows(n: int, d_in: int, d_sae: int, k: int, device: torch.device) -> int:
    # Keep a chunk's pre-activations and gathered decoder rows within ~2 MB of cache on CPU;
    # on a GPU only memory matters (the [rows, k, d_in] gather gets large for wide models).
    budget = (1 << 19) if device.type == "cpu" else (1 << 27)
    return max(1, min(n, budget // max(d_sae, k * d_in)))


@torch.no_grad()
def compute_grads(sae: TopKSAE, x: Tensor, dead_mask: Tensor | None = None, *, k_aux: int,
                  auxk_coef: float, chunk_rows: int | None = None, dead_idx: Tensor | None = None,
                  static_aux: bool = False) -> StepStats:
    """Set ``p.grad`` of every SAE parameter to the gradient of FVU + auxk_coef * AuxK on ``x``.

    x [n, d_in]; dead_mask bool [d_sae] marks dead latents (None or all False: no AuxK term).
    AuxK: the top min(k_aux, n_dead) dead latents' activations decode (without b_dec) a
    prediction of the residual x - x_hat; the term is scaled by min(n_dead / k_aux, 1) so that
    a few dead latents do not get the weight of many. ``dead_idx`` (the indices of the dead latents)
    may be given instead of ``dead_mask``: finding them reads the mask's count back to the host.

    ``static_aux=True`` (with ``dead_mask``) computes the same gradients with shapes that do not
    depend on how many latents are dead, and without reading anything back to the host, as a CUDA
    graph needs: always k_aux AuxK slots, filled by a top-k over the pre-activations with the live
    latents masked to -inf (slots beyond the dead count hold -inf, so zero activation and gradient).
    """
    n, d = x.shape
    m, k = sae.d_sae, sae.k
    W_enc, W_dec, b_dec = sae.W_enc.data, sae.W_dec.data, sae.b_dec.data
    xc_all = (x - x.mean(0)).view(-1)
    total_var = torch.dot(xc_all, xc_all).clamp_min(torch.finfo(x.dtype).tiny)
    # (x - b_dec) @ W_enc + b_enc == x @ W_enc + enc_bias: one matmul, no [n, d] copy.
    enc_bias = sae.b_enc.data - b_dec @ W_enc

    if static_aux:
        if dead_mask is None:
            raise ValueError("static_aux needs dead_mask")
        live = ~dead_mask
        kx = min(k_aux, m)
        aux_scale = (dead_mask.sum() / k_aux).clamp_max(1.0)      # a device scalar: no read-back
    else:
        if dead_idx is None:
            dead_idx = dead_mask.nonzero().squeeze(1) if dead_mask is not None else x.new_zeros(0, dtype=torch.long)
        n_dead = int(dead_idx.numel())
        kx = min(k_aux, n_dead)
        aux_scale = min(n_dead / k_aux, 1.0)

    kernels = not static_aux and cpu_kernels.usable(x, W_dec)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    act, g_act = x.new_empty(n, k), x.new_empty(n, k)
    # x_hat - x, and below it AuxK's e_hat - e: the two tables the decoder's gradient sums rows of
    dec_table = x.new_empty(2 * n if kx else n, d)
    resid = dec_table[:n]
    if kx:
        # the AuxK candidates' pre-activations, kept from the encoder pass: the dead latents' columns
        # (eager), or the top k_aux with the live latents masked (fixed shapes for a CUDA graph)
        aux_pre = x.new_empty(n, kx if static_aux else n_dead)
        aux_cols = torch.empty(n, kx, dtype=torch.long, device=x.device) if static_aux else None
    rows = chunk_rows or _chunk_rows(n, d, m, k, x.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xc = x[s:e]
        # d|r|^2/d a_j = 2 <r, W_dec[j]> through the ReLU (the factor 2/var is applied below); on CPU one
        # compiled pass per token adds the bias and does the top-k, x_hat and these
        done = None
        if kernels:
            pre = torch.mm(xc, W_enc)
            done = cpu_kernels.encode_decode(pre, enc_bias, xc, W_dec, b_dec, k, idx[s:e], act[s:e],
                                             g_act[s:e], resid[s:e])
            if done is None:
                pre += enc_bias
        else:
            pre = torch.addmm(enc_bias, xc, W_enc)
        if not done:
            vals, ic = select_topk(pre, k)
            ac = vals.clamp_min(0)
            # embedding_bag sums the k weighted decoder rows per token in one pass (a batched [1, k] x [k, d]
            # matmul is 3x slower); the gathered rows are still needed for the latents' gradients
            rc = torch.nn.functional.embedding_bag(ic, W_dec, per_sample_weights=ac, mode="sum").add_(b_dec).sub_(xc)
            w_rows = W_dec.index_select(0, ic.view(-1)).view(e - s, k, d)
            g_act[s:e] = torch.bmm(w_rows, rc.unsqueeze(2)).squeeze(2).mul_(vals > 0)
            idx[s:e], act[s:e], resid[s:e] = ic, ac, rc
        if kx:
            if static_aux:
                aux_pre[s:e], aux_cols[s:e] = select_topk(pre.masked_fill(live, -math.inf), kx)
            else:
                torch.index_select(pre, 1, dead_idx, out=aux_pre[s:e])

    if kx:
        # AuxK in its own pass, in row chunks sized for its [rows, kx, d] gather: with few dead latents a
        # step's AuxK is a handful of whole-batch ops instead of a dozen small ones per encoder chunk.
        if static_aux:
            avals_all, aidx = aux_pre, aux_cols
        elif kx == n_dead:   # (fewer dead latents than k_aux: all of them, no selection)
            avals_all, aidx = aux_pre, dead_idx.expand(n, kx).contiguous()
        else:
            avals_all, aj = select_topk(aux_pre, kx)
            aidx = dead_idx[aj]
        aact = avals_all.clamp_min(0)
        g_aact, adiff = x.new_empty(n, kx), dec_table[n:]
        arows = chunk_rows or _chunk_rows(n, d, 0, kx, x.device)
        for s in range(0, n, arows):
            e = min(n, s + arows)
            aw_rows = W_dec.index_select(0, aidx[s:e].reshape(-1)).view(e - s, kx, d)
            # e_hat - e with e = x - x_hat = -r (the target is detached: no gradient into r). embedding_bag,
            # as for x_hat: a batched [1, kx] x [kx, d] matmul costs 1-2 ms a step with one or two dead latents.
            dc = torch.nn.functional.embedding_bag(aidx[s:e], W_dec, per_sample_weights=aact[s:e], mode="sum")
            adiff[s:e] = dc.add_(resid[s:e])
            g_aact[s:e] = torch.bmm(aw_rows, dc.unsqueeze(2)).squeeze(2).mul_(avals_all[s:e] > 0)

    flat = resid.view(-1)
    sse = torch.dot(flat, flat)
    fvu = sse / total_var
    main_coef = 2.0 / total_var
    g_act.mul_(main_coef)
    resid.mul_(main_coef)                          # now dL/dx_hat
    if kx:
        aflat = adiff.view(-1)
        aux_loss = aux_scale * torch.dot(aflat, aflat) / total_var
        aux_coef = auxk_coef * aux_scale * 2.0 / total_var
        g_aact.mul_(aux_coef)
        adiff.mul_(aux_coef)                       # now dL/de_hat
    else:
        aux_loss = x.new_zeros(())

    if kernels:
        # Each latent's weight gradients are sums over the (token, slot) entries that selected it, added
        # up token by token: main term first, then AuxK (b_dec is subtracted before the encoder).
        grad_W_dec, grad_W_enc_rows, grad_b_enc = x.new_zeros(m, d), x.new_zeros(m, d), x.new_zeros(m)
        x_in = x - b_dec
        for entries in [(idx, act, resid, g_act)] + ([(aidx, aact, adiff, g_aact)] if kx else []):
            if not cpu_kernels.scatter_grads(*entries, x_in, grad_W_dec, grad_W_enc_rows, grad_b_enc):
                raise RuntimeError("compute_grads: the CPU gradient kernel refused its inputs")
    else:
        grad_W_dec, grad_W_enc_rows, grad_b_enc = _bag_grads(
            x, b_dec, dec_table, m, idx, act, g_act, (aidx, aact, g_aact) if kx else None)
    # b_dec is added by the decoder and subtracted before the encoder.
    grad_b_dec = resid.sum(0) - W_enc @ grad_b_enc

    sae.W_enc.grad = grad_W_enc_rows.T.contiguous()
    sae.b_enc.grad = grad_b_enc
    sae.W_dec.grad = grad_W_dec
    sae.b_dec.grad = grad_b_dec

    active = act > 0
    # counts rather than boolean indexing: no host round trip (nonzero) on a GPU; sums of 0 and 1, exact
    # in any order
    fired = torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, idx.view(-1), active.view(-1).to(x.dtype)) > 0
    return StepStats(loss=fvu + auxk_coef * aux_loss, fvu=fvu, aux_loss=aux_loss,
                     l0=active.sum() / n, fired=fired)


def _bag_grads(x: Tensor, b_dec: Tensor, dec_table: Tensor, n_latents: int, idx: Tensor, act: Tensor,
               g_act: Tensor, aux: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_W_dec, grad_W_enc as [d_sae, d_in] rows, grad_b_enc) from the active entries, with torch ops.

    ``dec_table`` holds dL/dx_hat in its first n rows and, with ``aux`` = (AuxK indices, activations,
    dL/d activations), dL/de_hat in the next n."""
    n, k = idx.shape
    m = n_latents
    if aux is not None:
        aidx, aact, g_aact = aux
        kx = aidx.shape[1]
        keys = torch.cat([idx.view(-1), aidx.view(-1)])
        enc_rows = torch.cat([_row_ids(n, k, x.device), _row_ids(n, kx, x.device)])
        dec_rows = torch.cat([_row_ids(n, k, x.device), n + _row_ids(n, kx, x.device)])
        dec_weights = torch.cat([act.view(-1), aact.view(-1)])
        enc_weights = torch.cat([g_act.view(-1), g_aact.view(-1)])
    else:
        keys = idx.view(-1)
        enc_rows = dec_rows = _row_ids(n, k, x.device)
        dec_weights, enc_weights = act.view(-1), g_act.view(-1)

    # Sort the entries by latent once, then one embedding_bag per matrix sums the rows per latent.
    order = _group_by_latent(keys, m)
    # (bincount would read max(keys) back to the host on a GPU; a scatter-add does not)
    counts = torch.zeros(m, dtype=torch.long, device=x.device).index_add_(0, keys, torch.ones_like(keys))
    offsets = torch.cumsum(counts, 0) - counts
    grad_W_dec = torch.nn.functional.embedding_bag(
        dec_rows.index_select(0, order), dec_table, offsets, mode="sum",
        per_sample_weights=dec_weights.index_select(0, order))
    enc_bags = dict(offsets=offsets, mode="sum", per_sample_weights=enc_weights.index_select(0, order))
    # grad_b_enc is the same bag sums over a column of ones beside the inputs: a fixed summing order on every
    # device (on a GPU, index_add_ sums floats with atomics in an order that changes from run to run, and a
    # top-k SAE amplifies such last-bit differences into different latents: fits would not be reproducible).
    table = torch.cat([x - b_dec, x.new_ones(n, 1)], dim=1)
    both = torch.nn.functional.embedding_bag(enc_rows.index_select(0, order), table, **enc_bags)
    return grad_W_dec, both[:, :x.shape[1]], both[:, x.shape[1]].contiguous()


def _group_by_latent(keys: Tensor, m: int) -> Tensor:
    """A stable argsort of latent ids in [0, m). On CPU with m <= 2^16 numpy's radix sort of 16-bit
    keys gives the same permutation 10x faster than torch's comparison sort (a millisecond a step)."""
    if keys.device.type == "cpu" and m <= 1 << 16:
        import numpy as np

        return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
    return torch.argsort(keys, stable=True)


def _row_ids(n: int, per_row: int, device) -> Tensor:
    # (an expand, not repeat_interleave, whose CUDA kernel may read its output size back to the host)
    return torch.arange(n, device=device).unsqueeze(1).expand(n, per_row).reshape(-1)


@torch.no_grad()
def remove_parallel_decoder_grad(sae: TopKSAE) -> None:
    """Drop the gradient component along each (unit) decoder row: the renormalisation after
    the step would undo it anyway, and leaving it in would distort Adam's moment estimates."""
    g, w = sae.W_dec.grad, sae.W_dec.data
    g -= (g * w).sum(dim=1, keepdim=True) * w


@torch.no_grad()
def normalize_grad_(params) -> Tensor:
    """Divide the gradients of ``params`` by their joint L2 norm, on the device (no read-back, so a
    CUDA graph can hold it); returns the norm before the division. A zero gradient stays zero."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    torch._foreach_div_(grads, norm.clamp_min(1e-30))
    return norm
