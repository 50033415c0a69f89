"""ophyd simulation devices with what real ones have: limits, latency, noise, drift, faults, hangs.

Example:
    >>> binding = simulated_instrument(
    ...     "demo", [Axis("x", -1.0, 1.0), Choice("gas", ("N2", "Ar"))], ["y"],
    ...     lambda p: p["x"] ** 2 + (0.5 if p["gas"] == "Ar" else 0.0), seed=0)
    >>> binding.detectors[0].true_value({"x": 0.5, "gas": "Ar"})
    0.75
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import DeviceStatus
from ophyd.utils.errors import LimitError

from closedloop.campaign import parse_duration
from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding


class LimitedAxis(SynAxis):
    """A simulated positioner that refuses setpoints outside its limits, like a real motor.

    ``ophyd.sim.SynAxis`` has no limits; bluesky's ``check_limits`` and our pre-flight check both call
    :meth:`check_value`. ``integer=True`` also refuses non-integers (a cycle count). Every value passed
    to ``set`` is appended to ``set_calls`` before the device checks it, so tests can prove that
    nothing out of limits ever reached the device.

    Example:
        >>> axis = LimitedAxis(name="x", limits=(0, 1))
        >>> axis.check_value(2)
        Traceback (most recent call last):
        ...
        ophyd.utils.errors.LimitError: x=2 outside limits [0.0, 1.0]
    """

    def __init__(self, *, limits: tuple[float, float] = (-np.inf, np.inf), integer: bool = False, **kwargs):
        # SynAxis ends a move at old + (new - old) * 1.0, which misses some setpoints by an ulp (2.432 -> 6.742
        # read 6.742000000000001): a point then measured differently by where the axis came from, and a campaign
        # resumed after a restart (the axis back at 0) diverged from the uninterrupted run. The last step lands exactly.
        self._target: float | None = None
        kwargs.setdefault("readback_func", self._land)
        super().__init__(**kwargs)
        self._limits = (float(limits[0]), float(limits[1]))
        self.integer = integer
        self.set_calls: list[float] = []

    def _land(self, position: float) -> float:
        target = self._target
        return target if target is not None and math.isclose(position, target, rel_tol=1e-12, abs_tol=1e-300) else position

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    def check_value(self, value: float) -> None:
        low, high = self._limits
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise LimitError(f"{self.name}={value!r} is not a number")
        try:
            number = float(value)  # numpy's isfinite refused an integer past int64 with a ufunc error
        except OverflowError:
            number = math.inf
        if not (math.isfinite(number) and low <= number <= high):
            raise LimitError(f"{self.name}={value} outside limits [{low}, {high}]")
        if self.integer and float(value) != round(float(value)):
            raise LimitError(f"{self.name}={value} is not an integer")

    def set(self, value: float):  # noqa: A003 - ophyd's verb
        # Recorded before the check: set_calls is everything that reached the device, refused or not.
        try:
            self.set_calls.append(float(value))
        except OverflowError:  # an integer past any float: refused below, but it reached the device
            self.set_calls.append(value)
        self.check_value(value)
        self._target = float(value)
        return super().set(value)


class ChoiceSignal(Signal):
    """A settable signal that accepts only listed values: a categorical choice or a fixed setting.

    Example:
        >>> solvent = ChoiceSignal(name="solvent", choices=("DMF", "DMSO"))
        >>> solvent.check_value("water")
        Traceback (most recent call last):
        ...
        ValueError: solvent='water' is not one of ['DMF', 'DMSO']
    """

    def __init__(self, *, name: str, choices: Sequence[Any], value: Any = None, **kwargs):
        self.choices = tuple(choices)
        super().__init__(name=name, value=self.choices[0] if value is None else value, **kwargs)
        self.set_calls: list[Any] = []

    def check_value(self, value: Any, **kwargs) -> None:
        if value not in self.choices:
            raise ValueError(f"{self.name}={value!r} is not one of {list(self.choices)}")

    def set(self, value: Any, **kwargs):  # noqa: A003
        self.set_calls.append(value)
        self.check_value(value)
        return super().set(value, **kwargs)

    def describe(self) -> dict[str, dict[str, Any]]:
        desc = super().describe()
        desc[self.name]["choices"] = [str(c) for c in self.choices]
        return desc


Inputs = Mapping[str, Any]
SurfaceFunc = Callable[[Any], "float | Mapping[str, float]"]


class ResponseSurface(Device):
    """A detector whose readings are ``func(inputs) + noise + drift``, after an exposure time.

    Args:
        name: the device name; with one output it is also the output's data key.
        axes: legacy form: positioners whose positions, as an array, are passed to ``func``.
        inputs: parameter name -> device (positioner or signal); ``func`` gets ``{name: value}``.
        func: returns a float (one output) or ``{output: value}``.
        outputs: output names (data keys); default ``[name]``.
        noise: standard deviation of Gaussian measurement noise (one for all outputs, or per output).
        heteroscedastic: scale the noise over the space, from 0.1x at the lower corner of the axes'
            limits to 1.9x at the upper corner (mean about 1x).
        exposure_time: seconds a measurement takes (measurement latency), in a device thread; or a
            function of the inputs (a slow high-fidelity and a fast low-fidelity measurement).
        drift: added to every output per measurement taken so far (slow, deterministic drift).
        failure_rate: probability that a measurement fails with a device error.
        hang_rate: probability that a measurement never finishes (its status never completes); the
            RunEngine stays interruptible: ``request_pause``/``abort`` end the run.
        failure_region: ``inputs -> bool``; measurements where it is true fail (an unknown constraint).
        seed: seeds noise, faults and hangs.
    """

    value = Cpt(Signal, value=float("nan"), kind="hinted")
    noise = Cpt(Signal, value=0.0, kind="config")

    def __init__(
        self,
        *,
        name: str,
        func: SurfaceFunc,
        axes: Sequence[Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        noise: float | Mapping[str, float] = 0.0,
        heteroscedastic: bool = False,
        exposure_time: float | Callable[[Inputs], float] = 0.0,
        drift: float = 0.0,
        failure_rate: float = 0.0,
        hang_rate: float = 0.0,
        failure_region: Callable[[Inputs], bool] | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if (axes is None) == (inputs is None):
            raise ValueError("give exactly one of axes (array input) or inputs (mapping input)")
        self._as_array = axes is not None
        self._inputs: dict[str, Any] = {a.name: a for a in axes} if axes is not None else dict(inputs or {})
        self._func = func
        self.outputs = list(outputs or [name])
        self._noise = {o: float(noise.get(o, 0.0)) for o in self.outputs} if isinstance(noise, Mapping) else {
            o: float(noise) for o in self.outputs
        }
        self._heteroscedastic = heteroscedastic
        self._drift = float(drift)
        self._failure_rate = float(failure_rate)
        self._hang_rate = float(hang_rate)
        self._failure_region = failure_region
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.exposure_time = exposure_time if callable(exposure_time) else float(exposure_time)
        self.measurements = 0
        self.hung: list[DeviceStatus] = []  # kept so the statuses stay alive and tests can see them
        self.noise.put(max(self._noise.values(), default=0.0))
        self.value.name = self.outputs[0]
        # Further outputs are plain signals read with this device (ophyd components are per class).
        self._extra = [Signal(name=o, value=float("nan")) for o in self.outputs[1:]]
        self.born = time.monotonic()

    # -- readings ------------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        out = super().read()
        for signal in self._extra:
            out.update(signal.read())
        return out

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        for signal in self._extra:
            out.update(signal.describe())
        return out

    def input_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, device in self._inputs.items():
            position = getattr(device, "position", None)
            values[key] = device.get() if position is None else float(position)
        return values

    def positions(self) -> np.ndarray:
        return np.array([float(v) for v in self.input_values().values()])

    def _evaluate(self, values: Mapping[str, Any]) -> dict[str, float]:
        arg = np.array([float(v) for v in values.values()]) if self._as_array else dict(values)
        result = self._func(arg)
        if isinstance(result, Mapping):
            return {o: float(result[o]) for o in self.outputs}
        return {self.outputs[0]: float(result)}

    def true_value(self, x: Sequence[float] | Mapping[str, Any]) -> float | dict[str, float]:
        """The noiseless response at ``x`` (for tests and benchmarks, never for the loop)."""
        values = dict(x) if isinstance(x, Mapping) else dict(zip(self._inputs, x, strict=True))
        result = self._evaluate(values)
        return result[self.outputs[0]] if len(self.outputs) == 1 else result

    def _noise_scale(self) -> float:
        if not self._heteroscedastic:
            return 1.0
        units = []
        for device in self._inputs.values():
            low, high = getattr(device, "limits", (0.0, 0.0))
            position = getattr(device, "position", None)
            if position is not None and math.isfinite(low) and math.isfinite(high) and high > low:
                units.append((float(position) - low) / (high - low))
        return 0.1 + 1.8 * float(np.mean(units)) if units else 1.0

    def _measure(self) -> dict[str, float]:
        values = self.input_values()
        if self._failure_region is not None and self._failure_region(values):
            raise DeviceError(f"{self.name}: experiment failed at {values} (sample lost)")
        result = self._evaluate(values)
        scale = self._noise_scale()
        with self._lock:
            self.measurements += 1
            offset = self._drift * self.measurements
            jitter = {o: self._rng.normal(0.0, self._noise[o] * scale) if self._noise[o] > 0 else 0.0 for o in result}
        return {o: v + offset + jitter[o] for o, v in result.items()}

    # -- bluesky Triggerable ------------------------------------------------------------------

    def trigger(self) -> DeviceStatus:
        status = DeviceStatus(self)
        with self._lock:
            fail = self._failure_rate > 0 and self._rng.random() < self._failure_rate
            hang = self._hang_rate > 0 and self._rng.random() < self._hang_rate
        if hang:
            # A measurement that never returns: the status never completes, like a detector that
            # stopped answering. The RunEngine waits on it but stays pausable and abortable.
            self.hung.append(status)
            return status

        def work() -> None:
            try:
                exposure = self.exposure_time
                if callable(exposure):
                    exposure = exposure(self.input_values())
                if exposure > 0:
                    time.sleep(exposure)
                if fail:
                    raise DeviceError(f"{self.name}: simulated device fault at {self.input_values()}")
                readings = self._measure()
                self.value.put(readings[self.outputs[0]])
                for signal in self._extra:
                    signal.put(readings[signal.name])
            except Exception as exc:  # reported through the status: the run fails with this error
                status.set_exception(exc)
            else:
                status.set_finished()

        threading.Thread(target=work, name=f"{self.name}-exposure", daemon=True).start()
        return status


@dataclass(frozen=True)
class Axis:
    """A numeric parameter moved by a :class:`LimitedAxis` (``integer=True`` for counts)."""

    name: str
    low: float
    high: float
    integer: bool = False


@dataclass(frozen=True)
class Choice:
    """A set-and-forget parameter written to a :class:`ChoiceSignal` (categorical, discrete or fixed)."""

    name: str
    values: tuple[Any, ...]


def seconds(value: float | str, option: str) -> float:
    """A duration option as seconds: a number, or a string with a unit as in campaign files ("50 ms")."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise DeviceError(f"option {option}={value!r}: {exc}") from exc
    return value


def data_key(name: str) -> str:
    """A device name safe as a data key everywhere documents go (``Qtot(uL/min)`` -> ``Qtot_uL_min``).

    Letters and digits of every script stay (``Δλ``, ``濃度``): made '_' and then 'value', names without an ASCII
    letter all had the key of the detector's reading, and every experiment failed on the collision.
    """
    return re.sub(r"_+", "_", re.sub(r"\W", "_", name)).strip("_") or "value"


def simulated_instrument(
    name: str,
    inputs: Sequence[Axis | Choice],
    outputs: Sequence[str],
    func: Callable[[dict[str, Any]], float | Mapping[str, float]],
    *,
    noise: float | Mapping[str, float] = 0.0,
    latency: float = 0.0,
    exposure: float | Callable[[Inputs], float] = 0.0,
    drift: float = 0.0,
    seed: int | None = None,
    failure_rate: float = 0.0,
    hang_rate: float = 0.0,
    heteroscedastic: bool = False,
    failure_region: Callable[[Inputs], bool] | None = None,
    extras: dict[str, Any] | None = None,
) -> InstrumentBinding:
    """An instrument of simulated devices: one positioner per :class:`Axis`, one signal per :class:`Choice`,
    and one detector reading every output of ``func({parameter: value})``.

    ``latency`` is the motion time of every axis; ``exposure`` the measurement time (seconds, or
    strings with a unit such as ``"50 ms"``).
    """
    latency = seconds(latency, "latency")
    if not callable(exposure):
        exposure = seconds(exposure, "exposure")
    numeric = {
        "noise": 0.0 if isinstance(noise, Mapping) else noise, "latency": latency,
        "exposure": 0.0 if callable(exposure) else exposure, "drift": abs(drift),
        "failure_rate": failure_rate, "hang_rate": hang_rate,
    }
    for option, value in numeric.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise DeviceError(f"{name}: option {option}={value!r} must be a non-negative number")
    if failure_rate > 1 or hang_rate > 1:
        raise DeviceError(f"{name}: failure_rate and hang_rate are probabilities in [0, 1]")
    positioners: dict[str, Any] = {}
    signals: dict[str, Any] = {}
    for spec in inputs:
        if isinstance(spec, Axis):
            start = (spec.low + spec.high) / 2
            positioners[spec.name] = LimitedAxis(
                name=data_key(spec.name), limits=(spec.low, spec.high), integer=spec.integer, delay=latency,
                value=float(round(start)) if spec.integer else start,
            )
        else:
            signals[spec.name] = ChoiceSignal(name=data_key(spec.name), choices=spec.values)
    keys = {o: data_key(o) for o in outputs}
    if isinstance(noise, Mapping):
        noise = {keys[o]: float(v) for o, v in noise.items()}

    def keyed(values: dict[str, Any]) -> dict[str, float]:
        result = func(values)
        if not isinstance(result, Mapping):
            result = {outputs[0]: result}
        return {keys[o]: float(result[o]) for o in outputs}

    detector = ResponseSurface(
        name=keys[outputs[0]] if len(outputs) == 1 else f"{data_key(name)}_detector",
        inputs={**positioners, **signals}, func=keyed, outputs=list(keys.values()), noise=noise,
        heteroscedastic=heteroscedastic, exposure_time=exposure, drift=drift, failure_rate=failure_rate,
        hang_rate=hang_rate, failure_region=failure_region, seed=seed,
    )
    return InstrumentBinding(
        name=name, positioners=positioners, signals=signals, detectors=[detector], outputs=keys,
        extras=dict(extras or {}),
    )
