"""The planner's interface: the gest-api verbs ``suggest`` and ``ingest``."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from closedloop.errors import PlannerError


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
    ``pareto_front()`` the non-dominated feasible experiments when there are several objectives, and
    ``hypervolume()`` what they dominate above the reference point (:class:`PlannerError` for one objective).
    A planner whose decisions are made on a fixed torch thread count says so in a class attribute ``torch_threads``
    (the provenance record keeps it; without it, the process's count).
    """

    backend: ClassVar[str]

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]: ...

    def ingest(self, results: list[Result]) -> None: ...

    def best(self) -> Result | None: ...

    def pareto_front(self) -> list[Result]: ...

    def hypervolume(self) -> float: ...


def proposal_count(n: Any) -> int:
    """``n`` as a number of proposals to ask a planner for: a whole number, at least 0 (``suggest(0)`` is
    ``[]``); anything else raises :class:`PlannerError` (``suggest(-1)`` had crashed inside torch in one
    backend and given ``[]`` in the others, ``suggest(2.5)`` crashed in all)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise PlannerError(f"suggest: n is the number of experiments to propose, a whole number at least 0, not {n!r}")
    if n > MAX_PROPOSALS:  # 10**12 failed in torch's allocator, asking for 16 TB
        raise PlannerError(f"suggest: n={n} is more experiments than one call proposes (at most {MAX_PROPOSALS}); "
                           "ask again for more")
    return int(n)


MAX_PROPOSALS = 10_000
