"""How an instrument is described to the engine: devices for parameters, readings for outputs.

A lab writes one module with a factory returning an :class:`InstrumentBinding` and names it in the
campaign file (``instrument: {driver: drivers.mylab:SpinCoater}``); no engine code changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bluesky.protocols import Movable, Readable

from closedloop.errors import DeviceError

Plan = Generator[Any, Any, Any]


@dataclass
class InstrumentBinding:
    """Devices of one instrument, keyed by the campaign names they serve.

    Attributes:
        name: a short name, recorded in every run's start document.
        positioners: campaign parameter name -> the device that sets it (``bps.mv`` target).
        detectors: devices triggered and read once per experiment.
        outputs: campaign output name -> the data key of the event document holding its value.
        plan: optional custom per-experiment plan ``plan(binding, setpoints, md) -> run uid``.
    """

    name: str
    positioners: Mapping[str, Movable]
    detectors: list[Readable]
    outputs: Mapping[str, str]
    plan: Callable[[InstrumentBinding, dict[str, Any], dict[str, Any]], Plan] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def check_limits(self, setpoints: Mapping[str, Any]) -> None:
        """Refuse, before anything moves, a setpoint outside a device's own limits."""
        for name, value in setpoints.items():
            device = self.positioners.get(name)
            checker = getattr(device, "check_value", None)
            if checker is None or isinstance(value, str):
                continue
            try:
                checker(value)
            except Exception as exc:  # ophyd raises LimitError; others raise their own kinds
                raise DeviceError(f"{name}={value!r} refused by {getattr(device, 'name', device)}: {exc}") from exc


def load_binding(target: str, options: Mapping[str, Any] | None = None) -> InstrumentBinding:
    """Build the binding named by an import path ``package.module:Factory`` with its options."""
    module_name, _, attribute = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DeviceError(f"cannot import instrument {target!r}: {exc}") from exc
    binding = factory(**dict(options or {}))
    if not isinstance(binding, InstrumentBinding):
        raise DeviceError(f"{target!r} returned {type(binding).__name__}, not an InstrumentBinding")
    return binding
