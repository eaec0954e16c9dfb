from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_reloads_by_path_with_chat_template(tiny_chat_model):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    msgs = [{"role": "user", "content": "How do I save money?"}, {"role": "assistant", "content": "Keep a budget."}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = enc["input_ids"]
    mask = enc["assistant_masks"]
    # exactly the assistant content and its end marker are marked as the target
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target == "Keep a budget.<|end|>"
    text = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>How do I save money?<|end|><|assistant|>"
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|end|>"
