"""SAEs on disk in the SAELens format, so emlab's SAEs load in sae_lens and SAELens SAEs load here.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``). emlab writes the SAELens 6 layout
(where ``model_name``, ``hook_name`` and friends live under ``metadata``) and repeats
``model_name``, ``hook_name``, ``hook_layer`` and the activation function at the top level, where
SAELens before 6.0 looked for them. Both layouts are read.

Variants SAELens can write are folded into emlab's one form when loading, since each is an exact
rewrite of the weights: ``apply_b_dec_to_input: false`` (b_dec not subtracted before the
encoder) and ``rescale_acts_by_decoder_norm: true`` (latents scaled by decoder row norms).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from emlab import __version__
from emlab.io import replace_as_new_file

from .topk import TopKSAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# The SAELens on-disk layout this writer follows; readers use it to pick their parser.
SAELENS_FORMAT_VERSION = "6.0.0"
LEGACY_TOP_LEVEL_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size",
                         "prepend_bos", "dataset_path")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


class SAEFormatError(ValueError):
    """An SAE folder that is not a loadable TopK SAE; the message names the file."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_sae(sae: TopKSAE, folder: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` to ``folder`` (created if needed); ``meta`` (model_name, hook_name,
    hook_layer, ...) is merged over ``sae.meta``. Each file is replaced atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**sae.meta, **(meta or {})}
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": _dtype_name(sae.W_enc.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",   # emlab folds any input scaling into the weights
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        **{key: meta[key] for key in LEGACY_TOP_LEVEL_KEYS if key in meta},
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                     "emlab_version": __version__, **meta},
    }
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_FILENAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        replace_as_new_file(tmp, folder / WEIGHTS_FILENAME)
    finally:
        Path(tmp).unlink(missing_ok=True)
    tmp_cfg = folder / f".{CFG_FILENAME}.tmp"
    tmp_cfg.write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_cfg, folder / CFG_FILENAME)
    return folder


def _read_cfg(folder: Path) -> dict[str, Any]:
    path = folder / CFG_FILENAME
    if not path.is_file():
        raise SAEFormatError(f"{path}: no such file (an SAELens SAE folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path}: expected a JSON object")
    return cfg


def load_sae(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | str | None = None) -> TopKSAE:
    """Read a TopK SAE folder in the SAELens format (written by emlab or by sae_lens, 6.x or
    older). ``dtype`` defaults to the stored one. ``sae.meta`` gets the folder's metadata."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = _read_cfg(folder)
    where = folder / CFG_FILENAME
    arch = cfg.get("architecture")
    if arch is None:  # before SAELens 6 the architecture followed from the activation function
        arch = "topk" if (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk" else "standard"
    if arch != "topk":
        raise SAEFormatError(f"{where}: architecture {arch!r} is not supported; emlab loads TopK SAEs only")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    for key, value in (("d_in", cfg.get("d_in")), ("d_sae", cfg.get("d_sae")), ("k", k)):
        if not isinstance(value, int) or value <= 0:
            raise SAEFormatError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise SAEFormatError(
            f"{where}: normalize_activations={norm!r} is not supported; emlab SAEs take raw activations "
            "(for a pretrained release, loading it by release id folds the scaling factor)")
    if cfg.get("reshape_activations", "none") != "none":
        raise SAEFormatError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention-head "
                             "SAEs) is not supported; emlab SAEs read the residual stream")

    weights_path = folder / WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise SAEFormatError(f"{weights_path}: no such file")
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        if name not in tensors:
            raise SAEFormatError(f"{weights_path}: missing tensor '{name}' (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)}, "
                                 f"{CFG_FILENAME} implies {shape}")
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors and not torch.all(tensors[name] == 1):
            raise SAEFormatError(f"{weights_path}: a '{name}' other than 1 is not supported")

    stored = tensors["W_enc"].dtype
    target = _DTYPES[dtype] if isinstance(dtype, str) else (dtype or stored)
    # Fold the SAELens variants in float32 at least, then cast.
    work = {name: tensors[name].to(torch.promote_types(stored, torch.float32)) for name in shapes}
    if cfg.get("rescale_acts_by_decoder_norm"):
        # topk(pre * |W_dec_i|) then acts / |W_dec_i| @ W_dec == the same with unit decoder rows
        # and the encoder columns and bias multiplied by the norms.
        norms = work["W_dec"].norm(dim=1).clamp_min(1e-8)
        work["W_enc"] = work["W_enc"] * norms
        work["b_enc"] = work["b_enc"] * norms
        work["W_dec"] = work["W_dec"] / norms.unsqueeze(1)
    if cfg.get("apply_b_dec_to_input") is False:
        # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        work["b_enc"] = work["b_enc"] + work["b_dec"] @ work["W_enc"]

    meta = {key: cfg[key] for key in LEGACY_TOP_LEVEL_KEYS if cfg.get(key) is not None}
    meta.update(cfg.get("metadata") or {})
    if meta.get("hook_layer") is None and isinstance(meta.get("hook_name"), str):
        found = re.search(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)", meta["hook_name"])
        if found:
            meta["hook_layer"] = int(found.group(1))
    sae = TopKSAE(d_in, d_sae, k, dtype=target, device=device, meta=meta)
    with torch.no_grad():
        for name in shapes:
            getattr(sae, name).copy_(work[name])
    return sae


def resolve_pretrained(spec: str | os.PathLike | Mapping[str, Any], *, device: str | torch.device = "cpu",
                       dtype: torch.dtype | str | None = None, where: str = "sae.pretrained") -> TopKSAE:
    """A pretrained SAE from config: a local folder (``path``, or a plain string), or a SAELens
    release (``release`` + ``sae_id``), which needs the sae_lens package and the HuggingFace hub."""
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": spec}
    spec = dict(spec)
    unknown = sorted(set(spec) - {"path", "release", "sae_id"})
    if unknown:
        raise SAEFormatError(f"{where}: unknown key(s) {unknown}; give 'path', or 'release' and 'sae_id'")
    if "path" in spec:
        if "release" in spec or "sae_id" in spec:
            raise SAEFormatError(f"{where}: give either 'path' or 'release' + 'sae_id', not both")
        path = Path(spec["path"])
        if not path.is_dir():
            raise SAEFormatError(f"{where}.path: {path} is not a folder")
        return load_sae(path, device=device, dtype=dtype)
    if not spec.get("release") or not spec.get("sae_id"):
        raise SAEFormatError(f"{where}: a SAELens release needs both 'release' and 'sae_id'")
    return _load_release(str(spec["release"]), str(spec["sae_id"]), device=device, dtype=dtype, where=where)


def _load_release(release: str, sae_id: str, *, device, dtype, where: str) -> TopKSAE:
    try:
        from sae_lens import SAE
    except ImportError:
        raise SAEFormatError(f"{where}.release: loading a SAELens release needs the sae_lens package "
                             "(pip install sae-lens); or download the SAE folder and set "
                             f"{where}.path instead") from None
    try:
        # from_pretrained folds a release's activation scaling factor into the weights.
        released = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # hub unreachable, offline mode, unknown release or id
        raise SAEFormatError(
            f"{where}: could not load SAELens release {release!r} sae_id {sae_id!r}: {type(e).__name__}: {e}. "
            "A release id is fetched from the HuggingFace hub (HF_HUB_OFFLINE must be unset and the hub "
            f"reachable); on an offline machine, copy the SAE folder over and set {where}.path") from None
    with tempfile.TemporaryDirectory() as tmp:
        # Go through the files so that one reader handles every SAELens variant.
        released.save_model(tmp)
        sae = load_sae(tmp, device=device, dtype=dtype)
    sae.meta.setdefault("sae_lens_release", release)
    sae.meta.setdefault("sae_lens_sae_id", sae_id)
    return sae
