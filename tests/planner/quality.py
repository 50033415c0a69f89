"""Development benchmark of the BoTorch backend's regret (not a test; the formal one is `closedloop bench planner`).

    .venv/bin/python tests/planner/quality.py branin hartmann6 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

from closedloop.campaign import Campaign
from closedloop.planner import Result, make_planner
from simulators.surfaces import BRANIN_MINIMUM, HARTMANN6_MINIMUM, branin, hartmann6


def ackley(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    d = len(x)
    return float(-20 * np.exp(-0.2 * np.sqrt(np.sum(x**2) / d)) - np.exp(np.sum(np.cos(2 * np.pi * x)) / d) + 20 + np.e)


def mixed(p: dict) -> float:
    # Branin over (x1, x2) shifted by a categorical and an integer; optimum 0.397887 at cat "b", k=2
    shift = {"a": 1.0, "b": 0.0, "c": 3.0}[p["c"]]
    return branin(np.array([p["x1"], p["x2"]])) + shift + 0.5 * (p["k"] - 2) ** 2


PROBLEMS = {
    "branin": (
        "x1: {type: continuous, bounds: [-5, 10]}\n  x2: {type: continuous, bounds: [0, 15]}",
        lambda p: branin(np.array([p["x1"], p["x2"]])), BRANIN_MINIMUM, 30, 0.0),
    "branin_noisy": (
        "x1: {type: continuous, bounds: [-5, 10]}\n  x2: {type: continuous, bounds: [0, 15]}",
        lambda p: branin(np.array([p["x1"], p["x2"]])), BRANIN_MINIMUM, 30, 1.0),
    "hartmann6": (
        "\n  ".join(f"x{i}: {{type: continuous, bounds: [0, 1]}}" for i in range(1, 7)),
        lambda p: hartmann6(np.array([p[f"x{i}"] for i in range(1, 7)])), HARTMANN6_MINIMUM, 60, 0.0),
    "hartmann6_noisy": (
        "\n  ".join(f"x{i}: {{type: continuous, bounds: [0, 1]}}" for i in range(1, 7)),
        lambda p: hartmann6(np.array([p[f"x{i}"] for i in range(1, 7)])), HARTMANN6_MINIMUM, 60, 0.1),
    "ackley5": (
        "\n  ".join(f"x{i}: {{type: continuous, bounds: [-32.768, 32.768]}}" for i in range(1, 6)),
        lambda p: ackley(np.array([p[f"x{i}"] for i in range(1, 6)])), 0.0, 50, 0.0),
    "mixed": (
        "x1: {type: continuous, bounds: [-5, 10]}\n  x2: {type: continuous, bounds: [0, 15]}\n"
        "  k: {type: integer, bounds: [0, 5]}\n  c: {type: categorical, values: [a, b, c]}",
        mixed, BRANIN_MINIMUM, 40, 0.0),
}


def run(problem: str, seed: int, backend: str = "botorch", initial: int | None = None) -> dict:
    params, func, optimum, budget, noise = PROBLEMS[problem]
    campaign = Campaign.from_yaml_text(
        f"name: {problem}\nparameters:\n  {params}\nobjectives: {{y: {{goal: minimize}}}}\n"
        f"budget: {{experiments: {budget}}}\nplanner: {{backend: {backend}, seed: {seed}"
        + (f", initial_experiments: {initial}" if initial else "") + "}\n"
        "instrument: {simulator: 'simulators.surfaces:Branin'}\n", check_instrument=False)
    planner = make_planner(campaign)
    rng = np.random.default_rng(1000 + seed)
    truth: dict[int, float] = {}
    times = []
    for trial in range(1, budget + 1):
        t = time.perf_counter()
        p = planner.suggest(1)[0].parameters
        times.append(time.perf_counter() - t)
        value = func(p)
        truth[trial] = value
        planner.ingest([Result(p, {"y": value + noise * rng.standard_normal()}, trial)])
    best = planner.best()
    reported = truth[best.trial] - optimum
    true_best = min(truth.values()) - optimum
    return {"problem": problem, "seed": seed, "log10_regret": math.log10(max(reported, 1e-12)),
            "log10_true_best": math.log10(max(true_best, 1e-12)), "seconds": statistics.median(times)}


def speed(sizes: list[int], q: int = 1) -> None:
    """Seconds per suggestion on Hartmann6 after ``n`` random observations: cold (with the fit) and warm."""
    params = PROBLEMS["hartmann6"][0]
    for n in sizes:
        campaign = Campaign.from_yaml_text(
            f"name: speed\nparameters:\n  {params}\nobjectives: {{y: {{goal: minimize}}}}\n"
            f"budget: {{experiments: {max(2000, 10 * n)}}}\nplanner: {{seed: 0}}\n"
            "instrument: {simulator: 'simulators.surfaces:Branin'}\n", check_instrument=False)
        planner = make_planner(campaign)
        rng = np.random.default_rng(n)
        xs = rng.uniform(size=(n + 3, 6))
        planner.ingest([Result({f"x{i + 1}": float(v) for i, v in enumerate(x)}, {"y": hartmann6(x)}, k + 1)
                        for k, x in enumerate(xs[:n])])
        # CPU seconds of this one-thread process: the wall time on an idle core (the machine is shared)
        t, c = time.perf_counter(), time.process_time()
        planner.suggest(q)
        cold, cold_cpu = time.perf_counter() - t, time.process_time() - c
        warm, warm_cpu = [], []
        for k in range(3):
            x = xs[n + k]
            planner.ingest([Result({f"x{i + 1}": float(v) for i, v in enumerate(x)}, {"y": hartmann6(x)}, n + k + 1)])
            t, c = time.perf_counter(), time.process_time()
            planner.suggest(q)
            warm.append(time.perf_counter() - t)
            warm_cpu.append(time.process_time() - c)
        print(f"n={n} q={q}: first suggestion (with the fit) {cold:.3f} s wall / {cold_cpu:.3f} s cpu; "
              f"next ones median {statistics.median(warm):.3f} s wall / {statistics.median(warm_cpu):.3f} s cpu",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("problems", nargs="+")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--backend", default="botorch")
    parser.add_argument("--speed", action="store_true", help="the problems are observation counts")
    parser.add_argument("--initial", type=int, default=None, help="initial design size")
    parser.add_argument("--q", type=int, default=1, help="batch size for --speed")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # two shared cores: one run per core
    if args.speed:
        speed([int(p) for p in args.problems], q=args.q)
        sys.exit()
    for problem in args.problems:
        rows = [run(problem, s, args.backend, args.initial) for s in range(args.first, args.first + args.seeds)]
        for r in rows:
            print(json.dumps(r), file=sys.stderr)
        print(f"{problem}: median log10 regret {statistics.median(r['log10_regret'] for r in rows):+.2f} "
              f"(true best {statistics.median(r['log10_true_best'] for r in rows):+.2f}) "
              f"seconds/suggestion {statistics.median(r['seconds'] for r in rows):.3f} "
              f"values {[round(r['log10_regret'], 2) for r in rows]}", flush=True)
