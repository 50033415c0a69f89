"""Baseline planners: a Sobol sequence and uniform random sampling.

They ignore the results when choosing, so outcome constraints and several objectives cost them
nothing: they accept every campaign, and ``best()`` / ``pareto_front()`` count only feasible
experiments, as the Bayesian backends do. Linear constraints and candidate tables are honoured
exactly, through the same :class:`~closedloop.planner.space.Space` the BoTorch backend uses.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch

from closedloop.campaign import Campaign
from closedloop.planner.base import Proposal, Result, proposal_count
from closedloop.planner.numerics import PLANNER_THREADS, in_planner_numerics
from closedloop.planner.observations import ObservationLog, check_pending
from closedloop.planner.space import Space, candidates_repeat, table_order


# positions of the sequence looked through for a point of a finite space not yet run, beyond the ones asked for
LOOKAHEAD = 64


class SobolPlanner:
    """Every proposal is the next point of a scrambled Sobol sequence (or polytope sample under constraints).

    Example:
        >>> planner = SobolPlanner(campaign)   # doctest: +SKIP
        >>> planner.suggest(4)                 # doctest: +SKIP
    """

    backend: ClassVar[str] = "sobol"
    several_objectives: ClassVar[bool] = True
    outcome_constraints: ClassVar[bool] = True
    linear_constraints: ClassVar[bool] = True
    candidate_tables: ClassVar[bool] = True
    # suggest thinks in in_planner_numerics: the thread count of every decision (the daemon's filler's too)
    torch_threads: ClassVar[int] = PLANNER_THREADS

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self.space = Space(campaign)
        self.log = ObservationLog(campaign)
        self.seed = campaign.planner.seed or 0
        # the experiments run, kept as results come: comparing the sequence's next points with every result anew
        # made each proposal slower than the last (3 s for 20 proposals with 100 000 results)
        self._run: set[tuple] = set()

    def ingest(self, results: list[Result]) -> None:
        self.log.add(results)
        self._run.update(self.space.key(r.parameters) for r in results)

    @in_planner_numerics
    def best(self) -> Result | None:
        if len(self.log.objectives) > 1:
            front = self.log.pareto_front()
            return max(front, key=self.log.score) if front else None
        return self.log.best()

    def pareto_front(self) -> list[Result]:
        return self.log.pareto_front()

    def hypervolume(self) -> float:
        return self.log.hypervolume()

    @in_planner_numerics
    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        n = proposal_count(n)
        check_pending(self.campaign, pending or [])
        start = len(self.log.results) + len(pending or [])
        if self.space.candidates is not None:
            return self._rows(n, pending or [])
        if self.space.grid is not None:
            return self._fresh(start, n, pending or [])
        points = [self.space.decode(x) for x in self._points(start, n)]
        # The position counts results and pending experiments; an abandoned one (its station killed mid-run)
        # is neither, so the count falls back and the sequence gives a point already run again (a station
        # killed during trial 4 made trials 5 and 6 the same experiment)
        in_flight = self._in_flight(pending or [])
        if any((key := self.space.key(p)) in self._run or key in in_flight for p in points):
            return self._fresh(start, n, pending or [])
        return [Proposal(point, {"generator": self.backend}) for point in points]

    def _fresh(self, start: int, n: int, pending: list[dict[str, Any]]) -> list[Proposal]:
        """``n`` points of a finite space (or of a continuous one whose sequence repeats an experiment after an
        abandoned one), passing over those run, in flight or earlier in the batch: rounded
        to a few values, random draws and Sobol points meet (random gave one of four points twice while
        another had never run). Past ``LOOKAHEAD`` positions the points not yet run are taken in the space's
        order; once none is left, points run again rather than a station waiting."""
        seen = self._run | self._in_flight(pending)
        window = [self.space.decode(x) for x in self._points(start, n + LOOKAHEAD)]
        grid = self.space.grid if self.space.grid is not None else ()  # a continuous space: the window suffices
        picked: list[dict[str, Any]] = []
        for point in itertools.chain(window, (self.space.decode(x) for x in grid)):  # the grid only as needed
            if len(picked) == n:
                break
            key = self.space.key(point)
            if key not in seen:
                seen.add(key)
                picked.append(point)
        picked += window[: n - len(picked)]
        return [Proposal(point, {"generator": self.backend}) for point in picked]

    def _in_flight(self, pending: list[dict[str, Any]]) -> set[tuple]:
        """The keys of the experiments in flight. An empty dict only holds a place in the sequence: the daemon's
        filler counts the proposals it made so (``pending=[{}] * filled``), and it has no parameters to compare."""
        return {self.space.key(p) for p in pending if p}

    def _points(self, start: int, n: int) -> torch.Tensor:
        return self.space.sample(n, self.seed, start)

    def _rows(self, n: int, pending: list[dict[str, Any]]) -> list[Proposal]:
        rows = self.space.candidates
        assert rows is not None
        taken: dict[tuple, int] = {}
        for p in [r.parameters for r in self.log.results] + [p for p in pending if p]:
            k = self.space.key(p)
            taken[k] = taken.get(k, 0) + 1
        free = []
        for i, row in enumerate(rows):
            k = self.space.key(row)
            if taken.get(k, 0) > 0 and not candidates_repeat(self.campaign):
                taken[k] -= 1
            else:
                free.append(i)
        start = len(self.log.results) + len(pending)
        if self.backend == "random":
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 7919 + start)).tolist()
        else:
            order = table_order(self.campaign, len(rows), self.seed, start)
        free_rows = set(free)
        chosen = [i for i in order if i in free_rows][:n]
        return [Proposal(dict(rows[i]), {"generator": self.backend, "candidate_row": i}) for i in chosen]


class RandomPlanner(SobolPlanner):
    """Uniform random proposals, reproducible from the seed and the number of experiments."""

    backend: ClassVar[str] = "random"

    def _points(self, start: int, n: int) -> torch.Tensor:
        if self.space.has_constraints:
            # uniform over the constrained polytope: hit-and-run from a seed per position
            return self.space.sample(n, self.seed * 7919 + start, 0)
        generator = torch.Generator().manual_seed(self.seed * 7919 + start)
        u = torch.rand(n, self.space.dim, generator=generator, dtype=torch.double)
        return self.space.snap(self.space.from_uniform(u))
