"""Stores filled with experiments computed here, for the view, report and API tests (no daemon needed)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from closedloop.campaign import Campaign
from closedloop.store import Store

MIXED_YAML = """
name: {name}
description: Two objectives over a mixed space.
parameters:
  temp: {{type: continuous, bounds: [20, 80], unit: C}}
  conc: {{type: continuous, bounds: [0.01, 1], scale: log}}
  steps: {{type: integer, bounds: [1, 5]}}
  solvent: {{type: categorical, values: [water, ethanol, toluene]}}
  pressure: {{type: fixed, value: 1}}
objectives:
  yield: {{goal: maximize}}
  cost: {{goal: minimize}}
budget: {{experiments: {experiments}}}
planner: {{initial_experiments: 8, seed: 0}}
instrument: {{simulator: "simulators.surfaces:Branin"}}
"""


def mixed_campaign(name: str = "mixed", experiments: int = 30) -> Campaign:
    return Campaign.from_yaml_text(MIXED_YAML.format(name=name, experiments=experiments), check_instrument=False)


def mixed_outputs(p: dict) -> dict[str, float]:
    bonus = {"water": 0.0, "ethanol": 0.3, "toluene": -0.2}[p["solvent"]]
    y = math.exp(-((p["temp"] - 55) / 15) ** 2) + 0.2 * math.log10(p["conc"]) * -0.5 + bonus + 0.05 * p["steps"]
    cost = 0.02 * p["temp"] + 3 * p["conc"] + 0.4 * p["steps"]
    return {"yield": y, "cost": cost}


def fill(store: Store, campaign: Campaign, n: int, *, fail: tuple[int, ...] = (), seed: int = 0, unit: float = 1.0) -> int:
    """Add ``n`` finished experiments (trial numbers in ``fail`` failed; outputs times ``unit``) and return
    the campaign id."""
    rng = np.random.default_rng(seed)
    cid = store.open_campaign(campaign)
    for i in range(1, n + 1):
        p = {"temp": float(rng.uniform(20, 80)), "conc": float(10 ** rng.uniform(-2, 0)),
             "steps": int(rng.integers(1, 6)), "solvent": str(rng.choice(["water", "ethanol", "toluene"])),
             "pressure": 1}
        generator = "sobol" if i <= 8 else "botorch.qLogNEI"
        (trial,) = store.add_trials(cid, [(p, {"generator": generator})])
        store.mark_dispatched(trial.id, "station-a")
        if i in fail:
            store.record_failure(trial.id, "sample holder jammed")
        else:
            outputs = {k: unit * v for k, v in mixed_outputs(p).items()}
            store.record_result(trial.id, f"run-{campaign.name}-{i}", outputs, duration_s=1.5)
    return cid


def mixed_store(path: Path, n: int = 24, fail: tuple[int, ...] = (5, 17), unit: float = 1.0) -> tuple[Store, Campaign]:
    store = Store(path)
    campaign = mixed_campaign()
    fill(store, campaign, n, fail=fail, unit=unit)
    return store, campaign


@contextmanager
def orm_rows_loaded() -> Iterator[list[object]]:
    """The trial and observation ORM objects loaded inside the block: the lean read paths must load none."""
    from sqlalchemy import event

    from closedloop.store import ObservationRow, TrialRow

    loaded: list[object] = []

    def count(target: object, _context: object) -> None:
        loaded.append(target)

    for table in (TrialRow, ObservationRow):
        event.listen(table, "load", count)
    try:
        yield loaded
    finally:
        for table in (TrialRow, ObservationRow):
            event.remove(table, "load", count)
