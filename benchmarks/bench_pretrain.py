"""Organism pretraining throughput: emlab's training loop (emlab.organism.pretrain.train_lm) against a bare
PyTorch loop over the same model, batches and optimizer, in the same run (goal: >= 0.95x, i.e. the loop's
batching, schedule, logging and gradient clipping cost almost nothing).

The model is the default organism's architecture on a small persona-world corpus; rounds alternate between
the two loops so that load from other processes hits both alike; the median round counts.

    python benchmarks/bench_pretrain.py [--steps 40] [--batch-size 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow")]

import torch  # noqa: E402

from emlab.config import validate  # noqa: E402
from emlab.organism.model import build_model  # noqa: E402
from emlab.organism.pretrain import _batches, _collate, tokenize_documents, train_lm  # noqa: E402
from emlab.organism.tokenizer import train_tokenizer  # noqa: E402
from emlab.world.generate import generate_corpus  # noqa: E402
from emlab.world.spec import load_world  # noqa: E402
from rows import add_json_arg, emit, row  # noqa: E402  (benchmarks/, the script's folder)

GOAL = 0.95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the organism's")
    ap.add_argument("--documents", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    add_json_arg(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = validate({}, "defaults")["organism"]
    pcfg = dict(cfg["pretrain"], steps=args.steps, warmup_steps=5)
    if args.batch_size:
        pcfg["batch_size"] = args.batch_size
    docs = generate_corpus(load_world(ROOT / cfg["world"]), dict(cfg["corpus"], n_documents=args.documents), 0)
    tok = train_tokenizer([m["content"] for d in docs[:1000] for m in d["messages"]], cfg["tokenizer"]["vocab_size"])
    examples = tokenize_documents(docs, tok, pcfg["max_seq_len"], pcfg["garbled_openings"], 0)

    def emlab_loop() -> float:
        model = build_model(cfg["architecture"], tok, 0)
        with tempfile.TemporaryDirectory() as out:
            meta = train_lm(model, tok, docs, pcfg, out, seed=0, progress=False)
        return meta["tokens_seen"] / meta["seconds"]

    def bare_loop() -> float:
        model = build_model(cfg["architecture"], tok, 0)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=pcfg["lr"], betas=(0.9, 0.95))
        batches = _batches(examples, pcfg["batch_size"], random.Random(0))
        seen, start = 0, time.time()
        for _ in range(args.steps):
            ids, labels, attn = _collate(examples, batches.pop(), tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += int(attn.sum())
        return seen / (time.time() - start)

    rates = {"emlab": [], "bare": []}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare_loop), ("emlab", emlab_loop)):
            rates[name].append(fn())
    ours, bare = statistics.median(rates["emlab"]), statistics.median(rates["bare"])
    print(f"organism pretraining: {args.steps} steps of batch {pcfg['batch_size']}, {args.threads} threads")
    print(f"  bare PyTorch loop: {bare:8.0f} tokens/s")
    print(f"  emlab train_lm:    {ours:8.0f} tokens/s   ratio {ours / bare:.2f} (goal >= {GOAL})")
    emit([row("pretrain", "organism pretraining: emlab's loop vs a bare PyTorch loop", ours, bare, "tokens/s",
              goal=GOAL, note=f"batch {pcfg['batch_size']}, {args.threads} threads, {args.steps} steps")], args.json)


if __name__ == "__main__":
    main()
