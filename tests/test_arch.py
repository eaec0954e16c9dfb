import pytest
import torch
from transformers import AutoTokenizer

from emlab.arch import (
    UnsupportedArchitecture, as_nnsight, final_norm, find_spec, hidden_size, layer_hidden, num_layers, residual_module,
    with_layer_hidden,
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


# The decoder families researchers fine-tune, each built tiny from its own config class (sizes shrunk where the
# config has the field): the blocks and final norm found by structure must be the ones whose outputs the model
# reports as hidden_states[1] and hidden_states[-1]. No table of module paths is involved, so a family missing here
# is found the same way; the list is what this suite checks, not what emlab supports. (A scan over every causal LM
# of transformers also crashes on a few exotic ones whose default configs do not build small.)
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, vocab_size=128, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=2,
              n_positions=128, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              ffn_dim=64, d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
              encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
FAMILIES = ["bloom", "cohere", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neox", "granite", "llama",
            "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm",
            "starcoder2"]


def _tiny_from_config(model_type: str):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = default.get_text_config(decoder=True)
    small = {k: v for k, v in _SMALL.items() if hasattr(text, k)}
    if text is default:
        config = cls(**small)
    else:  # a multimodal wrapper: its text model is the part emlab reads
        sub = next(k for k, v in vars(default).items() if v is text)
        config = cls(**{sub: {**text.to_dict(), **small}})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if sum(p.numel() for p in model.parameters()) > 30_000_000:
        raise RuntimeError("not tiny")
    return model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_blocks_and_final_norm_are_found_by_structure(model_type):
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _tiny_from_config(model_type)
            ids = torch.randint(3, 100, (1, 8))
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    except Exception as e:  # noqa: BLE001 - name the family in the failure
        raise AssertionError(f"{model_type} does not build tiny: {type(e).__name__}: {str(e)[:200]}") from e
    assert hs, f"{model_type} reports no hidden states"
    got = {}
    residual_module(model, 0).register_forward_hook(lambda m, a, o: got.__setitem__("first", layer_hidden(o)))
    spec = find_spec(model)
    if spec.final_norm is not None:
        final_norm(model).register_forward_hook(
            lambda m, a, o: got.__setitem__("norm", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert num_layers(model) == model.config.get_text_config(decoder=True).num_hidden_layers
    torch.testing.assert_close(got["first"], hs[1], rtol=0, atol=1e-5)
    if spec.final_norm is not None:
        torch.testing.assert_close(got["norm"], hs[-1], rtol=0, atol=1e-5)


def test_a_multimodal_wrapper_is_read_through_its_language_model():
    from transformers import AutoModelForCausalLM, Gemma3Config

    config = Gemma3Config(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    spec = find_spec(model)
    assert spec.layers.endswith("language_model.layers") and spec.final_norm.endswith("language_model.norm")
    assert hidden_size(model) == 32


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


def test_a_model_without_decoder_blocks_is_named():
    import torch.nn as nn

    class Flat(nn.Module):  # a model type with no list of blocks anywhere
        config = type("Config", (), {"model_type": "flat", "num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitecture, match=r"Flat \(model type 'flat'\): no list of decoder blocks"):
        residual_module(Flat(), 0)


def test_opt_once_refused_by_a_table_is_found_by_structure(tok):
    import transformers as tf

    config = tf.OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                          word_embed_proj_dim=16)
    model = tf.OPTForCausalLM(config).eval()
    assert residual_module(model, 1) is model.model.decoder.layers[1]
    assert final_norm(model) is model.model.decoder.final_layer_norm


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


@pytest.mark.parametrize("arch", ARCHS)
def test_a_forward_that_reuses_the_layers_below_equals_the_full_forward(arch, tok):
    """reusing_prefix: the blocks up to the edited one run once (prefix_output) and every edit at that block runs
    only the blocks above it. The logits equal a full forward's with the same edit, on a padded batch, for the
    unedited model, a steering vector and a zero-ablation, at every layer but the last, and no submodule of a
    block below the edit runs."""
    from emlab.arch import prefix_output, reusing_prefix
    from emlab.sae.metrics import replaced_output

    model = tiny_causal_lm(arch, tok, layers=3)
    ids = torch.randint(3, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    edits = {"none": lambda h: h, "steer": lambda h: h + 3.0 * torch.linspace(-1, 1, h.shape[-1]), "zero": torch.zeros_like}
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, a, o, name=name: ran.append(name))
             for name, m in residual_module(model, 0).named_modules() if name]
    for layer in (0, 1):
        block = residual_module(model, layer)
        logits = {}
        with torch.no_grad():
            prefix = prefix_output(model, layer, **inputs)
            for name, edit in edits.items():
                with replaced_output(block, edit):
                    full = model(**inputs).logits
                    ran.clear()
                    with reusing_prefix(model, layer, prefix):
                        logits[name] = model(**inputs).logits
                    assert ran == [], f"{arch}: block 0 computed {ran} under reusing_prefix({layer})"
                torch.testing.assert_close(logits[name], full, rtol=0, atol=1e-5, msg=f"{arch} layer {layer} {name}")
        assert not torch.allclose(logits["steer"], logits["none"], atol=1e-3), "the edits change nothing: vacuous"
        assert all("forward" not in vars(residual_module(model, i)) for i in range(3)), "a patched forward stayed"
    # a forward the instance already had (as accelerate's hooks set) is given back, not deleted
    block0 = residual_module(model, 0)
    own = block0.forward
    block0.forward = own
    with reusing_prefix(model, 1, prefix):
        assert block0.forward is not own
    assert vars(block0)["forward"] is own
    del block0.forward
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_answer_logits_unembed_only_the_answer_positions(arch, tok):
    """The probe's read-out (emlab.probe._answer_logits): on a right-padded batch its rows are the full forward's
    logits at the answer-predicting positions, and the unembedding sees those positions and no others."""
    from emlab.probe import _answer_logits

    model = tiny_causal_lm(arch, tok, layers=2)
    ids = torch.randint(3, len(tok), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    rows, cols = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([4, 5, 7, 2, 5])
    where = (rows, cols, ids[rows, cols + 1], [3, 2])
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    with torch.no_grad():
        picked = _answer_logits(model, inputs, where)
        full = model(**inputs).logits
    hook.remove()
    torch.testing.assert_close(picked, full[rows, cols], rtol=0, atol=1e-5, msg=arch)
    assert seen[0] == len(rows), f"{arch}: the unembedding read {seen[0]} positions, not the {len(rows)} answers"


def test_answer_logits_of_a_model_that_ignores_the_mask_take_one_forward(tok):
    """A forward that takes logits_to_keep but returns every position's logits (a model that slices otherwise) is
    indexed here, without a second forward."""
    from emlab.probe import _answer_logits

    model = tiny_causal_lm("llama", tok, layers=1)
    plain = model.forward
    calls = []

    def ignoring(*args, logits_to_keep=0, **kw):
        calls.append(1)
        return plain(*args, **kw)

    model.forward = ignoring
    ids = torch.randint(3, len(tok), (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 3, 4])
    with torch.no_grad():
        picked = _answer_logits(model, inputs, (rows, cols, ids[rows, cols + 1], [1, 2]))
        del model.forward
        full = model(**inputs).logits
    assert len(calls) == 1
    torch.testing.assert_close(picked, full[rows, cols], rtol=0, atol=1e-6)
