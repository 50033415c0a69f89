"""Surrogate models: Gaussian processes fitted to the encoded experiments."""

from __future__ import annotations

import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.input import Normalize
from botorch.models.transforms.outcome import Standardize
from gpytorch.mlls import ExactMarginalLogLikelihood


def fit_gp(train_x: torch.Tensor, train_y: torch.Tensor) -> SingleTaskGP:
    """A ``SingleTaskGP`` with inferred noise fitted by maximum marginal likelihood.

    Args:
        train_x: ``n x d`` encoded experiments in the unit cube.
        train_y: ``n x m`` outcomes, oriented so larger is better.
    """
    model = SingleTaskGP(
        train_x,
        train_y,
        input_transform=Normalize(d=train_x.shape[-1], bounds=_unit_bounds(train_x.shape[-1])),
        outcome_transform=Standardize(m=train_y.shape[-1]),
    )
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def _unit_bounds(d: int) -> torch.Tensor:
    return torch.stack([torch.zeros(d), torch.ones(d)]).double()
