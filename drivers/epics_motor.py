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

from collections.abc import Sequence
from typing import Any

import ophyd
from ophyd import Component as Cpt
from ophyd import Device, EpicsMotor, EpicsSignal, EpicsSignalRO

from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding, MaxStep


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
        max_step: refuse moving any axis further than this between consecutive experiments.
        interlock: hold runs while ``{prefix}interlock`` is 1 (a bluesky ``SuspendBoolHigh``).
        timeout: seconds to wait for every PV to connect before refusing the instrument.
    """
    from bluesky.suspenders import SuspendBoolHigh

    use_caproto()
    motors = {axis: EpicsMotor(f"{prefix}{axis}", name=axis) for axis in axes}
    det = AcquireDetector(f"{prefix}{detector}:", name=detector)
    suspenders = []
    devices: list[Any] = [*motors.values(), det]
    if interlock:
        door = EpicsSignalRO(f"{prefix}interlock", name="interlock")
        devices.append(door)
        suspenders.append(SuspendBoolHigh(door, sleep=0.5, tripped_message="interlock open"))
    for device in devices:
        try:
            device.wait_for_connection(timeout=timeout)
        except TimeoutError as exc:
            raise DeviceError(f"EPICS stage {prefix!r}: {device.name} did not connect in {timeout} s: {exc}") from exc
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
