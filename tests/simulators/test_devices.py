"""Simulated instruments built by simulators.devices, through a real RunEngine."""

from __future__ import annotations

import pytest
from bluesky import RunEngine

from drivers.documents import DocumentCollector
from drivers.plans import experiment_plan
from drivers.readout import outputs_from_events
from simulators.devices import Axis, Choice, simulated_instrument


def test_names_in_any_script_are_distinct_data_keys_and_are_measured() -> None:
    # every name without an ASCII letter became the data key 'value': a campaign over 'Δλ' measuring '濃度' failed
    # each experiment ("Data keys (field names) from LimitedAxis(name='value') collide with those from
    # ResponseSurface(...). The colliding keys are {'value'}")
    binding = simulated_instrument(
        "probe", [Axis("Δλ", 0, 1), Axis("θ", 0, 1), Choice("溶媒", ("水", "エタノール"))], ["濃度", "収率"],
        lambda p: {"濃度": p["Δλ"] + 2 * p["θ"], "収率": 1.0 if p["溶媒"] == "水" else 2.0})
    point = {"Δλ": 0.25, "θ": 0.5, "溶媒": "エタノール"}
    RE = RunEngine({}, context_managers=[])
    docs = DocumentCollector()
    RE(experiment_plan(binding, point, {"trial_id": 1}), docs)
    assert outputs_from_events(binding, docs.events())[0] == pytest.approx({"濃度": 1.25, "収率": 2.0})
    names = [d.name for d in binding.positioners.values()] + [s.name for s in binding.signals.values()]
    assert names == ["Δλ", "θ", "溶媒"]


def test_a_point_reads_the_same_whatever_the_axis_came_from() -> None:
    # ophyd's SynAxis ends a move at old + (new - old) * 1.0, a bit off the setpoint for some pairs
    # (2.432 -> 6.742 read 6.742000000000001): the same experiment measured differently after a restart
    # (the axis then starting from 0), so a campaign killed and resumed diverged from the uninterrupted run
    binding = simulated_instrument("probe", [Axis("x", -5, 10)], ["y"], lambda p: p["x"])
    RE = RunEngine({}, context_managers=[])
    readings = []
    for before in (0.0, 2.432):
        RE(experiment_plan(binding, {"x": before}, {"trial_id": 1}))
        docs = DocumentCollector()
        RE(experiment_plan(binding, {"x": 6.742}, {"trial_id": 2}), docs)
        readings.append(outputs_from_events(binding, docs.events())[0]["y"])
        assert binding.positioners["x"].position == 6.742
    assert readings == [6.742, 6.742]


@pytest.mark.parametrize("value", [10**30, 10**400, 150.0000001, float("nan")])
def test_a_limited_axis_refuses_any_number_outside_its_limits_in_its_own_words(value: float) -> None:
    """An integer past int64 was refused by numpy's isfinite ("ufunc 'isfinite' not supported for the input
    types"), and one past any float by the set call itself (OverflowError), before the limits were checked."""
    from simulators.devices import LimitError, LimitedAxis

    axis = LimitedAxis(name="heater", limits=(0, 150), value=20)
    with pytest.raises(LimitError, match="outside limits"):
        axis.set(value)
    assert axis.position == 20
