"""The planner's interface: the gest-api verbs ``suggest`` and ``ingest``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable



@dataclass(frozen=True)
class Proposal:
    """An experiment the planner wants run: parameter values in their declared types."""

    parameters: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """What an experiment gave: its parameters and measured outputs, or that it failed."""

    parameters: dict[str, Any]
    values: dict[str, float] | None
    trial: int | None = None

    @property
    def failed(self) -> bool:
        return self.values is None


@runtime_checkable
class Planner(Protocol):
    """Proposes experiments and learns from their results.

    ``suggest(n, pending)`` returns ``n`` jointly chosen proposals, treating ``pending`` (experiments
    in flight) as already being measured. ``ingest(results)`` adds finished experiments. ``best()`` is
    the feasible experiment the planner believes best (by its model's estimate under noise);
    ``pareto_front()`` the non-dominated feasible experiments when there are several objectives.
    """

    backend: ClassVar[str]

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]: ...

    def ingest(self, results: list[Result]) -> None: ...

    def best(self) -> Result | None: ...

    def pareto_front(self) -> list[Result]: ...
