"""A real EPICS Channel Access IOC (caproto) for a motorized stage with a detector, to test drivers against.

Serves, under ``--prefix`` (default ``sim:``):

- ``{prefix}x1``, ``{prefix}x2``: motor records (``.VAL``, ``.RBV``, ``.DMOV``, ``.HLM``, ``.LLM``, ...
  everything ophyd's ``EpicsMotor`` connects to), moving at ``--velocity`` units/s. ``.VAL`` carries
  the axis limits as control limits, so clients read them and the IOC refuses puts outside them.
- ``{prefix}x1:puts``, ``{prefix}x2:puts``: every value a client ever wrote to the motor's ``.VAL``,
  accepted or refused (the proof, in tests, that an out-of-limits setpoint never reached the IOC).
- ``{prefix}det:acquire``: write 1 with put-completion to measure; completes after ``--exposure`` s
  with ``{prefix}det:value`` = Branin(x1, x2) of the motors' readbacks.
- ``{prefix}interlock``: 0/1, for a suspender (a door or beam interlock).

Run it on loopback (see docs/instruments.md for the environment variables)::

    EPICS_CAS_INTF_ADDR_LIST=127.0.0.1 python -m simulators.epics_ioc --prefix lab: \\
        --limit x1=-5:10 --limit x2=0:15 --list-pvs
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import numpy as np
from caproto.ioc_examples.fake_motor_record import motor_record_simulator
from caproto.server import PVGroup, SubGroup, pvproperty, run, template_arg_parser
from caproto.server.server import PvpropertyDouble

from simulators.surfaces import branin

DEFAULT_LIMITS = {"x1": (-5.0, 10.0), "x2": (0.0, 15.0)}


class LoggedSetpoint(PvpropertyDouble):
    """A motor ``.VAL`` that logs every value a client writes, before the limits are checked."""

    async def verify_value(self, value: Any) -> Any:
        log = self.group.puts
        written = value[0] if isinstance(value, (list, tuple)) else value
        await log.write([*log.value, float(written)])
        return await super().verify_value(value)


class Axis(PVGroup):
    """One motor record with control limits and a log of the setpoints written to it."""

    motor = pvproperty(value=0.0, name="", record="motor", precision=4, dtype=LoggedSetpoint)
    puts = pvproperty(value=[], dtype=float, max_length=10_000, name=":puts", read_only=True)

    def __init__(self, *args: Any, limits: tuple[float, float], velocity: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.velocity = velocity

    @motor.startup  # type: ignore[no-redef]  # caproto: the hook reuses the pvproperty name
    async def motor(self, instance: Any, async_lib: Any) -> None:
        low, high = self.limits
        start = float(np.clip(0.0, low, high))
        await instance.write(start)
        await self.puts.write([])  # the start position is the IOC's own, not a client's
        await instance.write_metadata(lower_ctrl_limit=low, upper_ctrl_limit=high)
        defaults = {"velocity": self.velocity, "precision": 4, "acceleration": 0.01, "resolution": 1e-6,
                    "user_limits": (low, high)}
        await motor_record_simulator(instance, async_lib, defaults, tick_rate_hz=100.0)


class StageBase(PVGroup):
    """The detector and interlock; :func:`make_ioc_class` adds the axes."""

    axis_names: tuple[str, ...] = ()
    exposure: float = 0.0

    acquire = pvproperty(value=0, name="det:acquire")
    value = pvproperty(value=0.0, name="det:value", read_only=True, precision=6)
    interlock = pvproperty(value=0, name="interlock")

    @acquire.putter  # type: ignore[no-redef]
    async def acquire(self, instance: Any, value: Any) -> int:
        if self.exposure > 0:
            await asyncio.sleep(self.exposure)
        readbacks = [getattr(self, name).motor.field_inst.user_readback_value.value for name in self.axis_names]
        await self.value.write(float(branin(np.array(readbacks[:2]))))
        return 0


def make_ioc_class(limits: dict[str, tuple[float, float]], velocity: float, exposure: float) -> type[PVGroup]:
    """A PVGroup class with one :class:`Axis` per entry of ``limits`` and a detector reading Branin."""
    namespace: dict[str, Any] = {
        name: SubGroup(Axis, prefix=name, limits=lim, velocity=velocity) for name, lim in limits.items()
    }
    namespace.update(axis_names=tuple(limits), exposure=float(exposure), __doc__=__doc__)
    return type("StageIOC", (StageBase,), namespace)


def parse_limit(text: str) -> tuple[str, tuple[float, float]]:
    name, _, span = text.partition("=")
    low, _, high = span.partition(":")
    try:
        return name, (float(low), float(high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: write NAME=LOW:HIGH, e.g. x1=-5:10") from None


def main(argv: list[str] | None = None) -> None:
    # caproto's own options (--prefix, --list-pvs, ...) and the stage's, on one parser, so --help lists them all
    parser, split_args = template_arg_parser(default_prefix="sim:", desc="closedloop simulated stage: motor records "
                                             "and a detector reading Branin of their readbacks")
    stage = parser.add_argument_group("stage")
    stage.add_argument("--limit", action="append", type=parse_limit, default=[], metavar="NAME=LOW:HIGH",
                       help="an axis and its limits, twice (default x1=-5:10 and x2=0:15)")
    stage.add_argument("--velocity", type=float, default=50.0, help="motor speed, units/s (default: 50)")
    stage.add_argument("--exposure", type=float, default=0.0, help="detector acquisition time, s (default: 0)")
    args = parser.parse_args(argv)
    limits = dict(args.limit) or dict(DEFAULT_LIMITS)
    if len(limits) != 2:
        parser.error("the detector reads Branin of exactly two axes: give two --limit NAME=LOW:HIGH")
    ioc_class = make_ioc_class(limits, args.velocity, args.exposure)
    ioc_options, run_options = split_args(args)
    ioc = ioc_class(**ioc_options)
    run(ioc.pvdb, **run_options)


if __name__ == "__main__":
    main()
