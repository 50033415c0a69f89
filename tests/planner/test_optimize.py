"""Maximizing the acquisition: a batch over a large table is chosen from a shortlist, not q passes over it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from botorch.utils import sampling

from closedloop.planner import Result, make_planner
from closedloop.planner import models as gp
from closedloop.planner import optimize
from closedloop.planner.acquisition import single_objective
from tests.planner.conftest import campaign


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
    chosen, _ = gp.in_planner_numerics(optimize.maximize_discrete)(acquisition, choices, 4)
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
    chosen, _ = gp.in_planner_numerics(optimize.maximize_discrete)(acquisition, choices, 1 if rows > 200 else 4)
    if rows > 200:
        assert evaluated[0] == rows
    else:
        assert evaluated[0] > 3 * rows  # a greedy pass over every row for each member
    assert chosen.shape[0] == (1 if rows > 200 else 4)


@pytest.mark.parametrize("solvent", [False, True])
def test_a_mixture_suggestion_draws_its_raw_samples_from_a_short_chain(monkeypatch, solvent: bool) -> None:
    """A mixture (``a + b + c == 1``) is sampled by hit-and-run, a Python loop: BoTorch's default chain of 10,000
    burn-in steps and 32 per raw sample was 26,000 steps, about 2 s of each suggestion, with a categorical too."""
    steps = [0]
    run_chain = sampling.sample_polytope

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        out = run_chain(*args, **kwargs)
        steps[0] += int(kwargs.get("n0", 100)) + len(out) * int(kwargs.get("n_thinning", 1))
        return out

    monkeypatch.setattr(sampling, "sample_polytope", counted)
    fractions = "a: {type: continuous, bounds: [0, 1]}\nb: {type: continuous, bounds: [0, 1]}\n" \
                "c: {type: continuous, bounds: [0, 1]}"
    c = campaign(fractions + ("\ns: {type: categorical, values: [w, e, t]}" if solvent else ""),
                 extra='constraints: ["a + b + c == 1"]', initial=4)
    planner = make_planner(c)
    rng = np.random.default_rng(0)
    for trial in range(8):
        a, b = rng.dirichlet([1, 1, 1])[:2]
        p: dict = {"a": float(a), "b": float(b), "c": float(1 - a - b)} | ({"s": "wet"[trial % 3]} if solvent else {})
        planner.ingest([Result(p, {"y": (p["a"] - 0.5) ** 2 + p["b"]}, trial)])
    steps[0] = 0
    proposal = planner.suggest(1)[0]
    assert proposal.metadata["generator"].startswith("botorch.")
    assert abs(proposal.parameters["a"] + proposal.parameters["b"] + proposal.parameters["c"] - 1) <= 1e-9
    assert 0 < steps[0] <= 10_000
