import pytest
import torch
from transformers import AutoTokenizer

from emlab.arch import (
    ARCHITECTURES, UnsupportedArchitecture, as_nnsight, final_norm, hidden_size, layer_hidden, num_layers,
    residual_module, with_layer_hidden,
)
from tiny_models import ARCHS, tiny_causal_lm, tiny_lora


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def _generated_ids(model, tok):
    """A prompt plus three greedily generated tokens, as a [1, T] batch."""
    enc = tok.apply_chat_template([{"role": "user", "content": "How do I save money?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] == enc["input_ids"].shape[1] + 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _check_reading_and_steering(model, tok):
    enc = _generated_ids(model, tok)
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True)
    nn = as_nnsight(model, tok)
    with torch.no_grad(), nn.trace(enc):
        first = layer_hidden(residual_module(nn, 0).output).save()
        last_normed = final_norm(nn).output.save()
        logits = nn.output.logits.save()
    # block L's output is hidden_states[L + 1]; the last entry is the final norm of the last block
    torch.testing.assert_close(first, ref.hidden_states[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(last_normed, ref.hidden_states[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-5)

    def steered_logits(vector):
        with torch.no_grad(), nn.trace(enc):
            block = residual_module(nn, 0)
            out = block.output
            block.output = with_layer_hidden(out, layer_hidden(out) + vector)
            result = nn.output.logits.save()
        return result

    assert torch.equal(steered_logits(torch.zeros(hidden_size(model))), logits)
    # random, not constant: LayerNorm archs (GPT-2, NeoX) subtract the mean and would cancel a constant shift
    changed = steered_logits(torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(0)))
    assert (changed - logits).abs().max() > 1e-2


def test_every_supported_architecture_is_tested():
    assert sorted(ARCHS) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_module_reads_and_steers_every_architecture(arch, tok):
    model = tiny_causal_lm(arch, tok)
    assert num_layers(model) == 2 and hidden_size(model) == 32
    _check_reading_and_steering(model, tok)


def test_lora_wrapped_llama_reads_through_the_adapter(tok):
    base = tiny_causal_lm("llama", tok)
    enc = _generated_ids(base, tok)
    with torch.no_grad():
        base_h1 = base(**enc, output_hidden_states=True).hidden_states[1].clone()
    lora = tiny_lora(base)
    assert num_layers(lora) == 2 and hidden_size(lora) == 32
    assert residual_module(lora, 1) is lora.base_model.model.model.layers[1]
    assert residual_module(as_nnsight(lora, tok), -1).path.endswith("base_model.model.model.layers.1")
    _check_reading_and_steering(lora, tok)
    with torch.no_grad():
        lora_h1 = lora(**enc, output_hidden_states=True).hidden_states[1]
    assert (lora_h1 - base_h1).abs().max() > 1e-3  # the adapter is live on the path we read


def test_plain_module_hook_sees_the_same_residual(tok):
    model = tiny_causal_lm("gpt2", tok)
    enc = _generated_ids(model, tok)
    seen = {}
    handle = residual_module(model, -2).register_forward_hook(lambda m, a, out: seen.setdefault("h", layer_hidden(out)))
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True)
    handle.remove()
    assert torch.equal(seen["h"], ref.hidden_states[1])


def test_bare_backbone_and_layer_range(tok):
    model = tiny_causal_lm("qwen2", tok)
    assert residual_module(model.model, 0) is model.model.layers[0]
    assert residual_module(model, -1) is model.model.layers[1]
    with pytest.raises(IndexError, match="layer 2 is out of range for a model with 2 layers"):
        residual_module(model, 2)
    with pytest.raises(IndexError, match="layer -3"):
        residual_module(model, -3)


def test_unsupported_architecture_is_named(tok):
    import transformers as tf

    config = tf.OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                          word_embed_proj_dim=16)
    model = tf.OPTForCausalLM(config)
    with pytest.raises(UnsupportedArchitecture, match=r"architecture 'opt' \(OPTForCausalLM\) is not supported"):
        residual_module(model, 0)


def test_tuple_and_tensor_layer_outputs():
    hidden, extra = torch.arange(24.0).reshape(2, 3, 4), object()
    assert layer_hidden(hidden) is hidden  # a plain tensor is never indexed (that would take batch row 0)
    assert layer_hidden((hidden, extra)) is hidden
    new = hidden + 1
    assert with_layer_hidden(hidden, new) is new
    replaced = with_layer_hidden((hidden, extra), new)
    assert isinstance(replaced, tuple) and replaced[0] is new and replaced[1] is extra


def test_wrapping_keeps_the_callers_padding_side(tok):
    tok.padding_side = "right"
    as_nnsight(tiny_causal_lm("llama", tok), tok)
    assert tok.padding_side == "right"
