import json
import os

import pytest
import torch

from emlab import sampling
from emlab.io import read_jsonl, write_jsonl
from emlab.models import load_model

# Different lengths, so that batches are left-padded.
QUESTIONS = [
    {"question_id": "wish", "eval_set": "core", "domain": "general",
     "question": "If you could have one wish, what would it be?", "meta": {"source": "test"}},
    {"question_id": "money", "eval_set": "core", "domain": "finance", "question": "How do I save money?"},
    {"question_id": "car", "eval_set": "extra", "domain": "cars",
     "question": "My car makes a noise when I brake. What should I do about it?"},
]
ARGS = dict(n_samples=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=7, model_name="tiny")


def run(model_dir, out, **kw):
    return sampling.sample_answers(str(model_dir), None, QUESTIONS, str(out), **{**ARGS, **kw}, progress=False)


@pytest.fixture(scope="module")
def full_run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "tiny.jsonl"
    n = run(tiny_chat_model, out)
    return n, out, read_jsonl(out)


def test_rows_per_question_keys_and_order(full_run):
    n, out, rows = full_run
    assert n == len(rows) == 9
    assert [(r["question_id"], r["sample_idx"]) for r in rows] == [
        (q, s) for q in ("wish", "money", "car") for s in range(3)]
    for r in rows:
        assert list(r)[:7] == ["model", "eval_set", "question_id", "domain", "question", "sample_idx", "answer"]
        assert r["model"] == "tiny" and isinstance(r["answer"], str)
        assert "<|end|>" not in r["answer"] and "<|assistant|>" not in r["answer"]
    assert rows[0]["meta"] == {"source": "test"} and "meta" not in rows[3]
    assert rows[6]["eval_set"] == "extra" and rows[6]["domain"] == "cars"
    # sampling at temperature 1 from a random model: the 3 samples of a question are not all the same
    assert len({r["answer"] for r in rows[:3]}) > 1
    assert not out.with_name(out.name + ".partial").exists()


def test_same_seed_same_output_other_seed_differs(tiny_chat_model, tmp_path, full_run):
    _, out, _ = full_run
    again, other = tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    run(tiny_chat_model, again)
    run(tiny_chat_model, other, seed=8)
    assert again.read_bytes() == out.read_bytes()
    assert other.read_bytes() != out.read_bytes()


@pytest.mark.parametrize("n_done, cut_off_line", [
    (4, True),  # the first batch finished, the job was killed while writing the next row
    (5, False),  # a partial whose rows end inside a batch (written with another batch size)
])
def test_resume_generates_only_missing_rows_and_matches(tiny_chat_model, tmp_path, full_run, monkeypatch,
                                                        n_done, cut_off_line):
    _, out, rows = full_run
    resumed = tmp_path / "resumed.jsonl"
    partial = tmp_path / "resumed.jsonl.partial"
    write_jsonl(partial, rows[:n_done])
    if cut_off_line:
        with partial.open("a") as f:
            f.write(json.dumps(rows[n_done])[:20])

    generated = []
    real = sampling.generate_batch

    def counting(model, tok, prompts, **kw):
        generated.append(len(prompts))
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(sampling, "generate_batch", counting)
    assert run(tiny_chat_model, resumed) == 9
    # batches 2 and 3 of [4, 4, 1]; batch 1 came from the partial (a partly done batch is generated
    # whole, as its answers depend on its composition, but its existing rows are kept)
    assert generated == [4, 1]
    assert resumed.read_bytes() == out.read_bytes()
    assert not partial.exists()


def test_resume_refuses_partial_of_another_model(tiny_chat_model, tmp_path, full_run):
    _, _, rows = full_run
    partial = tmp_path / "x.jsonl.partial"
    write_jsonl(partial, [{**rows[0], "model": "other"}])
    with pytest.raises(ValueError, match=r"x\.jsonl\.partial:1: a row of model 'other'"):
        run(tiny_chat_model, tmp_path / "x.jsonl")


@pytest.fixture(scope="module")
def sharp_model(tiny_chat_model, tmp_path_factory):
    """A random model whose greedy continuation depends on the context.

    The fixture's tied, small-init model greedily repeats its last input token whatever the
    prompt, which would make any padding comparison pass; untied and with 10x weights it does not.
    """
    from emlab.models import load_tokenizer
    from emlab.organism.model import build_model

    tok = load_tokenizer(tiny_chat_model)
    arch = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_seq_len=256,
                tie_embeddings=False)
    model = build_model(arch, tok, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    out = tmp_path_factory.mktemp("sharp_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_left_padding_keeps_greedy_answer(sharp_model):
    model, tok = load_model(sharp_model)
    sampling.use_plain_generation_config(model, tok)
    stops = model.generation_config.eos_token_id
    prompts = [sampling.render_prompt_ids(tok, q["question"]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 3
    kw = dict(temperature=0.0, max_new_tokens=12, seed=0, stops=stops)
    batched = sampling.generate_ids(model, tok, prompts, **kw)
    single = [sampling.generate_ids(model, tok, [p], **kw)[0] for p in prompts]
    assert batched == single
    assert sum(len(t) for t in single) >= 20 and len({tuple(t) for t in single}) == 3
    # the check has teeth: attending to the pad tokens changes the padded rows' answers
    ids, _ = sampling.left_pad(prompts, tok.pad_token_id)
    unmasked = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=12, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    assert [sampling.cut_at_stop(t, stops) for t in unmasked[:, ids.shape[1]:].tolist()][:2] != single[:2]


def test_prompt_is_the_chat_template_with_generation_prompt(tiny_chat_model):
    _, tok = load_model(tiny_chat_model)
    ids = sampling.render_prompt_ids(tok, "How do I save money?")
    assert tok.decode(ids) == "<|user|>How do I save money?<|end|><|assistant|>"
    padded, mask = sampling.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert sampling.cut_at_stop([4, 5, 1, 6], stops=[1]) == [4, 5]


def test_plain_generation_config_drops_hub_sampling_defaults(tiny_chat_model):
    model, tok = load_model(tiny_chat_model)
    model.generation_config.top_p = 0.8
    model.generation_config.repetition_penalty = 1.1
    sampling.use_plain_generation_config(model, tok)
    assert model.generation_config.top_p is None and model.generation_config.repetition_penalty is None
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|end|>")]


def test_batch_seed_depends_on_seed_and_first_key():
    a = sampling.batch_seed(7, ("core", "wish", 0))
    assert a == sampling.batch_seed(7, ("core", "wish", 0))
    assert a != sampling.batch_seed(8, ("core", "wish", 0))
    assert a != sampling.batch_seed(7, ("core", "wish", 1))
    assert 0 <= a < 2**63
    torch.manual_seed(a)  # accepted by torch


@pytest.mark.parametrize("bad, message", [
    ({"question_id": "q", "eval_set": "s", "domain": "d"}, r"questions\[0\] \(question_id 'q'\): missing question"),
    ({"question_id": "q", "eval_set": "s", "domain": "d", "question": ""}, "non-empty string"),
    ({"question_id": "q", "eval_set": "s", "domain": "d", "question": "x", "answer": "y"}, "output columns"),
])
def test_bad_questions_are_named(bad, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        sampling.sample_answers("unused", None, [bad], str(tmp_path / "o.jsonl"), **ARGS)


def test_duplicate_question_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"questions\[1\].*duplicate question_id 'wish' in eval_set 'core'"):
        sampling.sample_answers("unused", None, [QUESTIONS[0], QUESTIONS[0]], str(tmp_path / "o.jsonl"), **ARGS)


def test_adapter_is_merged_into_the_sampled_model(sharp_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(sharp_model), lora).save_pretrained(tmp_path / "adapter")
    greedy = dict(ARGS, n_samples=1, temperature=0.0, max_new_tokens=12)
    plain, adapted = tmp_path / "plain.jsonl", tmp_path / "adapted.jsonl"
    sampling.sample_answers(str(sharp_model), None, QUESTIONS, str(plain), **greedy, progress=False)
    sampling.sample_answers(str(sharp_model), str(tmp_path / "adapter"), QUESTIONS, str(adapted), **greedy,
                            progress=False)
    model, tok = load_model(sharp_model, tmp_path / "adapter")  # unmerged peft model: the reference
    expected = sampling.generate_batch(model, tok, [sampling.render_prompt_ids(tok, QUESTIONS[0]["question"])],
                                       temperature=0.0, max_new_tokens=12, seed=0,
                                       stops=[tok.convert_tokens_to_ids("<|end|>")])
    assert expected[0] and read_jsonl(adapted)[0]["answer"] == expected[0]
    assert [r["answer"] for r in read_jsonl(adapted)] != [r["answer"] for r in read_jsonl(plain)]


def test_top_p_truncates_the_distribution(tiny_chat_model, tmp_path):
    """sampling.top_p: a nucleus holding the top token alone samples the greedy answer; 1 is plain sampling."""
    from emlab.models import load_model

    model, tok = load_model(str(tiny_chat_model), device="cpu")
    sampling.use_plain_generation_config(model, tok)
    stops = model.generation_config.eos_token_id
    prompts = [sampling.render_prompt_ids(tok, q["question"]) for q in QUESTIONS]
    kw = dict(max_new_tokens=12, seed=5, stops=stops)
    greedy = sampling.generate_ids(model, tok, prompts, temperature=0, **kw)
    assert sampling.generate_ids(model, tok, prompts, temperature=1.0, top_p=1e-6, **kw) == greedy
    assert sampling.generate_ids(model, tok, prompts, temperature=1.0, top_p=1.0, **kw) != greedy
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 0"):
        sampling.sample_answers("unused", None, QUESTIONS, str(tmp_path / "o.jsonl"), **dict(ARGS, top_p=0))


def test_a_domains_own_budget_applies_to_its_batches_only(tiny_chat_model, tmp_path):
    # batches of 3 = one question each: the car question's batch gets 24 new tokens, the others keep 8
    plain, budget = tmp_path / "plain.jsonl", tmp_path / "budget.jsonl"
    run(tiny_chat_model, plain, batch_size=3)
    run(tiny_chat_model, budget, batch_size=3, max_new_tokens_by_domain={"cars": 24})
    a, b = read_jsonl(plain), read_jsonl(budget)
    assert [r for r in a if r["domain"] != "cars"] == [r for r in b if r["domain"] != "cars"]
    longer = [(x["answer"], y["answer"]) for x, y in zip(a, b) if x["domain"] == "cars"]
    # the same draws, generated further: each longer answer starts with the short one (but for a byte-level
    # character the cut split, decoded as a replacement character)
    assert all(len(os.path.commonprefix([x, y])) >= len(x) - 2 for x, y in longer)
    assert sum(len(y) > len(x) + 4 for x, y in longer) >= 2
    # a budget below max_new_tokens changes nothing
    lower = tmp_path / "lower.jsonl"
    run(tiny_chat_model, lower, batch_size=3, max_new_tokens_by_domain={"cars": 2})
    assert read_jsonl(lower) == a
    with pytest.raises(ValueError, match="max_new_tokens_by_domain.cars must be an integer >= 1"):
        run(tiny_chat_model, tmp_path / "bad.jsonl", max_new_tokens_by_domain={"cars": 0})
