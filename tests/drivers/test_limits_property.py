"""Property: no value outside a device's limits ever reaches its ``set``, whatever is proposed."""

from __future__ import annotations

import math

import bluesky.plan_stubs as bps
import pytest
from bluesky import RunEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ophyd.utils.errors import LimitError

from closedloop.errors import DeviceError
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
