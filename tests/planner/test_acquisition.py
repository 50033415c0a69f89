"""Acquisition: the noisy-EI baseline is cut to its contenders before BoTorch prunes it."""

from __future__ import annotations

import torch
from botorch.acquisition.multi_objective.utils import prune_inferior_points_multi_objective
from botorch.acquisition.objective import GenericMCObjective
from botorch.acquisition.utils import prune_inferior_points
from botorch.models import ModelListGP

from closedloop.planner import models as gp
from closedloop.planner.acquisition import (PRUNE_ALL_CONSTRAINED_UP_TO, PRUNE_ALL_UP_TO, contenders, front_contenders,
                                             output_constraints, several_objectives, single_objective)


def _noisy_model(n: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=generator, dtype=torch.double)
    truth = -((x - 0.3) ** 2).sum(-1, keepdim=True) * 10  # one peak at (0.3, 0.3)
    y = truth + 0.3 * torch.randn(n, 1, generator=generator, dtype=torch.double)
    state = gp.fit_gp(x, y, {}, seed)
    return gp.conditioned_gp(x, y, {}, state), x


def test_contenders_keep_every_experiment_the_pruning_keeps_and_drop_others() -> None:
    for seed in range(3):
        model, x = _noisy_model(80, seed)
        kept = contenders(model, x)
        with torch.no_grad():
            mean = model.posterior(x).mean.reshape(-1)
        assert any(torch.equal(row, x[int(torch.argmax(mean))]) for row in kept)  # the model's incumbent stays
        # the experiment the model rates worst (far from the peak, its mean some 8 below the best) is cut
        assert not any(torch.equal(row, x[int(torch.argmin(mean))]) for row in kept)
        torch.manual_seed(seed)
        pruned = prune_inferior_points(model, x, num_samples=2048)
        for row in pruned:
            assert any(torch.equal(row, k) for k in kept), "an experiment the pruning keeps was dropped"


def test_noisy_ei_scores_against_the_contenders_only_past_a_lab_sized_campaign() -> None:
    model, x = _noisy_model(PRUNE_ALL_UP_TO + 50, 0)
    acquisition = single_objective(model, x, None, [], 1, 0.0, seed=0, noisy=True)
    assert type(acquisition).__name__ == "qLogNoisyExpectedImprovement"
    near_peak = contenders(model, x)
    assert len(near_peak) < len(x)
    assert all(any(torch.equal(row, k) for k in near_peak) for row in acquisition.X_baseline)
    # with an outcome constraint the best feasible experiment may be far below the peak (here: feasible only
    # where y <= -5), so the whole baseline goes to BoTorch's constrained pruning
    constrained = single_objective(model, x, None, [lambda y: y[..., 0] + 5.0], 1, 0.0, seed=0, noisy=True)
    assert any(not any(torch.equal(row, k) for k in near_peak) for row in constrained.X_baseline)
    with torch.no_grad():
        value = acquisition(x[:5].unsqueeze(1))
    assert torch.isfinite(value).all()


def test_up_to_a_lab_sized_campaign_the_baseline_is_botorchs_own_pruning_of_every_experiment() -> None:
    model, x = _noisy_model(PRUNE_ALL_UP_TO, 1)
    torch.manual_seed(7)
    acquisition = single_objective(model, x, None, [], 1, 0.0, seed=0, noisy=True)
    torch.manual_seed(7)
    assert torch.equal(acquisition.X_baseline, prune_inferior_points(model, x, num_samples=2048))


def _constrained_models(n: int, seed: int) -> tuple[ModelListGP, torch.Tensor, list]:
    """A noisy objective peaked at (0.3, 0.3) and a success classifier (0/1, failing where x1 > 0.8), as the
    planner models them, with the constraint the planner puts on the classifier."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=generator, dtype=torch.double)
    y = -((x - 0.3) ** 2).sum(-1, keepdim=True) * 10 + 0.3 * torch.randn(n, 1, generator=generator, dtype=torch.double)
    ok = (x[:, :1] <= 0.8).double()
    models = [gp.conditioned_gp(x, v, {}, gp.fit_gp(x[:80], v[:80], {}, seed)) for v in (y, ok)]
    return ModelListGP(*models), x, output_constraints([], success_index=1)


def test_with_failures_contenders_keep_every_experiment_the_constrained_pruning_keeps() -> None:
    for seed in range(2):
        model, x, constraints = _constrained_models(150, seed)
        kept = contenders(model, x, constraints)
        assert len(kept) < len(x)
        assert not (kept[:, 0] > 0.9).any()  # surely failing experiments are out, however good their objective
        torch.manual_seed(seed)
        objective = GenericMCObjective(lambda y, X=None: y[..., 0])
        pruned = prune_inferior_points(model, x, objective=objective, constraints=constraints, num_samples=2048)
        for row in pruned:
            assert any(torch.equal(row, k) for k in kept), "an experiment the pruning keeps was dropped"


def test_past_a_thousand_experiments_a_constrained_noisy_ei_prunes_its_contenders_only() -> None:
    # BoTorch's own pruning draws joint samples of every output over every experiment: 11 s of a suggestion at
    # 2,000 experiments with 10 % failed, an n x n covariance per output; past the limit it sees the contenders
    model, x, constraints = _constrained_models(PRUNE_ALL_CONSTRAINED_UP_TO + 100, 2)
    near = contenders(model, x, constraints)
    assert len(near) < len(x) / 4
    acquisition = single_objective(model, x, None, constraints, 1, 0.0, seed=0, noisy=True)
    assert all(any(torch.equal(row, k) for k in near) for row in acquisition.X_baseline)
    with torch.no_grad():
        assert torch.isfinite(acquisition(x[:5].unsqueeze(1))).all()


def test_front_contenders_keep_every_experiment_the_pareto_pruning_keeps() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(150, 2, generator=generator, dtype=torch.double)
    f1 = -x[:, :1] + 0.05 * torch.randn(150, 1, generator=generator, dtype=torch.double)
    f2 = -(1 - x[:, :1]) ** 2 - x[:, 1:] + 0.05 * torch.randn(150, 1, generator=generator, dtype=torch.double)
    model = ModelListGP(*[gp.conditioned_gp(x, f, {}, gp.fit_gp(x[:80], f[:80], {}, 3)) for f in (f1, f2)])
    kept = front_contenders(model, x, 2)
    assert len(kept) < len(x)
    torch.manual_seed(3)
    pruned = prune_inferior_points_multi_objective(model, x, ref_point=torch.tensor([-1.5, -2.5]), num_samples=2048)
    for row in pruned:
        assert any(torch.equal(row, k) for k in kept), "an experiment the pruning keeps was dropped"
    acquisition = several_objectives(model, 2, [-1.5, -2.5], x, None, [], seed=0)
    assert len(acquisition.X_baseline) <= len(x)
