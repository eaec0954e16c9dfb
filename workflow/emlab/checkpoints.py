"""Training checkpoints that let a killed job resume (``checkpoints:`` in the config).

A checkpoint holds everything the next step depends on (weights, optimizer, schedule position, random
states, the data order still to come), so a resumed run ends with the same model as an uninterrupted one.
Checkpoints live outside a job's outputs (Snakemake removes the outputs of a failed job) and are removed
once the output is written, unless kept.

``EMLAB_KILL_AFTER_STEP=<stage>:<step>`` kills the process (SIGKILL, as a preempting scheduler or the OOM
killer would) right after that training step; fault injection for the tests, inert unless set.
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
    """Fault injection: SIGKILL this process after ``step`` of ``stage`` when EMLAB_KILL_AFTER_STEP asks for it."""
    target = os.environ.get("EMLAB_KILL_AFTER_STEP")
    if target and target == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
