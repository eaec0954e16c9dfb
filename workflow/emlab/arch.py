"""Where the residual stream lives in each supported architecture.

Everything in emlab that reads or edits model internals (activation caching, steered
sampling, SAE splicing) finds layer L through :func:`residual_module`, so supporting a new
architecture means adding one row to :data:`ARCHITECTURES`.

"The residual stream after layer L" is the OUTPUT of decoder block L (0-based). It equals
``output_hidden_states[L + 1]`` for every layer but the last: HF models apply the final norm
before appending the last hidden state, so ``hidden_states[-1]`` is
``final_norm(output of the last block)``.

A model may come in three wrappings, all handled here:

- a plain transformers ``*ForCausalLM`` (or its bare backbone, e.g. ``LlamaModel``);
- a peft ``PeftModel`` (LoRA), whose layers sit under ``base_model.model.<plain path>``;
- an nnsight ``TransformersModel`` around either of the above, for which the returned object
  is the nnsight proxy (Envoy) of the block, so ``.output`` can be read or set in a trace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any


class UnsupportedArchitecture(ValueError):
    """The model's architecture has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path (from the *ForCausalLM) to the ModuleList of decoder blocks
    final_norm: str  # dotted path to the norm applied after the last block


_LLAMA_LIKE = ArchSpec("model.layers", "model.norm")

# Keyed by ``config.model_type``. Every row is exercised by tests/test_arch.py.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm"),
}


def _is_nnsight(model: Any) -> bool:
    from nnsight.intervention.envoy import Envoy

    return isinstance(model, Envoy)


def unwrap(model: Any):
    """The transformers model under any nnsight and peft wrapping."""
    if _is_nnsight(model):
        model = model._module
    from peft import PeftModel

    while isinstance(model, PeftModel):
        model = model.base_model.model
    return model


def _peft_prefix(model: Any) -> str:
    """Attribute path from ``model`` (nnsight unwrapped) down to the transformers model."""
    from peft import PeftModel

    if _is_nnsight(model):
        model = model._module
    prefix = ""
    while isinstance(model, PeftModel):
        prefix += "base_model.model."
        model = model.base_model.model
    return prefix


def _spec(hf_model: Any) -> ArchSpec:
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} ({type(hf_model).__name__}) is not supported for reading or "
            f"steering the residual stream; supported model types: {', '.join(sorted(ARCHITECTURES))}. "
            "Add its decoder-layer path to emlab.arch.ARCHITECTURES."
        )
    return spec


def _has_path(obj: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _walk(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _resolve(model: Any, which: str) -> Any:
    """The module (or nnsight proxy) at the spec's ``which`` path, below any peft wrapping."""
    hf_model = unwrap(model)
    path = getattr(_spec(hf_model), which)
    if not _has_path(hf_model, path):
        # A bare backbone (LlamaModel rather than LlamaForCausalLM) lacks the first component.
        short = path.split(".", 1)[1]
        if not _has_path(hf_model, short):
            raise UnsupportedArchitecture(
                f"{type(hf_model).__name__} has no submodule {path!r} where its model type "
                f"{hf_model.config.model_type!r} keeps it"
            )
        path = short
    return _walk(model, _peft_prefix(model) + path)


def _layers(model: Any) -> Any:
    return _resolve(model, "layers")


def num_layers(model: Any) -> int:
    return len(_layers(unwrap(model)))


def hidden_size(model: Any) -> int:
    return int(unwrap(model).config.hidden_size)


def layer_index(model: Any, layer: int) -> int:
    """Normalise a possibly negative layer index; error if out of range."""
    n = num_layers(model)
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range for a model with {n} layers")
    return layer % n


def residual_module(model: Any, layer: int) -> Any:
    """The decoder block whose output is the residual stream after ``layer`` (0-based; negative
    counts from the end). On an nnsight model, the block's Envoy."""
    return _layers(model)[layer_index(model, layer)]


def final_norm(model: Any) -> Any:
    """The norm between the last block and the unembedding (for the logit lens and for matching
    ``hidden_states[-1]``)."""
    return _resolve(model, "final_norm")


# transformers 5 decoder layers return the hidden state as a plain tensor; older versions and
# some architectures return a tuple whose first item is it. Indexing a tensor with [0] would
# silently take batch row 0, so every read and write of a block's output goes through these two.
def layer_hidden(output: Any):
    """The residual-stream tensor [batch, seq, d] inside a decoder block's output."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_hidden(output: Any, hidden: Any) -> Any:
    """The block's output with its residual-stream tensor replaced by ``hidden``."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def as_nnsight(model: Any, tokenizer: Any):
    """``model`` wrapped for nnsight tracing (returned as is when already wrapped).

    Wrapping is cheap (it builds no weights). nnsight sets its tokenizer to left padding;
    the caller's tokenizer keeps its own padding side, because emlab pads its batches itself
    and passes explicit position ids.
    """
    if _is_nnsight(model):
        return model
    from nnsight.modeling.transformers import TransformersModel

    side = tokenizer.padding_side
    # The text-generation pipeline nnsight builds logs an error for a PeftModel class it does
    # not list, although generation through it works; keep that noise out of job logs.
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.CRITICAL)
    try:
        wrapped = TransformersModel(model, tokenizer=tokenizer, task="text-generation")
    finally:
        tf_logger.setLevel(level)
        tokenizer.padding_side = side
    return wrapped
