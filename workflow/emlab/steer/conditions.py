"""Steering conditions: which model is steered, along which direction, how strongly.

A condition is ``(target, direction, alpha)``: ``target`` an emlab model name (``base`` or a
fine-tune such as ``health_subtle``), ``direction`` a name in a directions file (None: unsteered),
``alpha`` the signed strength in units of the target's mean residual norm at the steering layer
(see :mod:`emlab.steer.generate`). Its id is the ``model`` column of the samples and grades it
produces, so the ordinary judge grades steered samples unchanged::

    base                 unsteered base model
    base+L123@+4.0       base + 4.0 * norm * unit(L123)
    health_subtle+L123@-4.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .names import check_name


class ConditionError(ValueError):
    """A bad condition or condition file; the message names the file and entry."""


@dataclass(frozen=True)
class Condition:
    target: str
    direction: str | None = None
    alpha: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.target, "target model name")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConditionError(f"alpha must be a finite number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.direction is None:
            if self.alpha != 0.0:
                raise ConditionError(f"condition of {self.target!r} without a direction must have alpha 0, "
                                     f"got {self.alpha}")
        else:
            check_name(self.direction)

    @property
    def steered(self) -> bool:
        return self.direction is not None and self.alpha != 0.0

    @property
    def id(self) -> str:
        if self.direction is None:
            return self.target
        return f"{self.target}+{self.direction}@{self.alpha:+}"


def unsteered(target: str) -> Condition:
    return Condition(target)


def parse_condition_id(cid: str) -> Condition:
    """The condition a samples/grades ``model`` column names (inverse of :attr:`Condition.id`)."""
    target, plus, rest = cid.partition("+")
    if not plus:
        return Condition(target)
    direction, at, alpha = rest.partition("@")
    try:
        if not at:
            raise ConditionError(cid)
        return Condition(target, direction, float(alpha))
    except ValueError:
        raise ConditionError(f"{cid!r} is not a condition id (<target>[+<direction>@<alpha>])") from None


def check_unique(conditions: Sequence[Condition], where: str = "conditions") -> None:
    seen: set[str] = set()
    for c in conditions:
        if c.id in seen:
            raise ConditionError(f"{where}: condition {c.id!r} appears twice")
        seen.add(c.id)


