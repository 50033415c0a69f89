"""Worked example: an instrument built from ophyd-async devices (the asyncio generation of ophyd).

``drivers.async_stage:AsyncStage`` is two ``ophyd_async.sim.SimMotor`` axes with soft limits and an
ophyd-async detector reading the Branin function of their readbacks. Swap ``SimMotor`` for
``ophyd_async.epics.motor.Motor("LAB:X1")`` (Channel Access or PV Access) and the binding is the same.

What differs from ophyd devices, and how the binding copes:

- Devices connect on the RunEngine's event loop: the worker creates its RunEngine before it loads
  the binding, and the factory connects inside ``init_devices()``.
- ``check_value`` is a coroutine: :meth:`drivers.binding.InstrumentBinding.check_limits` runs it on
  the RunEngine's loop in the worker's pre-flight, and the engine also enforces ``binding.limits``.
- No synchronous ``position``: a :class:`~drivers.binding.MaxStep` rule's plan reads the axis through the
  RunEngine (:func:`drivers.plans.present_values`) and ramps it as it ramps an ophyd device.

Needs the ``ophyd-async`` extra: ``pip install closedloop[ophyd-async]``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
from ophyd_async.core import AsyncStatus, StandardReadable, init_devices, soft_signal_r_and_setter
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.sim import SimMotor

from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding
from simulators.surfaces import branin

LIMITS = {"x1": (-5.0, 10.0), "x2": (0.0, 15.0)}


class LimitedSimMotor(SimMotor):
    """``SimMotor`` with soft limits: its own ``set`` refuses an out-of-range move before moving."""

    def __init__(self, name: str = "", *, limits: tuple[float, float], **kwargs: Any):
        self.soft_limits = (float(limits[0]), float(limits[1]))
        super().__init__(name=name, **kwargs)

    @cached_property
    def movable_logic(self):  # type: ignore[override]
        logic = SimMotor.movable_logic.func(self)  # type: ignore[attr-defined]
        low, high = self.soft_limits

        async def check_move(new_position: float) -> None:
            if not (np.isfinite(new_position) and low <= new_position <= high):
                raise DeviceError(f"{self.name}={new_position} outside soft limits [{low:g}, {high:g}]")

        logic.check_move = check_move
        return logic


class BraninDetector(StandardReadable):
    """Reads Branin(x1, x2) of two motors' readbacks when triggered."""

    def __init__(self, x1: SimMotor, x2: SimMotor, name: str = ""):
        self._axes = (x1, x2)
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.value, self._set_value = soft_signal_r_and_setter(float, 0.0)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        x = [await axis.user_readback.get_value() for axis in self._axes]
        self._set_value(float(branin(np.array(x))))


def AsyncStage(*, output: str = "y", instant: bool = True) -> InstrumentBinding:
    """Two limited ophyd-async sim motors ``x1``, ``x2`` and a Branin detector giving ``output``.

    Call it where a RunEngine already exists (the worker loads bindings after creating its own).
    """
    with init_devices(set_name=False):
        x1 = LimitedSimMotor(name="x1", limits=LIMITS["x1"], instant=instant)
        x2 = LimitedSimMotor(name="x2", limits=LIMITS["x2"], instant=instant)
        det = BraninDetector(x1, x2, name="det")
    return InstrumentBinding(
        name="async-stage",
        positioners={"x1": x1, "x2": x2},
        detectors=[det],
        outputs={output: det.value.name},
        limits=dict(LIMITS),
    )
