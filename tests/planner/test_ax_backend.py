"""The ``ax`` backend: Ax's Client behind our protocol, with pending trials and refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml
from ax.core.base_trial import TrialStatus

from closedloop.campaign import Campaign
from closedloop.errors import PlannerError, PlannerWaiting
from closedloop.planner import Result, make_planner
from closedloop.planner.ax_backend import AxPlanner

MIXED = """
name: ax-mixed
parameters:
  x1: {type: continuous, bounds: [-5, 10]}
  x2: {type: continuous, bounds: [0, 15]}
  r: {type: continuous, bounds: [0.01, 100], scale: log}
  k: {type: integer, bounds: [1, 5]}
  s: {type: categorical, values: [a, b, 3]}
  d: {type: discrete, values: [0.1, 0.5, 2]}
  f: {type: fixed, value: 7}
constraints: ["x1 + x2 <= 12"]
objectives:
  y: {goal: minimize}
budget: {experiments: 20}
planner: {backend: ax, seed: 3}
instrument: {simulator: "simulators.surfaces:Branin"}
"""


BRANIN = """
name: ax-branin
parameters:
  x1: {type: continuous, bounds: [-5, 10]}
  x2: {type: continuous, bounds: [0, 15]}
objectives:
  y: {goal: minimize}
budget: {experiments: 20}
planner: {backend: ax, seed: 3}
instrument: {simulator: "simulators.surfaces:Branin"}
"""


def campaign(text: str = MIXED, **replace: str) -> Campaign:
    for old, new in replace.items():
        text = text.replace(old, new)
    # Built from the data, not the file loader: these campaigns have no instrument to check.
    return Campaign.model_validate(yaml.safe_load(text))


def branin(p: dict[str, Any]) -> float:
    x1, x2 = p["x1"], p["x2"]
    value = (x2 - 5.1 / (4 * math.pi**2) * x1**2 + 5 / math.pi * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10
    return value + p["k"] + (p["s"] == "b") + p["d"]


def check_valid(c: Campaign, parameters: dict[str, Any]) -> None:
    assert set(parameters) == set(c.parameters)
    assert -5 <= parameters["x1"] <= 10 and 0 <= parameters["x2"] <= 15 and 0.01 <= parameters["r"] <= 100
    assert parameters["x1"] + parameters["x2"] <= 12 + 1e-9
    assert isinstance(parameters["k"], int) and 1 <= parameters["k"] <= 5
    assert parameters["s"] in ("a", "b", 3)
    assert parameters["d"] in (0.1, 0.5, 2.0)
    assert parameters["f"] == 7


def ax_status(planner: AxPlanner, index: int) -> TrialStatus:
    return planner.client._experiment.trials[index].status


def test_make_planner_builds_ax_and_proposals_respect_the_space():
    c = campaign()
    planner = make_planner(c)
    assert isinstance(planner, AxPlanner)
    proposals = planner.suggest(3)
    assert len(proposals) == 3
    for proposal in proposals:
        check_valid(c, proposal.parameters)
        assert proposal.metadata["generator"] == "ax"


def test_same_seed_same_proposals_and_learning_after_the_initial_design():
    c = campaign(BRANIN)
    first, second = AxPlanner(c), AxPlanner(c)
    for _ in range(7):  # past Ax's default initial design, so its model proposes the last ones
        a, b = first.suggest(1)[0], second.suggest(1)[0]
        assert a.parameters == b.parameters
        assert -5 <= a.parameters["x1"] <= 10 and 0 <= a.parameters["x2"] <= 15
        for planner in (first, second):
            planner.ingest([Result(a.parameters, {"y": branin({**a.parameters, "k": 0, "s": "a", "d": 0})})])
    assert a.metadata["ax_trial"] == 6
    best = first.best()
    assert best is not None and best in first.results


def test_pending_experiments_stay_running_and_dropped_ones_are_abandoned():
    planner = AxPlanner(campaign())
    [a] = planner.suggest(1)
    [b] = planner.suggest(1, pending=[a.parameters])
    assert b.parameters != a.parameters
    ia, ib = a.metadata["ax_trial"], b.metadata["ax_trial"]
    assert ax_status(planner, ia) == TrialStatus.RUNNING
    # b was never dispatched: the next call lists only a as in flight, so b is abandoned.
    planner.suggest(1, pending=[a.parameters])
    assert ax_status(planner, ia) == TrialStatus.RUNNING
    assert ax_status(planner, ib) == TrialStatus.ABANDONED
    planner.ingest([Result(a.parameters, {"y": 1.0}, trial=0)])
    assert ax_status(planner, ia) == TrialStatus.COMPLETED


def test_with_its_initial_design_all_in_flight_ax_waits_for_a_result_and_says_so():
    """Ax proposes no more than its initial design before results come in; its DataRequiredError reached the daemon
    as a planner fault ("the planner failed" on the terminal, a traceback in the log) at each of these normal waits."""
    planner = AxPlanner(campaign(BRANIN))
    pending: list[dict[str, Any]] = []
    for _ in range(5):  # Ax's own initial design: the centre, then Sobol points
        [proposal] = planner.suggest(1, pending=pending)
        pending.append(proposal.parameters)
    with pytest.raises(PlannerWaiting, match="once results of its initial experiments are in \\(5 in flight\\)"):
        planner.suggest(1, pending=pending)
    planner.ingest([Result(p, {"y": branin({**p, "k": 0, "s": "a", "d": 0})}, trial=i) for i, p in enumerate(pending)])
    assert len(planner.suggest(1)) == 1  # its model's, once the results are in


def test_failures_are_marked_failed_and_a_rebuilt_planner_learns_every_result():
    c = campaign()
    planner = AxPlanner(c)
    proposals = planner.suggest(4)
    results = [Result(p.parameters, {"y": branin(p.parameters)}, i) for i, p in enumerate(proposals[:3])]
    results.append(Result(proposals[3].parameters, None, 3))
    planner.ingest(results)
    assert ax_status(planner, proposals[3].metadata["ax_trial"]) == TrialStatus.FAILED
    # A planner rebuilt from the store gets results it never proposed, and a pending experiment.
    rebuilt = AxPlanner(c)
    rebuilt.ingest(results)
    statuses = [t.status for t in rebuilt.client._experiment.trials.values()]
    assert statuses.count(TrialStatus.COMPLETED) == 3 and statuses.count(TrialStatus.FAILED) == 1
    [pending] = planner.suggest(1)
    rebuilt.suggest(1, pending=[pending.parameters])
    running = [t for t in rebuilt.client._experiment.trials.values() if t.status == TrialStatus.RUNNING]
    assert any(t.arm.parameters[rebuilt.names["x1"]] == pytest.approx(pending.parameters["x1"]) for t in running)
    best = rebuilt.best()
    assert best is not None and best.values["y"] == min(r.values["y"] for r in results if r.values)


@pytest.mark.parametrize(
    ("replace", "field"),
    [
        ({"budget:": "candidates: library.csv\nbudget:"}, "candidates"),
        ({'"x1 + x2 <= 12"': '"x1 + x2 == 12"'}, "constraints.0"),
        ({'"x1 + x2 <= 12"': '"x1 + x2 <= 12", "x1 + x2 >= 12"'}, "constraints: some <= and >= constraints leave no room"),
        ({'"x1 + x2 <= 12"': '"x1 + d <= 12"'}, "constraints.0"),
        ({'"x1 + x2 <= 12"': '"x1 + r <= 12"'}, "constraints.0"),
        ({"budget:": 'outcome_constraints: ["y <= 3"]\nbudget:'}, "outcome_constraints.0"),
    ],
)
def test_refuses_what_it_cannot_handle_naming_the_field(replace: dict[str, str], field: str):
    with pytest.raises(PlannerError, match=field):
        AxPlanner(campaign(**replace))


def test_refuses_choices_that_ax_would_read_as_one_in_a_store_begun_before_they_were_refused():
    # a campaign file may no longer list 3 and "3"; a store begun before that still holds such a campaign
    stored = Campaign.from_stored_yaml(MIXED.replace("values: [a, b, 3]", 'values: [a, b, 3, "3"]'))
    with pytest.raises(PlannerError, match="parameters.s: the ax backend reads choices as text"):
        AxPlanner(stored)


def test_two_objectives_with_thresholds_and_an_outcome_constraint():
    c = campaign(**{
        "  y: {goal: minimize}": "  y: {goal: minimize, threshold: 100}\n  z: {goal: maximize, threshold: -10}",
        "budget:": 'outcome_constraints: ["w >= 0"]\nbudget:',
    })
    planner = AxPlanner(c)
    assert planner.best() is None
    proposals = planner.suggest(4)
    results = []
    for i, p in enumerate(proposals):
        y = branin(p.parameters)
        results.append(Result(p.parameters, {"y": y, "z": -abs(p.parameters["x1"]), "w": 1.0 if i else -1.0}, i))
    planner.ingest(results)
    front = planner.pareto_front()
    assert front and all(r.values["w"] >= 0 for r in front)
    for r in front:  # nothing run dominates a member of the front
        assert not any(o.values["y"] < r.values["y"] and o.values["z"] > r.values["z"] for o in results[1:])


def test_names_that_are_words_in_python_or_sympy_and_constraints_with_fixed_parameters():
    c = campaign(BRANIN, **{"x1:": "lambda:", "  y: {goal: minimize}": "  yield: {goal: maximize}",
                            "objectives:": 'constraints: ["lambda + x2 + f <= 14"]\nobjectives:',
                            "  x2: {type: continuous, bounds: [0, 15]}":
                            "  x2: {type: continuous, bounds: [0, 15]}\n  f: {type: fixed, value: 2}"})
    planner = AxPlanner(c)
    for proposal in planner.suggest(3):
        p = proposal.parameters
        assert p["f"] == 2 and p["lambda"] + p["x2"] + p["f"] <= 14 + 1e-9
        planner.ingest([Result(p, {"yield": -p["x2"]})])
    assert planner.best().values["yield"] == max(r.values["yield"] for r in planner.results)


def test_a_range_too_narrow_for_ax_is_refused_at_construction_with_a_planner_error():
    with pytest.raises(PlannerError, match="planner.backend: Ax refuses this campaign: "):
        AxPlanner(campaign(BRANIN, **{"bounds: [-5, 10]": "bounds: [100, 100.000000001]"}))


def test_a_finite_space_run_through_gives_its_last_points_then_a_planner_error():
    c = campaign(BRANIN, **{"x1: {type: continuous, bounds: [-5, 10]}": "x1: {type: discrete, values: [1, 2]}",
                            "x2: {type: continuous, bounds: [0, 15]}": "x2: {type: categorical, values: [a, b]}"})
    planner = AxPlanner(c)
    seen = []
    for trial in range(1, 4):
        (proposal,) = planner.suggest(1)
        seen.append((proposal.parameters["x1"], proposal.parameters["x2"]))
        planner.ingest([Result(proposal.parameters, {"y": float(trial)}, trial)])
    last = planner.suggest(3)  # one point is left
    assert len(last) == 1
    seen.append((last[0].parameters["x1"], last[0].parameters["x2"]))
    assert sorted(seen) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    planner.ingest([Result(last[0].parameters, {"y": 0.0}, 4)])
    with pytest.raises(PlannerError, match="every point of this finite space"):
        planner.suggest(1)


def test_points_of_a_finite_space_proposed_but_dropped_are_proposed_again_before_it_is_done():
    # the daemon drops the proposals it has not handed out when a result comes in: Ax abandoned them and never
    # proposed them again, so a campaign of four points stopped after two, "every point proposed"
    c = campaign(BRANIN, **{"x1: {type: continuous, bounds: [-5, 10]}": "x1: {type: discrete, values: [1, 2]}",
                            "x2: {type: continuous, bounds: [0, 15]}": "x2: {type: categorical, values: [a, b]}"})
    planner = AxPlanner(c)
    first = planner.suggest(3)
    planner.ingest([Result(first[0].parameters, {"y": 1.0}, 1)])
    rest = planner.suggest(3)  # the other two of the first batch were dropped
    points = [(p.parameters["x1"], p.parameters["x2"]) for p in [first[0], *rest]]
    assert sorted(points) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    planner.ingest([Result(p.parameters, {"y": 2.0 + i}, 2 + i) for i, p in enumerate(rest)])
    with pytest.raises(PlannerError, match="every point of this finite space"):
        planner.suggest(1)


def test_a_result_that_cannot_be_an_experiment_is_refused_all_or_none_and_a_non_number_is_a_failure():
    planner = AxPlanner(campaign(BRANIN))
    good = Result({"x1": 1.0, "x2": 2.0}, {"y": 3.0}, 0)
    # a value outside its limits had been attached as an Ax trial; a missing parameter raised KeyError
    # with the results before it already taken
    for bad, message in [({"x1": 100.0, "x2": 2.0}, r"x1=100.0 is outside \[-5.0, 10.0\]"),
                         ({"x1": 1.0}, "parameter 'x2' is missing"),
                         ({"x1": "1.0", "x2": 2.0}, "x1='1.0' is not a number")]:
        with pytest.raises(PlannerError, match=rf"result 1 \(trial 1\): {message}; none of the 2 results was taken"):
            planner.ingest([good, Result(bad, {"y": 1.0}, 1)])
    assert planner.results == [] and not planner.client._experiment.trials
    # a reading that is not a number counts as a failure, as in every backend (it raised ValueError)
    planner.ingest([Result({"x1": 1.0, "x2": 2.0}, {"y": "n/a"}, 0)])
    [trial] = planner.client._experiment.trials.values()
    assert trial.status == TrialStatus.FAILED


def test_the_pareto_front_is_every_non_dominated_feasible_experiment_before_and_after_a_proposal():
    c = Campaign.model_validate({
        "name": "ax-front", "parameters": {"x": {"type": "continuous", "bounds": [0, 1]}, "z": {"type": "continuous", "bounds": [0, 1]}},
        "objectives": {"f": {"goal": "minimize"}, "g": {"goal": "maximize"}}, "outcome_constraints": ["w >= 0"],
        "budget": {"experiments": 20}, "planner": {"backend": "ax", "seed": 0},
        "instrument": {"simulator": "simulators.surfaces:Branin"},
    })
    readings = [(0.844, 0.045, -1), (0.421, 0.082, 1), (0.511, 0.144, 1), (0.784, -0.311, -1), (0.477, 0.356, 1),
                (0.908, -0.32, 1), (0.282, 0.676, -1), (0.618, -0.132, 1)]
    results = [Result({"x": f, "z": 0.5}, {"f": f, "g": g, "w": float(w)}, i) for i, (f, g, w) in enumerate(readings)]
    # rebuilt from the store (closedloop.pareto_front does so), Ax had no generation strategy yet:
    # AssertionError: GenerationStrategy not set
    planner = AxPlanner(c)
    planner.ingest(results)
    assert [r.trial for r in planner.pareto_front()] == [1, 4]
    # Ax's own in-sample frontier was empty here, both experiments left out
    planner.suggest(1)
    assert [r.trial for r in planner.pareto_front()] == [1, 4]
    # the hypervolume every backend reports (the ax backend had none: AttributeError)
    sobol = make_planner(c.model_copy(update={"planner": c.planner.model_copy(update={"backend": "sobol"})}))
    sobol.ingest(results)
    assert planner.hypervolume() == sobol.hypervolume() > 0


@pytest.mark.slow  # a subprocess importing Ax: about 10 s on two cores
def test_suggest_on_an_ax_campaign_prints_no_ax_info_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # every `closedloop run` / `suggest` of an ax campaign opened with "[INFO 12-06 10:34:27]
    # ax.storage.sqa_store.with_db_settings_base: Ax SQL storage initialized with SQLAlchemy 2.1.9"
    import subprocess
    import sys
    from pathlib import Path

    from simulators.surfaces import branin_campaign

    path = tmp_path / "axhand.yaml"
    path.write_text(branin_campaign("axhand", 4, planner={"backend": "ax", "seed": 0}))
    done = subprocess.run([sys.executable, "-m", "closedloop.cli", "suggest", str(path), "-n", "1",
                           "--store", str(tmp_path / "s.db")], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "INFO" not in done.stderr and "SQL storage" not in done.stderr + done.stdout, done.stderr


@pytest.mark.slow
def test_best_is_none_while_no_experiment_meets_the_outcome_constraints():
    # with 'g >= 5' met by none of 14 experiments (g at most 1), best() gave Ax's model pick, g=1.0, while the other
    # backends (and Ax's own fallback) give None: only experiments that satisfy the constraints count
    from tests.planner.conftest import campaign

    planner = make_planner(campaign("x: {type: continuous, bounds: [0, 1]}\nz: {type: continuous, bounds: [0, 1]}",
                                    experiments=14, backend="ax", extra='outcome_constraints:\n  - "g >= 5"'))
    for _ in range(14):
        (p,) = planner.suggest(1)
        planner.ingest([Result(p.parameters, {"y": p.parameters["x"], "g": p.parameters["z"]})])
        assert planner.best() is None


@pytest.mark.slow  # eleven Ax proposals, five of them fitting its model: about 6 s on two cores
def test_a_planner_rebuilt_from_the_results_proposes_what_the_uninterrupted_one_would():
    # Ax steps from centre to Sobol to its model one step a proposal: rebuilt with every result attached, it
    # proposed a Sobol point where the uninterrupted planner's model proposed (and a Sobol point again after it)
    c = campaign(BRANIN)
    running, results = AxPlanner(c), []
    for k in range(8):  # trials 0-4 the centre and Sobol, from 5 on Ax's model
        [proposal] = running.suggest(1)
        if k in (3, 5, 7):
            rebuilt = AxPlanner(c)
            rebuilt.ingest(results)
            assert [p.parameters for p in rebuilt.suggest(1)] == [proposal.parameters], f"after {k} results"
        result = Result(proposal.parameters, {"y": branin({**proposal.parameters, "k": 0, "s": "a", "d": 0})}, k)
        running.ingest([result])
        results.append(result)


def test_a_rebuilt_planner_does_not_propose_again_the_point_of_an_experiment_that_failed_in_the_sobol_phase():
    # Ax's Sobol sequence skips points already proposed except failed ones: rebuilt, it started the sequence
    # again and proposed the failed point, which the uninterrupted planner had left behind
    c = campaign(BRANIN)
    running, results = AxPlanner(c), []
    for k in range(5):  # the centre and Sobol (a failure is not counted towards Ax's five)
        [proposal] = running.suggest(1)
        if k in (3, 4):
            rebuilt = AxPlanner(c)
            rebuilt.ingest(results)
            assert [p.parameters for p in rebuilt.suggest(1)] == [proposal.parameters], f"after {k} results"
        values = None if k == 2 else {"y": branin({**proposal.parameters, "k": 0, "s": "a", "d": 0})}
        result = Result(proposal.parameters, values, k)
        running.ingest([result])
        results.append(result)
    assert results[2].parameters not in [r.parameters for r in results[3:]]


def test_a_failed_replicate_of_the_best_point_is_not_reported_as_the_best() -> None:
    """best() matched Ax's best trial to the last result at its point: a failed repeat (NaN, no values) won."""
    planner = make_planner(campaign())
    results = [Result(p.parameters, {"y": float(i)}, i) for i, p in enumerate(planner.suggest(5))]
    planner.ingest(results)
    best = planner.best()
    assert best is not None and best.values is not None
    for failed in ({"y": float("nan")}, {}, None):
        planner.ingest([Result(dict(best.parameters), failed, 10)])
        again = planner.best()
        assert again is not None and again.values == best.values, failed


def test_the_campaigns_initial_experiments_are_the_space_filling_start_before_axs_model() -> None:
    """``planner.initial_experiments`` is the centre and Sobol points before the model, as for botorch; Ax's own
    start (5) had been used whatever the file said: rosenbrock.yaml's 6 ran 5."""

    def nodes(c: Campaign) -> list[str]:
        planner, seen = AxPlanner(c), []
        for _ in range(10):
            a = planner.suggest(1)[0]
            seen.append(planner.client._experiment.trials[a.metadata["ax_trial"]].generator_runs[0]._generation_node_name)
            planner.ingest([Result(a.parameters, {"y": branin({**a.parameters, "k": 0, "s": "a", "d": 0})})])
        return seen

    assert nodes(campaign(BRANIN, **{"seed: 3}": "seed: 3, initial_experiments: 8}"})) == (
        ["CenterOfSearchSpace"] + ["Sobol"] * 7 + ["MBM"] * 2)
    assert nodes(campaign(BRANIN)) == ["CenterOfSearchSpace"] + ["Sobol"] * 4 + ["MBM"] * 5  # Ax's own start
