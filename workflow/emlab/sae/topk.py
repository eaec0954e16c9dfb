"""A TopK sparse autoencoder (Gao et al. 2024) in the SAELens parameter layout.

Parameters and shapes follow SAELens, so saving and loading are plain copies::

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]

    encode(x) = TopK(ReLU((x - b_dec) @ W_enc + b_enc))     (the k largest, the rest 0)
    decode(a) = a @ W_dec + b_dec

Only k of the d_sae latents are active per token, so the sparse form (values and indices,
``[..., k]`` each) is what the model computes with; the dense form exists for callers that
want a ``[..., d_sae]`` activation vector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import cpu_kernels


class TopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None, meta: dict[str, Any] | None = None):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        # Where the SAE reads from (model_name, hook_name, hook_layer, ...): saved in cfg.json.
        self.meta: dict[str, Any] = dict(meta or {})

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}"

    # --- encoding -------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) of the active latents, each ``[..., k]``; values are >= 0."""
        pre = self.pre_acts(x)
        flat = pre.reshape(-1, self.d_sae)
        vals, idx = select_topk(flat, self.k)
        shape = (*pre.shape[:-1], self.k)
        return vals.clamp_min(0).reshape(shape), idx.reshape(shape)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations ``[..., d_sae]`` (zero outside the top k)."""
        vals, idx = self.encode_sparse(x)
        return torch.zeros(*vals.shape[:-1], self.d_sae, dtype=vals.dtype,
                           device=vals.device).scatter_(-1, idx, vals)

    # --- decoding -------------------------------------------------------------------------
    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        flat_v, flat_i = vals.reshape(-1, vals.shape[-1]), idx.reshape(-1, idx.shape[-1])
        # embedding_bag sums k decoder rows per token without materialising [n, d_sae].
        out = nn.functional.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v.to(self.W_dec.dtype),
                                          mode="sum")
        return (out + self.b_dec).reshape(*vals.shape[:-1], self.d_in)

    def decode(self, acts: Tensor) -> Tensor:
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x`` (same shape), in the SAE's dtype."""
        return self.decode_sparse(*self.encode_sparse(x))

    # --- weight surgery -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on ``x * scale`` take raw ``x``: the same latents and ``x_hat / scale``.

        (x - b_dec/s) @ (s W_enc) = (s x - b_dec) @ W_enc, and (a W_dec + b_dec) / s is the
        decoder with both weights divided by s; the latents (and so the top-k choice) are unchanged.
        """
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)


# Where select_topk uses the grouped search: device type -> the fewest latents it is used for. On CPU it is
# 1.3-3x faster than torch.topk at 384-16k latents. With CUDA, in SAE training on an H200
# (benchmarks/bench_sae.py, "emlab-ungrouped", two runs each, the encoder matmul in TF32), it made steps
# 8% and 13% faster at 8192 latents, but 7% faster and 11% slower at 4096 and no difference at 512: torch's
# top-k pays for long rows, which the grouped search shortens eightfold.
GROUPED_MIN_LATENTS: dict[str, int] = {"cpu": 0, "cuda": 8192}


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``pre [n, m]``: (values, indices), unsorted.

    Exactly the values ``torch.topk`` returns (indices may differ only between equal values).
    A full top-k reads every entry with a heap, while the k winners must lie in the k column
    groups whose maxima are largest (the k group maxima are k entries >= the smallest of them),
    so we take a cheap vectorised max over groups, pick the k best groups, and run the top-k on
    those k * group_size candidates only. Values are gathered from ``pre`` (autograd sees a gather).
    On CPU (float32, few threads, no autograd) a compiled kernel runs the same search row by row.
    """
    if not pre.requires_grad:
        found = cpu_kernels.topk(pre, k)
        if found is not None:
            return found
    n, m = pre.shape
    group = cpu_kernels.grouping(m, k)
    min_latents = GROUPED_MIN_LATENTS.get(pre.device.type)
    if group is None or min_latents is None or m < min_latents:
        return _topk(pre, k)
    n_groups = m // group
    pre = pre.contiguous()
    # Group g holds columns g, g + n_groups, g + 2 n_groups, ...: the max over the middle axis
    # of a [n, group, n_groups] view is an elementwise max of contiguous rows (vectorises well).
    group_max = pre.view(n, group, n_groups).amax(dim=1)
    best_groups = _topk(group_max, k)[1]
    offsets = torch.arange(0, m, n_groups, device=pre.device)
    cand = (best_groups.unsqueeze(2) + offsets).view(n, k * group)
    vals, pos = _topk(pre.gather(1, cand), k)
    return vals, cand.gather(1, pos)


def _topk(a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of a 2-D tensor and their column indices, in no particular order."""
    return a.topk(k, dim=1, sorted=False)
