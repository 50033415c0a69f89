"""A station out of touch with the daemon while it runs an experiment (a network partition, a frozen host)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from closedloop.store import Store
from tests.daemon.procs import campaign_yaml, free_port, kill9, ran, start_daemon, start_worker, wait_for

pytestmark = pytest.mark.slow


def test_a_station_declared_lost_mid_run_keeps_its_trial_when_it_comes_back(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(campaign_yaml("partition", 2, latency=2.0, concurrency=1, retries=1))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    worker = start_worker(tmp_path, endpoint, "station-1")
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'trial=1 trial_id=1 state="started"' in log.read_text(), 60,
                 "the first experiment to start")
        os.kill(worker.pid, signal.SIGSTOP)  # mid-move: the station neither heartbeats nor answers
        try:
            wait_for(lambda: "station station-1 lost" in log.read_text(), 30, "the daemon to declare the station lost")
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert daemon.wait(timeout=90) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in (daemon, worker):
            kill9(proc)

    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("partition").id)
    assert [(t.index, t.status) for t in trials] == [(1, "completed"), (2, "completed")]
    first = trials[0]
    # the station finished the move it was making: the same attempt, one run, nothing aborted or repeated
    assert first.attempts == 1 and len(first.run_uids) == 1
    assert [uid for trial_id, uid in ran(tmp_path / "station-1.outbox") if trial_id == first.id] == first.run_uids
    assert "came back holding trial" in log.read_text()
    assert "cancelling" not in (tmp_path / "station-1.log").read_text()
