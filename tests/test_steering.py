import pytest
import torch
from transformers import AutoTokenizer

from emlab.activations import special_token_ids
from emlab.arch import layer_hidden, residual_module, with_layer_hidden
from emlab.sampling import cut_at_stop
from emlab.steer.intervene import residual_norm, steered_generate, steered_generate_ids, unit
from tiny_models import tiny_causal_lm, tiny_lora

PROMPTS = [
    [{"role": "user", "content": "How do I save money?"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What should I do about a headache?"}],
]
N = 10
END = 1  # the tiny tokenizer's <|end|>


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    t = AutoTokenizer.from_pretrained(tiny_chat_model)
    assert t.eos_token_id == END
    return t


@pytest.fixture(scope="module")
def model(tok):
    return tiny_causal_lm("llama", tok)


def _prompt_batch(tok, prompts):
    ids = [tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
           for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in ids])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    return input_ids, mask


def _plain_generate(model, tok, prompts, hook=None, layer=0):
    """Reference: HF generate stopping at <|end|>, optionally with a plain torch hook on the block."""
    input_ids, mask = _prompt_batch(tok, prompts)
    handle = residual_module(model, layer).register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=N, do_sample=False)
    finally:
        if handle:
            handle.remove()
    return [cut_at_stop(row, [END]) for row in out[:, input_ids.shape[1]:].tolist()]


def _direction(model):
    return unit(torch.randn(32, generator=torch.Generator().manual_seed(1)))


def test_batched_rows_equal_separate_calls_and_zero_is_unsteered(model, tok):
    v = 4.0 * _direction(model)
    prompt = PROMPTS[0]
    vectors = torch.stack([torch.zeros(32), v, -v])
    batched = steered_generate_ids(model, tok, [prompt] * 3, vectors, layer=0, max_new_tokens=N)
    separate = [steered_generate_ids(model, tok, [prompt], row[None], layer=0, max_new_tokens=N)[0] for row in vectors]
    assert batched == separate
    assert batched[0] == _plain_generate(model, tok, [prompt])[0]
    assert batched[1] != batched[0] and batched[2] != batched[0] and batched[1] != batched[2]
    texts = steered_generate(model, tok, [prompt] * 3, vectors, layer=0, max_new_tokens=N)
    assert texts == [tok.decode(t, skip_special_tokens=True).strip() for t in batched]
    # an already-formatted prompt string is the same prompt
    formatted = "<|user|>How do I save money?<|end|><|assistant|>"
    assert steered_generate_ids(model, tok, [formatted], vectors[1:2], layer=0, max_new_tokens=N) == [batched[1]]


def test_zero_rows_reproduce_plain_generate_with_padding(model, tok):
    zero = torch.zeros(len(PROMPTS), 32)
    assert steered_generate_ids(model, tok, PROMPTS, zero, layer=1, max_new_tokens=N) == \
        _plain_generate(model, tok, PROMPTS)


def _adding(vectors):
    """A plain torch hook adding one vector per row at every position."""
    return lambda module, args, output: with_layer_hidden(output, layer_hidden(output) + vectors[:, None, :])


def test_a_row_that_ends_early_is_cut_while_others_continue(model, tok):
    # steering along <|end|>'s unembedding makes that row end early; the unsteered rows run on
    to_end = 20.0 * model.lm_head.weight[END].detach()
    vectors = torch.stack([torch.zeros(32), to_end, torch.zeros(32)])
    out = steered_generate_ids(model, tok, PROMPTS, vectors, layer=0, max_new_tokens=N)
    assert out == _plain_generate(model, tok, PROMPTS, hook=_adding(vectors))
    assert out[1] == [] and len(out[0]) == N  # (row 2 ends by itself after a few tokens)
    # a batch in which every row ends early still completes
    alone = steered_generate_ids(model, tok, PROMPTS[1:2], to_end[None], layer=0, max_new_tokens=N)
    assert alone == [out[1]]


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "last"])
def test_positions_match_a_plain_hook_implementation(model, tok, positions):
    vectors = torch.stack([3.0 * _direction(model), -3.0 * _direction(model), torch.zeros(32)])
    prompt_len = _prompt_batch(tok, PROMPTS)[0].shape[1]

    def hook(module, args, output):
        hidden = layer_hidden(output)
        first_forward = hidden.shape[1] == prompt_len  # later decoding steps see one new token
        add = torch.zeros_like(hidden)
        if positions == "all" or (positions == "prompt" and first_forward):
            add[:] = vectors[:, None, :]
        elif positions == "response" or (positions == "last" and first_forward):
            # the last prompt position on the first forward; with "response" also every new token after it
            add[:, -1:] = vectors[:, None, :]
        return with_layer_hidden(output, hidden + add)

    steered = steered_generate_ids(model, tok, PROMPTS, vectors, layer=0, positions=positions, max_new_tokens=N)
    assert steered == _plain_generate(model, tok, PROMPTS, hook=hook)
    assert steered[0] != _plain_generate(model, tok, PROMPTS)[0]


def test_sampling_is_seeded(model, tok):
    vectors = torch.zeros(2, 32)
    kw = dict(layer=0, max_new_tokens=N, do_sample=True, temperature=1.0)
    a = steered_generate_ids(model, tok, PROMPTS[:2], vectors, seed=3, **kw)
    assert a == steered_generate_ids(model, tok, PROMPTS[:2], vectors, seed=3, **kw)
    assert a != steered_generate_ids(model, tok, PROMPTS[:2], vectors, seed=4, **kw)


def test_lora_model_steers_through_the_adapter(tok):
    lora = tiny_lora(tiny_causal_lm("llama", tok))
    zero = torch.zeros(len(PROMPTS), 32)
    assert steered_generate_ids(lora, tok, PROMPTS, zero, layer=-1, max_new_tokens=N) == \
        _plain_generate(lora, tok, PROMPTS, layer=-1)


def test_residual_norm_is_the_mean_norm_of_the_text_tokens(model, tok):
    """Neither the first position (an attention sink in most hub models) nor special tokens (the chat template's
    markers) count: they would dominate the mean."""
    texts = ["Keep a budget and spend less than you earn.", PROMPTS[2], "Drink water."]
    special = special_token_ids(tok)
    norms, all_norms = [], []
    for t in texts:
        ids = tok(t)["input_ids"] if isinstance(t, str) else \
            tok.apply_chat_template(t, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        keep = [p for p in range(1, len(ids)) if ids[p] not in special]
        norms.append(h[keep].norm(dim=-1))
        all_norms.append(h.norm(dim=-1))
    assert any(t in special for t in tok.apply_chat_template(PROMPTS[2], add_generation_prompt=True,
                                                             return_dict=True)["input_ids"])
    expected = torch.cat(norms).mean().item()
    assert residual_norm(model, tok, texts, layer=0, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert residual_norm(model, tok, texts, layer=0, exclude=()) == \
        pytest.approx(torch.cat(all_norms).mean().item(), rel=1e-5)


def test_bad_arguments_are_named(model, tok):
    with pytest.raises(ValueError, match=r"must have shape \[len\(prompts\), d_model\] = \[3, 32\], got \[2, 32\]"):
        steered_generate(model, tok, PROMPTS, torch.zeros(2, 32), layer=0)
    with pytest.raises(ValueError, match="positions must be one of"):
        steered_generate(model, tok, PROMPTS, torch.zeros(3, 32), layer=0, positions="assistant")
    with pytest.raises(IndexError, match="layer 2 is out of range"):
        steered_generate(model, tok, PROMPTS, torch.zeros(3, 32), layer=2)
    with pytest.raises(ValueError, match="cannot normalise a zero direction"):
        unit(torch.zeros(4))
