"""Training checkpoints that let a killed job resume (``checkpoints:`` in the config).

A checkpoint holds everything the next step depends on (weights, optimizer, schedule position, random
states, the data order still to come), so a resumed run ends with the same model as an uninterrupted one.
Checkpoints live outside a job's outputs (Snakemake removes the outputs of a failed job) and are removed
once the output is written, unless kept.

SIGTERM (a scheduler preempting a job or ending it at its time limit, which SLURM sends before SIGKILL; Snakemake
stopping) makes a training job with checkpoints save one at the end of the step under way and exit with status
143, instead of dying and losing the steps since its last checkpoint (:class:`StopRequest`).

``EMLAB_KILL_AFTER_STEP=<stage>:<step>`` kills the process (SIGKILL, as a preempting scheduler or the OOM
killer would) right after that training step, ``<stage>:<step>:TERM`` sends it SIGTERM instead; fault injection
for the tests, inert unless set.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically: a kill mid-write leaves the last
    checkpoint intact."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none (tensors and plain data only: nothing unpickles)."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def finish(directory: str | os.PathLike | None, keep: bool) -> None:
    """The job's output is written: its checkpoints are no longer needed."""
    if directory is not None and not keep:
        shutil.rmtree(directory, ignore_errors=True)


def kill_point(stage: str, step: int) -> None:
    """Fault injection: SIGKILL (or SIGTERM) this process after ``step`` of ``stage`` when EMLAB_KILL_AFTER_STEP
    asks for it."""
    target = os.environ.get("EMLAB_KILL_AFTER_STEP")
    if target == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    elif target == f"{stage}:{step}:TERM":
        os.kill(os.getpid(), signal.SIGTERM)


class StopRequest:
    """Turns SIGTERM into a request that the training loop honours at the end of a step: save a checkpoint, then
    :meth:`exit`. Installed only by jobs that checkpoint, in a single process: under ``accelerate launch`` the
    ranks could see the signal at different steps and wait on each other's save."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None

    @classmethod
    def install(cls, enabled: bool = True) -> "StopRequest":
        """Take over SIGTERM until :meth:`restore` (a no-op object when not ``enabled``, in a process of a
        multi-process run, or off the main thread, where Python cannot set handlers)."""
        import threading

        stop = cls()
        if (enabled and int(os.environ.get("WORLD_SIZE", "1")) == 1
                and threading.current_thread() is threading.main_thread()):
            stop._previous = signal.signal(signal.SIGTERM, stop._handle)
        return stop

    def restore(self) -> None:
        """Give SIGTERM back its earlier handler (training called from a long-lived process, a notebook)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit(self, stage: str, step: int, where: str | os.PathLike) -> None:
        """Leave as a job killed by the signal would (status 128 + signal), the checkpoint of ``step`` saved."""
        import sys

        self.restore()
        print(f"emlab {stage}: stopped by signal {self.signum} after step {step}; its checkpoint is in {where}, "
              "and a rerun resumes from it", file=sys.stderr)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))
