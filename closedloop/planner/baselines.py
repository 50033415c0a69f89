"""Baseline planners: a Sobol sequence and uniform random sampling."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from closedloop.campaign import Campaign
from closedloop.planner.base import Proposal, Result
from closedloop.planner.botorch_backend import ObservationLog, SobolSequence
from closedloop.planner.space import Space


class SobolPlanner:
    """Every proposal is the next point of a scrambled Sobol sequence."""

    backend: ClassVar[str] = "sobol"

    def __init__(self, campaign: Campaign):
        self.space = Space(campaign)
        self.log = ObservationLog(campaign)
        self.design = SobolSequence(self.space, campaign.planner.seed or 0)

    def ingest(self, results: list[Result]) -> None:
        self.log.add(results)

    def best(self) -> Result | None:
        return self.log.best()

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        start = len(self.log.results) + len(pending or [])
        return [Proposal(self.space.decode(x), {"generator": "sobol"}) for x in self.design.points(start, n)]


class RandomPlanner(SobolPlanner):
    """Uniform random proposals, reproducible from the seed and the number of experiments."""

    backend: ClassVar[str] = "random"

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        start = len(self.log.results) + len(pending or [])
        generator = torch.Generator().manual_seed((self.design.seed or 0) * 7919 + start)
        x = self.space.snap(torch.rand(n, self.space.dim, generator=generator, dtype=torch.double))
        return [Proposal(self.space.decode(row), {"generator": "random"}) for row in x]
