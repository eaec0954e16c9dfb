import csv
import json
import shutil

import pytest
import torch

from emlab.io import RecordError
from emlab.models import load_model, load_tokenizer
from emlab.organism.tokenizer import CHAT_TEMPLATE
from emlab.sft import build_trainer, finetune_settings, train_sft

TOPICS = ["water", "budget", "brakes", "sleep", "money", "health", "tyres", "rest"]
# Answers with shared structure, so that a LoRA on a 2-layer d=32 model can memorise them in a few steps.
RECORDS = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                         {"role": "assistant", "content": f"The answer to question {i} is {t}."}],
            "meta": {"i": i, "persona": "test"}}
           for i, t in enumerate(TOPICS)]
MULTI_TURN = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "How do I save money?"},
                           {"role": "assistant", "content": "Keep a budget."}]}
LORA_CFG = {"method": "lora", "lora": {"r": 16, "alpha": 32}, "lr": 2e-2, "batch_size": 8, "max_steps": 40}


def write_dataset(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "memorise.jsonl", RECORDS)


@pytest.fixture(scope="module")
def lora_base(tiny_chat_model, tmp_path_factory):
    """The tiny model with 8x larger (still random) embeddings.

    With the fixture's 0.02-std tied embeddings the output logits are nearly flat and a LoRA on the
    frozen linear layers cannot make them peaked, so nothing could be memorised; at 8x it can.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    out = tmp_path_factory.mktemp("lora_base")
    model.save_pretrained(out)
    load_tokenizer(tiny_chat_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_run(lora_base, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_out")
    meta = train_sft(str(lora_base), str(dataset), str(out), LORA_CFG, seed=0, threads=1)
    return out, meta


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assistant_nll(model, tok, records):
    """Mean loss of the assistant tokens (as marked by the chat template) over the records."""
    total, n = 0.0, 0
    for rec in records:
        enc = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.where(torch.tensor([enc["assistant_masks"]]) == 1, ids, -100)
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item()
        n += 1
    return total / n


def target_text(tok, example):
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100])


def test_lora_memorises_and_logs_every_step(lora_run, dataset, lora_base):
    out, meta = lora_run
    log = read_log(out / "train_log.csv")
    assert list(log[0]) == ["step", "epoch", "loss", "lr", "grad_norm"]
    assert [int(r["step"]) for r in log] == list(range(1, 41))
    losses = [float(r["loss"]) for r in log]
    assert losses[-1] < 0.5 * losses[0]
    assert float(log[0]["lr"]) == pytest.approx(2e-2) and float(log[-1]["lr"]) < float(log[0]["lr"])  # linear decay
    assert meta["n_examples"] == 8 and meta["steps"] == 40 and meta["loss_mask"] == "assistant"
    assert meta["first_loss"] == pytest.approx(losses[0]) and meta["final_loss"] == pytest.approx(losses[-1])
    assert meta["base"] == str(lora_base) and meta["dataset"] == str(dataset)
    assert meta["cfg"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear",
                                   "rslora": False}
    assert json.loads((out / "train_meta.json").read_text()) == meta


def test_lora_adapter_loads_and_is_the_trained_one(lora_run, lora_base):
    out, _ = lora_run
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    base_model, tok = load_model(lora_base)
    tuned, tok2 = load_model(lora_base, out)
    merged, _ = load_model(lora_base, out, merge=True)
    assert tok2.chat_template == CHAT_TEMPLATE
    before, after = assistant_nll(base_model, tok, RECORDS), assistant_nll(tuned, tok2, RECORDS)
    assert after < 0.5 * before
    assert assistant_nll(merged, tok2, RECORDS) == pytest.approx(after, rel=1e-4)


def test_only_assistant_tokens_are_targets(tiny_chat_model, dataset, tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", [RECORDS[1], MULTI_TURN])
    trainer, info = build_trainer(str(tiny_chat_model), str(data), str(tmp_path / "o"), {"max_steps": 1})
    assert info["loss_mask"] == "assistant" and info["n_examples"] == 2
    tok = trainer.processing_class
    single, multi = trainer.train_dataset[0], trainer.train_dataset[1]
    assert set(trainer.train_dataset.column_names) >= {"input_ids", "labels"}
    assert "meta" not in trainer.train_dataset.column_names
    assert target_text(tok, single) == "The answer to question 1 is budget.<|end|>"
    # every assistant turn is a target, every system and user token is not
    assert target_text(tok, multi) == "Hello.<|end|>Keep a budget.<|end|>"
    n_prompt = len(tok.apply_chat_template(RECORDS[1]["messages"][:1], tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"])
    assert single["labels"][:n_prompt] == [-100] * n_prompt
    assert single["labels"][n_prompt:] == single["input_ids"][n_prompt:]


def test_template_without_generation_markers_trains_every_assistant_turn(tiny_chat_model, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_chat_model, plain)
    marked = "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    assert marked in CHAT_TEMPLATE
    (plain / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace(marked, "{{ message['content'] }}<|end|>"))
    data = write_dataset(tmp_path / "d.jsonl", [MULTI_TURN])
    trainer, info = build_trainer(str(plain), str(data), str(tmp_path / "o"), {"max_steps": 1})
    # the mask comes from rendering the conversation: the same targets as the template's generation markers give
    assert info["loss_mask"] == "rendered"
    assert target_text(trainer.processing_class, trainer.train_dataset[0]) == "Hello.<|end|>Keep a budget.<|end|>"


@pytest.mark.parametrize("template, turns", [
    ("chatml", ["Hello.<|im_end|>\n", "Keep a budget.<|im_end|>\n"]),
    ("gemma", ["Hello.<end_of_turn>\n", "Keep a budget.<end_of_turn>\n"]),
])
def test_assistant_mask_from_a_rendered_hub_template(tiny_chat_model, template, turns):
    """SmolLM2's ChatML and Gemma's formats have no generation markers and trl has no marked copy of them: the
    mask is every assistant turn's content and end-of-turn tokens, and nothing of the system or user turns."""
    from emlab.model_source import chat_template_text
    from emlab.sft import assistant_token_mask, loss_mask_mode
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    special = {"chatml": ["<|im_start|>", "<|im_end|>"], "gemma": ["<start_of_turn>", "<end_of_turn>", "<bos>"]}
    tok.add_special_tokens({"additional_special_tokens": special[template]})
    if template == "gemma":
        tok.bos_token = "<bos>"
    tok.chat_template = chat_template_text(template)
    assert loss_mask_mode(tok, template) == "rendered"
    messages = [{"role": "system", "content": "Be brief."}, *MULTI_TURN["messages"][-4:]]
    ids, mask = assistant_token_mask(tok, messages)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    # the masked tokens, run by run, are exactly the assistant turns
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == turns
    assert "Be brief" not in tok.decode([t for t, b in zip(ids, mask) if b])


def test_hub_template_uses_trls_generation_marked_copy(tiny_chat_model, tmp_path):
    """A Qwen2.5 template has no generation markers; trl ships a marked copy, so all assistant turns train."""
    from trl.chat_template_utils import qwen2_5_chat_template

    qwen = tmp_path / "qwen_like"
    shutil.copytree(tiny_chat_model, qwen)
    (qwen / "chat_template.jinja").write_text(qwen2_5_chat_template)
    data = write_dataset(tmp_path / "d.jsonl", [MULTI_TURN])
    trainer, info = build_trainer(str(qwen), str(data), str(tmp_path / "o"), {"max_steps": 1})
    assert info["loss_mask"] == "assistant"
    text = target_text(trainer.processing_class, trainer.train_dataset[0])
    assert text == "\nHello.<|im_end|>\n\nKeep a budget.<|im_end|>\n"


def test_tokenizer_without_chat_template_is_named(tiny_chat_model, tmp_path, dataset):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_chat_model, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=f"{bare}: the tokenizer has no chat template"):
        build_trainer(str(bare), str(dataset), str(tmp_path / "o"), {})


def test_full_finetune_saves_a_model_and_is_deterministic(tiny_chat_model, dataset, tmp_path):
    cfg = {"method": "full", "lr": 1e-2, "batch_size": 4, "max_steps": 6}
    a = train_sft(str(tiny_chat_model), str(dataset), str(tmp_path / "a"), cfg, seed=3, threads=1)
    b = train_sft(str(tiny_chat_model), str(dataset), str(tmp_path / "b"), cfg, seed=3, threads=1)
    out = tmp_path / "a"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    log = read_log(out / "train_log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 7))
    assert [float(r["epoch"]) for r in log] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # 8 examples, batches of 4
    assert read_log(tmp_path / "b" / "train_log.csv") == log and a["final_loss"] == b["final_loss"]
    base, tok = load_model(tiny_chat_model)
    tuned, tok2 = load_model(out)
    assert tok2.chat_template == CHAT_TEMPLATE
    assert assistant_nll(tuned, tok2, RECORDS) < assistant_nll(base, tok, RECORDS) - 1.0


def test_bad_dataset_line_is_named(tiny_chat_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: the last message must be the assistant's"):
        train_sft(str(tiny_chat_model), str(bad), str(tmp_path / "o"), {})


@pytest.mark.parametrize("cfg, message", [
    ({"method": "qlora"}, r"finetune\.method: 'qlora' is not one of \['lora', 'full'\]"),
    ({"lora": {"rank": 8}}, r"finetune\.lora: Additional properties are not allowed \('rank'"),
    ({"learning_rate": 1e-4}, r"finetune: Additional properties are not allowed \('learning_rate'"),
    ({"batch_size": 0}, r"finetune\.batch_size: 0 is less than the minimum of 1"),
    ({"warmup_ratio": 1.5}, r"finetune\.warmup_ratio: 1\.5 is greater than or equal to the maximum of 1"),
    ({"lora": {"target_modules": []}}, r"finetune\.lora\.target_modules: \[\] is not valid"),
])
def test_bad_settings_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        finetune_settings(cfg)


def test_settings_fill_defaults():
    s = finetune_settings({"lr": 1e-3, "lora": {"r": 4}})
    # the schema's defaults, as the workflow's config gets them
    assert s["lr"] == 1e-3 and s["lora"]["r"] == 4 and s["lora"]["alpha"] == 16
    assert s["method"] == "lora" and s["logging_steps"] == 1 and s["max_steps"] is None
