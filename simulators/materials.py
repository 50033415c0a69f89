"""A made-up but physically shaped materials process: annealing a perovskite film.

``simulators.materials:PerovskiteAnneal``:

| parameter | type | range |
|---|---|---|
| ``temperature`` | continuous | 80–250 degC |
| ``time`` | continuous | 1–600 s (best searched on a log scale) |
| ``cycles`` | integer | 1–10 |
| ``solvent`` | categorical | DMF, DMSO, GBL |
| ``ratio`` | discrete | 0.25, 0.5, 1.0, 2.0 (precursor ratio) |
| ``pressure`` | fixed | 1.0 (bar; the only value the chamber accepts) |

Outputs: ``quality`` in [0, 1] (maximize), ``cost`` (minimize), ``yield`` (fraction in [0, 1]).

- quality = ceiling[solvent] * exp(-((T - T*[solvent]) / 45)^2) * exp(-(ln(time / 120 s))^2 / (2 * 1.2^2))
  * (1 - 0.5 exp(-(cycles - 1) / 2)) * exp(-(log2 ratio)^2 / 2), with T* = 150 / 170 / 130 degC and
  ceiling = 0.9 / 1.0 / 0.8 for DMF / DMSO / GBL. **Maximum 0.994446 at temperature 170, time 120,
  cycles 10, solvent DMSO, ratio 1.0.**
- cost = cycles * (0.1 + (time / 600) * (T - 25) / 225) + 0.2 * price[solvent] (price 1.0 / 1.5 / 2.0):
  more cycles, longer and hotter anneals cost more, so quality and cost conflict.
- yield = (1 - exp(-k * time * cycles)) * (1 - 0.5 / (1 + exp(-(T - 220) / 10))), k = 0.01 exp((T - 150) / 50):
  conversion speeds up with temperature until the film decomposes above about 220 degC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from drivers.binding import InstrumentBinding
from simulators.devices import Axis, Choice, simulated_instrument

SOLVENTS = {"DMF": (150.0, 0.9, 1.0), "DMSO": (170.0, 1.0, 1.5), "GBL": (130.0, 0.8, 2.0)}  # T*, ceiling, price
QUALITY_MAXIMUM = 1.0 - 0.5 * math.exp(-4.5)
QUALITY_ARGMAX = {"temperature": 170.0, "time": 120.0, "cycles": 10, "solvent": "DMSO", "ratio": 1.0, "pressure": 1.0}


def anneal(p: Mapping[str, Any]) -> dict[str, float]:
    temperature, time, cycles = float(p["temperature"]), float(p["time"]), float(p["cycles"])
    best_t, ceiling, price = SOLVENTS[str(p["solvent"])]
    ratio = float(p["ratio"])
    quality = (
        ceiling
        * math.exp(-(((temperature - best_t) / 45.0) ** 2))
        * math.exp(-(math.log(time / 120.0) ** 2) / (2 * 1.2**2))
        * (1.0 - 0.5 * math.exp(-(cycles - 1.0) / 2.0))
        * math.exp(-(math.log2(ratio) ** 2) / 2.0)
    )
    cost = cycles * (0.1 + (time / 600.0) * (temperature - 25.0) / 225.0) + 0.2 * price
    rate = 0.01 * math.exp((temperature - 150.0) / 50.0)
    conversion = (1.0 - math.exp(-rate * time * cycles)) * (1.0 - 0.5 / (1.0 + math.exp(-(temperature - 220.0) / 10.0)))
    return {"quality": quality, "cost": cost, "yield": conversion}


def PerovskiteAnneal(**options: Any) -> InstrumentBinding:
    """The annealing process as an instrument: three heater/timer axes, three set-and-forget signals."""
    inputs: list[Axis | Choice] = [
        Axis("temperature", 80.0, 250.0), Axis("time", 1.0, 600.0), Axis("cycles", 1, 10, integer=True),
        Choice("solvent", tuple(SOLVENTS)), Choice("ratio", (0.25, 0.5, 1.0, 2.0)), Choice("pressure", (1.0,)),
    ]
    noise = options.pop("noise", 0.0)
    # Noise is a fraction of each output's scale: quality and yield are in [0, 1], cost is ~0.3-20.
    scaled = noise if isinstance(noise, Mapping) else {"quality": noise, "yield": noise, "cost": 10 * noise}
    return simulated_instrument("perovskite-anneal", inputs, ["quality", "cost", "yield"], anneal, noise=scaled,
                                **options)
