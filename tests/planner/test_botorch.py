"""The BoTorch backend: batches, pending experiments, noise, several objectives, constraints, failures."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from closedloop.errors import PlannerError
from closedloop.planner import Result, make_planner
from closedloop.planner import models as gp
from closedloop.planner.botorch_backend import FINAL_LENGTH, BotorchPlanner
from simulators.surfaces import branin
from tests.planner.conftest import campaign

BRANIN = "x1: {type: continuous, bounds: [-5, 10]}\nx2: {type: continuous, bounds: [0, 15]}"


def run(planner, func, n: int, start: int = 1) -> list[Result]:
    results = []
    for trial in range(start, start + n):
        p = planner.suggest(1)[0].parameters
        r = Result(p, func(p), trial)
        planner.ingest([r])
        results.append(r)
    return results


def b(p: dict) -> float:
    return float(branin(np.array([p["x1"], p["x2"]])))


def test_the_design_starts_at_the_centre_of_the_space_unless_constraints_bound_it() -> None:
    free = BotorchPlanner(campaign(BRANIN))
    first, second = free.suggest(2)
    assert first.parameters == {"x1": 2.5, "x2": 7.5} and first.metadata["design_point"] == "centre"
    assert second.parameters != first.parameters and "design_point" not in second.metadata
    # resumed one experiment in, the design goes on with its second point, not a second centre
    assert free.suggest(1, pending=[first.parameters])[0].parameters == second.parameters
    bounded = BotorchPlanner(campaign(BRANIN, extra='constraints: ["x1 + x2 <= 5"]'))
    assert all("design_point" not in p.metadata for p in bounded.suggest(3))


def test_a_batch_is_jointly_chosen_and_pending_experiments_are_avoided() -> None:
    planner = make_planner(campaign(BRANIN, initial=5))
    run(planner, lambda p: {"y": b(p)}, 6)
    batch = planner.suggest(3)
    assert len(batch) == 3 and batch[0].metadata["generator"] == "botorch.qLogNoisyExpectedImprovement"
    xs = np.array([[p.parameters["x1"], p.parameters["x2"]] for p in batch])
    assert min(np.linalg.norm(xs[i] - xs[j]) for i in range(3) for j in range(i)) > 0.05
    alone = planner.suggest(1)[0].parameters
    beside = planner.suggest(1, pending=[alone])[0]
    assert beside.metadata["pending"] == 1
    assert math.dist((alone["x1"], alone["x2"]), (beside.parameters["x1"], beside.parameters["x2"])) > 0.05


def test_same_seed_and_data_give_the_same_proposals_even_rebuilt_from_the_store() -> None:
    c = campaign(BRANIN, initial=4, seed=3)
    live = make_planner(c)
    results = run(live, lambda p: {"y": b(p)}, 6)
    # the store lists trials by number; the live planner may have received them in another order
    rebuilt = make_planner(c)
    rebuilt.ingest(list(reversed(results)))
    assert [p.parameters for p in live.suggest(2)] == [p.parameters for p in rebuilt.suggest(2)]
    # another seed: the same centre, another Sobol scramble after it (the model's proposals on the same data
    # may agree, a corner of the box for both)
    first, *rest = [p.parameters for p in make_planner(campaign(BRANIN, initial=4, seed=4)).suggest(4)]
    assert first == results[0].parameters and rest != [r.parameters for r in results[1:4]]


def test_best_under_noise_is_the_models_estimate_not_the_luckiest_reading() -> None:
    planner = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}", initial=4))
    rng = np.random.default_rng(0)
    xs = np.repeat(np.linspace(0, 1, 6), 4)  # repeated experiments show the noise
    readings = (xs - 0.4) ** 2 + 0.05 * rng.standard_normal(len(xs))
    lucky = int(np.argmax(xs))  # one reading at x = 1 (true value 0.36) came out best of all
    readings[lucky] = readings.min() - 0.05
    planner.ingest([Result({"x": float(x)}, {"y": float(y)}, i + 1) for i, (x, y) in enumerate(zip(xs, readings))])
    assert planner.log.best().trial == lucky + 1
    best = planner.best()
    assert best is not None and abs(best.parameters["x"] - 0.4) == pytest.approx(0.0, abs=0.01)


def test_under_noise_the_reported_best_is_truly_better_than_the_luckiest_reading_on_average() -> None:
    # 24 distinct experiments on a parabola, each read once with noise: too few to be "confident" that
    # any one beats the best reading, but the model's estimate is still the better guess
    xs = np.linspace(0, 1, 24)
    reported, luckiest = [], []
    for seed in range(8):
        planner = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}", initial=4))
        readings = (xs - 0.4) ** 2 + 0.03 * np.random.default_rng(seed).standard_normal(len(xs))
        planner.ingest([Result({"x": float(x)}, {"y": float(y)}, i + 1) for i, (x, y) in enumerate(zip(xs, readings))])
        reported.append((planner.best().parameters["x"] - 0.4) ** 2)
        luckiest.append((planner.log.best().parameters["x"] - 0.4) ** 2)
    assert sum(reported) < 0.5 * sum(luckiest)
    assert sum(r != lk for r, lk in zip(reported, luckiest)) >= 3


def test_under_noise_the_reported_best_is_what_the_search_model_and_a_smoother_one_rate_best_together() -> None:
    # what a campaign's end looks like under noise: experiments spread over the space, and a cluster
    # near the optimum whose true values differ by less than the noise
    overruled = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        xs = np.vstack([np.column_stack([rng.uniform(-5, 10, 20), rng.uniform(0, 15, 20)]),
                        np.array([math.pi, 2.275]) + rng.uniform(-0.75, 0.75, (12, 2))])
        readings = [branin(x) + float(rng.standard_normal()) for x in xs]
        points = [{"x1": float(a), "x2": float(c)} for a, c in xs]
        planner = make_planner(campaign(BRANIN, initial=5))
        planner.ingest([Result(p, {"y": y}, i + 1) for i, (p, y) in enumerate(zip(points, readings))])
        search = torch.tensor([p["y"]["mean"] for p in planner.predict(points)])
        expected = int(torch.argmax(_consensus_scores(planner, points, readings, points)))
        assert planner.best().parameters == points[expected]
        overruled += expected != int(torch.argmin(search))
    assert overruled >= 1  # the smoother model changed the pick somewhere: the search model no longer decides alone


def test_under_noise_single_proposals_weigh_the_noise_and_noise_free_ones_stay_analytic() -> None:
    # plug-in EI on a noisy model keeps re-proposing the incumbent (its posterior never collapses);
    # noisy EI compares the candidate with the incumbent jointly, so a repeat gains nothing
    xs = np.linspace(0, 1, 24)
    readings = (xs - 0.4) ** 2 + 0.05 * np.random.default_rng(1).standard_normal(len(xs))
    noisy = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}", initial=4))
    noisy.ingest([Result({"x": float(x)}, {"y": float(y)}, i + 1) for i, (x, y) in enumerate(zip(xs, readings))])
    assert noisy.suggest(1)[0].metadata["generator"] == "botorch.qLogNoisyExpectedImprovement"
    clean = make_planner(campaign(BRANIN, initial=5))
    run(clean, lambda p: {"y": b(p)}, 22)
    assert clean.suggest(1)[0].metadata["generator"] == "botorch.LogExpectedImprovement"


def _consensus_scores(planner, points: list[dict], readings: list[float], at: list[dict]) -> torch.Tensor:
    """The search model's and BoTorch's default GP's means at ``at``, each standardized over ``points``
    (Branin's box, ``y`` minimized), summed: rebuilt outside the planner."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    unit = lambda ps: torch.tensor([[(p["x1"] + 5) / 15, p["x2"] / 15] for p in ps], dtype=torch.double)  # noqa: E731
    smooth = SingleTaskGP(unit(points), -torch.tensor(readings, dtype=torch.double).unsqueeze(-1),
                          outcome_transform=Standardize(m=1))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(smooth.likelihood, smooth))
    score = torch.zeros(len(at), dtype=torch.double)
    for mean in (lambda ps: -torch.tensor([p["y"]["mean"] for p in planner.predict(ps)]),
                 lambda ps: smooth.posterior(unit(ps)).mean[:, 0].detach()):
        ref = mean(points)
        score += (mean(at) - ref.mean()) / ref.std()
    return score


def test_a_noisy_campaign_ends_on_the_experiments_the_models_expect_best() -> None:
    from closedloop.planner.botorch_backend import CONFIRMING

    rng = np.random.default_rng(1)
    noisy = make_planner(campaign(BRANIN, initial=5, experiments=24))
    results = run(noisy, lambda p: {"y": b(p) + float(rng.standard_normal())}, 24 - CONFIRMING)
    for trial in range(25 - CONFIRMING, 25):
        proposal = noisy.suggest(1)[0]
        assert proposal.metadata["generator"] == "botorch.ConsensusMean"
        points, readings = [r.parameters for r in results], [r.values["y"] for r in results]
        score = _consensus_scores(noisy, points, readings, [proposal.parameters, *points])
        # the whole space's best by the two models: at least as good as every experiment run
        assert float(score[0]) >= float(score[1:].max()) - 1e-3
        assert proposal.parameters not in points
        results.append(Result(proposal.parameters, {"y": b(proposal.parameters) + float(rng.standard_normal())}, trial))
        noisy.ingest([results[-1]])
    # noise-free readings keep the acquisition's choice to the end, and so does a noisy campaign not at its end
    clean = make_planner(campaign(BRANIN, initial=5, experiments=24))
    run(clean, lambda p: {"y": b(p)}, 24 - CONFIRMING)
    for trial in range(25 - CONFIRMING, 25):
        proposal = clean.suggest(1)[0]
        assert proposal.metadata["generator"] != "botorch.ConsensusMean"
        clean.ingest([Result(proposal.parameters, {"y": b(proposal.parameters)}, trial)])
    longer = make_planner(campaign(BRANIN, initial=5, experiments=40))
    longer.ingest(results[:24 - CONFIRMING])
    assert longer.suggest(1)[0].metadata["generator"] != "botorch.ConsensusMean"


def test_a_noisy_campaign_closing_in_proposes_by_knowledge_gradient_near_its_experiments(monkeypatch) -> None:
    from closedloop.planner import botorch_backend

    rng = np.random.default_rng(1)
    noisy = make_planner(campaign(BRANIN, initial=5, experiments=24))
    results = run(noisy, lambda p: {"y": b(p) + float(rng.standard_normal())}, 20)  # 4 left: closing in
    proposal = noisy.suggest(1)[0]
    assert proposal.metadata["generator"] == "botorch.qKnowledgeGradient"
    # within the closing-in box (edge FINAL_LENGTH of each range) around the experiment the model rates best
    half = 0.5 * botorch_backend.FINAL_LENGTH * 15
    assert any(abs(proposal.parameters["x1"] - r.parameters["x1"]) <= half + 1e-9
               and abs(proposal.parameters["x2"] - r.parameters["x2"]) <= half + 1e-9 for r in results)
    evidence = noisy.last_decision
    assert evidence is not None and evidence["acquisition"] == "qKnowledgeGradient"
    assert math.isfinite(evidence["points"][0]["acquisition_value"])
    assert evidence["points"][0]["acquisition_value"] == evidence["acquisition_joint"]
    # the same data and seed give the same proposal (a planner rebuilt after a crash, replay)
    rebuilt = make_planner(campaign(BRANIN, initial=5, experiments=24))
    rebuilt.ingest(results)
    assert rebuilt.suggest(1)[0].parameters == proposal.parameters
    # with an experiment in flight the gradient counts it as pending
    assert noisy.suggest(1, pending=[proposal.parameters])[0].metadata["generator"] == "botorch.qKnowledgeGradient"
    # past KG_UP_TO experiments its cost is not paid: EI
    monkeypatch.setattr(botorch_backend, "KG_UP_TO", 19)
    assert noisy.suggest(1)[0].metadata["generator"] == "botorch.LogExpectedImprovement"
    # noise-free readings close in by EI
    clean = make_planner(campaign(BRANIN, initial=5, experiments=24))
    run(clean, lambda p: {"y": b(p)}, 20)
    assert clean.suggest(1)[0].metadata["generator"] == "botorch.LogExpectedImprovement"


def test_noise_free_best_is_the_best_reading() -> None:
    planner = make_planner(campaign(BRANIN, initial=5))
    results = run(planner, lambda p: {"y": b(p)}, 8)
    assert planner.best() == min(results, key=lambda r: r.values["y"])


def two_objectives(p: dict) -> dict:
    return {"f1": (p["x1"] - 0.2) ** 2 + p["x2"] ** 2, "f2": (p["x1"] - 0.8) ** 2 + (p["x2"] - 1) ** 2}


def test_two_objectives_give_a_pareto_front_and_a_growing_hypervolume() -> None:
    c = campaign("x1: {type: continuous, bounds: [0, 1]}\nx2: {type: continuous, bounds: [0, 1]}",
                 objectives="f1: {goal: minimize, threshold: 1.5}\nf2: {goal: minimize}", initial=5)
    planner = make_planner(c)
    run(planner, two_objectives, 5)
    before = planner.hypervolume()
    batch = planner.suggest(2)
    assert batch[0].metadata["generator"] == "botorch.qLogNEHVI"
    planner.ingest([Result(p.parameters, two_objectives(p.parameters), 6 + i) for i, p in enumerate(batch)])
    run(planner, two_objectives, 1, start=8)
    assert planner.hypervolume() >= before > 0
    front = planner.pareto_front()
    ys = [(r.values["f1"], r.values["f2"]) for r in front]
    for r in planner.log.results:
        assert not any(a <= r.values["f1"] and c2 <= r.values["f2"] and (a, c2) != (r.values["f1"], r.values["f2"])
                       for a, c2 in ys if r in front)
    dominated = [r for r in planner.log.results if r not in front]
    assert all(any(a <= r.values["f1"] and c2 <= r.values["f2"] for a, c2 in ys) for r in dominated)


@pytest.mark.parametrize("unit", [1e-12, 1e12])
def test_outputs_in_any_unit_get_the_proposals_of_ordinary_ones(unit: float) -> None:
    # a current in amperes or a count per cm3: the model must not see only noise, nor overflow
    ordinary, scaled = make_planner(campaign(BRANIN, initial=5)), make_planner(campaign(BRANIN, initial=5))
    ordinary_runs = run(ordinary, lambda p: {"y": b(p)}, 9)
    scaled_runs = run(scaled, lambda p: {"y": unit * b(p)}, 9)
    for a, c in zip(ordinary_runs[5:], scaled_runs[5:]):
        assert a.parameters == pytest.approx(c.parameters, abs=1e-4 * 15)  # 1e-4 of the ranges
    assert scaled.best().trial == ordinary.best().trial
    # the model's view (dashboard, provenance) in measured units
    at = [ordinary.best().parameters]
    mine, theirs = scaled.predict(at)[0]["y"], ordinary.predict(at)[0]["y"]
    assert mine["mean"] == pytest.approx(unit * theirs["mean"], rel=1e-3)
    assert mine["std"] == pytest.approx(unit * theirs["std"], rel=1e-2) and theirs["std"] > 0


def test_two_objectives_of_extreme_size_still_get_model_proposals() -> None:
    c = campaign("x1: {type: continuous, bounds: [0, 1]}\nx2: {type: continuous, bounds: [0, 1]}",
                 objectives="f1: {goal: minimize}\nf2: {goal: minimize}", initial=5)
    for unit in (1e-12, 1e12):
        planner = make_planner(c)
        run(planner, lambda p: {k: unit * v for k, v in two_objectives(p).items()}, 9)
        assert planner.log.results[-1].values is not None
        proposal = planner.suggest(1)[0]
        assert proposal.metadata["generator"] == "botorch.qLogNEHVI" and math.isfinite(proposal.metadata["acquisition_value"])
        assert len(planner.pareto_front()) >= 2


def test_outcome_constraints_steer_the_search_and_the_best_is_feasible() -> None:
    c = campaign(BRANIN, objectives="y: {goal: minimize}", extra='outcome_constraints: ["cost <= 2"]', initial=6)
    planner = make_planner(c)

    def measure(p: dict) -> dict:
        return {"y": b(p), "cost": p["x1"]}  # the best Branin minima at x1 = pi and 9.42 are too costly

    results = run(planner, measure, 10)
    best = planner.best()
    assert best is not None and best.values["cost"] <= 2
    later = results[6:]
    assert sum(r.values["cost"] <= 2.5 for r in later) >= len(later) - 1
    assert later[-1].parameters and results[-1].values is not None


@pytest.mark.slow
def test_failed_experiments_teach_the_planner_where_not_to_go() -> None:
    c = campaign("x1: {type: continuous, bounds: [0, 1]}\nx2: {type: continuous, bounds: [0, 1]}", initial=6)
    planner = make_planner(c)

    def measure(p: dict) -> dict | None:
        # better towards x1 = 1, but the instrument fails beyond x1 = 0.6
        return None if p["x1"] > 0.6 else {"y": -p["x1"] + 0.1 * p["x2"]}

    results = run(planner, measure, 12)
    assert sum(r.failed for r in results[:6]) >= 2
    # a planner that ignored failures would chase x1 = 1 (and fail) every time
    later = results[6:]
    assert sum(r.failed for r in later) <= 2
    assert all(r.parameters["x1"] < 0.7 for r in later[1:])
    assert planner.best() is not None and not planner.best().failed


def test_candidate_tables_are_used_row_by_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    table = tmp_path / "library.csv"
    rows = [(round(x1, 3), round(x2, 3), s) for x1, x2, s in
            zip(rng.uniform(-5, 10, 40), rng.uniform(0, 15, 40), rng.choice(["a", "b"], 40))]
    table.write_text("x1,x2,s\n" + "\n".join(f"{x1},{x2},{s}" for x1, x2, s in rows) + "\n")
    c = campaign(BRANIN + "\ns: {type: categorical, values: [a, b]}", extra=f"candidates: {table}", initial=4,
                 experiments=20)
    planner = make_planner(c)
    seen = run(planner, lambda p: {"y": b(p) + (0 if p["s"] == "a" else 5)}, 7)
    batch = planner.suggest(3, pending=[{"x1": rows[0][0], "x2": rows[0][1], "s": rows[0][2]}])
    chosen = [(r.parameters["x1"], r.parameters["x2"], r.parameters["s"]) for r in seen] + [
        (p.parameters["x1"], p.parameters["x2"], p.parameters["s"]) for p in batch]
    assert all(row in rows for row in chosen)
    assert len(set(chosen)) == len(chosen) and rows[0] not in chosen[7:]
    assert batch[0].metadata["generator"].startswith("botorch.")
    # the evidence behind the choice, for provenance: each chosen row, its prediction, the thread count
    evidence = planner.last_decision
    assert evidence is not None and evidence["torch_threads"] == 1
    assert [p["parameters"] for p in evidence["points"]] == [p.parameters for p in batch]
    assert all(math.isfinite(p["prediction"]["y"]["mean"]) for p in evidence["points"])


@pytest.mark.parametrize("backend", ["botorch", "sobol"])
def test_a_table_whose_rows_may_repeat_still_starts_with_a_spread_of_rows(tmp_path: Path, backend: str) -> None:
    table = tmp_path / "library.csv"
    table.write_text("x1,x2\n" + "\n".join(f"{x1},{x2}" for x1, x2 in zip(range(-5, 10), range(15))) + "\n")
    c = campaign(BRANIN, extra=f"candidates: {{file: {table}, repeats: true}}", initial=5, experiments=20,
                 backend=backend)
    planner = make_planner(c)
    # one at a time: nothing is used up, and the design took the first row of its shuffle every time
    design = [(r.parameters["x1"], r.parameters["x2"]) for r in run(planner, lambda p: {"y": b(p)}, 5)]
    assert len(set(design)) == 5


MIXED = """
x1: {type: continuous, bounds: [-5, 10]}
x2: {type: continuous, bounds: [0, 15]}
n: {type: integer, bounds: [0, 4]}
c: {type: categorical, values: [p, q, r]}
"""


def test_mixed_spaces_with_constraints_give_exact_proposals() -> None:
    c = campaign(MIXED, extra='constraints: ["x1 + x2 <= 12", "x1 + 2 * n >= 0"]', initial=5)
    planner = make_planner(c)
    results = run(planner, lambda p: {"y": b(p) + p["n"] + (0 if p["c"] == "q" else 3)}, 6)
    batch = planner.suggest(2)
    for p in [r.parameters for r in results] + [p.parameters for p in batch]:
        assert planner.space.feasible(p, tolerance=0)
        assert p["x1"] + p["x2"] <= 12 and p["x1"] + 2 * p["n"] >= 0 and isinstance(p["n"], int)


def test_mixture_equality_holds_after_decoding() -> None:
    c = campaign("a: {type: continuous, bounds: [0, 1]}\nb: {type: continuous, bounds: [0, 1]}\n"
                 "w: {type: continuous, bounds: [0.01, 1], scale: log}", extra='constraints: ["a + b + w == 1"]',
                 initial=4)
    planner = make_planner(c)
    results = run(planner, lambda p: {"y": (p["a"] - 0.5) ** 2 + (p["w"] - 0.2) ** 2}, 5)
    for p in [r.parameters for r in results] + [p.parameters for p in planner.suggest(2)]:
        assert abs(p["a"] + p["b"] + p["w"] - 1) <= 1e-9


def test_inequalities_that_pin_a_value_still_give_model_proposals() -> None:
    """``0.01 a <= 0.01`` with ``0.02 a >= 0.02`` leave a = 1: before, the design failed, and once past it the
    mixed optimizer fixed a and found the constraint "not met with fixed features", so nothing was proposed."""
    c = campaign("a: {type: integer, bounds: [0, 3]}\nx: {type: continuous, bounds: [0, 1]}",
                 extra='constraints: ["0.01 * a <= 0.01", "0.02 * a >= 0.02"]', initial=3)
    planner = make_planner(c)
    results = run(planner, lambda p: {"y": (p["x"] - 0.3) ** 2}, 6)
    assert [r.parameters["a"] for r in results] == [1] * 6
    assert planner.suggest(1)[0].metadata["generator"].startswith("botorch.")


@pytest.mark.parametrize("backend", ["sobol", "random"])
def test_baselines_accept_every_campaign_and_count_only_feasible_experiments(backend: str) -> None:
    c = campaign(BRANIN, objectives="y: {goal: minimize}\nz: {goal: maximize}",
                 extra='outcome_constraints: ["y <= 50"]', backend=backend)
    planner = make_planner(c)
    results = run(planner, lambda p: {"y": b(p), "z": p["x1"]}, 12)
    front = planner.pareto_front()
    assert front and all(r.values["y"] <= 50 for r in front)
    assert len({tuple(r.parameters.values()) for r in results}) == 12


@pytest.mark.parametrize("backend", ["sobol", "random"])
def test_baselines_give_every_allowed_number_an_equal_share(backend: str) -> None:
    planner = make_planner(campaign("n: {type: integer, bounds: [1, 4]}\nd: {type: discrete, values: [6, 8, 10, 12]}",
                                    experiments=2000, backend=backend))
    points = [p.parameters for p in planner.suggest(800)]
    for name, values in (("n", [1, 2, 3, 4]), ("d", [6, 8, 10, 12])):
        counts = [sum(p[name] == v for p in points) for v in values]
        # rounded, the smallest and the largest got half a share each: about 133 of 800 against 200
        assert min(counts) > 150, (name, counts)


def hartmann_like(n: int, seed: int = 0) -> list[Result]:
    from simulators.surfaces import hartmann6

    rng = np.random.default_rng(seed)
    xs = rng.uniform(size=(n, 6))
    return [Result({f"x{i + 1}": float(v) for i, v in enumerate(x)}, {"y": hartmann6(x)}, k + 1)
            for k, x in enumerate(xs)]


HARTMANN = "\n".join(f"x{i}: {{type: continuous, bounds: [0, 1]}}" for i in range(1, 7))


def counting_fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the hyperparameter fits the planner makes (its expensive step), in order."""
    sizes: list[int] = []
    fit = gp.fit_gp

    def counted(x, y, categories, seed):
        sizes.append(x.shape[0])
        return fit(x, y, categories, seed)

    monkeypatch.setattr(gp, "fit_gp", counted)
    return sizes


# Speed itself is measured by `closedloop bench planner` (seconds per suggestion at 10 to 1,000
# observations); these tests check the mechanisms that keep it low.
def test_hyperparameters_are_fitted_at_checkpoints_not_at_every_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    fits = counting_fits(monkeypatch)
    planner = BotorchPlanner(campaign(HARTMANN, experiments=1000))
    planner.ingest(hartmann_like(200))
    planner.suggest(1)
    assert len(fits) == 1 and fits[0] == min(gp.checkpoint(200), gp.MAX_FIT)
    data = hartmann_like(216)
    assert gp.checkpoint(215) == gp.checkpoint(200) < gp.checkpoint(216)
    for k in range(200, 215):  # up to the next checkpoint the fit is reused
        planner.ingest(data[k:k + 1])
        planner.suggest(1)
    assert len(fits) == 1
    planner.ingest(data[215:])
    planner.suggest(1)
    assert len(fits) == 2


@pytest.mark.slow
def test_a_thousand_experiments_fit_and_condition_on_bounded_subsets(monkeypatch: pytest.MonkeyPatch) -> None:
    fits = counting_fits(monkeypatch)
    planner = BotorchPlanner(campaign(HARTMANN, experiments=2000))
    results = hartmann_like(1000)
    planner.ingest(results)
    (proposal,) = planner.suggest(1)
    assert fits == [gp.MAX_FIT]
    model = planner._fit().model
    assert model.train_inputs[0].shape[0] == gp.MAX_TRAIN
    # the subset keeps the best experiments, so the incumbent the acquisition improves on is the true one
    best = max(results, key=lambda r: -r.values["y"])
    x = planner.space.encode_many([best.parameters])
    assert (model.train_inputs[0] == x).all(-1).any()
    assert planner.space.feasible(proposal.parameters, tolerance=0)


@pytest.mark.slow
def test_the_last_experiments_close_in_on_the_incumbent_in_mixed_spaces() -> None:
    # seed 0: left free, the last experiment would try category r beside the incumbent's p
    planner = make_planner(campaign(MIXED, initial=6, experiments=11, seed=0))
    run(planner, lambda p: {"y": b(p) + p["n"] + {"p": 0.0, "q": 0.3, "r": 0.6}[p["c"]]}, 9)
    final = planner.suggest(1)[0]
    assert "trust_region" in final.metadata and planner.space.feasible(final.parameters, tolerance=0)
    # a category has no neighbours to close in on: the incumbent's is held
    surrogate = planner._fit()
    incumbent = planner.space.decode(surrogate.train_x[planner._incumbent_mean(surrogate)[0]])
    assert final.parameters["c"] == incumbent["c"] == "p"
    # and every continuous column is held to a box of FINAL_LENGTH (encoded units) around the incumbent's
    step = planner.space.encode(final.parameters) - planner.space.encode(incumbent)
    assert planner.space.continuous_columns
    assert all(abs(float(step[j])) <= FINAL_LENGTH / 2 + 1e-9 for j in planner.space.continuous_columns)


def test_experiments_in_flight_count_as_spent_when_closing_in() -> None:
    planner = make_planner(campaign(BRANIN, initial=5, experiments=20))
    run(planner, lambda p: {"y": b(p)}, 16)
    in_flight = [planner.space.decode(x) for x in planner.space.sample(3, seed=7)]
    # the 20th and last experiment of the budget: closing in, as it would with the three finished
    (last,) = planner.suggest(1, pending=in_flight)
    assert last.metadata.get("trust_region") == pytest.approx(FINAL_LENGTH)
    (earlier,) = planner.suggest(1)
    assert "trust_region" not in earlier.metadata


def test_categories_are_one_hot_in_one_kernel_with_a_width_scaled_prior() -> None:
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.input import NumericToCategoricalEncoding

    def fit_on(parameters: str) -> object:
        planner = make_planner(campaign(parameters, initial=4, experiments=10))
        run(planner, lambda p: {"y": {"a": 1.0, "b": 0.0, "c": 2.0}[p["c"]] + float(p["n"]) ** 2}, 6)
        (proposal,) = planner.suggest(1)
        assert planner.space.feasible(proposal.parameters, tolerance=0)
        return planner._fit().model

    numeric = gp.make_gp(torch.zeros(1, 4, dtype=torch.double), torch.zeros(1, 1, dtype=torch.double), {})
    for second in ("n: {type: discrete, values: [-1, 0, 1, 2]}", "n: {type: continuous, bounds: [-1, 2]}"):
        model = fit_on("c: {type: categorical, values: [a, b, c]}\n" + second)
        assert type(model) is SingleTaskGP and isinstance(model.input_transform, NumericToCategoricalEncoding)
        # one Matern lengthscale per choice and per number: 3 + 1, with a prior whose mode grows with that width
        assert model.covar_module.lengthscale.numel() == 4
        assert model.covar_module.lengthscale_prior.mode > numeric.covar_module.base_kernel.lengthscale_prior.mode


def test_a_finite_space_gets_the_best_of_all_its_points() -> None:
    # 6 x 10 x 4 = 240 points: enumerated, so no local search can stop short of the best one
    planner = make_planner(campaign("c: {type: categorical, values: [a, b, c, d, e, f]}\n"
                                    "n: {type: integer, bounds: [0, 9]}\n"
                                    "k: {type: discrete, values: [1, 2, 4, 8]}", initial=5, experiments=20))
    shift = {"a": 3.0, "b": 1.0, "c": 0.0, "d": 2.0, "e": 4.0, "f": 5.0}
    run(planner, lambda p: {"y": shift[p["c"]] + (p["n"] - 6) ** 2 / 9 + abs(math.log2(p["k"]) - 2)}, 9)
    (proposal,) = planner.suggest(1)
    assert proposal.metadata["generator"] == "botorch.LogExpectedImprovement"
    surrogate = planner._fit()
    acquisition, _ = planner._acquisition(surrogate, [], 1, 0)
    grid = planner.space.grid
    with torch.no_grad():
        values = acquisition(grid.unsqueeze(1))
        chosen = acquisition(planner.space.encode(proposal.parameters).reshape(1, 1, -1))
    assert len(grid) == 240 and float(chosen) >= float(values.max()) - 1e-9


def noisy_plane(planner, points: list[tuple[float, float]], seed: int = 0) -> list[Result]:
    """``y = a + b`` plus noise (sd 0.3) at ``points``, ingested."""
    rng = np.random.default_rng(seed)
    results = [Result({"a": a, "b": b}, {"y": a + b + float(rng.normal(0, 0.3))}, t) for t, (a, b) in enumerate(points, 1)]
    planner.ingest(results)
    return results


def test_a_finite_space_proposes_no_experiment_run_or_in_flight_until_every_point_is_used() -> None:
    planner = make_planner(campaign("a: {type: integer, bounds: [0, 4]}\nb: {type: integer, bounds: [0, 4]}",
                                    objectives="y: {goal: maximize}", experiments=60))
    # every point but the worst, twice: the noisy best (4, 4) is what the acquisition likes most
    noisy_plane(planner, [(a, b) for _ in range(2) for a in range(5) for b in range(5) if (a, b) != (0, 0)])
    assert [p.parameters for p in planner.suggest(1)] == [{"a": 0, "b": 0}]
    # with that one in flight nothing new is left: a point runs again rather than the station waiting
    (again,) = planner.suggest(1, pending=[{"a": 0, "b": 0}])
    assert planner.space.feasible(again.parameters, tolerance=0)


def test_a_search_that_ends_on_an_experiment_run_proposes_another() -> None:
    # the last experiments all at the corner (4, 1) of a plane, with noise: closing in, the search ends
    # exactly there, and (before this rule) proposed it again, and twice in a batch
    planner = make_planner(campaign("a: {type: integer, bounds: [0, 4]}\nb: {type: continuous, bounds: [0, 1]}",
                                    objectives="y: {goal: maximize}", experiments=40))
    rng = np.random.default_rng(1)
    spread = [(int(rng.integers(0, 5)), float(rng.uniform(0, 1))) for _ in range(25)]
    results = noisy_plane(planner, spread + [(4, 1.0)] * 11)
    run_keys = {planner.space.key(r.parameters) for r in results}
    for n in (1, 2):
        proposals = [p.parameters for p in planner.suggest(n)]
        keys = {planner.space.key(p) for p in proposals}
        assert len(keys) == n and not keys & run_keys, proposals
        assert all(planner.space.feasible(p, tolerance=0) and p["a"] == 4 for p in proposals)


def test_proposals_do_not_depend_on_the_callers_default_dtype() -> None:
    # another library in the same process may change torch's default dtype (Xopt sets float64 on import)
    def proposals() -> list[dict]:
        planner = make_planner(campaign(MIXED, initial=5, experiments=12))
        results = run(planner, lambda p: {"y": b(p) + p["n"] + (0 if p["c"] == "q" else 3)}, 7)
        return [r.parameters for r in results] + [p.parameters for p in planner.suggest(2)] + [planner.best().parameters]

    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        as_float32 = proposals()
        assert torch.get_default_dtype() == torch.float32  # the caller's setting is put back
        torch.set_default_dtype(torch.float64)
        assert proposals() == as_float32
    finally:
        torch.set_default_dtype(previous)


def test_planners_in_two_threads_both_think_in_double_precision_on_one_thread() -> None:
    # a daemon's planner thread and its filler overlap; torch's default dtype and thread count are per process
    import threading

    from closedloop.planner.numerics import in_planner_numerics

    inside, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    @in_planner_numerics
    def first() -> None:
        inside.set()
        second_in.wait(10)

    @in_planner_numerics
    def second() -> None:
        second_in.set()
        first_out.wait(10)  # the first thread has left meanwhile
        seen["second"] = torch.get_default_dtype()
        seen["threads"] = torch.get_num_threads()

    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(2)
        a = threading.Thread(target=first)
        a.start()
        inside.wait(10)
        b_thread = threading.Thread(target=second)
        b_thread.start()
        a.join(10)
        first_out.set()
        b_thread.join(10)
        assert seen["second"] == torch.float64 and seen["threads"] == 1
        # put back once the last one left
        assert torch.get_default_dtype() == torch.float32 and torch.get_num_threads() == 2
    finally:
        torch.set_default_dtype(previous)
        torch.set_num_threads(threads)


# -- found by probing the planner's public interface (2026-12-05) ---------------------------------------------


def test_a_finite_design_repeats_no_experiment_run_in_flight_or_in_the_batch() -> None:
    two_by_two = "a: {type: integer, bounds: [0, 1]}\nb: {type: integer, bounds: [0, 1]}"
    for seed in range(6):
        planner = make_planner(campaign(two_by_two, experiments=12, seed=seed, initial=4))
        run(planner, lambda p: {"y": float(p["a"] + 2 * p["b"])}, 4)
        assert len({(r.parameters["a"], r.parameters["b"]) for r in planner.log.results}) == 4, seed
    fresh = make_planner(campaign(two_by_two, experiments=12, initial=4))
    (p,) = fresh.suggest(1, pending=[{"a": 1, "b": 1}, {"a": 0, "b": 1}])
    assert (p.parameters["a"], p.parameters["b"]) in {(0, 0), (1, 0)}
    batch = [tuple(q.parameters.values()) for q in fresh.suggest(6)]
    assert len(set(batch[:4])) == 4 and len(batch) == 6  # then points again rather than a station waiting


def test_a_finite_space_gives_as_many_proposals_as_asked_even_past_its_size() -> None:
    planner = make_planner(campaign("n: {type: integer, bounds: [0, 2]}\ns: {type: categorical, values: [A, B]}",
                                    experiments=20, initial=3))
    for t, q in enumerate(planner.suggest(4)):
        planner.ingest([Result(q.parameters, {"y": (q.parameters["n"] - 1) ** 2 + 0.1 * t}, t)])
    proposals = planner.suggest(10)
    assert len(proposals) == 10
    assert len({tuple(p.parameters.values()) for p in proposals[:6]}) == 6


def test_a_constraint_leaving_one_point_does_not_freeze_the_other_parameters() -> None:
    parameters = "a: {type: continuous, bounds: [0, 1]}\nb: {type: continuous, bounds: [0, 1]}\n" \
                 "c: {type: continuous, bounds: [0, 1]}"
    for backend in ("botorch", "sobol"):
        planner = make_planner(campaign(parameters, extra='constraints: ["a + b >= 2"]', experiments=12,
                                        backend=backend, initial=4))
        proposals = [p.parameters for p in planner.suggest(4)]
        assert all(p["a"] + p["b"] >= 2 for p in proposals)
        assert max(p["c"] for p in proposals) - min(p["c"] for p in proposals) > 0.5, backend
    planner = make_planner(campaign(parameters, extra='constraints: ["a + b >= 2"]', experiments=10, initial=4))
    run(planner, lambda p: {"y": (p["c"] - 0.7) ** 2}, 10)
    assert abs(planner.best().parameters["c"] - 0.7) < 0.05


def test_failures_do_not_pull_the_noise_free_best_away_from_the_best_reading() -> None:
    planner = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}\nz: {type: continuous, bounds: [0, 1]}",
                                    experiments=16, initial=5))
    # the best lies on the edge of where the instrument fails
    results = run(planner, lambda p: None if p["x"] > 0.5 else {"y": (p["x"] - 0.45) ** 2 + (p["z"] - 0.5) ** 2}, 14)
    assert sum(r.failed for r in results) >= 2
    best_reading = min((r for r in results if not r.failed), key=lambda r: r.values["y"])
    assert planner.best() == best_reading


def test_readings_of_any_finite_size_or_numpy_type_are_results() -> None:
    planner = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}", experiments=12, initial=3))
    results = run(planner, lambda p: {"y": 1e200 * (1 + p["x"])}, 3)
    assert len(planner.suggest(1)) == 1
    assert planner.best().values["y"] == min(r.values["y"] for r in results)
    for backend in ("botorch", "sobol"):
        other = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}", experiments=10, backend=backend))
        other.ingest([Result({"x": 0.3}, {"y": np.float32(0.25)}, 0), Result({"x": 0.9}, {"y": np.int64(5)}, 1)])
        assert other.best().parameters == {"x": 0.3}, backend


@pytest.mark.parametrize("backend", ["botorch", "sobol", "random"])
def test_a_result_that_cannot_be_an_experiment_of_the_campaign_is_refused_whole(backend: str) -> None:
    c = campaign("x: {type: continuous, bounds: [0, 1]}\ns: {type: categorical, values: [A, B]}\n"
                 "n: {type: integer, bounds: [1, 5]}", experiments=12, backend=backend, initial=3)
    planner = make_planner(c)
    good = planner.suggest(1)[0].parameters
    for bad, problem in (({"x": 0.2, "s": "C", "n": 2}, "s='C' is not one of"),
                         ({"x": 0.2, "s": "A"}, "parameter 'n' is missing"),
                         ({"x": 2.5, "s": "A", "n": 2}, "x=2.5 is outside [0.0, 1.0]"),
                         ({"x": "0.2", "s": "A", "n": 2}, "is not a number"),
                         ({"x": 0.2, "s": "A", "n": 2.5}, "n=2.5 is not an integer")):
        with pytest.raises(PlannerError, match=re.escape(problem)):
            planner.ingest([Result(good, {"y": 1.0}, 0), Result(bad, {"y": 0.5}, 1)])
        assert planner.log.results == []  # none of the batch was taken
    planner.ingest([Result(good, {"y": 1.0}, 0), Result({"x": 0.2, "s": "B", "n": 2}, {"y": 0.5}, 1)])
    assert len(planner.suggest(1)) == 1 and planner.best().values == {"y": 0.5}


def test_an_integer_of_a_billion_values_is_searched_without_listing_them() -> None:
    c = campaign("n: {type: integer, bounds: [0, 1000000000]}\nx: {type: continuous, bounds: [0, 1]}",
                 experiments=12, initial=4)
    planner = make_planner(c)
    run(planner, lambda p: {"y": (p["n"] / 1e9 - 0.3) ** 2 + p["x"]}, 7)
    assert all(isinstance(r.parameters["n"], int) and 0 <= r.parameters["n"] <= 10**9 for r in planner.log.results)


def test_a_constraint_written_in_large_units_is_the_constraint_it_means() -> None:
    c = campaign("x1: {type: continuous, bounds: [-5, 10]}\nx2: {type: continuous, bounds: [0, 15]}",
                 extra='constraints: ["1e15 * x1 + 1e15 * x2 <= 5e15"]', experiments=12, initial=4)
    planner = make_planner(c)
    run(planner, lambda p: {"y": (p["x1"] - 1) ** 2 + (p["x2"] - 3) ** 2}, 7)
    (constraint,) = c.linear_constraints
    assert all(constraint.satisfied(r.parameters, tolerance=0) for r in planner.log.results)
