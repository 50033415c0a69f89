"""Per-experiment Bluesky plans, built from plan stubs.

One experiment is one run: check the proposal, set the set-and-forget signals, move the
positioners (ramping those with a ``MaxStep`` rule), settle, then trigger and read ``repeats`` times into the ``primary`` stream. Plans
never call the RunEngine, sleep in wall time or touch the network, so they can be tested by listing
the messages they yield. A binding's custom plan (dispense, mix, anneal, measure) is built from the
same stubs; see ``docs/instruments.md``.

Example:
    >>> from ophyd.sim import SynAxis
    >>> from drivers.binding import InstrumentBinding
    >>> x = SynAxis(name="x")
    >>> b = InstrumentBinding(name="demo", positioners={"x": x}, detectors=[], outputs={"pos": "x"})
    >>> [m.command for m in measure(b, {"x": 1.0}, {"campaign": "demo", "trial_id": 1})][:4]
    ['open_run', 'checkpoint', 'set', 'wait']
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky import Msg

from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding, MaxStep, Plan

STREAM = "primary"


def preflight(binding: InstrumentBinding, setpoints: Mapping[str, Any]) -> Plan:
    """Refuse the proposal before anything moves (limits and safety rules); yields no messages."""
    binding.check_limits(setpoints)
    return
    yield  # pragma: no cover - makes this a generator so it composes with ``yield from``


def set_signals(binding: InstrumentBinding, setpoints: Mapping[str, Any]) -> Plan:
    """Write the set-and-forget values (categorical choices, fixed settings) and wait for all of them.

    A signal with a :class:`~drivers.binding.MaxStep` rule is ramped, as :func:`move_to` ramps a positioner.
    """
    yield from _ramp(binding, binding.signals, setpoints)


def move_to(binding: InstrumentBinding, setpoints: Mapping[str, Any]) -> Plan:
    """Move every positioner named in ``setpoints`` at once and wait for all of them.

    Positioners with a :class:`~drivers.binding.MaxStep` rule go there in a ramp
    (:meth:`~drivers.binding.InstrumentBinding.ramp`): several ``bps.mv``, each at most the step from the
    last and finished before the next, all such positioners moving together in each; the others move in
    the first. A checkpoint before every stage after the first means a pause rewinds only to the stage it
    interrupted, so a resumed ramp never jumps back to its start.
    """
    yield from _ramp(binding, binding.positioners, setpoints)


def _ramp(binding: InstrumentBinding, devices: Mapping[str, Any], setpoints: Mapping[str, Any]) -> Plan:
    targets = {name: value for name, value in setpoints.items() if name in devices}
    if not targets:
        return
    # a custom plan moves to values of its own (an overshoot, a dispensed volume): the pre-flight saw only the
    # trial's setpoints, and a device whose only limits are the binding's took 170 on a [20, 150] heater
    binding.check_limits(targets, partial=True)
    stages = binding.ramp(targets, (yield from present_values(binding, targets)))
    k = 0
    while k < len(stages):
        if k:
            yield from bps.checkpoint()
            # an operator's pause lands at this checkpoint, and the devices may move while it lasts (a heater cools, a
            # stage is moved by hand): the stages planned before it then jumped from there (0 -> 80 in steps of 20).
            # What is left of the ramp starts again from where they are. (A 'read' is answered None when the plan is
            # only listed, not run: the devices have not moved then, and the plan stays as planned.)
            if (yield Msg("read", devices[next(iter(stages[k]))])) is not None:
                present = yield from present_values(binding, stages[k])
                if _strayed(binding, stages[k], present):
                    stages[k:] = binding.ramp({name: targets[name] for name in stages[-1]}, present)
        yield from bps.mv(*itertools.chain.from_iterable((devices[name], value) for name, value in stages[k].items()))
        k += 1


def present_values(binding: InstrumentBinding, names: Iterable[str]) -> Plan:
    """Where the binding's devices are (:meth:`~drivers.binding.InstrumentBinding.current`), those of ``names`` that a
    :class:`~drivers.binding.MaxStep` rule governs read through the RunEngine if they cannot say it otherwise.

    An ophyd-async device has no synchronous position: its ``MaxStep`` saw ``None`` and moved it in one go (0 to 90
    on a heater ramped 20 at a time). Read here, it is ramped as an ophyd device is. When the plan is only listed,
    not run, the read is answered with nothing and the value stays ``None``.
    """
    present = binding.current()
    for name in binding.unplaced(names):
        present[name] = yield from bps.rd(binding.settable[name], default_value=None)
    return present


def _strayed(binding: InstrumentBinding, stage: Mapping[str, Any], present: Mapping[str, Any]) -> bool:
    """Whether a device of a ramp is now more than its step from the stage it is to move to next."""
    for rule in binding.safety:
        if isinstance(rule, MaxStep) and rule.parameter in stage:
            now = present.get(rule.parameter)
            if isinstance(now, numbers.Real) and not isinstance(now, bool) and math.isfinite(now) \
                    and abs(float(stage[rule.parameter]) - float(now)) > rule.max_change * (1 + 1e-9):
                return True
    return False


def ramp_metadata(binding: InstrumentBinding, setpoints: Mapping[str, Any],
                  current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """For each parameter ramped in more than one stage: where it starts, its step and the number of stages.

    ``current``: where the devices are (:func:`present_values`); by default :meth:`InstrumentBinding.current`."""
    current = binding.current() if current is None else current
    steps: dict[str, float] = {}
    for rule in binding.safety:
        if isinstance(rule, MaxStep):
            steps[rule.parameter] = min(rule.max_change, steps.get(rule.parameter, float("inf")))
    out: dict[str, Any] = {}
    for devices in (binding.signals, binding.positioners):
        stages = binding.ramp({n: v for n, v in setpoints.items() if n in devices}, current)
        if len(stages) > 1:
            for name in stages[-1]:
                out[md_key(name)] = {"from": float(current[name]), "to": setpoints[name], "step": steps[name],
                                     "stages": len(stages)}
    return out


def settle(binding: InstrumentBinding) -> Plan:
    """Wait ``binding.settle_time`` seconds (a RunEngine sleep, so a pause or suspender can interrupt it)."""
    if binding.settle_time > 0:
        yield from bps.sleep(binding.settle_time)


def read_outputs(binding: InstrumentBinding, repeats: int | None = None) -> Plan:
    """Trigger and read the detectors and settable devices ``repeats`` times, one event each.

    A checkpoint before each measurement means a pause or suspender repeats only the measurement it
    interrupted, never one already recorded. Returns the readings of the last event.
    """
    readings: dict[str, Any] = {}
    for _ in range(repeats or binding.repeats):
        yield from bps.checkpoint()
        try:
            readings = yield from bps.trigger_and_read(binding.readables(), name=STREAM)
        except KeyError as exc:
            # event-model's words for a device whose read() names a key its describe() does not: "KeyError: 'det_valu'"
            # named neither the device nor the fault
            raise DeviceError(_keys_mismatch(binding) or f"KeyError: {exc}") from exc
    return readings


def _keys_mismatch(binding: InstrumentBinding) -> str | None:
    """The first device whose ``read()`` keys differ from its ``describe()`` keys, in words; None if none does."""
    for device in binding.readables():
        try:
            read, described = set(device.read()), set(device.describe())  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - an ophyd-async coroutine, a device that cannot be read again: not this one
            continue
        if read != described:
            return (f"device {getattr(device, 'name', device)!r}: read() gives {', '.join(sorted(read)) or 'nothing'} "
                    f"but describe() lists {', '.join(sorted(described)) or 'nothing'}; the two must name the same "
                    "data keys")
    return None


def md_key(name: str) -> str:
    """A metadata key event-model accepts: no ``.`` or ``/`` (``Qtot(uL/min)`` -> ``Qtot(uL_min)``)."""
    return name.replace(".", "_").replace("/", "_")


def run_metadata(binding: InstrumentBinding, setpoints: Mapping[str, Any], md: Mapping[str, Any],
                 current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the start document carries: the caller's ``md`` (campaign, trial id, planner metadata...),
    the parameters, how the instrument turns readings into outputs and, under ``ramp``, each parameter
    a :class:`~drivers.binding.MaxStep` rule moves in several stages (:func:`ramp_metadata`).

    The start document's schema refuses keys with ``.`` or ``/``; such parameter or output names are
    written with ``_`` instead, and ``names`` maps each written key back to the campaign's name.
    """
    outputs = binding.describe_outputs()
    renamed = {md_key(n): n for n in [*setpoints, *outputs] if md_key(n) != n}
    out = {
        **md,
        "parameters": {md_key(k): v for k, v in setpoints.items()},
        "instrument": binding.name,
        "outputs": {md_key(k): v for k, v in outputs.items()},
        "repeats": binding.repeats,
        "settle_time": binding.settle_time,
    }
    ramps = ramp_metadata(binding, setpoints, current)
    if ramps:
        out["ramp"] = ramps
    if renamed:
        out["names"] = renamed
    return out


def measure(binding: InstrumentBinding, setpoints: Mapping[str, Any], md: Mapping[str, Any]) -> Plan:
    """One experiment as one run: check, set signals, move, settle, trigger and read ``repeats`` times.

    Returns the run's uid. The start document carries ``md`` (campaign, trial id, planner metadata)
    and the parameters; outputs come from the ``primary`` events (:func:`drivers.readout.outputs_from_events`).
    """
    yield from preflight(binding, setpoints)
    present = yield from present_values(binding, setpoints)

    @bpp.run_decorator(md=run_metadata(binding, setpoints, md, present))
    def inner() -> Plan:
        # Rewinding to here after a pause re-issues the moves: the devices end where they were told.
        yield from bps.checkpoint()
        yield from set_signals(binding, setpoints)
        yield from move_to(binding, setpoints)
        yield from settle(binding)
        yield from read_outputs(binding)

    return (yield from inner())


def experiment_plan(binding: InstrumentBinding, setpoints: Mapping[str, Any], md: Mapping[str, Any]) -> Plan:
    """The binding's own plan when it has one, else :func:`measure`; limits are checked first either way."""
    if binding.plan is None:
        return (yield from measure(binding, dict(setpoints), dict(md)))
    yield from preflight(binding, setpoints)
    return (yield from bpp.msg_mutator(binding.plan(binding, dict(setpoints), dict(md)), _reads_inside_a_run(binding)))


def _reads_inside_a_run(binding: InstrumentBinding) -> Any:
    """A check on a custom plan's messages: a reading bundled before any run opened is the plan's mistake.

    bluesky's own words for it ("IllegalMessageSequence: Cannot bundle readings without an open run") named
    neither the instrument nor the fix.
    """
    opened = False

    def check(msg: Any) -> Any:
        nonlocal opened
        if msg.command == "open_run":
            opened = True
        elif msg.command == "create" and not opened:
            raise DeviceError(f"instrument {binding.name!r}: its plan reads before opening a run; a custom plan must "
                              "open exactly one run (bpp.run_decorator(md=run_metadata(...)) or bps.open_run) "
                              "around its measurements")
        return msg

    return check
