"""Acquisition functions: how the model's beliefs turn into a score for candidate experiments."""

from __future__ import annotations

import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.models.model import Model
from botorch.sampling.normal import SobolQMCNormalSampler


def noisy_expected_improvement(
    model: Model, baseline_x: torch.Tensor, pending_x: torch.Tensor | None, seed: int
) -> qLogNoisyExpectedImprovement:
    """``qLogNEI`` over the observed experiments, with experiments in flight as ``X_pending``.

    Args:
        baseline_x: ``n x d`` experiments already observed.
        pending_x: ``p x d`` experiments dispatched but not yet observed, or None.
    """
    return qLogNoisyExpectedImprovement(
        model=model,
        X_baseline=baseline_x,
        X_pending=pending_x if pending_x is not None and len(pending_x) else None,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([256]), seed=seed),
        prune_baseline=True,
    )
