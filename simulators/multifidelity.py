"""A multi-fidelity pair: a cheap, biased measurement and an expensive, accurate one of the same surface.

``simulators.multifidelity:BraninPair`` is one instrument with axes ``x1`` in [-5, 10], ``x2`` in
[0, 15] and a set-and-forget ``fidelity`` in {high, low} (a categorical parameter, or a fixed one
to run a single fidelity). Outputs: ``y`` and ``cost``.

- ``high``: the Branin function, minimum 0.397887 at (-pi, 12.275), (pi, 2.275), (9.42478, 2.475);
  a measurement takes ``exposure`` seconds and costs 1.
- ``low``: ``0.8 * branin(x1 + 0.5, x2 - 0.5) + 2 + 0.5 (x1 - 2.5) / 7.5``, strongly correlated with
  the high fidelity but shifted, rescaled and tilted, so its minima lie away from the true ones;
  it takes ``exposure * cost_ratio`` seconds and costs ``cost_ratio`` (default 0.1).

The ``cost`` output lets a cost-aware planner trade fidelity for budget.

The same cheap surface as a computational experiment, for a campaign with ``sources`` (a Dask
function source beside the ``simulators.surfaces:Branin`` instrument, as in
``campaigns/branin_multifidelity.yaml``): ``simulators.multifidelity:biased_branin``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from drivers.binding import InstrumentBinding
from simulators.devices import Axis, Choice, simulated_instrument
from simulators.surfaces import branin


def branin_low(x: np.ndarray) -> float:
    """The cheap, biased Branin."""
    x1, x2 = float(x[0]), float(x[1])
    return 0.8 * branin(np.array([x1 + 0.5, x2 - 0.5])) + 2.0 + 0.5 * (x1 - 2.5) / 7.5


def biased_branin(x1: float, x2: float) -> dict[str, float]:
    """The cheap, biased Branin as a function source: ``{"y": branin_low([x1, x2])}``.

    >>> round(biased_branin(x1=0.0, x2=0.0)["y"], 3)
    42.901
    """
    return {"y": float(branin_low(np.array([x1, x2], dtype=float)))}


def BraninPair(*, cost_ratio: float = 0.1, exposure: float = 0.0, **options: Any) -> InstrumentBinding:
    """Branin at two fidelities selected by the ``fidelity`` parameter (``high`` or ``low``)."""
    if not 0 < cost_ratio <= 1:
        raise ValueError(f"BraninPair: cost_ratio must be in (0, 1], got {cost_ratio}")

    def func(p: Mapping[str, Any]) -> dict[str, float]:
        x = np.array([p["x1"], p["x2"]], dtype=float)
        if p["fidelity"] == "low":
            return {"y": branin_low(x), "cost": cost_ratio}
        return {"y": float(branin(x)), "cost": 1.0}

    def exposure_of(p: Mapping[str, Any]) -> float:
        return exposure * (cost_ratio if p["fidelity"] == "low" else 1.0)

    inputs: list[Axis | Choice] = [Axis("x1", -5.0, 10.0), Axis("x2", 0.0, 15.0), Choice("fidelity", ("high", "low"))]
    # Cost is a bookkeeping output, not a measurement: only y gets the measurement noise.
    noise = options.pop("noise", 0.0)
    return simulated_instrument("branin-pair", inputs, ["y", "cost"], func, exposure=exposure_of,
                                noise={"y": noise, "cost": 0.0}, **options)
