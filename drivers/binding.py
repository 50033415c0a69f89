"""How an instrument is described to the engine: devices for parameters, readings for outputs.

A lab writes one module with a factory returning an :class:`InstrumentBinding` and names it in the
campaign file (``instrument: {driver: drivers.mylab:SpinCoater}``); no engine code changes.

Example:
    >>> from ophyd import Signal
    >>> from ophyd.sim import SynAxis
    >>> stage, gas = SynAxis(name="stage"), Signal(name="gas", value="N2")
    >>> binding = InstrumentBinding(
    ...     name="demo", positioners={"x": stage}, signals={"gas": gas},
    ...     detectors=[stage], outputs={"position": "stage"}, safety=[MaxStep("x", 5.0)])
    >>> binding.check_limits({"x": 2.0, "gas": "Ar"})
    >>> binding.check_limits({"x": 20.0})
    Traceback (most recent call last):
    ...
    closedloop.errors.DeviceError: x: 20 is 20 away from the present 0, more than the allowed step 5
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bluesky.protocols import Movable, Readable

from closedloop.errors import ClosedLoopError, DeviceError, InstrumentUnavailable

Plan = Generator[Any, Any, Any]


def import_object(path: str) -> Any:
    """The object named by an import path ``package.module:name``."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise DeviceError(f"{path!r} is not an import path of the form 'package.module:Name'")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DeviceError(f"cannot import {path!r}: {exc}") from exc


@dataclass(frozen=True)
class Derived:
    """An output computed from several data keys of one event by a small, named function.

    Args:
        keys: the event data keys passed, in order, as positional arguments.
        func: a callable, or the import path ``package.module:function`` of one.

    Example:
        >>> ratio = Derived(keys=("signal", "reference"), func=lambda s, r: s / r)
        >>> ratio.compute({"signal": 6.0, "reference": 2.0})
        3.0
    """

    keys: tuple[str, ...]
    func: Callable[..., float] | str

    @property
    def function(self) -> Callable[..., float]:
        return import_object(self.func) if isinstance(self.func, str) else self.func

    @property
    def label(self) -> str:
        """The function's name, recorded in start documents so a replay knows how an output was made."""
        if isinstance(self.func, str):
            return self.func
        return f"{getattr(self.func, '__module__', '?')}:{getattr(self.func, '__qualname__', repr(self.func))}"

    def compute(self, data: Mapping[str, Any]) -> float:
        missing = [k for k in self.keys if k not in data]
        if missing:
            readings = ", ".join(sorted(data))
            raise DeviceError(f"{self.label} needs {', '.join(missing)}, not in the readings ({readings})")
        return float(self.function(*(data[k] for k in self.keys)))


OutputSource = str | Derived


class SafetyRule(Protocol):
    """An extra check on a proposal, run before anything moves. Raises :class:`DeviceError` to refuse it.

    ``current`` holds each parameter's present value as read from its device (``None`` when unknown).
    """

    def check(self, setpoints: Mapping[str, Any], current: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class MaxStep:
    """Refuse moving ``parameter`` by more than ``max_change`` from where its device is now.

    Guards hardware that must not jump (a heater ramped at most 20 degC between experiments, a
    pressure that must change slowly); the planner's next proposal may be anywhere in the space.
    """

    parameter: str
    max_change: float

    def check(self, setpoints: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        if self.parameter not in setpoints or current.get(self.parameter) is None:
            return
        new, now = float(setpoints[self.parameter]), float(current[self.parameter])
        if abs(new - now) > self.max_change:
            raise DeviceError(
                f"{self.parameter}: {new:g} is {abs(new - now):g} away from the present {now:g}, "
                f"more than the allowed step {self.max_change:g}"
            )


@dataclass(frozen=True)
class AllowedValues:
    """Refuse a set-and-forget value the hardware does not offer (a solvent not loaded on the robot)."""

    parameter: str
    values: tuple[Any, ...]

    def check(self, setpoints: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        if self.parameter in setpoints and setpoints[self.parameter] not in self.values:
            raise DeviceError(f"{self.parameter}: {setpoints[self.parameter]!r} is not one of {list(self.values)}")


@dataclass
class InstrumentBinding:
    """Devices of one instrument, keyed by the campaign names they serve.

    Attributes:
        name: a short name, recorded in every run's start document.
        positioners: campaign parameter -> the device that moves to it (``bps.mv`` target, limits checked).
        detectors: devices triggered and read once per measurement.
        outputs: campaign output -> the event data key holding it, or a :class:`Derived` computed from several.
        signals: campaign parameter -> a settable signal for set-and-forget values (a categorical choice, a
            fixed setting); set before the positioners move.
        plan: optional custom per-experiment plan ``plan(binding, setpoints, md) -> run uid``; it must open
            exactly one run (use :func:`drivers.plans.measure`'s stubs to build it).
        settle_time: seconds to wait after the move before measuring (``bps.sleep``, so pausable).
        repeats: measurements per experiment; outputs are their mean and ``noise`` their standard error.
        safety: extra :class:`SafetyRule` checks run by :meth:`check_limits` before anything moves.
        limits: parameter -> (low, high) the engine enforces itself, for devices that declare no limits
            of their own (plain signals) or check them only asynchronously (ophyd-async).
        suspenders: bluesky suspenders (interlocks, beam) the station's RunEngine must have installed
            while this instrument runs: ``for s in binding.suspenders: RE.install_suspender(s)``.
        extras: anything else the binding wants recorded or used by its custom plan.
    """

    name: str
    positioners: Mapping[str, Movable]
    detectors: list[Readable]
    outputs: Mapping[str, OutputSource]
    plan: Callable[[InstrumentBinding, dict[str, Any], dict[str, Any]], Plan] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    signals: Mapping[str, Movable] = field(default_factory=dict)
    settle_time: float = 0.0
    repeats: int = 1
    safety: list[SafetyRule] = field(default_factory=list)
    suspenders: list[Any] = field(default_factory=list)
    limits: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.positioners) & set(self.signals)
        if both:
            raise DeviceError(f"instrument {self.name!r}: {sorted(both)} are both positioners and signals")
        if self.repeats < 1:
            raise DeviceError(f"instrument {self.name!r}: repeats must be at least 1, got {self.repeats}")
        if self.settle_time < 0 or not math.isfinite(self.settle_time):
            raise DeviceError(f"instrument {self.name!r}: settle_time {self.settle_time} is not a duration")
        if self.plan is None:
            # Limits and rules apply by parameter name: one misspelled would guard nothing, and say nothing.
            named = {"limits": list(self.limits)}
            named["safety"] = [r.parameter for r in self.safety if isinstance(getattr(r, "parameter", None), str)]
            for where, names in named.items():
                stray = sorted(set(names) - set(self.settable))
                if stray:
                    raise DeviceError(f"instrument {self.name!r}: {where} names {', '.join(map(repr, stray))}, "
                                      f"which no device sets (devices: {', '.join(sorted(self.settable)) or 'none'})")

    @property
    def settable(self) -> dict[str, Movable]:
        """Every device a parameter is written to: signals first, then positioners."""
        return {**self.signals, **self.positioners}

    def readables(self) -> list[Readable]:
        """What each measurement reads: the detectors, then every settable device (recording where it was)."""
        seen: set[int] = set()
        out: list[Readable] = []
        for device in [*self.detectors, *self.settable.values()]:
            if id(device) not in seen and hasattr(device, "read"):
                seen.add(id(device))
                out.append(device)  # type: ignore[arg-type]
        return out

    def current(self) -> dict[str, Any]:
        """Each parameter's present value as its device reports it (``None`` where it cannot say)."""
        values: dict[str, Any] = {}
        for name, device in self.settable.items():
            try:
                value = getattr(device, "position", None)
                values[name] = device.get() if value is None and hasattr(device, "get") else value  # type: ignore[attr-defined]
            except Exception:  # a disconnected device must not hide the other values
                values[name] = None
        return values

    def check_limits(self, setpoints: Mapping[str, Any]) -> None:
        """Refuse, before anything moves, a proposal a device's limits or a safety rule would refuse.

        Raises:
            DeviceError: naming the parameter, the value and the limit.
        """
        unknown = [k for k in setpoints if k not in self.settable]
        if unknown and (self.positioners or self.signals):
            # Parameters without a device are allowed only when a custom plan handles them itself.
            if self.plan is None:
                raise DeviceError(f"instrument {self.name!r} has no device for {', '.join(sorted(unknown))}")
        for name, value in setpoints.items():
            device = self.positioners.get(name)
            if device is not None and not _finite_number(value):
                raise DeviceError(f"{name}={value!r} is not a finite number for positioner {_device_name(device)}")
            # A campaign proposes only numbers and text; anything else (a list, a mapping, true, NaN) came from
            # a corrupt or hostile message, and a plain Signal would take it without a word.
            if not (isinstance(value, str) or _finite_number(value)):
                raise DeviceError(f"{name}={value!r} is neither a finite number nor text; no device is given it")
        for name, value in setpoints.items():
            if name in self.limits:
                low, high = self.limits[name]
                if not (isinstance(value, (int, float)) and low <= value <= high):
                    raise DeviceError(f"{name}={value!r} outside the instrument's limits [{low:g}, {high:g}]")
            device = self.settable.get(name)
            checker = getattr(device, "check_value", None)
            if checker is None:
                continue
            try:
                _run_check(checker, value)
            except Exception as exc:  # ophyd raises LimitError; others raise their own kinds
                raise DeviceError(f"{name}={value!r} refused by {_device_name(device)}: {exc}") from exc
        if self.safety:
            current = self.current()
            for rule in self.safety:
                rule.check(setpoints, current)

    def install_suspenders(self, RE: Any) -> None:  # noqa: N803 - bluesky's name for it
        """Install this instrument's suspenders into a RunEngine (idempotent)."""
        for suspender in self.suspenders:
            if suspender not in getattr(RE, "suspenders", ()):
                RE.install_suspender(suspender)

    def remove_suspenders(self, RE: Any) -> None:  # noqa: N803
        for suspender in self.suspenders:
            RE.remove_suspender(suspender)

    def describe_outputs(self) -> dict[str, str]:
        """Output -> data key or function name, for the start document."""
        return {k: (v if isinstance(v, str) else f"{v.label}({', '.join(v.keys)})") for k, v in self.outputs.items()}


def _run_check(checker: Callable[[Any], Any], value: Any) -> None:
    """Call a device's ``check_value``; ophyd-async's is a coroutine, run on the RunEngine's loop."""
    result = checker(value)
    if not inspect.isawaitable(result):
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a caller's thread (the worker's pre-flight): wait for the device's answer
        from bluesky.run_engine import call_in_bluesky_event_loop

        call_in_bluesky_event_loop(result)  # type: ignore[arg-type]
    else:
        # Inside the RunEngine's own loop (a plan's pre-flight) we cannot block on it; the device's
        # set() runs the same check before moving, and ``limits`` above still applies.
        close = getattr(result, "close", None)
        if close is not None:
            close()


def _finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite; an integer too large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _not_connected(exc: Exception) -> bool:
    if isinstance(exc, TimeoutError):  # ophyd's wait_for_connection
        return True
    core = sys.modules.get("ophyd_async.core")  # loaded by any factory that made ophyd-async devices
    return core is not None and isinstance(exc, core.NotConnectedError)


def _device_name(device: Any) -> str:
    return str(getattr(device, "name", device))


def load_binding(target: str, options: Mapping[str, Any] | None = None) -> InstrumentBinding:
    """Build the binding named by an import path ``package.module:Factory`` with its options.

    A factory that cannot reach its hardware (ophyd's connection timeout, ophyd-async's
    ``NotConnectedError``), or a module or factory this process cannot import, raises
    :class:`InstrumentUnavailable`: nothing has moved, and the daemon keeps the experiment for when
    the instrument answers.
    """
    try:
        factory = import_object(target)
    except DeviceError as exc:
        if isinstance(exc.__cause__, (ImportError, AttributeError)):
            # the campaign was checked where it was loaded, so it is this station that lacks the driver (a module
            # not on its PYTHONPATH, an older copy): nothing ran, and the experiment is not at fault. As a failed
            # experiment it spent the whole budget in seconds and told the planner every point failed
            raise InstrumentUnavailable(f"{exc}; this station cannot load the driver: install it, or put its "
                                        "folder on PYTHONPATH where the worker runs") from exc
        raise
    try:
        binding = factory(**dict(options or {}))
    except TypeError as exc:  # an unknown option: say which instrument refused it
        raise DeviceError(f"{target}: {exc}") from exc
    except ClosedLoopError:
        raise
    except Exception as exc:
        if _not_connected(exc):
            raise InstrumentUnavailable(f"{target}: {exc}") from exc
        # the factory's own error ("RuntimeError: serial port not found") said what but not where: stored with
        # each trial it failed, it read like the experiment's fault
        raise DeviceError(f"{target}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(binding, InstrumentBinding):
        raise DeviceError(f"{target!r} returned {type(binding).__name__}, not an InstrumentBinding")
    return binding
