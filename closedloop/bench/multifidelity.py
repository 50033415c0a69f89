"""``closedloop bench multifidelity``: does a cheap, biased simulation beside the real experiment pay?

The simulator pair of ``campaigns/branin_multifidelity.yaml``: the expensive source is the Branin
function (cost 1, the target), the cheap one ``simulators.multifidelity:branin_low`` (cost 0.1), a
shifted, rescaled and tilted Branin whose minima lie away from the true ones. Over ``seeds`` seeds,
with the same total cost budget, two planners are run on the planner's own loop (no daemon, no
noise, so only the planning is compared):

- **multi-fidelity**: the botorch backend's :class:`~closedloop.planner.multifidelity.MultiFidelityPlanner`
  on the campaign with both sources; it chooses the point and the source;
- **target only**: the botorch backend's single-source planner on the expensive source alone,
  ``budget / cost`` experiments.

Regret is the best *measured* value at the target source minus Branin's minimum (0.397887); cheap
results never count. Reported: for the target regret (default 0.1, i.e. log10 regret <= -1, about
0.03 % of Branin's range over the box), the median total cost to reach it for each planner (a seed
that never reaches it counts as infinite cost) and their ratio; the median final regret at equal
cost; the median seconds per suggestion.

Run: ``closedloop bench multifidelity`` (5 seeds, cost 25; several minutes on two busy cores), or
``python -m closedloop.bench.multifidelity``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from closedloop.campaign import Campaign, load_campaign
from closedloop.planner import Result, make_planner
from simulators.multifidelity import branin_low
from simulators.surfaces import BRANIN_MINIMUM, branin, branin_campaign

CAMPAIGN = Path(__file__).resolve().parents[2] / "campaigns" / "branin_multifidelity.yaml"


def multifidelity_campaign(budget: float, seed: int) -> Campaign:
    """The example campaign with this cost budget and seed."""
    campaign = load_campaign(CAMPAIGN, check_instrument=False)
    return campaign.model_copy(update={"budget": campaign.budget.model_copy(update={"cost": budget}),
                                       "planner": campaign.planner.model_copy(update={"seed": seed})})


def target_only_campaign(experiments: int, seed: int) -> Campaign:
    """The same problem on the expensive source alone, planned by the botorch backend."""
    return Campaign.from_yaml_text(branin_campaign("branin-target-only", experiments,
                                                   planner={"backend": "botorch", "seed": seed}),
                                   check_instrument=False)


def run_one(campaign: Campaign, cost_of: dict[str | None, float], budget: float) -> dict[str, Any]:
    """Plan and measure until ``budget`` is spent; the regret curve against cumulative cost."""
    planner = make_planner(campaign)
    spent, best, trial = 0.0, math.inf, 0
    curve: list[tuple[float, float]] = []  # (cost spent, best regret at the target so far)
    seconds: list[float] = []
    sources: dict[str, int] = {}
    while spent < budget - 1e-9:
        started = time.perf_counter()
        (proposal,) = planner.suggest(1)
        seconds.append(time.perf_counter() - started)
        p = proposal.parameters
        source = p.get("source")
        x = np.array([p["x1"], p["x2"]], dtype=float)
        counts = source is None or campaign.counts(p)
        y = float(branin(x)) if counts else float(branin_low(x))
        trial += 1
        planner.ingest([Result(p, {"y": y}, trial)])
        spent += cost_of[source]
        sources[str(source or "target")] = sources.get(str(source or "target"), 0) + 1
        if counts:
            best = min(best, y - BRANIN_MINIMUM)
        curve.append((spent, best))
    return {"curve": curve, "final_regret": best, "suggest_s": seconds, "sources": sources}


def cost_to_reach(curve: list[tuple[float, float]], regret: float) -> float:
    return next((cost for cost, r in curve if r <= regret), math.inf)


def main(*, seeds: int = 5, budget: float = 25.0, regret: float = 0.1, console: Any = None,
         output: Path | None = None) -> dict[str, Any]:
    import torch

    # one thread: on a shared small machine more threads only fight each other (bench.runner does the same)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    def say(line: str) -> None:
        console.print(line) if console is not None else print(line)

    runs: dict[str, list[dict[str, Any]]] = {"multifidelity": [], "target_only": []}
    try:
        for seed in range(seeds):
            mf = multifidelity_campaign(budget, seed)
            runs["multifidelity"].append(run_one(mf, {s: src.cost for s, src in mf.sources.items()}, budget))
            target_cost = mf.sources[mf.target_source or ""].cost
            single = target_only_campaign(int(budget / target_cost), seed)
            runs["target_only"].append(run_one(single, {None: target_cost}, budget))
            for name, rs in runs.items():
                r = rs[-1]
                say(f"seed {seed} {name}: final regret {r['final_regret']:.4g}, cost to regret <= {regret:g}: "
                    f"{cost_to_reach(r['curve'], regret):.4g}, experiments {r['sources']}, "
                    f"{statistics.median(r['suggest_s']):.2f} s per suggestion")
    finally:
        torch.set_num_threads(threads)
    summary: dict[str, Any] = {"problem": "branin: cheap biased source cost 0.1, target cost 1",
                               "seeds": seeds, "budget_cost": budget, "target_regret": regret}
    for name, rs in runs.items():
        costs = [cost_to_reach(r["curve"], regret) for r in rs]
        summary[name] = {
            "median_cost_to_target_regret": statistics.median(costs),
            "reached": sum(math.isfinite(c) for c in costs),
            "costs_to_target_regret": costs,
            "median_final_regret": statistics.median(r["final_regret"] for r in rs),
            "final_regrets": [r["final_regret"] for r in rs],
            "median_suggest_s": statistics.median(s for r in rs for s in r["suggest_s"]),
            "experiments": [r["sources"] for r in rs],
        }
    mf_cost = summary["multifidelity"]["median_cost_to_target_regret"]
    single_cost = summary["target_only"]["median_cost_to_target_regret"]
    summary["cost_ratio"] = mf_cost / single_cost if math.isfinite(single_cost) and single_cost > 0 else None
    for name in runs:
        s = summary[name]
        say(f"{name}: median cost to regret <= {regret:g}: {s['median_cost_to_target_regret']:.4g} "
            f"({s['reached']}/{seeds} seeds reached it); median final regret at cost {budget:g}: "
            f"{s['median_final_regret']:.4g}; {s['median_suggest_s']:.2f} s per suggestion")
    ratio = summary["cost_ratio"]
    say(f"cost ratio multi-fidelity / target only: {ratio:.2f}" if ratio is not None
        else "cost ratio: undefined (target only did not reach the regret in most seeds)")
    if output is not None:
        output.write_text(json.dumps(_finite(summary), indent=2))
    return summary


def _finite(value: Any) -> Any:
    """JSON has no infinity: a regret never reached is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    main()
