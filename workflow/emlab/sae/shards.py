"""Activation shards read for SAE training: a tensor, a sequence of tensors or a stream of them, batched in a
seeded order shard by shard."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

class Shards:
    """Tensor, sequence of tensors, or iterable of tensors [tokens, d_in], read shard by shard.

    A re-iterable source is re-read for every epoch; a one-shot iterator gives one pass.
    """

    def __init__(self, data: Tensor | Sequence[Tensor] | Iterable[Tensor], n_tokens: int | None):
        if isinstance(data, Tensor):
            data = [data]
        self._one_shot = iter(data) is data
        self._data = data
        self._first: Tensor | None = None
        if isinstance(data, Sequence):
            if not data:
                raise ValueError("no activation shards given")
            for i, t in enumerate(data):
                self._check(i, t, data[0].shape[-1])
            n_tokens = sum(int(t.shape[0]) for t in data)
        self.n_tokens = n_tokens

    @staticmethod
    def _check(i: int, shard: Any, d_in: int) -> None:
        if not isinstance(shard, Tensor) or shard.ndim != 2 or not shard.is_floating_point():
            what = f"shape {tuple(shard.shape)} {shard.dtype}" if isinstance(shard, Tensor) else type(shard).__name__
            raise ValueError(f"activation shard {i}: expected a float tensor [tokens, d_in], got {what}")
        if shard.shape[1] != d_in:
            raise ValueError(f"activation shard {i} has d_in={shard.shape[1]}, shard 0 has {d_in}")

    def first(self) -> Tensor:
        if self._first is None:
            if self._one_shot:
                try:
                    self._first = next(self._data)
                except StopIteration:
                    raise ValueError("no activation shards given") from None
            else:
                self._first = next(iter(self._data), None)
                if self._first is None:
                    raise ValueError("no activation shards given")
            self._check(0, self._first, self._first.shape[-1] if isinstance(self._first, Tensor) else 0)
        return self._first

    def _one_pass(self) -> Iterator[Tensor]:
        if self._one_shot:
            yield self.first()
            yield from self._data
        else:
            yield from self._data

    def batches(self, batch: int, generator: torch.Generator, device: torch.device | None = None) -> Iterator[Tensor]:
        """Shuffled batches of exactly ``batch`` rows on ``device``; the remainder of a shard joins the next.

        Each shard moves to the device once, in one copy, and batches are gathered there."""
        d_in = self.first().shape[1]
        carry: Tensor | None = None
        while True:
            n_shards = 0
            for i, shard in enumerate(self._one_pass()):
                self._check(i, shard, d_in)
                n_shards += 1
                perm = torch.randperm(shard.shape[0], generator=generator)
                if device is not None and shard.device != device:
                    shard, perm = shard.to(device), perm.to(device)
                pos = 0
                if carry is not None:
                    need = batch - carry.shape[0]
                    carry = torch.cat([carry, shard.index_select(0, perm[:need])])
                    pos = need
                    if carry.shape[0] < batch:
                        continue
                    yield carry
                    carry = None
                while pos + batch <= shard.shape[0]:
                    yield shard.index_select(0, perm[pos:pos + batch])  # 4x faster than shard[...] on CPU
                    pos += batch
                if pos < shard.shape[0]:
                    carry = shard.index_select(0, perm[pos:])
            if self._one_shot or n_shards == 0:
                return
