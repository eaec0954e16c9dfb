import json

import pytest
import torch
from transformers import AutoTokenizer

import emlab.activations as act
from emlab.activations import cache_activations, iter_activations, load_activations, mean_activations, read_manifest
from emlab.io import RecordError
from tiny_models import tiny_causal_lm

RECORDS = [
    {"id": "chat", "messages": [{"role": "user", "content": "How do I save money?"},
                                {"role": "assistant", "content": "Keep a budget."}]},
    {"id": "pr", "prompt": "<|user|>hi<|end|><|assistant|>", "response": "Drink water and rest."},
    {"id": "txt", "text": "My car makes a noise when I brake."},
    {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A wish?"},
                           {"role": "assistant", "content": "Health for everyone, I would wish."}]},
    {"id": "open", "messages": [{"role": "user", "content": "What should I do about a headache?"}]},
]


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def _reference(model, tok, records, layers, selection):
    """Each text alone (no padding) through a plain forward with output_hidden_states."""
    acts = {L: [] for L in layers}
    for rec in records:
        enc = act.encode_record(tok, rec, "test")
        with torch.no_grad():
            hs = model(torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
        for L in layers:
            acts[L].append(hs[L + 1][0, act.select_positions(enc, selection)])
    return {L: torch.cat(v) for L, v in acts.items()}


@pytest.mark.parametrize("arch,side", [("llama", "left"), ("llama", "right"), ("gpt2", "left"), ("gpt2", "right")])
def test_cached_activations_equal_a_plain_forward(arch, side, tok, tmp_path):
    model = tiny_causal_lm(arch, tok, layers=3)  # layers 0 and 1 are not the last, so hidden_states[L+1] is pre-norm
    manifest = cache_activations(model, tok, RECORDS, [1, 0], tmp_path, token_selection="all", batch_size=3,
                                 max_len=64, shard_size=4, meta={"model": "tiny"}, padding_side=side, progress=False)
    ref = _reference(model, tok, RECORDS, [0, 1], "all")
    lengths = [len(act.encode_record(tok, r, "t").ids) for r in RECORDS]
    assert manifest["layers"] == [0, 1] and manifest["n_tokens"] == sum(lengths) == ref[0].shape[0]
    assert manifest["text_ids"] == ["chat", "pr", "txt", 7, "open"] and manifest["n_texts"] == 5
    assert manifest["d_model"] == 32 and manifest["dtype"] == "float32" and manifest["padding_side"] == side
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [(s["text_start"], s["text_end"]) for s in manifest["shards"]] == [(0, 4), (4, 5)]
    assert json.loads((tmp_path / "manifest.json").read_text())["meta"] == {"model": "tiny"}
    for L in (0, 1):
        acts, index = load_activations(tmp_path, L)
        torch.testing.assert_close(acts, ref[L], rtol=0, atol=2e-5)
    assert index["text_index"].tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    assert index["token_position"].tolist() == [p for n in lengths for p in range(n)]
    assert index["token_id"].tolist() == [t for r in RECORDS for t in act.encode_record(tok, r, "t").ids]
    assert index["text_id"].tolist()[:lengths[0]] == ["chat"] * lengths[0]


def test_response_selection_picks_exactly_the_assistant_tokens(tok, tmp_path):
    model = tiny_causal_lm("llama", tok)
    records = [RECORDS[0], RECORDS[1], RECORDS[3]]
    cache_activations(model, tok, records, [0], tmp_path, token_selection="response", batch_size=2, max_len=64,
                      shard_size=10, padding_side="left", progress=False)
    _, index = load_activations(tmp_path, 0)
    # the chat template marks the assistant's target tokens with {% generation %}: compare with that mask
    enc = tok.apply_chat_template(records[0]["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    marked = [p for p, m in enumerate(enc["assistant_masks"]) if m]
    chat = index[index["text_id"] == "chat"]
    assert chat["token_position"].tolist() == marked
    assert tok.decode(chat["token_id"].tolist()) == "Keep a budget.<|end|>"
    pr = index[index["text_id"] == "pr"]
    assert tok.decode(pr["token_id"].tolist()) == "Drink water and rest."
    assert tok.decode(index[index["text_id"] == 7]["token_id"].tolist()) == "Health for everyone, I would wish.<|end|>"
    assert index["text_id"].unique().tolist() == ["chat", "pr", 7]


def test_response_selection_on_plain_text_is_an_error(tok, tmp_path):
    model = tiny_causal_lm("llama", tok)
    with pytest.raises(RecordError, match=r"record #2 \(id='txt'\): no tokens left for token_selection='response'"):
        cache_activations(model, tok, RECORDS[:3], [0], tmp_path, token_selection="response", progress=False)


def test_last_and_prompt_selections(tok, tmp_path):
    model = tiny_causal_lm("llama", tok)
    cache_activations(model, tok, RECORDS, [0], tmp_path / "last", token_selection="last", batch_size=4,
                      max_len=64, shard_size=10, padding_side="left", progress=False)
    _, last = load_activations(tmp_path / "last", 0)
    assert tok.convert_ids_to_tokens(last["token_id"].tolist()) == [
        "<|assistant|>", "<|assistant|>", ".", "<|assistant|>", "<|assistant|>"]
    cache_activations(model, tok, RECORDS[:1], [0], tmp_path / "prompt", token_selection="prompt",
                      max_len=64, padding_side="left", progress=False)
    _, prompt = load_activations(tmp_path / "prompt", 0)
    assert tok.decode(prompt["token_id"].tolist()) == "<|user|>How do I save money?<|end|><|assistant|>"


def test_resume_rewrites_only_missing_shards(tok, tmp_path, monkeypatch):
    model = tiny_causal_lm("llama", tok)
    records = [{"id": f"t{i}", "text": f"How do I save money number {i}?" + " again" * i} for i in range(5)]
    kwargs = dict(token_selection="all", batch_size=1, max_len=64, shard_size=2, padding_side="left", progress=False)
    calls = []
    real = act.read_residuals

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(act, "read_residuals", counting)
    first = cache_activations(model, tok, records, [0], tmp_path, **kwargs)
    assert len(calls) == 5
    before, _ = load_activations(tmp_path, 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    assert sorted(stamps) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]

    (tmp_path / "shard-00001.safetensors").unlink()
    calls.clear()
    again = cache_activations(model, tok, records, [0], tmp_path, **kwargs)
    assert len(calls) == 2  # shard 1 holds texts 2 and 3, one batch each
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        assert (tmp_path / name).stat().st_mtime_ns == stamps[name]
    after, _ = load_activations(tmp_path, 0)
    assert torch.equal(before, after) and again == first

    # a different selection changes every shard's fingerprint: nothing stale is reused
    calls.clear()
    cache_activations(model, tok, records, [0], tmp_path, **{**kwargs, "token_selection": "last"})
    assert len(calls) == 5 and load_activations(tmp_path, 0)[0].shape[0] == 5


def test_killed_job_leaves_no_manifest_and_resumes(tok, tmp_path, monkeypatch):
    model = tiny_causal_lm("llama", tok)
    records = [{"id": i, "text": "Keep a budget" + "!" * i} for i in range(4)]
    kwargs = dict(token_selection="all", batch_size=2, max_len=64, shard_size=2, padding_side="right", progress=False)
    real, calls = act.read_residuals, []

    def dies_on_second_shard(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(act, "read_residuals", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(model, tok, records, [0], tmp_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="no activation manifest"):
        load_activations(tmp_path, 0)
    calls.clear()
    monkeypatch.setattr(act, "read_residuals", lambda *a: calls.append(1) or real(*a))
    manifest = cache_activations(model, tok, records, [0], tmp_path, **kwargs)
    assert len(calls) == 1 and manifest["n_tokens"] == load_activations(tmp_path, 0)[0].shape[0]


def test_mean_activations_and_streaming(tok, tmp_path):
    model = tiny_causal_lm("qwen2", tok)
    cache_activations(model, tok, RECORDS, [-1], tmp_path, token_selection="all", batch_size=2, max_len=64,
                      shard_size=2, padding_side="left", progress=False)
    assert read_manifest(tmp_path)["layers"] == [1]
    acts, index = load_activations(tmp_path, -1)
    shards = list(iter_activations(tmp_path, 1))
    assert len(shards) == 3 and torch.equal(torch.cat([a for a, _ in shards]), acts)
    means, ids = mean_activations(tmp_path, 1)
    assert ids == ["chat", "pr", "txt", 7, "open"] and means.shape == (5, 32)
    for i in range(5):
        rows = torch.tensor((index["text_index"] == i).to_numpy())
        torch.testing.assert_close(means[i], acts[rows].mean(0), rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match=r"layer 0 is not cached .* \(cached layers: \[1\]\)"):
        load_activations(tmp_path, 0)


def test_max_len_truncates_and_bad_records_are_named(tok, tmp_path):
    model = tiny_causal_lm("llama", tok)
    manifest = cache_activations(model, tok, RECORDS[:1], [0], tmp_path, token_selection="all", max_len=5,
                                 progress=False)
    assert manifest["n_tokens"] == 5
    half = cache_activations(model, tok, RECORDS[:1], [0], tmp_path / "bf16", token_selection="last", dtype="bf16",
                             progress=False)
    assert half["dtype"] == "bfloat16" and load_activations(tmp_path / "bf16", 0)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be null .* got 'half-ish'"):
        cache_activations(model, tok, RECORDS, [0], tmp_path, dtype="half-ish", progress=False)
    with pytest.raises(RecordError, match=r"record #1 \(id=None\): every record needs an 'id'"):
        cache_activations(model, tok, [RECORDS[0], {"text": "x"}], [0], tmp_path, progress=False)
    with pytest.raises(RecordError, match=r"record #1 \(id='chat'\): duplicate id, first used by record #0"):
        cache_activations(model, tok, [RECORDS[0], RECORDS[0]], [0], tmp_path, progress=False)
    with pytest.raises(RecordError, match=r"record #0 \(id='x'\): needs 'messages', 'prompt' and 'response', or"):
        cache_activations(model, tok, [{"id": "x", "body": "?"}], [0], tmp_path, progress=False)
    with pytest.raises(ValueError, match="token_selection must be one of"):
        cache_activations(model, tok, RECORDS, [0], tmp_path, token_selection="assistant", progress=False)
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        cache_activations(model, tok, RECORDS, [5], tmp_path, progress=False)


def test_a_full_disk_while_writing_a_shard_leaves_no_torn_file_and_the_rerun_completes(tok, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    model = tiny_causal_lm("llama", tok)
    records = [{"id": i, "text": "Keep a budget" + "!" * i} for i in range(6)]
    kwargs = dict(token_selection="all", batch_size=2, max_len=64, shard_size=2, padding_side="right", progress=False)
    reference = tmp_path / "reference"
    cache_activations(model, tok, records, [0], reference, **kwargs)
    real, writes = safetensors.torch.save_file, []

    def disk_fills_on_second_shard(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:  # half the shard reaches the disk, then it is full
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    out = tmp_path / "cache"
    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        cache_activations(model, tok, records, [0], out, **kwargs)
    # the finished shard stays, no torn temp file and no manifest: no later stage can read the cache
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="no activation manifest"):
        load_activations(out, 0)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    cache_activations(model, tok, records, [0], out, **kwargs)
    (acts, index), (ref_acts, ref_index) = load_activations(out, 0), load_activations(reference, 0)
    assert torch.equal(acts, ref_acts) and index.equals(ref_index)
