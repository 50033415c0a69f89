"""Maximizing an acquisition function over the encoded space, with BoTorch's optimizers.

- continuous spaces (linear constraints included): ``optimize_acqf`` (multi-start L-BFGS-B, SLSQP
  with constraints), ``q`` points jointly;
- integer, discrete and categorical columns: ``optimize_acqf_mixed_alternating`` (alternating
  discrete neighbourhood search and continuous steps), started from Sobol points and perturbed
  experiments where there are linear constraints; integer or discrete columns named in an
  equality constraint are relaxed, as that optimizer allows equalities only on continuous columns;
- finite spaces (every column categorical, integer or discrete, at most ``GRID_LIMIT`` points):
  ``optimize_acqf_discrete`` over every point, as a local search can miss the best of a few thousand;
- candidate tables: ``optimize_acqf_discrete`` over the rows not yet used (a batch over more than
  ``SHORTLIST`` rows or points: over the ``SHORTLIST`` best alone, see :func:`maximize_discrete`).

Every result is decoded exactly by :class:`closedloop.planner.space.Space` afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from botorch.acquisition import AcquisitionFunction, qKnowledgeGradient
from botorch.acquisition.multi_objective import qHypervolumeKnowledgeGradient
from botorch.optim import optimize_acqf, optimize_acqf_discrete
from botorch.optim.initializers import gen_batch_initial_conditions
from botorch.optim.optimize_mixed import optimize_acqf_mixed_alternating

from closedloop.planner.space import Space


def maximize(
    acquisition: AcquisitionFunction,
    space: Space,
    q: int,
    seed: int,
    bounds: torch.Tensor | None = None,
    effort: float = 1.0,
    fixed: dict[int, float] | None = None,
    avoid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The ``q x d`` batch maximizing ``acquisition`` and its value.

    Args:
        bounds: ``2 x d`` box to search (a trust region), the whole space by default.
        effort: scales the number of restarts and raw samples.
        fixed: encoded columns held at a value (the incumbent's categories while closing in).
        avoid: ``n x d`` encoded points not to propose, for a finite space: left out of its enumeration
            unless nothing else is left (a search cannot leave points out: the planner checks what it finds).
    """
    fixed = fixed or {}
    bounds = space.bounds() if bounds is None else bounds
    if space.grid is not None:
        inside = ((space.grid >= bounds[0]) & (space.grid <= bounds[1])).all(-1)
        for i, v in fixed.items():
            inside &= space.grid[:, i] == v
        if avoid is not None and len(avoid):
            fresh = inside & ~_among(space.grid, avoid)
            inside = fresh if fresh.sum() >= q else inside
        return maximize_discrete(acquisition, space.grid[inside], q)
    restarts = max(2, int(round(8 * effort)))
    raw = max(64, int(round(512 * effort)))
    inequalities = space.inequality_constraints or None
    equalities = space.equality_constraints or None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        relaxed = {int(i) for e in space.equality_constraints for i in e[0].tolist()}
        discrete = {i: v for i, v in space.discrete_dims.items() if i not in relaxed and i not in fixed}
        categorical = {i: v for i, v in space.cat_dims.items() if i not in fixed}
        if discrete or categorical:
            candidates, value = optimize_acqf_mixed_alternating(
                acq_function=acquisition,
                bounds=bounds,
                discrete_dims=discrete or None,
                cat_dims=categorical or None,
                fixed_features=fixed or None,
                q=q,
                num_restarts=max(2, restarts // 2),
                raw_samples=raw,
                inequality_constraints=inequalities,
                equality_constraints=equalities,
                options={"maxiter_alternating": 8, "batch_limit": 16, "init_batch_limit": 512,
                         **_quicker_start(bool(inequalities or equalities))},
            )
        else:
            candidates, value = optimize_acqf(
                acq_function=acquisition,
                bounds=bounds,
                q=q,
                num_restarts=restarts,
                raw_samples=raw,
                inequality_constraints=inequalities,
                equality_constraints=equalities,
                fixed_features=fixed or None,
                options={"batch_limit": 16, "init_batch_limit": 512, "maxiter": 200, "seed": seed},
                **_lighter_chain(acquisition, bool(inequalities or equalities)),
            )
    return candidates.detach().reshape(q, -1), float(torch.as_tensor(value).sum())


def _lighter_chain(acquisition: AcquisitionFunction, constrained: bool) -> dict[str, Any]:
    """``optimize_acqf``'s initial conditions drawn from a shorter hit-and-run chain, where linear constraints need one.

    The raw samples in a space with linear constraints come from a hit-and-run chain, a Python loop of burn-in +
    raw samples x thinning steps: by ``gen_batch_initial_conditions``' defaults (10,000 and 32) 26,384 steps, most of
    a suggestion's time. BoTorch's own polytope sampler's defaults (200 and 20) take 10,440: the example mixture
    campaign at 20 results 1.43 -> 0.62 s a suggestion (median of 8 seeds), the same acquisition values to five
    decimals and proposals to 0.001 on all 8. Given as a generator of its own, not in ``options``: from there
    BoTorch also hands ``n_thinning`` to SciPy's minimizer, and that changed the proposals of the Branin demo, which
    has no constraint. The knowledge gradient keeps its own generator.
    """
    if not constrained or isinstance(acquisition, (qKnowledgeGradient, qHypervolumeKnowledgeGradient)):
        return {}

    def initial_conditions(**kwargs: Any) -> torch.Tensor:
        return gen_batch_initial_conditions(**{**kwargs, "options": {**(kwargs.get("options") or {}),
                                                                    "n_burnin": 200, "n_thinning": 20}})

    return {"ic_generator": initial_conditions}


def _quicker_start(constrained: bool) -> dict[str, Any]:
    """Options starting the mixed search from space-filling points and perturbed experiments, where linear constraints
    would start it from a relaxed search's.

    BoTorch starts each member of a batch from a continuous relaxation searched from its raw samples, which under
    linear constraints come from a hit-and-run chain of 10,000 + raw samples x 32 steps that cannot be shortened
    from here (``_lighter_chain`` does not reach it): 10 of 17 s of a batch of 4 in the perovskite example campaign.
    The ``random`` start takes Sobol points, keeps the feasible ones, adds 20 perturbations of each experiment run
    (the "spray", off by default where integers or discrete values are searched) and starts from the best by the
    acquisition; under an equality constraint, where few Sobol points are feasible, BoTorch tops them up from its
    short polytope chain. Measured: the perovskite campaign, 40 experiments in batches of 4 on its noiseless truth,
    seeds 0-7 (two campaigns at a time on 2 cores), median hypervolume 2.22 -> 2.25 (better on 6 seeds, worse on 2),
    thinking 199 -> 88 s a campaign, the longest batch 63 -> 18 s; one search after 12 and after 24 random
    experiments, 4 data seeds: the mixed example campaign, the same acquisition value to 1e-8 and 3.4-4.9 -> 0.5-1.1
    s; a mixture with a categorical and an integer (batch of 4), the same to 0.03 in log space and 12-18 -> 2-5 s;
    the perovskite campaign (batch of 4), log acquisition better on 4 (by up to 0.8), worse on 4 (by up to 2.3),
    17-25 -> 4-11 s.
    """
    return {"initialization_strategy": "random", "num_spray_points": 20} if constrained else {}


def _among(rows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Which of ``rows`` (``r x d``) equal one of ``points`` (``n x d``) to 1e-9."""
    both = torch.round(torch.cat([rows, points]) * 1e9).long()
    ids = torch.unique(both, dim=0, return_inverse=True)[1]
    return torch.isin(ids[: len(rows)], ids[len(rows):])


# a batch's members after the first are chosen among this many rows, those best for the first
SHORTLIST = 4096


def maximize_discrete(acquisition: AcquisitionFunction, choices: torch.Tensor, q: int) -> tuple[torch.Tensor, float]:
    """The ``q`` rows of ``choices`` (``r x d``) chosen jointly (sequential greedy) and their value.

    Each greedy step scores every row with the members chosen so far pending, so a batch over a large
    table costs ``q`` passes over it. Past ``SHORTLIST`` rows one pass scores every row alone, and the
    batch is chosen among the ``SHORTLIST`` best: the first member is the same, and a later one, whose
    value is at most its value alone, comes from below the shortlist only when the chosen ones have
    spoilt the value of every row above it.
    """
    if q > len(choices):
        # fewer points than asked for: every one, then again in the order chosen, rather than a station waiting
        candidates, value = maximize_discrete(acquisition, choices, len(choices))
        return candidates[torch.arange(q) % len(candidates)], value
    if q > 1 and len(choices) > SHORTLIST:
        with torch.no_grad():
            alone = torch.cat([acquisition(chunk.unsqueeze(-2)) for chunk in choices.split(2048)])
        choices = choices[alone.topk(SHORTLIST).indices]
    candidates, value = optimize_acqf_discrete(acquisition, q=q, choices=choices, unique=True)
    return candidates.detach(), float(torch.as_tensor(value).sum())
