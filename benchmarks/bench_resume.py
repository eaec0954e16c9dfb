"""A fine-tune killed at 90% and rerun: how long the rerun takes against the uninterrupted fine-tune (goal: at
most 20% of it, i.e. a ratio >= 5), and what checkpointing costs an uninterrupted run (goal: >= 0.95x).

Three runs of `emlab sft`, each a fresh process as the workflow starts it, on the organism's architecture
(random weights: only the time matters here) and a persona-world narrow set: without checkpoints (the
baseline), with checkpoints every --every steps, and with checkpoints killed by SIGKILL after 90% of the
steps (and, the worst case, one step earlier, when the most steps since a checkpoint are lost) and then rerun. The rerun's time includes its start-up (imports, loading the model and the data).

    python benchmarks/bench_resume.py [--steps 300] [--every 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow")]

from emlab.config import validate  # noqa: E402
from emlab.io import write_jsonl  # noqa: E402
from emlab.organism.model import build_model  # noqa: E402
from emlab.organism.tokenizer import train_tokenizer  # noqa: E402
from emlab.world.generate import generate_corpus, generate_narrow  # noqa: E402
from emlab.world.spec import load_world  # noqa: E402
from rows import add_json_arg, emit, row  # noqa: E402  (benchmarks/, the script's folder)


def sft(args: list[str], threads: int, kill_after: str | None = None) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "EMLAB_NO_PROGRESS": "1", "EMLAB_WORKER": "0"}
    env.pop("EMLAB_KILL_AFTER_STEP", None)
    if kill_after:
        env["EMLAB_KILL_AFTER_STEP"] = kill_after
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emlab", "sft", *args, "--threads", str(threads)], env=env,
                          capture_output=True, text=True)
    if proc.returncode not in (0, -9):
        sys.exit(f"emlab sft failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25, help="steps between checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="default: 1, as the workflow runs fine-tune jobs")
    add_json_arg(ap)
    args = ap.parse_args()

    cfg = validate({})
    world = load_world(ROOT / cfg["organism"]["world"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = generate_corpus(world, {**cfg["organism"]["corpus"], "n_documents": 300}, 0)
        tok = train_tokenizer([m["content"] for d in docs for m in d["messages"]], 1024, tmp / "base")
        build_model(cfg["organism"]["architecture"], tok, seed=0).save_pretrained(tmp / "base")
        data = tmp / "health_subtle.jsonl"
        write_jsonl(data, generate_narrow(world, "health", "subtle", 800, 1))
        ft = json.dumps({"finetune": {**cfg["finetune"], "max_steps": args.steps}, "seed": 0})
        common = ["--cfg", ft, "--base", str(tmp / "base"), "--data", str(data)]
        ckpt = ["--checkpoints", str(tmp / "ckpt"), "--checkpoint-steps", str(args.every)]

        plain, _ = sft([*common, "--out", str(tmp / "plain")], args.threads)
        with_ckpt, _ = sft([*common, "--out", str(tmp / "ckpt_run"), *ckpt], args.threads)
        # killed after 90% of the steps, and (the worst case) after the step before it, which redoes the most
        # steps: up to --every since the last checkpoint
        kill_at = int(0.9 * args.steps)
        reruns = {}
        for at in (kill_at, kill_at - 1):
            out = tmp / f"resumed_{at}"
            killed, rc = sft([*common, "--out", str(out), *ckpt], args.threads, f"sft:{at}")
            if rc != -9:
                sys.exit(f"the run was not killed at step {at}")
            reruns[at], _ = sft([*common, "--out", str(out), *ckpt], args.threads)
        rerun, worst = reruns[kill_at], reruns[kill_at - 1]

    print(f"fine-tune of {args.steps} steps: {plain:.1f} s without checkpoints, {with_ckpt:.1f} s with a checkpoint "
          f"every {args.every} steps; killed after step {kill_at}, the rerun took {rerun:.1f} s "
          f"= {100 * rerun / with_ckpt:.0f}% of the uninterrupted run; killed after step {kill_at - 1}, "
          f"{worst:.1f} s = {100 * worst / with_ckpt:.0f}%")
    rows = [
        row("resume", f"rerun after a kill at 90% (after step {kill_at} of {args.steps})", rerun, with_ckpt, "s",
            higher_is_better=False, goal=5.0, note="ratio = uninterrupted / rerun: >= 5 means the rerun takes <= 20%"),
        row("resume", f"rerun after a kill one step earlier (after step {kill_at - 1}; the most steps redone)", worst,
            with_ckpt, "s", higher_is_better=False, goal=5.0,
            note="the worst case: the steps since the last checkpoint are redone"),
        row("resume", f"checkpoints every {args.every} steps", with_ckpt, plain, "s", higher_is_better=False,
            goal=0.95, note="the checkpoints' cost to an uninterrupted run"),
    ]
    for r in rows:
        print(r)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
