"""The planner benchmark: a one-seed, tiny-budget run, its JSON, and regret from known optima."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from typer.testing import CliRunner

from closedloop.bench import PEERS, PROBLEMS, planner_benchmark
from closedloop.bench.peers import Peer
from closedloop.bench.problems import DATASETS
from closedloop.bench.runner import OURS, SPEED_REPEATS, hypervolume_2d, regret_trace, summarize
from closedloop.cli import app


def test_every_problem_knows_its_optimum_and_reaches_it():
    known = {
        "branin": {"x1": math.pi, "x2": 2.275},
        "hartmann6": dict(zip([f"x{i}" for i in range(1, 7)], [0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573])),
        "ackley5": dict(zip([f"x{i}" for i in range(1, 6)], [7.1, -11.3, 3.7, 15.9, -5.3])),
        "mixed4": {"u1": (math.pi + 5) / 15, "u2": 2.275 / 15, "c1": "b", "c2": "p"},
        "constrained": {"x1": 0.1954, "x2": 0.4044},
        "direct_arylation": {"base": "CsOPiv", "ligand": "CgMe-PPh", "solvent": "DMAc", "concentration": 0.153,
                             "temperature": 105.0},
        "suzuki": {"catalyst": "P1-L4", "t_res": 189.0, "temperature": 110.0, "catalyst_loading": 2.51},
    }
    for name, point in known.items():
        if name in ("direct_arylation", "suzuki") and not DATASETS.exists():
            continue
        problem = PROBLEMS[name]()
        [regret] = regret_trace(problem, [problem.evaluate(point)])
        assert regret == pytest.approx(0.0, abs=1e-5 * problem.range), name
    # A worse experiment has exactly its distance to the optimum as regret; an infeasible one the whole range.
    branin = PROBLEMS["branin"]()
    worse = branin.evaluate({"x1": 0.0, "x2": 0.0})
    assert regret_trace(branin, [worse]) == [pytest.approx(worse["y"] - 0.39788735772973816)]
    constrained = PROBLEMS["constrained"]()
    assert regret_trace(constrained, [constrained.evaluate({"x1": 0.0, "x2": 0.0})]) == [constrained.range]


@pytest.mark.skipif(not DATASETS.exists(), reason="needs simulators/data")
def test_the_suzuki_emulator_answers_with_the_nearest_experiment_of_the_same_catalyst():
    suzuki = PROBLEMS["suzuki"]()
    best = {"t_res": 189.0, "temperature": 110.0, "catalyst_loading": 2.51}
    assert suzuki.evaluate({"catalyst": "P1-L4", **best})["yld"] == 98.7
    # close to the best conditions, but another catalyst: that catalyst's own nearest experiment
    assert suzuki.evaluate({"catalyst": "P1-L2", **best})["yld"] < 98.7
    assert suzuki.evaluate({"catalyst": "P1-L4", "t_res": 190.0, "temperature": 109.0, "catalyst_loading": 2.5}) == {"yld": 98.7}
    assert suzuki.worst == 0.6 and suzuki.budget == 40


def test_hypervolume_regret_of_the_two_objective_problem():
    assert hypervolume_2d(np.array([[1.0, 1.0]]), np.array([2.0, 3.0])) == 2.0
    assert hypervolume_2d(np.array([[1.0, 2.0], [1.5, 1.0], [3.0, 0.0]]), np.array([2.0, 3.0])) == 1.5
    problem = PROBLEMS["two_objective"]()
    x = np.linspace(0, 1, 60)
    grid = [problem.evaluate({"x1": a, "x2": b}) for a in x for b in x]
    trace = regret_trace(problem, grid)
    assert all(later <= earlier for earlier, later in zip(trace, trace[1:]))
    # 54.182675253237775 is what BoTorch's Hypervolume gives for this grid of BraninCurrin(negate=True).
    assert trace[-1] == pytest.approx(59.36011874867746 - 54.182675253237775, rel=1e-9)


def test_a_missing_peer_is_named_not_fatal():
    class Absent(Peer):
        name, label, modules = "absent", "absent", ("no_such_module_for_closedloop",)

    assert "no_such_module_for_closedloop" in Absent().missing()
    assert PEERS["sobol"].missing() is None


def test_tiny_run_writes_a_complete_report(tmp_path):
    path = tmp_path / "planner.json"
    # The emulators read ../shared/datasets/, which sits beside every checkout of the project.
    problems = ["branin", "constrained", "two_objective"] + (["direct_arylation"] if DATASETS.exists() else [])
    report = planner_benchmark(problems=problems, peers=["sobol", "optuna"], seeds=1, budget_scale=0.2,
                               speed_sizes=(10,), json_path=path, command="test")
    data = json.loads(path.read_text())
    assert data["summary"] == json.loads(json.dumps(report["summary"]))
    assert data["config"]["seeds"] == 1 and data["finished"]
    assert set(data["problems"]) == set(problems)
    peers = ["sobol"] + ([] if PEERS["optuna"].missing() else ["optuna"])
    assert len(data["runs"]) == len(problems) * len(peers)
    for run in data["runs"]:
        problem = PROBLEMS[run["problem"]]().with_budget(data["problems"][run["problem"]]["budget"])
        assert run["status"] == "ok", run
        trace = run["regret_trace"]
        assert len(trace) == problem.budget == len(run["seconds_per_suggestion"])
        assert all(math.isfinite(r) and 0 <= r <= problem.range + 1e-9 for r in trace)
        assert all(later <= earlier for earlier, later in zip(trace, trace[1:]))
        assert run["final_regret"] == trace[-1]
        assert run["log10_final_regret"] == pytest.approx(math.log10(max(trace[-1], 1e-8)))
        if not problem.multi_objective:
            assert 0 <= run["reported_regret"] <= problem.range
    for problem in problems:
        for peer in peers:
            entry = data["summary"][problem][peer]
            assert entry["seeds"] == 1 and math.isfinite(entry["median_log10_regret"])
            low, high = entry["iqr_log10_regret"]
            assert low <= entry["median_log10_regret"] <= high
            assert entry["median_seconds_per_suggestion"] >= 0
    speed = data["speed"]["seconds_per_suggestion"]
    assert sorted(speed) == sorted(peers)
    for peer in peers:
        assert set(speed[peer]) == {"10"} and 0 <= speed[peer]["10"] < 60
    # each figure is the median of SPEED_REPEATS suggestions, every one kept
    for record in data["speed"]["measurements"]:
        assert len(record["samples"]) == SPEED_REPEATS
        assert record["seconds"] == statistics.median(record["samples"]) == speed[record["peer"]]["10"]


def test_every_peer_is_compared_with_ours_seed_by_seed():
    def run(peer: str, seed: int, log10: float) -> dict:
        return {"problem": "branin", "peer": peer, "seed": seed, "status": "ok", "log10_final_regret": log10,
                "final_regret": 10**log10, "experiments_to_1pct": None, "median_seconds_per_suggestion": 0.1}

    ours = [-3.0, -2.0, -8.0, -1.0, -4.0, -5.0, -2.5, -3.5]
    close = [-2.0, -2.0, -8.0, 0.0, -4.5, -4.0, -2.0, -3.0]  # ours lower on 5 seeds, higher on 1, 2 ties
    far = [x + 2.0 for x in ours]  # ours lower on every seed
    runs = [run(OURS, s, x) for s, x in enumerate(ours)] + [run("close", s, x) for s, x in enumerate(close)]
    runs += [run("far", s, x) for s, x in enumerate(far)] + [run("far", 99, 0.0)]  # a seed ours lacks: unpaired
    summary = summarize(runs, {"branin": 30})["branin"]
    assert "against_ours" not in summary[OURS]
    assert summary["close"]["against_ours"]["seeds"] == 8
    assert (summary["close"]["against_ours"]["ours_better"], summary["close"]["against_ours"]["ours_worse"]) == (5, 1)
    assert summary["far"]["against_ours"] == {"seeds": 8, "ours_better": 8, "ours_worse": 0,
                                              "p_value": pytest.approx(2 / 2**8)}  # exact: all 8 signs alike
    assert summary["far"]["against_ours"]["p_value"] < 0.05 < summary["close"]["against_ours"]["p_value"]
    # equal runs everywhere: nothing to test, p = 1
    same = summarize([run(OURS, 0, -2.0), run("same", 0, -2.0)], {"branin": 30})["branin"]["same"]
    assert same["against_ours"] == {"seeds": 1, "ours_better": 0, "ours_worse": 0, "p_value": 1.0}


def test_cli_runs_the_benchmark_and_refuses_unknown_names(tmp_path):
    path = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["bench", "planner", "-p", "branin", "--peer", "sobol", "--seeds", "1",
                                      "--budget-scale", "0.2", "--speed", "0", "--json", str(path),
                                      "--markdown", str(tmp_path / "out.md")])
    assert result.exit_code == 0, result.output
    assert "| Sobol |" in (tmp_path / "out.md").read_text()
    assert "branin" in result.output and "Sobol" in result.output
    assert json.loads(path.read_text())["summary"]["branin"]["sobol"]["seeds"] == 1
    result = CliRunner().invoke(app, ["bench", "planner", "--peer", "nosuch", "--seeds", "1"])
    assert result.exit_code == 2 and "nosuch" in result.output


def test_resume_takes_over_finished_runs_and_runs_only_the_rest(tmp_path):
    first = tmp_path / "first.json"
    planner_benchmark(problems=["branin"], peers=["sobol"], seeds=2, budget_scale=0.2, speed_sizes=(), json_path=first)
    earlier = json.loads(first.read_text())
    # a third seed and a second planner are new (both ours: the peers' extra may not be installed); the two Sobol seeds are taken over as they were
    second = tmp_path / "second.json"
    report = planner_benchmark(problems=["branin"], peers=["sobol", "botorch"], seeds=3, budget_scale=0.2,
                               speed_sizes=(), json_path=second, resume=first)
    runs = {(r["peer"], r["seed"]): r for r in report["runs"]}
    assert sorted(runs) == [("botorch", 0), ("botorch", 1), ("botorch", 2), ("sobol", 0), ("sobol", 1), ("sobol", 2)]
    for old in earlier["runs"]:
        reused = runs[("sobol", old["seed"])]
        assert reused["reused_from"] == earlier["started"]
        assert reused["regret_trace"] == old["regret_trace"]
    assert all("reused_from" not in r for key, r in runs.items() if key not in {("sobol", 0), ("sobol", 1)})
    assert report["summary"]["branin"]["sobol"]["seeds"] == 3
    assert json.loads(second.read_text())["config"]["resumed_from"]["started"] == earlier["started"]


def test_categorical_choices_are_blinded_per_seed_and_old_named_runs_are_not_taken_over(tmp_path):
    problem = PROBLEMS["mixed4"]()
    point = {"u1": 0.3, "u2": 0.6}
    real = sorted(problem.evaluate({**point, "c1": a, "c2": b})["y"] for a in "abc" for b in "pqrs")
    by_label = {}
    for seed in range(6):
        blinded = problem.for_seed(seed)
        assert blinded.campaign.parameters["c2"].values == ["c2-01", "c2-02", "c2-03", "c2-04"]
        labels = [(a, b) for a in blinded.campaign.parameters["c1"].values for b in blinded.campaign.parameters["c2"].values]
        by_label[seed] = [blinded.evaluate({**point, "c1": a, "c2": b})["y"] for a, b in labels]
        # every label stands for one real choice: the same values, under other names
        assert sorted(by_label[seed]) == pytest.approx(real)
    assert len({tuple(v) for v in by_label.values()}) > 1  # the order is drawn per seed
    assert problem.for_seed(3).evaluate({**point, "c1": "c1-02", "c2": "c2-03"}) == \
        problem.for_seed(3).evaluate({**point, "c1": "c1-02", "c2": "c2-03"})
    # a report made before blinding is not taken over for a blinded problem
    earlier = tmp_path / "earlier.json"
    planner_benchmark(problems=["mixed4"], peers=["sobol"], seeds=1, budget_scale=0.1, speed_sizes=(), json_path=earlier)
    data = json.loads(earlier.read_text())
    for run in data["runs"]:
        run.pop("blinded")
    earlier.write_text(json.dumps(data))
    report = planner_benchmark(problems=["mixed4"], peers=["sobol"], seeds=1, budget_scale=0.1, speed_sizes=(),
                               resume=earlier)
    assert [r.get("reused_from") for r in report["runs"]] == [None] and report["runs"][0]["blinded"] is True


def test_several_stations_keep_experiments_in_flight_as_the_planners_pending_ones(tmp_path):
    problem = PROBLEMS["branin"]().with_budget(12)
    session = PEERS["botorch"].start(problem, 0)
    design = session.suggest(5)
    session.observe(design, [problem.evaluate(p) for p in design])
    first = session.suggest(1)[0]
    # the first is still running: the next station's proposal treats it as pending (the same data
    # and seed without it would give the same point again)
    second = session.suggest(1)[0]
    assert second != first
    assert session.in_flight == [first, second]
    session.observe([first], [problem.evaluate(first)])
    assert session.in_flight == [second]

    path = tmp_path / "stations.json"
    report = planner_benchmark(problems=["branin"], peers=["botorch"], seeds=1, budget_scale=0.4, speed_sizes=(),
                               json_path=path, stations=3)
    (run,) = report["runs"]
    assert run["status"] == "ok" and run["stations"] == 3 == report["config"]["stations"]
    assert len(run["regret_trace"]) == run["budget"] == 12
    # one batch of three to fill the stations, then one proposal as each of the other nine experiments ends
    assert len(run["seconds_per_suggestion"]) == 1 + 9
    # a run made with one station is not taken over for three
    again = planner_benchmark(problems=["branin"], peers=["botorch"], seeds=1, budget_scale=0.4, speed_sizes=(),
                              resume=path, stations=1)
    assert "reused_from" not in again["runs"][0] and again["runs"][0]["stations"] == 1
    assert len(again["runs"][0]["seconds_per_suggestion"]) == 12
