"""Running planners over the suite and measuring them: regret, experiments to 1 %, seconds per suggestion.

Planners are driven directly on pure functions (no RunEngine, no daemon), so the figures measure the
planners and not the loop. Every run is one (peer, problem, seed); runs are independent and may go
to several worker processes. Regret is computed on the noiseless truth from the problem's known
optimum; the planners only ever see the noisy readings.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np

from closedloop.bench.peers import PEERS
from closedloop.bench.problems import PROBLEMS, Problem

log = logging.getLogger(__name__)

#: log10 of a regret of exactly zero is reported as this floor (a table problem solved exactly).
REGRET_FLOOR = 1e-8
SPEED_SIZES = (10, 50, 200, 500, 1000)
SPEED_CAP_SECONDS = 60.0
#: the planner every other one is compared with, seed by seed
OURS = "botorch"


# -- measuring -------------------------------------------------------------------------------------


def hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume dominated by ``n x 2`` points (both minimized) up to ``reference``."""
    inside = points[(points < reference).all(axis=1)]
    if not len(inside):
        return 0.0
    inside = inside[np.lexsort((inside[:, 1], inside[:, 0]))]
    volume, best_second = 0.0, reference[1]
    for first, second in inside:
        if second < best_second:
            volume += (reference[0] - first) * (best_second - second)
            best_second = second
    return float(volume)


def regret_trace(problem: Problem, truths: list[dict[str, float]]) -> list[float]:
    """Simple regret after each experiment, on the truth: the best feasible value so far against the optimum.

    Before any feasible experiment the regret is the whole range. With two objectives it is the maximum
    hypervolume minus the hypervolume of the feasible experiments so far.
    """
    trace: list[float] = []
    if problem.multi_objective:
        names = list(problem.campaign.objectives)
        signs = np.array([1.0 if problem.campaign.objectives[n].goal == "minimize" else -1.0 for n in names])
        reference = signs * np.array(problem.reference)
        kept: list[np.ndarray] = []
        for truth in truths:
            if problem.feasible(truth):
                kept.append(signs * np.array([truth[n] for n in names]))
            volume = hypervolume_2d(np.array(kept), reference) if kept else 0.0
            trace.append(max(0.0, problem.optimum - volume))
        return trace
    best: float | None = None
    for truth in truths:
        if problem.feasible(truth):
            value = truth[problem.objective]
            if best is None or (value < best if problem.minimize else value > best):
                best = value
        trace.append(problem.range if best is None else max(0.0, (best - problem.optimum) * (1 if problem.minimize else -1)))
    return trace


def single_regret(problem: Problem, truth: dict[str, float]) -> float:
    if not problem.feasible(truth):
        return problem.range
    return max(0.0, (truth[problem.objective] - problem.optimum) * (1 if problem.minimize else -1))


def log10_regret(regret: float) -> float:
    return math.log10(max(regret, REGRET_FLOOR))


def run_one(peer_name: str, problem_name: str, seed: int, budget_scale: float = 1.0, stations: int = 1) -> dict[str, Any]:
    """One planner on one problem for one seed: the record that goes into the JSON.

    With ``stations`` above one the campaign runs as on a lab with that many stations: as many experiments
    are always in flight, each station asking for its next one when its experiment ends (the oldest first),
    while the others' are still running. The planner sees only what has ended; the experiments in flight
    are its own proposals not yet observed, which each session passes on as pending where its tool takes
    them. With one station every experiment ends before the next is asked for.
    """
    problem = _problem(problem_name, budget_scale).for_seed(seed)
    peer = PEERS[peer_name]
    record: dict[str, Any] = {"problem": problem_name, "peer": peer_name, "seed": seed, "budget": problem.budget,
                              "blinded": problem.blind, "stations": stations}
    reason = peer.missing() or peer.refuses(problem)
    if reason:
        return {**record, "status": "skipped", "message": reason}
    noise = np.random.default_rng([seed, zlib.crc32(problem_name.encode())])
    truths: list[dict[str, float]] = []
    seconds: list[float] = []
    started = time.perf_counter()

    def ask(n: int) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        points = session.suggest(n)
        seconds.append(time.perf_counter() - t0)
        return points

    try:
        session = peer.start(problem, seed)
        in_flight = ask(min(stations, problem.budget))
        asked = len(in_flight)
        while in_flight:
            point = in_flight.pop(0)
            truth = problem.evaluate(point)
            truths.append(truth)
            observed = {k: v + (float(noise.normal(0, problem.noise)) if problem.noise and k in
                                problem.campaign.objectives else 0.0) for k, v in truth.items()}
            session.observe([point], [observed])
            if asked < problem.budget:
                more = ask(1)
                in_flight += more
                asked += len(more)
        reported = session.reported_best() if not problem.multi_objective else None
    except Exception as exc:  # a peer that breaks is recorded, the run goes on
        log.warning("%s on %s seed %d failed: %s", peer_name, problem_name, seed, exc)
        return {**record, "status": "error", "message": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=4)[-2000:], "experiments": len(truths)}
    trace = regret_trace(problem, truths)
    final = trace[-1]
    within = 0.01 * problem.range
    record.update({
        "status": "ok",
        "final_regret": final,
        "log10_final_regret": log10_regret(final),
        "experiments_to_1pct": next((i + 1 for i, r in enumerate(trace) if r <= within), None),
        "seconds_per_suggestion": [round(s, 5) for s in seconds],
        "median_seconds_per_suggestion": float(np.median(seconds)),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "regret_trace": trace,
    })
    if reported is not None:
        record["reported_regret"] = single_regret(problem, problem.evaluate(reported))
    return record


def speed_one(peer_name: str, observations: int, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Seconds for one ``suggest(batch)`` after ``observations`` Hartmann6 experiments.

    The history is ``observations - 1`` Sobol points plus one experiment the peer proposed itself.
    """
    from scipy.stats import qmc

    problem = PROBLEMS["hartmann6"]().with_budget(max(2 * observations, 100))
    peer = PEERS[peer_name]
    record: dict[str, Any] = {"peer": peer_name, "observations": observations, "batch": batch}
    reason = peer.missing() or peer.refuses(problem)
    if reason:
        return {**record, "status": "skipped", "message": reason}
    names = list(problem.campaign.tunable_parameters)
    with warnings.catch_warnings():  # sizes such as 200 are not powers of 2; balance does not matter here
        warnings.simplefilter("ignore", UserWarning)
        x = qmc.Sobol(6, scramble=True, seed=seed).random(observations)
    points = [dict(zip(names, map(float, row))) for row in x]
    try:
        session = peer.start(problem, seed)
        session.observe(points[:-1], [problem.evaluate(p) for p in points[:-1]])
        # One suggestion, observed, before the timed one: a tool handed a history may still draw its
        # first point from its initial design (Ax does), which would time a Sobol draw, not its model.
        warm = session.suggest(1)
        session.observe(warm, [problem.evaluate(p) for p in warm])
        t0 = time.perf_counter()
        proposals = session.suggest(batch)
        elapsed = time.perf_counter() - t0
    except Exception as exc:
        return {**record, "status": "error", "message": f"{type(exc).__name__}: {exc}"}
    return {**record, "status": "ok", "seconds": elapsed, "proposals": len(proposals)}


# each speed figure is the median of this many suggestions, each after its own Sobol history: with one,
# our ratio to the fastest Bayesian peer at 200 observations moved between 0.42 and 0.56 from sitting to sitting
SPEED_REPEATS = 3


def speed_median(peer_name: str, observations: int, batch: int = 1) -> dict[str, Any]:
    """:func:`speed_one` over ``SPEED_REPEATS`` histories: the median seconds, and every sample."""
    records = [speed_one(peer_name, observations, batch, seed) for seed in range(SPEED_REPEATS)]
    failed = next((r for r in records if r["status"] != "ok"), None)
    if failed is not None:
        return failed
    samples = [r["seconds"] for r in records]
    return {**records[0], "seconds": float(np.median(samples)), "samples": samples}


def _problem(name: str, budget_scale: float) -> Problem:
    problem = PROBLEMS[name]()
    if budget_scale != 1.0:
        problem = problem.with_budget(int(round(problem.budget * budget_scale)))
    return problem


# -- running many ------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)


def run_many(tasks: list[tuple[Callable[..., dict[str, Any]], tuple]], jobs: int,
             on_done: Callable[[dict[str, Any]], None]) -> None:
    """Runs ``(function, args)`` tasks, ``jobs`` at a time in worker processes (in order when ``jobs`` is 1)."""
    if jobs <= 1:
        import torch

        # one torch thread, as in the worker processes: every planner is timed alike whatever ``jobs`` is
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for function, args in tasks:
                on_done(function(*args))
        finally:
            torch.set_num_threads(threads)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(1,))
    try:
        futures = [pool.submit(function, *args) for function, args in tasks]
        for future in as_completed(futures):
            on_done(future.result())
    except BaseException:
        # Ctrl-C (or a report that cannot be written) ends the benchmark now: leaving the pool's ``with`` block
        # waited for every run submitted, the rest of the suite, computed and thrown away. The runs not started
        # are cancelled and the ones in progress stopped; what had ended is in the report already.
        processes = list((pool._processes or {}).values())  # shutdown forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        raise
    pool.shutdown()


def plan(problems: Iterable[str], peers: Iterable[str], seeds: int, budget_scale: float, stations: int = 1) -> list[tuple]:
    """Seeds outermost, so a run cut short still has every (problem, peer) at the first seeds."""
    return [(run_one, (peer, problem, seed, budget_scale, stations))
            for seed in range(seeds) for problem in problems for peer in peers]


def speed_peer(peer: str, sizes: tuple[int, ...], cap: float) -> dict[str, Any]:
    """Seconds per suggestion of one peer at growing numbers of observations, then a batch of 4 at 200.

    Once a size's median takes longer than ``cap`` seconds the larger sizes are skipped (they would
    only take longer), and the record says so.
    """
    records: list[dict[str, Any]] = []
    over: int | None = None
    for n in sorted(sizes):
        if over is not None:
            records.append({"peer": peer, "observations": n, "batch": 1, "status": "skipped",
                            "message": f"over {cap:g} s at {over} observations"})
            continue
        record = speed_median(peer, n)
        records.append(record)
        if record["status"] == "ok" and record["seconds"] > cap:
            over = n
    if 200 in sizes:
        records.append(speed_median(peer, 200, 4) if over is None or over >= 200 else
                       {"peer": peer, "observations": 200, "batch": 4, "status": "skipped",
                        "message": f"over {cap:g} s at {over} observations"})
    return {"speed": records}


def speed_plan(peers: Iterable[str], sizes: Iterable[int], cap: float) -> list[tuple]:
    """Our planner's sizes are never capped: its time at 1,000 observations is a target of its own."""
    return [(speed_peer, (peer, tuple(sizes), math.inf if peer == "botorch" else cap)) for peer in peers]


# -- summarizing ---------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarize(runs: list[dict[str, Any]], budgets: dict[str, int]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per problem and peer: median and IQR of log10 final regret, experiments to 1 %, seconds per suggestion."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        entry = summary.setdefault(run["problem"], {}).setdefault(run["peer"], {"runs": [], "messages": set()})
        if run["status"] == "ok":
            entry["runs"].append(run)
        else:
            entry["messages"].add(f"{run['status']}: {run['message']}")
    for problem, by_peer in summary.items():
        for peer, entry in by_peer.items():
            ok = entry.pop("runs")
            messages = sorted(entry.pop("messages"))
            logs = [r["log10_final_regret"] for r in ok]
            # A run that never got within 1 % counts as needing more than its budget.
            reached = [r["experiments_to_1pct"] if r["experiments_to_1pct"] is not None else math.inf for r in ok]
            median_reached = _median(reached)
            ratios = [r["reported_regret"] / max(r["final_regret"], REGRET_FLOOR) for r in ok if "reported_regret" in r]
            entry.update({
                "seeds": len(ok),
                "median_log10_regret": _median(logs),
                "iqr_log10_regret": [float(np.percentile(logs, 25)), float(np.percentile(logs, 75))] if logs else None,
                "median_experiments_to_1pct": (None if median_reached is None or math.isinf(median_reached)
                                               else median_reached),
                "reached_1pct": sum(1 for r in reached if not math.isinf(r)),
                "median_seconds_per_suggestion": _median([r["median_seconds_per_suggestion"] for r in ok]),
                "median_log10_reported_regret": _median([log10_regret(r["reported_regret"]) for r in ok
                                                         if "reported_regret" in r]),
                "median_reported_to_true_regret": _median(ratios),
                "budget": budgets.get(problem),
            })
            if messages:
                entry["messages"] = messages
    for problem, by_peer in summary.items():
        for peer, entry in by_peer.items():
            if peer != OURS and OURS in by_peer:
                entry["against_ours"] = paired_with_ours(
                    [r for r in runs if r["problem"] == problem and r["peer"] == OURS and r["status"] == "ok"],
                    [r for r in runs if r["problem"] == problem and r["peer"] == peer and r["status"] == "ok"])
    return summary


def paired_with_ours(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """Our final log10 regret against another planner's, seed by seed (same problem, blinding and noise).

    A median over ten seeds moves with one or two lucky runs; the seeds where each did better, and the
    two-sided Wilcoxon signed-rank test on the paired differences, say whether a gap is more than that.
    Equal regrets (both at the floor, or the same table row) are ties, left out of the test.
    """
    from scipy.stats import wilcoxon

    mine = {r["seed"]: r["log10_final_regret"] for r in ours}
    differences = [mine[r["seed"]] - r["log10_final_regret"] for r in theirs if r["seed"] in mine]
    better = sum(1 for d in differences if d < -1e-9)
    worse = sum(1 for d in differences if d > 1e-9)
    p_value = float(wilcoxon([d for d in differences if abs(d) > 1e-9]).pvalue) if better + worse else 1.0
    return {"seeds": len(differences), "ours_better": better, "ours_worse": worse, "p_value": p_value}


def speed_table(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for r in records:
        key = f"batch{r['batch']}_at_{r['observations']}" if r["batch"] > 1 else str(r["observations"])
        table.setdefault(r["peer"], {})[key] = r["seconds"] if r["status"] == "ok" else f"{r['status']}: {r['message']}"
    return table


def environment() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "botorch", "gpytorch", "ax-platform", "baybe", "xopt", "optuna", "gest-api", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "packages": versions}
