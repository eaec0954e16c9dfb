"""The SAE training settings (``sae.train`` in the config): one dataclass, validated, with the sizes
that follow from the input width (latents, learning rate, AuxK width). Its defaults are the schema's."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..schema import ConfigError, schema_defaults

LR_REFERENCE_LATENTS = 2 ** 14  # the base lr is the one for 2^14 latents (sparsify's convention)


class SAEConfigError(ConfigError):
    """A bad SAE setting; the message names the config key."""


# The schema (workflow/schemas/config.schema.yaml, sae.train) is the one home of these defaults and their meanings:
# a library caller and the workflow get the same SAE from the same keys.
_DEFAULTS = schema_defaults("sae", "train")


@dataclass
class SAETrainConfig:
    k: int = _DEFAULTS["k"]
    n_latents: int | None = _DEFAULTS["n_latents"]
    expansion_factor: int = _DEFAULTS["expansion_factor"]
    batch_tokens: int = _DEFAULTS["batch_tokens"]
    lr: float = _DEFAULTS["lr"]
    lr_warmup_frac: float = _DEFAULTS["lr_warmup_frac"]
    lr_decay_frac: float = _DEFAULTS["lr_decay_frac"]
    epochs: float = _DEFAULTS["epochs"]
    train_tokens: int | None = _DEFAULTS["train_tokens"]
    k_aux: int | None = _DEFAULTS["k_aux"]
    auxk_coef: float = _DEFAULTS["auxk_coef"]
    dead_tokens_threshold: int = _DEFAULTS["dead_tokens_threshold"]
    normalize_activations: bool = _DEFAULTS["normalize_activations"]
    init_sample_tokens: int = _DEFAULTS["init_sample_tokens"]
    cuda_graphs: bool = _DEFAULTS["cuda_graphs"]
    tf32: bool = _DEFAULTS["tf32"]
    normalize_grad: bool = _DEFAULTS["normalize_grad"]
    # Not in the schema's sae.train: the workflow passes its top-level `seed` and `device`.
    seed: int = 0
    device: str = "auto"

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
