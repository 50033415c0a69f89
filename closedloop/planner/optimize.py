"""Maximizing an acquisition function over the encoded space."""

from __future__ import annotations

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.optim import optimize_acqf


def maximize(acquisition: AcquisitionFunction, bounds: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, float]:
    """The ``q x d`` batch maximizing ``acquisition`` within ``bounds`` (``2 x d``), and its value."""
    torch.manual_seed(seed)
    candidates, value = optimize_acqf(
        acq_function=acquisition,
        bounds=bounds,
        q=q,
        num_restarts=10,
        raw_samples=512,
        options={"batch_limit": 5, "maxiter": 200, "seed": seed},
    )
    return candidates.detach(), float(value.sum())
