"""Models: the posterior mean over every experiment run is taken in bounded pieces past a thousand."""

from __future__ import annotations

import torch
from botorch.models import ModelListGP

from closedloop.planner import models as gp


def test_the_posterior_mean_over_many_experiments_is_the_one_call_mean_in_pieces() -> None:
    # a model list's posterior over n points holds an n x n covariance per output (6 s of a 13 s suggestion at
    # 2,000 experiments with two outcome constraints; 800 MB per output at 10,000): past POSTERIOR_ROWS the
    # mean is taken a piece at a time, and it is the same mean
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(gp.POSTERIOR_ROWS + 700, 3, generator=generator, dtype=torch.double)
    outputs = [x.sum(-1, keepdim=True), (x[:, :1] > 0.5).double()]
    model = ModelListGP(*[gp.conditioned_gp(x[:300], y[:300], {}, gp.fit_gp(x[:60], y[:60], {}, 0)) for y in outputs])
    mean = gp.posterior_mean(model, x)
    assert mean.shape == (len(x), 2)
    with torch.no_grad():
        whole = model.posterior(x).mean
    assert torch.allclose(mean, whole, rtol=0, atol=1e-9)
    # up to POSTERIOR_ROWS it is one call, so campaigns of a lab's usual size get exactly the means they had
    assert torch.equal(gp.posterior_mean(model, x[:gp.POSTERIOR_ROWS]), model.posterior(x[:gp.POSTERIOR_ROWS]).mean.detach())
