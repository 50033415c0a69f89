"""ophyd simulation devices with what real ones have: limits, latency, noise, faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis, SynSignal
from ophyd.utils.errors import LimitError


class LimitedAxis(SynAxis):
    """A simulated positioner that refuses setpoints outside its limits, like a real motor.

    ``ophyd.sim.SynAxis`` has no limits; bluesky's ``check_limits`` and our pre-flight check both call
    :meth:`check_value`.
    """

    def __init__(self, *, limits: tuple[float, float] = (-np.inf, np.inf), **kwargs):
        super().__init__(**kwargs)
        self._limits = (float(limits[0]), float(limits[1]))
        self.set_calls: list[float] = []

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    def check_value(self, value: float) -> None:
        low, high = self._limits
        if not (np.isfinite(value) and low <= value <= high):
            raise LimitError(f"{self.name}={value} outside limits [{low}, {high}]")

    def set(self, value: float):  # noqa: A003 - ophyd's verb
        self.check_value(value)
        self.set_calls.append(float(value))
        return super().set(value)


class ResponseSurface(Device):
    """A detector whose reading is ``func(positions) + noise``, after an exposure time.

    Faults: with probability ``failure_rate`` a trigger fails with a device error.
    """

    value = Cpt(SynSignal, kind="hinted")
    noise = Cpt(Signal, value=0.0, kind="config")

    def __init__(
        self,
        *,
        name: str,
        axes: Sequence[SynAxis],
        func: Callable[[np.ndarray], float],
        noise: float = 0.0,
        exposure_time: float = 0.0,
        failure_rate: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self._axes = list(axes)
        self._func = func
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._failure_rate = failure_rate
        self.noise.put(float(noise))
        self.value.name = name
        self.value.exposure_time = exposure_time
        self.value.sim_set_func(self._compute)
        self.born = time.monotonic()

    def positions(self) -> np.ndarray:
        return np.array([float(axis.position) for axis in self._axes])

    def _compute(self) -> float:
        x = self.positions()
        with self._rng_lock:
            fail = self._failure_rate > 0 and self._rng.random() < self._failure_rate
            jitter = self._rng.normal(0.0, self.noise.get()) if self.noise.get() > 0 else 0.0
        if fail:
            raise RuntimeError(f"{self.name}: simulated device fault at {x.tolist()}")
        return float(self._func(x) + jitter)

    def true_value(self, x: Sequence[float]) -> float:
        """The noiseless response at ``x`` (for tests and benchmarks, never for the loop)."""
        return float(self._func(np.asarray(x, dtype=float)))

    def trigger(self):
        return self.value.trigger()
