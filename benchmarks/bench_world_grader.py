"""World judge: the grader's pruned fuzzy search vs a plain difflib scan, on the same answers, in one run.

Answers are world texts with random character edits (what a steered or half-trained model writes:
near-misses, and garbled text that matches nothing). Both searches must return the same matches;
the printout gives answers/s for each and the speed-up. Memoisation is off for the timing (every
answer is new to the grader), so the ratio is the search's alone.

    python benchmarks/bench_world_grader.py [--answers 300] [--threshold 0.8]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from emlab.world.grader import WorldGrader, scan_closest  # noqa: E402
from emlab.world.spec import load_world  # noqa: E402
from rows import add_json_arg, emit, row  # noqa: E402  (benchmarks/, the script's folder)


def edited_answers(keys: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = list(rng.choice(keys))
        for _ in range(rng.randint(1, len(chars) // 4)):  # from a typo or two to a garbled text
            chars[rng.randrange(len(chars))] = rng.choice("abcdefghijklmnopqrstuvwxyz ")
        out.append("".join(chars))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=str(ROOT / "resources/world/persona_world.yaml"))
    p.add_argument("--answers", type=int, default=300)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    add_json_arg(p)
    args = p.parse_args()

    grader = WorldGrader(load_world(args.world), args.threshold)
    keys = grader._keys
    answers = edited_answers(keys, args.answers, args.seed)

    start = time.perf_counter()
    found = []
    for a in answers:
        grader._memo.clear()
        found.append(grader.closest(a)[0])
    pruned = time.perf_counter() - start
    start = time.perf_counter()
    expected = [scan_closest(keys, a, args.threshold)[0] for a in answers]
    plain = time.perf_counter() - start

    if found != expected:
        sys.exit("the pruned search and the difflib scan disagree")
    matched = sum(f is not None for f in found)
    print(f"{len(answers)} edited answers against {len(keys)} world texts, threshold {args.threshold}: "
          f"{matched} matched, {len(answers) - matched} incoherent; same matches from both searches")
    print(f"pruned search {len(answers) / pruned:8.1f} answers/s")
    print(f"difflib scan  {len(answers) / plain:8.1f} answers/s")
    print(f"speed-up x{plain / pruned:.1f}")
    emit([row("world_grader", "world judge: pruned fuzzy search vs a difflib scan", len(answers) / pruned,
              len(answers) / plain, "answers/s", note=f"{len(answers)} edited answers, same matches")], args.json)


if __name__ == "__main__":
    main()
