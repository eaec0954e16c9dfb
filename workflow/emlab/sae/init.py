"""An SAE's starting point: the decoder bias at the geometric median of the activations, random unit decoder
rows, the encoder their transpose, scaled to the data."""

from __future__ import annotations

import torch
from torch import Tensor

from .topk import TopKSAE

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
