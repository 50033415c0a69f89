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
    >>> binding.check_limits({"x": 12.0, "gas": "Ar"})
    >>> binding.ramp({"x": 12.0})  # from 0, at most 5 a move: three equal moves of 4
    [{'x': 4.0}, {'x': 8.0}, {'x': 12.0}]
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import numbers
import reprlib
import sys
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
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
        function = self.function
        try:
            result = function(*(data[k] for k in self.keys))
        except DeviceError:
            raise
        except Exception as exc:
            # stored with the trial as a bare "IndexError: index 10000 is out of bounds", it named neither the
            # function nor the readings, and read like the instrument's fault
            raise DeviceError(f"{self.label}({', '.join(self.keys)}) raised {type(exc).__name__}: {exc}") from exc
        try:
            return float(result)
        except (TypeError, ValueError) as exc:
            raise DeviceError(f"{self.label}({', '.join(self.keys)}) returned {describe_value(result)}, "
                              "not a number") from exc


OutputSource = str | Derived


class SafetyRule(Protocol):
    """An extra check on a proposal, run before anything moves. Raises :class:`DeviceError` to refuse it.

    ``current`` holds each parameter's present value as read from its device (``None`` when unknown).
    """

    def check(self, setpoints: Mapping[str, Any], current: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class MaxStep:
    """Move ``parameter`` in steps of at most ``max_change``, each finished before the next: a ramp.

    Guards hardware that must not jump (a heater ramped at most 20 degC at a time, a pressure that must
    change slowly). The planner's next proposal may be anywhere in the space, so a setpoint further than
    the step from where the device is now is not refused: the experiment's plan reaches it through
    ``ceil(|setpoint - present| / max_change)`` equal moves (:meth:`InstrumentBinding.ramp`,
    :func:`drivers.plans.move_to`) and measures only at the end. An ophyd-async device, which says where it is
    only on the RunEngine's loop, is read there by the plan (:func:`drivers.plans.present_values`); only a device
    that cannot say at all (``None``) is moved in one go.
    """

    parameter: str
    max_change: float

    def __post_init__(self) -> None:
        if not (_finite_number(self.max_change) and self.max_change > 0):
            raise DeviceError(f"MaxStep({self.parameter!r}): the step {self.max_change!r} is not a positive number")

    def stages(self, setpoint: Any, present: Any) -> int:
        """How many moves of at most the step take ``present`` to ``setpoint`` (1 when either is not a number)."""
        if not (_finite_number(setpoint) and _finite_number(present)):
            return 1
        return max(1, math.ceil(abs(float(setpoint) - float(present)) / self.max_change))

    def check(self, setpoints: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        """Nothing to refuse: a far setpoint is ramped to (see :meth:`InstrumentBinding.ramp`)."""


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
        safety: extra :class:`SafetyRule` checks run by :meth:`check_limits` before anything moves; a
            :class:`MaxStep` rule instead makes the plan ramp its parameter (:meth:`ramp`).
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
                values[name] = _present(device)
            except Exception:  # a disconnected device must not hide the other values
                values[name] = None
        return values

    def unplaced(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` a :class:`MaxStep` rule governs whose device has no synchronous present value, and
        fails no reading of it either (ophyd-async devices): a plan reads them through the RunEngine."""
        governed = {rule.parameter for rule in self.safety if isinstance(rule, MaxStep)}
        out = []
        for name in names:
            if name in governed and name in self.settable:
                try:
                    if _present(self.settable[name]) is None:
                        out.append(name)
                except Exception:  # noqa: BLE001 - a readback that fails is refused by ramp(), nothing moving
                    pass
        return out

    def check_limits(self, setpoints: Mapping[str, Any], *, partial: bool = False) -> None:
        """Refuse, before anything moves, a proposal a device's limits or a safety rule would refuse.

        ``partial``: ``setpoints`` are some parameters only (a custom plan's ``move_to``); a lab's own rules, written
        for a whole proposal, are left to the pre-flight, and only ``AllowedValues`` and ``MaxStep`` apply.

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
                if not (_finite_number(value) and low <= value <= high):
                    raise DeviceError(f"{name}={value!r} outside the instrument's limits [{low:g}, {high:g}]")
            device = self.settable.get(name)
            checker = getattr(device, "check_value", None)
            if checker is None:
                continue
            try:
                _run_check(checker, value)
            except InstrumentUnavailable:
                raise
            except Exception as exc:  # ophyd raises LimitError; others raise their own kinds
                raise DeviceError(f"{name}={value!r} refused by {_device_name(device)}: {exc}") from exc
        if self.safety:
            current = self.current()
            for rule in self.safety:
                if not partial or isinstance(rule, (AllowedValues, MaxStep)):
                    rule.check(setpoints, current)
            self.ramp({k: v for k, v in setpoints.items() if k in self.settable}, current)  # refuses what no ramp reaches

    def ramp(self, setpoints: Mapping[str, Any], current: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The stages that take the devices named in ``setpoints`` there: one dict of setpoints per ``bps.mv``.

        A parameter with a :class:`MaxStep` rule (the smallest, if several) and a known present value goes in
        equal increments; all such parameters go together, in as many stages as the one needing most, so none
        moves more than its own step per stage, and reaches its setpoint exactly in the last stage. The others
        go straight to their setpoint in the first stage. Each stage lies on the segment from the present value to the
        (checked) setpoint, and is clamped into the parameter's limits (``limits`` and the device's own), so a
        device that starts outside them (a heater at room temperature below the campaign's range) enters them
        at the nearest limit. An integer setpoint from an integral present value goes in whole-number stages.

        Raises:
            InstrumentUnavailable: the device is more than a step outside its limits, so no move of at most
                the step reaches them; nothing has moved, and the experiment is not at fault.
        """
        present = self.current() if current is None else current
        steps: dict[str, float] = {}
        for rule in self.safety:
            name = getattr(rule, "parameter", None)
            if isinstance(rule, MaxStep) and name in setpoints and _finite_number(setpoints[name]) \
                    and isinstance(present.get(name), numbers.Real) and not _finite_number(present.get(name)):
                # a readback of NaN (a thermocouple off its socket) is a fault, not "cannot say where it is": taken
                # as unknown, the heater it guards jumped from wherever it was straight to the setpoint
                raise InstrumentUnavailable(f"{name}: the device reads {present[name]!r}, so no ramp of at most "
                                            f"{rule.max_change:g} can start from it; nothing has moved")
            if isinstance(rule, MaxStep) and name in setpoints and _finite_number(setpoints[name]) \
                    and present.get(name) is None:
                # None is a device that cannot say where it is, moved in one go; one whose readback
                # raised (a controller not answering) was taken for one, and its heater jumped to the setpoint
                failure = _read_error(self.settable.get(name))
                if failure is not None:
                    raise InstrumentUnavailable(
                        f"{name}: its device cannot say where it is ({type(failure).__name__}: {failure}), so no ramp "
                        f"of at most {rule.max_change:g} can start from it; nothing has moved")
            if isinstance(rule, MaxStep) and name in setpoints and _finite_number(setpoints[name]) \
                    and _finite_number(present.get(name)):
                steps[name] = min(rule.max_change, steps.get(name, math.inf))
        whole = {n for n in steps if _whole(setpoints[n]) and float(present[n]).is_integer()}
        count = 1
        for name, step in steps.items():
            delta = abs(float(setpoints[name]) - float(present[name]))
            if name in whole and delta:
                if step < 1:
                    raise DeviceError(f"{name}: a step of {step:g} cannot move a whole-number setting")
                step = math.floor(step)
            count = max(count, math.ceil(delta / step))
        if count == 1:
            return [dict(setpoints)]
        # the ungoverned ones go in the first stage; the governed ones in every stage
        stages: list[dict[str, Any]] = [dict(setpoints)] + [{n: setpoints[n] for n in steps} for _ in range(count - 1)]
        for name, step in steps.items():
            start, end = float(present[name]), float(setpoints[name])
            low, high = self._range(name)
            for k, stage in enumerate(stages[:-1], start=1):
                if name in whole:
                    value: float = int(start) + int(math.copysign((abs(int(end) - int(start)) * k) // count, end - start))
                else:
                    value = start + (end - start) * k / count
                stage[name] = min(max(value, low), high)
            first = stages[0][name]
            # only when the device starts more than a step outside its limits; with a tolerance, since a distance
            # that is a whole number of steps divides into increments a rounding above the step (7.1 / 71 is
            # 0.1000000000000001), and a device inside its limits was said to be outside them, its trial re-queued
            # for ever
            if abs(first - start) > step * (1 + 1e-9):
                raise InstrumentUnavailable(
                    f"{name}: the device is at {start:g}, outside its limits [{low:g}, {high:g}] by more than the "
                    f"allowed step {step:g}; no move of at most {step:g} reaches them: bring it within a step")
        # a stage is a value sent to the device as much as the setpoint is: what its AllowedValues or its own
        # check_value refuses (a ChoiceSignal of numbers) is refused before anything moves; a ChoiceSignal had
        # refused a stage mid-ramp, after the stages before it were set, and a plain signal was sent them all
        for name in steps:
            going = (f"{name}: going from {present[name]!r} to {setpoints[name]!r} in steps of at most "
                     f"{steps[name]:g} passes")
            allowed = [rule.values for rule in self.safety if isinstance(rule, AllowedValues) and rule.parameter == name]
            checker = getattr(self.settable.get(name), "check_value", None)
            for stage in stages[:-1]:
                value = stage[name]
                for values in allowed:
                    if value not in values:
                        raise DeviceError(f"{going} {value!r}, which is not one of {list(values)}; nothing has moved")
                if checker is not None:
                    try:
                        _run_check(checker, value)
                    except InstrumentUnavailable:
                        raise
                    except Exception as exc:  # noqa: BLE001 - whatever the device refuses with
                        raise DeviceError(f"{going} {value!r}, which the device refuses ({exc}); nothing has moved") \
                            from None
        return stages

    def _range(self, name: str) -> tuple[float, float]:
        """The narrowest of the parameter's ``limits`` and its device's own (``limits`` where it has them)."""
        low, high = self.limits.get(name, (-math.inf, math.inf))
        try:
            own = getattr(self.settable.get(name), "limits", None)
        except Exception:  # a device that cannot say: the pre-flight has checked the setpoint with it anyway
            own = None
        if isinstance(own, (tuple, list)) and len(own) == 2 and all(_number(v) for v in own) and own[0] < own[1]:
            low, high = max(low, float(own[0])), min(high, float(own[1]))
        return float(low), float(high)

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


def _present(device: Any) -> Any:
    """A device's present value: a positioner's position, else a signal's value; None where it has neither."""
    value = getattr(device, "position", None)
    return device.get() if value is None and hasattr(device, "get") else value


def _read_error(device: Any) -> Exception | None:
    """What reading the device's present value (:func:`_present`) raises, if anything."""
    try:
        _present(device)
    except Exception as exc:  # noqa: BLE001 - whatever the device fails with
        return exc
    return None


#: seconds the pre-flight waits for an ophyd-async device's answer to ``check_value`` (ophyd-async's own default
#: timeout for a signal's value)
CHECK_TIMEOUT_S = 10.0


def _run_check(checker: Callable[[Any], Any], value: Any) -> None:
    """Call a device's ``check_value``; ophyd-async's is a coroutine, run on the RunEngine's loop."""
    result = checker(value)
    if not inspect.isawaitable(result):
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a caller's thread (the worker's pre-flight): wait for the device's answer
        from bluesky.run_engine import call_in_bluesky_event_loop

        try:
            call_in_bluesky_event_loop(result, timeout=CHECK_TIMEOUT_S)  # type: ignore[arg-type]
        except TimeoutError as exc:
            # waited for without a limit, a device that never answered held the station's pre-flight for good: no
            # trial ran there again, and a cancel could not reach a RunEngine that was not running
            raise InstrumentUnavailable(f"{_device_name(getattr(checker, '__self__', checker))} did not answer its "
                                        f"limit check within {CHECK_TIMEOUT_S:g} s; nothing has moved") from exc
    else:
        # Inside the RunEngine's own loop (a plan's pre-flight) we cannot block on it; the device's
        # set() runs the same check before moving, and ``limits`` above still applies.
        close = getattr(result, "close", None)
        if close is not None:
            close()


def describe_value(value: Any) -> str:
    """A reading in a message: an array by its shape (its repr is thousands of numbers), else a short repr."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "shape") and getattr(value, "ndim", 0) > 0):
        try:
            shape = tuple(np.shape(value))
        except ValueError:  # a ragged list
            shape = (len(value),)
        return f"an array of shape {shape}"
    return reprlib.repr(value)


def _finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite; an integer too large for a float is not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _number(value: Any) -> bool:
    """A real number, not a bool (infinite allowed: an axis without limits says (-inf, inf))."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(float(value))


def _whole(value: Any) -> bool:
    """An integer setpoint (a cycle count): ramped in whole numbers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
    except TypeError as exc:
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
            # raised by the call itself: an option the factory does not take; say which instrument refused it
            raise DeviceError(f"{target}: {exc}") from exc
        # raised inside the factory (its own bug, a device's wrong argument): without its type it read like an
        # option of the campaign ("Signal.__init__() got an unexpected keyword argument 'noise'")
        raise DeviceError(f"{target}: TypeError inside the factory: {exc}") from exc
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
