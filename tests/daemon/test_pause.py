"""An operator's pause longer than the campaign's per-experiment timeout (a lunch break, a sample change)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from closedloop.campaign import Campaign
from closedloop.daemon import Daemon, control_request
from closedloop.store import Store
from tests.daemon.procs import (campaign_yaml, free_port, kill9, ran, serving, start_daemon, start_worker, station,
                                wait_for)

pytestmark = pytest.mark.slow

# a queued trial's allowance to start, shortened from the daemon's 30 s so that a pause can outlast it quickly
GRACE_S = 3.0
PAUSE_S = 2 + GRACE_S + 2  # past the campaigns' 2 s timeout and the grace


def test_a_pause_longer_than_the_timeout_times_out_nothing(tmp_path: Path) -> None:
    """The deadlines ran on while the campaign was paused: the trial queued on the station (allowed the timeout
    and the start grace) timed out during the pause and was stored failed, and the planner was told its parameters
    failed, though it never ran."""
    store = Store(tmp_path / "s.db")
    campaign = Campaign.from_yaml_text(campaign_yaml("lunch", 3, latency=1.0, concurrency=2, retries=0, timeout=2))
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [campaign], heartbeat_s=0.3, control=control, start_grace_s=GRACE_S)
    with station(daemon.endpoint, "station", tmp_path), serving(daemon) as thread:
        wait_for(lambda: [sorted(f["started"] for f in c["in_flight"])
                          for c in control_request(control, "status")["campaigns"]] == [[False, True]], 60,
                 "a trial queued behind the first")
        assert control_request(control, "pause", timeout_s=10)["success"]
        time.sleep(PAUSE_S)
        assert control_request(control, "resume", timeout_s=10)["success"]
        thread.join(timeout=60)
        assert not thread.is_alive(), "the campaign did not finish after the resume"
    trials = store.trials(store.campaign_row("lunch").id)
    assert [(t.index, t.status, t.error) for t in trials] == [(i, "completed", None) for i in (1, 2, 3)]
    assert Counter(trial for trial, _ in ran(tmp_path / "station.outbox")) == {t.id: 1 for t in trials}
    store.close()


def test_a_station_whose_trial_ends_during_a_pause_hears_the_resume(tmp_path: Path) -> None:
    """The resume went only to stations with the campaign's trials in flight: a station whose trial ended
    during the pause (here an operator cancelled it) had none, stayed paused, and held every later trial."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("break", 2, latency=2.0, concurrency=1, retries=0))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    worker = start_worker(tmp_path, endpoint, "station")
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'trial=1 trial_id=1 state="started"' in log.read_text(), 60,
                 "the first experiment to start")
        assert control_request(control, "pause", timeout_s=10)["success"]
        assert control_request(control, "cancel", {"trial": 1}, timeout_s=10)["success"]
        wait_for(lambda: 'trial=1 trial_id=1 state="failed"' in log.read_text(), 30, "the cancel")
        assert control_request(control, "resume", timeout_s=10)["success"]
        assert daemon.wait(timeout=30) == 0, "the second experiment never ran"
    finally:
        for proc in (daemon, worker):
            kill9(proc)
    store = Store(tmp_path / "s.db")
    assert [t.status for t in store.trials(store.campaign_row("break").id)] == ["failed", "completed"]


def test_pausing_one_campaign_times_out_nothing_of_another_on_the_same_station(tmp_path: Path) -> None:
    """A station has one RunEngine: pausing campaign A holds campaign B's trial queued there too. B's clock ran
    on, and its trial, which never ran, timed out and was stored failed."""
    store = Store(tmp_path / "s.db")
    campaigns = [Campaign.from_yaml_text(campaign_yaml(name, 2, latency=1.0, concurrency=1, retries=0, timeout=2))
                 for name in ("a", "b")]
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, campaigns, heartbeat_s=0.3, control=control, start_grace_s=GRACE_S)
    with station(daemon.endpoint, "shared", tmp_path), serving(daemon) as thread:
        wait_for(lambda: len(control_request(control, "status")["stations"]) == 1
                 and sum(len(c["in_flight"]) for c in control_request(control, "status")["campaigns"]) == 2
                 and any(f["started"] for c in control_request(control, "status")["campaigns"]
                         for f in c["in_flight"]), 60, "one campaign's trial running, the other's queued behind it")
        running = next(c["name"] for c in control_request(control, "status")["campaigns"]
                       if any(f["started"] for f in c["in_flight"]))
        assert control_request(control, "pause", {"campaign": running})["success"]
        time.sleep(PAUSE_S)
        assert control_request(control, "resume", {"campaign": running})["success"]
        thread.join(timeout=60)
        assert not thread.is_alive(), "the campaigns did not finish after the resume"
    for run in daemon.runs.values():
        assert [(t.status, t.error) for t in store.trials(run.id)] == [("completed", None)] * 2, run.campaign.name
    store.close()


def test_a_pause_outlives_a_daemon_killed_and_restarted(tmp_path: Path) -> None:
    """The pause lived only in the daemon's memory: killed and restarted (systemd's Restart=on-failure), the
    daemon dispatched the paused campaign's experiments again, on an instrument its operator had stopped."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("night", 4, latency=1.5, concurrency=1, retries=0))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    worker = start_worker(tmp_path, endpoint, "station")
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'trial=1 trial_id=1 state="started"' in log.read_text(), 60,
                 "the first experiment to start")
        assert control_request(control, "pause", timeout_s=10)["success"]
        kill9(daemon)
        daemon = start_daemon(tmp_path, endpoint, control, log_name="again")
        again = tmp_path / "again.log"
        wait_for(lambda: again.exists() and "station station registered" in again.read_text(), 60,
                 "the station to register with the restarted daemon")
        time.sleep(5)  # three experiments' time
        status = control_request(control, "status", timeout_s=10)
        assert [c["paused"] for c in status["campaigns"]] == [True]
        assert "trial=3" not in again.read_text(), "the restarted daemon dispatched a paused campaign's experiment"
        assert control_request(control, "resume", timeout_s=10)["success"]
        assert daemon.wait(timeout=60) == 0, (tmp_path / "again.out").read_text()[-3000:]
    finally:
        for proc in (daemon, worker):
            kill9(proc)
    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("night").id)
    assert [t.status for t in trials] == ["completed"] * 4
    assert Counter(trial for trial, _ in ran(tmp_path / "station.outbox")) == {t.id: 1 for t in trials}


def test_a_station_paused_by_a_daemon_since_killed_runs_the_next_daemons_trials(tmp_path: Path) -> None:
    """A station keeps an operator's pause until it hears the resume; the daemon that paused it was killed, and
    the next one (here with another campaign: an edited file) had nothing paused to resume, so the station held
    every trial it was given, for good, and `closedloop resume` could not reach it."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("evening", 2, latency=1.5, concurrency=1, retries=0))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    worker = start_worker(tmp_path, endpoint, "station")
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'trial=1 trial_id=1 state="started"' in log.read_text(), 60,
                 "the first experiment to start")
        assert control_request(control, "pause", timeout_s=10)["success"]
        wait_for(lambda: "pausing the RunEngine" in (tmp_path / "station.log").read_text(), 30, "the station's pause")
        kill9(daemon)
        (tmp_path / "c.yaml").write_text(campaign_yaml("morning", 2, latency=0.2, concurrency=1, retries=0))
        daemon = start_daemon(tmp_path, endpoint, control, log_name="again")
        assert daemon.wait(timeout=60) == 0, "the paused station never ran the new daemon's experiments"
    finally:
        for proc in (daemon, worker):
            kill9(proc)
    store = Store(tmp_path / "s.db")
    assert [t.status for t in store.trials(store.campaign_row("morning").id)] == ["completed"] * 2


def test_a_paused_campaign_run_without_a_control_socket_is_running_not_paused(tmp_path: Path) -> None:
    """`closedloop run` has no control socket to resume from, so starting it is the resume: the store said
    'paused' (a daemon had paused it) all the while the campaign ran."""
    store = Store(tmp_path / "s.db")
    campaign = Campaign.from_yaml_text(campaign_yaml("resumed", 2))
    store.set_campaign_status(store.open_campaign(campaign), "paused")
    daemon = Daemon(store, [campaign])
    try:
        assert store.campaign_row("resumed").status == "running"
        assert not daemon.runs[store.campaign_row("resumed").id].paused
    finally:
        daemon.close()
        store.close()
