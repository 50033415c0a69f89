"""The protocol every backend speaks: what ``suggest(n)`` takes as ``n``."""

from __future__ import annotations

import pytest

from closedloop.campaign import Campaign
from closedloop.errors import PlannerError
from closedloop.planner import Result, make_planner


def campaign(backend: str) -> Campaign:
    return Campaign.model_validate({
        "name": "count",
        "parameters": {"x1": {"type": "continuous", "bounds": [-5, 10]}, "x2": {"type": "continuous", "bounds": [0, 15]}},
        "objectives": {"y": {"goal": "minimize"}},
        "budget": {"experiments": 20},
        "planner": {"backend": backend, "seed": 0, "initial_experiments": 3},
        "instrument": {"simulator": "simulators.surfaces:Branin"},
    })


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_suggest_takes_a_whole_number_at_least_zero_and_refuses_anything_else_by_name(backend: str):
    # suggest(-1) crashed inside torch in the random backend and gave [] in the others; suggest(2.5) crashed
    # inside torch or Ax in every backend
    planner = make_planner(campaign(backend))
    planner.ingest([Result({"x1": 1.0, "x2": 2.0}, {"y": 3.0}, 0)])
    assert planner.suggest(0) == []
    for n in (-1, 2.5, "2", True):
        with pytest.raises(PlannerError, match=f"suggest: n is the number of experiments to propose.*not {n!r}"):
            planner.suggest(n)
    assert len(planner.suggest(2)) == 2


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_an_experiment_in_flight_without_a_parameter_is_refused_by_name(backend: str):
    # it had raised KeyError: 'x2' from deep inside every backend
    planner = make_planner(campaign(backend))
    planner.ingest([Result({"x1": 1.0, "x2": 2.0}, {"y": 3.0}, 0)])
    with pytest.raises(PlannerError, match="pending 1: parameter 'x2' is missing"):
        planner.suggest(1, pending=[{"x1": 2.0, "x2": 3.0}, {"x1": 4.0}])
    [proposal] = planner.suggest(1, pending=[{"x1": 2.0, "x2": 3.0}])
    assert proposal.parameters != {"x1": 2.0, "x2": 3.0}
