"""Loading models by path, exactly as a hub model is loaded: the organism and hub models share this code.

A "model reference" in emlab is a base model (HF hub id or local folder) plus an optional
adapter folder (a peft LoRA saved by the SFT stage). Full fine-tunes are plain model folders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(requested: str, device: str):
    """fp32 on CPU (bf16 matmuls are ~20x slower on CPUs without avx512_bf16), bf16 on GPUs."""
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[requested]


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:  # many hub chat models ship without a pad token
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
               device: str = "auto", dtype: str = "auto", merge: bool = False) -> tuple[Any, Any]:
    """Return (model, tokenizer) in eval mode. With ``adapter``, the peft adapter is applied
    (and merged into the weights when ``merge``; merging makes generation faster and leaves the
    layer structure of the base model, which activation reading and steering rely on)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    # A full fine-tune is its own model folder; an adapter folder names its base in adapter_config.
    tok = load_tokenizer(adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists() else base)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
