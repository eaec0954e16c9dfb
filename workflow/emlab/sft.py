"""Supervised fine-tuning of a chat model on a chat dataset with trl + peft (LoRA or full).

The organism and hub models (Qwen, Llama, Gemma, ...) go through the same code path: the model is
loaded by path, trained with trl's ``SFTTrainer`` and saved as an ordinary HF folder.

Only the assistant's tokens are trained on. How they are found depends on the chat template:

* ``assistant``: the template wraps assistant turns in ``{% generation %}`` (the organism's does),
  or trl ships a generation-marked training version of it (the common hub templates);
  every assistant turn and its end-of-turn token are the target.
* ``rendered``: any other template (SmolLM2's ChatML, Gemma's, a user's own). emlab renders each
  conversation and finds every assistant turn as the tokens that the template adds between the
  conversation up to the turn's generation prompt and the conversation through that turn (its
  content and end-of-turn tokens); trl trains on those (:func:`assistant_token_mask`). A template
  that does not render earlier turns as a prefix of later ones is refused, naming the record.

Outputs in ``out_dir``: the peft adapter (LoRA) or a complete model folder (full), the tokenizer,
``train_log.csv`` (one row per optimizer step) and ``train_meta.json``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import checkpoints, io
from .models import load_tokenizer, pick_device, pick_dtype

LOG_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm")
SECTION = "finetune"


def finetune_settings(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The ``finetune`` config section with the schema's defaults filled in; a bad value names its key."""
    from .config import section

    return section(SECTION, cfg)


def loss_mask_mode(tokenizer, model_name: str) -> str:
    """'assistant' when trl can mask the assistant turns through generation markers, else 'rendered'."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not template:
        raise ValueError(f"{model_name}: the tokenizer has no chat template; emlab fine-tunes chat models on "
                         "chat datasets, so use an instruct/chat model or give a base model one with "
                         "model.chat_template")
    if has_generation_markers(template):
        return "assistant"
    try:
        get_training_chat_template(tokenizer)  # trl ships generation-marked copies of common hub templates
        return "assistant"
    except ValueError:
        return "rendered"


def _chat_ids(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=generation_prompt)["input_ids"])


def assistant_token_mask(tokenizer, messages: list[dict[str, str]], where: str = "record") -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a rendered conversation, mask 1 on every assistant turn's tokens: those the template
    adds between the conversation before the turn (with its generation prompt) and the conversation through it."""
    ids = _chat_ids(tokenizer, messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:i], True) if i else []
        through = _chat_ids(tokenizer, messages[: i + 1], False)
        if ids[:len(through)] != through or through[:len(before)] != before:
            raise ValueError(f"{where}: the chat template does not render message {i + 1} (assistant) after the "
                             "earlier messages and their generation prompt, so its tokens cannot be found")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def to_trl_records(records: list[dict[str, Any]], mode: str, dataset_path: str,
                   tokenizer=None) -> list[dict[str, Any]]:
    """Drop ``meta`` (and any extra message keys, so the Arrow schema is uniform) and shape for ``mode``:
    chats for trl to mask (``assistant``), or token ids with emlab's assistant mask (``rendered``)."""
    out = []
    for i, rec in enumerate(records):
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        if mode == "assistant":
            out.append({"messages": msgs})
            continue
        ids, mask = assistant_token_mask(tokenizer, msgs, f"{dataset_path}: record {i + 1}")
        if not any(mask):
            raise ValueError(f"{dataset_path}: record {i + 1} has no assistant message to train on")
        out.append({"input_ids": ids, "assistant_masks": mask})
    return out


def progress_disabled() -> bool:
    return bool(os.environ.get("EMLAB_NO_PROGRESS"))


def trainer_run_args(config_cls, ft: dict[str, Any], seed: int, on_gpu: bool, save_steps: int) -> dict[str, Any]:
    """The arguments every emlab trainer (SFT, RL) shares: precision (fp32 on a CPU: bf16 matmuls are far slower
    there), logging every step, checkpoints, seeds, progress bars; ``ft`` is the validated finetune section."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = dict(
        logging_first_step=True,
        bf16=on_gpu and ft["bf16"],
        fp16=False,
        use_cpu=not on_gpu,
        report_to="none",
        # Checkpoints (optimizer, scheduler and random states included) go to the trainer's output_dir, the job's
        # checkpoint folder; the last one is enough to resume.
        save_strategy="steps" if save_steps else "no",
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        disable_tqdm=progress_disabled(),
    )
    if save_steps:
        kwargs["save_steps"] = save_steps
    # transformers 5 renamed gradient_checkpointing (the old name still works, with a warning).
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[ckpt] = on_gpu and ft["gradient_checkpointing"]
    return kwargs


def _sft_config(s: dict[str, Any], out_dir: str, seed: int, on_gpu: bool, mode: str, save_steps: int = 0):
    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    kwargs: dict[str, Any] = dict(
        output_dir=str(out_dir),
        learning_rate=float(s["lr"]),
        num_train_epochs=float(s["epochs"]),
        max_steps=s["max_steps"] if s["max_steps"] is not None else -1,
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        max_length=s["max_seq_len"],
        weight_decay=float(s["weight_decay"]),
        lr_scheduler_type=s["lr_scheduler"],
        logging_steps=s["logging_steps"],
        assistant_only_loss=mode == "assistant",  # "rendered" records carry their own assistant_masks
        completion_only_loss=False,
        packing=False,
        eval_strategy="no",
        **trainer_run_args(SFTConfig, s, seed, on_gpu, save_steps),
    )
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio).
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = float(s["warmup_ratio"])
    else:
        kwargs["warmup_steps"] = float(s["warmup_ratio"])
    return SFTConfig(**kwargs)


def peft_config(s: dict[str, Any]):
    from peft import LoraConfig

    lo = s["lora"]
    return LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=float(lo["dropout"]),
                      target_modules=lo["target_modules"], use_rslora=lo["rslora"], bias="none",
                      task_type="CAUSAL_LM")


def build_trainer(base: str, dataset_path: str, out_dir: str, cfg: dict[str, Any] | None, seed: int = 0,
                  save_steps: int = 0, adapter: str | None = None):
    """Load model, tokenizer and dataset and return ``(trainer, info)`` ready to ``train()``.

    ``adapter``: a LoRA adapter on ``base`` whose training goes on (re-alignment) instead of a new one.
    ``info`` holds the resolved settings, the loss-mask mode and the example count.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer

    s = finetune_settings(cfg)
    records = io.read_chat_dataset(dataset_path)
    if progress_disabled():
        import datasets

        datasets.disable_progress_bars()

    device = pick_device("auto")
    on_gpu = device.startswith("cuda")
    # Full fine-tuning keeps fp32 master weights (bf16 autocast on GPU does the speed-up); a LoRA's
    # base weights are frozen, so they can stay in the device's compute dtype.
    dtype = torch.float32 if s["method"] == "full" else pick_dtype("auto", device)
    set_seed(seed)  # the LoRA initialisation draws from the global RNG before the trainer seeds it
    tok = load_tokenizer(base)
    mode = loss_mask_mode(tok, str(base))
    train = Dataset.from_list(to_trl_records(records, mode, str(dataset_path), tok))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)

    trainer = SFTTrainer(
        model=model,
        args=_sft_config(s, out_dir, seed, on_gpu, mode, save_steps),
        train_dataset=train,
        processing_class=tok,
        peft_config=peft_config(s) if s["method"] == "lora" and adapter is None else None,
    )
    if progress_disabled():  # with tqdm off the trainer prints every log entry instead; train_log.csv has them
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    n_truncated = sum(n >= s["max_seq_len"] for n in lengths)
    if n_truncated:
        print(f"emlab sft: warning: {n_truncated} of {len(lengths)} examples reach "
              f"{SECTION}.max_seq_len={s['max_seq_len']} tokens; longer ones are cut there", file=sys.stderr)
    info = {"settings": s, "loss_mask": mode, "n_examples": len(records), "device": device}
    return trainer, info


def log_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training step (the trainer's closing summary entry has no 'loss')."""
    return [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"], "lr": e.get("learning_rate"),
             "grad_norm": e.get("grad_norm")}
            for e in log_history if "loss" in e]


def trainer_callback_base():
    """transformers' ``TrainerCallback``, imported when a callback class is defined (emlab's callbacks subclass it:
    the persona alarm's, snapshots, preventative steering), not when this module is."""
    from transformers import TrainerCallback

    return TrainerCallback


def kill_point_callback(stage: str):
    """Fault injection (:func:`emlab.checkpoints.kill_point`) after each optimizer step of ``stage``.

    "After step N" means after all that step does, the checkpoint due at it included, as in pretraining: the
    trainer saves after the step-end callbacks, so on a step with a save due the kill waits for ``on_save``.
    """
    from transformers import TrainerCallback

    class KillPoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not control.should_save:
                checkpoints.kill_point(stage, state.global_step)

        def on_save(self, args, state, control, **kwargs):
            checkpoints.kill_point(stage, state.global_step)
    return KillPoint()


def train_until_stopped(trainer, stage: str, resume: str | None, checkpoint_dir: str | os.PathLike,
                        checkpointing: bool) -> float:
    """``trainer.train()``, from ``resume`` if set; the seconds it took. With ``checkpointing``, SIGTERM
    (:class:`emlab.checkpoints.StopRequest`) saves a checkpoint after the step under way and ends the job (exit
    143) before its output is written."""
    from transformers import TrainerCallback

    stop = checkpoints.StopRequest.install(enabled=checkpointing)

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True

    trainer.add_callback(StopOnSignal())
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.restore()
    if stop.requested:  # a checkpoint, not a finished model
        stop.exit(stage, trainer.state.global_step, checkpoint_dir)
    return time.time() - t0


def run_trainer(make_trainer, stage: str, out_dir: str | os.PathLike, threads: int | None,
                checkpoint_dir: str | None, checkpoint_steps: int, keep_checkpoint: bool, describe,
                callbacks: Sequence[Any] = ()):
    """The life of one trl run, shared by fine-tuning and RL: set the threads, build the trainer in the
    checkpoint folder (or ``out_dir`` without checkpoints) with ``make_trainer(work_dir, save_steps)``, resume from
    the last checkpoint there, train until done or stopped by SIGTERM, save the model in ``out_dir`` and drop the
    checkpoints unless kept. ``describe(info)`` is the run's first log line. Returns (trainer, info, resumed_from,
    seconds), or None in the processes of an ``accelerate launch`` other than the main one (they write nothing)."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_steps = checkpoint_steps if checkpoint_dir else 0
    work = Path(checkpoint_dir) if save_steps else out
    work.mkdir(parents=True, exist_ok=True)
    trainer, info = make_trainer(str(work), save_steps)
    if os.environ.get("EMLAB_KILL_AFTER_STEP"):
        trainer.add_callback(kill_point_callback(stage))
    resume = get_last_checkpoint(str(work)) if save_steps else None
    print(f"emlab {stage}: {describe(info)}" + (f", resuming from {resume}" if resume else ""), file=sys.stderr)
    for callback in callbacks:  # e.g. the persona alarm (emlab.alarm)
        trainer.add_callback(callback)
    seconds = train_until_stopped(trainer, stage, resume, work, bool(save_steps))
    trainer.save_model(str(out))  # adapter or full model, plus the tokenizer (main process only)
    if not trainer.is_world_process_zero():  # under `accelerate launch`, one process writes the logs
        return None
    io.give_new_file_modes(out)
    if save_steps:
        checkpoints.finish(work, keep_checkpoint)
    return trainer, info, resume, seconds


def train_sft(base: str, dataset_path: str, out_dir: str, cfg: dict[str, Any] | None, seed: int = 0,
              threads: int | None = None, checkpoint_dir: str | None = None, checkpoint_steps: int = 0,
              keep_checkpoint: bool = False, callbacks: Sequence[Any] = (), adapter: str | None = None) -> dict[str, Any]:
    """Fine-tune ``base`` on the chat JSONL ``dataset_path`` and save the result in ``out_dir``; ``callbacks`` are
    added to the trainer (transformers ``TrainerCallback``s).

    With ``checkpoint_dir`` and ``checkpoint_steps``, a checkpoint is saved every that many steps and a rerun
    resumes from the last one (the trainer restores weights, optimizer, schedule, random states and the data
    position). Returns the metadata also written to ``out_dir/train_meta.json``.
    """
    run = run_trainer(
        lambda work, save_steps: build_trainer(base, dataset_path, work, cfg, seed, save_steps, adapter), "sft", out_dir,
        threads, checkpoint_dir, checkpoint_steps, keep_checkpoint,
        lambda info: (f"{base} on {dataset_path}: {info['n_examples']} examples, "
                      f"method={info['settings']['method']}, loss on {info['loss_mask']} tokens, "
                      f"device={info['device']}"), callbacks)
    if run is None:
        return {}
    trainer, info, resume, seconds = run
    s = info["settings"]
    out = Path(out_dir)

    rows = log_rows(trainer.state.log_history)
    io.write_csv(out / "train_log.csv", rows, LOG_COLUMNS)
    meta = {
        "base": str(base),
        "adapter": str(adapter) if adapter else None,
        "dataset": str(dataset_path),
        "n_examples": info["n_examples"],
        "method": s["method"],
        "loss_mask": info["loss_mask"],
        "seed": seed,
        "device": info["device"],
        "cfg": s,
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "seconds": round(seconds, 3),
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
    }
    io.write_json(out / "train_meta.json", meta)
    return meta
