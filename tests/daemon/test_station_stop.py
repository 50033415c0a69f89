"""A station stopped with SIGTERM (systemctl stop, a redeploy) while it runs an experiment."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from closedloop.store import Store
from tests.daemon.procs import (campaign_yaml, check_one_run_then_handed_back, free_port, kill9, lab, Lab, ran,
                                sigterm_mid_run, start_compute_station, start_daemon, start_worker, wait_for)

pytestmark = pytest.mark.slow


def test_a_station_stopped_mid_run_finishes_the_run_delivers_it_and_hands_back_its_queue(tmp_path: Path) -> None:
    """The station's comms thread stopped at once while its RunEngine finished the run: the daemon heard nothing,
    declared it lost and ran the trial again on the other station (measured twice; with no retries, abandoned
    and the finished measurement thrown away as a late result)."""
    with lab(tmp_path, campaign_yaml("stop", 4, latency=3.0, concurrency=4), "stopped", "other") as here:
        wait_for(lambda: here.log.exists() and 'state="started" station="stopped"' in here.log.read_text(), 60,
                 "the station to start an experiment")
        sigterm_mid_run(here.stations["stopped"], tmp_path / "stopped.out", leave_within_s=10)
        assert here.daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    # it left holding nothing: no trial of it was re-queued or abandoned as a lost station's
    check_one_run_then_handed_back(tmp_path, "stop", 4)


def test_a_trial_queued_on_a_killed_station_goes_back_to_the_queue(tmp_path: Path) -> None:
    """A station killed mid-run also held the trial queued behind its run, which it had not started: with the
    default retries (0) both were abandoned, an experiment of the budget lost that no instrument ever ran."""
    with lab(tmp_path, campaign_yaml("killed", 4, latency=3.0, concurrency=4, retries=0), "killed", "other") as here:
        log = here.log
        wait_for(lambda: log.exists() and 'state="started" station="killed"' in log.read_text()
                 and log.read_text().count('station="killed" attempt=1') >= 2, 60,
                 "the station to run one experiment with another queued behind it")
        kill9(here.stations["killed"])
        assert here.daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]

    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("killed").id)
    # the run cut off by the kill is abandoned (it may have used the sample); the queued trial ran elsewhere
    assert Counter(t.status for t in trials) == {"completed": 3, "abandoned": 1}
    (abandoned,) = [t for t in trials if t.status == "abandoned"]
    assert f'trial={abandoned.index} trial_id={abandoned.id} state="started" station="killed"' in log.read_text()
    assert not [t for t, n in Counter(t for t, _ in ran(tmp_path / "other.outbox")).items() if n > 1]


def _ctrl_c(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGINT)


BAD_EXIT = ("Traceback", "panicked", "Fatal Python error", "Exception ignored", "leaked semaphore")


def test_ctrl_c_to_a_station_mid_run_finishes_the_run_delivers_it_and_hands_back_its_queue(tmp_path: Path) -> None:
    """Ctrl-C to `closedloop worker` mid-experiment reached the RunEngine (no SIGINT handler of its own, run with
    context_managers=[]), which panicked: the station stayed up and failed every trial sent to it with 'The
    RunEngine is panicked and cannot be recovered', dozens a second, and never exited. It now stops as on SIGTERM."""
    with lab(tmp_path, campaign_yaml("ctrlc", 4, latency=3.0, concurrency=4), "stopped", "other") as here:
        stopped = here.stations["stopped"]
        wait_for(lambda: here.log.exists() and 'state="started" station="stopped"' in here.log.read_text(), 60,
                 "the station to start an experiment")
        time.sleep(0.5)
        _ctrl_c(stopped)
        asked = time.monotonic()
        assert stopped.wait(timeout=30) == 0, (tmp_path / "stopped.out").read_text()[-3000:]
        assert time.monotonic() - asked < 10, "the station did not leave once its run was delivered"
        assert here.daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    output = (tmp_path / "stopped.out").read_text()
    assert not [sign for sign in BAD_EXIT if sign in output], output[-3000:]
    check_one_run_then_handed_back(tmp_path, "ctrlc", 4)


def check_cut_short_then_requeued(cwd: Path, campaign: str, experiments: int) -> int:
    """Every experiment completed, none failed or abandoned, and the trial that station "stopped" had started went
    back to the daemon's queue (requeued: the station no longer held it); that trial's id."""
    store = Store(cwd / "s.db")
    try:
        trials = store.trials(store.campaign_row(campaign).id)
    finally:
        store.close()
    assert Counter(t.status for t in trials) == {"completed": experiments}, [(t.index, t.status, t.error) for t in trials]
    text = (cwd / "daemon.log").read_text()
    (cut,) = [t.id for t in trials if f'trial_id={t.id} state="started" station="stopped"' in text]
    assert f'trial_id={cut} state="requeued" reason="station does not hold it"' in text, text[-3000:]
    assert 'state="failed"' not in text and 'state="abandoned"' not in text
    return cut


def test_a_second_ctrl_c_cuts_the_run_short_and_hands_the_trial_back_unrun(tmp_path: Path) -> None:
    """Ctrl-C twice to `closedloop worker` mid-experiment: exit 0 after a traceback, and failed attempts (a
    panicked RunEngine). The second Ctrl-C now aborts the run in progress and tells the daemon that the station
    does not hold its trial, which goes back to the queue (not failed, not abandoned, with retries: 0) and runs
    on the other station; exit 130, and one line said about it."""
    with lab(tmp_path, campaign_yaml("again", 4, latency=3.0, concurrency=4, retries=0), "stopped", "other") as here:
        log, stopped = here.log, here.stations["stopped"]
        wait_for(lambda: log.exists() and 'state="started" station="stopped"' in log.read_text(), 60,
                 "the station to start an experiment")
        time.sleep(0.5)
        _ctrl_c(stopped)
        time.sleep(0.5)
        before = (tmp_path / "stopped.out").read_text().splitlines()
        _ctrl_c(stopped)
        assert stopped.wait(timeout=30) == 130, (tmp_path / "stopped.out").read_text()[-3000:]
        assert here.daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    output = (tmp_path / "stopped.out").read_text()
    assert not [sign for sign in BAD_EXIT if sign in output], output[-3000:]
    said = output.splitlines()[len(before):]
    assert len(said) == 1 and "cut short" in said[0] and "back to the daemon" in said[0], said
    # the run had 2 s left when it was cut short: it did not finish, and was not taken for a measurement
    assert not ran(tmp_path / "stopped.outbox"), "the second Ctrl-C did not cut the run short"
    check_cut_short_then_requeued(tmp_path, "again", 4)


def _computed(name: str, function: str, **options: object) -> str:
    """Two Branin experiments computed by ``tests.test_compute:function``, one at a time, never retried."""
    from simulators.surfaces import branin_campaign

    return branin_campaign(name, 2, execution={"concurrency": 1, "retries": 0},
                           instrument={"function": f"tests.test_compute:{function}", "options": options})


def _computing(tmp_path: Path, here: Lab, name: str) -> subprocess.Popen:
    """A compute station started in the lab, once it computes an experiment."""
    station = here.stations[name] = start_compute_station(tmp_path, here.endpoint, name)
    wait_for(lambda: here.log.exists() and f'state="started" station="{name}"' in here.log.read_text(), 90,
             "an experiment")
    time.sleep(0.5)
    return station


def test_ctrl_c_to_a_compute_station_finishes_its_experiment_as_sigterm_does(tmp_path: Path) -> None:
    """Ctrl-C to `closedloop compute-station` mid-experiment cancelled the Dask task and left without a word: the
    daemon declared the station lost, and with retries: 0 the experiment would be abandoned reconcile_s later. The
    first Ctrl-C now stops it as SIGTERM does: the experiment computing finishes and is delivered, exit 0."""
    with lab(tmp_path, _computed("sums", "takes", seconds=3.0)) as here:
        log = here.log
        station = _computing(tmp_path, here, "st")
        _ctrl_c(station)
        assert station.wait(timeout=60) == 0, (tmp_path / "st.out").read_text()[-3000:]
        wait_for(lambda: 'state="completed"' in log.read_text() or "reconciling" in log.read_text(), 30, "the result")
    output = (tmp_path / "st.out").read_text()
    assert not [sign for sign in BAD_EXIT if sign in output], output[-3000:]
    text = log.read_text()
    assert text.count('state="completed"') == 1 and 'state="reconciling"' not in text, text[-3000:]


def test_a_second_ctrl_c_to_a_compute_station_cancels_its_experiment_and_hands_the_trial_back(tmp_path: Path) -> None:
    """A second Ctrl-C to `closedloop compute-station` cancelled the experiment computing and left without a word:
    the daemon waited reconcile_s for the station, then with retries: 0 abandoned the trial, an experiment of the
    budget lost that nothing measured. The station now says it no longer holds the trial before it leaves (exit
    130, one line said), and the trial goes back to the queue, to run on another station, unfailed."""
    # the first experiment never ends (the second call returns at once): a station that waited for it would not
    # exit; a 6 s experiment against a 5 s bound had failed under load, the cancelling itself slowed past it
    with lab(tmp_path, _computed("cut", "hangs_the_first", marker=str(tmp_path / "first"), times=1)) as here:
        log = here.log
        stopped = _computing(tmp_path, here, "stopped")
        _ctrl_c(stopped)
        time.sleep(0.5)
        before = (tmp_path / "stopped.out").read_text().splitlines()
        _ctrl_c(stopped)
        assert stopped.wait(timeout=60) == 130, (tmp_path / "stopped.out").read_text()[-3000:]
        here.stations["other"] = start_compute_station(tmp_path, here.endpoint, "other")
        assert here.daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    output = (tmp_path / "stopped.out").read_text()
    assert not [sign for sign in BAD_EXIT if sign in output], output[-3000:]
    # Dask's own word on closing the cluster (its nanny kills the busy worker process) aside
    said = [line for line in output.splitlines()[len(before):] if "distributed." not in line]
    assert len(said) == 1 and "cancelled" in said[0] and "back to the daemon" in said[0], said
    cut = check_cut_short_then_requeued(tmp_path, "cut", 2)
    text = log.read_text()
    assert 'state="reconciling"' not in text, text[-3000:]
    assert f'trial_id={cut} state="completed" station="other"' in text or \
        f'trial_id={cut} state="started" station="other"' in text, text[-3000:]


def test_ctrl_c_to_the_daemon_waits_for_the_experiment_in_flight_as_sigterm_does(tmp_path: Path) -> None:
    """Ctrl-C to `closedloop daemon` left the serve loop at once: exit 0 with the experiment in flight left
    'dispatched' for the next start to reconcile, where SIGTERM waits for it (and Ctrl-C to a worker, a compute
    station or `run` is that same stop). The first Ctrl-C is now SIGTERM's stop; a second one, exit 130."""
    with lab(tmp_path, campaign_yaml("ctrlc-daemon", 4, latency=3.0), "station") as here:
        wait_for(lambda: here.log.exists() and 'state="started" station="station"' in here.log.read_text(), 60,
                 "the station to start an experiment")
        _ctrl_c(here.daemon)
        assert here.daemon.wait(timeout=30) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    output = (tmp_path / "daemon.out").read_text()
    assert not [sign for sign in BAD_EXIT if sign in output], output[-3000:]
    store = Store(tmp_path / "s.db")
    trials = store.trials(store.campaign_row("ctrlc-daemon").id)
    assert trials[0].status == "completed", "Ctrl-C left the experiment in flight behind"
    # the one sent ahead to the station (prefetch) never started: as after SIGTERM, it is handed back, queued again
    assert [(t.status, t.run_uids) for t in trials[1:]] in ([], [("proposed", [])])


def test_a_stopping_daemon_waits_for_a_station_lost_for_a_moment_and_keeps_its_result(tmp_path: Path) -> None:
    """SIGTERM to the daemon, then its station silent past five heartbeats mid-experiment (a frozen or loaded host):
    the drain waited only for trials of stations it still heard, so the daemon exited at once with the trial left
    'dispatched' for the next start, though --drain had a minute left and the station was back a moment later
    with the result. The drain now waits for it too, and the trial is stored completed, once."""
    (tmp_path / "c.yaml").write_text(campaign_yaml("frozen", 2, latency=3.0, concurrency=1, retries=0))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control, drain_s=60)
    station = start_worker(tmp_path, endpoint, "station")
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'state="started" station="station"' in log.read_text(), 60,
                 "the station to start an experiment")
        os.kill(daemon.pid, signal.SIGTERM)
        os.kill(station.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: "station station lost" in log.read_text(), 30, "the daemon to declare the station lost")
        finally:
            os.kill(station.pid, signal.SIGCONT)
        assert daemon.wait(timeout=90) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
    finally:
        for proc in (daemon, station):
            kill9(proc)
    text = log.read_text()
    assert "station station came back holding trial 1" in text, text[-3000:]
    store = Store(tmp_path / "s.db")
    try:
        trials = store.trials(store.campaign_row("frozen").id)
        assert [(t.index, t.status, t.attempts, len(t.run_uids)) for t in trials] == [(1, "completed", 1, 1)], (
            text[-3000:])
    finally:
        store.close()


def test_a_stopped_daemon_takes_back_the_trial_sent_ahead_unstarted_and_the_next_start_runs_it_first(
        tmp_path: Path) -> None:
    """SIGTERM to the daemon while its station ran one experiment and held the next one sent ahead (prefetch): the
    station, told nothing, started that one once the first was done, the daemon exited when --drain ran out with it
    'dispatched' (or waited for a whole experiment started after the stop), and `closedloop status` showed it in
    flight with no daemon running. Now the station hands it back unstarted, the daemon stores it queued again (not
    an attempt: `retries: 0` still runs it) and exits once the run in progress is delivered; the next start sends
    it first, and it runs once."""
    with lab(tmp_path, campaign_yaml("ahead", 4, latency=3.0, retries=0), "station") as here:
        wait_for(lambda: here.log.exists() and 'state="started" station="station"' in here.log.read_text()
                 and 'trial=2 trial_id=2 state="dispatched"' in here.log.read_text(), 60,
                 "the station to run trial 1 and hold trial 2")
        os.kill(here.daemon.pid, signal.SIGTERM)
        assert here.daemon.wait(timeout=30) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
        store = Store(tmp_path / "s.db")
        try:
            trials = store.trials(store.campaign_row("ahead").id)
            assert [(t.index, t.status, t.attempts, t.run_uids) for t in trials][1:] == [(2, "proposed", 0, [])], (
                here.log.read_text()[-3000:])
            assert trials[0].status == "completed"
        finally:
            store.close()
        assert 'trial=2 trial_id=2 state="requeued" reason="handed back unstarted: the daemon is stopping"' in (
            here.log.read_text())
        time.sleep(3.5)  # trial 2 would have run by now, had the station started it
        assert [trial for trial, _ in ran(tmp_path / "station.outbox")] == [1]

        here.daemon = start_daemon(tmp_path, here.endpoint, f"tcp://127.0.0.1:{free_port()}", log_name="again")
        again = tmp_path / "again.log"
        wait_for(lambda: again.exists() and 'trial=2 trial_id=2 state="completed"' in again.read_text(), 60,
                 "the next start to run trial 2")
        dispatched = [line for line in again.read_text().splitlines() if 'state="dispatched"' in line]
        assert "trial=2 trial_id=2" in dispatched[0], dispatched
    assert Counter(trial for trial, _ in ran(tmp_path / "station.outbox"))[2] == 1
