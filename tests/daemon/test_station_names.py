"""A station's name belongs to one process: a second one started under it, and a restart that keeps it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from closedloop.store import Store
from tests.daemon.procs import campaign_yaml, completed, free_port, kill9, ran, start_daemon, start_worker, wait_for

pytestmark = pytest.mark.slow


def test_a_second_process_under_a_stations_name_runs_nothing_twice(tmp_path: Path) -> None:
    """An operator starts a station twice (a service and a terminal). With ROUTER_HANDOVER the newcomer took
    the name's connection, re-registered holding nothing, and the trials the first was running were handed
    out again: 27 runs for 20 experiments, 7 trials measured twice."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("twins", 20, latency=0.3, concurrency=4))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    first = start_worker(tmp_path, endpoint, "station", outbox="first.outbox")
    second = None
    try:
        wait_for(lambda: completed(tmp_path / "s.db") >= 2, 60, "the campaign to start")
        second = start_worker(tmp_path, endpoint, "station", outbox="second.outbox")
        assert daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in (daemon, first, second):
            if proc is not None:
                kill9(proc)

    measured = ran(tmp_path / "first.outbox") + ran(tmp_path / "second.outbox")
    twice = sorted(trial for trial, n in Counter(trial for trial, _ in measured).items() if n > 1)
    assert not twice, f"trials measured twice: {twice}"
    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("twins").id)
    assert Counter(t.status for t in trials) == {"completed": 20}
    assert {(o.trial_id, o.run_uid) for o in store.observations(trials[0].campaign_id).values()} == set(measured)


def test_a_station_killed_and_restarted_under_its_name_delivers_its_outbox_and_carries_on(tmp_path: Path) -> None:
    """The name is freed when its process dies: the restart (same name, same outbox) registers, and what the
    killed process measured is stored once."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("restart", 16, latency=0.3, concurrency=2))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    worker = start_worker(tmp_path, endpoint, "station")
    try:
        wait_for(lambda: completed(tmp_path / "s.db") >= 4, 60, "the campaign to start")
        kill9(worker)
        worker = start_worker(tmp_path, endpoint, "station")
        assert daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in (daemon, worker):
            kill9(proc)

    measured = ran(tmp_path / "station.outbox")
    assert not [t for t, n in Counter(t for t, _ in measured).items() if n > 1]
    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("restart").id)
    assert Counter(t.status for t in trials) == {"completed": 16}
    assert {(o.trial_id, o.run_uid) for o in store.observations(trials[0].campaign_id).values()} <= set(measured)
