"""The default planner: a Sobol initial design, then a GP with noisy expected improvement."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch.quasirandom import SobolEngine

from closedloop.campaign import Campaign
from closedloop.errors import PlannerError
from closedloop.planner.acquisition import noisy_expected_improvement
from closedloop.planner.base import Proposal, Result
from closedloop.planner.models import fit_gp
from closedloop.planner.optimize import maximize
from closedloop.planner.space import Space


class ObservationLog:
    """Experiments a planner has seen, shared by every backend."""

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self.results: list[Result] = []

    def add(self, results: list[Result]) -> None:
        self.results.extend(results)

    @property
    def completed(self) -> list[Result]:
        return [r for r in self.results if not r.failed]

    def score(self, result: Result) -> float:
        """The single objective oriented so larger is better."""
        name, objective = next(iter(self.campaign.objectives.items()))
        value = float(result.values[name])  # type: ignore[index]
        return value if objective.goal == "maximize" else -value

    def best(self) -> Result | None:
        done = self.completed
        return max(done, key=self.score) if done else None


class SobolSequence:
    """A scrambled Sobol sequence over the encoded space, resumable at any position."""

    def __init__(self, space: Space, seed: int):
        self.space, self.seed = space, seed

    def points(self, start: int, n: int) -> torch.Tensor:
        """Points ``start`` to ``start + n`` of the sequence (``n x d``), snapped to allowed values."""
        engine = SobolEngine(dimension=self.space.dim, scramble=True, seed=self.seed)
        if start:
            engine.fast_forward(start)
        return self.space.snap(engine.draw(n, dtype=torch.double))


class BotorchPlanner:
    """Sobol design for the first experiments, then ``SingleTaskGP`` + ``qLogNoisyExpectedImprovement``.

    Example:
        >>> planner = BotorchPlanner(campaign)          # doctest: +SKIP
        >>> [p.parameters for p in planner.suggest(2)]  # doctest: +SKIP
    """

    backend: ClassVar[str] = "botorch"

    def __init__(self, campaign: Campaign):
        if len(campaign.objectives) != 1:
            raise PlannerError("objectives: the botorch backend handles one objective in this version")
        self.campaign = campaign
        self.space = Space(campaign)
        self.seed = campaign.planner.seed if campaign.planner.seed is not None else 0
        self.log = ObservationLog(campaign)
        self.design = SobolSequence(self.space, self.seed)
        self.initial = campaign.default_initial_experiments()

    def ingest(self, results: list[Result]) -> None:
        self.log.add(results)

    def best(self) -> Result | None:
        return self.log.best()

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        pending = pending or []
        started = len(self.log.results) + len(pending)
        done = self.log.completed
        from_design = max(0, min(n, self.initial - started))
        proposals = [
            Proposal(self.space.decode(x), {"generator": "sobol", "design_index": started + i})
            for i, x in enumerate(self.design.points(started, from_design))
        ]
        if n > from_design:
            if len(done) < 2:
                extra = self.design.points(started + from_design, n - from_design)
                proposals += [Proposal(self.space.decode(x), {"generator": "sobol"}) for x in extra]
            else:
                proposals += self._model_proposals(n - from_design, pending + [p.parameters for p in proposals])
        return proposals

    def _model_proposals(self, q: int, pending: list[dict[str, Any]]) -> list[Proposal]:
        done = self.log.completed
        train_x = self.space.encode_many([r.parameters for r in done])
        train_y = torch.tensor([[self.log.score(r)] for r in done], dtype=torch.double)
        seed = self.seed * 100_003 + len(self.log.results)
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = fit_gp(train_x, train_y)
        fitted = time.perf_counter()
        acquisition = noisy_expected_improvement(model, train_x, self.space.encode_many(pending), seed)
        candidates, value = maximize(acquisition, self.space.bounds(), q, seed)
        meta = {
            "generator": "botorch.qLogNEI",
            "acquisition_value": value,
            "fit_seconds": round(fitted - started, 4),
            "optimize_seconds": round(time.perf_counter() - fitted, 4),
            "observations": len(done),
            "pending": len(pending),
        }
        return [Proposal(self.space.decode(x), meta) for x in candidates]
