"""What one ``GET /api/state`` of the dashboard costs as a campaign grows, cold and on repeated polls.

Builds a store with one campaign of N trials (most completed, with observations and provenance rows; a few
failed, dispatched and held) by SQL Core bulk inserts, serves it with the real dashboard (uvicorn, HTTP on
loopback, as the page polls it every 2 s) and prints, per N: the first request, the median of repeated
requests, the request after a few results arrived, the response size, and the process's memory (RSS growth
over polls while trials keep arriving, and the peak Python allocation of one repeated poll).

Each N runs in a fresh process, so its memory figures are its own::

    .venv/bin/python benchmarks/dashboard_state.py                       # N = 1000 5000 23000
    .venv/bin/python benchmarks/dashboard_state.py 1000 --objectives 2   # a campaign with a Pareto front
    .venv/bin/python benchmarks/dashboard_state.py 23000 --profile       # where one repeated poll spends its time
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from closedloop.campaign import Campaign  # noqa: E402
from closedloop.dashboard.app import DashboardConfig, DashboardServer  # noqa: E402
from closedloop.provenance import ProvenanceRow  # noqa: E402
from closedloop.store import ObservationRow, Store, TrialRow, TrialStatus  # noqa: E402

OPEN, HELD = 4, 2  # dispatched and held trials at the end of the campaign
FAILED_EVERY = 50  # one failed trial in this many


def campaign_yaml(objectives: int) -> str:
    second = "\n  cost: {goal: minimize}" if objectives > 1 else ""
    return f"""
name: soak
parameters:
  x1: {{type: continuous, bounds: [-5, 10]}}
  x2: {{type: continuous, bounds: [0, 15]}}
objectives:
  y: {{goal: minimize}}{second}
outcome_constraints:
  - "y <= 200"
budget: {{experiments: 100000}}
planner: {{backend: botorch, seed: 1}}
instrument: {{simulator: "simulators.surfaces:Branin"}}
"""


def branin(x1: float, x2: float) -> float:
    return (x2 - 5.1 / (4 * math.pi ** 2) * x1 ** 2 + 5 / math.pi * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


def build(path: Path, n: int, objectives: int) -> int:
    """A store of one campaign of ``n`` trials, written with SQL Core bulk inserts; its campaign id."""
    store = Store(path)
    campaign_id = store.open_campaign(Campaign.from_yaml_text(campaign_yaml(objectives), check_instrument=False))
    rng = random.Random(0)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    trials, observations, decisions = [], [], []
    for index in range(1, n + 1):
        x1, x2 = rng.uniform(-5, 10), rng.uniform(0, 15)
        at = start + timedelta(seconds=10 * index)
        status = (TrialStatus.held if index > n - HELD else TrialStatus.dispatched if index > n - HELD - OPEN
                  else TrialStatus.failed if index % FAILED_EVERY == 0 else TrialStatus.completed).value
        finished = status in (TrialStatus.completed.value, TrialStatus.failed.value)
        uid = f"run-{index}"
        trials.append({"id": index, "campaign_id": campaign_id, "index": index, "parameters": {"x1": x1, "x2": x2},
                       "status": status, "station": None if status == "held" else "station-a",
                       "attempts": 0 if status == "held" else 1, "planner": {"generator": "botorch"},
                       "error": "device fault" if status == "failed" else None, "proposed_at": at,
                       "dispatched_at": None if status == "held" else at, "finished_at": at + timedelta(seconds=5) if finished else None,
                       "run_uids": [uid] if finished else []})
        if status == TrialStatus.completed.value:
            values = {"y": branin(x1, x2), **({"cost": x1 + x2} if objectives > 1 else {})}
            observations.append({"trial_id": index, "run_uid": uid, "values": values, "noise": None, "duration_s": 5.0,
                                 "received_at": at + timedelta(seconds=5)})
        decisions.append(ProvenanceRow(trial_id=index, campaign_id=campaign_id, backend="botorch", generator="botorch",
                                       seed=1, acquisition_seed=index, observed=[[1, index - 1]] if index > 1 else [],
                                       proposed_parameters={"x1": x1, "x2": x2}, acquisition="qLogNEI",
                                       acquisition_value=rng.random(), predicted={"y": {"mean": 5.0, "std": 1.0}},
                                       decided_at=at).model_dump())
    with store.engine.begin() as connection:
        for table, rows in ((TrialRow, trials), (ObservationRow, observations), (ProvenanceRow, decisions)):
            connection.execute(table.__table__.insert(), rows)  # type: ignore[attr-defined]
    store.close()
    return campaign_id


def arrive(store: Store, campaign_id: int, k: int, objectives: int, rng: random.Random) -> None:
    """``k`` new experiments, dispatched and completed as the daemon records them."""
    for _ in range(k):
        x1, x2 = rng.uniform(-5, 10), rng.uniform(0, 15)
        row = store.add_dispatched(campaign_id, {"x1": x1, "x2": x2}, {"generator": "botorch"}, "station-a")
        values = {"y": branin(x1, x2), **({"cost": x1 + x2} if objectives > 1 else {})}
        store.record_results([(row.id, f"new-{row.id}", values, None, 1.0)])  # type: ignore[list-item]


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fetch(url: str) -> tuple[float, int]:
    """Seconds one request took, and its body's size in bytes."""
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as reply:
        body = reply.read()
    elapsed = time.perf_counter() - began
    assert json.loads(body)["campaigns"][0]["name"] == "soak"
    return elapsed, len(body)


def one(n: int, objectives: int, polls: int, growth: int, profile: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "soak.db"
        began = time.perf_counter()
        campaign_id = build(path, n, objectives)
        built_s = time.perf_counter() - began
        writer = Store(path)
        server = DashboardServer(DashboardConfig(store=str(path), port=0)).start()
        url = f"http://127.0.0.1:{server.port}/api/state"
        rng = random.Random(1)
        try:
            first_s, size = fetch(url)
            repeated = [fetch(url)[0] for _ in range(polls)]
            arrive(writer, campaign_id, 5, objectives, rng)
            after_s, _ = fetch(url)
            tracemalloc.start()
            fetch(url)
            peak_alloc = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if profile:
                import cProfile
                import pstats

                from starlette.responses import JSONResponse

                # the server's work for one request, in this thread (the profiler sees one thread)
                profiler = cProfile.Profile()
                profiler.enable()
                JSONResponse({"campaigns": server.dashboard._campaigns(None)})
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
            # the soak: trials keep arriving while the page polls (a poll after every 10 new experiments)
            rss_before = rss_kb()
            for _ in range(growth // 10):
                arrive(writer, campaign_id, 10, objectives, rng)
                fetch(url)
            rss_after = rss_kb()
        finally:
            server.stop()
            writer.close()
    return {"n": n, "objectives": objectives, "build_s": round(built_s, 2), "first_ms": round(1000 * first_s, 1),
            "repeated_ms": round(1000 * statistics.median(repeated), 1),
            "after_new_results_ms": round(1000 * after_s, 1), "response_kb": round(size / 1024),
            "poll_peak_alloc_mb": round(peak_alloc / 2**20, 1), "growth_trials": growth,
            "rss_growth_mb_per_1000_trials": round((rss_after - rss_before) / 1024 / growth * 1000, 2) if growth else None,
            "rss_mb": round(rss_after / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="*", type=int, default=[1000, 5000, 23000], help="trials in the campaign")
    parser.add_argument("--objectives", type=int, default=1, choices=(1, 2))
    parser.add_argument("--polls", type=int, default=5, help="repeated requests timed (the median is printed)")
    parser.add_argument("--growth", type=int, default=500, help="new trials during the memory soak (a poll per 10)")
    parser.add_argument("--profile", action="store_true", help="profile one repeated poll")
    parser.add_argument("--here", action="store_true", help="run in this process (one N; used by the others)")
    args = parser.parse_args()
    if args.here:
        print(json.dumps(one(args.n[0], args.objectives, args.polls, args.growth, args.profile)), flush=True)
        return
    for n in args.n:
        command = [sys.executable, __file__, str(n), "--here", "--objectives", str(args.objectives), "--polls",
                   str(args.polls), "--growth", str(args.growth)] + (["--profile"] if args.profile else [])
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
