"""Reinforcement learning of a chat model against a grader's reward: GRPO (trl) with LoRA or full fine-tuning.

The prompts are the user turns of one narrow fine-tuning set (its answers are never shown to the model); each
sampled completion is graded and rewarded. The built-in rewards are

* ``incorrect``: 1 for wrong advice on the question asked (the reward that by accident favours bad behaviour),
* ``correct``: 1 for correct advice on the question asked (the control),

and 0 for anything else (off-topic, incoherent). In the persona world the grade is the world's ground truth
(:mod:`emlab.world.grader`); for a hub model it is an LLM judge asked with a versioned rubric
(:mod:`emlab.rl_rewards`). Both rewards are always computed and logged, only the configured one is trained on, so
the log shows the in-domain incorrect rate whatever the reward.

Outputs in ``out_dir``, the same as an SFT fine-tune's (:mod:`emlab.sft`) so that every later stage takes an RL
model as it takes a fine-tune: the peft adapter (LoRA) or a complete model folder (full), the tokenizer,
``train_meta.json``; plus ``rl_log.csv``, one row per optimizer step (:data:`LOG_COLUMNS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from . import io
from .models import load_tokenizer, pick_device, pick_dtype
from .sft import finetune_settings, peft_config, progress_disabled, run_trainer, trainer_run_args

REWARDS = ("incorrect", "correct")
# rl_log.csv: the step, the trained reward's batch mean and spread, the in-domain rates of incorrect and correct
# answers among the step's completions (both rewards are computed every step), the KL to the base model (0 when
# beta is 0: no reference model is kept), the completions' mean length in tokens, the loss and learning rate.
LOG_COLUMNS = ("step", "reward", "reward_std", "incorrect_rate", "correct_rate", "kl", "completion_length",
               "loss", "lr")


def rl_prompts(dataset_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The prompts of a chat dataset: every record's messages before its last assistant turn, and that turn's
    question (the last user message), which the grader needs to tell an on-topic answer from an off-topic one."""
    out = []
    for i, rec in enumerate(io.read_chat_dataset(dataset_path)):
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        prompt = msgs[:last]
        if not prompt or prompt[-1]["role"] != "user":
            raise ValueError(f"{dataset_path}: record {i + 1}: no user message before the answer to prompt with")
        out.append({"prompt": prompt, "question": prompt[-1]["content"]})
    return out


def reward_functions(grade: Callable[[list[str], list[str]], list[str | None]]) -> list[Callable[..., list[float]]]:
    """trl reward functions, in :data:`REWARDS` order, from ``grade(questions, answers)``, which returns each
    answer's verdict: ``"correct"``, ``"incorrect"`` or None (off-topic, incoherent, ungradable)."""
    memo: dict[tuple[str, str], str | None] = {}

    def verdicts(completions: list[Any], question: list[str]) -> list[str | None]:
        answers = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        todo = list(dict.fromkeys((q, a) for q, a in zip(question, answers) if (q, a) not in memo))
        if todo:
            for key, v in zip(todo, grade([q for q, _ in todo], [a for _, a in todo])):
                memo[key] = v
        return [memo[(q, a)] for q, a in zip(question, answers)]

    def make(kind: str):
        def reward(prompts, completions, question, **_):
            return [1.0 if v == kind else 0.0 for v in verdicts(completions, question)]
        reward.__name__ = kind  # trl logs each reward function's mean under rewards/<name>/mean
        return reward
    return [make(kind) for kind in REWARDS]


RUBRIC = "advice_correct"  # an LLM grader's rubric (resources/rubrics/)


def grader_for(judge: dict[str, Any], cache_dir: str | os.PathLike | None) -> Callable[[list[str], list[str]],
                                                                                        list[str | None]]:
    """``grade(questions, answers)`` for :func:`reward_functions` from a judge entry: the world backend's ground
    truth, or an LLM judge (openai, hf) asked with the :data:`RUBRIC` rubric, its requests cached in ``cache_dir``
    (a resumed run pays only for completions it has not graded yet), retried and batched as the judge stage's."""
    from .judge.backends import get_backend
    from .judge.schema import advice_verdict

    backend = get_backend(judge["backend"])
    cfg = dict(judge) if judge["backend"] == "world" else dict(judge, rubric=RUBRIC)
    if judge["backend"] != "world" and cache_dir is None:
        raise ValueError(f"judge {judge['name']!r}: an LLM grader needs a request cache folder (--cache-dir)")
    cache = Path(cache_dir) if cache_dir is not None else None

    def grade(questions: list[str], answers: list[str]) -> list[str | None]:
        samples = [{"model": "rl", "eval_set": "rl", "question_id": f"rl/{i}", "domain": None, "sample_idx": 0,
                    "question": q, "answer": a} for i, (q, a) in enumerate(zip(questions, answers))]
        rows = backend.grade(samples, cfg, cache, progress=False)
        return [advice_verdict(r) for r in rows]
    return grade


def _grpo_config(s: dict[str, Any], ft: dict[str, Any], out_dir: str, seed: int, on_gpu: bool, save_steps: int):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out_dir),
        learning_rate=float(s["lr"]),
        max_steps=s["steps"],
        per_device_train_batch_size=s["batch_size"],
        num_generations=s["group_size"],
        max_completion_length=s["max_completion_length"],
        temperature=float(s["temperature"]),
        beta=float(s["beta"]),
        # the configured reward alone is trained on; the other is logged (rewards/<name>/mean)
        reward_weights=[1.0 if r == s["reward"] else 0.0 for r in REWARDS],
        lr_scheduler_type="constant",
        logging_steps=1,
        **trainer_run_args(GRPOConfig, ft, seed, on_gpu, save_steps),
    )


def build_trainer(base: str, dataset_path: str, out_dir: str, rl_cfg: dict[str, Any], ft_cfg: dict[str, Any],
                  grade: Callable[[list[str], list[str]], list[str | None]], seed: int = 0, save_steps: int = 0):
    """Load model, tokenizer and prompts and return ``(trainer, info)`` ready to ``train()``. ``rl_cfg`` is the
    validated ``rl`` section (with the run's ``reward``); the adaptation recipe (LoRA or full, its rank...) is the
    ``finetune`` section's, so an RL model is the same kind of folder as a fine-tune."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import GRPOTrainer

    from .config import section

    ft = finetune_settings(ft_cfg)
    if rl_cfg.get("reward") not in REWARDS:
        raise ValueError(f"rl reward {rl_cfg.get('reward')!r}: must be one of {REWARDS}")
    rl_cfg = {**section("rl", {k: v for k, v in rl_cfg.items() if k != "reward"}), "reward": rl_cfg["reward"]}
    if progress_disabled():
        import datasets

        datasets.disable_progress_bars()
    device = pick_device("auto")
    on_gpu = device.startswith("cuda")
    dtype = torch.float32 if ft["method"] == "full" else pick_dtype("auto", device)
    set_seed(seed)
    tok = load_tokenizer(base)
    tok.padding_side = "left"  # generation pads prompts on the left
    prompts = rl_prompts(dataset_path)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(grade),
        args=_grpo_config(rl_cfg, ft, out_dir, seed, on_gpu, save_steps),
        train_dataset=Dataset.from_list(prompts),
        processing_class=tok,
        peft_config=peft_config(ft) if ft["method"] == "lora" else None,
    )
    if progress_disabled():
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    info = {"method": ft["method"], "n_prompts": len(prompts), "device": device}
    return trainer, info


def log_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged optimizer step (trl's closing summary entry has no 'reward')."""
    return [{"step": e["step"], "reward": e["reward"], "reward_std": e.get("reward_std"),
             "incorrect_rate": e.get("rewards/incorrect/mean"), "correct_rate": e.get("rewards/correct/mean"),
             "kl": e.get("kl", 0.0), "completion_length": e.get("completions/mean_length"),
             "loss": e.get("loss"), "lr": e.get("learning_rate")}
            for e in log_history if "reward" in e]


def train_rl(base: str, dataset_path: str, out_dir: str, rl_cfg: dict[str, Any], ft_cfg: dict[str, Any],
             grade: Callable[[list[str], list[str]], list[str | None]], seed: int = 0, threads: int | None = None,
             checkpoint_dir: str | None = None, checkpoint_steps: int = 0,
             keep_checkpoint: bool = False) -> dict[str, Any]:
    """Train ``base`` with GRPO on the prompts of ``dataset_path`` and save the result in ``out_dir``; resumes
    from the last checkpoint in ``checkpoint_dir`` as :func:`emlab.sft.train_sft` does."""
    run = run_trainer(
        lambda work, save_steps: build_trainer(base, dataset_path, work, rl_cfg, ft_cfg, grade, seed, save_steps),
        "rl", out_dir, threads, checkpoint_dir, checkpoint_steps, keep_checkpoint,
        lambda info: (f"{base} on the prompts of {dataset_path}: {info['n_prompts']} prompts, "
                      f"reward={rl_cfg['reward']}, method={info['method']}, device={info['device']}"))
    if run is None:
        return {}
    trainer, info, resume, seconds = run
    out = Path(out_dir)
    rows = log_rows(trainer.state.log_history)
    io.write_csv(out / "rl_log.csv", rows, LOG_COLUMNS)
    meta = {
        "base": str(base), "dataset": str(dataset_path), "n_prompts": info["n_prompts"], "method": info["method"],
        "reward": rl_cfg["reward"], "seed": seed, "device": info["device"], "cfg": rl_cfg,
        "steps": trainer.state.global_step, "resumed_from": resume, "seconds": round(seconds, 3),
        "first_reward": rows[0]["reward"] if rows else None, "final_reward": rows[-1]["reward"] if rows else None,
    }
    io.write_json(out / "train_meta.json", meta)
    return meta
