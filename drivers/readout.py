"""From a run's documents to the outputs and noise the planner ingests.

Example:
    >>> from ophyd.sim import SynAxis
    >>> from drivers.binding import InstrumentBinding
    >>> b = InstrumentBinding(name="demo", positioners={}, detectors=[], outputs={"y": "det"})
    >>> outputs_from_events(b, [{"data": {"det": 1.0}}, {"data": {"det": 3.0}}])
    ({'y': 2.0}, {'y': 1.0})
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from closedloop.errors import DeviceError
from drivers.binding import Derived, InstrumentBinding, describe_value


def _value(source: str | Derived, data: Mapping[str, Any], output: str) -> float:
    if isinstance(source, Derived):
        value = source.compute(data)
    else:
        if source not in data:
            readings = ", ".join(sorted(data))
            raise DeviceError(f"output {output!r}: data key {source!r} not in the run's readings ({readings})")
        value = data[source]
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        # an output mapped straight to a spectrum's or an image's key: its repr filled the error with the whole array
        hint = "; reduce it to a number with Derived(keys=..., func=...)" if describe_value(value).startswith("an array") else ""
        raise DeviceError(f"output {output!r}: reading {describe_value(value)} is not a number{hint}") from exc
    if not math.isfinite(number):
        raise DeviceError(f"output {output!r}: reading {number} is not finite")
    return number


def outputs_from_events(
    binding: InstrumentBinding,
    events: Sequence[Mapping[str, Any]],
    outputs: Iterable[str] | None = None,
) -> tuple[dict[str, float], dict[str, float] | None]:
    """Each output's value and noise from the event documents of one run's measurement stream.

    With several events (``binding.repeats > 1``) the value is their mean and the noise the standard
    error of that mean (sample standard deviation / sqrt(n)); with one event the noise is ``None``
    (unknown, for the planner to infer).

    Args:
        binding: maps outputs to data keys or :class:`~drivers.binding.Derived` functions.
        events: event documents (``{"data": {...}}``) of the ``primary`` stream, in order.
        outputs: the outputs to extract (a campaign's ``outputs``); all of ``binding.outputs`` if omitted.

    Raises:
        DeviceError: no events, an output the binding does not map, a missing or non-finite reading.
    """
    if not events:
        raise DeviceError("the run produced no event documents")
    wanted = list(binding.outputs) if outputs is None else list(outputs)
    values: dict[str, float] = {}
    noise: dict[str, float] = {}
    for output in wanted:
        source = binding.outputs.get(output)
        if source is None:
            raise DeviceError(f"instrument {binding.name!r} does not measure output {output!r}")
        samples = [_value(source, event["data"], output) for event in events]
        n = len(samples)
        mean = math.fsum(samples) / n
        values[output] = mean
        if n > 1:
            variance = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
            noise[output] = math.sqrt(variance / n)
    return values, (noise if len(events) > 1 else None)


def failure_reason(exc: BaseException) -> str:
    """A failed experiment's cause in words, looking through bluesky's wrappers.

    A device fault reaches ``RE(...)`` as ``FailedStatus(status)`` whose text only says the status
    failed; the device's own error (``status.exception()``, also the ``__cause__``) says why. Other
    errors are reported as they are: a ``DeviceError`` raised ``from`` a device's ``LimitError``
    already names the parameter and the limit, which its cause alone would not.
    """
    seen: set[int] = set()
    current = exc
    while type(current).__name__ == "FailedStatus" and id(current) not in seen:
        seen.add(id(current))
        status = current.args[0] if current.args else None
        inner = status.exception() if status is not None and hasattr(status, "exception") else None
        nxt = inner or current.__cause__
        if nxt is None:
            break
        current = nxt
    return f"{type(current).__name__}: {current}"
