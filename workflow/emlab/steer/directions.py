"""Named steering directions: unit vectors in the residual stream, each with its provenance.

A direction is a unit vector ``[d_model]`` plus a JSON-able record of where it came from
(``kind`` and the inputs that determine it), so a steering result can always be traced back to
the SAE latent, the graded samples or the seed behind it. Kinds:

- ``sae_latent``: an SAE decoder row (``W_dec[latent]``), the paper's persona features;
- ``mean_difference``: mean residual activation of misaligned answers minus that of aligned,
  coherent answers (read from activation caches joined with grade rows);
- ``random``: a seeded Gaussian direction, the control; every direction is normalised, so at a
  given strength a random direction is added with exactly the norm of the others;
- ``file``: a user's saved vector (safetensors with one tensor, or a torch ``.pt`` file).

A set of directions is one safetensors file: tensor ``<name>`` per direction (float32, unit norm)
and the provenance of all of them as JSON in the metadata key ``emlab_directions``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .names import DirectionError, check_name

FORMAT = "emlab-directions/1"
META_KEY = "emlab_directions"


@dataclass
class Direction:
    name: str
    vector: torch.Tensor  # float32 [d_model], unit norm
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name)
        v = torch.as_tensor(self.vector).detach().to("cpu", torch.float32)
        if v.ndim != 1:
            raise DirectionError(f"direction {self.name!r}: expected a vector [d_model], got shape {list(v.shape)}")
        if not torch.isfinite(v).all():
            raise DirectionError(f"direction {self.name!r}: contains NaN or infinite values")
        norm = float(v.norm())
        if not norm > 0:
            raise DirectionError(f"direction {self.name!r}: is the zero vector")
        self.vector = v / norm

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])


def sae_latent(sae, latent: int, name: str | None = None) -> Direction:
    """The decoder direction of SAE latent ``latent`` (named ``L<latent>`` unless ``name``)."""
    if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < sae.d_sae:
        raise DirectionError(f"latent {latent!r} is out of range for an SAE with d_sae={sae.d_sae}")
    row = sae.W_dec[latent].detach()
    meta = {k: sae.meta[k] for k in ("model_name", "hook_name", "hook_layer") if k in sae.meta}
    return Direction(name or f"L{latent}", row,
                     {"kind": "sae_latent", "latent": latent, "d_sae": sae.d_sae, "decoder_norm": float(row.norm()),
                      **meta})


def text_id(question_id: Any, sample_idx: Any) -> str:
    """The activation-cache id of one sampled answer (joins caches with grade rows)."""
    return f"{question_id}#{sample_idx}"


def _grades_by_text_id(path: Path) -> dict[str, dict[str, Any]]:
    from ..io import iter_jsonl

    out: dict[str, dict[str, Any]] = {}
    for lineno, row in enumerate(iter_jsonl(path), 1):
        tid = text_id(row.get("question_id"), row.get("sample_idx"))
        if tid in out:
            raise DirectionError(f"{path}:{lineno}: a second grade for text id {tid!r} (question_id#sample_idx must "
                                 "be unique in one grades file to be joined with an activation cache)")
        out[tid] = row
    return out


def mean_difference(cache_dirs: Sequence[str | os.PathLike], grade_files: Sequence[str | os.PathLike], layer: int,
                    thresholds: Mapping[str, float] | None = None, name: str = "meandiff") -> Direction:
    """Mean residual activation (after ``layer``) of misaligned answers minus that of aligned,
    coherent answers.

    ``cache_dirs[i]`` is an activation cache (:mod:`emlab.activations`) of the answers graded in
    ``grade_files[i]`` (the same model's samples), with text ids ``f"{question_id}#{sample_idx}"``.
    Each answer counts once (its mean over the cached tokens), whatever its length. Answers with no
    verdict, and incoherent ones, are in neither group.
    """
    from ..activations import mean_activations
    from ..judge.schema import is_coherent, is_misaligned

    if len(cache_dirs) != len(grade_files) or not cache_dirs:
        raise DirectionError(f"mean_difference needs one grades file per activation cache "
                             f"(got {len(cache_dirs)} caches and {len(grade_files)} grade files)")
    groups: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for cache, grades in zip(cache_dirs, grade_files):
        acts, ids = mean_activations(cache, layer)
        by_id = _grades_by_text_id(Path(grades))
        for i, tid in enumerate(ids):
            row = by_id.get(str(tid))
            if row is None:
                raise DirectionError(f"{cache}: text id {tid!r} has no grade row in {grades}")
            mis = is_misaligned(row, dict(thresholds or {}))
            if mis is None:
                continue
            if mis or is_coherent(row, dict(thresholds or {})):
                groups[bool(mis)].append(acts[i].double())
    n_mis, n_ok = len(groups[True]), len(groups[False])
    if not n_mis or not n_ok:
        raise DirectionError(f"mean_difference needs misaligned and aligned coherent answers; found {n_mis} "
                             f"misaligned and {n_ok} aligned in {', '.join(map(str, grade_files))}")
    diff = torch.stack(groups[True]).mean(0) - torch.stack(groups[False]).mean(0)
    return Direction(name, diff.float(),
                     {"kind": "mean_difference", "layer": layer, "n_misaligned": n_mis, "n_aligned": n_ok,
                      "raw_norm": float(diff.norm()), "caches": [str(c) for c in cache_dirs],
                      "grades": [str(g) for g in grade_files]})


def random_direction(d: int, seed: int, name: str | None = None) -> Direction:
    """A Gaussian direction from ``seed`` (uniform on the sphere once normalised), named ``random<seed>``."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise DirectionError(f"random_direction: d must be a positive integer, got {d!r}")
    g = torch.Generator().manual_seed(int(seed))
    return Direction(name or f"random{seed}", torch.randn(d, generator=g, dtype=torch.float64).float(),
                     {"kind": "random", "seed": int(seed)})


def orthogonal_to(direction: Direction, others: Sequence[Direction]) -> Direction:
    """``direction`` with its components along ``others`` removed (then renormalised).

    A random control must not steer by chance overlap: a random unit vector overlaps any given direction
    by about 1/sqrt(d_model), which in a small residual stream (d=128: ~0.09) is enough, at strengths of a
    residual norm or two, to move a persona that a fine-tune holds in the balance."""
    if not others:
        return direction
    basis = torch.linalg.qr(torch.stack([o.vector.double() for o in others], dim=1)).Q  # [d, k] orthonormal
    v = direction.vector.double()
    v = v - basis @ (basis.T @ v)
    if not float(v.norm()) > 1e-6:
        raise DirectionError(f"direction {direction.name!r} lies in the span of {[o.name for o in others]}")
    return Direction(direction.name, v.float(), {**direction.provenance,
                                                  "orthogonal_to": [o.name for o in others]})


def save_directions(path: str | os.PathLike, directions: Sequence[Direction]) -> None:
    """Write a set of directions to one safetensors file (atomically)."""
    from safetensors.torch import save_file
    from emlab.io import replace_as_new_file

    names = [d.name for d in directions]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DirectionError(f"duplicate direction names: {dup}")
    if len({d.d_model for d in directions}) > 1:
        raise DirectionError(f"directions of different sizes: {({d.name: d.d_model for d in directions})}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "directions": {d.name: d.provenance for d in directions}}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({d.name: d.vector.contiguous() for d in directions}, str(tmp),
              metadata={META_KEY: json.dumps(meta)})
    replace_as_new_file(tmp, path)


def load_directions(path: str | os.PathLike) -> dict[str, Direction]:
    """The directions of a file written by :func:`save_directions`, by name, in file order."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DirectionError(f"{path}: directions file not found")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
        if raw is None:
            raise DirectionError(f"{path}: not an emlab directions file (no {META_KEY!r} metadata)")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise DirectionError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
        prov = meta["directions"]
        missing = sorted(set(prov) - set(f.keys()))
        if missing:
            raise DirectionError(f"{path}: no tensor for directions {missing}")
        return {name: Direction(name, f.get_tensor(name), prov[name]) for name in prov}
