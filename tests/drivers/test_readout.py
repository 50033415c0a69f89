"""From a real run's events to outputs: what a scientist reads when a reading is not a number."""

from __future__ import annotations

import numpy as np
import pytest
from ophyd import Signal
from ophyd.sim import SynAxis

from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding
from drivers.plans import measure
from drivers.readout import outputs_from_events


def test_an_output_mapped_to_a_spectrum_names_its_shape_not_every_value(RE, docs) -> None:  # noqa: N803
    spectrum = Signal(name="spectrum", value=np.linspace(0.0, 1.0, 256))
    binding = InstrumentBinding(name="spec", positioners={"x": SynAxis(name="x")}, detectors=[spectrum],
                                outputs={"y": "spectrum"})
    RE(measure(binding, {"x": 1.0}, {}), docs)
    with pytest.raises(DeviceError) as raised:
        outputs_from_events(binding, docs.events())
    message = str(raised.value)
    assert "output 'y': reading an array of shape (256,) is not a number" in message
    assert "Derived" in message
    assert len(message) < 200  # was the array's repr: some 4,000 characters in every `closedloop show` row
