"""Decision provenance: every trial of a finished campaign has its record, and replay reproduces a decision."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from closedloop import provenance
from closedloop.cli import app
from closedloop.daemon import run_embedded
from closedloop.errors import CampaignError, StoreError
from closedloop.store import Store, TrialStatus
from closedloop.campaign import Campaign
from tests.conftest import branin_campaign


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    """A short Branin campaign run to the end by the embedded daemon (Sobol design, then BoTorch)."""
    path = tmp_path_factory.mktemp("provenance") / "branin.db"
    store = Store(path)
    campaign = branin_campaign(name="prov", experiments=10, initial=5, seed=3)
    _run(campaign, store, fill_after_s=None)  # every decision the campaign's planner's (fillers: their own test)
    yield store, campaign.name
    store.close()


def _run(campaign, store: Store, fill_after_s: float | None) -> None:  # type: ignore[no-untyped-def]
    """``run_embedded``, with the daemon's space-filling proposals for a waiting station set as asked."""
    import threading

    from closedloop.daemon import Daemon
    from closedloop.worker import StationWorker

    daemon = Daemon(store, [campaign], heartbeat_s=0.5)
    for run in daemon.runs.values():
        run.fill_after_s = fill_after_s
    stop = threading.Event()
    worker = StationWorker(daemon.endpoint, name="station", heartbeat_s=0.5)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        daemon.serve()
    finally:
        stop.set()
        thread.join(timeout=10)
        daemon.close()


@pytest.mark.slow  # a campaign run to its end (shared by the module)
def test_every_trial_has_its_record(finished: tuple[Store, str]) -> None:
    store, name = finished
    campaign_id = store.campaign_row(name).id
    trials = store.trials(campaign_id)
    records = provenance.rows(store, campaign_id)
    assert len(trials) == 10 and {t.id for t in trials} == set(records)
    observations = store.observations(campaign_id)
    model_made = 0
    for trial in trials:
        row = records[trial.id]
        assert row.backend == "botorch" and row.seed == 3 and row.backend_version and row.versions["torch"]
        assert row.batch_size >= 1 and 0 <= row.batch_position < row.batch_size
        assert row.proposed_parameters == trial.parameters
        # the planner never had a result of an experiment that came after it, nor of itself
        assert all(number < trial.index for number in provenance.expand(row.observed))
        assert trial.index not in [p for p in row.pending if p is not None]
        assert len(row.pending) == len(row.pending_parameters)
        assert trial.id in observations  # the Bluesky run uid is the observation's
        if row.generator.startswith("botorch."):
            model_made += 1
            assert row.acquisition and row.acquisition_value is not None
            assert row.predicted["y"]["std"] >= 0 and row.hyperparameters and row.hyperparameters_digest
            assert row.fit_seconds is not None and row.optimize_seconds is not None and row.acquisition_seed is not None
    assert model_made >= 3


def test_ranges_round_trip() -> None:
    assert provenance.ranges_of([5, 1, 2, 3, 9, 8]) == [[1, 3], [5, 5], [8, 9]]
    assert provenance.expand([[1, 3], [5, 5], [8, 9]]) == [1, 2, 3, 5, 8, 9]
    assert provenance.ranges_of([]) == [] and provenance.expand([]) == []


@pytest.mark.slow  # a campaign run to its end (shared by the module)
def test_provenance_is_queryable_in_sql(finished: tuple[Store, str]) -> None:
    store, name = finished
    with store.engine.connect() as connection:
        rows = connection.execute(text(
            'SELECT t."index", p.generator, p.acquisition_value, o.run_uid FROM provenance p '
            "JOIN trial t ON t.id = p.trial_id LEFT JOIN observation o ON o.trial_id = t.id "
            "JOIN campaign c ON c.id = p.campaign_id WHERE c.name = :name ORDER BY t.\"index\""), {"name": name}).all()
    assert [r[0] for r in rows] == list(range(1, 11))
    assert all(r[3] for r in rows)


@pytest.mark.slow  # a campaign run to its end (shared by the module)
def test_replay_reproduces_a_model_decision_exactly(finished: tuple[Store, str]) -> None:
    store, name = finished
    campaign_id = store.campaign_row(name).id
    records = provenance.rows(store, campaign_id)
    by_index = {t.index: records[t.id] for t in store.trials(campaign_id)}
    model_made = [i for i, r in by_index.items() if r.generator.startswith("botorch.") and r.observed]
    # a decision with experiments pending is the hard case: a Monte-Carlo acquisition, a pruned baseline
    chosen = max([i for i in model_made if by_index[i].pending_parameters] or model_made)
    result = provenance.replay(store, name, chosen)
    assert result.observed == len(provenance.expand(by_index[chosen].observed)) > 0
    assert result.same, result.lines()
    # in a process whose torch uses another thread count (sums round differently), replay uses the recorded one
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert provenance.replay(store, name, chosen).same
    finally:
        torch.set_num_threads(threads)
    assert by_index[chosen].versions["torch_threads"] == "1"  # the planner thinks on one thread
    first = provenance.replay(store, name, 1)  # the design's first point, chosen with nothing known
    assert first.same and first.observed == 0


@pytest.mark.slow  # a campaign run to its end (shared by the module)
def test_replay_detects_a_different_decision(finished: tuple[Store, str], tmp_path: Path) -> None:
    """A replay that cannot fail is no audit: change the recorded proposal and it must say so."""
    store, name = finished
    campaign_id = store.campaign_row(name).id
    trial = store.trials(campaign_id)[-1]
    copy = Store(tmp_path / "copy.db")
    with store.engine.connect() as source, copy.engine.begin() as target:
        for table in ("campaign", "trial", "observation", "provenance"):
            for row in source.execute(text(f"SELECT * FROM {table}")).mappings():
                columns = ", ".join(f'"{c}"' for c in row)
                target.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(':' + c for c in row)})"),
                               dict(row))
        target.execute(text("UPDATE provenance SET proposed_parameters = :p WHERE trial_id = :t"),
                       {"p": json.dumps({"x1": 0.0, "x2": 0.0}), "t": trial.id})
    assert not provenance.replay(copy, name, trial.index).same
    copy.close()


@pytest.mark.slow  # a campaign run to its end (shared by the module)
def test_explain_and_replay_commands(finished: tuple[Store, str]) -> None:
    store, name = finished
    runner = CliRunner()
    shown = runner.invoke(app, ["explain", name, "9", "--store", store.location])
    assert shown.exit_code == 0, shown.output
    assert "acquisition:" in shown.output and "predicted:" in shown.output and "run uids:" in shown.output
    shown_too = runner.invoke(app, ["show", name, "9", "--store", store.location])
    assert shown_too.exit_code == 0 and shown_too.output == shown.output, shown_too.output
    replayed = runner.invoke(app, ["replay", name, "--until", "9", "--store", store.location])
    assert replayed.exit_code == 0, replayed.output
    assert "the same experiment" in replayed.output


def test_approval_is_recorded_with_the_decision(tmp_path: Path) -> None:
    """A held proposal gets its record at once; approving (with an edit) or rejecting it is added to it."""
    store = Store(tmp_path / "held.db")
    campaign = branin_campaign(name="held", experiments=2, initial=2, backend="sobol")
    # two held at once: as many wait for a person as may run at once
    campaign = campaign.model_copy(update={"execution": campaign.execution.model_copy(update={"approve": True,
                                                                                               "concurrency": 2})})
    held_events: list[int] = []

    def on_event(kind: str, details: dict) -> None:
        if kind == "trial_proposed" and details.get("held"):
            held_events.append(details["trial"])

    started = time.monotonic()
    run = run_embedded(campaign, store, on_event=on_event,
                       should_stop=lambda: len(held_events) >= 2 or time.monotonic() - started > 30)
    assert run.held == 2
    held = store.trials(run.id)
    assert all(provenance.provenance(store, "held", t.index).review is None for t in held)
    store.approve_held(held[0].id, "ada", {**held[0].parameters, "x1": 1.5})
    store.reject(held[1].id, "grace")
    first = provenance.provenance(store, "held", held[0].index)
    second = provenance.provenance(store, "held", held[1].index)
    assert (first.review, first.reviewed_by) == ("edited", "ada")
    assert first.proposed_parameters["x1"] != 1.5
    assert (second.review, second.reviewed_by) == ("rejected", "grace")
    store.close()


def test_hand_suggested_trials_are_explained_and_replayed(tmp_path: Path) -> None:
    """``closedloop suggest`` runs a planner outside the daemon: its proposals get a record too."""
    from closedloop import hitl

    store = Store(tmp_path / "hand.db")
    campaign = branin_campaign(name="hand", experiments=6, initial=4, backend="sobol")
    first = hitl.suggest(store, campaign, n=2)
    hitl.tell(store, "hand", first[0].index, {"y": 3.5})
    second = hitl.suggest(store, "hand", n=1)[0]
    record = provenance.provenance(store, "hand", second.index)
    assert record is not None and record.observed == [[first[0].index, first[0].index]]
    assert record.pending == [first[1].index] and record.batch_size == 1
    assert provenance.replay(store, "hand", second.index).same
    store.close()


@pytest.mark.slow
def test_records_and_replay_on_postgresql() -> None:
    """The same on a PostgreSQL store: a derived decision seed is a 32-bit unsigned number (a BIGINT there)."""
    from tests.test_store_backends import postgres_database

    for url in postgres_database():  # skips, saying why, without CLOSEDLOOP_TEST_POSTGRES_URL
        store = Store(url)
        try:
            run_embedded(branin_campaign(name="pg", experiments=7, initial=4, seed=2), store)
            campaign_id = store.campaign_row("pg").id
            records = provenance.rows(store, campaign_id)
            assert len(records) == 7
            model_made = [t.index for t in store.trials(campaign_id)
                          if records[t.id].generator.startswith("botorch.")]
            assert model_made and all(records[t.id].acquisition_seed is not None
                                      for t in store.trials(campaign_id) if t.index in model_made)
            assert provenance.replay(store, "pg", model_made[-1]).same
        finally:
            store.close()


def _trial_with_large_hyperparameters(store: Store) -> tuple[Any, dict[str, list[float]]]:
    """A trial of campaign "big" whose proposal kept hyperparameters past ``INLINE_LIMIT`` (set low by the caller)."""
    from closedloop.planner.base import Proposal

    campaign_id = store.open_campaign(branin_campaign(name="big"))
    hyper = {f"models.{i}.covar_module.lengthscale": [0.1 * i, 0.2 * i] for i in range(20)}
    proposal = Proposal({"x1": 1.0, "x2": 2.0}, {"generator": "botorch.x"})
    provenance._keep(proposal, {"backend": "botorch", "generator": "botorch.x", "hyperparameters": hyper,
                                "proposed_parameters": proposal.parameters})
    trial = store.add_trials(campaign_id, [(proposal.parameters, proposal.metadata)],
                             companion=provenance.companion(store, None, [proposal]))[0]
    return trial, hyper


def test_large_hyperparameters_go_to_a_file_with_their_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setattr(provenance, "INLINE_LIMIT", 100)
    store = Store(tmp_path / "big.db")
    trial, hyper = _trial_with_large_hyperparameters(store)
    row = provenance.provenance(store, "big", trial.index)
    assert row.hyperparameters is None and row.hyperparameters_file
    text = Path(row.hyperparameters_file).read_text()
    assert row.hyperparameters_digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert provenance.explain(store, "big", trial.index)["provenance"]["hyperparameters"] == hyper
    store.close()


def test_a_record_that_cannot_be_written_leaves_the_trial_alone(tmp_path: Path) -> None:
    """A record that cannot be written is undone alone in the trial's transaction; logged, the trial is stored."""
    from closedloop.planner.base import Proposal

    store = Store(tmp_path / "bad.db")
    campaign_id = store.open_campaign(branin_campaign(name="bad"))
    good, bad = Proposal({"x1": 1.0, "x2": 2.0}, {}), Proposal({"x1": 3.0, "x2": 4.0}, {})
    provenance._keep(bad, {"backend": None, "proposed_parameters": bad.parameters})  # backend is NOT NULL
    rows = store.add_trials(campaign_id, [(good.parameters, {}), (bad.parameters, {})],
                            companion=provenance.companion(store, type("P", (), {"backend": "sobol"})(), [good, bad]))
    assert [t.index for t in store.trials(campaign_id)] == [1, 2]
    assert set(provenance.rows(store, campaign_id)) == {rows[0].id}
    store.close()


def test_the_record_is_durable_before_the_assign_leaves(tmp_path: Path) -> None:
    """Read from other connections (committed rows only): at the moment the daemon sends each assign, and on the
    station's side when it arrives, the trial's provenance is already in the store."""
    import threading
    import uuid

    import zmq

    from closedloop import protocol
    from closedloop.daemon import Daemon

    path = tmp_path / "order.db"
    store, at_daemon, at_station = Store(path), Store(path), Store(path)
    campaign = branin_campaign(name="order", experiments=6, initial=6, backend="sobol")
    seen_at_send: dict[int, bool] = {}

    class Observed(Daemon):
        def _send(self, identity: bytes, message: object) -> bool:
            if isinstance(message, protocol.Assign):
                seen_at_send[message.trial_index] = provenance.provenance(at_daemon, "order", message.trial_index) is not None
            return super()._send(identity, message)

    daemon = Observed(store, [campaign], heartbeat_s=0.5, prefetch=0)
    serving = threading.Thread(target=daemon.serve, daemon=True)
    serving.start()
    context = zmq.Context()
    station = context.socket(zmq.DEALER)
    station.setsockopt(zmq.LINGER, 0)
    station.setsockopt(zmq.ROUTING_ID, b"reader")
    station.connect(daemon.endpoint)
    seen_on_arrival: dict[int, bool] = {}
    try:
        station.send(protocol.encode(protocol.Hello(station="reader")))
        deadline = time.monotonic() + 30
        while serving.is_alive() and time.monotonic() < deadline:
            if not station.poll(200):
                station.send(protocol.encode(protocol.Heartbeat()))
                continue
            message = protocol.decode(station.recv())
            if isinstance(message, protocol.Assign):
                seen_on_arrival[message.trial_index] = (
                    provenance.provenance(at_station, "order", message.trial_index) is not None)
                station.send(protocol.encode(protocol.ResultMessage(trial_id=message.trial_id, run_uid=str(uuid.uuid4()),
                                                                    values={"y": 1.0})))
        serving.join(timeout=10)
        assert not serving.is_alive(), "the campaign did not finish"
    finally:
        station.close()
        context.term()
        daemon.close()
    assert seen_at_send == seen_on_arrival == {i: True for i in range(1, 7)}
    for each in (store, at_daemon, at_station):
        each.close()


@pytest.mark.slow
def test_filler_proposals_are_recorded_and_replayed(tmp_path: Path) -> None:
    """The daemon's space-filling points for a station the model keeps waiting come from their own Sobol
    planner (own seed): the record names it, and replay rebuilds that planner, not the campaign's."""
    store = Store(tmp_path / "fill.db")
    campaign = branin_campaign(name="fill", experiments=9, initial=3, seed=4)
    _run(campaign, store, fill_after_s=0.0)  # a free station never waits for the model
    campaign_id = store.campaign_row("fill").id
    records = provenance.rows(store, campaign_id)
    fillers = [t.index for t in store.trials(campaign_id) if records[t.id].generator == "filler"]
    assert fillers, "no filler proposal: the model kept up with an instant simulator"
    for index in fillers[:2]:
        row = provenance.provenance(store, "fill", index)
        assert row.backend == "sobol" and row.seed not in (None, 4) and row.observed == []
        assert provenance.replay(store, "fill", index).same
    store.close()


def test_hyperparameters_in_a_file_are_found_beside_the_store_from_any_folder(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's path is kept as the daemon named it (``results/...``, relative to where it ran): `explain` from
    another folder, or of a results folder moved elsewhere, had shown no hyperparameters."""
    import shutil

    monkeypatch.setattr(provenance, "INLINE_LIMIT", 100)
    (tmp_path / "lab").mkdir()
    monkeypatch.chdir(tmp_path / "lab")
    store = Store("results/big.db")
    trial, hyper = _trial_with_large_hyperparameters(store)
    store.close()
    assert not Path(provenance.provenance(Store("results/big.db"), "big", trial.index).hyperparameters_file).is_absolute()
    shutil.copytree(tmp_path / "lab" / "results", tmp_path / "archive")  # the results folder, moved
    monkeypatch.chdir(tmp_path)
    for location in (tmp_path / "lab" / "results" / "big.db", tmp_path / "archive" / "big.db"):
        info = provenance.explain(Store(location, read_only=True), "big", trial.index)
        assert info["provenance"]["hyperparameters"] == hyper, location
    # a file that is not the one recorded (its digest differs) is not shown as the decision's
    (tmp_path / "archive" / "big.provenance" / f"campaign-{trial.campaign_id}" /
     f"trial-{trial.index}-hyperparameters.json").write_text("{}")
    info = provenance.explain(Store(tmp_path / "archive" / "big.db", read_only=True), "big", trial.index)
    assert info["provenance"]["hyperparameters"] is None


def test_explain_and_replay_find_the_campaign_as_every_command_does(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --store, `show CAMPAIGN N` looked through results/*.db but `explain` and `replay` only at
    results/CAMPAIGN.db: 'no store results/hand.db' for a campaign `show` had just explained."""
    from closedloop import hitl

    (tmp_path / "results").mkdir()
    store = Store(tmp_path / "results" / "lab.db")
    campaign = branin_campaign(name="hand", experiments=6, initial=4, backend="sobol")
    trial = hitl.suggest(store, campaign, n=1)[0]
    store.close()
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "hand", str(trial.index)])
    explained = runner.invoke(app, ["explain", "hand", str(trial.index)])
    assert explained.exit_code == 0, explained.output
    assert explained.stdout == shown.stdout and "generator sobol" in explained.stdout
    replayed = runner.invoke(app, ["replay", "hand", "--until", str(trial.index)])
    assert replayed.exit_code == 0, replayed.output
    assert "the same experiment" in replayed.stdout


def test_a_trial_ax_proposed_is_explained_but_not_replayed(tmp_path: Path) -> None:
    """Ax keeps the proposals the daemon dropped, which the store does not: replay says so instead of 'a different experiment'."""
    from closedloop import hitl

    store = Store(tmp_path / "ax.db")
    campaign = branin_campaign(name="axed", experiments=6, initial=3, backend="ax")
    first = hitl.suggest(store, campaign, n=1)[0]
    hitl.tell(store, "axed", first.index, {"y": 3.5})
    second = hitl.suggest(store, "axed", n=1)[0]
    record = provenance.provenance(store, "axed", second.index)
    assert record is not None and record.backend == "ax" and record.observed == [[first.index, first.index]]
    with pytest.raises(StoreError, match=r"trial #2 of 'axed' was proposed by Ax, .* cannot be replayed"):
        provenance.replay(store, "axed", second.index)
    store.close()


def big_image_instrument() -> Any:
    """A stage and a 1 MB image detector: each run's documents are too large to travel with its result."""
    import numpy as np
    from ophyd import Signal
    from ophyd.sim import SynAxis

    from drivers.binding import Derived, InstrumentBinding

    image = Signal(name="image", value=np.ones((362, 362)))
    return InstrumentBinding(name="camera", positioners={"x1": SynAxis(name="x1"), "x2": SynAxis(name="x2")},
                             detectors=[image], outputs={"y": Derived(keys=("image",), func="numpy:mean")})


@pytest.mark.slow  # a campaign of one experiment run by the embedded daemon (4 s)
def test_explain_says_where_the_documents_of_an_image_run_are(tmp_path: Path) -> None:
    campaign = Campaign.from_yaml_text(
        "name: camera\nparameters:\n  x1: {type: continuous, bounds: [-5, 10]}\n"
        "  x2: {type: continuous, bounds: [0, 15]}\nobjectives:\n  y: {goal: minimize}\n"
        "budget: {experiments: 1}\nplanner: {backend: sobol, seed: 0}\n"
        "instrument: {driver: 'tests.test_provenance:big_image_instrument'}\n")
    store = Store(tmp_path / "camera.db")
    run_embedded(campaign, store, outbox=str(tmp_path / "camera.db.outbox"))
    info = provenance.explain(store, "camera", 1)
    (uid,) = info["run_uids"]
    assert store.documents(uid) is None and (tmp_path / "camera.db.outbox.documents" / f"{uid}.jsonl").is_file()
    shown = "\n".join(provenance.explain_lines(info))
    assert f"documents:  not in the store for run {uid}" in shown and "OUTBOX.documents/RUN_UID.jsonl" in shown
    store.close()


def test_a_store_copied_without_its_documents_folder_is_not_said_to_have_left_them_on_the_station(
        tmp_path: Path) -> None:
    """A referee given only the .db file read, for every trial, only that its run's documents were over 512 KiB and
    stayed on the station, which was false: they are in the documents folder the copy was made without."""
    import shutil

    campaign = branin_campaign(name="copied", experiments=1, initial=1, backend="sobol")
    store = Store(tmp_path / "lab" / "copied.db")
    run_embedded(campaign, store)
    store.close()
    (tmp_path / "referee").mkdir()
    shutil.copy(tmp_path / "lab" / "copied.db", tmp_path / "referee" / "copied.db")
    result = CliRunner().invoke(app, ["show", "copied", "1", "--store", str(tmp_path / "referee" / "copied.db")])
    assert result.exit_code == 0, result.output
    assert f"no folder {tmp_path / 'referee' / 'copied.db.documents'}" in " ".join(result.output.split()), result.output


def test_a_replay_with_other_package_versions_than_recorded_says_which(tmp_path: Path) -> None:
    """Replay is exact only with the recorded versions; replaying with others said 'a DIFFERENT experiment' and
    nothing about the versions, leaving a referee who had upgraded to suspect the record."""
    from closedloop import hitl

    store = Store(tmp_path / "s.db")
    (trial,) = hitl.suggest(store, branin_campaign("upgraded", initial=2, backend="sobol"), n=1)
    with store.engine.begin() as connection:  # as a campaign decided with an older torch recorded it
        connection.execute(text("UPDATE provenance SET versions = :v"),
                           {"v": json.dumps({"closedloop": "0.0.9", "torch": "1.0.0", "torch_threads": "1"})})
    result = CliRunner().invoke(app, ["replay", "upgraded", "--until", str(trial.index), "--store", store.location])
    assert result.exit_code == 0, result.output  # Sobol's design point comes out the same all the same
    assert "versions: closedloop 0.0.9 when decided" in result.output and "torch 1.0.0 when decided, 2." in result.output
    assert "torch_threads" not in result.output.split("versions:")[1]
    store.close()


def test_a_trial_told_by_hand_is_not_said_to_have_documents_on_a_station(tmp_path: Path) -> None:
    """A result told by hand (run uid manual-...) read 'documents: not in the store ... over 512 KiB, they stay on
    station -': no station ran it and it never had a Bluesky run."""
    from closedloop import hitl

    store = Store(tmp_path / "s.db")
    (trial,) = hitl.suggest(store, branin_campaign("byhand", initial=2, backend="sobol"), n=1)
    hitl.tell(store, "byhand", trial.index, {"y": 3.5})
    result = CliRunner().invoke(app, ["show", "byhand", str(trial.index), "--store", store.location])
    assert result.exit_code == 0 and "run uids: manual-" in result.output, result.output
    assert "documents:" not in result.output, result.output
    store.close()


def test_a_trial_a_compute_station_ran_is_not_said_to_have_lost_its_documents(tmp_path: Path) -> None:
    """A function instrument's trial (run uid dask-..., run by the compute station) read 'documents: not in the
    store ...: no folder ... beside this store (copied or moved without it?); or over 512 KiB ...': a Dask task
    is no Bluesky run and never had documents, and the store had not been moved."""
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(branin_campaign("computed", initial=2, backend="sobol"))
    (trial,) = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {"generator": "sobol"})])
    store.mark_dispatched(trial.id, "embedded-compute")
    store.record_result(trial.id, "dask-closedloop-trial-1-773e4843", {"y": 3.5})
    result = CliRunner().invoke(app, ["show", "computed", "1", "--store", store.location])
    assert result.exit_code == 0 and "run uids: dask-closedloop-trial-1-773e4843" in result.output, result.output
    assert "documents:" not in result.output, result.output
    store.close()


def test_each_run_of_a_trial_is_labelled_by_what_came_of_it(tmp_path: Path) -> None:
    """`closedloop show CAMPAIGN N` marked every run but the stored one '(failed)', a late result too: the run of
    a station declared lost, whose result came after the trial was run again elsewhere, had not failed."""
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(branin_campaign("runs", initial=2, backend="sobol"))
    again, given_up = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {"generator": "sobol"}),
                                             ({"x1": 3.0, "x2": 4.0}, {"generator": "sobol"})])
    store.mark_dispatched(again.id, "st-a")
    store.requeue(again.id, "DeviceError: x1 stalled", "broken-run")  # failed at the instrument: run again
    store.mark_dispatched(again.id, "st-b")  # st-b declared lost while it measured: run again on st-c
    store.requeue(again.id, "station st-b lost")
    store.mark_dispatched(again.id, "st-c")
    store.record_result(again.id, "stored-run", {"y": 3.5})
    assert store.record_run(again.id, "lost-run", {"y": 3.25})  # st-b's result, come back with it
    assert store.record_run(again.id, "aborted-run")  # a timed-out run's failure, reported late
    assert store.trial(again.id).late_results == {"lost-run": {"y": 3.25}}
    store.mark_dispatched(given_up.id, "st-b")
    store.record_failure(given_up.id, "station st-b lost", TrialStatus.abandoned)
    store.record_run(given_up.id, "late-run", {"y": 7.0})

    def runs(index: int) -> str:
        result = CliRunner().invoke(app, ["show", "runs", str(index), "--store", store.location])
        assert result.exit_code == 0, result.output
        return " ".join(next(line for line in result.output.splitlines() if "run uids:" in line).split())

    assert runs(1).endswith("run uids: broken-run (failed), stored-run (result stored), lost-run (result y=3.25 "
                            "not used: it arrived after the trial was run again), aborted-run (failed)"), runs(1)
    assert runs(2).endswith("run uids: late-run (result y=7 not used: it arrived after the trial was given up)"), runs(2)
    store.close()


def test_a_trial_number_the_campaign_does_not_have_is_bad_input(tmp_path: Path) -> None:
    """'closedloop show branin 99' exited 1 ('campaign 'branin' has no trial #99') where approve, reject, cancel and
    tell of such a number exit 2 as bad input; show, explain and replay --until now do too, naming the trials there
    are."""
    from closedloop import hitl

    store = Store(tmp_path / "s.db")
    campaign = branin_campaign("numbered", initial=3, backend="sobol")
    empty = branin_campaign("empty", initial=3, backend="sobol")
    hitl.suggest(store, campaign, n=3)
    store.open_campaign(empty)
    # past SQLite's integers, a number typed too long stopped show, explain and replay with an OverflowError, exit 1
    for args in (["show", "numbered", "99"], ["explain", "numbered", "99"], ["replay", "numbered", "--until", "99"],
                 ["show", "numbered", "0"], ["show", "numbered", "99999999999999999999"],
                 ["explain", "numbered", "99999999999999999999"],
                 ["replay", "numbered", "--until", "99999999999999999999"]):
        result = CliRunner().invoke(app, [*args, "--store", store.location])
        assert result.exit_code == 2, (args, result.output)
        number = args[-1] if args[0] == "replay" else args[2]
        assert result.output.strip().splitlines() == [f"error: numbered has no trial #{number}: numbered has trials 1-3"], \
            result.output
    with pytest.raises(CampaignError, match=r"^empty has no trial #1: empty has no trials yet$"):
        provenance.explain(store, "empty", 1)
    store.close()


def test_a_trial_an_earlier_release_ran_is_not_said_to_have_left_its_documents_on_the_station(tmp_path: Path) -> None:
    """A store a release from before documents (and decision records) were kept had run half way, finished by this
    one: 'closedloop show' of its trials read only 'documents: not in the store ...: over 512 KiB (an image
    detector's), they stay on station embedded beside its outbox', which no station had ever written."""
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(branin_campaign("upgraded", initial=2, backend="sobol"))
    (trial,) = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {"generator": "sobol"})])  # no decision record
    store.mark_dispatched(trial.id, "embedded")
    store.record_result(trial.id, "84385729-ca8c-4094-a96e-37634b261a7c", {"y": 3.5})
    result = CliRunner().invoke(app, ["show", "upgraded", "1", "--store", store.location])
    shown = " ".join(result.output.split())
    assert result.exit_code == 0 and "documents: not in the store" in shown, result.output
    assert "run by a closedloop from before documents were kept" in shown, result.output
    store.close()


def test_every_decision_records_the_thread_count_it_was_made_with_not_the_processs(tmp_path: Path) -> None:
    """Our planners think on one torch thread whatever the process's count; only a BoTorch model decision said so, and
    a decision of the Sobol start, of the daemon's Sobol filler or of the multi-fidelity planner recorded the
    process's count (2 here), a count it had not used and that replay then set up for it."""
    import torch

    from closedloop import hitl
    from closedloop.planner import Result, make_planner
    from tests.test_multifidelity import example, measure

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        store = Store(tmp_path / "threads.db")
        for campaign in (branin_campaign(name="start", experiments=6, initial=4, seed=1),  # the Sobol start
                         branin_campaign(name="filler", experiments=6, initial=4, backend="sobol")):
            (trial,) = hitl.suggest(store, campaign, n=1)
            record = provenance.provenance(store, campaign.name, trial.index)
            assert record is not None and record.generator == "sobol"
            assert record.versions["torch_threads"] == "1", (campaign.name, record.versions)
        store.close()
        multifidelity = provenance.Recorder(make_planner(example()))
        start = multifidelity.suggest(len(multifidelity.design))
        assert multifidelity.decision(start[0])["versions"]["torch_threads"] == "1"
        multifidelity.ingest([Result(p.parameters, {"y": measure(p.parameters)}, i) for i, p in enumerate(start, 1)])
        (chosen,) = multifidelity.suggest(1)
        decision = multifidelity.decision(chosen)
        assert decision["generator"] == "mf-ucb" and decision["versions"]["torch_threads"] == "1"
        assert torch.get_num_threads() == 2  # the process's own count is left as it was
    finally:
        torch.set_num_threads(threads)
