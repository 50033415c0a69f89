"""Any closedloop planner as a ``gest_api.Generator``, so Xopt, optimas and libEnsemble can drive it.

The gest-api standard (``gest_api.generator.Generator``) has the verbs ``suggest(num_points) ->
list[dict]``, ``ingest(list[dict])`` and ``finalize()``, with the problem described by a ``VOCS``
(variables, objectives, constraints, constants, observables). :class:`PlannerGenerator` turns the
VOCS into a :class:`~closedloop.campaign.Campaign`, builds the planner its backend names, and
translates the verbs. Points it suggested and has not yet seen back are the planner's pending
experiments, so a tool that evaluates asynchronously never gets the same point twice.

Example:
    >>> from gest_api.vocs import VOCS
    >>> vocs = VOCS(variables={"x": [0.0, 1.0], "c": {"a", "b"}}, objectives={"f": "MINIMIZE"})
    >>> generator = PlannerGenerator(vocs, backend="sobol", seed=0)
    >>> [point] = generator.suggest(1)
    >>> sorted(point)
    ['_id', 'c', 'x']
    >>> point["f"] = point["x"] ** 2
    >>> generator.ingest([point])
    >>> generator.finalize()
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from typing import Any

from gest_api import Generator
from gest_api.vocs import (
    VOCS,
    BoundsConstraint,
    ContextualVariable,
    ContinuousVariable,
    DiscreteVariable,
    GreaterThanConstraint,
    LessThanConstraint,
    MaximizeObjective,
    MinimizeObjective,
)

from closedloop.campaign import Campaign
from closedloop.errors import CampaignError, ClosedLoopError, PlannerError
from closedloop.planner import Planner, Result, make_planner

__all__ = ["PlannerGenerator", "campaign_from_vocs"]

# gest-api has no instrument: the caller evaluates points. The campaign still names who does.
_EXTERNAL = "closedloop.planner.gest:PlannerGenerator"


class PlannerGenerator(Generator):
    """A gest-api generator backed by a closedloop planner (``botorch`` by default).

    Args:
        vocs: the problem, in gest-api's VOCS.
        backend: the planner backend (``botorch``, ``ax``, ``sobol``, ``random``).
        seed: the planner's seed.
        budget: the expected number of evaluations (sizes the initial design).
        planner: an already built planner to wrap instead (its campaign must match ``vocs``).
    """

    returns_id = True

    def __init__(self, vocs: VOCS, backend: str = "botorch", seed: int | None = None, budget: int = 100,
                 planner: Planner | None = None):
        super().__init__(vocs)
        self.vocs = vocs
        try:
            self.campaign = campaign_from_vocs(vocs, backend=backend, seed=seed, budget=budget)
            self.planner: Planner = planner if planner is not None else make_planner(self.campaign)
        except ClosedLoopError as exc:  # gest-api: a VOCS a generator cannot take is a ValueError
            raise ValueError(str(exc)) from exc
        self._outstanding: dict[int, dict[str, Any]] = {}  # suggested, not yet ingested, by "_id"
        self._next_id = 0

    def _validate_vocs(self, vocs: VOCS) -> None:
        for name, variable in vocs.variables.items():
            if isinstance(variable, ContextualVariable):
                raise ValueError(f"variables.{name}: closedloop planners cannot take contextual variables")
            if not isinstance(variable, (ContinuousVariable, DiscreteVariable)):
                raise ValueError(f"variables.{name}: unsupported variable type {type(variable).__name__}")
        if not vocs.objectives:
            raise ValueError("objectives: closedloop planners need at least one objective")
        for name, objective in vocs.objectives.items():
            if not isinstance(objective, (MinimizeObjective, MaximizeObjective)):
                raise ValueError(f"objectives.{name}: closedloop planners only minimize or maximize, "
                                 f"not {type(objective).__name__}")

    def suggest(self, num_points: int | None = None) -> list[dict]:
        """``num_points`` points (one if not given), each with every variable, constant and ``_id``."""
        # int(2.5) had silently given two points, where the standard asks for exactly num_points or a ValueError
        if num_points is not None and (isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral)):
            raise ValueError(f"num_points must be a whole number, got {num_points!r}")
        n = 1 if num_points is None else int(num_points)
        if n < 1:
            raise ValueError(f"num_points must be at least 1, got {num_points}")
        proposals = self.planner.suggest(n, pending=list(self._outstanding.values()))
        if len(proposals) != n:
            raise ValueError(f"the planner gave {len(proposals)} points, not {n}")
        points = []
        for proposal in proposals:
            point = {**proposal.parameters, "_id": self._next_id}
            self._outstanding[self._next_id] = dict(proposal.parameters)
            self._next_id += 1
            points.append(point)
        return points

    def ingest(self, results: list[dict]) -> None:
        """Evaluated points, all or none (a bad point raises ``ValueError`` and nothing is taken); a point
        whose objectives are missing or not finite counts as failed."""
        points = [results] if isinstance(results, dict) else list(results)
        if isinstance(results, dict) or not all(isinstance(point, dict) for point in points):
            # one point on its own had failed with AttributeError: 'str' object has no attribute 'get'
            raise ValueError(f"ingest takes a list of points (dicts), not {type(results).__name__} {str(results)[:80]}")
        finished: list[Result] = []
        identifiers: set[Any] = set()
        for k, point in enumerate(points):
            identifier = point.get("_id")
            if identifier is not None:
                if not isinstance(identifier, Hashable) or identifier not in self._outstanding or identifier in identifiers:
                    raise ValueError(f"_id {identifier!r} was not suggested by this generator or was already ingested")
                identifiers.add(identifier)
            # one missing is the planner's to refuse (its ingest checks every result), as a ValueError below
            parameters = {name: point[name] for name in self.campaign.parameters if name in point}
            values: dict[str, float] | None = {}
            for name in self.campaign.outputs:
                value = point.get(name)
                try:
                    number = None if value is None else float(value)
                except (TypeError, ValueError):  # a list or a word had raised TypeError or float()'s own message
                    raise ValueError(f"point {k}: {name}={value!r} is not a number") from None
                if number is None or not math.isfinite(number):
                    values = None
                    break
                values[name] = number  # type: ignore[index]
            finished.append(Result(parameters, values, identifier))
        try:
            self.planner.ingest(finished)
        except PlannerError as exc:
            raise ValueError(str(exc)) from exc
        for identifier in identifiers:
            del self._outstanding[identifier]

    def finalize(self) -> None:
        """Nothing runs in the background: the planner is up to date after every ``ingest``. Points suggested
        and not ingested are dropped: no longer pending, and their ``_id`` refused by a later ``ingest``."""
        self._outstanding.clear()


def campaign_from_vocs(vocs: VOCS, backend: str = "botorch", seed: int | None = None, budget: int = 100) -> Campaign:
    """The closedloop campaign equivalent to a VOCS.

    Continuous variables become continuous parameters; a discrete variable becomes a ``discrete``
    parameter when its values are numbers, else ``categorical``; constants become ``fixed``;
    ``LESS_THAN``/``GREATER_THAN``/``BOUNDS`` constraints become outcome constraints.
    """
    parameters: dict[str, Any] = {}
    if "_id" in vocs.variables or "_id" in vocs.constants:
        # a point's "_id" is the generator's: a variable of that name had its value overwritten by the point's number
        raise CampaignError("variables._id: '_id' names each point this generator suggests; name the variable otherwise")
    for name, variable in vocs.variables.items():
        if isinstance(variable, ContinuousVariable):
            parameters[name] = {"type": "continuous", "bounds": list(variable.domain)}
        else:
            values = sorted(variable.values, key=str)
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            # the values as given: {1, 2, 4} as floats came back as 2.0, which range() and indexing refuse
            parameters[name] = ({"type": "discrete", "values": sorted(values)} if numeric
                                else {"type": "categorical", "values": values})
    for name, constant in vocs.constants.items():
        parameters[name] = {"type": "fixed", "value": constant.value}
    objectives = {
        name: {"goal": "maximize" if isinstance(o, MaximizeObjective) else "minimize"} for name, o in vocs.objectives.items()
    }
    bounds: list[str] = []
    for name, c in vocs.constraints.items():
        if isinstance(c, LessThanConstraint):
            bounds.append(f"{name} <= {c.value!r}")
        elif isinstance(c, GreaterThanConstraint):
            bounds.append(f"{name} >= {c.value!r}")
        elif isinstance(c, BoundsConstraint):
            bounds += [f"{name} >= {c.range[0]!r}", f"{name} <= {c.range[1]!r}"]
        else:
            raise CampaignError(f"constraints.{name}: unsupported constraint type {type(c).__name__}")
    return Campaign.model_validate({
        "name": "gest",
        "parameters": parameters,
        "objectives": objectives,
        "outcome_constraints": bounds,
        "budget": {"experiments": budget},
        "planner": {"backend": backend, "seed": seed},
        "instrument": {"driver": _EXTERNAL},
    })
