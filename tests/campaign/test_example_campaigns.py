"""The example campaigns in ``campaigns/``: each one validates, together they use every construct of the
format, and each one runs a few experiments end to end on its simulated instrument."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    ContinuousParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
    load_campaign,
)
from closedloop.store import Store

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "campaigns").glob("*.yaml"))
# a Sobol run cannot choose among sources; campaigns with sources run in tests/test_multifidelity.py
SINGLE_SOURCE = [p for p in EXAMPLES if not load_campaign(p, check_instrument=False).sources]


def test_every_example_validates() -> None:
    assert len(EXAMPLES) >= 6
    for path in EXAMPLES:
        campaign = load_campaign(path)
        assert campaign.summary()


def test_together_the_examples_use_every_construct() -> None:
    campaigns = [load_campaign(path) for path in EXAMPLES]
    used: set[str] = set()
    for c in campaigns:
        used |= {p.type for p in c.parameters.values()}
        used |= {"log" for p in c.parameters.values() if getattr(p, "scale", None) == "log"}
        used |= {"unit" for p in c.parameters.values() if getattr(p, "unit", None)}
        used |= {f"constraint {lc.op}" for lc in c.linear_constraints}
        used |= {"candidates"} if c.candidates else set()
        used |= {"several objectives"} if len(c.objectives) > 1 else set()
        used |= {"threshold" for o in c.objectives.values() if o.threshold is not None}
        used |= {"maximize" for o in c.objectives.values() if o.goal == "maximize"}
        used |= {"outcome constraint"} if c.outcome_constraints else set()
        used |= {"hours"} if c.budget.hours else set()
        used |= {"stop_when"} if c.budget.stop_when else set()
        used |= {"concurrency"} if c.execution.concurrency > 1 else set()
        used |= {"timeout"} if c.execution.timeout else set()
        used |= {"retries"} if c.execution.retries else set()
        used |= {"approve"} if c.execution.approve else set()
        used |= {f"backend {c.planner.backend}"}
        used |= {"initial_experiments"} if c.planner.initial_experiments else set()
        used |= {"seed"} if c.planner.seed is not None else set()
        used |= {f"instrument {i.field}" for i in c.instruments.values()}
        used |= {"options"} if any(i.options for i in c.instruments.values()) else set()
        used |= {"sources", "budget cost"} if c.sources and c.budget.cost else set()
        used |= {"description"} if c.description else set()
    expected = {
        "continuous", "integer", "categorical", "discrete", "fixed", "log", "unit", "constraint <=", "constraint >=",
        "constraint ==", "candidates", "several objectives", "threshold", "maximize", "outcome constraint", "hours",
        "stop_when", "concurrency", "timeout", "retries", "approve", "backend botorch", "backend ax", "backend sobol",
        "backend random", "initial_experiments", "seed", "instrument simulator", "instrument driver", "options",
        "description", "instrument function", "sources", "budget cost",
    }
    assert expected <= used, expected - used


def instrument_available(campaign: Campaign) -> str | None:
    for instrument in campaign.instruments.values():
        module = (instrument.import_path or "").partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{instrument.import_path} does not import yet ({exc})"
    return None


def quick(campaign: Campaign, experiments: int, backend: str, initial: int | None = None) -> Campaign:
    """The campaign cut down to a few experiments, with nobody asked to approve them."""
    initial = min(initial or experiments, experiments)
    return campaign.model_copy(update={
        "budget": campaign.budget.model_copy(update={"experiments": experiments, "stop_when": None}),
        "planner": campaign.planner.model_copy(update={"backend": backend, "initial_experiments": initial}),
        "execution": campaign.execution.model_copy(update={"approve": False}),
    })


def check_stored(campaign: Campaign, rows: list[Any]) -> None:
    """Every stored experiment is a point of the declared space, in the declared types."""
    for row in rows:
        values = row.parameters
        for name, p in campaign.parameters.items():
            v = values[name]
            if isinstance(p, ContinuousParameter):
                assert isinstance(v, float) and p.bounds[0] <= v <= p.bounds[1]
            elif isinstance(p, IntegerParameter):
                assert type(v) is int and p.bounds[0] <= v <= p.bounds[1]
            elif isinstance(p, (CategoricalParameter, DiscreteParameter)):
                assert v in p.values
            elif isinstance(p, FixedParameter):
                assert v == p.value
        for constraint in campaign.linear_constraints:
            assert constraint.satisfied(values), (constraint.text, values)
        if campaign.candidates is not None:
            assert values in campaign.candidate_table()


def run_few(campaign: Campaign, tmp_path: Path) -> None:
    from closedloop.daemon import run_embedded

    reason = instrument_available(campaign)
    if reason:
        pytest.skip(reason)
    store = Store(tmp_path / "store.db")
    try:
        run = run_embedded(campaign, store, outbox=str(tmp_path / "outbox"))
        counts = store.counts(run.id)
        assert counts.get("completed", 0) + counts.get("failed", 0) == campaign.budget.experiments, counts
        assert counts.get("completed", 0) >= 1
        rows = store.trials(run.id)
        check_stored(campaign, rows)
        if campaign.candidates is not None and not campaign.candidates.repeats:
            keys = [tuple(sorted(r.parameters.items())) for r in rows]
            assert len(keys) == len(set(keys)), "a candidate row was proposed twice"
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", SINGLE_SOURCE, ids=[p.stem for p in SINGLE_SOURCE])
def test_each_example_runs_a_few_experiments(path: Path, tmp_path: Path) -> None:
    campaign = load_campaign(path)
    run_few(quick(campaign, 3, "sobol"), tmp_path)


@pytest.mark.slow
def test_a_mixed_constrained_example_runs_with_botorch(tmp_path: Path) -> None:
    run_few(quick(load_campaign(ROOT / "campaigns" / "mixed.yaml"), 4, "botorch", initial=2), tmp_path)
