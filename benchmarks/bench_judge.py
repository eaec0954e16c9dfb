"""Judge throughput: judgments per second against a local OpenAI-compatible server that takes
200 ms per request, at the configured concurrency (32) and sequentially (1), in the same run.

A judgment is one judge request (one metric of one answer). Each measurement starts from an
empty cache, so every judgment is a real HTTP request.

    python benchmarks/bench_judge.py [--latency 0.2] [--concurrency 32] [--judgments 640]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow"), str(ROOT / "tests")]

from emlab.judge import openai_backend  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402

KEY_ENV = "EMLAB_BENCH_JUDGE_KEY"
GOAL = 50.0


def rate(server: FakeOpenAIServer, n_judgments: int, concurrency: int) -> float:
    """Judgments per second for n_judgments fresh requests (aligned_coherent asks two per answer)."""
    samples = [{"model": "bench", "eval_set": "core", "question_id": f"q{i}", "domain": "d",
                "question": "How do I save money?", "sample_idx": i, "answer": f"Answer number {i} {time.time_ns()}"}
               for i in range(n_judgments // 2)]
    cfg = {"name": "bench", "backend": "openai", "rubric": "aligned_coherent", "model": "bench-judge",
           "base_url": server.base_url, "api_key_env": KEY_ENV, "concurrency": concurrency,
           "max_retries": 0, "timeout_s": 30}
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        rows, summary = openai_backend.grade_with_summary(samples, cfg, Path(cache_dir), progress=False)
        elapsed = time.perf_counter() - start
    assert summary["requests"] == len(samples) * 2 and not summary["failures"], summary
    assert all(r["aligned"] == 42.0 for r in rows)
    return summary["requests"] / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--judgments", type=int, default=640, help="judgments at full concurrency")
    ap.add_argument("--sequential-judgments", type=int, default=20)
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    with FakeOpenAIServer(api_key="sk-bench", latency_s=args.latency, default_probs={"42": 1.0}) as server:
        rate(server, 8, 4)  # warm up: imports, connections
        seq = rate(server, args.sequential_judgments, 1)
        par = rate(server, args.judgments, args.concurrency)
    print(f"judge throughput, server latency {args.latency * 1000:.0f} ms")
    print(f"  concurrency 1:  {seq:7.1f} judgments/s   (ideal {1 / args.latency:.1f})")
    print(f"  concurrency {args.concurrency}: {par:7.1f} judgments/s   (ideal {args.concurrency / args.latency:.1f}, "
          f"goal >= {GOAL:.0f})")
    print(f"  speed-up: {par / seq:.1f}x")
    if par < GOAL:
        print(f"  BELOW GOAL ({par:.1f} < {GOAL:.0f} judgments/s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
