"""What every backend reports from the results it has seen (``closedloop.planner.observations``)."""

from __future__ import annotations

import pytest

from closedloop.campaign import Campaign
from closedloop.errors import PlannerError
from closedloop.planner import Result, make_planner


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_the_hypervolume_of_one_objective_is_refused_by_name(backend: str):
    # it had failed inside BoTorch: IndexError: max(): Expected reduction dim 1 to have non-zero size
    planner = make_planner(Campaign.model_validate({
        "name": "one", "parameters": {"x": {"type": "continuous", "bounds": [0, 1]}},
        "objectives": {"y": {"goal": "minimize"}}, "budget": {"experiments": 10},
        "planner": {"backend": backend, "seed": 0}, "instrument": {"simulator": "simulators.surfaces:Branin"},
    }))
    planner.ingest([Result({"x": 0.2}, {"y": 1.0}, 0), Result({"x": 0.7}, {"y": 2.0}, 1)])
    with pytest.raises(PlannerError, match=r"hypervolume: the campaign has one objective \('y'\)"):
        planner.hypervolume()
    assert planner.best().values == {"y": 1.0}


def _two_parameter_planner(backend: str):
    return make_planner(Campaign.model_validate({
        "name": "big", "parameters": {"x": {"type": "continuous", "bounds": [0, 1]},
                                      "z": {"type": "continuous", "bounds": [0, 1]}},
        "objectives": {"y": {"goal": "minimize"}}, "budget": {"experiments": 10},
        "planner": {"backend": backend, "seed": 0}, "instrument": {"simulator": "simulators.surfaces:Branin"},
    }))


@pytest.mark.parametrize("backend", ["botorch", "ax", "sobol", "random"])
def test_a_reading_too_large_for_a_float_is_a_failed_experiment(backend: str):
    # an exact count from a simulation (10**400, a Python int) is no finite float: the botorch backend took it
    # in and every later suggest() and best() raised OverflowError, the ax backend's ingest raised it
    planner = _two_parameter_planner(backend)
    planner.ingest([Result({"x": 0.2, "z": 0.1}, {"y": 1.0}, 0), Result({"x": 0.7, "z": 0.4}, {"y": 10**400}, 1),
                    Result({"x": 0.5, "z": 0.9}, {"y": 2.0}, 2)])
    assert planner.best().values == {"y": 1.0}
    (proposal,) = planner.suggest(1)
    assert 0 <= proposal.parameters["x"] <= 1


def test_a_parameter_too_large_for_a_float_is_refused_by_name():
    planner = _two_parameter_planner("botorch")
    with pytest.raises(PlannerError, match=r"x=1000.* is not a number"):
        planner.ingest([Result({"x": 10**400, "z": 0.1}, {"y": 1.0}, 0)])
