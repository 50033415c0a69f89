"""The binding's own checks: limits and safety rules must name a parameter some device sets."""

from __future__ import annotations

import numpy as np
import pytest
from ophyd import Signal
from ophyd.sim import SynAxis

from closedloop.errors import DeviceError
from drivers.binding import Derived, InstrumentBinding, MaxStep
from drivers.plans import measure
from drivers.readout import outputs_from_events


def test_limits_or_a_safety_rule_naming_no_device_are_refused_when_the_binding_is_made() -> None:
    # SynAxis has no limits of its own: a misspelled key in `limits` left the heater free to go anywhere
    heater = SynAxis(name="heater")
    with pytest.raises(DeviceError, match=r"limits names 'temprature', which no device sets \(devices: temperature\)"):
        InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                          outputs={"y": "heater"}, limits={"temprature": (20.0, 150.0)})
    with pytest.raises(DeviceError, match="safety names 'temp', which no device sets"):
        InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                          outputs={"y": "heater"}, safety=[MaxStep("temp", 20.0)])


def test_a_custom_plan_may_limit_parameters_it_sets_itself() -> None:
    heater = SynAxis(name="heater")
    binding = InstrumentBinding(name="oven", positioners={"temperature": heater}, detectors=[heater],
                                outputs={"y": "heater"}, plan=measure, limits={"dwell": (0.0, 60.0)})
    with pytest.raises(DeviceError, match=r"dwell=90.0 outside the instrument's limits \[0, 60\]"):
        binding.check_limits({"temperature": 50.0, "dwell": 90.0})


def test_a_driver_this_process_cannot_import_is_unavailable_not_a_failed_experiment() -> None:
    # a station started without the lab's module on its PYTHONPATH failed every trial it was sent as an
    # experiment: the whole budget spent in seconds, and the planner told each point failed
    from closedloop.errors import InstrumentUnavailable
    from drivers.binding import load_binding

    with pytest.raises(InstrumentUnavailable, match=r"cannot import 'hotplate_nowhere:HotPlate'.*PYTHONPATH"):
        load_binding("hotplate_nowhere:HotPlate")
    with pytest.raises(InstrumentUnavailable, match=r"cannot import 'simulators.surfaces:HotPlate'"):
        load_binding("simulators.surfaces:HotPlate")  # an older copy of the module, without the factory
    with pytest.raises(DeviceError, match="not an import path") as refused:
        load_binding("hotplate")
    assert not isinstance(refused.value, InstrumentUnavailable)


def factory_with_a_bug(gain: float = 1.0) -> InstrumentBinding:
    return InstrumentBinding(name="buggy", positioners={"x": SynAxis(name="x", gain=gain)})  # SynAxis takes no gain


def test_a_type_error_inside_a_factory_is_told_from_an_option_it_does_not_take() -> None:
    # both read "factory: ... got an unexpected keyword argument": the factory's own bug looked like a campaign option
    from drivers.binding import load_binding

    with pytest.raises(DeviceError, match=r"factory_with_a_bug: factory_with_a_bug\(\) got an unexpected keyword "
                                          r"argument 'gian'$"):
        load_binding("tests.drivers.test_binding:factory_with_a_bug", {"gian": 2.0})
    with pytest.raises(DeviceError, match=r"factory_with_a_bug: TypeError inside the factory: .*'gain'"):
        load_binding("tests.drivers.test_binding:factory_with_a_bug", {"gain": 2.0})


def test_a_derived_function_that_fails_or_returns_an_array_is_named_in_the_error(RE, docs) -> None:  # noqa: N803
    spectrum = Signal(name="spectrum", value=np.linspace(0.0, 1.0, 64))
    binding = InstrumentBinding(name="spec", positioners={"x": SynAxis(name="x")}, detectors=[spectrum],
                                outputs={"peak": Derived(keys=("spectrum",), func="numpy:argmax"),
                                         "doubled": Derived(keys=("spectrum",), func=lambda s: s * 2),
                                         "tenthousandth": Derived(keys=("spectrum",), func=lambda s: s[10000])})
    RE(measure(binding, {"x": 1.0}, {}), docs)
    assert outputs_from_events(binding, docs.events(), ["peak"])[0] == {"peak": 63.0}
    with pytest.raises(DeviceError, match=r"<lambda>\(spectrum\) returned an array of shape \(64,\), not a number"):
        outputs_from_events(binding, docs.events(), ["doubled"])
    with pytest.raises(DeviceError, match=r"<lambda>\(spectrum\) raised IndexError: index 10000"):
        outputs_from_events(binding, docs.events(), ["tenthousandth"])
