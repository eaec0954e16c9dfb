"""Tiny random-weight causal LMs of every architecture emlab supports, built from configs
(nothing is downloaded), with the vocabulary of a given tokenizer."""

from __future__ import annotations

import torch
import transformers as tf


# Per architecture: its config class and the fields that keep it small (head_dim, windows) or
# exercise its variant (grouped-query attention). h is the hidden size; heads are 16 wide.
def _arch_fields(arch: str, h: int):
    heads, ffn = h // 16, 2 * h
    gqa = dict(hidden_size=h, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    mha = dict(hidden_size=h, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=heads)
    return {
        "llama": (tf.LlamaConfig, gqa),
        "qwen2": (tf.Qwen2Config, gqa),
        "qwen3": (tf.Qwen3Config, dict(gqa, head_dim=16)),
        "gemma": (tf.GemmaConfig, dict(gqa, head_dim=16)),
        "gemma2": (tf.Gemma2Config, dict(gqa, head_dim=16, sliding_window=8)),
        "gemma3_text": (tf.Gemma3TextConfig, dict(gqa, head_dim=16, sliding_window=8)),
        "mistral": (tf.MistralConfig, gqa),
        "phi3": (tf.Phi3Config, mha),
        "olmo2": (tf.Olmo2Config, mha),
        "gpt2": (tf.GPT2Config, dict(n_embd=h, n_head=heads, n_positions=512)),
        "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=h, intermediate_size=ffn, num_attention_heads=heads)),
    }[arch]


ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "mistral", "phi3", "olmo2", "gpt2", "gpt_neox")


def tiny_causal_lm(arch: str, tokenizer, *, seed: int = 0, init_std: float = 0.2, layers: int = 2, hidden: int = 32):
    """A random ``arch`` model in eval mode. ``init_std`` well above the usual 0.02 gives random
    models whose greedy continuations vary with the prompt, so generation tests can fail."""
    cls, kw = _arch_fields(arch, hidden)
    layer_key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    config = cls(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False, initializer_range=init_std,
        **({} if arch == "gpt2" else {"max_position_embeddings": 512}), **{layer_key: layers}, **kw,
    )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_lora(model, *, seed: int = 0):
    """``model`` wrapped in a peft LoRA with non-zero adapter weights (so it differs from the base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config).eval()
