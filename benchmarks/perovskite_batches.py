"""The botorch backend on the perovskite example campaign: hypervolume reached and seconds spent thinking.

``campaigns/perovskite.yaml`` has every kind of parameter (continuous, log-scale, integer, categorical, discrete,
fixed), a linear constraint, two objectives with thresholds and an outcome constraint: the hardest space the
planner searches with BoTorch's mixed alternating optimizer. Each seed runs the campaign's planner to N experiments
in batches of 4 (its stations' concurrency) on the simulator's noiseless truth, ``simulators.materials.anneal``, and
prints the hypervolume of its feasible front above the thresholds, the seconds its suggestions took together and
the longest one::

    .venv/bin/python benchmarks/perovskite_batches.py                  # seeds 0-7, 40 experiments, 2 at a time
    .venv/bin/python benchmarks/perovskite_batches.py --seeds 4 --experiments 60 --jobs 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 4


def run_seed(seed: int, experiments: int) -> dict[str, Any]:
    """One campaign of ``experiments`` on the truth, the planner seeded with ``seed``."""
    import warnings

    warnings.simplefilter("ignore")
    from closedloop.campaign import load_campaign
    from closedloop.planner import Result, make_planner
    from simulators.materials import anneal

    campaign = load_campaign(ROOT / "campaigns" / "perovskite.yaml", check_instrument=False)
    campaign = campaign.model_copy(update={"planner": campaign.planner.model_copy(update={"seed": seed})})
    planner = make_planner(campaign)
    thinking: list[float] = []
    done = 0
    while done < experiments:
        started = time.perf_counter()
        proposals = planner.suggest(min(BATCH, experiments - done))
        thinking.append(time.perf_counter() - started)
        planner.ingest([Result(p.parameters, anneal(p.parameters), done + i + 1) for i, p in enumerate(proposals)])
        done += len(proposals)
    return {"seed": seed, "experiments": done, "hypervolume": planner.hypervolume(),
            "thinking_s": round(sum(thinking), 2), "longest_batch_s": round(max(thinking), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0 .. SEEDS-1 (default 8)")
    parser.add_argument("--experiments", type=int, default=40, help="experiments a campaign (default 40)")
    parser.add_argument("--jobs", type=int, default=2, help="campaigns at a time (default 2)")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    args = parser.parse_args()
    from closedloop.bench.runner import run_many

    runs: list[dict[str, Any]] = []
    # the planner bench's pool: one torch thread a campaign, ``jobs`` at a time; one BLAS thread too, in each
    # spawned process
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_many([(run_seed, (seed, args.experiments)) for seed in range(args.seeds)], args.jobs, runs.append)
    runs.sort(key=lambda run: run["seed"])
    for run in runs:
        print(f"seed {run['seed']}: hypervolume {run['hypervolume']:.4f}, thinking {run['thinking_s']:.1f} s, "
              f"longest batch {run['longest_batch_s']:.1f} s")
    print(f"median over {len(runs)} seeds, {args.experiments} experiments in batches of {BATCH}, {args.jobs} at a time: "
          f"hypervolume {statistics.median(r['hypervolume'] for r in runs):.4f}, "
          f"thinking {statistics.median(r['thinking_s'] for r in runs):.1f} s a campaign, "
          f"longest batch {max(r['longest_batch_s'] for r in runs):.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "experiments": args.experiments, "jobs": args.jobs}, indent=1))


if __name__ == "__main__":
    main()
