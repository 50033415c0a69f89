"""A daemon serving two campaigns killed mid-experiment, restarted with one of them, later with both."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from closedloop.store import Store
from closedloop.view import Snapshot, daemon_lines
from tests.daemon.procs import campaign_yaml, free_port, kill9, ran, start_daemon, start_worker, wait_for

pytestmark = pytest.mark.slow


def _status(store_path: Path, campaign: str) -> list[str]:
    with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5) as db:
        return [row[0] for row in db.execute("SELECT t.status FROM trial t JOIN campaign c ON c.id = t.campaign_id "
                                             "WHERE c.name = ?", (campaign,))]


def test_a_campaign_left_out_at_a_restart_keeps_its_experiment_running_and_its_result(tmp_path: Path) -> None:
    """Restarted without campaign "other", the daemon cancelled its experiment running on a station (a heartbeat
    listing a trial it did not know) and acknowledged the aborted run's failure, so the station forgot it; served
    again, the trial was held by no station and ran a second time."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("kept", 40, latency=0.2, concurrency=1))
    (tmp_path / "other.yaml").write_text(campaign_yaml("other", 1, latency=5.0, concurrency=1, retries=0))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    store_path, log = tmp_path / "s.db", tmp_path / "daemon.log"
    daemon = start_daemon(tmp_path, endpoint, control, "other.yaml")
    workers = [start_worker(tmp_path, endpoint, "for-other", "--campaign", "other"),
               start_worker(tmp_path, endpoint, "for-kept", "--campaign", "kept")]
    try:
        wait_for(lambda: log.exists() and 'state="started" station="for-other"' in log.read_text(), 60,
                 "the experiment of campaign other to start")
        kill9(daemon)
        daemon = start_daemon(tmp_path, endpoint, control)  # "kept" only
        # the experiment runs to its end and its result waits in the station's outbox, unacknowledged
        wait_for(lambda: ran(tmp_path / "for-other.outbox"), 30, "the experiment of other to finish")
        wait_for(lambda: "which this daemon does not run" in log.read_text(), 10, "the daemon to say so")
        assert _status(store_path, "other") == ["dispatched"]
        # what `closedloop status other` says: left in flight, and the running daemon does not run it
        store = Store(store_path, read_only=True)
        try:
            snapshot = Snapshot.from_store(store, "other")
        finally:
            store.close()
        assert (snapshot.status, snapshot.in_flight_label(), snapshot.in_flight) == ("idle", "left in flight",
                                                                                      {"for-other": [1]})
        assert "  other: not run by this daemon (it runs kept)" in daemon_lines(control, ["other"], 3.0, ["other"])
        kill9(daemon)
        daemon = start_daemon(tmp_path, endpoint, control, "other.yaml")
        wait_for(lambda: _status(store_path, "other") == ["completed"], 30, "other's result stored")
    finally:
        for proc in [daemon, *workers]:
            kill9(proc)
    measured = ran(tmp_path / "for-other.outbox")
    assert Counter(trial for trial, _ in measured) == {measured[0][0]: 1}, "the experiment ran twice"
    store = Store(store_path)
    try:
        [observation] = store.observations(store.campaign_row("other").id).values()
        assert (observation.trial_id, observation.run_uid) == measured[0]
    finally:
        store.close()
