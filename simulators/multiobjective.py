"""Multi-objective test problems with known Pareto fronts, as simulated instruments (minimize every output).

| name (``simulators.multiobjective:``) | parameters | outputs | Pareto front |
|---|---|---|---|
| ``ZDT1`` | x1..x6 in [0, 1] | f1, f2 | f2 = 1 - sqrt(f1), f1 in [0, 1], reached where x2..x6 = 0 |
| ``DTLZ2`` | x1..x6 in [0, 1] | f1, f2, f3 | the unit-sphere octant f1^2 + f2^2 + f3^2 = 1, reached where x3..x6 = 0.5 |

Realism options as for :mod:`simulators.surfaces`. ``ZDT1_REFERENCE`` and ``DTLZ2_REFERENCE`` are
customary hypervolume reference points; ``zdt1_front(n)`` and ``dtlz2_front(n)`` sample the true fronts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from drivers.binding import InstrumentBinding
from simulators.devices import Axis, simulated_instrument

ZDT1_REFERENCE = (11.0, 11.0)
DTLZ2_REFERENCE = (1.1, 1.1, 1.1)


def zdt1(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    f1 = float(x[0])
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    return f1, float(g * (1.0 - np.sqrt(f1 / g)))


def dtlz2(x: np.ndarray, objectives: int = 3) -> tuple[float, ...]:
    x = np.asarray(x, dtype=float)
    m = objectives
    g = float(np.sum((x[m - 1:] - 0.5) ** 2))
    angles = x[: m - 1] * np.pi / 2
    f = []
    for i in range(m):
        value = 1.0 + g
        value *= float(np.prod(np.cos(angles[: m - 1 - i])))
        if i > 0:
            value *= float(np.sin(angles[m - 1 - i]))
        f.append(value)
    return tuple(f)


def zdt1_front(n: int = 100) -> np.ndarray:
    """``n x 2`` points on the ZDT1 Pareto front."""
    f1 = np.linspace(0.0, 1.0, n)
    return np.column_stack([f1, 1.0 - np.sqrt(f1)])


def dtlz2_front(n: int = 100, seed: int = 0) -> np.ndarray:
    """``n x 3`` points on the DTLZ2 (three objectives) Pareto front."""
    u = np.random.default_rng(seed).random((n, 2))
    return np.array([dtlz2(np.concatenate([row, np.full(4, 0.5)])) for row in u])


def _names(dim: int) -> list[str]:
    return [f"x{i}" for i in range(1, dim + 1)]


def ZDT1(**options: Any) -> InstrumentBinding:
    """Six axes ``x1``..``x6`` in [0, 1]; outputs ``f1``, ``f2`` (minimize both); front f2 = 1 - sqrt(f1)."""
    names = _names(6)

    def func(p: Mapping[str, Any]) -> dict[str, float]:
        f1, f2 = zdt1(np.array([p[n] for n in names], dtype=float))
        return {"f1": f1, "f2": f2}

    return simulated_instrument("zdt1", [Axis(n, 0.0, 1.0) for n in names], ["f1", "f2"], func, **options)


def DTLZ2(**options: Any) -> InstrumentBinding:
    """Six axes ``x1``..``x6`` in [0, 1]; outputs ``f1``, ``f2``, ``f3`` (minimize all); front: unit sphere."""
    names = _names(6)

    def func(p: Mapping[str, Any]) -> dict[str, float]:
        f = dtlz2(np.array([p[n] for n in names], dtype=float))
        return {"f1": f[0], "f2": f[1], "f3": f[2]}

    return simulated_instrument("dtlz2", [Axis(n, 0.0, 1.0) for n in names], ["f1", "f2", "f3"], func, **options)
