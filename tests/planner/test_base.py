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
    with pytest.raises(PlannerError, match=r"n=1000000000000 is more experiments than one call proposes"):
        planner.suggest(10**12)  # torch's allocator had refused 16 TB
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


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_an_experiment_in_flight_that_is_not_one_of_the_campaigns_is_refused_by_name(backend: str):
    # NaN failed in the model's linear algebra (botorch), None in a float conversion (every backend)
    planner = make_planner(campaign(backend))
    planner.ingest([Result({"x1": 1.0, "x2": 2.0}, {"y": 3.0}, 0)])
    for pending, says in (([{"x1": float("nan"), "x2": 3.0}], "pending 0: x1=nan is not a number"),
                          ([{"x1": None, "x2": 3.0}], "pending 0: x1=None is not a number"),
                          (["x1=0.5"], "pending 0: 'x1=0.5' is not a mapping")):
        with pytest.raises(PlannerError, match=says):
            planner.suggest(1, pending=pending)
    assert len(planner.suggest(1, pending=[{"x1": 2.0, "x2": 3.0}])) == 1


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_a_result_that_is_no_result_is_refused_and_nothing_is_taken(backend: str):
    # values of 1.5 for {"y": 1.5} broke every later best() (and botorch's suggest); a trial "twelve" was refused
    # after the results before it had been taken
    planner = make_planner(campaign(backend))
    good = Result({"x1": 1.0, "x2": 2.0}, {"y": 3.0}, 0)
    planner.ingest([good])
    for bad, says in ((Result({"x1": 2.0, "x2": 3.0}, 1.5, 1), "values 1.5 are not a mapping of output names"),
                      (Result({"x1": 2.0, "x2": 3.0}, {"y": 1.5, 7: 2.0}, 1), "are not a mapping of output names"),
                      (Result({"x1": 2.0, "x2": 3.0}, {"y": 1.5}, "twelve"), "trial 'twelve' is not a number")):
        with pytest.raises(PlannerError, match=f"result 1 .*{says}.*none of the 2 results was taken"):
            planner.ingest([Result({"x1": 4.0, "x2": 5.0}, {"y": 9.0}, 5), bad])
    assert planner.best() == good
    assert len(planner.suggest(1)) == 1
