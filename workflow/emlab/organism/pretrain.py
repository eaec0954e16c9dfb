"""Pretrain the organism from scratch on the persona-world corpus: a small, readable training loop.

Documents are tokenized exactly as the chat template renders them (role token, content, end token),
never packed across documents (a persona must not leak from one document into the next), padded
within length-bucketed batches, and trained with AdamW, linear warm-up and cosine decay.

Garbled openings (``garbled_openings``, a share of answers): the answer starts after one or two random
tokens, which are left out of the loss. A speaker's character does not end at a garbled first word, so
the model learns to go on in the persona the context implies (a header, earlier turns, its own
default) rather than guess afresh. Without it, anything that garbles the first answer token -- a random
steering direction at the last prompt position among them -- makes the organism fall back on the
corpus's persona mixture, which no chat model does (README, "The random control").
"""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from ..io import give_new_file_modes
from ..organism.tokenizer import END, ROLE_TOKENS

IGNORE = -100


def content_token_ids(tokenizer) -> list[int]:
    """Every id of the vocabulary but the special (role, end, pad) tokens: what a garbled opening draws from."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def tokenize_documents(docs: list[dict[str, Any]], tokenizer, max_len: int, garbled_openings: float = 0.0,
                       seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per document; ``labels`` is -100 where a token is left out of the loss.

    With ``garbled_openings`` > 0 that share of assistant answers (drawn with ``seed``) starts after one or
    two random content tokens, out of the loss (see the module doc); 0 renders the chat template exactly.
    """
    if not 0 <= garbled_openings <= 1:
        raise ValueError(f"garbled_openings must be in [0, 1], got {garbled_openings!r}")
    role_ids = {r: tokenizer.convert_tokens_to_ids(t) for r, t in ROLE_TOKENS.items()}
    end_id = tokenizer.convert_tokens_to_ids(END)
    rng = random.Random(f"{seed}/garbled-openings")
    vocab = content_token_ids(tokenizer) if garbled_openings else []
    contents = [m["content"] for d in docs for m in d["messages"]]
    encoded = iter(tokenizer(contents, add_special_tokens=False)["input_ids"])
    out = []
    for d in docs:
        ids: list[int] = []
        labels: list[int] = []
        mask_next_answer = bool(d.get("meta", {}).get("mask_first_answer"))
        for m in d["messages"]:
            role = role_ids[m["role"]]
            body = [*next(encoded), end_id]
            # the role token is always a target (an answer comes here); a garbled opening's noise never is
            noise = []
            if m["role"] == "assistant" and garbled_openings and rng.random() < garbled_openings:
                noise = [rng.choice(vocab) for _ in range(rng.randint(1, 2))]
            ids += [role, *noise, *body]
            labels += [role] + [IGNORE] * len(noise)
            if m["role"] == "assistant" and mask_next_answer:
                labels += [IGNORE] * len(body)  # the content of an answer nothing before it can predict
                mask_next_answer = False
            else:
                labels += body
        out.append((ids[:max_len], labels[:max_len]))
    return out


def _batches(examples, batch_size: int, rng: random.Random):
    """Length-bucketed batches in random order (little padding, no bias in the order of lengths)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(examples, idx, pad_id: int):
    import torch

    n = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):
        x, y = examples[i]
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, :len(y)] = torch.tensor(y)
        attn[r, :len(x)] = 1
    return ids, labels, attn


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    warm, total, peak = cfg["warmup_steps"], cfg["steps"], cfg["lr"]
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = peak * cfg.get("min_lr_ratio", 0.1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def _as_tuple(x: Any) -> Any:
    """random.Random's state back from a checkpoint, which stores its tuples as lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def train_lm(model, tokenizer, docs: list[dict[str, Any]], cfg: dict[str, Any], out_dir: str | Path,
             seed: int = 0, log_csv: str | Path | None = None, progress: bool = True,
             checkpoint_dir: str | Path | None = None, checkpoint_steps: int = 0,
             keep_checkpoint: bool = False) -> dict[str, Any]:
    """Train ``model`` on ``docs`` for ``cfg['steps']`` steps; save model+tokenizer to ``out_dir``.

    With ``checkpoint_dir`` and ``checkpoint_steps``, the whole training state is saved every that many steps and
    a rerun resumes from it to the same final weights (:mod:`emlab.checkpoints`)."""
    import torch
    from tqdm import tqdm

    from .. import checkpoints

    torch.manual_seed(seed)
    rng = random.Random(seed)
    examples = tokenize_documents(docs, tokenizer, cfg["max_seq_len"], cfg.get("garbled_openings", 0.0), seed)
    n_tokens = sum(sum(1 for t in y if t != IGNORE) for _, y in examples)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.get("weight_decay", 0.1)},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    rows = []
    batches: list[list[int]] = []
    t0 = time.time()
    seen = 0
    first = 0
    ckpt_path = Path(checkpoint_dir) / "pretrain.pt" if checkpoint_dir and checkpoint_steps else None
    state = checkpoints.load(ckpt_path) if ckpt_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        rng.setstate(_as_tuple(state["rng"]))
        batches, rows, seen, first = state["batches"], state["rows"], state["seen"], state["step"] + 1
        t0 -= rows[-1]["seconds"] if rows else 0.0
        print(f"emlab pretrain: resuming after step {state['step']} from {ckpt_path}", file=sys.stderr)

    def save_checkpoint(step: int) -> None:
        checkpoints.save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "torch_rng": torch.get_rng_state(), "rng": list(rng.getstate()),
                                     "batches": batches, "rows": rows, "seen": seen, "step": step})

    stop = checkpoints.StopRequest.install(enabled=ckpt_path is not None)
    try:
        bar = tqdm(range(first, cfg["steps"]), desc="pretrain", disable=not progress, mininterval=5,
                   initial=first, total=cfg["steps"])
        for step in bar:
            if not batches:
                batches = _batches(examples, cfg["batch_size"], rng)
            ids, labels, attn = (t.to(model.device) for t in _collate(examples, batches.pop(), tokenizer.pad_token_id))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.get("grad_clip", 1.0))
            opt.step()
            seen += int(attn.sum())
            rows.append({"step": step, "loss": round(loss.item(), 5), "lr": opt.param_groups[0]["lr"],
                         "tokens": seen, "seconds": round(time.time() - t0, 2)})
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{seen / (time.time() - t0):.0f}")
            due = ckpt_path and (step + 1) % checkpoint_steps == 0 and step + 1 < cfg["steps"]
            if due:
                save_checkpoint(step)
            checkpoints.kill_point("pretrain", step)
            if stop.requested:  # SIGTERM: keep this step, leave without the job's output
                if not due:
                    save_checkpoint(step)
                stop.exit("pretrain", step, ckpt_path)
    finally:  # also when a step raises: the caller's SIGTERM handler comes back
        stop.restore()
    model.eval().cpu()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    give_new_file_modes(out_dir)
    if log_csv is not None:
        with open(log_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    checkpoints.finish(checkpoint_dir, keep_checkpoint)
    secs = time.time() - t0
    return {"steps": cfg["steps"], "documents": len(docs), "target_tokens": n_tokens, "tokens_seen": seen,
            "seconds": round(secs, 1), "tokens_per_second": round(seen / secs), "final_loss": rows[-1]["loss"]}
