"""The SAE training settings (``sae.train`` in the config): one dataclass, validated, with the sizes
that follow from the input width (latents, learning rate, AuxK width)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..schema import ConfigError

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
