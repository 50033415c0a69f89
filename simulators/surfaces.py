"""Synthetic response surfaces with known optima, each exposed as a simulated instrument.

Every factory takes the same realism options (see :func:`simulators.devices.simulated_instrument`):
``noise`` (standard deviation), ``heteroscedastic``, ``latency`` (motion, s), ``exposure``
(measurement, s), ``drift`` (per measurement), ``seed``, ``failure_rate`` and ``hang_rate``.
All goals are minimization; the output is ``y``.

| name (``simulators.surfaces:``) | parameters | optimum (minimum of ``y``) |
|---|---|---|
| ``Branin`` | x1 in [-5, 10], x2 in [0, 15] | 0.397887 at (-pi, 12.275), (pi, 2.275), (9.42478, 2.475) |
| ``Hartmann6`` | x1..x6 in [0, 1] | -3.32237 at (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573) |
| ``Ackley`` (``dim``, default 5) | x1..xd in [-32.768, 32.768] | 0 at the origin |
| ``Rosenbrock`` (``dim``, default 4) | x1..xd in [-2, 2] | 0 at (1, ..., 1) |
| ``MixedSurface`` | x1, x2 in [0, 1]; cycles integer [1, 10]; catalyst in {A, B, C} | 0 at x1=0.7, x2=0.3, cycles=6, catalyst=B |
| ``FailingBranin`` | as Branin | 0.397887 at (pi, 2.275) and (9.42478, 2.475); experiments inside the disc of radius 3.5 around (-2, 11) fail with a device error, so the third Branin minimum (-pi, 12.275) cannot be measured |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from drivers.binding import InstrumentBinding
from simulators.devices import Axis, Choice, simulated_instrument


def branin(x: np.ndarray) -> float:
    x1, x2 = float(x[0]), float(x[1])
    b, c, r, s, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 6.0, 10.0, 1 / (8 * np.pi)
    return (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * np.cos(x1) + s


_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array(
    [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
)
_H6_P = 1e-4 * np.array(
    [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
     [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]
)


def hartmann6(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (x - _H6_P) ** 2, axis=1))))


def ackley(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    a, b, c = 20.0, 0.2, 2 * np.pi
    return float(-a * np.exp(-b * np.sqrt(np.mean(x**2))) - np.exp(np.mean(np.cos(c * x))) + a + np.e)


def rosenbrock(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


# catalyst -> (offset, best x1, best x2, best cycle count): each catalyst has its own optimum.
_MIXED = {"A": (0.5, 0.2, 0.7, 3), "B": (0.0, 0.7, 0.3, 6), "C": (0.8, 0.5, 0.5, 8)}


def mixed_surface(p: Mapping[str, Any]) -> float:
    offset, bx1, bx2, bcycles = _MIXED[str(p["catalyst"])]
    return float(offset + 2.0 * ((p["x1"] - bx1) ** 2 + (p["x2"] - bx2) ** 2) + 0.02 * (p["cycles"] - bcycles) ** 2)


_FAIL_CENTER, _FAIL_RADIUS = (-2.0, 11.0), 3.5


def in_failure_region(p: Mapping[str, Any]) -> bool:
    """Where FailingBranin's experiments fail: a disc the planner does not know about."""
    return bool((p["x1"] - _FAIL_CENTER[0]) ** 2 + (p["x2"] - _FAIL_CENTER[1]) ** 2 < _FAIL_RADIUS**2)


BRANIN_MINIMUM = 0.397887
BRANIN_ARGMINS = [(-np.pi, 12.275), (np.pi, 2.275), (9.42478, 2.475)]
HARTMANN6_MINIMUM = -3.32237
HARTMANN6_ARGMIN = (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573)
ACKLEY_MINIMUM = 0.0
ROSENBROCK_MINIMUM = 0.0
MIXED_MINIMUM = 0.0
MIXED_ARGMIN = {"x1": 0.7, "x2": 0.3, "cycles": 6, "catalyst": "B"}
FAILING_BRANIN_ARGMINS = BRANIN_ARGMINS[1:]


def _array_func(names: Sequence[str], func: Callable[[np.ndarray], float]) -> Callable[[dict[str, Any]], float]:
    return lambda p: func(np.array([float(p[n]) for n in names]))


def surface_instrument(
    name: str,
    func: Callable[[np.ndarray], float],
    axes: Sequence[tuple[str, tuple[float, float]]],
    output: str,
    **options: Any,
) -> InstrumentBinding:
    """A simulated instrument: one limited axis per input and a detector reading ``func(array)``."""
    names = [axis for axis, _ in axes]
    return simulated_instrument(
        name, [Axis(axis, float(lo), float(hi)) for axis, (lo, hi) in axes], [output], _array_func(names, func),
        **options,
    )


def Branin(*, output: str = "y", **options: Any) -> InstrumentBinding:
    """Two axes ``x1`` in [-5, 10] and ``x2`` in [0, 15]; the detector reads the Branin function."""
    return surface_instrument("branin", branin, [("x1", (-5.0, 10.0)), ("x2", (0.0, 15.0))], output, **options)


def Hartmann6(*, output: str = "y", **options: Any) -> InstrumentBinding:
    """Six axes ``x1``..``x6`` in [0, 1]; the detector reads the Hartmann6 function."""
    return surface_instrument("hartmann6", hartmann6, [(f"x{i}", (0.0, 1.0)) for i in range(1, 7)], output, **options)


def Ackley(*, dim: int = 5, output: str = "y", **options: Any) -> InstrumentBinding:
    """``dim`` axes ``x1``..``xd`` in [-32.768, 32.768]; the detector reads the Ackley function (minimum 0 at 0)."""
    if dim < 1:
        raise ValueError(f"Ackley: dim must be at least 1, got {dim}")
    axes = [(f"x{i}", (-32.768, 32.768)) for i in range(1, dim + 1)]
    return surface_instrument("ackley", ackley, axes, output, **options)


def Rosenbrock(*, dim: int = 4, output: str = "y", **options: Any) -> InstrumentBinding:
    """``dim`` axes ``x1``..``xd`` in [-2, 2]; the detector reads the Rosenbrock function (minimum 0 at 1)."""
    if dim < 2:
        raise ValueError(f"Rosenbrock: dim must be at least 2, got {dim}")
    axes = [(f"x{i}", (-2.0, 2.0)) for i in range(1, dim + 1)]
    return surface_instrument("rosenbrock", rosenbrock, axes, output, **options)


def MixedSurface(*, output: str = "y", **options: Any) -> InstrumentBinding:
    """Continuous ``x1``, ``x2`` in [0, 1], integer ``cycles`` in [1, 10], categorical ``catalyst`` in {A, B, C}.

    ``y = offset[c] + 2 ((x1 - a[c])^2 + (x2 - b[c])^2) + 0.02 (cycles - k[c])^2``: each catalyst has
    its own optimum, so the best continuous settings depend on the categorical choice. Minimum 0 at
    x1=0.7, x2=0.3, cycles=6, catalyst=B (A: 0.5, C: 0.8 at their own optima).
    """
    inputs: list[Axis | Choice] = [Axis("x1", 0.0, 1.0), Axis("x2", 0.0, 1.0), Axis("cycles", 1, 10, integer=True),
              Choice("catalyst", ("A", "B", "C"))]
    return simulated_instrument("mixed", inputs, [output], mixed_surface, **options)


def FailingBranin(*, output: str = "y", **options: Any) -> InstrumentBinding:
    """Branin where experiments inside an unknown region fail with a device error (a lost sample).

    The region is the disc of radius 3.5 around (-2, 11); it holds the Branin minimum at (-pi, 12.275),
    so the best measurable value is 0.397887 at (pi, 2.275) or (9.42478, 2.475).
    """
    return surface_instrument("failing-branin", branin, [("x1", (-5.0, 10.0)), ("x2", (0.0, 15.0))], output,
                              failure_region=in_failure_region, **options)


def branin_campaign(
    name: str,
    experiments: int,
    *,
    planner: dict[str, Any] | None = None,
    execution: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    instrument: dict[str, Any] | None = None,
) -> str:
    """YAML of a campaign minimizing Branin over ``x1`` in [-5, 10] and ``x2`` in [0, 15].

    One definition for tests, benchmarks and examples: by default on this module's :func:`Branin`
    simulator with ``options``, or on any ``instrument`` mapping (a function or command, say).
    """
    data: dict[str, Any] = {
        "name": name,
        "parameters": {"x1": {"type": "continuous", "bounds": [-5, 10]},
                       "x2": {"type": "continuous", "bounds": [0, 15]}},
        "objectives": {"y": {"goal": "minimize"}},
        "budget": {"experiments": experiments},
        "planner": planner or {"backend": "sobol", "seed": 1},
        "instrument": instrument or {"simulator": "simulators.surfaces:Branin", "options": options or {}},
    }
    if execution:
        data["execution"] = execution
    return yaml.safe_dump(data, sort_keys=False)
