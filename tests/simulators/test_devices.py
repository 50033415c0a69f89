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
