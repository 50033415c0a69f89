"""People in the loop through the real command line: suggest, tell, import, approve and reject."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from closedloop import hitl, provenance
from closedloop.campaign import Campaign
from closedloop.daemon import Daemon, control_request
from closedloop.planner import make_planner
from closedloop.store import Store, TrialStatus
from closedloop.view import ProgressView
from closedloop.worker import StationWorker
from simulators.surfaces import branin_campaign
from tests.reportdata import mixed_campaign

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> object:
    from closedloop.cli import app

    return CliRunner().invoke(app, list(args))


def campaign_file(tmp_path: Path, name: str = "hand", experiments: int = 10, approve: bool = False) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(branin_campaign(name, experiments, execution={"approve": approve}, options={"noise": 0.0, "seed": 0}))
    return path


def test_suggest_records_hand_trials_and_tell_completes_them(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    result = cli("suggest", str(campaign_file(tmp_path)), "-n", "2", "--store", db)
    assert result.exit_code == 0, result.output
    assert "#  1" in result.output and "#  2" in result.output
    store = Store(db)
    cid = store.campaign_row("hand").id
    trials = store.trials(cid)
    assert [t.status for t in trials] == ["proposed", "proposed"]
    assert all(t.planner["execution"] == "manual" for t in trials)
    again = cli("suggest", "hand", "-n", "1", "--store", db)  # by name, once stored
    assert again.exit_code == 0, again.output
    third = store.trials(cid)[2]
    assert third.parameters not in (trials[0].parameters, trials[1].parameters)  # pending ones are not proposed again

    told = cli("tell", "hand", "1", "y=12.5", "--store", db)
    assert told.exit_code == 0, told.output
    assert store.trial(trials[0].id).status == "completed"
    observation = store.observations(cid)[trials[0].id]
    assert observation.values == {"y": 12.5} and observation.run_uid.startswith("manual-")
    assert "#2" in cli("status", "hand", "--store", db).output  # still waiting for its result


def test_tell_refuses_bad_values_with_one_line_each_and_stores_nothing(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    cli("suggest", str(campaign_file(tmp_path)), "--store", db)
    result = cli("tell", "hand", "1", "y=abc", "z=2", "--store", db)
    assert result.exit_code == 2  # bad input, as everywhere
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: trial #1: y='abc' is not a number",
                     "error: trial #1: 'z' is not an output of hand (outputs: y)"], result.stderr
    assert Store(db).trials(1)[0].status == "proposed"
    assert cli("tell", "hand", "7", "y=1", "--store", db).exit_code == 2  # no such trial


def test_tell_from_a_csv_checks_every_row_first(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    cli("suggest", str(campaign_file(tmp_path)), "-n", "3", "--store", db)
    bad = tmp_path / "bad.csv"
    bad.write_text("trial,y\n1,3.5\n2,inf\n9,1\n")
    result = cli("tell", "hand", "--csv", str(bad), "--store", db)
    assert result.exit_code == 2
    assert "row 3" in result.stderr and "row 4, column trial: '9'" in result.stderr
    assert Store(db).counts(1) == {"proposed": 3}  # nothing stored
    twice = tmp_path / "twice.csv"
    twice.write_text("trial,y\n1,5.0\n3,7\n1,6.0\n")
    result = cli("tell", "hand", "--csv", str(twice), "--store", db)
    assert result.exit_code == 2
    assert "row 4, column trial: trial #1 is also on row 2" in result.stderr
    assert Store(db).counts(1) == {"proposed": 3}  # a trial named twice: nothing stored either
    good = tmp_path / "good.csv"
    good.write_text("trial,y\n1,3.5\n3,-1e-3\n")
    assert cli("tell", "hand", "--csv", str(good), "--store", db).exit_code == 0
    assert Store(db).counts(1) == {"completed": 2, "proposed": 1}


def test_import_reports_every_bad_row_and_writes_nothing(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    rows = tmp_path / "past.csv"
    rows.write_text("x1,x2,y,notes\n1.0,2.0,5.5,ok\n20,2.0,3.0,\n1.0,abc,3.0,\n1.0,2.0,,\n")
    result = cli("import", str(campaign_file(tmp_path)), str(rows), "--store", db)
    assert result.exit_code == 2
    err = result.stderr
    assert "past.csv row 3, column x1: '20' is outside the bounds [-5, 10]" in err
    assert "past.csv row 4, column x2: 'abc' is not a number" in err
    assert "past.csv row 5, column y: '' is not a number" in err
    assert "nothing imported: 3 problem(s)" in err
    assert Store(db).trials(Store(db).open_campaign(Campaign.from_yaml(campaign_file(tmp_path)))) == []

    rows.write_text("x1,x2,y,notes\n1.0,2.0,5.5,first\n-2,9,17.25,\n")
    result = cli("import", "hand", str(rows), "--store", db)
    assert result.exit_code == 0, result.output
    assert "imported 2 experiments" in result.stdout and "ignored columns: notes" in result.stdout
    assert "2 of the budget's 10 experiments done; 8 new ones to run" in result.stdout
    store = Store(db)
    assert [t.status for t in store.trials(1)] == ["completed", "completed"]
    assert all(o.run_uid.startswith("import-") for o in store.observations(1).values())


def test_import_and_tell_refuse_a_table_that_is_not_utf8_naming_its_row(tmp_path: Path) -> None:
    """Excel's plain "CSV" is Windows-1252: a '°' in a cell stopped import and tell --csv with exit code 1 and
    "UnicodeDecodeError: ... position 84", a byte offset, and no row."""
    db = str(tmp_path / "s.db")
    rows = tmp_path / "past.csv"
    rows.write_bytes(b"x1,x2,y,notes\n1.0,2.0,5.5,ok\n-2,9,17.25,at 25 \xb0C\n")
    result = cli("import", str(campaign_file(tmp_path)), str(rows), "--store", db)
    assert result.exit_code == 2, result.output
    assert "past.csv row 3: not UTF-8 text (the byte 0xb0, perhaps Latin-1 or Windows-1252)" in result.stderr
    assert "Traceback" not in result.output and "UnicodeDecodeError" not in result.output
    assert Store(db).trials(Store(db).open_campaign(Campaign.from_yaml(campaign_file(tmp_path)))) == []
    cli("suggest", "hand", "--store", db)
    told = tmp_path / "told.csv"
    told.write_bytes(b"trial,y\n1,3.5\xb0\n")
    result = cli("tell", "hand", "--csv", str(told), "--store", db)
    assert result.exit_code == 2 and "told.csv row 2: not UTF-8 text" in result.stderr, result.output
    assert Store(db).counts(1) == {"proposed": 1}


def test_import_names_a_table_separated_by_semicolons(tmp_path: Path) -> None:
    """Excel with decimal commas saves 'CSV' with ';': import said "row 2: 4 cells for 1 columns"."""
    db = str(tmp_path / "s.db")
    rows = tmp_path / "past.csv"
    rows.write_text("x1;x2;y\n1,5;2;5,5\n")
    result = cli("import", str(campaign_file(tmp_path)), str(rows), "--store", db)
    assert result.exit_code == 2, result.output
    assert "past.csv: the header 'x1;x2;y' seems to use ';' as separator" in result.stderr
    assert "cells for" not in result.stderr


def test_importing_as_many_experiments_as_the_budget_says_none_are_left_to_run(tmp_path: Path) -> None:
    """Imported experiments count against the budget: importing 3 into a campaign of 3, `run` then did nothing,
    and nothing had said why."""
    rows = tmp_path / "past.csv"
    rows.write_text("x1,x2,y\n1.0,2.0,5.5\n-2,9,17.25\n9.5,0.5,0.75\n")
    result = cli("import", str(campaign_file(tmp_path, experiments=3)), str(rows), "--store", str(tmp_path / "s.db"))
    assert result.exit_code == 0, result.output
    # a larger budget under the same name would be refused as a changed campaign (docs/campaign.md, Budget)
    assert ("3 of the budget's 3 experiments done; none left to run: to run new ones, import into a file of a new "
            "name with a larger budget.experiments") in " ".join(result.stdout.split()), result.stdout


def test_export_then_import_round_trip_keeps_every_value(tmp_path: Path) -> None:
    db, copy = str(tmp_path / "s.db"), str(tmp_path / "copy.db")
    rows = tmp_path / "past.csv"
    rows.write_text("x1,x2,y\n1.0,2.0,5.5\n-2,9,17.25\n9.5,0.5,0.75\n")
    assert cli("import", str(campaign_file(tmp_path)), str(rows), "--store", db).exit_code == 0
    # every format export writes: JSON and parquet exports had been read as CSV ("2 cells for 1 columns", or a
    # UnicodeDecodeError)
    for fmt in ("csv", "json", "parquet"):
        out, copy = tmp_path / f"hand.{fmt}", str(tmp_path / f"copy-{fmt}.db")
        assert cli("export", "hand", "--format", fmt, "-o", str(out), "--store", db).exit_code == 0
        imported = cli("import", str(campaign_file(tmp_path)), str(out), "--store", copy)
        assert imported.exit_code == 0, (fmt, imported.output)
        assert [(r.parameters, r.values) for r in Store(copy).results(1)] == [
            (r.parameters, r.values) for r in Store(db).results(1)], fmt
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"x1": 1}')
    refused = cli("import", str(campaign_file(tmp_path)), str(wrong), "--store", str(tmp_path / "never.db"))
    assert refused.exit_code == 2 and "not a table of experiments" in refused.stderr, refused.output
    assert not (tmp_path / "never.db").exists()


def test_import_checks_types_of_a_mixed_space(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    rows = tmp_path / "mixed.csv"
    rows.write_text("temp,conc,steps,solvent,yield,cost\n"
                    "30,0.1,2,water,0.5,2\n"
                    "30,0.1,2.5,water,0.5,2\n"
                    "30,0,2,water,0.5,2\n"
                    "30,0.1,2,acetone,0.5,2\n")
    with pytest.raises(hitl.DataError) as caught:
        hitl.import_csv(store, mixed_campaign(), rows)
    assert caught.value.problems == [
        f"{rows} row 3, column steps: '2.5' is not an integer",
        f"{rows} row 4, column conc: '0' is outside the bounds [0.01, 1]",
        f"{rows} row 5, column solvent: 'acetone' is not one of water, ethanol, toluene",
    ]
    assert store.campaigns() == []


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "closedloop.cli"]
    plain = subprocess.run([*run, "show", "nosuch", "--store", str(tmp_path / "none.db")], capture_output=True,
                           text=True, cwd=tmp_path, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr.strip() == f"error: no store {tmp_path / 'none.db'}"
    assert not (tmp_path / "none.db").exists()  # looking for a store never creates one
    debug = subprocess.run([*run, "--debug", "show", "nosuch", "--store", str(tmp_path / "none.db")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "StoreError: no store" in debug.stderr


@contextmanager
def serving(store: Store, campaign: Campaign, station: bool = False) -> Iterator[tuple[Daemon, list[tuple[str, dict]]]]:
    """A daemon with its control socket serving ``campaign`` in a thread (and one simulated station if asked)."""
    events: list[tuple[str, dict]] = []
    daemon = Daemon(store, [campaign], control="tcp://127.0.0.1:0", heartbeat_s=0.5,
                    on_event=lambda kind, details: events.append((kind, details)))
    stop = threading.Event()
    threads = [threading.Thread(target=daemon.serve, args=(stop.is_set,), daemon=True)]
    if station:
        worker = StationWorker(daemon.endpoint, name="station", heartbeat_s=0.5)
        threads.append(threading.Thread(target=worker.run, args=(stop,), daemon=True))
    for thread in threads:
        thread.start()
    try:
        yield daemon, events
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        daemon.close()


def held_campaign(tmp_path: Path, name: str = "review", held: int = 3) -> tuple[Store, Campaign, int]:
    """A campaign in approval mode with ``held`` proposals waiting for a person, each with its provenance."""
    campaign = Campaign.from_yaml(campaign_file(tmp_path, name, experiments=10, approve=True))
    store = Store(tmp_path / f"{name}.db")
    cid = store.open_campaign(campaign)
    planner = provenance.Recorder(make_planner(campaign))
    proposals = planner.suggest(held)
    store.add_trials(cid, [(p.parameters, p.metadata) for p in proposals], status=TrialStatus.held,
                     companion=provenance.companion(store, planner, proposals))
    return store, campaign, cid


def test_the_daemon_approves_edits_and_rejects_through_its_control_socket(tmp_path: Path) -> None:
    store, campaign, cid = held_campaign(tmp_path)
    proposed = {t.index: t.parameters for t in store.trials(cid)}
    with serving(store, campaign) as (daemon, events):
        endpoint = daemon.control_endpoint
        assert endpoint is not None

        def ask(method: str, **params: object) -> dict:
            return control_request(endpoint, method, {"campaign": "review", **params})

        # bad requests: a clear answer each, and nothing changes
        refused = [
            (ask("edit", trial=1, parameters={"x1": 99}), "trial #1: x1=99 is outside the bounds [-5, 10]"),
            (ask("edit", trial=1, parameters={"x1": "1.5", "x3": 1}), "trial #1: 'x3' is not a parameter of review"),
            (ask("edit", trial=1, parameters={"x1": True}), "trial #1: x1=True is not a number"),
            (ask("edit", trial=1), "edit needs params.parameters"),
            (ask("approve", trial="1"), "approve needs params.trial"),
            (ask("approve", trial=9), "no trial #9"),
            (ask("reject", trial=2, parameters={"x1": 1}), "reject takes no params.parameters"),
            (ask("approve", trial=1, by=["x"]), "params.by is who acts"),
            (control_request(endpoint, "approve", {"campaign": "other", "trial": 1}), "'other' is not run by this daemon"),
        ]
        for reply, message in refused:
            assert reply["success"] is False and message in reply["msg"], (message, reply)
            assert reply["bad_input"] is True, reply  # the command line exits 2 for it, as for any bad input
        # `approve --set x1=2.5` out of the bounds exited 1, where every other bad input exits 2
        db = str(tmp_path / "review.db")
        for args, message in [(["approve", "review", "1", "--set", "x1=99"], "x1=99 is outside the bounds [-5, 10]"),
                              (["approve", "review", "1", "--set", "x3=1"], "'x3' is not a parameter of review"),
                              (["approve", "review", "1", "--set", "x1=abc"], "x1=abc is not a number"),
                              (["approve", "review", "9"], "no trial #9"),
                              (["reject", "review", "9"], "no trial #9"),
                              (["cancel", "9", "--campaign", "review"], "no trial #9"),
                              (["cancel", "1", "--campaign", "other"], "'other' is not run by this daemon")]:
            result = cli(*args, *(["--store", db] if args[0] != "cancel" else []), "--control", endpoint)
            assert result.exit_code == 2 and message in result.stderr, (args, result.output)
        assert [(t.status, t.parameters) for t in store.trials(cid)] == [("held", proposed[i]) for i in (1, 2, 3)]
        assert all(provenance.provenance(store, "review", i).review is None for i in (1, 2, 3))

        reply = ask("edit", trial=1, parameters={"x1": "1.5"}, by="ada")
        assert reply["success"] and reply["parameters"] == {**proposed[1], "x1": 1.5}, reply
        reply = ask("approve", trial=2, by="bob")
        assert reply["success"] and reply["parameters"] == proposed[2], reply
        again = ask("approve", trial=2)
        assert not again["success"] and "trial 2 is proposed, not held for approval" in again["msg"]
        assert not again.get("bad_input")  # a decision already taken: it failed, the request was well formed
        result = cli("approve", "review", "2", "--store", db, "--control", endpoint)
        assert result.exit_code == 1 and "not held for approval" in result.stderr, result.output
        # the command line goes through the same socket when a daemon serves the campaign
        result = cli("reject", "review", "3", "--store", str(tmp_path / "review.db"), "--control", endpoint)
        assert result.exit_code == 0, result.output
        assert f"trial 3 of review rejected by {hitl.user()}" in result.output and "in the store" not in result.output

        # the daemon acted at once (not at its next look at the store): queue, counts and events
        live = control_request(endpoint, "status")["campaigns"][0]
        assert (live["queued"], live["held"], live["finished"]) == (2, 0, 1)
    approved = [d for k, d in events if k == "trial_approved"]
    assert [(d["trial"], d["by"], d["edited"]) for d in approved] == [(1, "ada", True), (2, "bob", False)]
    assert any(k == "trial_failed" and d["trial"] == 3 and d["review"] == "rejected" for k, d in events)
    out = io.StringIO()  # what `closedloop daemon` prints for them in a log
    with ProgressView(campaign, store, Console(file=out, force_terminal=False, width=200)) as view:
        for details in approved:
            view("trial_approved", details)
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == [
        "experiment 1 edited and approved by ada", "experiment 2 approved by bob"]
    trials = store.trials(cid)
    assert [t.status for t in trials] == ["proposed", "proposed", "failed"]
    assert trials[0].parameters["x1"] == 1.5 and trials[0].planner["proposed_parameters"] == proposed[1]
    reviews = [(r.review, r.reviewed_by) for r in (provenance.provenance(store, "review", i) for i in (1, 2, 3))]
    assert reviews == [("edited", "ada"), ("approved", "bob"), ("rejected", hitl.user())]
    store.close()


def test_without_a_daemon_approve_and_reject_write_the_store_and_say_so(tmp_path: Path, free_port: int) -> None:
    store, _, cid = held_campaign(tmp_path, "alone", held=3)
    db, nobody = str(tmp_path / "alone.db"), f"tcp://127.0.0.1:{free_port}"
    refused = cli("approve", "alone", "1", "--set", "x2=-1", "--store", db, "--control", nobody)
    assert refused.exit_code == 2 and "trial #1: x2=-1 is outside the bounds [0, 15]" in refused.stderr
    for args, message in [(["approve", "alone", "1", "--set", "x3=1"], "'x3' is not a parameter of alone"),
                          (["approve", "alone", "1", "--set", "x2=abc"], "x2=abc is not a number"),
                          (["approve", "alone", "1", "--set", "x2"], "'x2': write NAME=VALUE"),
                          (["approve", "alone", "9"], "no trial #9"), (["reject", "alone", "9"], "no trial #9")]:
        refused = cli(*args, "--store", db, "--control", nobody)
        assert refused.exit_code == 2 and message in refused.stderr, (args, refused.output)
    result = cli("approve", "alone", "1", "--set", "x2=2", "--store", db, "--control", nobody)
    assert result.exit_code == 0 and "approved in the store (no daemon serves alone" in result.output, result.output
    assert "the next process run on this store dispatches it" in result.output
    result = cli("reject", "alone", "2", "--store", db, "--control", nobody)
    assert result.exit_code == 0 and "in the store (no daemon serves alone" in result.output, result.output
    assert [(t.status, t.parameters["x2"] == 2) for t in store.trials(cid)[:2]] == [("proposed", True),
                                                                                    ("failed", False)]
    # `closedloop run` opens no control socket and reads approvals from the store: it was said to wait for the next
    store.claim("alone")
    try:
        result = cli("approve", "alone", "3", "--store", db, "--control", nobody)
    finally:
        store.release("alone")
    assert result.exit_code == 0 and "the process running it picks it up from there" in result.output, result.output
    store.close()


@pytest.mark.slow
def test_approval_mode_holds_each_proposal_until_a_person_decides(tmp_path: Path) -> None:
    """A daemon and a station: each proposal waits for a person; the command line decides through the daemon."""
    db = str(tmp_path / "s.db")
    campaign = Campaign.from_yaml(campaign_file(tmp_path, "held", experiments=3, approve=True))
    store = Store(db)

    def wait_held(index: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = [t.index for t in store.trials(1, [TrialStatus.held.value])] if store.campaigns() else []
            if index in held:
                return
            time.sleep(0.05)
        raise AssertionError(f"trial {index} was never held; trials: {[(t.index, t.status) for t in store.trials(1)]}")

    with serving(Store(db), campaign, station=True) as (daemon, events):  # a second connection, as in another process
        control = ["--store", db, "--control", str(daemon.control_endpoint)]
        wait_held(1)
        time.sleep(0.5)
        assert store.trial(store.trials(1)[0].id).status == "held"  # nothing runs without a person
        # as many proposals wait as may run at once (concurrency 1): each free station's turn had held another,
        # and the whole budget waited for a person within seconds, chosen without a result
        assert [t.status for t in store.trials(1)] == ["held"]
        refused = cli("approve", "held", "1", "--set", "x1=99", *control)
        assert refused.exit_code == 2 and "x1=99 is outside the bounds [-5, 10]" in refused.stderr
        assert store.trial(store.trials(1)[0].id).status == "held"
        assert cli("approve", "held", "1", "--set", "x1=1.5", *control).exit_code == 0
        wait_held(2)
        assert cli("reject", "held", "2", *control).exit_code == 0
        wait_held(3)
        assert cli("approve", "held", "3", *control).exit_code == 0
        deadline = time.monotonic() + 60
        while not daemon.done() and time.monotonic() < deadline:  # the budget is spent: it ends
            time.sleep(0.05)
        assert daemon.done(), [(t.index, t.status) for t in store.trials(1)]
    trials = store.trials(1)
    first = trials[0]
    assert first.status == "completed" and first.parameters["x1"] == 1.5
    assert first.planner["approved_by"] and first.planner["proposed_parameters"]["x1"] != 1.5
    assert trials[1].status == "failed" and trials[1].error.startswith("rejected by ")
    assert trials[2].status == "completed"
    assert [r.failed for r in store.results(1)] == [False, True, False]  # the planner's known-bad point
    assert [d["trial"] for k, d in events if k == "trial_approved"] == [1, 3]  # the daemon did it, not a store poll
    store.close()


def test_approve_checks_edits_against_types_and_constraints(tmp_path: Path) -> None:
    campaign = Campaign.from_yaml_text("""
name: limits
parameters:
  a: {type: continuous, bounds: [0, 10]}
  b: {type: integer, bounds: [0, 10]}
  c: {type: categorical, values: [red, blue]}
constraints: ["a + b <= 12"]
objectives: {y: {goal: maximize}}
budget: {experiments: 5}
execution: {approve: true}
instrument: {simulator: "simulators.surfaces:Branin"}
""", check_instrument=False)
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(campaign)
    store.add_trials(cid, [({"a": 1.0, "b": 2, "c": "red"}, {"generator": "sobol"})], status=TrialStatus.held)
    with pytest.raises(hitl.DataError) as caught:
        hitl.approve(store, "limits", 1, {"a": "9", "b": "5"})
    assert caught.value.problems == ["trial #1: the edit breaks constraint 'a + b <= 12' (left side is 14.0)"]
    # an inequality holds exactly, but for the sum's own rounding: 1e-9 of the right side had let 12.0000000014 pass
    # (and the approval said a=10, rounded)
    with pytest.raises(hitl.DataError, match=r"left side is 12\.0000000014\)"):
        hitl.approve(store, "limits", 1, {"a": "9.0000000014", "b": "3"})
    assert hitl.check_constraints(campaign, {"a": math.nextafter(9.0, 10.0), "b": 3}) == []  # a sum's rounding
    with pytest.raises(hitl.DataError) as caught:
        hitl.approve(store, "limits", 1, {"b": "2.5", "c": "green", "d": "1"})
    assert caught.value.problems == [
        "trial #1: b=2.5 is not an integer",
        "trial #1: c=green is not one of red, blue",
        "trial #1: 'd' is not a parameter of limits (parameters: a, b, c)",
    ]
    assert store.trials(cid)[0].status == "held"  # a refused edit changes nothing
    row = hitl.approve(store, "limits", 1, {"a": "9", "c": "blue"}, by="ada")
    assert row.status == "proposed" and row.parameters == {"a": 9.0, "b": 2, "c": "blue"}
    assert row.planner["approved_by"] == "ada" and row.planner["proposed_parameters"]["a"] == 1.0
    with pytest.raises(Exception, match="not held for approval"):
        hitl.approve(store, "limits", 1)


def test_tell_takes_no_result_for_a_trial_a_station_measures(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    cli("suggest", str(campaign_file(tmp_path)), "--store", db)
    store = Store(db)
    cid = store.campaign_row("hand").id
    (station_trial,) = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {"generator": "sobol"})])
    store.mark_dispatched(station_trial.id, "embedded")
    result = cli("tell", "hand", str(station_trial.index), "y=-999", "--store", db)
    assert result.exit_code == 2  # as the same trial in a table (the person named a trial that takes no result)
    assert f"trial #{station_trial.index} was proposed for a station" in result.stderr
    table = tmp_path / "t.csv"
    table.write_text(f"trial,y\n1,5.0\n{station_trial.index},-999\n")
    assert cli("tell", "hand", "--csv", str(table), "--store", db).exit_code == 2
    assert store.counts(cid) == {"proposed": 1, "dispatched": 1}  # nothing stored, the station's trial untouched


def test_an_output_given_twice_is_refused_not_silently_the_last(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    cli("suggest", str(campaign_file(tmp_path)), "--store", db)
    result = cli("tell", "hand", "1", "y=3", "y=4", "--store", db)
    assert result.exit_code == 2 and "y is given twice" in result.stderr
    assert Store(db).counts(1) == {"proposed": 1}


def test_suggest_refuses_proposals_past_the_budget_and_writes_nothing(tmp_path: Path) -> None:
    db = str(tmp_path / "s.db")
    path = campaign_file(tmp_path, experiments=4)
    over = cli("suggest", str(path), "-n", "5", "--store", db)
    assert over.exit_code == 2
    assert "-n 5: the budget of 4 experiments leaves 4 (0 finished, 0 open)" in over.output
    assert not Store(db).campaigns()  # not even the campaign

    assert cli("suggest", str(path), "-n", "3", "--store", db).exit_code == 0
    store = Store(db)
    cid = store.campaign_row("hand").id
    assert cli("tell", "hand", "1", "y=1.5", "--store", db).exit_code == 0
    again = cli("suggest", "hand", "-n", "2", "--store", db)
    assert again.exit_code == 2
    assert "the budget of 4 experiments leaves 1 (1 finished, 2 open); ask for at most 1" in again.output
    assert len(store.trials(cid)) == 3
    assert cli("suggest", "hand", "-n", "1", "--store", db).exit_code == 0
    assert len(store.trials(cid)) == 4
    used_up = cli("suggest", "hand", "--store", db)
    assert used_up.exit_code == 2
    assert ("the budget of 4 experiments is used up (1 finished, 3 open): tell the open trials' results"
            in " ".join(used_up.output.split())), used_up.output
    # 'raise budget.experiments' was the advice, and `run` refuses the raised file as a changed campaign
    assert "raise budget" not in used_up.output
    for trial in ("2", "3", "4"):
        assert cli("tell", "hand", trial, "y=2.5", "--store", db).exit_code == 0
    done = cli("suggest", "hand", "--store", db)
    assert done.exit_code == 2
    assert ("is used up (4 finished, 0 open): the campaign is done; to go on, give its file a new name and a larger "
            "budget and seed it with these results: closedloop export hand -f csv -o hand.csv, then closedloop import "
            "NEW_FILE hand.csv") in " ".join(done.output.split()), done.output


def test_suggest_past_the_whole_budget_counts_what_the_stored_campaign_has_done(tmp_path: Path) -> None:
    # -n above the budget itself was refused before the store was read: "leaves 4 (0 finished, 0 open)"
    # with one finished and two open
    db = str(tmp_path / "s.db")
    path = campaign_file(tmp_path, experiments=4)
    assert cli("suggest", str(path), "-n", "3", "--store", db).exit_code == 0
    assert cli("tell", "hand", "1", "y=1.5", "--store", db).exit_code == 0
    for campaign in ("hand", str(path)):
        over = cli("suggest", campaign, "-n", "9", "--store", db)
        assert over.exit_code == 2
        assert "-n 9: the budget of 4 experiments leaves 1 (1 finished, 2 open); ask for at most 1" in over.output
    assert len(Store(db).trials(Store(db).campaign_row("hand").id)) == 3


def test_tell_from_a_csv_without_an_output_column_names_the_column(tmp_path: Path) -> None:
    # every row was refused "y='' is not a number", as if the cells were empty
    db = str(tmp_path / "s.db")
    assert cli("suggest", str(campaign_file(tmp_path)), "-n", "2", "--store", db).exit_code == 0
    (tmp_path / "r.csv").write_text("trial,yield\n1,1.5\n2,2.5\n")
    result = cli("tell", "hand", "--csv", str(tmp_path / "r.csv"), "--store", db)
    assert result.exit_code != 0
    assert "missing column 'y'" in result.output and "is not a number" not in result.output
    store = Store(db)
    assert not store.results(store.campaign_row("hand").id)


def test_two_people_suggesting_at_once_get_different_points_within_the_budget(tmp_path: Path) -> None:
    # two `suggest -n 2` started together (budget 4, one finished) both passed the budget check and the planner
    # (same data, same pending, same seed) gave both the same points: 5 trials of 4, two pairs run twice
    db = str(tmp_path / "s.db")
    path = tmp_path / "hand.yaml"
    path.write_text(branin_campaign("hand", 4, planner={"backend": "botorch", "initial_experiments": 1, "seed": 0},
                                    options={"noise": 0.0, "seed": 0}))
    assert cli("suggest", str(path), "--store", db).exit_code == 0
    assert cli("tell", "hand", "1", "y=20.5", "--store", db).exit_code == 0
    command = [sys.executable, "-m", "closedloop.cli", "suggest", "hand", "-n", "2", "--store", db]
    both = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in both]
    assert sorted(code for code, _, _ in outcomes) == [0, 2], outcomes
    refused = next(err for code, _, err in outcomes if code == 2)
    assert "leaves 1 (1 finished, 2 open)" in refused
    store = Store(db)
    trials = store.trials(store.campaign_row("hand").id)
    assert len(trials) == 3
    points = [tuple(sorted(t.parameters.items())) for t in trials]
    assert len(set(points)) == 3, points


def test_a_daemon_counts_open_hand_trials_against_the_budget_and_learns_what_is_told(tmp_path: Path) -> None:
    # with two hand trials open, a daemon on a budget of 3 ran 3 experiments of its own (5 trials of 3), and its
    # planner never saw the results told by hand: trial 7 was held for approval with 6 of 6 finished
    campaign = Campaign.from_yaml(campaign_file(tmp_path, "mixed", experiments=3))
    store = Store(tmp_path / "mixed.db")
    cid = store.open_campaign(campaign)
    hand = hitl.suggest(store, campaign, n=2)
    with serving(store, campaign, station=True) as (daemon, events):
        deadline = time.monotonic() + 20
        while not any(k == "trial_completed" for k, _ in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # time to propose more, were the hand trials not counted
        assert [t.status for t in store.trials(cid)] == ["proposed", "proposed", "completed"]
        # said once: `closedloop run` sat silent here until Ctrl-C
        assert [d["trials"] for k, d in events if k == "waiting_for_hand"] == [[1, 2]]
        hitl.tell(store, "mixed", hand[0].index, {"y": 1.25})
        hitl.tell(store, "mixed", hand[1].index, {"y": 30.0})
        while not any(k == "campaign_finished" for k, _ in events) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(store.trials(cid)) == 3
    finished = next(d for k, d in events if k == "campaign_finished")
    assert finished["finished"] == 3 and finished["best"]["trial"] == 1, finished
    told = [d["trial"] for k, d in events if k == "trial_completed" and d["trial"] in (1, 2)]
    assert sorted(told) == [1, 2]
    store.close()


def test_tell_from_a_csv_refuses_a_parameter_column_that_differs_from_the_trial(tmp_path: Path) -> None:
    # 'trial,y,x1' with x1=3 for a trial proposed at another x1 was recorded at the proposed x1 without a word
    db = str(tmp_path / "s.db")
    assert cli("suggest", str(campaign_file(tmp_path)), "-n", "2", "--store", db).exit_code == 0
    store = Store(db)
    first, second = store.trials(store.campaign_row("hand").id)
    moved = 3.0 if first.parameters["x1"] != 3.0 else 4.0
    (tmp_path / "r.csv").write_text(f"trial,y,x1\n1,1.5,{moved}\n2,2.5,{second.parameters['x1']!r}\n")
    result = cli("tell", "hand", "--csv", str(tmp_path / "r.csv"), "--store", db)
    assert result.exit_code != 0
    assert f"row 2, column x1: '{moved}' is not trial #1's x1=" in result.stderr, result.stderr
    assert "row 3" not in result.stderr  # the same x1 as proposed, as an export writes it, is fine
    assert not store.results(store.campaign_row("hand").id)
    (tmp_path / "r.csv").write_text(f"trial,y,x1\n2,2.5,{second.parameters['x1']!r}\n")
    assert cli("tell", "hand", "--csv", str(tmp_path / "r.csv"), "--store", db).exit_code == 0


def test_import_and_tell_give_a_discrete_count_as_int_whether_written_4_or_4_0(tmp_path: Path) -> None:
    """An imported count of tips '4.0' was stored as 4.0, and shown and exported so."""
    path = tmp_path / "tips.yaml"
    path.write_text("name: tips\nparameters:\n  x1: {type: discrete, values: [1, 2, 4]}\n"
                    "  x2: {type: continuous, bounds: [0, 1]}\nobjectives:\n  y: {goal: minimize}\n"
                    "budget: {experiments: 5}\ninstrument: {simulator: 'simulators.surfaces:Branin'}\n")
    rows = tmp_path / "past.csv"
    rows.write_text("x1,x2,y\n4,0.5,1.5\n4.0,0.25,2.5\n2.0,0.75,3.0\n")
    db = str(tmp_path / "s.db")
    result = cli("import", str(path), str(rows), "--store", db)
    assert result.exit_code == 0, result.output
    stored = [r.parameters["x1"] for r in Store(db).results(1)]
    assert stored == [4, 4, 2] and all(type(n) is int for n in stored)
    out = tmp_path / "out.csv"
    assert cli("export", "tips", "-o", str(out), "--store", db).exit_code == 0
    assert [line.split(",")[2] for line in out.read_text().splitlines()[1:]] == ["4", "4", "2"]
    campaign = Campaign.from_yaml(path, check_instrument=False)
    assert type(hitl.parse_value(campaign, "x1", "4.0")) is int
    with pytest.raises(ValueError, match="not one of"):
        hitl.parse_value(campaign, "x1", "3")


@pytest.mark.parametrize("command", [
    ["import", "{campaign}", "{past}"],  # every row bad: nothing imported
    ["suggest", "{campaign}", "-n", "0"],
    ["suggest", "{campaign}", "-n", "11"],  # past the budget of 10
])
def test_a_refused_command_on_a_new_store_leaves_no_store_and_no_lock_file(command: list[str], tmp_path: Path) -> None:
    """`closedloop import CAMPAIGN past.csv` with every row bad said "nothing imported", and left an empty store
    with the schema and a STORE.migrate.lock beside it (in a results/ folder made for it). (`daemon`: tests/test_cli.py)"""
    campaign, past = campaign_file(tmp_path), tmp_path / "past.csv"
    past.write_text("x1,x2,y\n20,2.0,3.0\n1.0,abc,3.0\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    db = tmp_path / "results" / "new.db"
    result = cli(*[arg.format(campaign=campaign, past=past) for arg in command], "--store", str(db))
    assert result.exit_code != 0 and "error:" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no lock file, no results/ folder


def test_a_daemon_counts_experiments_imported_while_it_serves_against_the_budget_and_learns_them(tmp_path: Path) -> None:
    # 'closedloop import' while a daemon served the campaign wrote the store, but the daemon counted only results
    # told by hand: it ran its whole budget on top of the imported experiments, and its planner never saw them
    campaign = Campaign.from_yaml(campaign_file(tmp_path, "seeded", experiments=3))
    store = Store(tmp_path / "seeded.db")
    cid = store.open_campaign(campaign)
    with serving(store, campaign) as (daemon, events):  # no station: nothing of its own finishes
        time.sleep(1.0)
        store.import_results(cid, [({"x1": 9.42, "x2": 2.47}, {"y": 0.4}, None),
                                   ({"x1": 0.0, "x2": 0.0}, {"y": 55.6}, None),
                                   ({"x1": 1.0, "x2": 1.0}, None, "clogged")], "past.csv")
        deadline = time.monotonic() + 20
        while not any(k == "campaign_finished" for k, _ in events) and time.monotonic() < deadline:
            time.sleep(0.05)
    finished = next((d for k, d in events if k == "campaign_finished"), None)
    assert finished is not None, "the imported experiments were not counted against the budget"
    assert finished["finished"] == 3 and finished["best"]["values"] == {"y": 0.4}, finished
    store.close()


@pytest.mark.parametrize("typed", ["1_000", "٣", "0x10", "1e", "."])
def test_a_measured_value_is_a_plain_decimal_number(typed: str) -> None:
    """Python's float() took '1_000' as 1000 and '٣' (an Arabic-Indic three) as 3: a typo became data."""
    with pytest.raises(ValueError, match="is not a number"):
        hitl.parse_output(typed)
    assert hitl.parse_output(" -2.5e3 ") == -2500.0 and hitl.parse_output(7) == 7.0


@pytest.mark.parametrize("n", [0, -1, "2", None, True, 2.5])
def test_suggest_from_python_refuses_a_count_that_is_not_a_whole_number_at_least_one(tmp_path: Path, n: object) -> None:
    """closedloop.suggest(store, campaign, n="2") or n=None raised a bare TypeError from a comparison."""
    store = Store(tmp_path / "s.db")
    with pytest.raises(hitl.DataError, match="ask for at least one proposal, a whole number"):
        hitl.suggest(store, Campaign.from_yaml(campaign_file(tmp_path)), n)  # type: ignore[arg-type]
    assert store.campaigns() == []
