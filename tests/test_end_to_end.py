"""The whole loop in one process tree: planner, store, ZeroMQ on loopback, RunEngine, ophyd devices."""

from __future__ import annotations

import pytest

from closedloop.daemon import run_embedded
from drivers.documents import DocumentCollector
from closedloop.store import Store
from simulators.surfaces import branin
from tests.conftest import branin_campaign


@pytest.mark.slow
def test_embedded_campaign_completes_and_beats_its_initial_design(store: Store, tmp_path) -> None:
    campaign = branin_campaign(experiments=15, initial=6, noise=0.01)
    run = run_embedded(campaign, store, outbox=str(tmp_path / "outbox.db"))

    trials = store.trials(run.id)
    assert [t.index for t in trials] == list(range(1, 16))
    assert {t.status for t in trials} == {"completed"}
    observations = store.observations(run.id)
    assert len(observations) == 15
    assert len({o.run_uid for o in observations.values()}) == 15
    for trial in trials:
        measured = observations[trial.id].values["y"]
        truth = branin([trial.parameters["x1"], trial.parameters["x2"]])
        assert abs(measured - truth) < 0.1, (trial.index, measured, truth)  # noise sigma is 0.01

    sobol = [observations[t.id].values["y"] for t in trials if t.planner.get("generator") == "sobol"]
    model = [observations[t.id].values["y"] for t in trials if t.planner.get("generator") != "sobol"]
    assert len(sobol) == 6 and len(model) == 9
    assert min(model) < min(sobol)
    assert store.campaign_row(run.id).status == "completed"


def test_resuming_a_finished_campaign_runs_nothing_more(store: Store, tmp_path) -> None:
    campaign = branin_campaign(name="tiny", experiments=3, initial=3, backend="sobol")
    run_embedded(campaign, store, outbox=str(tmp_path / "outbox.db"))
    first = [(t.index, t.parameters) for t in store.trials(store.open_campaign(campaign))]
    run_embedded(campaign, store, outbox=str(tmp_path / "outbox.db"))
    assert [(t.index, t.parameters) for t in store.trials(store.open_campaign(campaign))] == first
    assert len(first) == 3


@pytest.mark.slow
def test_a_seeded_campaign_makes_the_same_decisions_every_time(tmp_path) -> None:
    campaign = branin_campaign(name="seeded", experiments=10, initial=4, seed=3, noise=0.0)
    runs = []
    for attempt in ("a", "b"):
        store = Store(tmp_path / f"{attempt}.db")
        run = run_embedded(campaign, store, outbox=str(tmp_path / f"{attempt}.outbox"))
        runs.append([(t.index, t.parameters) for t in store.trials(run.id)])
        store.close()
    assert len(runs[0]) == 10
    assert runs[0] == runs[1]


def test_each_trial_keeps_the_bluesky_documents_of_its_run(store: Store, tmp_path) -> None:
    campaign = branin_campaign(name="documented", experiments=3, initial=3, backend="sobol")
    run = run_embedded(campaign, store, outbox=str(tmp_path / "outbox.db"))
    observations = store.observations(run.id)
    assert len(observations) == 3
    for trial in store.trials(run.id):
        observation = observations[trial.id]
        documents = DocumentCollector.from_jsonl(store.documents(observation.run_uid) or "")
        start, stop = documents.start, documents.stop
        assert start is not None and stop is not None
        assert start["uid"] == observation.run_uid and start["trial_id"] == trial.id
        assert start["campaign"] == "documented" and stop["exit_status"] == "success"
        (event,) = documents.events()
        assert event["data"]["y"] == observation.values["y"]  # the stored value is the detector's reading
        assert event["data"]["x1"] == pytest.approx(trial.parameters["x1"], abs=1e-9)
    assert store.documents("../../etc/passwd") is None
