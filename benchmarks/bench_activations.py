"""Activation reading throughput: emlab's nnsight path against a bare torch forward hook, on the
same pre-tokenized, length-sorted, padded batches, in the same run (goal: nnsight >= 0.9x the hook).

Both read the residual stream after the same layers at every real token, gather those rows and
stop the forward after the deepest requested block. Rounds alternate between the two methods
so that load from other processes hits both alike; the median round counts.

    python benchmarks/bench_activations.py [--hidden 128] [--layers 4] [--texts 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow"), str(ROOT / "tests")]

import torch  # noqa: E402

from emlab.activations import Item, length_sorted_batches, pad_batch, read_residuals  # noqa: E402
from emlab.arch import as_nnsight, layer_hidden, residual_module  # noqa: E402
from emlab.organism.tokenizer import train_tokenizer  # noqa: E402
from tiny_models import tiny_causal_lm  # noqa: E402
from rows import add_json_arg, add_timing_args, emit, median_seconds, row, set_threads  # noqa: E402  (benchmarks/, the script's folder)

GOAL = 0.9


class _Stop(Exception):
    pass


def hook_read(model, input_ids, attention_mask, position_ids, layers, rows, cols):
    """The baseline: plain forward hooks gathering the same rows, stopping after the deepest block."""
    got, handles = {}, []
    deepest = max(layers)
    for L in layers:
        def hook(module, args, output, L=L):
            got[L] = layer_hidden(output)[rows, cols]
            if L == deepest:
                raise _Stop
        handles.append(residual_module(model, L).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [got[L] for L in layers]


class _Vocab:
    """Just what tiny_causal_lm reads off a tokenizer."""

    def __init__(self, n: int):
        self.n, self.pad_token_id, self.eos_token_id = n, 0, 1

    def __len__(self) -> int:
        return self.n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--read-layers", type=int, nargs="+", default=[1, 3])
    add_timing_args(ap, rounds=5)
    add_json_arg(ap)
    args = ap.parse_args()
    set_threads(args)

    vocab = _Vocab(args.vocab)
    model = tiny_causal_lm("llama", vocab, hidden=args.hidden, layers=args.layers, init_std=0.02)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.texts,), generator=gen).tolist()
    items = [Item(i, torch.randint(2, args.vocab, (n,), generator=gen).tolist(), list(range(n)))
             for i, n in enumerate(lengths)]
    batches = []
    for batch in length_sorted_batches(items, args.batch_size):
        ids, mask, pos, offsets = pad_batch([it.ids for it in batch], 0, "left")
        rows = torch.tensor([b for b, it in enumerate(batch) for _ in it.positions])
        cols = torch.tensor([offsets[b] + p for b, it in enumerate(batch) for p in it.positions])
        batches.append((ids, mask, pos, rows, cols))
    n_tokens = sum(lengths)
    # nnsight configures a tokenizer; the pre-tokenized batches never use it
    nn_model = as_nnsight(model, train_tokenizer(["How do I save money? Keep a budget."] * 8, vocab_size=300))

    def run_nnsight():
        return [read_residuals(nn_model, *b[:3], args.read_layers, *b[3:]) for b in batches]

    def run_hook():
        return [hook_read(model, *b[:3], args.read_layers, *b[3:]) for b in batches]

    # same numbers from both paths, then a warm-up round each
    for a, b in zip(run_nnsight(), run_hook()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    t = median_seconds({"hook": run_hook, "nnsight": run_nnsight}, args.rounds)
    hook, nn = n_tokens / t["hook"], n_tokens / t["nnsight"]
    print(f"activation reading: Llama d={args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.texts} texts, "
          f"{n_tokens} tokens, batch {args.batch_size}, layers {args.read_layers}, {torch.get_num_threads()} threads")
    print(f"  bare forward hook: {hook:10.0f} tokens/s")
    print(f"  nnsight (emlab):   {nn:10.0f} tokens/s")
    print(f"  ratio nnsight/hook: {nn / hook:.2f}   (goal >= {GOAL})  {'OK' if nn / hook >= GOAL else 'BELOW GOAL'}")
    emit([row("activations", "activation caching (nnsight) vs a bare forward hook", nn, hook, "tokens/s", goal=GOAL,
              note=f"d={args.hidden}, {args.texts} texts, batch {args.batch_size}")], args.json)


if __name__ == "__main__":
    main()
