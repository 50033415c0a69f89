"""closedloop: a closed-loop autonomous experimentation engine.

The Python API is the objects the command line uses (see the README's notebook example):

    >>> from closedloop import Campaign, Store, make_planner          # doctest: +SKIP
    >>> campaign = Campaign.from_yaml("campaigns/branin.yaml")          # doctest: +SKIP
    >>> store = Store("results/branin.db")                              # doctest: +SKIP
    >>> trials = suggest(store, campaign, n=2)                          # doctest: +SKIP
    >>> tell(store, "branin", trials[0].index, {"y": 3.2})              # doctest: +SKIP
    >>> best(store, "branin"), pareto_front(store, "branin")            # doctest: +SKIP
    >>> hypervolume(store, "zdt1-front")                                # doctest: +SKIP
    >>> write_report(store, "branin", "reports/branin/report.html")     # doctest: +SKIP

Names are imported on first use, so ``import closedloop`` stays quick (the command line starts fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Campaign": "closedloop.campaign",
    "load_campaign": "closedloop.campaign",
    "Planner": "closedloop.planner",
    "Proposal": "closedloop.planner",
    "Result": "closedloop.planner",
    "make_planner": "closedloop.planner",
    "Store": "closedloop.store",
    "TrialStatus": "closedloop.store",
    "suggest": "closedloop.hitl",
    "tell": "closedloop.hitl",
    "approve": "closedloop.hitl",
    "reject": "closedloop.hitl",
    "import_csv": "closedloop.hitl",
    "best": "closedloop.report",
    "pareto_front": "closedloop.report",
    "hypervolume": "closedloop.report",
    "make_figures": "closedloop.report",
    "write_report": "closedloop.report",
    "Snapshot": "closedloop.view",
    "trial_records": "closedloop.view",
    "ClosedLoopError": "closedloop.errors",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'closedloop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # names for type checkers and editors; at run time __getattr__ imports them
    from closedloop.campaign import Campaign, load_campaign  # noqa: F401
    from closedloop.errors import ClosedLoopError  # noqa: F401
    from closedloop.hitl import approve, import_csv, reject, suggest, tell  # noqa: F401
    from closedloop.planner import Planner, Proposal, Result, make_planner  # noqa: F401
    from closedloop.report import best, hypervolume, make_figures, pareto_front, write_report  # noqa: F401
    from closedloop.store import Store, TrialStatus  # noqa: F401
    from closedloop.view import Snapshot, trial_records  # noqa: F401
