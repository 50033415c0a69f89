"""What a planner has seen: results in a canonical order, objectives oriented, feasibility, the front.

Shared by every backend so that ``best()``, ``pareto_front()`` and ``hypervolume()`` mean the same
thing whichever planner proposed the experiments.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from closedloop.campaign import CategoricalParameter, Campaign, ContinuousParameter, DiscreteParameter, IntegerParameter
from closedloop.errors import PlannerError
from closedloop.planner.base import Result


class ObservationLog:
    """Experiments a planner has seen.

    Results are kept in a canonical order, by trial number where known and then in the order they
    arrived, so that a planner rebuilt from the store (which lists trials by number) sees the same data
    as the live planner that received them one by one.
    """

    def __init__(self, campaign: Campaign):
        self.campaign = campaign
        self.objectives = list(campaign.objectives)
        self.signs = [1.0 if o.goal == "maximize" else -1.0 for o in campaign.objectives.values()]
        self.bounds = campaign.output_bounds
        self.results: list[Result] = []
        self._arrival = 0
        self._keys: list[tuple[float, int]] = []

    def add(self, results: list[Result]) -> None:
        """Add ``results``, all or none: one whose parameters cannot be an experiment of this campaign
        raises :class:`PlannerError` (taken in, it would break every later suggestion)."""
        check_results(self.campaign, results)
        for r in results:
            key = (float(r.trial) if r.trial is not None else math.inf, self._arrival)
            self._arrival += 1
            # insertion keeps the canonical order without re-sorting everything
            i = len(self._keys)
            while i > 0 and self._keys[i - 1] > key:
                i -= 1
            self._keys.insert(i, key)
            self.results.insert(i, r)

    def usable(self, result: Result) -> bool:
        """Whether a result measured every output the campaign needs, as finite numbers."""
        if result.values is None:
            return False
        for name in self.campaign.outputs:
            v = result.values.get(name)
            # numbers.Real, not (int, float): a NumPy reading from a driver is a measurement, not a failure
            if v is None or not finite_number(v):
                return False
        return True

    @property
    def completed(self) -> list[Result]:
        return [r for r in self.results if self.usable(r)]

    def feasible(self, result: Result) -> bool:
        """Usable and within every outcome constraint."""
        return self.usable(result) and all(b.satisfied(float(result.values[b.output])) for b in self.bounds)  # type: ignore[index]

    def score(self, result: Result) -> float:
        """The first objective oriented so larger is better."""
        return self.signs[0] * float(result.values[self.objectives[0]])  # type: ignore[index]

    def oriented(self, result: Result) -> list[float]:
        """Every objective oriented so larger is better."""
        return [s * float(result.values[n]) for s, n in zip(self.signs, self.objectives)]  # type: ignore[index]

    def best(self) -> Result | None:
        """The feasible experiment with the best reading (single objective)."""
        done = [r for r in self.results if self.feasible(r)]
        return max(done, key=self.score) if done else None

    def reference_point(self) -> list[float]:
        """Oriented reference point: the campaign's thresholds, inferred from the data where missing."""
        thresholds = [o.threshold for o in self.campaign.objectives.values()]
        ref = [s * t if t is not None else math.nan for s, t in zip(self.signs, thresholds)]
        if any(math.isnan(v) for v in ref):
            from botorch.utils.multi_objective.hypervolume import infer_reference_point

            ys = [self.oriented(r) for r in self.results if self.feasible(r)] or [
                self.oriented(r) for r in self.completed]
            if ys:
                inferred = infer_reference_point(torch.tensor(ys, dtype=torch.double)).tolist()
            else:
                inferred = [0.0] * len(ref)
            ref = [v if not math.isnan(v) else w for v, w in zip(ref, inferred)]
        return ref

    def pareto_front(self) -> list[Result]:
        """Non-dominated feasible experiments, in experiment order."""
        from botorch.utils.multi_objective.pareto import is_non_dominated

        done = [r for r in self.results if self.feasible(r)]
        if not done:
            return []
        y = torch.tensor([self.oriented(r) for r in done], dtype=torch.double)
        mask = is_non_dominated(y, deduplicate=True)
        return [r for r, keep in zip(done, mask.tolist()) if keep]

    def hypervolume(self, reference: list[float] | None = None) -> float:
        """Hypervolume dominated by the feasible experiments above the reference point (oriented).

        Several objectives only: with one, :class:`PlannerError` says so (BoTorch's partitioning had failed
        with ``IndexError: max(): Expected reduction dim 1 to have non-zero size``)."""
        if len(self.objectives) < 2:
            raise PlannerError(f"hypervolume: the campaign has one objective ({self.objectives[0]!r}); a hypervolume "
                               "measures a Pareto front of several (best() is the best experiment of one)")
        from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning

        done = [r for r in self.results if self.feasible(r)]
        if not done:
            return 0.0
        ref = torch.tensor(reference if reference is not None else self.reference_point(), dtype=torch.double)
        y = torch.tensor([self.oriented(r) for r in done], dtype=torch.double)
        return float(DominatedPartitioning(ref_point=ref, Y=y).compute_hypervolume())


def finite_number(value: object) -> bool:
    """Whether ``value`` is a real number that is a finite float; an int past float's range (``10**400``, an
    exact count) is not one, where ``float()`` and ``math.isfinite`` raise OverflowError."""
    if not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def parameter_problem(campaign: Campaign, parameters: dict) -> str | None:
    """Why ``parameters`` cannot be an experiment of ``campaign`` (None if they can): a varied parameter
    missing, an unknown choice, a value that is not a number, or one outside the parameter's limits."""
    for name, p in campaign.tunable_parameters.items():
        if name not in parameters:
            return f"parameter {name!r} is missing"
        v = parameters[name]
        if isinstance(p, CategoricalParameter):
            # values read back from a CSV or JSON may have lost their type ("1" for 1), as Space reads them
            if v not in p.values and str(v) not in {str(a) for a in p.values}:
                return f"{name}={v!r} is not one of {p.values}"
            continue
        if isinstance(v, bool) or not finite_number(v):
            return f"{name}={v!r} is not a number"
        x = float(v)
        if isinstance(p, DiscreteParameter):
            if not any(math.isclose(x, float(a), rel_tol=1e-9, abs_tol=1e-300) for a in p.values):
                return f"{name}={v!r} is not one of {p.values}"
            continue
        if isinstance(p, IntegerParameter) and x != round(x):
            return f"{name}={v!r} is not an integer"
        if isinstance(p, (ContinuousParameter, IntegerParameter)):
            lo, hi = float(p.bounds[0]), float(p.bounds[1])
            slack = 1e-9 * (hi - lo)
            if not lo - slack <= x <= hi + slack:
                return f"{name}={v!r} is outside [{p.bounds[0]}, {p.bounds[1]}]"
    return None


def result_problem(campaign: Campaign, result: Result) -> str | None:
    """Why ``result`` cannot be taken in (None if it can): its parameters (:func:`parameter_problem`), values that
    are not a mapping of output names (``1.5`` for ``{"y": 1.5}``), or a trial number that is not a number. Taken
    in, each had broken every later ``best()`` or suggestion; a value that is not a finite number is a failed
    measurement, not a problem."""
    if not isinstance(result, Result):
        return f"{type(result).__name__} is not a Result"
    if not isinstance(result.parameters, Mapping):
        return f"parameters {str(result.parameters)[:80]} are not a mapping of names to values"
    values = result.values
    if values is not None and (not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values)):
        return (f"values {str(values)[:80]} are not a mapping of output names to readings (None for a failed "
                "experiment)")
    if result.trial is not None and not (finite_number(result.trial) and not isinstance(result.trial, bool)):
        return f"trial {result.trial!r} is not a number"
    return parameter_problem(campaign, result.parameters)


def check_results(campaign: Campaign, results: list[Result]) -> None:
    """Raise :class:`PlannerError` for the first result that cannot be taken in; all or none."""
    for k, r in enumerate(results):
        problem = result_problem(campaign, r)
        if problem is not None:
            trial = f" (trial {r.trial})" if isinstance(r, Result) and r.trial is not None else ""
            raise PlannerError(f"result {k}{trial}: {problem}; none of the {len(results)} results was taken")


def check_pending(campaign: Campaign, pending: list[dict]) -> None:
    """Raise :class:`PlannerError` for an experiment in flight that is not one of the campaign's: a varied parameter
    missing (it had raised ``KeyError`` deep in a backend), a value that is not a number or outside its limits (NaN
    failed in the model's linear algebra, None in a float conversion). An empty dict only holds a place: the
    daemon's filler counts its proposals so (``pending=[{}] * filled``)."""
    for k, parameters in enumerate(pending):
        if not isinstance(parameters, Mapping):
            raise PlannerError(f"pending {k}: {str(parameters)[:80]!r} is not a mapping of parameter names to values")
        if not parameters:
            continue
        problem = parameter_problem(campaign, parameters)
        if problem is not None:
            hint = " (an experiment in flight names every varied parameter)" if problem.endswith("is missing") else ""
            raise PlannerError(f"pending {k}: {problem}{hint}")
