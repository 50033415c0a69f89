"""Acquisition functions: how the model's beliefs turn into a score for candidate experiments.

Model outputs are laid out as ``[objectives..., constrained outputs..., success]`` (see
:class:`closedloop.planner.botorch_backend.Surrogate`); objectives are oriented so larger is better,
other outputs are in their measured units, and ``success`` is a GP on the 0/1 label of whether an
experiment gave a result (present only once an experiment has failed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.acquisition.analytic import LogExpectedImprovement
from botorch.acquisition.knowledge_gradient import qKnowledgeGradient
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.objective import IdentityMCMultiOutputObjective
from botorch.acquisition.objective import GenericMCObjective
from botorch.models.model import Model
from botorch.sampling.normal import SobolQMCNormalSampler
from botorch.utils.transforms import t_batch_mode_transform

from closedloop.planner.models import posterior_mean

Constraint = Callable[[torch.Tensor], torch.Tensor]

# up to this many experiments BoTorch's own pruning of the noisy-EI baseline is cheap (0.011 s at 100 on
# Hartmann6, 0.025 s at 200, 0.21 s at 1,000) and sees every experiment, so campaigns of a lab's usual
# size get exactly its proposals; past it, :func:`contenders` cuts the baseline first
PRUNE_ALL_UP_TO = 100
# with outcome constraints, a failure classifier or several objectives, BoTorch's pruning draws joint samples
# of every output over every experiment, an n x n covariance per output (3.2 GB each at 20,000): at 2,000
# experiments a suggestion of four took 9.3 s with 10 % failed (Hartmann6), 42 s under two outcome
# constraints, 22 s for two objectives (2.3, 7.1 and 16 s with the cut). Past this many the baseline is cut
# first (:func:`contenders`, :func:`front_contenders`); up to it proposals are exactly BoTorch's
PRUNE_ALL_CONSTRAINED_UP_TO = 1000


def output_constraints(
    bounds: list[tuple[int, str, float, float]], success_index: int | None
) -> list[Constraint]:
    """BoTorch constraint callables (feasible where ``<= 0``) on posterior samples ``... x m``.

    Args:
        bounds: ``(output index, op, value, sign)``; ``sign`` turns the model's orientation back into
            measured units (``-1`` for a minimized objective).
        success_index: the output holding the success classifier, or None.
    """
    constraints: list[Constraint] = []
    for index, op, value, sign in bounds:
        if op == "<=":
            constraints.append(lambda y, i=index, v=value, s=sign: s * y[..., i] - v)
        else:
            constraints.append(lambda y, i=index, v=value, s=sign: v - s * y[..., i])
    if success_index is not None:
        constraints.append(lambda y, i=success_index: 0.5 - y[..., i])
    return constraints


def single_objective(
    model: Model,
    baseline_x: torch.Tensor,
    pending_x: torch.Tensor | None,
    constraints: list[Constraint],
    q: int,
    best_f: float,
    seed: int,
    noisy: bool = False,
) -> AcquisitionFunction:
    """Analytic ``LogEI`` for one plain experiment, ``qLogNEI`` for batches, pending, constraints or noise.

    ``LogEI`` against the best posterior mean at the experiments run is the plug-in form of noisy EI;
    it is an order of magnitude cheaper than the Monte-Carlo ``qLogNEI`` and as good for ``q = 1`` on
    nearly noise-free data. On noisy data it overrates repeating the incumbent.

    Args:
        baseline_x: ``n x d`` experiments already observed.
        pending_x: ``p x d`` experiments dispatched but not yet observed, or None.
        noisy: the model infers enough noise that plug-in EI would mislead.
    """
    has_pending = pending_x is not None and len(pending_x) > 0
    if q == 1 and not has_pending and not constraints and model.num_outputs == 1 and not noisy:
        return LogExpectedImprovement(model=model, best_f=best_f)
    if model.num_outputs == 1 and not constraints and len(baseline_x) > PRUNE_ALL_UP_TO:
        baseline_x = contenders(model, baseline_x)
    elif len(baseline_x) > PRUNE_ALL_CONSTRAINED_UP_TO:
        baseline_x = contenders(model, baseline_x, constraints)
    return qLogNoisyExpectedImprovement(
        model=model,
        X_baseline=baseline_x,
        X_pending=pending_x if has_pending else None,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([128]), seed=seed),
        objective=GenericMCObjective(lambda y, X=None: y[..., 0]) if model.num_outputs > 1 else None,
        constraints=constraints or None,
        prune_baseline=True,
        cache_root=True,
    )


def contenders(model: Model, x: torch.Tensor, constraints: list[Constraint] | None = None,
               z: float = 5.0) -> torch.Tensor:
    """The rows of ``x`` (``n x d``) that may be the best feasible experiment: upper bound ``mean + z sd`` of
    the objective (output 0) at least the best lower bound among the experiments surely feasible.

    Noisy EI prunes its baseline to the experiments that are the best in at least one of 2,048 joint
    posterior samples; drawing those over every experiment run was most of the cost of a suggestion once
    the data grew (Hartmann6, 1,000 experiments: 0.41 s median per suggestion, 0.27 s with this bound
    first). The bound uses marginal posteriors only: an experiment it drops is below another by at least
    five standard deviations of their difference, so it could be best in a sample with a probability
    below 3e-7. What the pruning then keeps is the same set, but drawn with other random numbers, so a
    borderline experiment may go the other way: proposals are not identical to pruning everything.

    With ``constraints`` (as :func:`output_constraints` makes them: each monotone in one output) an experiment
    is surely feasible where every constraint holds at both ends of its outputs' bounds, and surely infeasible,
    so dropped, where one fails at both; with none surely feasible every row is kept (BoTorch then keeps the
    one closest to feasible).
    """
    lower, upper = _bounds(model, x, z)
    if not constraints:
        return x[upper[:, 0] >= lower[:, 0].max()]
    feasible, infeasible = _feasibility(constraints, lower, upper)
    if not feasible.any():
        return x
    return x[(upper[:, 0] >= lower[feasible, 0].max()) & ~infeasible]


def front_contenders(model: Model, x: torch.Tensor, n_objectives: int, constraints: list[Constraint] | None = None,
                     z: float = 5.0) -> torch.Tensor:
    """The rows of ``x`` (``n x d``) that may be on the Pareto front of the feasible experiments: those whose
    upper bounds in the first ``n_objectives`` outputs no surely feasible experiment's lower bounds dominate
    (see :func:`contenders`), surely infeasible ones left out."""
    from botorch.utils.multi_objective.pareto import is_non_dominated

    lower, upper = _bounds(model, x, z)
    feasible, infeasible = _feasibility(constraints or [], lower, upper)
    if not feasible.any():
        return x
    floor = lower[feasible, :n_objectives]
    floor = floor[is_non_dominated(floor)]
    # a row is out when some point of the floor's front is at least its upper bound in every objective
    dominated = torch.zeros(len(x), dtype=torch.bool)
    for chunk in floor.split(256):
        dominated |= (chunk.unsqueeze(0) >= upper[:, None, :n_objectives]).all(-1).any(-1)
    return x[~dominated & ~infeasible]


def _bounds(model: Model, x: torch.Tensor, z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal ``mean -/+ z sd`` of every output at each row of ``x``: two ``n x m`` tensors."""
    with torch.no_grad():
        posterior = model.posterior(x.unsqueeze(-2))  # one point at a time: marginals, no joint covariance
        mean = posterior.mean.reshape(len(x), -1)
        sd = posterior.variance.clamp_min(0).sqrt().reshape(len(x), -1)
    return mean - z * sd, mean + z * sd


def _feasibility(constraints: list[Constraint], lower: torch.Tensor,
                 upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows surely feasible and rows surely infeasible, for constraints each monotone in one output (feasible
    where ``<= 0``): their extremes over a row's bounds are at the bounds' two ends."""
    surely, never = torch.ones(len(lower), dtype=torch.bool), torch.zeros(len(lower), dtype=torch.bool)
    for constraint in constraints:
        a, b = constraint(lower), constraint(upper)
        surely &= torch.maximum(a, b) <= 0
        never |= torch.minimum(a, b) > 0
    return surely, never


def knowledge_gradient(
    model: Model, pending_x: torch.Tensor | None, current_value: float, seed: int, fantasies: int
) -> qKnowledgeGradient:
    """One-shot ``qKG``: how much an experiment is expected to raise the best posterior mean.

    Noisy EI values a point by how far its reading may beat the best; the knowledge gradient by what
    its reading would teach about where the optimum is, which is what a noisy campaign reports (the
    models' estimate, not a reading). ``current_value``: the best posterior mean now, over the same box.
    """
    has_pending = pending_x is not None and len(pending_x) > 0
    return qKnowledgeGradient(
        model=model,
        num_fantasies=fantasies,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([fantasies]), seed=seed),
        current_value=torch.tensor(current_value, dtype=torch.double),
        X_pending=pending_x if has_pending else None,
    )


class ConsensusMean(AcquisitionFunction):
    """Several models' posterior means of one objective, each standardized over the experiments run, summed.

    Under noise the experiments near the optimum differ by less than the noise, and one model alone rates
    them partly by where its kernel let a lucky reading pull it; two models of the same data together
    are steadier (see ``BotorchPlanner.best``). Maximized over the space it is the point those models
    together expect to be best: what a noisy campaign confirms with its last experiment.

    Args:
        models: single-output models of the objective, oriented so that larger is better.
        x: ``n x d`` experiments run, over which each model's means are standardized.
    """

    def __init__(self, models: list[Model], x: torch.Tensor):
        super().__init__(models[0])
        self.models = models
        means = [posterior_mean(m, x)[..., 0] for m in models]
        self.centres = [float(m.mean()) for m in means]
        self.spreads = [float(m.std().clamp_min(1e-12)) if len(m) > 1 else 1.0 for m in means]

    @t_batch_mode_transform(expected_q=1)
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """``b x 1 x d`` points to ``b`` scores."""
        return sum((m.posterior(X).mean[..., 0, 0] - c) / s
                   for m, c, s in zip(self.models, self.centres, self.spreads))  # type: ignore[return-value]


def several_objectives(
    model: Model,
    n_objectives: int,
    ref_point: list[float],
    baseline_x: torch.Tensor,
    pending_x: torch.Tensor | None,
    constraints: list[Constraint],
    seed: int,
) -> AcquisitionFunction:
    """``qLogNEHVI`` (BoTorch's recommendation for noisy multi-objective batches) above ``ref_point``."""
    has_pending = pending_x is not None and len(pending_x) > 0
    if len(baseline_x) > PRUNE_ALL_CONSTRAINED_UP_TO:
        baseline_x = front_contenders(model, baseline_x, n_objectives, constraints)
    return qLogNoisyExpectedHypervolumeImprovement(
        model=model,
        ref_point=ref_point,
        X_baseline=baseline_x,
        X_pending=pending_x if has_pending else None,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([64]), seed=seed),
        objective=IdentityMCMultiOutputObjective(outcomes=list(range(n_objectives)))
        if model.num_outputs > n_objectives else None,
        constraints=constraints or None,
        prune_baseline=True,
        cache_root=True,
    )
