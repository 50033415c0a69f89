"""Worked example: a motorized stage and a detector over EPICS Channel Access, as an instrument binding.

The campaign names it like any other instrument::

    instrument:
      driver: drivers.epics_motor:Stage
      options: {prefix: "lab:", axes: [x1, x2]}

Each campaign parameter is moved by an ophyd ``EpicsMotor`` (a motor record: ``.VAL`` setpoint,
``.RBV`` readback, ``.DMOV`` done flag, limits from ``.VAL``'s control limits = the record's
``DRVL``/``DRVH``); the output ``y`` is a detector that measures when ``{prefix}det:acquire`` is
written with put-completion and holds the result in ``{prefix}det:value``. Limits are checked
three times: by the engine's pre-flight (``InstrumentBinding.check_limits`` -> ``EpicsMotor.check_value``),
by ``EpicsMotor.set`` itself, and by the IOC, which refuses puts outside its control limits.

``simulators.epics_ioc`` serves exactly these PVs for tests; the environment variables that keep
Channel Access on loopback are in ``docs/instruments.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ophyd
from ophyd import Component as Cpt
from ophyd import Device, EpicsMotor, EpicsSignal, EpicsSignalRO

from closedloop.errors import InstrumentUnavailable
from drivers.binding import InstrumentBinding, MaxStep

log = logging.getLogger("closedloop.drivers.epics")

# A second try with new device objects: in CI a motor built while another binding held the same PVs in
# one process never received its first readback ("Pending operations: _pos_changed subscription"),
# and a new EpicsMotor on the same PVs connected at once
CONNECT_ATTEMPTS = 2


def use_caproto() -> None:
    """Make caproto (pure Python, no libca) ophyd's Channel Access layer, unless it already is."""
    if getattr(ophyd.cl, "name", None) != "caproto":
        ophyd.set_cl("caproto")


class AcquireDetector(Device):
    """A detector measured by writing ``acquire`` with put-completion, then reading ``value``.

    The IOC completes the put only once the measurement is stored, so ``trigger`` finishes exactly
    when ``value`` holds the new reading (no race with a monitor update).
    """

    acquire = Cpt(EpicsSignal, "acquire", put_complete=True, kind="omitted")
    value = Cpt(EpicsSignalRO, "value", kind="hinted", auto_monitor=False)

    def trigger(self):
        return self.acquire.set(1)


def _first_unconnected(devices: list[Any], timeout: float) -> tuple[str, TimeoutError] | None:
    """The first of ``devices`` that does not connect within ``timeout``, and why; None when all do."""
    for device in devices:
        try:
            device.wait_for_connection(timeout=timeout)
        except TimeoutError as exc:
            return device.name, exc
    return None


def Stage(
    *,
    prefix: str = "sim:",
    axes: Sequence[str] = ("x1", "x2"),
    detector: str = "det",
    output: str = "y",
    max_step: float | None = None,
    interlock: bool = False,
    settle_time: float = 0.0,
    repeats: int = 1,
    timeout: float = 10.0,
) -> InstrumentBinding:
    """The stage at ``prefix``: one ``EpicsMotor`` per axis name, a detector giving ``output``.

    Args:
        prefix: the IOC's PV prefix (``lab:`` -> motors ``lab:x1``, ``lab:x2``; detector ``lab:det:``).
        axes: motor record names under the prefix; also the campaign parameter names.
        max_step: move each axis at most this far at a time: a setpoint further from where the axis is goes
            in a ramp of equal moves, all axes together, each finished before the next (``MaxStep``).
        interlock: hold runs while ``{prefix}interlock`` is 1 (a bluesky ``SuspendBoolHigh``).
        timeout: seconds to wait for every PV to connect before refusing the instrument.
    """
    from bluesky.suspenders import SuspendBoolHigh

    use_caproto()
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        motors = {axis: EpicsMotor(f"{prefix}{axis}", name=axis) for axis in axes}
        det = AcquireDetector(f"{prefix}{detector}:", name=detector)
        door = EpicsSignalRO(f"{prefix}interlock", name="interlock") if interlock else None
        devices: list[Any] = [*motors.values(), det, *([door] if door is not None else [])]
        failure = _first_unconnected(devices, timeout)
        if failure is None:
            break
        for device in devices:
            device.destroy()
        waiting, exc = failure
        if attempt == CONNECT_ATTEMPTS:
            raise InstrumentUnavailable(f"EPICS stage {prefix!r}: {waiting} did not connect in {timeout} s "
                                        f"({attempt} attempts): {exc}") from exc
        log.warning("EPICS stage %r: %s did not connect in %s s (%s); trying again with new devices",
                    prefix, waiting, timeout, exc)
    suspenders = [SuspendBoolHigh(door, sleep=0.5, tripped_message="interlock open")] if door is not None else []
    return InstrumentBinding(
        name=f"epics-stage:{prefix}",
        positioners=motors,
        detectors=[det],
        outputs={output: det.value.name},
        settle_time=settle_time,
        repeats=repeats,
        safety=[MaxStep(axis, max_step) for axis in axes] if max_step is not None else [],
        suspenders=suspenders,
        extras={"prefix": prefix},
    )
