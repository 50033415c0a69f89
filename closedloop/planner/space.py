"""Encoding between parameter dicts (declared types) and the model's unit cube.

Continuous parameters map linearly (or logarithmically) onto [0, 1]; integers and discrete values
are relaxed to [0, 1] and snapped back to the nearest allowed value; a categorical parameter takes
one column per choice (one-hot), decoded by the largest column. Fixed parameters are not encoded
and are added back on decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
)


@dataclass(frozen=True)
class Column:
    """One parameter's place in the encoded vector: columns ``start`` to ``stop`` (exclusive)."""

    name: str
    start: int
    stop: int


class Space:
    """The campaign's search space as a ``d``-dimensional unit cube."""

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self.parameters = campaign.parameters
        self.columns: list[Column] = []
        width = 0
        for name, p in campaign.tunable_parameters.items():
            size = len(p.values) if isinstance(p, CategoricalParameter) else 1
            self.columns.append(Column(name, width, width + size))
            width += size
        self.dim = width

    @property
    def categorical_columns(self) -> list[int]:
        return [c.start + i for c in self.columns if isinstance(self.parameters[c.name], CategoricalParameter)
                for i in range(c.stop - c.start)]

    @property
    def is_continuous(self) -> bool:
        return all(isinstance(self.parameters[c.name], ContinuousParameter) for c in self.columns)

    def encode(self, parameters: dict[str, Any]) -> torch.Tensor:
        """A ``d`` tensor for one parameter dict."""
        row = torch.zeros(self.dim, dtype=torch.double)
        for c in self.columns:
            p, v = self.parameters[c.name], parameters[c.name]
            if isinstance(p, CategoricalParameter):
                row[c.start + p.values.index(v)] = 1.0
            else:
                row[c.start] = _to_unit(p, float(v))
        return row

    def encode_many(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """An ``n x d`` tensor."""
        if not rows:
            return torch.zeros(0, self.dim, dtype=torch.double)
        return torch.stack([self.encode(r) for r in rows])

    def decode(self, x: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """Parameter values, in their declared types, for one ``d`` vector."""
        x = np.asarray(x, dtype=float)
        out: dict[str, Any] = {}
        for c in self.columns:
            p = self.parameters[c.name]
            if isinstance(p, CategoricalParameter):
                out[c.name] = p.values[int(np.argmax(x[c.start:c.stop]))]
            else:
                out[c.name] = _from_unit(p, float(x[c.start]))
        for name, p in self.parameters.items():
            if isinstance(p, FixedParameter):
                out[name] = p.value
        return {name: out[name] for name in self.parameters}

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with integers, discrete values and categories rounded to allowed ones (``n x d``)."""
        return torch.stack([self.encode(self.decode(row)) for row in x]) if len(x) else x

    def bounds(self) -> torch.Tensor:
        """``2 x d`` bounds of the encoded space."""
        return torch.stack([torch.zeros(self.dim), torch.ones(self.dim)]).double()


def _to_unit(p: Any, v: float) -> float:
    if isinstance(p, ContinuousParameter) and p.scale == "log":
        lo, hi = math.log(p.bounds[0]), math.log(p.bounds[1])
        return (math.log(v) - lo) / (hi - lo)
    lo, hi = _range(p)
    return (v - lo) / (hi - lo)


def _from_unit(p: Any, u: float) -> Any:
    u = min(1.0, max(0.0, u))
    if isinstance(p, ContinuousParameter):
        if p.scale == "log":
            lo, hi = math.log(p.bounds[0]), math.log(p.bounds[1])
            return min(p.bounds[1], max(p.bounds[0], math.exp(lo + u * (hi - lo))))
        return min(p.bounds[1], max(p.bounds[0], p.bounds[0] + u * (p.bounds[1] - p.bounds[0])))
    lo, hi = _range(p)
    v = lo + u * (hi - lo)
    if isinstance(p, IntegerParameter):
        return int(min(hi, max(lo, round(v))))
    if isinstance(p, DiscreteParameter):
        return min(p.values, key=lambda allowed: abs(allowed - v))
    raise TypeError(f"cannot decode {type(p).__name__}")


def _range(p: Any) -> tuple[float, float]:
    if isinstance(p, DiscreteParameter):
        return float(min(p.values)), float(max(p.values))
    return float(p.bounds[0]), float(p.bounds[1])
