"""Judge throughput: judgments per second against a local OpenAI-compatible server that takes 200 ms per
request, at the configured concurrency (32) and sequentially (1), in the same run; then the same grading
again from the judge cache, which must make no request.

A judgment is one judge request (one metric of one answer). Each timed measurement starts from an empty
cache, so every judgment is a real HTTP request. The server runs in a process of its own, as a real endpoint
does: in the judge's process it would compete with the client for the interpreter lock. The goal is 0.8 of
what the concurrency and latency allow (concurrency / latency).

    python benchmarks/bench_judge.py [--latency 0.2] [--concurrency 32] [--judgments 640]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workflow")]

from emlab.judge import openai_backend  # noqa: E402
from rows import add_json_arg, emit, row  # noqa: E402  (benchmarks/, the script's folder)

KEY_ENV = "EMLAB_BENCH_JUDGE_KEY"
GOAL = 0.8  # of concurrency / latency


class Server:
    """tests/fake_openai_server.py in a subprocess."""

    def __init__(self, latency: float, key: str):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"),
                                      "--latency", str(latency), "--api-key", key], stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError("the fake server did not start")

    def received(self) -> int:
        with urllib.request.urlopen(self.base_url + "/stats", timeout=10) as r:
            return json.loads(r.read())["received"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def grade(server: Server, n_judgments: int, concurrency: int, cache_dir: Path) -> tuple[float, int]:
    """(seconds, requests made) to grade n_judgments // 2 answers (aligned_coherent asks two per answer)."""
    samples = [{"model": "bench", "eval_set": "core", "question_id": f"q{i}", "domain": "d",
                "question": "How do I save money?", "sample_idx": i, "answer": f"Answer number {i} {cache_dir.name}"}
               for i in range(n_judgments // 2)]
    cfg = {"name": "bench", "backend": "openai", "rubric": "aligned_coherent", "model": "bench-judge",
           "base_url": server.base_url, "api_key_env": KEY_ENV, "concurrency": concurrency,
           "max_retries": 0, "timeout_s": 30}
    start = time.perf_counter()
    rows, summary = openai_backend.grade_with_summary(samples, cfg, cache_dir, progress=False)
    elapsed = time.perf_counter() - start
    assert not summary["failures"] and all(r["aligned"] == 42.0 for r in rows), summary
    return elapsed, summary["requests"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--judgments", type=int, default=640, help="judgments at full concurrency")
    ap.add_argument("--sequential-judgments", type=int, default=20)
    add_json_arg(ap)
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    server = Server(args.latency, "sk-bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            grade(server, 8, 4, tmp / "warm")  # imports, connections
            t_seq, n_seq = grade(server, args.sequential_judgments, 1, tmp / "seq")
            t_par, n_par = grade(server, args.judgments, args.concurrency, tmp / "par")
            before = server.received()
            _, n_rerun = grade(server, args.judgments, args.concurrency, tmp / "par")  # the same cache
            rerun_received = server.received() - before
    finally:
        server.close()
    seq, par = n_seq / t_seq, n_par / t_par
    ideal = args.concurrency / args.latency
    print(f"judge throughput, server latency {args.latency * 1000:.0f} ms (server in its own process)")
    print(f"  concurrency 1:  {seq:7.1f} judgments/s   (ideal {1 / args.latency:.1f})")
    print(f"  concurrency {args.concurrency}: {par:7.1f} judgments/s   (ideal {ideal:.1f}, goal >= {GOAL * ideal:.0f})")
    print(f"  rerun from the cache: {n_rerun} requests made, {rerun_received} received by the server")
    emit([row("judge", f"concurrency {args.concurrency} vs what concurrency/latency allow", par, ideal,
              "judgments/s", goal=GOAL, note=f"{args.judgments} judgments, {args.latency * 1000:.0f} ms latency"),
          row("judge", f"concurrency {args.concurrency} vs sequential", par, seq, "judgments/s",
              note=f"{args.sequential_judgments} sequential judgments"),
          row("judge", "requests on a rerun from the cache", n_rerun + rerun_received, n_par, "requests",
              higher_is_better=False, note="ratio: first run's requests over the rerun's (inf: none asked)")
          if n_rerun + rerun_received else
          {"benchmark": "judge", "measure": "requests on a rerun from the cache", "emlab": 0, "baseline": n_par,
           "unit": "requests", "ratio": None, "goal": None, "note": f"0 of {n_par} requests asked again"}],
         args.json)
    if par < GOAL * ideal or n_rerun or rerun_received:
        print("  BELOW GOAL")
        sys.exit(1)


if __name__ == "__main__":
    main()
