"""Campaigns with several sources (issue 8): the multi-fidelity planner, dispatch by source, budget in cost.

Real BoTorch models, a real daemon with real stations on loopback (the cheap source on a Dask
LocalCluster), a real SQLite store.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from closedloop.campaign import SOURCE, Campaign, load_campaign
from closedloop.daemon import Station
from closedloop.errors import PlannerError
from closedloop.planner import Result, make_planner
from closedloop.planner.multifidelity import MultiFidelityPlanner
from simulators.multifidelity import branin_low
from simulators.surfaces import branin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "campaigns" / "branin_multifidelity.yaml"


def example(**budget: float) -> Campaign:
    campaign = load_campaign(EXAMPLE)
    return campaign.model_copy(update={"budget": campaign.budget.model_copy(update=budget)}) if budget else campaign


def measure(parameters: dict) -> float:
    x = np.array([parameters["x1"], parameters["x2"]])
    return float(branin(x)) if parameters[SOURCE] == "robot" else float(branin_low(x))


def test_the_example_declares_two_priced_sources_and_a_budget_in_cost() -> None:
    campaign = example()
    assert campaign.instrument is None and campaign.target_source == "robot"
    assert {name: s.cost for name, s in campaign.sources.items()} == {"simulation": 0.1, "robot": 1.0}
    assert campaign.sources["simulation"].instrument.computational
    assert campaign.budget.cost == 12 and campaign.max_experiments == 120  # what 12 buys at 0.1 each
    assert campaign.cost_of({SOURCE: "simulation"}) == 0.1 and campaign.counts({SOURCE: "robot"})
    assert not campaign.counts({SOURCE: "simulation"})
    assert Campaign.from_yaml_text(campaign.to_yaml()) == campaign
    assert "source robot: cost 1, simulator simulators.surfaces:Branin (target)" in campaign.summary()


def test_sources_get_the_multifidelity_planner_and_other_backends_refuse() -> None:
    campaign = example()
    assert isinstance(make_planner(campaign), MultiFidelityPlanner)
    sobol = campaign.model_copy(update={"planner": campaign.planner.model_copy(update={"backend": "sobol"})})
    with pytest.raises(PlannerError, match="planner.backend: the sobol backend cannot choose among sources"):
        make_planner(sobol)
    dearer = campaign.model_copy(update={"sources": {
        **campaign.sources, "simulation": campaign.sources["simulation"].model_copy(update={"cost": 5.0})}})
    with pytest.raises(PlannerError, match="sources.simulation.cost: 5 is more than the target's 1"):
        make_planner(dearer)


def test_a_station_serves_only_the_sources_and_instruments_it_names() -> None:
    run = SimpleNamespace(campaign=example())
    robot = Station("r", b"r", ["simulators.surfaces:Branin"], ["*"], 1, 1, 0.0, sources=["robot"])
    anything = Station("a", b"a", ["*"], ["*"], 1, 1, 0.0)
    simulation = Station("s", b"s", ["*"], ["*"], 1, 1, 0.0, sources=["simulation"])
    assert robot.serves(run) and robot.serves(run, {SOURCE: "robot"}) and not robot.serves(run, {SOURCE: "simulation"})
    assert simulation.serves(run, {SOURCE: "simulation"}) and not simulation.serves(run, {SOURCE: "robot"})
    assert anything.serves(run, {SOURCE: "simulation"}) and anything.serves(run, {SOURCE: "robot"})
    wrong = Station("w", b"w", ["simulators.surfaces:Ackley"], ["*"], 1, 1, 0.0, sources=["robot"])
    assert not wrong.serves(run)


@pytest.mark.slow
def test_proposals_name_a_source_and_a_rebuilt_planner_proposes_the_same() -> None:
    campaign = example()
    planner = make_planner(campaign)
    results = []
    for trial in range(1, 15):  # the start (2 robot + 10 simulation) and two model-based proposals
        (proposal,) = planner.suggest(1)
        source = proposal.parameters[SOURCE]
        assert proposal.metadata[SOURCE] == source and proposal.metadata["cost"] == campaign.sources[source].cost
        assert -5 <= proposal.parameters["x1"] <= 10 and 0 <= proposal.parameters["x2"] <= 15
        results.append(Result(proposal.parameters, {"y": measure(proposal.parameters)}, trial))
        planner.ingest(results[-1:])
    assert [r.parameters[SOURCE] for r in results[:12]].count("robot") == 2
    best = planner.best()
    assert best is not None and best.parameters[SOURCE] == "robot"  # cheap results never count
    # the daemon after a crash, and `closedloop replay`: the same data in another order, the same proposals
    rebuilt = make_planner(campaign)
    rebuilt.ingest(results[::-1])
    pending = [results[0].parameters]
    assert ([p.parameters for p in rebuilt.suggest(2, pending=pending)]
            == [p.parameters for p in planner.suggest(2, pending=pending)])
    assert set(planner.recommend() or {}) == {"x1", "x2"}


def test_the_start_is_the_same_whatever_the_processs_default_dtype() -> None:
    import torch

    designs = []
    default = torch.get_default_dtype()
    try:
        for dtype in (torch.float32, torch.float64):  # float64: a process that imported Xopt
            torch.set_default_dtype(dtype)
            designs.append([p.parameters for p in make_planner(example()).suggest(3)])
    finally:
        torch.set_default_dtype(default)
    assert designs[0] == designs[1]


def test_an_output_in_tiny_units_gets_the_proposals_of_ordinary_ones() -> None:
    def proposals(unit: float) -> list[dict]:
        planner, seen = make_planner(example()), []
        for trial in range(1, 15):
            (proposal,) = planner.suggest(1)
            seen.append(proposal.parameters)
            planner.ingest([Result(proposal.parameters, {"y": unit * measure(proposal.parameters)}, trial)])
        return seen

    ordinary, tiny = proposals(1.0), proposals(1e-12)
    assert [p[SOURCE] for p in tiny] == [p[SOURCE] for p in ordinary]
    for got, want in zip(tiny[12:], ordinary[12:]):  # the two model-based proposals (a range of 15)
        assert (got["x1"], got["x2"]) == pytest.approx((want["x1"], want["x2"]), abs=0.01)


@pytest.mark.slow
def test_the_example_runs_embedded_one_station_per_source_until_the_cost_is_spent(tmp_path: Path) -> None:
    from closedloop.daemon import run_embedded
    from closedloop.provenance import replay
    from closedloop.store import Store

    campaign = example(cost=3.5)
    store = Store(tmp_path / "mf.db")
    try:
        run = run_embedded(campaign, store, outbox=str(tmp_path / "outbox"))
        trials = store.trials(run.id)
        assert all(t.status == "completed" for t in trials)
        spent = sum(campaign.cost_of(t.parameters) for t in trials)
        assert 3.5 <= spent < 3.5 + 1.0 and run.spent == pytest.approx(spent)  # the last may pass it
        stations = {t.parameters[SOURCE]: set() for t in trials}
        for t in trials:
            stations[t.parameters[SOURCE]].add(t.station)
            assert set(store.observations(run.id)[t.id].values) == {"y"}
        assert stations == {"robot": {"embedded-robot"}, "simulation": {"embedded-simulation-compute"}}
        assert run.best is not None and run.best.parameters[SOURCE] == "robot"
        # every proposal of the model can be made again from the store
        model_made = [t for t in trials if (t.planner or {}).get("generator") == "mf-ucb"]
        assert model_made
        assert replay(store, campaign.name, model_made[0].index).same
        # the report counts the cost, not experiments against what the cost would buy at the cheapest source
        from closedloop.report import load, render_html

        page = render_html(load(store, campaign.name), [], {})
        assert f"<td>{spent:.4g} of 3.5</td>" in page and f"<td>{len(trials)} (" in page
    finally:
        store.close()


TWO_SIMULATORS = """
name: mf-fill
parameters:
  x1: {type: continuous, bounds: [-5, 10]}
  x2: {type: continuous, bounds: [0, 15]}
objectives:
  y: {goal: minimize}
budget: {cost: 3.5}
planner: {backend: botorch, seed: 2}
sources:
  simulation:
    cost: 0.1
    instrument: {simulator: simulators.surfaces:Branin, options: {noise: 0.5, seed: 1}}
  robot:
    cost: 1.0
    target: true
    instrument: {simulator: simulators.surfaces:Branin, options: {seed: 2}}
"""


def test_the_filler_serves_a_waiting_cheap_station_and_leaves_the_target_to_the_model(tmp_path: Path) -> None:
    """Space-filling points while the model fits go to the cheaper source only, are recorded, and replay."""
    import threading

    from closedloop import provenance
    from closedloop.daemon import Daemon
    from closedloop.store import Store
    from closedloop.worker import StationWorker

    campaign = Campaign.from_yaml_text(TWO_SIMULATORS)
    store = Store(tmp_path / "fill.db")
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, fill_after_s=0.0)  # a free station never waits
    stop = threading.Event()
    workers = [StationWorker(daemon.endpoint, name=source, outbox=tmp_path / f"{source}.outbox", heartbeat_s=0.2,
                             sources=[source]) for source in ("simulation", "robot")]
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        daemon.serve()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        daemon.close()
    try:
        campaign_id = store.campaign_row("mf-fill").id
        records = provenance.rows(store, campaign_id)
        trials = store.trials(campaign_id)
        fillers = [t for t in trials if records[t.id].generator == "filler"]
        assert fillers, "no filler proposal: the model kept up with an instant simulator"
        assert {(t.parameters[SOURCE], t.station) for t in fillers} == {("simulation", "simulation")}
        assert any(t.parameters[SOURCE] == "robot" for t in trials)  # the model's choices, the robot's runs
        assert records[fillers[0].id].proposed_parameters == fillers[0].parameters  # not shown as edited
        assert provenance.replay(store, "mf-fill", fillers[0].index).same
    finally:
        store.close()


@pytest.mark.slow
def test_the_multifidelity_benchmark_spends_the_same_cost_on_both_planners_and_writes_its_figures(tmp_path: Path) -> None:
    from closedloop.bench.multifidelity import main as multifidelity_benchmark

    output = tmp_path / "mf.json"
    summary = multifidelity_benchmark(seeds=1, budget=3.0, regret=50.0, output=output)
    written = json.loads(output.read_text())
    assert written["seeds"] == 1 and written["budget_cost"] == 3.0
    for name in ("multifidelity", "target_only"):
        assert written[name]["reached"] == 1  # regret 50 is reached by any reasonable design
        assert 0 < written[name]["median_cost_to_target_regret"] <= 3.0 + 1e-9
        assert written[name]["median_final_regret"] >= 0
    assert summary["target_only"]["experiments"] == [{"target": 3}]
    cheap = summary["multifidelity"]["experiments"][0]
    assert sum(cheap.values()) > 3  # the cheap source buys more experiments for the same cost
    assert written["cost_ratio"] == pytest.approx(summary["cost_ratio"])


def test_a_result_that_is_not_an_experiment_of_the_campaign_is_refused_and_a_failed_reading_teaches_nothing() -> None:
    """ingest took any result: a missing parameter or one a million times past its bound was reported as the best
    and broke every later suggestion (KeyError), and a NaN reading failed the model's fit for good."""
    planner = make_planner(example())
    start = planner.suggest(len(planner.design))
    results = [Result(p.parameters, {"y": measure(p.parameters)}, i) for i, p in enumerate(start, 1)]
    planner.ingest(results)
    best = planner.best()
    for bad, says in (({"x1": 1.0, SOURCE: "robot"}, "parameter 'x2' is missing"),
                      ({"x1": 1e6, "x2": 1.0, SOURCE: "robot"}, r"x1=1000000.0 is outside \[-5.0, 10.0\]"),
                      ({"x1": 1.0, "x2": 1.0, SOURCE: "lab"}, "source 'lab' is not one of the campaign's")):
        with pytest.raises(PlannerError, match=says):
            planner.ingest([Result(bad, {"y": -5.0}, 99)])
    robot = next(r.parameters for r in results if r.parameters[SOURCE] == "robot")
    planner.ingest([Result(robot, {"y": float("nan")}, 100), Result(robot, {"y": "abc"}, 101)])  # failed readings
    assert planner.best() == best
    (proposal,) = planner.suggest(1)
    assert -5 <= proposal.parameters["x1"] <= 10
    with pytest.raises(PlannerError, match="pending 0: x1=nan is not a number"):
        planner.suggest(1, pending=[{"x1": float("nan"), "x2": 1.0, SOURCE: "robot"}])


def test_each_model_decision_records_the_evidence_that_chose_its_source_and_explain_shows_it(tmp_path: Path) -> None:
    """The rule sends an experiment to the cheapest source whose posterior standard deviation at the point is above a
    threshold: those deviations and the threshold had no place in the provenance record, so `explain` showed which
    source was run but nothing of why (replay reproduced the choice, and that was all)."""
    from typer.testing import CliRunner

    from closedloop import hitl, provenance
    from closedloop.cli import app
    from closedloop.store import Store

    campaign = example()
    store = Store(tmp_path / "mf.db")
    try:
        design = hitl.suggest(store, campaign, n=len(make_planner(campaign).design))
        for trial in design:
            hitl.tell(store, campaign.name, trial.index, {"y": measure(trial.parameters)})
        batch = hitl.suggest(store, campaign.name, n=2)  # each proposal of a batch has its own evidence
        for trial in batch:
            record = provenance.provenance(store, campaign.name, trial.index)
            assert record is not None and record.generator == "mf-ucb"
            stds, threshold = record.source_std, record.source_threshold
            assert stds and set(stds) <= {"simulation"} and threshold is not None and threshold > 0
            # the rule, from the record alone: the cheapest source above the threshold, else the target
            uncertain = [s for s, std in stds.items() if std > threshold]
            assert trial.parameters[SOURCE] == (uncertain[0] if uncertain else "robot")
            assert record.acquisition and "MF-GP-UCB" in record.acquisition and record.acquisition_value is not None
            shown = CliRunner().invoke(app, ["explain", campaign.name, str(trial.index), "--store", store.location])
            assert shown.exit_code == 0, shown.output
            line = next(x for x in shown.output.splitlines() if x.strip().startswith("source:"))
            assert trial.parameters[SOURCE] in line and f"simulation {stds['simulation']:.3g}" in line
            assert f"threshold {threshold:.3g}" in line, line
            explained = json.loads(CliRunner().invoke(app, ["explain", campaign.name, str(trial.index), "--json",
                                                            "--store", store.location]).output)
            assert explained["provenance"]["source_std"] == stds
            assert provenance.replay(store, campaign.name, trial.index).same
            # the seed it was drawn with: the campaign's, and how many experiments there were before it
            assert record.acquisition_seed == campaign.planner.seed * 1_000_003 + trial.index - 1
        # a decision of the space-filling start chose its source by the design: it has no such evidence
        start = provenance.provenance(store, campaign.name, design[0].index)
        assert start is not None and start.source_std is None and start.source_threshold is None
    finally:
        store.close()
