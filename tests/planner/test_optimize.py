"""Maximizing the acquisition: a batch over a large table is chosen from a shortlist, not q passes over it."""

from __future__ import annotations

import pytest
import torch

from closedloop.planner import models as gp
from closedloop.planner import Planner, optimize
from closedloop.planner.acquisition import single_objective
from closedloop.planner.numerics import in_planner_numerics


def _batch_acquisition(rows: int) -> tuple[object, torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(30, 3, generator=generator, dtype=torch.double)
    y = -((x - 0.3) ** 2).sum(-1, keepdim=True) + 0.01 * torch.randn(30, 1, generator=generator, dtype=torch.double)
    model = gp.conditioned_gp(x, y, {}, gp.fit_gp(x, y, {}, 0))
    acquisition = single_objective(model, x, None, None, 4, float(y.max()), 0, True)
    evaluated = [0]
    forward = acquisition.forward

    def counted(points: torch.Tensor) -> torch.Tensor:
        evaluated[0] += points.shape[0]
        return forward(points)

    acquisition.forward = counted  # type: ignore[method-assign]
    return acquisition, torch.rand(rows, 3, generator=generator, dtype=torch.double), evaluated


def test_a_batch_over_a_large_table_scores_each_row_once_then_chooses_among_the_best(monkeypatch) -> None:
    monkeypatch.setattr(optimize, "SHORTLIST", 200)
    acquisition, choices, evaluated = _batch_acquisition(3000)
    chosen, _ = in_planner_numerics(optimize.maximize_discrete)(acquisition, choices, 4)
    acquisition.set_X_pending(None)
    with torch.no_grad():
        alone = acquisition(choices.unsqueeze(-2))
    assert evaluated[0] <= 3000 + 4 * 200 + 3000  # one pass, four over the shortlist, and the check just above
    assert len({tuple(row.tolist()) for row in chosen}) == 4
    top = choices[alone.topk(200).indices]
    assert all(any(torch.equal(row, t) for t in top) for row in chosen)
    assert torch.equal(chosen[0], choices[int(torch.argmax(alone))])  # the first member is the best row alone


@pytest.mark.parametrize("rows", [150, 3000])
def test_a_single_proposal_or_a_small_table_is_searched_exactly(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(optimize, "SHORTLIST", 200)
    acquisition, choices, evaluated = _batch_acquisition(rows)
    chosen, _ = in_planner_numerics(optimize.maximize_discrete)(acquisition, choices, 1 if rows > 200 else 4)
    if rows > 200:
        assert evaluated[0] == rows
    else:
        assert evaluated[0] > 3 * rows  # a greedy pass over every row for each member
    assert chosen.shape[0] == (1 if rows > 200 else 4)


def _past_its_initial_design(extra: str, initial: int, budget: int) -> Planner:
    """A botorch planner over ``x1``, ``x2`` in [0, 1] and the YAML lines ``extra`` (more parameters, constraints),
    given the results of the first ``initial`` of its ``budget`` experiments (space-filling): its next suggestion
    searches a model."""
    from closedloop.campaign import Campaign
    from closedloop.planner import Result, make_planner

    campaign = Campaign.from_yaml_text(f"""
name: c
parameters:
  x1: {{type: continuous, bounds: [0, 1]}}
  x2: {{type: continuous, bounds: [0, 1]}}
{extra}objectives:
  y: {{goal: minimize}}
budget: {{experiments: {budget}}}
planner: {{backend: botorch, initial_experiments: {initial}, seed: 0}}
instrument: {{simulator: simulators.surfaces:Branin}}
""", check_instrument=False)
    planner = make_planner(campaign)
    planner.ingest([Result(p.parameters, {"y": (p.parameters["x1"] - 0.3) ** 2 + p.parameters["x2"]}, i + 1)
                    for i, p in enumerate(planner.suggest(initial))])
    return planner


@pytest.mark.parametrize("constraints", ["", 'constraints:\n  - "x1 + x2 <= 1.2"\n'])
def test_scipy_is_handed_only_options_it_knows_with_or_without_linear_constraints(monkeypatch, constraints: str) -> None:
    """The lighter hit-and-run chain for constrained spaces was first given in ``options``, from where BoTorch also
    handed ``n_thinning`` to SciPy's minimizer ("Unknown solver options"), which changed the proposals of the Branin
    demo, a campaign without constraints."""
    import scipy.optimize

    handed: list[set[str]] = []
    minimize = scipy.optimize.minimize

    def spied(*args, **kwargs):
        handed.append(set(kwargs.get("options") or {}))
        return minimize(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", spied)
    _past_its_initial_design(constraints, 5, 10).suggest(1)
    options = set().union(*handed)
    assert handed and options <= {"maxiter", "maxfun", "ftol", "gtol", "disp", "eps", "maxcor", "maxls", "iprint"}, options


@pytest.mark.parametrize("space", [
    "  x3: {type: continuous, bounds: [0, 1]}\nconstraints:\n  - \"x1 + x2 <= 1.2\"\n",
    "  n: {type: integer, bounds: [1, 6]}\n  kind: {type: categorical, values: [a, b, c]}\n"
    "constraints:\n  - \"x1 + x2 <= 1.2\"\n",
    "  x3: {type: continuous, bounds: [0, 1]}\n  kind: {type: categorical, values: [a, b, c]}\n"
    "constraints:\n  - \"x1 + x2 + x3 == 1\"\n",
], ids=["continuous", "mixed", "mixture-with-a-category"])
def test_no_search_under_linear_constraints_runs_botorchs_long_hit_and_run_chain(monkeypatch, space: str) -> None:
    """``gen_batch_initial_conditions`` burns in 10,000 steps of a chain run as a Python loop, several seconds a
    batch member; a mixed space under linear constraints reached it through BoTorch's relaxed start (10 of 17 s of
    a batch of 4 in the perovskite example campaign)."""
    from botorch.utils.sampling import HitAndRunPolytopeSampler

    burn_ins: list[int] = []
    construct = HitAndRunPolytopeSampler.__init__

    def spied(self, *args, **kwargs):
        burn_ins.append(kwargs.get("n_burnin", 200))
        construct(self, *args, **kwargs)

    monkeypatch.setattr(HitAndRunPolytopeSampler, "__init__", spied)
    proposals = _past_its_initial_design(space, 6, 20).suggest(2)
    assert len(proposals) == 2 and proposals[0].metadata["generator"].startswith("botorch.")
    assert burn_ins and max(burn_ins) <= 200, burn_ins
