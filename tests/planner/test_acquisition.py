"""Acquisition: the noisy-EI baseline is cut to its contenders before BoTorch prunes it."""

from __future__ import annotations

import torch
from botorch.acquisition.utils import prune_inferior_points

from closedloop.planner import models as gp
from closedloop.planner.acquisition import PRUNE_ALL_UP_TO, contenders, single_objective


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
