"""The ``emlab-job`` record: one line per job, written to the job's log (stderr) when it ends.

    emlab-job command=sft status=ok host=node1 pid=123 start=<iso> end=<iso> seconds=20.6 wall=21.3
        cpu=20.9 import=3.1 max_rss_mb=612 via=process CUDA_VISIBLE_DEVICES=

``seconds`` is the command's own run (from the CLI's start), ``wall`` the whole process (interpreter start
included), ``cpu`` its user + system time (child processes included), ``import`` the seconds spent importing
modules (interpreter start included: the cost a job pays before it does anything), ``max_rss_mb`` its peak
resident memory, ``via`` ``process`` or ``worker`` (:mod:`emlab.worker`). Clusters are audited from these lines (which host, which GPUs) and ``emlab timings`` builds
the per-job table of a run from them.
"""

from __future__ import annotations

import builtins
import importlib
import os
import re
import resource
import socket
import time
from contextlib import contextmanager
from typing import Iterator

PREFIX = "emlab-job "
LINE = re.compile(r"^emlab-job (.*)$")

# How this process runs its job: "process" (its own interpreter) or "worker" (a child forked by the run's warm
# worker, which sets this; see emlab.worker). The job's record says which.
via = "process"

# The threads of a parallel torch op (libgomp) wait for each other at its end, spinning by default for
# ~300k iterations before they sleep. On a machine where another process is busy, a spinning thread
# takes the core its partner needs: two-thread pretraining then ran at a quarter of its speed. At 3000
# spins it runs at half (one core's worth) and loses 8% when the machine is quiet. libgomp reads this
# when torch loads, so every job (and the worker, before it preloads torch) sets it first; a value in the
# environment wins.
GOMP_SPINCOUNT = "3000"


class ImportClock:
    """Wall seconds spent in imports, outermost import only (an import inside an import is not counted twice).

    Both ways in are timed: ``import`` statements (``builtins.__import__``) and ``importlib.import_module``,
    which the lazy modules of transformers use.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self._depth -= 1
        return wrapper

    @contextmanager
    def running(self) -> Iterator["ImportClock"]:
        saved = builtins.__import__, importlib.import_module
        builtins.__import__, importlib.import_module = self._timed(saved[0]), self._timed(saved[1])
        try:
            yield self
        finally:
            builtins.__import__, importlib.import_module = saved


def process_start_time() -> float | None:
    """When the job's process started (epoch seconds), or None where it cannot be read. A job run by the warm
    worker (:mod:`emlab.worker`) started before the worker's child that runs it: the job passes its time on."""
    if os.environ.get("EMLAB_JOB_STARTED"):
        return float(os.environ["EMLAB_JOB_STARTED"])
    age = process_age()
    return None if age is None else time.time() - age


def process_age() -> float | None:
    """Seconds since this process started, from the kernel's clock-tick count (psutil's start time rounds the
    boot time to a whole second, more than a fast job's start-up)."""
    try:
        fields = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): start time after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def record(command: str, status: str, start: float, end: float, seconds: float, imports: float,
           via: str = "process") -> str:
    """The ``emlab-job`` line of a job that ran ``command`` from ``start`` to ``end`` (epoch seconds), in its own
    process or forked from the run's warm worker (``via``)."""
    import datetime as dt

    began = process_start_time()
    startup = max(0.0, start - began) if began is not None else 0.0
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    rss_mb = max(u.ru_maxrss for u in usage) / 1024  # kilobytes on Linux

    def iso(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()

    return (f"{PREFIX}command={command} status={status} host={socket.gethostname()} pid={os.getpid()} "
            f"start={iso(start)} end={iso(end)} seconds={seconds:.1f} wall={seconds + startup:.1f} cpu={cpu:.1f} "
            f"import={imports + startup:.1f} max_rss_mb={rss_mb:.0f} via={via} "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")


def parse(line: str) -> dict[str, str] | None:
    """The fields of an ``emlab-job`` line (values may be empty, e.g. no GPU), or None for any other line."""
    m = LINE.match(line.strip())
    if not m:
        return None
    return dict(token.partition("=")[::2] for token in m.group(1).split())
