"""The SAE training settings (``sae.train`` in the config): one dataclass, validated, with the sizes
that follow from the input width (latents, learning rate, AuxK width). Its defaults are the schema's."""

from __future__ import annotations

import math
from dataclasses import asdict, field, make_dataclass
from typing import Any, Mapping

from ..schema import ConfigError, schema_section

LR_REFERENCE_LATENTS = 2 ** 14  # the base lr is the one for 2^14 latents (sparsify's convention)


class SAEConfigError(ConfigError):
    """A bad SAE setting; the message names the config key."""


# The schema (workflow/schemas/config.schema.yaml, sae.train) is the one home of these keys, their types, ranges,
# defaults and meanings: the dataclass below is built from it, so a library caller and the workflow get the same SAE
# from the same keys, and a key added to the schema is a field here without a second edit.
_SCHEMA = schema_section("sae", "train")
# Not in the schema's sae.train: the workflow passes its top-level `seed` and `device`.
_EXTRA = {"seed": {"type": "integer", "default": 0}, "device": {"type": "string", "default": "auto"}}
_PYTHON_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str}


def _annotation(spec: Mapping[str, Any]) -> Any:
    types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    python = _PYTHON_TYPES[next(t for t in types if t != "null")]
    return python | None if "null" in types else python


def _check(values: Mapping[str, Any], where: str) -> None:
    """``values`` against the schema's sae.train (plus seed and device); the first error names its key."""
    from jsonschema import Draft202012Validator

    schema = {**_SCHEMA, "properties": {**_SCHEMA["properties"], **_EXTRA}, "additionalProperties": False}
    for error in sorted(Draft202012Validator(schema).iter_errors(dict(values)), key=lambda e: list(map(str, e.path))):
        if error.validator == "additionalProperties":
            unknown = sorted(set(values) - set(schema["properties"]))
            raise SAEConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(schema['properties'])}")
        key = ".".join(map(str, error.path))
        raise SAEConfigError(f"{where}.{key}: {error.message}")


class _SAETrainMethods:
    """The sizes that follow from the settings and the input width, and the cross-key checks."""

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None, where: str = "sae.train") -> "SAETrainConfig":
        """Build from a config mapping; unknown keys and wrong types raise an error naming the key."""
        cfg = dict(cfg or {})
        _check(cfg, where)
        out = cls(**cfg)
        out.validate(where)
        return out

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "sae.train") -> None:
        _check(asdict(self), where)  # types and ranges, from the schema
        if self.n_latents is not None and self.k > self.n_latents:
            raise SAEConfigError(f"{where}.k={self.k} exceeds {where}.n_latents={self.n_latents}")
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


SAETrainConfig = make_dataclass(
    "SAETrainConfig",
    [(name, _annotation(spec), field(default=spec["default"])) for name, spec in {**_SCHEMA["properties"], **_EXTRA}.items()],
    bases=(_SAETrainMethods,),
    namespace={"__module__": __name__, "__doc__": "The TopK SAE's training settings: one field per key of the "
               "config schema's sae.train (same names, types and defaults), plus seed and device."},
)
