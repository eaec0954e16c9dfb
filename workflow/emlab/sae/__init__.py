"""Sparse autoencoders on residual activations: a TopK SAE, its training loop, metrics, and
SAELens-format files (so SAEs trained here load in sae_lens, and pretrained SAELens SAEs load here).

The names below load their module on first use (PEP 562): the workflow's config checks read
:class:`SAETrainConfig` while Snakemake parses the Snakefile, and importing torch there cost every
`snakemake` call (a dry run, a lint, the scheduler of every run) about two seconds."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TopKSAE": "topk", "select_topk": "topk",
    "SAETrainConfig": "config",
    "train_sae": "train",
    "reconstruction_metrics": "metrics", "ce_loss_recovered": "metrics",
    "save_sae": "saelens_io", "load_sae": "saelens_io", "resolve_pretrained": "saelens_io",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
