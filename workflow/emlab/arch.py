"""Where the residual stream lives in a decoder-only causal LM, found from the model's structure.

Everything in emlab that reads or edits model internals (activation caching, steered sampling, SAE
splicing) finds layer L through :func:`residual_module`. The decoder blocks and the final norm are
found by structure, not looked up by model type (:func:`find_spec`): the decoder is what the model's
``get_decoder()`` returns (for multimodal wrappers such as ``Gemma3ForConditionalGeneration``, the
language model), its blocks are its list of identical modules as long as the text config's number
of layers, and its final norm is the norm module it registers after them. :data:`EXCEPTIONS` holds
the few architectures whose structure says otherwise (none at present).

"The residual stream after layer L" is the OUTPUT of decoder block L (0-based). It equals
``output_hidden_states[L + 1]`` for every layer but the last: HF models apply the final norm
before appending the last hidden state, so ``hidden_states[-1]`` is
``final_norm(output of the last block)``.

A model may come in three wrappings, all handled here:

- a plain transformers ``*ForCausalLM`` (or its bare backbone, e.g. ``LlamaModel``, or a
  multimodal ``*ForConditionalGeneration`` whose language model is read);
- a peft ``PeftModel`` (LoRA), whose layers sit under ``base_model.model.<plain path>``;
- an nnsight ``TransformersModel`` around either of the above, for which the returned object
  is the nnsight proxy (Envoy) of the block, so ``.output`` can be read or set in a trace.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


class UnsupportedArchitecture(ValueError):
    """No decoder blocks (or no final norm) can be found in the model."""


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the model (e.g. the *ForCausalLM) to the ModuleList of decoder blocks
    final_norm: str | None  # dotted path to the norm applied after the last block (None: the model has none)


# Keyed by ``config.model_type``: architectures whose structure the search gets wrong.
EXCEPTIONS: dict[str, ArchSpec] = {}

_SPECS: "weakref.WeakKeyDictionary[Any, ArchSpec]" = weakref.WeakKeyDictionary()


def text_config(config: Any) -> Any:
    """The config of the language model (itself for text-only models)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _is_norm(name: str, module: Any) -> bool:
    """A normalisation module that is not the embeddings' (e.g. BART's ``layernorm_embedding``)."""
    return "norm" in type(module).__name__.lower() and "emb" not in name.lower()


_FINAL_HINTS = ("final", "_f", "out")


def find_spec(hf_model: Any) -> ArchSpec:
    """The decoder blocks and final norm of a transformers model (no peft/nnsight wrapping), from its structure."""
    import torch.nn as nn

    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type in EXCEPTIONS:
        return EXCEPTIONS[model_type]
    names = {id(m): name for name, m in hf_model.named_modules()}
    try:
        decoder = hf_model.get_decoder()
    except Exception:  # noqa: BLE001 - a model without the method, or one that raises for exotic layouts
        decoder = hf_model
    if id(decoder) not in names:
        decoder = hf_model
    n_layers = getattr(text_config(hf_model.config), "num_hidden_layers", None)
    # blocks: the first list under the decoder with one module per layer (hybrid models mix block classes);
    # failing that, the longest list of identical modules
    lists = [(name, m) for name, m in decoder.named_modules(prefix=names[id(decoder)])
             if isinstance(m, nn.ModuleList) and len(m)]
    exact = [(name, m) for name, m in lists if len(m) == n_layers]
    uniform = sorted(((name, m) for name, m in lists if len({type(x) for x in m}) == 1), key=lambda x: -len(x[1]))
    found = exact or uniform
    if not found:
        raise UnsupportedArchitecture(
            f"{type(hf_model).__name__} (model type {model_type!r}): no list of decoder blocks found under "
            f"{type(decoder).__name__}; add its paths to emlab.arch.EXCEPTIONS")
    layers_name, layers = found[0]
    # the final norm: a norm module beside the blocks, preferably named as one ("norm_f", "final_layernorm",
    # "ln_out"), else the one registered after them
    parent_name = layers_name.rpartition(".")[0]
    parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
    children = list(parent.named_children())
    norms = [name for name, m in children if _is_norm(name, m)]
    named = [n for n in norms if any(h in n.lower() for h in _FINAL_HINTS)]
    after = [name for name, m in children[[m for _, m in children].index(layers) + 1:] if _is_norm(name, m)]
    norm = (named or after or (norms if len(norms) == 1 else [None]))[0]
    return ArchSpec(layers_name, f"{parent_name}.{norm}".lstrip(".") if norm else None)


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
    spec = _SPECS.get(hf_model)
    if spec is None:
        spec = _SPECS[hf_model] = find_spec(hf_model)
    return spec


def _walk(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _resolve(model: Any, which: str) -> Any:
    """The module (or nnsight proxy) at the spec's ``which`` path, below any peft wrapping."""
    hf_model = unwrap(model)
    path = getattr(_spec(hf_model), which)
    if path is None:
        raise UnsupportedArchitecture(f"{type(hf_model).__name__} has no final norm after its decoder blocks")
    return _walk(model, _peft_prefix(model) + path)


def _layers(model: Any) -> Any:
    return _resolve(model, "layers")


def num_layers(model: Any) -> int:
    return len(_layers(unwrap(model)))


def hidden_size(model: Any) -> int:
    return int(text_config(unwrap(model).config).hidden_size)


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


class _PrefixDone(Exception):
    """Raised by :func:`prefix_output`'s hook to end the forward at the block it reads."""


def prefix_output(model: Any, layer: int, **inputs: Any) -> Any:
    """The output of decoder block ``layer`` on ``inputs`` (the model's keyword arguments), as the block returned
    it; the forward stops there, so nothing above the block (nor the unembedding) runs."""
    block = residual_module(model, layer)
    got: dict[str, Any] = {}

    def hook(_mod, _inputs, output):
        got["output"] = output
        raise _PrefixDone

    handle = block.register_forward_hook(hook)
    try:
        model(**inputs)
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    return got["output"]


@contextmanager
def reusing_prefix(model: Any, layer: int, output: Any) -> Iterator[None]:
    """While active, the blocks below ``layer`` pass their input through and block ``layer`` returns ``output``
    (its output on the same inputs: :func:`prefix_output`) without computing it; hooks on the block (a steering
    edit, an SAE splice) still apply to what it returns. A forward of those inputs then costs only the blocks
    above ``layer`` and the unembedding, and gives what the full forward gives: many edits at one layer (the
    strengths of a steering sweep, an SAE splice beside zero-ablation) share one pass through the layers below
    it. Valid only for a forward on the inputs ``output`` was computed from."""
    unwrapped = unwrap(model)
    blocks, top = _layers(unwrapped), layer_index(unwrapped, layer)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return with_layer_hidden(output, args[0] if args else kwargs["hidden_states"])

    def cached(*_args: Any, **_kwargs: Any) -> Any:
        return output

    patched = [blocks[i] for i in range(top + 1)]
    # a forward already set on the instance (accelerate's device hooks set one) comes back afterwards
    before = [vars(block).get("forward") for block in patched]
    for i, block in enumerate(patched):
        block.forward = cached if i == top else passthrough  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block, forward in zip(patched, before):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


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
