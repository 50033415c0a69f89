"""A simulator with every parameter type, driven by the whole engine (daemon, worker, RunEngine)."""

from __future__ import annotations

import pytest

from closedloop.campaign import Campaign
from closedloop.daemon import run_embedded
from closedloop.store import Store
from simulators.materials import anneal

CAMPAIGN = """
name: anneal-e2e
parameters:
  temperature: {type: continuous, bounds: [80, 250]}
  time:        {type: continuous, bounds: [1, 600], scale: log}
  cycles:      {type: integer, bounds: [1, 10]}
  solvent:     {type: categorical, values: [DMF, DMSO, GBL]}
  ratio:       {type: discrete, values: [0.25, 0.5, 1.0, 2.0]}
  pressure:    {type: fixed, value: 1.0}
objectives:
  quality: {goal: maximize}
outcome_constraints: ["cost <= 30"]
budget: {experiments: 4}
planner: {backend: sobol, seed: 1}
instrument:
  simulator: simulators.materials:PerovskiteAnneal
  options: {seed: 0, latency: "10 ms"}
"""


@pytest.mark.slow
def test_perovskite_campaign_sets_every_parameter_type_and_measures_the_true_values(tmp_path):
    store = Store(tmp_path / "store.db")
    try:
        run = run_embedded(Campaign.from_yaml_text(CAMPAIGN), store, outbox=str(tmp_path / "outbox.db"))
        trials, observations = store.trials(run.id), store.observations(run.id)
    finally:
        store.close()
    assert [t.status for t in trials] == ["completed"] * 4
    assert len({t.parameters["solvent"] for t in trials}) > 1
    for trial in trials:
        truth = anneal(trial.parameters)
        measured = observations[trial.id].values
        assert measured["quality"] == pytest.approx(truth["quality"], rel=1e-9, abs=1e-12)
        assert measured["cost"] == pytest.approx(truth["cost"], rel=1e-9)
