"""What a scientist sees: the snapshot, the live view, status / list / show / export / watch."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import zmq
import sqlalchemy
from rich.console import Console
from typer.testing import CliRunner

from closedloop.campaign import TABLE_COLUMNS
from closedloop.cli import app
from closedloop.events import encode_event
from closedloop.store import Store, TrialStatus
from closedloop.view import (ProgressView, Snapshot, active_seconds, trial_columns, trial_records, watch,
                             watch_events)
from tests.conftest import branin_campaign


@pytest.fixture
def busy(tmp_path: Path) -> tuple[Store, str]:
    """A campaign mid-run: 4 completed, 1 failed, 2 in flight on two stations, 1 held, 1 for hand execution."""
    store = Store(tmp_path / "busy.db")
    campaign = branin_campaign(name="busy", experiments=10, backend="sobol")
    cid = store.open_campaign(campaign)
    values = [12.0, 3.5, 7.25, 4.0]
    for i, y in enumerate(values, start=1):
        (trial,) = store.add_trials(cid, [({"x1": float(i), "x2": 1.0}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"y": y})
    (failed,) = store.add_trials(cid, [({"x1": 0.0, "x2": 0.0}, {})])
    store.mark_dispatched(failed.id, "station-b")
    store.record_failure(failed.id, "beam dump")
    for index, station in ((6, "station-a"), (7, "station-b")):
        (trial,) = store.add_trials(cid, [({"x1": 1.0, "x2": float(index)}, {})])
        store.mark_dispatched(trial.id, station)
    store.add_trials(cid, [({"x1": 2.0, "x2": 2.0}, {})], status=TrialStatus.held)
    store.add_trials(cid, [({"x1": 3.0, "x2": 3.0}, {"execution": "manual"})])
    return store, str(tmp_path / "busy.db")


def test_snapshot_counts_in_flight_best_and_recent(busy: tuple[Store, str]) -> None:
    snap = Snapshot.from_store(busy[0], "busy")
    assert snap.finished == 5 and snap.budget == 10
    assert snap.counts == {"completed": 4, "failed": 1, "dispatched": 2, "held": 1, "proposed": 1}
    assert snap.in_flight == {"station-a": [6], "station-b": [7]}
    assert snap.held == [8] and snap.manual == [9]
    assert snap.best is not None and snap.best.index == 2 and snap.best_after == 2
    assert [e.index for e in snap.recent] == [5, 4, 3, 2, 1]  # newest first
    assert snap.recent[0].error == "beam dump"
    elapsed, remaining = snap.elapsed_s(), snap.remaining_s()
    assert elapsed is not None and remaining is not None
    assert remaining == pytest.approx(elapsed / 5 * 5, rel=0.5)  # five left at the pace of five done


def test_status_list_and_show_from_another_terminal(busy: tuple[Store, str]) -> None:
    runner = CliRunner()
    status = runner.invoke(app, ["status", "busy", "--store", busy[1]])
    assert status.exit_code == 0, status.output
    text = status.stdout
    assert "busy: idle, 5/10 experiments (4 completed, 1 failed)" in text  # no process runs it
    assert "best min y=3.5 (#2, experiment 2 of 5" in text
    assert "left in flight: station-a: #6; station-b: #7 (nothing runs them now" in " ".join(text.split())
    assert "held for approval: #8" in text and "waiting for results by hand: #9" in text
    assert "failed: beam dump" in text
    listing = runner.invoke(app, ["list", "--store", busy[1], "--store", busy[1]])  # named twice, listed once
    assert listing.exit_code == 0
    assert "busy" in listing.stdout and "5/10" in listing.stdout and "y=3.5 (#2)" in listing.stdout
    assert listing.stdout.count("5/10") == 1, listing.stdout
    shown = runner.invoke(app, ["show", "busy", "--store", busy[1]])
    assert shown.exit_code == 0
    assert "beam dump" in shown.stdout and "station-b" in shown.stdout and "9 trials" in shown.stdout


def test_status_names_an_experiment_running_far_longer_than_any_completed_one(busy: tuple[Store, str]) -> None:
    """A campaign without a timeout waits for a hung device forever: status says which experiment has been in
    flight five times longer than the longest completed one, and for how long."""
    store, path = busy
    store.claim("busy")  # as the process running it does
    try:
        assert Snapshot.from_store(store, "busy").running_long == []  # #6 and #7 were dispatched a moment ago
        with store.engine.begin() as connection:
            connection.execute(sqlalchemy.text('UPDATE trial SET dispatched_at = :then WHERE "index" = 6'),
                               {"then": datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2,
                                                                                                    minutes=5)})
        snap = Snapshot.from_store(store, "busy")
        assert snap.status == "running" and [i for i, _ in snap.running_long] == [6]
        status = CliRunner().invoke(app, ["status", "busy", "--store", path])
        assert status.exit_code == 0, status.output
        assert "running long: #6 for 2 h 05 min (the longest completed took 0 s; no timeout set)" in status.stdout
        assert "  in flight: station-a: #6; station-b: #7\n" in status.stdout
    finally:
        store.release("busy")


def test_an_idle_campaigns_trials_left_in_flight_are_not_said_to_run_long(busy: tuple[Store, str]) -> None:
    """`closedloop run` stopped with Ctrl-C leaves its experiment in flight in the store: status said it was
    "running long" (for as long as the campaign stayed stopped), as if an instrument were hung."""
    store, path = busy
    with store.engine.begin() as connection:
        connection.execute(sqlalchemy.text('UPDATE trial SET dispatched_at = :then WHERE "index" = 6'),
                           {"then": datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)})
    snap = Snapshot.from_store(store, "busy")
    assert snap.status == "idle" and snap.running_long == []
    status = CliRunner().invoke(app, ["status", "busy", "--store", path])
    assert status.exit_code == 0, status.output
    assert "running long" not in status.stdout
    assert "left in flight: station-a: #6; station-b: #7 (nothing runs them now; when the campaign runs again" \
        in " ".join(status.stdout.split())


def test_export_in_every_format_reads_back_the_same_table(busy: tuple[Store, str], tmp_path: Path) -> None:
    expected = pd.DataFrame(trial_records(busy[0], "busy"))
    assert list(expected.columns) == trial_columns(busy[0].campaign("busy"))  # the header an empty export keeps
    # the campaign file refuses a parameter or output named as one of these columns, which it would overwrite
    assert set(expected.columns) - {"x1", "x2", "y"} == set(TABLE_COLUMNS)
    runner = CliRunner()
    for fmt, read in (("csv", pd.read_csv), ("json", pd.read_json), ("parquet", pd.read_parquet)):
        out = tmp_path / f"busy.{fmt}"
        result = runner.invoke(app, ["export", "busy", "--format", fmt, "-o", str(out), "--store", busy[1]])
        assert result.exit_code == 0, result.output
        frame = read(out)
        assert list(frame["trial"]) == list(range(1, 10)), fmt
        assert list(frame["status"]) == list(expected["status"])
        assert frame["y"].iloc[:4].tolist() == [12.0, 3.5, 7.25, 4.0]
        assert frame["error"].iloc[4] == "beam dump"
    bad = runner.invoke(app, ["export", "busy", "--format", "xlsx", "--store", busy[1]])
    assert bad.exit_code == 2 and "use csv, parquet or json" in bad.stderr
    stdout = runner.invoke(app, ["export", "busy", "-f", "json", "-o", "-", "--store", busy[1]])
    assert json.loads(stdout.stdout)[1]["y"] == 3.5


def test_the_live_view_draws_a_panel_per_campaign_on_a_terminal(busy: tuple[Store, str]) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    view = ProgressView(busy[0].campaign("busy"), busy[0], console)
    with view:
        view("trial_completed", {"campaign": "busy", "trial": 4, "values": {"y": 4.0}, "finished": 5})
    text = out.getvalue()
    assert "busy" in text and "5/10" in text
    assert "station-a: #6; station-b: #7" in text
    assert "y=3.5 (#2, experiment 2 of 5" in text
    assert "#8" in text and "closedloop approve" in text


def test_the_plain_view_prints_one_line_per_event(busy: tuple[Store, str]) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    view = ProgressView(busy[0].campaign("busy"), busy[0], console)
    with view:
        view("trial_proposed", {"campaign": "busy", "trial": 10, "parameters": {"x1": 1.0}, "held": True})
        view("trial_completed", {"campaign": "busy", "trial": 6, "values": {"y": 2.0}, "finished": 6,
                                 "best": {"trial": 6, "values": {"y": 2.0}}})
        view("trial_failed", {"campaign": "busy", "trial": 7, "error": "timed out", "finished": 7})
        view("instrument_unavailable", {"station": "robot", "instrument": "drivers.epics_motor:Stage",
                                        "error": "IOC [lab:] down", "retry_in_s": 4.0})
    assert out.getvalue().splitlines() == [
        "experiment 10 held for approval: x1=1",
        "[6/10] experiment 6: y=2; best y=2 (#6)",
        "[7/10] experiment 7: failed: timed out; best y=2 (#6)",
        "station robot cannot reach drivers.epics_motor:Stage (IOC [lab:] down); the experiment waits, next try in 4 s",
    ]


def test_watch_reads_the_store_until_the_campaign_completes(busy: tuple[Store, str]) -> None:
    store = busy[0]
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)

    def finish() -> None:
        time.sleep(0.3)
        other = Store(busy[1])
        for trial in other.trials(1, ["dispatched"]):
            other.record_result(trial.id, f"late-{trial.id}", {"y": 1.25})
        other.set_campaign_status(1, "completed")

    threading.Thread(target=finish).start()
    snap = watch(store, "busy", console, interval_s=0.1, timeout_s=20)
    assert snap.status == "completed" and snap.finished == 7
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("busy: 5/10 experiments, best y=3.5")
    assert lines[-1].startswith("busy: 7/10 experiments, best y=1.25")


def test_watch_follows_a_daemon_event_stream(busy: tuple[Store, str]) -> None:
    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)

    def publish() -> None:
        time.sleep(0.5)  # PUB/SUB: a subscriber hears only what is sent after it joined
        events = [("trial_completed", {"campaign": "other", "trial": 1, "values": {"y": 0.0}, "finished": 1}),
                  ("trial_completed", {"campaign": "busy", "trial": 6, "values": {"y": 2.0}, "finished": 6,
                                       "best": {"trial": 6, "values": {"y": 2.0}}}),
                  ("campaign_finished", {"campaign": "busy", "finished": 6})]
        for seq, (kind, details) in enumerate(events, start=1):
            pub.send_multipart(list(encode_event(seq, kind, details)))

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        watch_events(busy[0], "busy", console, f"tcp://127.0.0.1:{port}", timeout_s=20, idle_check_s=5)
    finally:
        thread.join()
        pub.close(linger=0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"following busy on tcp://127.0.0.1:{port}: 5/10 experiments")
    assert lines[1:] == ["[6/10] experiment 6: y=2; best y=2 (#6)"]  # the other campaign's event is filtered out


def test_status_without_a_store_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: give --store: no results/*.db here"
    assert not (tmp_path / "results").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_watch_in_another_terminal_follows_a_running_daemon(tmp_path: Path) -> None:
    """`closedloop daemon`, `worker` and `watch` as three processes, as a scientist runs them."""
    import os
    import signal
    import subprocess
    import sys

    campaign = tmp_path / "c.yaml"
    campaign.write_text((Path(__file__).resolve().parents[1] / "campaigns" / "branin.yaml").read_text()
                        .replace("experiments: 30", "experiments: 6").replace("initial_experiments: 8",
                                                                             "initial_experiments: 6")
                        .replace("backend: botorch", "backend: sobol"))
    bind, publish, control = (f"tcp://127.0.0.1:{_free_port()}" for _ in range(3))
    db = str(tmp_path / "branin.db")
    cli = [sys.executable, "-m", "closedloop.cli"]
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen([*cli, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        started.append(process)
        return process

    try:
        daemon = start("daemon", str(campaign), "--bind", bind, "--publish", publish, "--control", control,
                       "--store", db)
        assert daemon.stdout is not None and "daemon listening" in daemon.stdout.readline()
        watcher = start("watch", "branin", "--store", db, "--control", control, "--timeout", "120")
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        assert first.startswith(f"following branin on {publish}: 0/6 experiments"), first
        time.sleep(0.5)  # let the subscription reach the daemon before anything happens
        status = subprocess.run([*cli, "status", "branin", "--store", db, "--control", control], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert f"daemon at {bind}" in status.stdout and "no station connected" in status.stdout
        assert "  branin: 0 queued, 0 held" in status.stdout
        start("worker", "--connect", bind, "--name", "station-1")
        out, _ = watcher.communicate(timeout=180)
        assert watcher.returncode == 0, out
        lines = out.splitlines()
        assert [line.split("]")[0] for line in lines] == [f"[{k}/6" for k in range(1, 7)], out
        assert all("best y=" in line for line in lines)
        assert daemon.wait(timeout=60) == 0
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture
def costly(tmp_path: Path) -> tuple[Store, str]:
    """A campaign with sources and a budget in cost 12: 5 simulations (0.1 each), 2 robot runs (1 each) and a
    failed robot run finished (cost 3.5), 1 robot run in flight."""
    from closedloop.campaign import Campaign

    store = Store(tmp_path / "costly.db")
    campaign = Campaign.from_yaml(Path(__file__).resolve().parents[1] / "campaigns" / "branin_multifidelity.yaml")
    cid = store.open_campaign(campaign)
    runs = [("simulation", 20.0)] * 5 + [("robot", 9.0), ("robot", 4.5), ("robot", None), ("robot", "flight")]
    for i, (source, y) in enumerate(runs, start=1):
        (trial,) = store.add_trials(cid, [({"x1": float(i), "x2": 1.0, "source": source}, {})])
        store.mark_dispatched(trial.id, source)
        if y is None:
            store.record_failure(trial.id, "gripper dropped the vial")
        elif y != "flight":
            store.record_result(trial.id, f"run-{i}", {"y": y})
    return store, str(tmp_path / "costly.db")


def test_a_proposal_rejected_before_it_ran_costs_nothing_in_views_report_or_a_restarted_daemon(
        costly: tuple[Store, str], tmp_path: Path) -> None:
    from closedloop.daemon import CampaignRun
    from closedloop.report import write_report

    store, _ = costly
    campaign = store.campaign("branin-multifidelity")
    cid = store.campaign_row("branin-multifidelity").id
    (refused,) = store.add_trials(cid, [({"x1": 2.0, "x2": 2.0, "source": "robot"}, {})])
    store.reject(refused.id, "grace")
    (retried,) = store.add_trials(cid, [({"x1": 3.0, "x2": 3.0, "source": "robot"}, {})])
    store.mark_dispatched(retried.id, "robot")
    store.requeue(retried.id, "station lost")  # its first attempt ran (and cost), then a person refused the retry
    store.reject(retried.id, "grace")
    assert Snapshot.from_store(store, "branin-multifidelity").spent == pytest.approx(4.5)
    assert CampaignRun(campaign, store).spent == pytest.approx(4.5)  # a daemon restarting on this store
    page = write_report(store, "branin-multifidelity", tmp_path / "report.html").read_text()
    assert "<td>4.5 of 12</td>" in page


def test_progress_with_a_budget_in_cost_is_cost_spent_over_the_budget(costly: tuple[Store, str]) -> None:
    store, path = costly
    snap = Snapshot.from_store(store, "branin-multifidelity")
    # not 8/120: 120 is only what the cost buys at the cheapest source
    assert snap.spent == pytest.approx(3.5) and snap.used() == pytest.approx(3.5 / 12)
    assert snap.progress_text() == "cost 3.5/12, 8 experiments"
    assert snap.lines()[0] == "branin-multifidelity: idle, cost 3.5/12, 8 experiments (7 completed, 1 failed)"
    elapsed, remaining = snap.elapsed_s(), snap.remaining_s()
    assert remaining == pytest.approx(elapsed * 8.5 / 3.5, rel=0.5)  # 8.5 of 12 left at the pace of 3.5
    status = CliRunner().invoke(app, ["status", "branin-multifidelity", "--store", path, "--control", ""])
    assert status.exit_code == 0 and "cost 3.5/12, 8 experiments" in status.stdout, status.output
    listing = CliRunner().invoke(app, ["list", "--store", path])
    assert "cost 3.5/12" in listing.stdout and "/120" not in listing.stdout

    terminal = io.StringIO()
    with ProgressView(store.campaign("branin-multifidelity"), store,
                      Console(file=terminal, force_terminal=True, width=120, color_system=None)):
        pass
    assert "cost 3.5/12, 8 experiments" in terminal.getvalue() and "/120" not in terminal.getvalue()

    plain = io.StringIO()
    view = ProgressView(store.campaign("branin-multifidelity"), store, Console(file=plain, force_terminal=False))
    view("trial_completed", {"campaign": "branin-multifidelity", "trial": 9, "values": {"y": 2.0}, "finished": 9,
                             "spent": 4.5, "best": {"trial": 9, "values": {"y": 2.0}}})
    assert plain.getvalue().splitlines() == ["[cost 4.5/12, 9] experiment 9: y=2; best y=2 (#9)"]


def test_status_says_running_only_while_a_process_runs_the_campaign(busy: tuple[Store, str]) -> None:
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom closedloop.store import Store\n"
         "Store(sys.argv[1]).claim('busy')\nprint('held', flush=True)\ntime.sleep(120)\n", busy[1]],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert Snapshot.from_store(busy[0], "busy").status == "running"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert Snapshot.from_store(busy[0], "busy").status == "idle"


def test_status_estimates_the_time_remaining_only_while_experiments_run(busy: tuple[Store, str]) -> None:
    """The time remaining was the pace so far, shown however the campaign stood: `status` gave minutes left of a
    campaign paused, waiting for a person, with nothing in flight for an hour, or that no process ran."""
    store, path = busy

    def time_line() -> str:
        status = CliRunner().invoke(app, ["status", "busy", "--store", path, "--control", ""])
        assert status.exit_code == 0, status.output
        (line,) = [line.strip() for line in status.stdout.splitlines() if line.strip().startswith("elapsed")]
        return line

    assert time_line().endswith("remaining - (idle: no process runs it)")
    cid = store.campaign_row("busy").id
    store.claim("busy")  # as the process running it does
    try:
        assert re.fullmatch(r"elapsed \d+ s, remaining \d+ s", time_line())  # #6 and #7 in flight
        store.set_campaign_status(cid, "paused")
        assert time_line().endswith("remaining - (paused)")
        terminal = io.StringIO()
        Console(file=terminal, force_terminal=True, width=120, color_system=None).print(Snapshot.from_store(store, "busy"))
        assert "elapsed, remaining - (paused)" in terminal.getvalue()
        store.set_campaign_status(cid, "running")
        trials = {t.index: t for t in store.trials(cid)}
        for index in (6, 7):
            store.record_result(trials[index].id, f"run-{index}", {"y": float(index)})
        assert time_line().endswith("remaining - (waiting for approval)")  # #8 is held, nothing else runs
        store.reject(trials[8].id, "grace")
        assert time_line().endswith("remaining - (waiting for results by hand)")  # #9
        store.mark_dispatched(trials[9].id, "by hand")
        store.record_result(trials[9].id, "run-9", {"y": 9.0})
        # the planner choosing the next experiment leaves nothing in flight for a moment: the pace still holds
        assert re.fullmatch(r"elapsed \d+ s, remaining \d+ s", time_line())
        with store.engine.begin() as connection:  # then an hour without an experiment: no station, say
            connection.execute(sqlalchemy.text("UPDATE trial SET dispatched_at = :then, finished_at = :then"),
                               {"then": datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=1)})
        assert "remaining - (nothing in flight for 1 h 00 min)" in time_line()
        store.set_campaign_status(cid, "completed")
        assert time_line().endswith("remaining - (completed)")
    finally:
        store.release("busy")


def test_the_time_remaining_is_paced_by_the_time_experiments_ran_not_by_a_stop(tmp_path: Path) -> None:
    """The pace was the wall time since the campaign's start over the experiments done: a campaign run on Monday
    (ten experiments of a minute), stopped, and run again on Wednesday had two days in its pace, and `status`
    gave days left of what takes minutes. The experiment Ctrl-C left in flight, abandoned on Wednesday because its
    station never came back, spans the two days as well."""
    store = Store(tmp_path / "resumed.db")
    cid = store.open_campaign(branin_campaign(name="resumed", experiments=30, backend="sobol"))
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    monday = now - timedelta(days=2, minutes=12)

    def at(index: int, dispatched: datetime, finished: datetime | None) -> None:
        with store.engine.begin() as connection:
            connection.execute(sqlalchemy.text('UPDATE trial SET dispatched_at = :d, finished_at = :f '
                                               'WHERE "index" = :i'), {"d": dispatched, "f": finished, "i": index})

    with store.engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE campaign SET created_at = :t"), {"t": monday})
    for i in range(1, 11):
        (trial,) = store.add_trials(cid, [({"x1": float(i % 5), "x2": 1.0}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"y": float(i)})
        at(i, monday + timedelta(minutes=i), monday + timedelta(minutes=i + 1))
    (left,) = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {})])  # in flight when the campaign was stopped
    store.mark_dispatched(left.id, "station-a")
    store.record_failure(left.id, "station station-a did not come back after a daemon restart",
                         status=TrialStatus.abandoned)
    at(11, monday + timedelta(minutes=11), now - timedelta(seconds=20))
    (running,) = store.add_trials(cid, [({"x1": 1.0, "x2": 3.0}, {})])
    store.mark_dispatched(running.id, "station-a")
    at(12, now - timedelta(seconds=10), None)

    store.claim("resumed")  # run again
    try:
        snap = Snapshot.from_store(store, "resumed")
        assert snap.finished == 11 and snap.in_flight == {"station-a": [12]}
        elapsed, remaining = snap.elapsed_s(), snap.remaining_s()
        assert elapsed is not None and elapsed > 2 * 86400  # the wall clock, which budget.hours counts
        # 19 experiments left at about a minute each (the abandoned one counts at most five times the longest
        # completed experiment), not 19/11 of two days
        assert remaining is not None and 15 * 60 < remaining < 35 * 60, remaining
        status = CliRunner().invoke(app, ["status", "resumed", "--store", str(tmp_path / "resumed.db"),
                                          "--control", ""])
        assert status.exit_code == 0, status.output
        assert re.search(r"elapsed 48 h \d\d min, remaining [23]\d min \d\d s", status.stdout), status.stdout
    finally:
        store.release("resumed")
        store.close()


def test_active_time_is_the_union_of_spans_with_short_gaps_bridged() -> None:
    # overlapping experiments count once; a minute's choosing between them counts; an hour's stop does not
    assert active_seconds([(0, 60), (30, 90), (120, 180), (3780, 3840), (3800, 3810)], bridge_s=60) == 240
    assert active_seconds([(5, 5)]) == 0 and active_seconds([]) == 0


def test_an_export_of_a_campaign_without_trials_keeps_its_header(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    Store(db).open_campaign(branin_campaign(name="empty", experiments=10, backend="sobol"))
    result = CliRunner().invoke(app, ["export", "empty", "--store", str(db), "-o", "-"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split(",")[:5] == ["trial", "status", "x1", "x2", "y"]


def test_a_failing_planner_is_said_once_until_it_recovers() -> None:
    out = io.StringIO()
    view = ProgressView(branin_campaign(name="p", experiments=10, backend="sobol"), None,
                        Console(file=out, force_terminal=False, width=200))
    for _ in range(3):
        view("planner_error", {"campaign": "p", "error": "ValueError: Overflow when unpacking long long"})
    view("model_updated", {"campaign": "p", "generator": "sobol"})
    view("planner_error", {"campaign": "p", "error": "ValueError: Overflow when unpacking long long"})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and all("the planner failed (ValueError: Overflow" in line for line in lines), lines


def test_list_says_idle_as_status_does(busy: tuple[Store, str]) -> None:
    """`list` showed the stored "running" of a campaign no process runs, where `status` said "idle"."""
    listing = CliRunner().invoke(app, ["list", "--store", busy[1]])
    assert listing.exit_code == 0, listing.output
    (row,) = [line for line in listing.stdout.splitlines() if line.strip().startswith("busy")]
    assert row.split()[1] == "idle", row


def test_piped_tables_keep_every_cell_whole(tmp_path: Path) -> None:
    """Piped or redirected, `show` and `list` were cut to 80 columns: 0.123457 printed as 0.12…, errors wrapped
    over five lines (the console's own width capped the 200 columns asked for)."""
    from closedloop.campaign import Campaign

    store = Store(tmp_path / "wide.db")
    campaign = Campaign.from_yaml((Path(__file__).resolve().parents[1] / "campaigns" / "zdt1.yaml"))
    cid = store.open_campaign(campaign)
    parameters = {f"x{i}": 0.123456789 * i for i in range(1, 7)}
    (done,) = store.add_trials(cid, [(parameters, {"generator": "sobol"})])
    store.mark_dispatched(done.id, "station-with-a-long-name")
    store.record_result(done.id, "run-1", {"f1": 0.987654321, "f2": 5.4321012345})
    (failed,) = store.add_trials(cid, [(parameters, {"generator": "sobol"})])
    store.mark_dispatched(failed.id, "station-with-a-long-name")
    error = "DeviceError: y: simulated device fault at {'x1': 0.12345678912345, 'x2': 0.2469135782469}"
    store.record_failure(failed.id, error)
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "zdt1-front", "--store", str(tmp_path / "wide.db")])
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout
    lines = shown.stdout.splitlines()
    assert len(lines) == 4, shown.stdout  # title, header, one line per trial
    assert lines[2].split()[:9] == ["1", "completed", "0.123457", "0.246914", "0.37037", "0.493827", "0.617284",
                                    "0.740741", "0.987654"]
    assert error in lines[3]
    listing = runner.invoke(app, ["list", "--store", str(tmp_path / "wide.db")])
    assert "…" not in listing.stdout and "1 on the Pareto front" in listing.stdout


def test_a_json_export_holds_the_stored_numbers_and_names_exactly(tmp_path: Path) -> None:
    """pandas wrote at most 15 significant digits: 0.9841181663796306 came back as 0.984118166379631."""
    from closedloop.campaign import Campaign

    campaign = Campaign.from_yaml_text(
        "name: solvents\nparameters:\n  x1: {type: continuous, bounds: [-5, 10]}\n"
        "  solvent: {type: categorical, values: [H₂O, éthanol, 酢酸]}\nobjectives:\n  y: {goal: minimize}\n"
        "budget: {experiments: 5}\nplanner: {backend: sobol, initial_experiments: 2}\n"
        "instrument: {function: 'lab:measure'}\n", check_instrument=False)
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(campaign)
    (trial,) = store.add_trials(cid, [({"x1": -0.9841181663796306, "solvent": "酢酸"}, {"generator": "sobol"})])
    store.mark_dispatched(trial.id, "station-a")
    store.record_result(trial.id, "run-1", {"y": 0.1 + 0.2})
    runner = CliRunner()
    piped = runner.invoke(app, ["export", "solvents", "-f", "json", "-o", "-", "--store", str(tmp_path / "s.db")])
    written = runner.invoke(app, ["export", "solvents", "-f", "json", "-o", str(tmp_path / "s.json"), "--store",
                                  str(tmp_path / "s.db")])
    assert piped.exit_code == 0 and written.exit_code == 0, piped.output + written.output
    for text in (piped.stdout, (tmp_path / "s.json").read_text(encoding="utf-8")):
        (row,) = json.loads(text)
        assert row["x1"] == -0.9841181663796306 and row["y"] == 0.1 + 0.2
        assert row["solvent"] == "酢酸" and "酢酸" in text  # as written, not \u9162\u9178
    assert pd.read_json(tmp_path / "s.json", precise_float=True)["x1"].tolist() == [-0.9841181663796306]


def test_a_parquet_export_of_a_categorical_of_numbers_and_text_writes_it_as_text(tmp_path: Path) -> None:
    # a parquet column has one type: 'values: [10, 20, "007"]' failed the export ("ArrowInvalid: Could not convert
    # '007' with type str: tried to convert to int64") and wrote nothing
    from closedloop.campaign import Campaign

    campaign = Campaign.from_yaml_text(
        "name: mixedcat\nparameters:\n  x: {type: continuous, bounds: [0, 1]}\n"
        "  cat: {type: categorical, values: [10, 20, '007']}\nobjectives:\n  y: {goal: minimize}\n"
        "budget: {experiments: 4}\ninstrument: {simulator: 'simulators.surfaces:Branin'}\n", check_instrument=False)
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(campaign)
    for trial, cat in zip(store.add_trials(cid, [({"x": 0.5, "cat": 10}, {}), ({"x": 0.25, "cat": "007"}, {})]),
                          (10, "007")):
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{cat}", {"y": 1.0})
    target = tmp_path / "mixedcat.parquet"
    result = CliRunner().invoke(app, ["export", "mixedcat", "-f", "parquet", "-o", str(target), "--store",
                                      str(tmp_path / "s.db")])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(target)
    assert frame["cat"].tolist() == ["10", "007"] and frame["x"].tolist() == [0.5, 0.25]


def test_an_export_into_a_new_folder_makes_it_as_a_report_does(busy: tuple[Store, str], tmp_path: Path) -> None:
    """`report -o reports/x/report.html` made its folder; `export -o exports/x.csv` failed ("non-existent directory")."""
    for fmt in ("csv", "json", "parquet"):
        target = tmp_path / "exports" / fmt / f"busy.{fmt}"
        result = CliRunner().invoke(app, ["export", "busy", "-f", fmt, "-o", str(target), "--store", busy[1]])
        assert result.exit_code == 0, result.output
        assert target.stat().st_size > 0


def test_export_and_report_leave_the_store_and_other_files_as_they_are(busy: tuple[Store, str], tmp_path: Path) -> None:
    """`export NAME -o results/NAME.db` overwrote the campaign's own store with a CSV file (every result lost), and
    `report -o` with HTML; `-o` named any file, the campaign's YAML too, or a folder (IsADirectoryError)."""
    store_path = Path(busy[1])
    campaign_file = tmp_path / "busy.yaml"
    campaign_file.write_text("name: busy\n")
    before = {path: path.read_bytes() for path in (store_path, campaign_file)}
    runner = CliRunner()
    for command, target, said in (
            (["export", "busy"], store_path, "exists and is an SQLite database (a store?): it is left as it is"),
            (["export", "busy", "-f", "json"], campaign_file, "exists and is not a .json file"),
            (["report", "busy"], store_path, "exists and is an SQLite database"),
            (["report", "busy"], campaign_file, "exists and is not a .html file"),
            (["export", "busy"], tmp_path, "is a folder: name a file"),
            (["report", "busy"], tmp_path, "is a folder: name a file")):
        result = runner.invoke(app, [*command, "-o", str(target), "--store", busy[1]])
        assert result.exit_code == 2 and said in " ".join(result.stderr.split()), (command, target, result.output)
    assert {path: path.read_bytes() for path in before} == before
    again = tmp_path / "busy.csv"
    for _ in range(2):  # an earlier export of the same kind is replaced, as before
        result = runner.invoke(app, ["export", "busy", "-o", str(again), "--store", busy[1]])
        assert result.exit_code == 0, result.output


def test_export_writes_the_format_its_output_file_names(busy: tuple[Store, str], tmp_path: Path) -> None:
    """`export NAME -o past.parquet` without --format wrote CSV text into the .parquet file (and `-o past.json` a
    CSV too): no parquet or JSON reader could read it, `closedloop import` included, which goes by the suffix."""
    runner = CliRunner()
    for suffix in ("parquet", "json", "csv"):
        target = tmp_path / f"past.{suffix}"
        result = runner.invoke(app, ["export", "busy", "-o", str(target), "--store", busy[1]])
        assert result.exit_code == 0, result.output
        frame = {"parquet": pd.read_parquet, "json": pd.read_json, "csv": pd.read_csv}[suffix](target)
        assert len(frame) == len(trial_records(busy[0], "busy"))
    mismatch = tmp_path / "other.json"
    result = runner.invoke(app, ["export", "busy", "-f", "csv", "-o", str(mismatch), "--store", busy[1]])
    assert result.exit_code == 2 and "is a .json file, but --format is csv" in result.stderr, result.output
    assert not mismatch.exists()


def test_an_export_names_the_run_of_a_failed_trial_as_explain_does(tmp_path: Path) -> None:
    store = Store(tmp_path / "failed.db")
    cid = store.open_campaign(branin_campaign(name="failing", experiments=6, backend="sobol"))
    (done, failed) = store.add_trials(cid, [({"x1": 1.0, "x2": 1.0}, {}), ({"x1": 2.0, "x2": 2.0}, {})])
    store.mark_dispatched(done.id, "station-a")
    store.record_result(done.id, "run-done", {"y": 3.0})
    store.mark_dispatched(failed.id, "station-a")
    store.record_failure(failed.id, "gripper dropped the vial", run_uid="run-dropped")
    records = {r["trial"]: r for r in trial_records(store, "failing")}
    assert records[done.index]["run_uid"] == "run-done"
    assert records[failed.index]["run_uid"] == "run-dropped" and records[failed.index]["y"] is None
    store.close()


def test_the_terminal_panel_prints_bracketed_station_names_and_messages_as_written(tmp_path: Path) -> None:
    """On a terminal, status's panel printed a station '[lab]robot' as 'robot': rich read '[lab]' as a style tag."""
    store = Store(tmp_path / "b.db")
    cid = store.open_campaign(branin_campaign(name="brackets", experiments=10, backend="sobol"))
    for x2, outcome in ((1.0, "completed"), (2.0, "failed"), (3.0, "in flight")):
        (trial,) = store.add_trials(cid, [({"x1": 1.0, "x2": x2}, {})])
        store.mark_dispatched(trial.id, "[lab]robot")
        if outcome == "completed":
            store.record_result(trial.id, "run-1", {"y": 3.0})
        elif outcome == "failed":
            store.record_failure(trial.id, "device [x] failed at slot:cd:2")
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=200, color_system=None).print(Snapshot.from_store(store, "brackets"))
    text = out.getvalue()
    assert "[lab]robot: #3" in text, text
    assert "failed: device [x] failed at slot:cd:2" in text, text
    assert "brackets (idle)" in text, text


def test_a_csv_export_neutralises_formulas_and_imports_back_as_stored(tmp_path: Path) -> None:
    # a categorical value '=HYPERLINK(...)' or '@SUM(A1)' went into the CSV as written, and a spreadsheet opening the
    # export ran it as a formula (OWASP's CSV injection); the cell now starts with "'", which an import takes off
    import csv

    from closedloop.campaign import Campaign

    values = ['=HYPERLINK("http://x","y")', "+cmd", "-2+3", "@SUM(A1)", "'quoted", "'=x", "plain"]
    text = ("name: NAME\nparameters:\n  x: {type: continuous, bounds: [-1, 1]}\n"
            f"  cat: {{type: categorical, values: {json.dumps(values)}}}\nobjectives:\n  y: {{goal: minimize}}\n"
            "budget: {experiments: 10}\ninstrument: {function: 'tests.conftest:any_parameters'}\n")
    store = Store(tmp_path / "s.db")
    cid = store.open_campaign(Campaign.from_yaml_text(text.replace("NAME", "formulas"), check_instrument=False))
    for i, (trial, value) in enumerate(zip(store.add_trials(cid, [({"x": -0.5, "cat": v}, {}) for v in values]),
                                           values)):
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"y": -float(i)})
    store.close()
    target = tmp_path / "formulas.csv"
    result = CliRunner().invoke(app, ["export", "formulas", "-o", str(target), "--store", str(tmp_path / "s.db")])
    assert result.exit_code == 0, result.output
    with open(target, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    cells = [cell for row in rows for cell in row.values()]
    assert not [c for c in cells if c[:1] in ("=", "+", "@") or (c[:1] == "-" and not c[1:2].isdigit())], cells
    assert [row["cat"] for row in rows] == ["'" + v if v != "plain" else v for v in values]
    assert [row["x"] for row in rows] == ["-0.5"] * len(values) and rows[1]["y"] == "-1.0"  # numbers as numbers
    (tmp_path / "again.yaml").write_text(text.replace("NAME", "again"))
    imported = CliRunner().invoke(app, ["import", str(tmp_path / "again.yaml"), str(target), "--store",
                                        str(tmp_path / "s.db")])
    assert imported.exit_code == 0, imported.output
    store = Store(tmp_path / "s.db", read_only=True)
    assert [r["cat"] for r in trial_records(store, "again")] == values
    store.close()


def test_a_snapshot_builds_no_orm_object_per_trial(tmp_path: Path) -> None:
    # `closedloop status` and `list` built an ORM object of every trial and observation: 12 s at 50,000 trials
    from tests.reportdata import mixed_store, orm_rows_loaded

    store, _ = mixed_store(tmp_path / "s.db", n=12)
    with orm_rows_loaded() as loaded:
        snap = Snapshot.from_store(store, "mixed")
    assert snap.counts == {"completed": 11, "failed": 1} and snap.best is not None
    assert loaded == []


def test_trial_records_read_no_orm_object_and_give_what_the_orm_rows_gave(tmp_path: Path) -> None:
    # 'closedloop export' and trial_records took 25 s and 13.6 s at 50,000 trials building an ORM object of every
    # trial and observation (benchmarks/big_store.py); the records must stay the same field for field
    from closedloop import hitl
    from closedloop.view import _iso
    from tests.reportdata import mixed_store, orm_rows_loaded

    store, campaign = mixed_store(tmp_path / "s.db", n=20)
    cid = store.campaign_row("mixed").id
    store.import_results(cid, [({**store.trials(cid)[0].parameters}, None, "clogged")], "past.csv")
    hand = hitl.suggest(store, campaign, n=2)
    hitl.tell(store, "mixed", hand[0].index, {name: 1.5 for name in campaign.outputs})
    failed = store.add_trials(cid, [(store.trials(cid)[1].parameters, {"generator": "botorch"})])[0]
    store.mark_dispatched(failed.id, "station-a")  # type: ignore[arg-type]
    store.record_failure(failed.id, "door open", run_uid="run-failed")  # type: ignore[arg-type]
    observations = store.observations(cid)
    expected = []
    for t in store.trials(cid):  # the records as the ORM rows gave them
        obs = observations.get(t.id)  # type: ignore[arg-type]
        expected.append({"trial": t.index, "status": t.status, **{n: t.parameters.get(n) for n in campaign.parameters},
                         **{n: (obs.values.get(n) if obs else None) for n in campaign.outputs},
                         "station": t.station, "error": t.error,
                         "run_uid": obs.run_uid if obs else (t.run_uids[-1] if t.run_uids else None),
                         "generator": t.planner.get("generator"), "execution": t.planner.get("execution"),
                         "attempts": t.attempts, "duration_s": obs.duration_s if obs else None,
                         "proposed_at": _iso(t.proposed_at), "dispatched_at": _iso(t.dispatched_at),
                         "finished_at": _iso(t.finished_at)})
    with orm_rows_loaded() as loaded:
        records = trial_records(store, "mixed")
    assert loaded == []
    assert repr(records) == repr(expected)
    assert {r["execution"] for r in records} == {None, "manual"} and records[-1]["run_uid"] == "run-failed"


def test_a_campaign_of_several_objectives_shows_its_pareto_front_not_one_objectives_best(tmp_path: Path) -> None:
    """`status`, `list` and `watch` showed the best of the first objective alone ('best min f1=0.1 (#1)'), hiding
    every trade-off the campaign had found; they show the front the report and the summary show."""
    from closedloop import report
    from closedloop.campaign import Campaign

    store = Store(tmp_path / "front.db")
    campaign = Campaign.from_yaml((Path(__file__).resolve().parents[1] / "campaigns" / "zdt1.yaml"))
    cid = store.open_campaign(campaign)
    for i, (f1, f2) in enumerate([(0.1, 5.0), (0.5, 1.0), (0.6, 6.0), (0.2, 0.9)], start=1):
        (trial,) = store.add_trials(cid, [({f"x{k}": 0.1 * k for k in range(1, 7)}, {"generator": "sobol"})])
        store.mark_dispatched(trial.id, "station-a")
        store.record_result(trial.id, f"run-{i}", {"f1": f1, "f2": f2})
    snap = Snapshot.from_store(store, "zdt1-front")
    assert snap.front == [1, 4] == [r.trial for r in report.pareto_front(store, "zdt1-front")]
    assert "  Pareto front 2 of 4 experiments (f1, f2): #1, #4" in snap.lines()
    store.close()
    status = CliRunner().invoke(app, ["status", "zdt1-front", "--store", str(tmp_path / "front.db"), "--control", ""])
    assert status.exit_code == 0 and "2 of 4 experiments (f1, f2): #1, #4" in status.stdout, status.stdout
    listing = CliRunner().invoke(app, ["list", "--store", str(tmp_path / "front.db")])
    assert "2 on the Pareto front" in listing.stdout, listing.stdout
