"""Surrogate models: Gaussian processes fitted to the encoded experiments.

Fitting hyperparameters is the expensive part of thinking, so it happens only at *checkpoints*: at
every experiment while data are few, then each time the data have grown by ``GROWTH`` (see
:func:`checkpoint`). Between checkpoints the model is rebuilt on all the data with the hyperparameters
of the last fit (a warm start without any optimizer steps). The checkpoint and the subset used to fit
are functions of the data alone, so a planner rebuilt from the store makes the same model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.model import Model
from botorch.models.transforms.input import NumericToCategoricalEncoding
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from gpytorch.constraints import GreaterThan
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.mlls import ExactMarginalLogLikelihood
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.priors import GammaPrior

log = logging.getLogger("closedloop.planner")

# Priors: EDBO's (Shields et al. 2021, as BayBE uses them) for a Matern-5/2 kernel and the noise. On
# Hartmann6 and Branin they beat BoTorch's dimension-scaled defaults and the older Gamma(3, 6) priors
# (tests/planner/quality.py): the generous noise prior keeps the model smooth enough to go on exploring.
# fit at every experiment up to this many, then whenever the data grew by GROWTH
EVERY_UP_TO = 20
GROWTH = 1.15
# exact GPs are conditioned on at most this many experiments (the best and a spread of the rest)
MAX_TRAIN = 400
# fits on at most this many (hyperparameters do not need every point)
MAX_FIT = 150


def checkpoint(n: int) -> int:
    """The number of experiments the hyperparameters are fitted on when ``n`` are known."""
    if n <= EVERY_UP_TO:
        return n
    k = math.floor(math.log(n / EVERY_UP_TO) / math.log(GROWTH) + 1e-9)
    return int(EVERY_UP_TO * GROWTH**k)


def _one_hot(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.nn.functional.one_hot(x.round().long().clamp(0, k - 1), k)


def make_gp(train_x: torch.Tensor, train_y: torch.Tensor, categories: dict[int, int]) -> Model:
    """An unfitted ``SingleTaskGP``; categorical columns enter its Matern kernel one-hot.

    One-hot categories in one kernel (as BayBE and EDBO model them), with priors scaled to the one-hot
    width (:func:`_dimension_scaled`), beat ``MixedSingleTaskGP``'s category-overlap kernel where a
    choice changes the whole response: Suzuki coupling (eight catalysts, three continuous columns,
    40 experiments), best yield found in 15 of 20 seeds against 7; direct arylation (only categories
    and set values), 4 of 10 against 1. On mixed4 (two categories, each shifting or scaling a smooth
    surface) it did a little worse: median log10 regret -2.18 against -2.36 on seeds 0-9, -2.51
    against -2.54 on seeds 10-19.

    Args:
        train_x: ``n x d`` encoded experiments (numeric columns in [0, 1], categories as indices).
        train_y: ``n x 1`` outcomes, oriented so larger is better.
        categories: categorical column -> number of choices.
    """
    encode, width = _one_hot_encoding(train_x.shape[-1], categories)
    if categories:
        # a one-hot space is wide (22 columns for direct arylation's 3 categories and 2 numbers): EDBO's
        # short low-dimensional lengthscales left the model unable to carry what it learned of one
        # choice to the others, so it stopped trying new ligands. A prior scaled with the width
        # (Hvarfner et al. 2024, BayBE's and BoTorch's default) and a small noise prior: 10 seeds of
        # direct arylation, median log10 regret 0.99 -> 0.53 with the choices in a random order per seed
        covar, likelihood = _dimension_scaled(width)
    else:
        covar = ScaleKernel(
            MaternKernel(nu=2.5, ard_num_dims=width, lengthscale_prior=GammaPrior(1.2, 1.1)),
            outputscale_prior=GammaPrior(5.0, 0.5),
        )
        # a low noise floor: noiseless lab simulators and very repeatable instruments need the model to
        # interpolate closely near the optimum
        likelihood = GaussianLikelihood(
            noise_prior=GammaPrior(1.05, 0.5), noise_constraint=GreaterThan(1e-5, transform=None, initial_value=0.1))
    return SingleTaskGP(train_x, train_y, likelihood=likelihood, covar_module=covar,
                        outcome_transform=Standardize(m=1), input_transform=encode)


def _one_hot_encoding(width: int, categories: dict[int, int]) -> tuple[NumericToCategoricalEncoding | None, int]:
    """The input transform that one-hots the categorical columns (None if there are none), and the kernel's width."""
    many = {i: k for i, k in categories.items() if k > 1}
    if not many:
        return None, width
    encode = NumericToCategoricalEncoding(width, many, {i: _one_hot(k) for i, k in many.items()})
    return encode, width + sum(k - 1 for k in many.values())


def make_smooth_gp(train_x: torch.Tensor, train_y: torch.Tensor, categories: dict[int, int]) -> Model:
    """An unfitted ``SingleTaskGP`` with BoTorch's default kernel: squared exponential, priors scaled to the width.

    Smoother than :func:`make_gp`'s Matern kernel, which the search needs rough enough to go on exploring;
    the reported best under noise asks both (see ``BotorchPlanner.best``).
    """
    encode, width = _one_hot_encoding(train_x.shape[-1], categories)
    return SingleTaskGP(train_x, train_y, covar_module=get_covar_module_with_dim_scaled_prior(ard_num_dims=width),
                        outcome_transform=Standardize(m=1), input_transform=encode)


# the one-hot prior's lengthscale mode over Hvarfner's sqrt(width) exp(sqrt(2) - 3): direct arylation (60 seeds,
# reagents blinded), best yield found in 24 / 28 / 30 / 24 seeds and within one yield point in 30 / 36 / 37 / 41
# at 1 / 1.5 / 2 / 3; a finite 4-D mixed grid (21 x 21 x 3 x 4, 30 seeds) the same at 1 and 2 (mean log10
# regret -1.64 and -1.75)
ONE_HOT_LENGTHSCALE = 2.0


def _dimension_scaled(width: int) -> tuple[MaternKernel, GaussianLikelihood]:
    """A Matern-5/2 kernel whose lengthscale prior's mode grows with ``sqrt(width)``, and a small noise prior.

    Gamma priors shaped as the LogNormal priors of Hvarfner et al. 2024 (concentration; the mode
    ``ONE_HOT_LENGTHSCALE`` times theirs), without an output scale as the outcomes are standardized.
    A longer lengthscale lets what one reagent taught the model carry to the others, so the search
    does not settle on the first good reagent (direct arylation: X-Phos has the best mean yield, the
    100 % yield needs CgMe-PPh).
    """
    concentration = 3.0
    mode = ONE_HOT_LENGTHSCALE * math.exp(math.sqrt(2) - 3) * math.sqrt(width)
    lengthscale = GammaPrior(concentration, (concentration - 1) / mode)
    kernel = MaternKernel(nu=2.5, ard_num_dims=width, lengthscale_prior=lengthscale,
                          lengthscale_constraint=GreaterThan(2.5e-2, transform=None, initial_value=lengthscale.mode))
    noise = GammaPrior(2.0, 1.0 / math.exp(-5.0))  # mode exp(-5)
    likelihood = GaussianLikelihood(noise_prior=noise,
                                    noise_constraint=GreaterThan(1e-5, transform=None, initial_value=noise.mode))
    return kernel, likelihood


def output_scale(y: torch.Tensor) -> float:
    """The unit (a power of ten) in which the models see an output's values ``y``; 1 for ordinary values.

    A GP's posterior is returned in the units it was given, and BoTorch and GPyTorch hold absolute floors
    there (a variance of at least 1e-10, no standardizing below a spread of 1e-8): outputs of order 1e-12
    (a current in amperes) left the model seeing only noise, and two objectives of order 1e12 made every
    hypervolume improvement NaN, so the suggestion failed. Outputs that spread between 1e-3 and 1e3 keep
    unit 1, so the proposals of every campaign in those ranges (and their replay from the store) are
    exactly what they were.
    """
    finite = y[torch.isfinite(y)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    # the spread of values over their largest: squaring readings above ~1e154 overflows to infinity
    spread = largest * float((finite / largest).std(correction=0)) if finite.numel() > 1 and largest > 0 else 0.0
    if spread == 0.0:
        spread = largest
    if spread == 0.0 or 1e-3 <= spread <= 1e3:
        return 1.0
    return 10.0 ** round(math.log10(spread))


def hyperparameters(model: Model) -> dict[str, torch.Tensor]:
    """The fitted hyperparameters of ``model``, without data-dependent transforms or caches."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith(("outcome_transform", "input_transform")) and "train" not in k}


def fit_gp(train_x: torch.Tensor, train_y: torch.Tensor, categories: dict[int, int], seed: int,
           make: Callable[..., Model] = make_gp) -> dict[str, torch.Tensor]:
    """Hyperparameters of the GP ``make`` builds, fitted by maximum a posteriori marginal likelihood
    (deterministic for a seed)."""
    model = make(train_x, train_y, categories)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        except Exception as exc:  # noqa: BLE001 - a failed fit keeps the prior's hyperparameters, the loop goes on
            log.warning("GP fit on %d experiments failed (%s); keeping the prior's hyperparameters", len(train_x), exc)
    return hyperparameters(model)


def conditioned_gp(
    train_x: torch.Tensor, train_y: torch.Tensor, categories: dict[int, int], state: dict[str, torch.Tensor],
    make: Callable[..., Model] = make_gp,
) -> Model:
    """A GP built by ``make`` on ``train_x``/``train_y`` with the given hyperparameters, in eval mode."""
    model = make(train_x, train_y, categories)
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


# rows per posterior call over the experiments run: a model list's posterior (failures, outcome constraints,
# several objectives) holds each output's covariance over all its points, an n x n matrix per output: at 2,000
# experiments with two outcome constraints the incumbent's mean took 6.1 s of a 13 s suggestion. Up to this
# many it is one call, as it always was
POSTERIOR_ROWS = 1000


def posterior_mean(model: Model, x: torch.Tensor) -> torch.Tensor:
    """``model``'s posterior mean at ``x`` (``n x d``): ``n x m``, ``POSTERIOR_ROWS`` rows at a time."""
    with torch.no_grad():
        if len(x) <= POSTERIOR_ROWS:
            return model.posterior(x).mean
        return torch.cat([model.posterior(rows).mean for rows in x.split(POSTERIOR_ROWS)])


def training_subset(scores: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of at most ``limit`` experiments: the best half by ``scores`` and an even spread of the rest.

    Args:
        scores: ``n`` oriented objective values (larger is better).
    """
    n = scores.shape[0]
    if n <= limit:
        return torch.arange(n)
    order = torch.argsort(scores, descending=True, stable=True)
    best = order[: limit // 2]
    rest = torch.sort(order[limit // 2:]).values
    spread = rest[torch.linspace(0, len(rest) - 1, limit - limit // 2).round().long()]
    return torch.sort(torch.cat([best, spread])).values
