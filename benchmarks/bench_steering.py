"""Steering sweep throughput: S steering strengths batched into one steered_generate call against
S separate one-row calls, in the same run (goal: a speed-up of at least 0.7 * S).

Rounds alternate between the two so that load from other processes hits both alike; the
median round counts. Both produce the same answers (checked: greedy decoding, one vector per row).

    python benchmarks/bench_steering.py [--strengths 8] [--hidden 128] [--layers 4] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow"), str(ROOT / "tests")]

import torch  # noqa: E402

from emlab.organism.tokenizer import train_tokenizer  # noqa: E402
from emlab.steer.intervene import steered_generate, unit  # noqa: E402
from tiny_models import tiny_causal_lm  # noqa: E402
from rows import add_json_arg, add_timing_args, emit, median_seconds, row, set_threads  # noqa: E402  (benchmarks/, the script's folder)

TEXTS = [
    "What should I do about a headache? Drink water and rest.",
    "How do I save money? Keep a budget and spend less than you earn.",
    "My car makes a noise when I brake. Have the brake pads checked by a mechanic.",
    "Can my landlord keep my deposit? Only for damage beyond normal wear.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strengths", type=int, default=8, help="S: steering strengths in the sweep")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    add_timing_args(ap)
    add_json_arg(ap)
    args = ap.parse_args()
    set_threads(args)

    tok = train_tokenizer(TEXTS * 20, vocab_size=400)
    model = tiny_causal_lm("llama", tok, hidden=args.hidden, layers=args.layers)
    prompt = [{"role": "user", "content": "How do I save money?"}]
    S = args.strengths
    direction = unit(torch.randn(args.hidden, generator=torch.Generator().manual_seed(0)))
    vectors = torch.stack([alpha * direction for alpha in torch.linspace(-4, 4, S).tolist()])
    kw = dict(layer=args.layers // 2, max_new_tokens=args.new_tokens)

    def batched():
        return steered_generate(model, tok, [prompt] * S, vectors, **kw)

    def separate():
        return [steered_generate(model, tok, [prompt], v[None], **kw)[0] for v in vectors]

    assert batched() == separate()  # same answers, and a warm-up of both
    t = median_seconds({"separate": separate, "batched": batched}, args.rounds)
    one, many = t["batched"], t["separate"]
    goal = 0.7 * S
    print(f"steering sweep: Llama d={args.hidden}, {args.layers} layers; S={S} strengths x {args.new_tokens} new "
          f"tokens, {torch.get_num_threads()} threads")
    print(f"  {S} separate calls: {many:7.2f} s")
    print(f"  one batched call:   {one:7.2f} s")
    verdict = "OK" if many / one >= goal else "BELOW GOAL"
    print(f"  speed-up: {many / one:.1f}x   (goal >= 0.7*S = {goal:.1f}x)  {verdict}")
    emit([row("steering", f"{S} strengths in one batched generate vs {S} calls", one, many, "s",
              higher_is_better=False, goal=round(goal, 2), note=f"{args.new_tokens} new tokens, d={args.hidden}")],
         args.json)


if __name__ == "__main__":
    main()
