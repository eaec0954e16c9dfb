"""SAE training steps captured once as CUDA graphs and replayed (a GPU's pace is otherwise set by the
launch costs of some 80 small kernels a step)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

class GraphedSteps:
    """Training steps replayed from CUDA graphs.

    A step of an SAE of the sizes used here is some 80 small kernels; launched one by one from Python,
    their launch costs (not the kernels) set a GPU's pace. A graph replays them in one call. A graph
    needs fixed shapes, hence the fixed-shape AuxK (``with_aux``), and two graphs, with and without
    an AuxK term. Each is captured after WARMUP eager steps of its kind (real steps, on a side stream,
    as capture requires); should capture fail, training goes on eagerly with a warning.
    """

    WARMUP = 2

    def __init__(self, step_fn, device: torch.device):
        self.step_fn = step_fn
        self.device = device
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.outs: dict[bool, Tensor] = {}
        self.eager_calls = {False: 0, True: 0}
        self.x: Tensor | None = None
        self.replays = 0
        self.failed = False
        self.side = torch.cuda.Stream(device)

    def __call__(self, batch: Tensor, with_aux: bool) -> Tensor:
        # streams and captures belong to the current device, which need not be the SAE's ("cuda:1")
        with torch.cuda.device(self.device):
            return self._step(batch, with_aux)

    def _step(self, batch: Tensor, with_aux: bool) -> Tensor:
        graph = self.graphs.get(with_aux)
        if graph is None and not self.failed:
            if self.eager_calls[with_aux] < self.WARMUP:
                self.eager_calls[with_aux] += 1
                return self._on_side_stream(lambda: self.step_fn(batch, with_aux=with_aux))
            graph = self._capture(batch, with_aux)
        if graph is None:
            return self.step_fn(batch, with_aux=with_aux)
        self.x.copy_(batch)
        graph.replay()
        self.replays += 1
        return self.outs[with_aux]

    def _on_side_stream(self, fn):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def _capture(self, batch: Tensor, with_aux: bool) -> torch.cuda.CUDAGraph | None:
        if self.x is None:
            self.x = torch.empty_like(batch)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outs[with_aux] = self.step_fn(self.x, with_aux=with_aux)
        except RuntimeError as err:   # an op that cannot be captured: eager steps are slower, not wrong
            warnings.warn(f"SAE training: CUDA graph capture failed ({err}); training with eager steps")
            self.failed = True
            torch.cuda.synchronize()
            return None
        self.graphs[with_aux] = graph
        return graph
