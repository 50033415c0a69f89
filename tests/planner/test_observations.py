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
