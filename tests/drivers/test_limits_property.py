"""Property: no value outside a device's limits ever reaches its ``set``, whatever is proposed."""

from __future__ import annotations

import math

import bluesky.plan_stubs as bps
import pytest
from bluesky import RunEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ophyd import Signal
from ophyd.utils.errors import LimitError

from closedloop.errors import DeviceError
from drivers.binding import InstrumentBinding
from drivers.plans import experiment_plan
from simulators.surfaces import Branin

LIMITS = {"x1": (-5.0, 10.0), "x2": (0.0, 15.0)}
anything = st.floats(allow_nan=True, allow_infinity=True) | st.floats(min_value=-6.0, max_value=16.0)
_RE = RunEngine({}, context_managers=[])


def inside(name: str, value: float) -> bool:
    low, high = LIMITS[name]
    return math.isfinite(value) and low <= value <= high


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proposals=st.lists(st.fixed_dictionaries({"x1": anything, "x2": anything}), min_size=1, max_size=4))
def test_no_out_of_limits_value_reaches_set(proposals):
    binding = Branin()
    for proposal in proposals:
        valid = all(inside(n, v) for n, v in proposal.items())
        if valid:
            _RE(experiment_plan(binding, proposal, {"trial_id": 0}))
        else:
            with pytest.raises(DeviceError):
                _RE(experiment_plan(binding, proposal, {"trial_id": 0}))
        assert _RE.state == "idle"
    for name, axis in binding.positioners.items():
        assert all(inside(name, v) for v in axis.set_calls)
        assert axis.set_calls == [p[name] for p in proposals if all(inside(n, v) for n, v in p.items())]


@settings(max_examples=40, deadline=None)
@given(value=anything)
def test_the_device_itself_refuses_when_the_preflight_is_bypassed(value):
    # The second line of defence: a plan that skips check_limits still cannot move the axis out of range.
    axis = Branin().positioners["x1"]
    start = axis.position
    if inside("x1", value):
        _RE(bps.mv(axis, value))
        assert axis.position == pytest.approx(value, abs=1e-9)
    else:
        with pytest.raises(LimitError):
            _RE(bps.mv(axis, value))
        assert axis.position == start


class RecordingSignal(Signal):
    """A plain ophyd Signal, which takes any value: it keeps every value that reached its ``set``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.set_calls: list[object] = []

    def set(self, value, **kwargs):  # noqa: A003 - ophyd's verb
        self.set_calls.append(value)
        return super().set(value, **kwargs)


# what a corrupt or hostile assign may carry as a setpoint: JSON has lists, mappings, booleans, huge integers
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**400), max_value=10**400) | st.text(max_size=5)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)


def campaign_value(value: object) -> bool:
    """What a campaign can propose for a setting: text, or a finite number that is not a boolean."""
    if isinstance(value, str):
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_a_plain_signal_is_given_only_values_a_campaign_could_propose(value):
    gas = RecordingSignal(name="gas", value="N2")
    binding = InstrumentBinding(name="plain", positioners={}, signals={"gas": gas}, detectors=[gas],
                                outputs={"y": "gas"})
    if campaign_value(value):
        _RE(experiment_plan(binding, {"gas": value}, {"trial_id": 0}))
        assert gas.set_calls == [value]
    else:
        with pytest.raises(DeviceError, match="gas="):
            _RE(experiment_plan(binding, {"gas": value}, {"trial_id": 0}))
        assert gas.set_calls == []
    assert _RE.state == "idle"
