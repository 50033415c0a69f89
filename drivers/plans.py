"""Per-experiment Bluesky plans, built from plan stubs.

Plans never call the RunEngine, sleep in wall time or touch the network, so they can be tested by
listing the messages they yield.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from drivers.binding import InstrumentBinding, Plan


def move_to(binding: InstrumentBinding, setpoints: Mapping[str, Any]) -> Plan:
    """Move every positioner named in ``setpoints`` at once and wait for all of them."""
    pairs = [(binding.positioners[name], value) for name, value in setpoints.items() if name in binding.positioners]
    if pairs:
        yield from bps.mv(*itertools.chain.from_iterable(pairs))


def measure(binding: InstrumentBinding, setpoints: Mapping[str, Any], md: Mapping[str, Any]) -> Plan:
    """One experiment as one run: move, then trigger and read detectors and positioners together.

    Returns the run's uid. The start document carries ``md`` (campaign, trial id) and the setpoints.
    """

    @bpp.run_decorator(md={**md, "setpoints": dict(setpoints), "instrument": binding.name})
    def inner() -> Plan:
        yield from bps.checkpoint()
        yield from move_to(binding, setpoints)
        yield from bps.trigger_and_read([*binding.detectors, *binding.positioners.values()])

    return (yield from inner())


def experiment_plan(binding: InstrumentBinding, setpoints: Mapping[str, Any], md: Mapping[str, Any]) -> Plan:
    """The binding's own plan when it has one, else :func:`measure`."""
    plan = binding.plan or measure
    return (yield from plan(binding, dict(setpoints), dict(md)))
