"""Synthetic response surfaces with known optima, each exposed as a simulated instrument.

| name      | dims | optimum (minimum)                                  |
|-----------|------|----------------------------------------------------|
| Branin    | 2    | 0.397887 at (-pi, 12.275), (pi, 2.275), (9.42478, 2.475) |
| Hartmann6 | 6    | -3.32237 at (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573) |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from drivers.binding import InstrumentBinding
from simulators.devices import LimitedAxis, ResponseSurface


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


BRANIN_MINIMUM = 0.397887
HARTMANN6_MINIMUM = -3.32237


def surface_instrument(
    name: str,
    func: Callable[[np.ndarray], float],
    axes: Sequence[tuple[str, tuple[float, float]]],
    output: str,
    *,
    noise: float = 0.0,
    latency: float = 0.0,
    exposure: float = 0.0,
    failure_rate: float = 0.0,
    seed: int | None = None,
) -> InstrumentBinding:
    """A simulated instrument: one limited axis per input and a detector reading ``func``."""
    positioners = {axis: LimitedAxis(name=axis, limits=limits, delay=latency, value=float(np.mean(limits)))
                   for axis, limits in axes}
    detector = ResponseSurface(
        name=output, axes=list(positioners.values()), func=func, noise=noise, exposure_time=exposure,
        failure_rate=failure_rate, seed=seed,
    )
    return InstrumentBinding(name=name, positioners=positioners, detectors=[detector], outputs={output: output})


def Branin(*, output: str = "y", noise: float = 0.0, latency: float = 0.0, exposure: float = 0.0,
           failure_rate: float = 0.0, seed: int | None = None) -> InstrumentBinding:
    """Two axes ``x1`` in [-5, 10] and ``x2`` in [0, 15]; the detector reads the Branin function."""
    return surface_instrument("branin", branin, [("x1", (-5.0, 10.0)), ("x2", (0.0, 15.0))], output,
                              noise=noise, latency=latency, exposure=exposure, failure_rate=failure_rate, seed=seed)


def Hartmann6(*, output: str = "y", noise: float = 0.0, latency: float = 0.0, exposure: float = 0.0,
              failure_rate: float = 0.0, seed: int | None = None) -> InstrumentBinding:
    """Six axes ``x1``..``x6`` in [0, 1]; the detector reads the Hartmann6 function."""
    return surface_instrument("hartmann6", hartmann6, [(f"x{i}", (0.0, 1.0)) for i in range(1, 7)], output,
                              noise=noise, latency=latency, exposure=exposure, failure_rate=failure_rate, seed=seed)
