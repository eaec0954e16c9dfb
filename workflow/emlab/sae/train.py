"""Training a TopK SAE on residual activations, after Gao et al. (2024) and EleutherAI sparsify.

The recipe:

- ``b_dec`` starts at the geometric median of a sample of the activations; decoder rows are
  random unit vectors and the encoder is their transpose;
- loss = FVU + ``auxk_coef`` * AuxK, where AuxK asks the top ``k_aux`` *dead* latents (no
  firing for ``dead_tokens_threshold`` tokens) to reconstruct the residual error; both terms
  are normalised by the batch's total variance;
- decoder rows stay unit-norm: the gradient component parallel to each row is removed before
  the Adam step and the rows are renormalised after it;
- each step's gradient is divided by its global norm before the Adam step (``normalize_grad``).
  The raw gradient's norm falls about tenfold early in a run, and Adam's steps on it fall behind
  the set learning rate; on the organism's activations the normalised steps reach 9-17% lower
  FVU at the same token budget (a shorter Adam second-moment memory recovers only part of
  that). SAELens trains on the same unit-norm gradients: it clips at norm 1, and its loss, a sum
  over d_in, keeps every step's norm above 1;
- Adam with lr = ``lr`` / sqrt(n_latents / 2^14), linear warm-up and linear decay to zero;
- optionally the inputs are scaled so that their mean squared norm is d_in; the scale is folded
  into the weights at the end, so the returned SAE takes raw activations.

Gradients are written by hand (:func:`compute_grads`, checked against autograd in the tests)
because only k of d_sae latents are active per token: autograd through a dense
``[tokens, d_sae]`` code would spend as much on the backward pass as on the encoder matmul,
whereas the true gradient touches k encoder and decoder rows per token. The work is done in
row chunks so that the ``[rows, d_sae]`` pre-activations stay in the CPU cache. On a GPU the
whole step (gradients, Adam, renormalisation, the dead-latent count) is captured once as a CUDA
graph and replayed (:class:`_GraphedSteps`), the encoder matmul runs in TF32 (``tf32``), and no float
is summed with atomics, so that a seed gives the same SAE on a GPU too.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from ..schema import ConfigError
from . import cpu_kernels
from .topk import TopKSAE, select_topk

LR_REFERENCE_LATENTS = 2 ** 14  # the base lr is the one for 2^14 latents (sparsify's convention)


class SAEConfigError(ConfigError):
    """A bad SAE setting; the message names the config key."""


@dataclass
class SAETrainConfig:
    k: int = 32                            # active latents per token
    n_latents: int | None = None           # None: expansion_factor * d_in
    expansion_factor: int = 32
    batch_tokens: int = 4096
    lr: float = 2e-4                       # Adam lr at 2^14 latents; scaled by 1/sqrt(n_latents / 2^14)
    lr_warmup_frac: float = 0.05           # linear warm-up over this fraction of the steps
    lr_decay_frac: float = 0.2             # linear decay to 0 over the last fraction of the steps
    epochs: float = 1.0                    # passes over the activations (ignored if train_tokens is set)
    train_tokens: int | None = None        # total training tokens; needed for streamed shards of unknown size
    k_aux: int | None = None               # dead latents in the AuxK loss; None: min(512, d_in // 2)
    auxk_coef: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000
    normalize_activations: bool = True     # scale inputs to mean squared norm d_in (folded into the weights)
    init_sample_tokens: int = 16384        # sample for the geometric median and the input scale
    seed: int = 0
    device: str = "auto"
    cuda_graphs: bool = True               # on a GPU, replay each step from a CUDA graph (False: eager steps)
    tf32: bool = True                      # on a GPU, the encoder matmul in TensorFloat-32 (False: full fp32)
    normalize_grad: bool = True            # Adam steps on the gradient divided by its global norm

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None, where: str = "sae.train") -> "SAETrainConfig":
        """Build from a config mapping; unknown keys and wrong types raise an error naming the key."""
        cfg = dict(cfg or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise SAEConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        for name, value in cfg.items():
            _check_type(f"{where}.{name}", value, known[name].type)
        out = cls(**cfg)
        out.validate(where)
        return out

    def validate(self, where: str = "sae.train") -> None:
        positive = ["k", "expansion_factor", "batch_tokens", "dead_tokens_threshold", "init_sample_tokens"]
        for name in positive + ["n_latents", "train_tokens", "k_aux"]:
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SAEConfigError(f"{where}.{name} must be > 0, got {v}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise SAEConfigError(f"{where}.k={self.k} exceeds {where}.n_latents={self.n_latents}")
        if not (self.lr > 0 and self.epochs > 0 and self.auxk_coef >= 0):
            raise SAEConfigError(f"{where}: lr and epochs must be > 0 and auxk_coef >= 0")
        for name in ("lr_warmup_frac", "lr_decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise SAEConfigError(f"{where}.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise SAEConfigError(f"{where}: lr_warmup_frac + lr_decay_frac must be <= 1")

    def latents_for(self, d_in: int) -> int:
        m = self.n_latents if self.n_latents is not None else self.expansion_factor * d_in
        if self.k > m:
            raise SAEConfigError(f"sae.train.k={self.k} exceeds the number of latents {m}")
        return m

    def lr_for(self, n_latents: int) -> float:
        return self.lr / math.sqrt(n_latents / LR_REFERENCE_LATENTS)

    def k_aux_for(self, d_in: int) -> int:
        # Gao et al. use 512; sparsify and SAELens use d_in // 2 (which is what small models need).
        return self.k_aux if self.k_aux is not None else min(512, max(1, d_in // 2))


def _check_type(key: str, value: Any, annotation: str) -> None:
    ann = str(annotation)
    if value is None:
        if "None" not in ann:
            raise SAEConfigError(f"{key} must not be null")
        return
    if ann.startswith("bool"):
        ok = isinstance(value, bool)
    elif ann.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise SAEConfigError(f"{key} must be of type {ann}, got {value!r}")


# --- initialisation -----------------------------------------------------------------------

def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points [n, d]`` (Weiszfeld).

    Computed in float64, with distances from |x|^2 - 2 x.y + |y|^2 so that an iteration is two
    matrix-vector products and makes no [n, d] temporaries; distances are floored at 1e-12 so
    an iterate that lands on a data point does not divide by zero.
    """
    x = points.detach().double()
    sq_norms = x.pow(2).sum(1)
    y = x.mean(0)
    for _ in range(max_iter):
        dist = (sq_norms - 2 * (x @ y) + y.dot(y)).clamp_min(0).sqrt()
        w = 1.0 / dist.clamp_min(1e-12)
        y_next = (w @ x) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * (y.norm() + 1e-12):
            break
    return y.to(points.dtype)


INIT_FIT_TOKENS = 4096  # sample rows that fit the initial encoder's scale (one scalar)


def init_sae(sample: Tensor, n_latents: int, k: int, generator: torch.Generator) -> TopKSAE:
    """A fresh SAE for activations like ``sample``: unit random decoder rows, ``b_dec`` = the
    sample's geometric median, and the encoder = the decoder's transpose times the scalar that
    makes the initial reconstruction of the sample least-squares optimal.

    The plain transpose overshoots (the k largest projections onto random directions add up to
    more than the input), which costs the first hundred steps; scaling the encoder does not
    change which latents win, so one scalar fits exactly and is cheap. The SAE is built on the
    sample's device; the random rows come from the (CPU) ``generator`` whatever the device.
    """
    d_in = sample.shape[1]
    sae = TopKSAE(d_in, n_latents, k, device=sample.device)
    w = torch.randn(n_latents, d_in, generator=generator).to(sample.device)
    w /= w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(geometric_median(sample.float()))
        rows = sample[:INIT_FIT_TOKENS].float()
        fit, recon = rows - sae.b_dec, sae(rows) - sae.b_dec
        scale = (recon * fit).sum() / recon.pow(2).sum()
        if torch.isfinite(scale) and scale > 0:
            sae.W_enc.mul_(scale)
    return sae


# --- one step's gradients -----------------------------------------------------------------

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


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device, enabled: bool) -> Iterator[None]:
    """fp32 matmuls on a CUDA device in TensorFloat-32 for the duration; the previous setting is restored.

    The encoder matmul is most of a GPU step for wide models; TF32 runs it on the tensor cores (8-10x the
    fp32 rate on Ampere and Hopper) with a 10-bit mantissa, ample for choosing the top k of the
    pre-activations (sparsify trains in bf16). torch only has a process-wide switch, hence the restore.
    """
    if not (enabled and device.type == "cuda"):
        yield
        return
    cublas = torch.backends.cuda.matmul
    # the fp32_precision API (torch >= 2.9); torch refuses reads that mix it with allow_tf32 once set
    attr, value = ("fp32_precision", "tf32") if hasattr(cublas, "fp32_precision") else ("allow_tf32", True)
    saved = getattr(cublas, attr)
    setattr(cublas, attr, value)
    try:
        yield
    finally:
        setattr(cublas, attr, saved)


def lr_factor(step: int, steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up from lr/warmup to lr, constant, then linear decay to lr/decay at the last step."""
    warm = max(1, round(warmup_frac * steps))
    decay = round(decay_frac * steps)
    if step < warm:
        return (step + 1) / warm
    if decay and step >= steps - decay:
        return (steps - step) / decay
    return 1.0


# --- activation shards --------------------------------------------------------------------

class _Shards:
    """Tensor, sequence of tensors, or iterable of tensors [tokens, d_in], read shard by shard.

    A re-iterable source is re-read for every epoch; a one-shot iterator gives one pass.
    """

    def __init__(self, data: Tensor | Sequence[Tensor] | Iterable[Tensor], n_tokens: int | None):
        if isinstance(data, Tensor):
            data = [data]
        self._one_shot = iter(data) is data
        self._data = data
        self._first: Tensor | None = None
        if isinstance(data, Sequence):
            if not data:
                raise ValueError("no activation shards given")
            for i, t in enumerate(data):
                self._check(i, t, data[0].shape[-1])
            n_tokens = sum(int(t.shape[0]) for t in data)
        self.n_tokens = n_tokens

    @staticmethod
    def _check(i: int, shard: Any, d_in: int) -> None:
        if not isinstance(shard, Tensor) or shard.ndim != 2 or not shard.is_floating_point():
            what = f"shape {tuple(shard.shape)} {shard.dtype}" if isinstance(shard, Tensor) else type(shard).__name__
            raise ValueError(f"activation shard {i}: expected a float tensor [tokens, d_in], got {what}")
        if shard.shape[1] != d_in:
            raise ValueError(f"activation shard {i} has d_in={shard.shape[1]}, shard 0 has {d_in}")

    def first(self) -> Tensor:
        if self._first is None:
            if self._one_shot:
                try:
                    self._first = next(self._data)
                except StopIteration:
                    raise ValueError("no activation shards given") from None
            else:
                self._first = next(iter(self._data), None)
                if self._first is None:
                    raise ValueError("no activation shards given")
            self._check(0, self._first, self._first.shape[-1] if isinstance(self._first, Tensor) else 0)
        return self._first

    def _one_pass(self) -> Iterator[Tensor]:
        if self._one_shot:
            yield self.first()
            yield from self._data
        else:
            yield from self._data

    def batches(self, batch: int, generator: torch.Generator, device: torch.device | None = None) -> Iterator[Tensor]:
        """Shuffled batches of exactly ``batch`` rows on ``device``; the remainder of a shard joins the next.

        Each shard moves to the device once, in one copy, and batches are gathered there."""
        d_in = self.first().shape[1]
        carry: Tensor | None = None
        while True:
            n_shards = 0
            for i, shard in enumerate(self._one_pass()):
                self._check(i, shard, d_in)
                n_shards += 1
                perm = torch.randperm(shard.shape[0], generator=generator)
                if device is not None and shard.device != device:
                    shard, perm = shard.to(device), perm.to(device)
                pos = 0
                if carry is not None:
                    need = batch - carry.shape[0]
                    carry = torch.cat([carry, shard.index_select(0, perm[:need])])
                    pos = need
                    if carry.shape[0] < batch:
                        continue
                    yield carry
                    carry = None
                while pos + batch <= shard.shape[0]:
                    yield shard.index_select(0, perm[pos:pos + batch])  # 4x faster than shard[...] on CPU
                    pos += batch
                if pos < shard.shape[0]:
                    carry = shard.index_select(0, perm[pos:])
            if self._one_shot or n_shards == 0:
                return


# --- the training loop --------------------------------------------------------------------

LOG_COLUMNS = ("step", "tokens", "lr", "loss", "fvu", "aux_loss", "l0", "dead_frac")
LOG_EVERY = 50  # steps whose log rows are read back from the device together


def train_sae(data: Tensor | Sequence[Tensor] | Iterable[Tensor], cfg: SAETrainConfig, *,
              n_tokens: int | None = None, log_path: str | os.PathLike | None = None,
              progress: bool = True, meta: Mapping[str, Any] | None = None) -> TopKSAE:
    """Train a TopK SAE on activations ``[tokens, d_in]`` (a tensor or shards of them).

    ``n_tokens`` is the size of a streamed source (only needed for iterables without a length,
    when ``cfg.train_tokens`` is not set). ``log_path`` gets one CSV row per step
    (:data:`LOG_COLUMNS`). The returned SAE is on the CPU, takes raw activations, and carries
    ``meta`` plus the training settings in ``sae.meta``.
    """
    from tqdm.auto import tqdm

    from emlab.models import pick_device

    cfg.validate()
    shards = _Shards(data, n_tokens)
    device = torch.device(pick_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)

    first = shards.first()
    d_in = first.shape[1]
    n_latents = cfg.latents_for(d_in)
    sample = first.index_select(0, torch.randperm(first.shape[0], generator=generator)[:cfg.init_sample_tokens]).float()
    scale = 1.0
    if cfg.normalize_activations:
        mean_sq = sample.pow(2).sum(1).mean().item()
        if not mean_sq > 0:
            raise ValueError("activations are all zero (or not finite): cannot normalise them")
        scale = math.sqrt(d_in / mean_sq)
    sae = init_sae((sample * scale).to(device), n_latents, cfg.k, generator)

    if cfg.train_tokens is not None:
        total = cfg.train_tokens
    elif shards.n_tokens is not None:
        total = int(cfg.epochs * shards.n_tokens)
    else:
        raise SAEConfigError("sae.train.train_tokens must be set (or n_tokens passed) for activation shards "
                             "streamed from an iterator of unknown length")
    steps = total // cfg.batch_tokens
    if steps < 1:
        raise SAEConfigError(f"sae.train: {total} training tokens make no batch of batch_tokens={cfg.batch_tokens}")

    lr = cfg.lr_for(n_latents)
    k_aux = cfg.k_aux_for(d_in)
    on_gpu = device.type == "cuda"
    graphs = cfg.cuda_graphs and on_gpu
    # Adam fused on every device: one pass over each parameter (on CPU 0.4 ms a step instead of 1 ms at 512
    # latents). On a GPU a replayed graph reads the lr and Adam's step count from device tensors (capturable);
    # eager GPU steps take the same update, so that both do the same arithmetic.
    lr_now: float | Tensor = torch.tensor(lr, device=device) if on_gpu else lr
    opt = torch.optim.Adam(sae.parameters(), lr=lr_now, fused=True, capturable=on_gpu)
    state = _TrainState(sae, opt, k_aux=k_aux, auxk_coef=cfg.auxk_coef, threshold=cfg.dead_tokens_threshold,
                        scale=scale, normalize_grad=cfg.normalize_grad)
    graphed = _GraphedSteps(state.step, device) if graphs else None
    # Eager steps: which latents are dead is re-read every step on CPU, where it is free; on a GPU the set's
    # size goes to the host (it shapes the AuxK tensors), so it is re-read every LOG_EVERY steps instead: AuxK
    # then works on a dead set up to LOG_EVERY batches old, small next to dead_tokens_threshold (10M by default).
    # Graphed steps read the current dead mask on the device; only the choice between the graphs with and
    # without an AuxK term waits for the log read-back.
    dead_refresh = 1 if device.type == "cpu" else LOG_EVERY
    log_file = writer = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w", newline="")
        writer = csv.writer(log_file)
        writer.writerow(LOG_COLUMNS)
    bar = tqdm(total=steps, desc="sae", unit="step", disable=not progress, mininterval=1.0)
    batches = shards.batches(cfg.batch_tokens, generator, device)
    # Per-step numbers stay on the device and reach the host LOG_EVERY steps at a time: a GPU step
    # is a few milliseconds of kernels, and reading a value back each step would stall it each time.
    log_rows = torch.empty(LOG_EVERY, len(LOG_COLUMNS) - 3, device=device)
    pending: list[tuple[int, float]] = []
    any_dead = False

    def flush() -> None:
        nonlocal any_dead
        if not pending:
            return
        values = log_rows[:len(pending)].tolist()
        for (step, step_lr), (loss, fvu, aux, l0, dead_frac) in zip(pending, values):
            if writer is not None:
                writer.writerow([step, (step + 1) * cfg.batch_tokens] +
                                [f"{v:.6g}" for v in (step_lr, loss, fvu, aux, l0, dead_frac)])
        any_dead = values[-1][4] > 0
        bar.set_postfix(fvu=f"{values[-1][1]:.4f}", l0=f"{values[-1][3]:.1f}", dead=f"{values[-1][4]:.3f}",
                        refresh=False)
        pending.clear()

    try:
        with _tf32_matmuls(device, cfg.tf32):
            for step in range(steps):
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"activation shards ran out after {step * cfg.batch_tokens} tokens; "
                                     f"sae.train asked for {total}")
                step_lr = lr * lr_factor(step, steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
                if isinstance(lr_now, Tensor):
                    lr_now.fill_(step_lr)
                else:
                    for group in opt.param_groups:
                        group["lr"] = step_lr
                if graphed is not None:
                    row = graphed(batch, any_dead)
                else:
                    if step % dead_refresh == 0:
                        dead_idx = state.dead.nonzero().squeeze(1)
                    row = state.step(batch, dead_idx=dead_idx)
                    opt.zero_grad(set_to_none=True)
                log_rows[len(pending)].copy_(row)
                pending.append((step, step_lr))
                if len(pending) == LOG_EVERY or step == steps - 1:
                    flush()
                bar.update(1)
    finally:
        flush()
        bar.close()
        if log_file is not None:
            log_file.close()

    sae = sae.cpu()
    sae.fold_input_scale_(scale)
    sae.meta = {**(meta or {}), "emlab_train": {**asdict(cfg), "n_latents": n_latents, "k_aux": k_aux,
                                                "steps": steps, "input_scale": scale,
                                                "cuda_graph_steps": graphed.replays if graphed else 0}}
    return sae


class _TrainState:
    """One SAE's optimisation state: the SAE, its optimizer and the latents' firing record."""

    def __init__(self, sae: TopKSAE, opt: torch.optim.Optimizer, *, k_aux: int, auxk_coef: float,
                 threshold: int, scale: float, normalize_grad: bool = True):
        self.sae, self.opt, self.normalize_grad = sae, opt, normalize_grad
        self.k_aux, self.auxk_coef, self.threshold, self.scale = k_aux, auxk_coef, threshold, scale
        device = sae.W_enc.device
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        self.dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)  # updated in place (graphs read it)

    @torch.no_grad()
    def step(self, batch: Tensor, *, dead_idx: Tensor | None = None, with_aux: bool | None = None) -> Tensor:
        """One Adam step on a raw batch; returns [loss, fvu, aux_loss, l0, dead_frac] on the device.

        ``dead_idx``: the dead latents, read by an eager step. ``with_aux`` instead asks for the fixed-shape
        step a CUDA graph captures: AuxK over the current dead mask (True) or no AuxK term (False)."""
        sae = self.sae
        x = batch.to(dtype=torch.float32) * self.scale
        # (with_aux False: no dead mask and no dead_idx, so no AuxK term)
        stats = compute_grads(sae, x, self.dead if with_aux else None, k_aux=self.k_aux, auxk_coef=self.auxk_coef,
                              dead_idx=dead_idx, static_aux=bool(with_aux))
        remove_parallel_decoder_grad(sae)
        if self.normalize_grad:
            normalize_grad_(sae.parameters())
        self.opt.step()
        sae.normalize_decoder_()
        self.since_fired.add_(x.shape[0]).masked_fill_(stats.fired, 0)
        torch.ge(self.since_fired, self.threshold, out=self.dead)  # the next step's AuxK reads it
        return torch.stack([stats.loss, stats.fvu, stats.aux_loss, stats.l0, self.dead.float().mean()])


class _GraphedSteps:
    """Training steps replayed from CUDA graphs.

    A step of an SAE of the sizes used here is some 80 small kernels; launched one by one from Python,
    their launch costs (not the kernels) set a GPU's pace. A graph replays them in one call. A graph
    needs fixed shapes, hence the fixed-shape AuxK (``with_aux``), and two graphs, with and without
    an AuxK term. Each is captured after WARMUP eager steps of its kind (real steps, on a side stream,
    as capture requires); should capture fail, training goes on eagerly with a warning.
    """

    WARMUP = 2

    def __init__(self, step_fn, device: torch.device):
        self.step_fn = step_fn
        self.device = device
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.outs: dict[bool, Tensor] = {}
        self.eager_calls = {False: 0, True: 0}
        self.x: Tensor | None = None
        self.replays = 0
        self.failed = False
        self.side = torch.cuda.Stream(device)

    def __call__(self, batch: Tensor, with_aux: bool) -> Tensor:
        # streams and captures belong to the current device, which need not be the SAE's ("cuda:1")
        with torch.cuda.device(self.device):
            return self._step(batch, with_aux)

    def _step(self, batch: Tensor, with_aux: bool) -> Tensor:
        graph = self.graphs.get(with_aux)
        if graph is None and not self.failed:
            if self.eager_calls[with_aux] < self.WARMUP:
                self.eager_calls[with_aux] += 1
                return self._on_side_stream(lambda: self.step_fn(batch, with_aux=with_aux))
            graph = self._capture(batch, with_aux)
        if graph is None:
            return self.step_fn(batch, with_aux=with_aux)
        self.x.copy_(batch)
        graph.replay()
        self.replays += 1
        return self.outs[with_aux]

    def _on_side_stream(self, fn):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def _capture(self, batch: Tensor, with_aux: bool) -> torch.cuda.CUDAGraph | None:
        if self.x is None:
            self.x = torch.empty_like(batch)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outs[with_aux] = self.step_fn(self.x, with_aux=with_aux)
        except RuntimeError as err:   # an op that cannot be captured: eager steps are slower, not wrong
            warnings.warn(f"SAE training: CUDA graph capture failed ({err}); training with eager steps")
            self.failed = True
            torch.cuda.synchronize()
            return None
        self.graphs[with_aux] = graph
        return graph
