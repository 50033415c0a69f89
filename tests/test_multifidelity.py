"""The multi-fidelity planner prototype (closedloop.planner.multifidelity): real BoTorch models, small data."""

from __future__ import annotations

import math

import pytest

from closedloop.planner.base import Result
from closedloop.planner.multifidelity import SOURCE, MultiFidelityPlanner


def branin(x1: float, x2: float) -> float:
    return (x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


def biased(x1: float, x2: float) -> float:
    return 0.9 * branin(x1, x2) + 3 + 2 * math.sin(x1)


def test_sources_must_be_priced_and_include_the_target() -> None:
    with pytest.raises(ValueError, match="at least two sources"):
        MultiFidelityPlanner({"x": (0, 1)}, {"robot": 1.0}, target="robot", output="y")
    with pytest.raises(ValueError, match="at least two sources"):
        MultiFidelityPlanner({"x": (0, 1)}, {"sim": 0.1, "robot": 1.0}, target="other", output="y")


@pytest.mark.slow
def test_proposals_name_a_source_stay_in_bounds_and_the_model_learns_across_sources() -> None:
    bounds = {"x1": (-5.0, 10.0), "x2": (0.0, 15.0)}
    planner = MultiFidelityPlanner(bounds, {"sim": 0.1, "robot": 1.0}, target="robot", output="y", seed=3,
                                   num_restarts=2, raw_samples=32)
    spent, trial = 0.0, 0
    sources = []
    for _ in range(9):  # the start (2 robot + 5 sim) and two model-based proposals
        (proposal,) = planner.suggest(1)
        source = proposal.metadata[SOURCE]
        assert proposal.parameters[SOURCE] == source and proposal.metadata["cost"] == planner.cost(source)
        for name, (low, high) in bounds.items():
            assert low <= proposal.parameters[name] <= high
        f = branin if source == "robot" else biased
        trial += 1
        planner.ingest([Result(proposal.parameters, {"y": f(proposal.parameters["x1"], proposal.parameters["x2"])},
                               trial)])
        spent += planner.cost(source)
        sources.append(source)
    assert sources[:7].count("robot") == 2 and sources[:7].count("sim") == 5
    assert {p.metadata["generator"] for p in [planner.suggest(1)[0]]} == {"mf-ucb"}
    assert planner.best() is not None and planner.best().parameters[SOURCE] == "robot"
    recommended = planner.recommend()
    assert recommended is not None and set(recommended) == set(bounds)
    assert spent < 9 * planner.cost("robot")
