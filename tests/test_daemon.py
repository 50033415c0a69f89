"""The loop daemon: separate processes on loopback, and its behaviour with in-process stations."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from closedloop import protocol
from closedloop.campaign import Campaign
from closedloop.daemon import Daemon, control_request, health
from closedloop.errors import ClosedLoopError, StoreUnwritable
from closedloop.store import Store
from closedloop.worker import StationWorker
from drivers.documents import DocumentCollector
from tests.conftest import branin_yaml
from tests.daemon.procs import (campaign_yaml, completed, env, free_port, kill9, serving, start_daemon,
                                start_worker, started_catching, station, wait_for)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_daemon_and_worker_in_separate_processes_complete_a_campaign(tmp_path: Path, free_port: int) -> None:
    (tmp_path / "c.yaml").write_text(branin_yaml("apart", 8, initial=4, seed=1, noise=0.0, backend="botorch"))
    endpoint = f"tcp://127.0.0.1:{free_port}"
    env_python = [sys.executable, "-m", "closedloop.cli"]
    daemon = subprocess.Popen([*env_python, "daemon", "c.yaml", "--bind", endpoint, "--store", "s.db"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = subprocess.Popen([*env_python, "worker", "--connect", endpoint, "--name", "station-a", "--outbox", "o.db"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = daemon.communicate(timeout=240)
    finally:
        worker.kill()
        daemon.kill()
    assert daemon.returncode == 0, out
    store = Store(tmp_path / "s.db")
    campaign_id = store.campaign_row("apart").id
    trials = store.trials(campaign_id)
    assert len(trials) == 8 and {t.status for t in trials} == {"completed"}
    assert {t.station for t in trials} == {"station-a"}
    assert len(store.observations(campaign_id)) == 8


# -- behaviour, with the daemon and stations as threads of this process on real loopback sockets -----------

def _campaign(name: str, experiments: int, **kw: object) -> Campaign:
    return Campaign.from_yaml_text(campaign_yaml(name, experiments, **kw))  # type: ignore[arg-type]


@contextmanager
def raw_station(endpoint: str, name: str) -> Iterator[zmq.Socket]:
    """A station's socket driven by hand, to send what a real station would not."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        _unread.pop(id(sock), None)
        sock.close()
        context.term()


# by socket: assigns read while waiting for another kind, kept for the next wait for an assign (the daemon sends the
# next assign before the ack of the result it follows, which waits for the run's documents)
_unread: dict[int, list[protocol.Message]] = {}


def _next_message(sock: zmq.Socket, kind: str, limit_s: float = 20.0) -> protocol.Message:
    """The next message of ``kind`` the daemon sends this hand-driven station (others skipped, assigns kept)."""
    unread = _unread.setdefault(id(sock), [])
    if kind == "assign" and unread:
        return unread.pop(0)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            message = protocol.decode(sock.recv())
            if message.type == kind:
                return message
            if message.type == "assign":
                unread.append(message)
    raise AssertionError(f"no {kind} in {limit_s:.0f} s")


def _run_documents(run_uid: str) -> str:
    """A successful run's documents as a station sends them: its start and its stop, as JSON lines."""
    return (f'{{"name":"start","doc":{{"uid":"{run_uid}","time":1.0}}}}\n'
            f'{{"name":"stop","doc":{{"run_start":"{run_uid}","exit_status":"success"}}}}\n')


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_station_of_another_version_is_refused_and_told_why(store: Store) -> None:
    daemon = Daemon(store, [_campaign("versions", 1)], heartbeat_s=0.2)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        hello = json.loads(protocol.encode(protocol.Hello(station="future")))
        sock.send(json.dumps({**hello, "v": 2}).encode())
        for _ in range(50):
            daemon.step(20)
            if sock.poll(0):
                break
        reply = json.loads(sock.recv())
        assert reply["type"] == "refused"
        assert "version 2 refused" in reply["reason"] and "speaks version 1" in reply["reason"]
        assert daemon.stations == {}
    finally:
        sock.close()
        context.term()
        daemon.close()


def test_a_station_meeting_a_daemon_of_another_version_stops_and_says_so(tmp_path: Path) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = StationWorker(f"tcp://127.0.0.1:{port}", name="old", outbox=tmp_path / "o.db", heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert router.poll(5000)
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, json.dumps({"v": 2, "type": "welcome", "heartbeat_s": 1}).encode()])
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert worker.refused is not None and "version 2" in worker.refused
    finally:
        worker.stop()
        router.close()
        context.term()


def test_a_station_of_a_newer_release_is_refused_naming_the_field_this_daemon_does_not_know(store: Store) -> None:
    """Fields are added within protocol version 1, and a daemon refuses fields it does not know: this release's
    station under a daemon of 2026-11-25 had its every hello dropped ('hello.instance: Extra inputs are not
    permitted') and waited for a welcome that never came, its log saying only that another process may hold its
    name. A daemon of this release tells such a station why, and what to do; nothing is registered."""
    daemon = Daemon(store, [_campaign("newer", 1)], heartbeat_s=0.2)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        hello = json.loads(protocol.encode(protocol.Hello(station="next-release")))
        sock.send(json.dumps({**hello, "priority": 3}).encode())
        for _ in range(50):
            daemon.step(20)
            if sock.poll(0):
                break
        assert sock.poll(0), "the daemon said nothing"
        reply = json.loads(sock.recv())
        assert reply["type"] == "refused", reply
        assert "hello.priority" in reply["reason"] and "upgrade the daemon before its stations" in reply["reason"]
        assert daemon.stations == {}
    finally:
        sock.close()
        context.term()
        daemon.close()


def test_a_station_no_daemon_answers_names_an_older_daemon_among_the_causes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A daemon of an earlier release drops a newer station's hello without a word (it cannot be changed now):
    the station's log names that cause beside the others."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = StationWorker(f"tcp://127.0.0.1:{port}", name="unheard", outbox=tmp_path / "o.db", heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    caplog.set_level(logging.WARNING, logger="closedloop.worker")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while "no word from the daemon" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "no word from the daemon" in caplog.text
        assert "an earlier closedloop release, which drops this station's hello" in caplog.text, caplog.text
    finally:
        worker.stop()
        thread.join(timeout=10)
        router.close()
        context.term()


@pytest.mark.slow
def test_a_trial_past_its_timeout_is_cancelled_on_the_station_and_failed(store: Store, tmp_path: Path) -> None:
    campaign = _campaign("timeout", 1, latency=8.0, retries=0, timeout=1.0)
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    started = time.monotonic()
    with station(daemon.endpoint, "slow", tmp_path) as worker, serving(daemon) as thread:
        thread.join(timeout=20)
        elapsed = time.monotonic() - started
        # the daemon has finished (its only trial failed) once the station aborted the run and said so
        assert not thread.is_alive() and worker.RE is not None and worker.RE.state == "idle"
    trial = store.trials(daemon.runs[next(iter(daemon.runs))].id)[0]
    assert trial.status == "failed" and "timed out" in (trial.error or "")
    assert elapsed < 6, "the run was not cancelled: the daemon waited for the 8 s move"
    # the aborted run's documents are kept, though the campaign was done before the station's failure came
    (run_uid,) = trial.run_uids
    aborted = DocumentCollector.from_jsonl(store.documents(run_uid) or "")
    assert aborted.run_uids == [run_uid] and aborted.stop is not None
    # (its reason is empty: bluesky's RunEngine drops an abort's reason when the run was paused first)
    assert aborted.stop["exit_status"] == "abort"
    assert store.results(trial.campaign_id)[0].failed  # what the planner is told on a restart too


@pytest.mark.slow
def test_a_timed_out_trial_is_retried_on_the_same_station(store: Store, tmp_path: Path) -> None:
    # a lab with one station: each retry after a timeout goes back to the station that is still aborting
    # the previous attempt, and must run there (it was once taken for a repeat of the cancelled assignment)
    campaign = _campaign("retry", 1, latency=3.0, retries=2, timeout=0.5)
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    started = time.monotonic()
    with station(daemon.endpoint, "only", tmp_path), serving(daemon) as thread:
        thread.join(timeout=60)
        assert not thread.is_alive()
        elapsed = time.monotonic() - started
    trial = store.trials(daemon.runs[next(iter(daemon.runs))].id)[0]
    assert trial.status == "failed" and trial.attempts == 3
    # every attempt was cut off by the timeout, none failed by the previous attempt's late "cancelled"
    assert "timed out" in (trial.error or "")
    # the daemon waited for the last attempt's failure, so each attempt's run is on record
    assert len(set(trial.run_uids)) == 3, "an attempt did not run on the station"
    assert elapsed < 20, "an attempt waited for the 30 s allowed to a trial that never starts"


@pytest.mark.slow
def test_a_silent_station_is_lost_and_its_trial_retried_elsewhere(store: Store, tmp_path: Path) -> None:
    campaign = _campaign("lost", 1, latency=0.05, retries=1)
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    context = zmq.Context()
    silent = context.socket(zmq.DEALER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.setsockopt(zmq.ROUTING_ID, b"silent")
    silent.connect(daemon.endpoint)
    silent.send(protocol.encode(protocol.Hello(station="silent")))
    try:
        with serving(daemon) as thread:
            assert silent.poll(10_000)
            assert protocol.decode(silent.recv()).type == "welcome"
            assert silent.poll(10_000)
            assigned = protocol.decode(silent.recv())
            assert assigned.type == "assign"  # ...and the silent station never answers
            _wait(lambda: not daemon.stations, 5, "the silent station to be declared lost")
            with station(daemon.endpoint, "healthy", tmp_path):
                thread.join(timeout=30)
    finally:
        silent.close()
        context.term()
    trial = store.trials(store.campaign_row("lost").id)[0]
    assert trial.status == "completed" and trial.station == "healthy" and trial.attempts == 2


def test_a_late_result_of_a_lost_stations_run_is_kept_among_the_trials_runs(store: Store) -> None:
    """A station killed right after its result reached its outbox and restarted after it was declared lost
    delivers a result for a trial the daemon has given up on. The run took place at the instrument, but only the
    log and a documents file nothing pointed to knew of it: the trial's ``run_uids`` stayed empty (chaos test,
    three stations killed at random: trial 8 measured at st-b, run again at st-a, st-b's run nowhere in the store)."""
    # restarted after the grace its trial waits for a lost station (reconcile_s): within it, the result is the trial's
    daemon = Daemon(store, [_campaign("late", 2, latency=0.05, concurrency=1, retries=0)], heartbeat_s=0.2,
                    reconcile_s=0.5)
    documents = _run_documents("late-run")
    with raw_station(daemon.endpoint, "killed") as sock, serving(daemon):
        sock.send(protocol.encode(protocol.Hello(station="killed", instance="first")))
        _next_message(sock, "welcome")
        assigned = _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.Started(trial_id=assigned.trial_id, assignment=assigned.msg_id)))
        # ...measured, kept in the outbox, killed: silent until declared lost and its trial abandoned
        _wait(lambda: store.trial(assigned.trial_id).status == "abandoned", 10, "the trial to be abandoned")
        sock.send(protocol.encode(protocol.Hello(station="killed", instance="restarted",
                                                 outstanding=[assigned.trial_id])))
        _next_message(sock, "welcome")
        sock.send(protocol.encode(protocol.ResultMessage(
            trial_id=assigned.trial_id, assignment=assigned.msg_id, run_uid="late-run", values={"y": 1.5},
            duration_s=0.1, documents=documents)))
        assert _next_message(sock, "ack").trial_id == assigned.trial_id
    trial = store.trial(assigned.trial_id)
    assert trial.status == "abandoned" and trial.run_uids == ["late-run"]
    assert trial.late_results == {"late-run": {"y": 1.5}}  # acknowledged, so kept; and not taken for a failed run
    assert store.documents("late-run") == documents
    assert not store.observations(trial.campaign_id)


def test_a_freed_station_gets_its_next_assign_first_and_the_ack_once_the_documents_are_on_disk(store: Store) -> None:
    """The documents of a run were written and synced before the station got its next experiment, which waited for
    the disk: now the assign goes first, and the result is acknowledged only once its documents are kept."""
    daemon = Daemon(store, [_campaign("order", 2, latency=0.0, concurrency=1)], heartbeat_s=0.5)
    documents = _run_documents("first-run")
    with raw_station(daemon.endpoint, "st") as sock, serving(daemon):
        sock.send(protocol.encode(protocol.Hello(station="st", instance="p1")))
        _next_message(sock, "welcome")
        first = _next_message(sock, "assign")
        # the planner thinks in its own thread, here while the run goes on: its next proposal is ready before the
        # result, as behind any run longer than a suggestion (under load the result had come first, then the ack)
        _wait(lambda: all(run.service is not None and run.service.buffered() for run in daemon.runs.values()), 10,
              "the planner's next proposal")
        sock.send(protocol.encode(protocol.ResultMessage(trial_id=first.trial_id, assignment=first.msg_id,
                                                         run_uid="first-run", values={"y": 1.0}, duration_s=0.01,
                                                         documents=documents)))
        said = []
        while len(said) < 2:
            assert sock.poll(10_000), f"only {said} after the result"
            message = protocol.decode(sock.recv())
            if message.type in ("assign", "ack"):
                said.append(message)
                if message.type == "ack":
                    assert store.documents("first-run") == documents  # on disk before the station may forget it
        assert [m.type for m in said] == ["assign", "ack"]
        assert said[0].trial_id != first.trial_id and said[1].trial_id == first.trial_id
        sock.send(protocol.encode(protocol.ResultMessage(trial_id=said[0].trial_id, assignment=said[0].msg_id,
                                                         run_uid="second-run", values={"y": 2.0}, duration_s=0.01)))
        _next_message(sock, "ack")
    assert [t.status for t in store.trials(store.campaign_row("order").id)] == ["completed"] * 2


def test_a_lost_station_back_within_the_grace_delivers_its_result_as_the_trials_own(store: Store) -> None:
    """``retries: 0``: a station declared lost right after its result reached its outbox had its trial abandoned at
    once, and the result it delivered a moment later was kept only as a late result. Back within ``reconcile_s``,
    the result is the trial's; back without the trial (its run lost with the process), the retry policy decides."""
    daemon = Daemon(store, [_campaign("grace", 2, latency=0.05, concurrency=1, retries=0)], heartbeat_s=0.2,
                    reconcile_s=5.0)
    with raw_station(daemon.endpoint, "frozen") as sock, serving(daemon):
        sock.send(protocol.encode(protocol.Hello(station="frozen", instance="first")))
        _next_message(sock, "welcome")
        kept = _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.Started(trial_id=kept.trial_id, assignment=kept.msg_id)))
        # ...measured, kept in the outbox, frozen: silent until declared lost
        _wait(lambda: not daemon.stations, 10, "the station to be declared lost")
        assert store.trial(kept.trial_id).status == "dispatched"  # waiting for it, not abandoned
        sock.send(protocol.encode(protocol.Hello(station="frozen", instance="first", welcomed=1,
                                                 outstanding=[kept.trial_id])))
        _next_message(sock, "welcome")
        sock.send(protocol.encode(protocol.ResultMessage(
            trial_id=kept.trial_id, assignment=kept.msg_id, run_uid="kept-run", values={"y": 1.5}, duration_s=0.1)))
        assert _next_message(sock, "ack").trial_id == kept.trial_id
        gone = _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.Started(trial_id=gone.trial_id, assignment=gone.msg_id)))
        _wait(lambda: not daemon.stations, 10, "the station to be declared lost again")
        # killed mid-run and restarted: its outbox holds nothing of the trial
        sock.send(protocol.encode(protocol.Hello(station="frozen", instance="restarted")))
        _next_message(sock, "welcome")
        _wait(lambda: store.trial(gone.trial_id).status == "abandoned", 5, "the trial to be abandoned")
    first = store.trial(kept.trial_id)
    assert first.status == "completed" and first.late_results == {} and first.run_uids == ["kept-run"]
    assert store.observations(first.campaign_id)[first.id].values == {"y": 1.5}
    assert store.trial(gone.trial_id).error == "station frozen lost"


def test_a_station_restarted_mid_run_before_it_is_declared_lost_has_its_trial_follow_the_retry_policy(
        store: Store) -> None:
    """``kill -9`` of a station mid-run, restarted at once (systemd's ``Restart=always``): its hello, within five
    heartbeats, lists nothing. The trial was taken for an assign that never arrived and queued again whatever
    ``execution.retries`` said: with ``retries: 0`` a probe's trial ran 4 times (``attempts`` 4), and an experiment
    that kills its station would run at each restart for good. The run was lost with the process: an attempt."""
    daemon = Daemon(store, [_campaign("restarted", 2, latency=0.05, concurrency=1, retries=0)], heartbeat_s=0.5,
                    reconcile_s=5.0, drain_s=0.5)
    with raw_station(daemon.endpoint, "crashing") as sock, serving(daemon):
        sock.send(protocol.encode(protocol.Hello(station="crashing", instance="first")))
        _next_message(sock, "welcome")
        lost = _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.Started(trial_id=lost.trial_id, assignment=lost.msg_id)))
        _wait(lambda: lost.trial_id in daemon.in_flight and daemon.in_flight[lost.trial_id].started, 5,
              "the daemon to hear the run started")
        # killed mid-run, and a new process under the same name at once: its outbox holds nothing of the trial
        sock.send(protocol.encode(protocol.Hello(station="crashing", instance="restarted")))
        _next_message(sock, "welcome")
        _wait(lambda: store.trial(lost.trial_id).status == "abandoned", 5, "the trial to be abandoned")
        nxt = _next_message(sock, "assign")
        assert nxt.trial_id != lost.trial_id, "the abandoned trial was sent to run again"
        # the same process saying it no longer holds its started run cut it short itself (a second Ctrl-C): that
        # trial goes back to the queue as never run, whatever the retries
        sock.send(protocol.encode(protocol.Started(trial_id=nxt.trial_id, assignment=nxt.msg_id)))
        _wait(lambda: nxt.trial_id in daemon.in_flight and daemon.in_flight[nxt.trial_id].started, 5,
              "the daemon to hear the second run started")
        sock.send(protocol.encode(protocol.Hello(station="crashing", instance="restarted", welcomed=1)))
        _next_message(sock, "welcome")
        again = _next_message(sock, "assign")
        assert again.trial_id == nxt.trial_id and store.trial(nxt.trial_id).status == "dispatched"
    trial = store.trial(lost.trial_id)
    assert trial.attempts == 1 and "restarted while running it" in (trial.error or "")


def test_a_result_kept_in_an_outbox_over_a_daemon_restart_for_a_trial_run_again_elsewhere_is_acknowledged(
        store: Store) -> None:
    """A station measured trial 1 and was stopped while the daemon was down; the restarted daemon gave up waiting
    for it (reconcile_s) and had the trial run again on another station. The first station, back later, offers the
    result from its outbox: the restarted daemon, which never gave it the trial, dropped it unacknowledged, so it
    stayed in that outbox for good, sent again and dropped at each registration (chaos probe: 2 results, 8 drops
    in 90 s, still there when the campaign ended). It is acknowledged, and no stored row changes."""
    campaign = _campaign("rerun", 2, latency=0.05, concurrency=1)
    cid = store.open_campaign(campaign)
    trial = store.add_trials(cid, [({"x1": 1.0, "x2": 2.0}, {})])[0]
    store.mark_dispatched(trial.id, "second")  # the retry, on the other station, under the restarted daemon
    assert store.record_result(trial.id, "second-run", {"y": 3.0})  # type: ignore[arg-type]
    daemon = Daemon(store, [campaign], heartbeat_s=0.5)
    with raw_station(daemon.endpoint, "first") as sock, serving(daemon):
        sock.send(protocol.encode(protocol.Hello(station="first", instance="back", instruments=["nothing:Here"],
                                                 outstanding=[trial.id])))
        _next_message(sock, "welcome")
        sock.send(protocol.encode(protocol.ResultMessage(trial_id=trial.id, assignment="before-the-restart",
                                                         run_uid="first-run", values={"y": 9.0}, duration_s=0.1)))
        ack = _next_message(sock, "ack", limit_s=5)
        assert ack.trial_id == trial.id and ack.assignment == "before-the-restart"
    kept = store.trial(trial.id)
    assert kept.status == "completed" and kept.station == "second" and kept.run_uids == ["second-run"]
    assert kept.late_results == {} and store.observations(cid)[trial.id].values == {"y": 3.0}


def test_a_result_for_a_trial_never_given_to_its_station_changes_nothing_however_its_hello_lists_it(
        store: Store) -> None:
    """A hello may list any trial. A station that listed one held by another station had its forged result stored
    as the trial's (and the holder's run cancelled), and documents nested beyond the JSON parser's depth ended the
    daemon: both are dropped, and the holder's own result is the trial's."""
    daemon = Daemon(store, [_campaign("owned", 1, latency=0.05, concurrency=1)], heartbeat_s=0.5)
    with raw_station(daemon.endpoint, "holder") as holder, raw_station(daemon.endpoint, "forger") as forger, \
            serving(daemon) as thread:
        holder.send(protocol.encode(protocol.Hello(station="holder", instance="h")))
        _next_message(holder, "welcome")
        assigned = _next_message(holder, "assign")
        forger.send(protocol.encode(protocol.Hello(station="forger", instance="f", instruments=["nothing:Here"],
                                                   outstanding=[assigned.trial_id])))
        _next_message(forger, "welcome")
        for forged in (protocol.ResultMessage(trial_id=assigned.trial_id, run_uid="forged-run", values={"y": -999.0}),
                       protocol.ResultMessage(trial_id=assigned.trial_id, assignment=assigned.msg_id,
                                              run_uid="forged-too", values={"y": -999.0}),
                       protocol.Failure(trial_id=assigned.trial_id, error="forged", run_uid="deep",
                                        documents="[" * 50_000)):
            forger.send(protocol.encode(forged))
        before = store.trial(assigned.trial_id)
        assert before.status == "dispatched" and before.run_uids == [] and before.station == "holder"
        time.sleep(0.5)
        assert thread.is_alive() and store.trial(assigned.trial_id) == before
        holder.send(protocol.encode(protocol.ResultMessage(
            trial_id=assigned.trial_id, assignment=assigned.msg_id, run_uid="real-run", values={"y": 1.5},
            documents="[" * 50_000)))
        assert _next_message(holder, "ack").trial_id == assigned.trial_id
        thread.join(timeout=10)
        assert not thread.is_alive()
    trial = store.trial(assigned.trial_id)
    assert trial.status == "completed" and trial.run_uids == ["real-run"] and trial.late_results == {}
    assert store.observations(trial.campaign_id)[trial.id].values == {"y": 1.5}
    assert store.documents("real-run") is None and store.documents("deep") is None
    assert daemon.stats["dropped"] >= 2  # the two results; the failure is ignored as one not in flight there


def test_a_second_answer_to_one_assignment_leaves_the_finished_trial_as_it_was(store: Store) -> None:
    """A station that reported its trial again under another run uid was acknowledged, and each such result was
    added to the finished trial's runs and late results: only an assignment not yet answered is another run."""
    daemon = Daemon(store, [_campaign("twice", 2, latency=0.05, concurrency=1)], heartbeat_s=0.5, drain_s=0.5)
    with raw_station(daemon.endpoint, "st") as sock, serving(daemon):
        sock.send(protocol.encode(protocol.Hello(station="st", instance="s")))
        _next_message(sock, "welcome")
        assigned = _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.ResultMessage(
            trial_id=assigned.trial_id, assignment=assigned.msg_id, run_uid="first", values={"y": 1.5})))
        assert _next_message(sock, "ack").trial_id == assigned.trial_id
        # registered again saying it holds the trial's answer, as a station does for what its outbox keeps
        sock.send(protocol.encode(protocol.Hello(station="st", instance="s", welcomed=1,
                                                 outstanding=[assigned.trial_id])))
        _next_message(sock, "welcome")
        sock.send(protocol.encode(protocol.ResultMessage(
            trial_id=assigned.trial_id, assignment=assigned.msg_id, run_uid="second", values={"y": 777.0})))
        assert _next_message(sock, "ack").trial_id == assigned.trial_id  # the station may forget it
        sock.send(protocol.encode(protocol.Failure(trial_id=assigned.trial_id, assignment=assigned.msg_id,
                                                   error="and a failure", run_uid="third")))
        assert _next_message(sock, "ack").trial_id == assigned.trial_id
    trial = store.trial(assigned.trial_id)
    assert trial.status == "completed" and trial.run_uids == ["first"] and trial.late_results == {}
    assert store.observations(trial.campaign_id)[trial.id].values == {"y": 1.5}


def test_a_repeated_hello_keeps_the_session_and_nothing_is_dispatched_twice(store: Store) -> None:
    """A station repeats its hello until welcomed; a daemon slow to answer (just restarted) reads both.

    CI caught the race: the second hello opened a new session, re-queued the trials dispatched in the
    first (the hello could not list them) and sent them again, while the station, welcomed into the first
    session, was already running them: trial 55 of the crash test was measured twice.
    """
    daemon = Daemon(store, [_campaign("repeat", 4, latency=0.05)], heartbeat_s=5.0, drain_s=0.5)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"repeater")
    sock.connect(daemon.endpoint)
    hello = protocol.Hello(station="repeater", instance="process-1", welcomed=0)
    received: list[protocol.Message] = []

    def read(until: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not until():
            assert time.monotonic() < deadline, f"{what}; received {[m.type for m in received]}"
            if sock.poll(100):
                received.append(protocol.decode(sock.recv()))

    try:
        sock.send(protocol.encode(hello))
        sock.send(protocol.encode(hello))  # the repeat, sent before the first welcome arrived
        with serving(daemon):
            read(lambda: sum(m.type == "welcome" for m in received) == 2 and
                 sum(m.type == "assign" for m in received) >= 2, "two welcomes and the first assignments")
            time.sleep(0.5)  # anything a new session would have re-sent arrives by now
            read(lambda: not sock.poll(0), "the rest")
            welcomes = [m for m in received if m.type == "welcome"]
            assigned = [m.trial_id for m in received if m.type == "assign"]
            assert welcomes[0].session == welcomes[1].session
            assert len(assigned) == len(set(assigned)) and {m.session for m in received if m.type == "assign"} == {
                welcomes[0].session}
            # a hello sent after a welcome is a new registration, even from the same process
            sock.send(protocol.encode(hello.model_copy(update={"welcomed": 2, "msg_id": "again"})))
            read(lambda: sum(m.type == "welcome" for m in received) == 3, "the new registration's welcome")
            assert [m for m in received if m.type == "welcome"][2].session > welcomes[0].session
    finally:
        sock.close()
        context.term()


@pytest.mark.slow
def test_pause_resume_cancel_status_and_the_event_stream(store: Store, tmp_path: Path) -> None:
    campaign = _campaign("ctl", 6, latency=0.4, retries=0)
    control, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    seen: list[str] = []
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, control=control, publish=publish,
                    on_event=lambda kind, details: seen.append(kind))
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"campaign.ctl.")
    sub.connect(publish)
    try:
        with station(daemon.endpoint, "s1", tmp_path) as worker, serving(daemon) as thread:
            _wait(lambda: "trial_dispatched" in seen, 20, "a first dispatch")
            assert control_request(control, "pause", {"campaign": "ctl"})["success"]
            # the trial in flight holds at its next checkpoint, or had ended and the next one waits queued
            # (under load the first trial can end before the pause arrives: then the RunEngine stays idle)
            _wait(lambda: worker.paused and worker.RE is not None and worker.RE.state != "running", 5,
                  "the station to pause")
            dispatched, completed = seen.count("trial_dispatched"), seen.count("trial_completed")
            time.sleep(1.0)
            assert seen.count("trial_dispatched") == dispatched, "a paused campaign dispatched"
            assert seen.count("trial_completed") == completed, "a paused campaign measured"
            status = control_request(control, "status")
            assert status["campaigns"][0]["paused"] and status["stations"][0]["name"] == "s1"
            assert control_request(control, "health")["healthy"]
            assert not control_request(control, "pause", {"campaign": "nope"})["success"]
            assert control_request(control, "resume")["success"]
            _wait(lambda: daemon.in_flight, 5, "dispatch after resume")
            index = next(iter(daemon.in_flight.values())).index
            reply = control_request(control, "cancel", {"trial": index, "by": "tester"})
            assert reply["success"], reply
            thread.join(timeout=60)
        events = []
        while sub.poll(100):
            topic, body = sub.recv_multipart()
            events.append((topic.decode(), json.loads(body)))
    finally:
        sub.close()
        context.term()
    trials = {t.index: t for t in store.trials(store.campaign_row("ctl").id)}
    assert trials[index].status == "failed" and trials[index].error == "cancelled by tester"
    assert sum(t.status == "completed" for t in trials.values()) == 5
    kinds = [body["kind"] for _, body in events]
    assert {"trial_dispatched", "trial_completed", "campaign_paused", "campaign_resumed", "model_updated"} <= set(kinds)
    assert all(topic == f"campaign.ctl.{body['kind']}" and body["campaign"] == "ctl" for topic, body in events)
    seqs = [body["seq"] for _, body in events]
    assert seqs == sorted(seqs)


@pytest.mark.slow
def test_pause_holds_the_runengine_mid_run_and_resume_finishes_the_same_run(store: Store, tmp_path: Path) -> None:
    campaign = _campaign("held", 3, latency=1.0, retries=0)
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, control=control, prefetch=0)
    with station(daemon.endpoint, "s1", tmp_path) as worker, serving(daemon) as thread:
        _wait(lambda: worker.RE is not None and worker.RE.state == "running", 20, "a run moving its axes")
        assert control_request(control, "pause")["success"]
        _wait(lambda: worker.RE.state == "paused", 5, "the RunEngine to pause at its checkpoint")
        campaign_id = store.campaign_row("held").id
        time.sleep(1.5)
        assert store.counts(campaign_id).get("completed", 0) == 0, "a paused RunEngine measured"
        assert control_request(control, "resume")["success"]
        thread.join(timeout=60)
    trials = store.trials(campaign_id)
    observations = store.observations(campaign_id)
    assert [t.status for t in trials] == ["completed"] * 3
    # the paused trial is one run that ended well, not an aborted run and a second one
    documents = DocumentCollector.from_jsonl(store.documents(observations[trials[0].id].run_uid) or "")
    assert documents.run_uids == [observations[trials[0].id].run_uid]
    assert documents.stop is not None and documents.stop["exit_status"] == "success"


def test_a_malformed_control_request_gets_an_error_and_the_daemon_keeps_serving(store: Store, tmp_path: Path) -> None:
    campaign = _campaign("asked", 2, latency=0.05)
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, control=control)
    with serving(daemon) as thread:
        request = zmq.Context.instance().socket(zmq.REQ)
        request.setsockopt(zmq.LINGER, 0)
        request.connect(control)
        try:
            # 40 kB of nested JSON arrays: json.loads raised RecursionError, which ended the daemon's loop
            request.send(b"[" * 20_000 + b"]" * 20_000)
            assert request.poll(5000), "no reply"
            assert request.recv_json()["success"] is False
        finally:
            request.close()
        assert thread.is_alive()
        # a `by` too long for the station's control message was checked after the pause had been made: refused
        # but paused, and the resume after it reached no station
        for method in ("pause", "cancel"):
            reply = control_request(control, method, {"campaign": "asked", "by": "x" * 5000, "trial": 1})
            assert reply["success"] is False and reply["bad_input"] and "params.by" in reply["msg"]
        assert store.campaign_row("asked").status == "running" and not daemon.runs[1].paused
        assert control_request(control, "status")["success"]
        with station(daemon.endpoint, "s1", tmp_path):
            thread.join(timeout=30)
    assert store.counts(store.campaign_row("asked").id) == {"completed": 2}


def test_a_trial_its_station_still_runs_after_a_restart_keeps_the_campaigns_timeout(store: Store) -> None:
    campaign = _campaign("untimed", 3, retries=0)  # no execution.timeout: an experiment may take days
    # what a killed daemon left: a trial dispatched to station "st", which is still running it
    trial = store.add_dispatched(store.open_campaign(campaign), {"x1": 1.0, "x2": 2.0}, {}, "st")
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, reconcile_s=3.0, prefetch=0, drain_s=0.5)
    sent: list[str] = []
    with serving(daemon), raw_station(daemon.endpoint, "st") as sock:
        sock.send(protocol.encode(protocol.Hello(station="st", outstanding=[trial.id], instance="i1")))
        end = time.monotonic() + 4.5  # past the 3 s grace the station had to come back
        while time.monotonic() < end:
            while sock.poll(100):
                sent.append(protocol.decode(sock.recv()).type)
            sock.send(protocol.encode(protocol.Heartbeat(running=[trial.id], holds=[trial.id])))
        # the grace was kept as the trial's deadline: the running experiment was cancelled as timed out
        assert "cancel" not in sent and "welcome" in sent
        assert store.trial(trial.id).status == "dispatched"


def test_a_trial_left_in_flight_by_a_killed_daemon_waits_for_its_own_station_not_any_that_lists_it(
        store: Store) -> None:
    """After a restart, any station whose hello listed a trial waiting to be reconciled took it over, and its
    result was stored as the trial's."""
    campaign = _campaign("left", 3, retries=0)
    trial = store.add_dispatched(store.open_campaign(campaign), {"x1": 1.0, "x2": 2.0}, {}, "st")
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, reconcile_s=30.0, prefetch=0, drain_s=0.5)
    with serving(daemon), raw_station(daemon.endpoint, "forger") as forger, raw_station(daemon.endpoint, "st") as st:
        forger.send(protocol.encode(protocol.Hello(station="forger", instruments=["nothing:Here"],
                                                   outstanding=[trial.id], instance="f")))
        _next_message(forger, "welcome")
        forger.send(protocol.encode(protocol.ResultMessage(trial_id=trial.id, run_uid="forged", values={"y": -1.0})))
        time.sleep(0.5)
        assert daemon.in_flight[trial.id].station == "st" and store.trial(trial.id).status == "dispatched"
        st.send(protocol.encode(protocol.Hello(station="st", outstanding=[trial.id], instance="s")))
        _next_message(st, "welcome")
        st.send(protocol.encode(protocol.ResultMessage(trial_id=trial.id, run_uid="real", values={"y": 2.0})))
        assert _next_message(st, "ack").trial_id == trial.id
    row = store.trial(trial.id)
    assert row.status == "completed" and row.run_uids == ["real"] and row.station == "st"


def test_a_hello_naming_another_station_is_refused_and_its_trial_stays_put(store: Store, tmp_path: Path) -> None:
    daemon = Daemon(store, [_campaign("named", 2, latency=1.0, retries=2, concurrency=1)], heartbeat_s=0.2)
    with station(daemon.endpoint, "A", tmp_path) as worker, serving(daemon) as thread, \
            raw_station(daemon.endpoint, "X") as impostor:
        _wait(lambda: worker.RE is not None and worker.RE.state == "running", 20, "station A measuring")
        # a connection that is not A claims A's name, holding nothing: A's running trial was re-queued and
        # assigned to it, while A went on measuring it
        impostor.send(protocol.encode(protocol.Hello(station="A", outstanding=[])))
        assert _next_message(impostor, "refused")
        thread.join(timeout=60)
    trials = store.trials(store.campaign_row("named").id)
    assert [(t.status, t.station, t.attempts) for t in trials] == [("completed", "A", 1)] * 2


def test_two_campaigns_in_one_daemon_each_with_its_own_station(store: Store, tmp_path: Path) -> None:
    daemon = Daemon(store, [_campaign("left", 4, latency=0.05), _campaign("right", 4, latency=0.05)], heartbeat_s=0.2)
    with station(daemon.endpoint, "for-left", tmp_path, campaigns=["left"]), \
            station(daemon.endpoint, "for-right", tmp_path, campaigns=["right"]), serving(daemon) as thread:
        thread.join(timeout=60)
    for name in ("left", "right"):
        trials = store.trials(store.campaign_row(name).id)
        assert len(trials) == 4 and {t.status for t in trials} == {"completed"}
        assert {t.station for t in trials} == {f"for-{name}"}


def test_a_campaign_that_finishes_while_another_runs_is_completed_at_once(store: Store, tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [_campaign("quick", 2, latency=0.05), _campaign("waiting", 2, latency=0.05)],
                    heartbeat_s=0.2, control=control, on_event=lambda kind, details: events.append((kind, details)))
    # only "quick" has a station: "waiting" keeps the daemon serving
    with station(daemon.endpoint, "for-quick", tmp_path, campaigns=["quick"]), serving(daemon) as thread:
        _wait(lambda: store.campaign_row("quick").status == "completed", 20, "quick marked completed")
        # the event follows the store's row from the daemon's thread: CI once read the list between the two
        _wait(lambda: any(k == "campaign_finished" for k, _ in events), 5, "quick announced finished")
        assert thread.is_alive() and store.campaign_row("waiting").status == "running"
        assert [d["campaign"] for k, d in events if k == "campaign_finished"] == ["quick"]
        # a pause of every campaign leaves the finished one completed
        assert control_request(control, "pause")["success"]
        assert store.campaign_row("quick").status == "completed"
        assert store.campaign_row("waiting").status == "paused"
    assert [d["campaign"] for k, d in events if k == "campaign_finished"] == ["quick"]  # announced once


def test_a_campaign_no_connected_station_serves_is_named_by_health_status_and_log_once(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from closedloop.view import daemon_lines

    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [_campaign("served", 40, latency=0.05), _campaign("orphan", 2, latency=0.05)],
                    heartbeat_s=0.2, control=control)
    with caplog.at_level(logging.INFO, logger="closedloop.daemon"), \
            station(daemon.endpoint, "for-served", tmp_path, campaigns=["served"]), serving(daemon):
        _wait(lambda: store.counts(store.campaign_row("served").id).get("completed", 0) >= 3, 20,
              "a few experiments of the served campaign")
        assert control_request(control, "health")["unserved_campaigns"] == ["orphan"]
        status = {c["name"]: c for c in control_request(control, "status")["campaigns"]}
        assert status["orphan"]["stations"] == [] and status["served"]["stations"] == ["for-served"]
        lines = daemon_lines(control, ["served", "orphan"], timeout_s=3)
        assert [line for line in lines if "no connected station serves it" in line] == [
            next(line for line in lines if line.startswith("  orphan:"))]
    warnings = [r.getMessage() for r in caplog.records if "no connected station serves it" in r.getMessage()]
    assert len(warnings) == 1 and "campaign=orphan" in warnings[0], warnings


def test_every_attempt_of_a_trial_keeps_its_run_uid_the_failed_one_first(store: Store, tmp_path: Path) -> None:
    from closedloop import provenance
    from simulators.surfaces import branin_campaign

    # the simulated device's first measurement fails (seed 8 draws 0.33 < 0.5), its second succeeds (0.99)
    campaign = Campaign.from_yaml_text(branin_campaign("again", 1, execution={"retries": 1},
                                                       options={"failure_rate": 0.5, "seed": 8}))
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    with station(daemon.endpoint, "s1", tmp_path), serving(daemon) as thread:
        thread.join(timeout=30)
    (trial,) = store.trials(store.campaign_row("again").id)
    observation = store.observations(trial.campaign_id)[trial.id]
    assert trial.status == "completed" and trial.attempts == 2
    failed, completed = trial.run_uids
    assert completed == observation.run_uid and failed != completed
    # the failed run's documents are kept too: it opened, and the RunEngine closed it as failed
    assert store.documents(completed) is not None
    failed_run = DocumentCollector.from_jsonl(store.documents(failed) or "")
    assert failed_run.run_uids == [failed] and failed_run.stop is not None
    assert failed_run.stop["exit_status"] == "fail"
    lines = provenance.explain_lines(provenance.explain(store, "again", trial.index))
    assert f"run uids: {failed} (failed), {completed}" in "\n".join(lines)


def test_a_failed_trial_keeps_the_run_uid_of_its_attempt(store: Store, tmp_path: Path) -> None:
    from simulators.surfaces import branin_campaign

    campaign = Campaign.from_yaml_text(branin_campaign("lost-sample", 1, execution={"retries": 0},
                                                       options={"failure_rate": 1.0}))
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    with station(daemon.endpoint, "s1", tmp_path), serving(daemon) as thread:
        thread.join(timeout=30)
    (trial,) = store.trials(store.campaign_row("lost-sample").id)
    assert trial.status == "failed" and trial.error
    assert len(trial.run_uids) == 1 and store.observations(trial.campaign_id) == {}
    assert DocumentCollector.from_jsonl(store.documents(trial.run_uids[0]) or "").run_uids == trial.run_uids


def test_a_runs_documents_are_written_once_and_only_under_the_run_they_open(store: Store) -> None:
    from closedloop.errors import StoreError

    record = '{"name":"start","doc":{"uid":"run-a","time":1.0}}\n{"name":"stop","doc":{"run_start":"run-a"}}\n'
    store.save_documents("run-a", record)
    # a resent or forged copy does not replace the record
    store.save_documents("run-a", '{"name":"start","doc":{"uid":"run-a","time":2.0}}\n')
    assert store.documents("run-a") == record
    for foreign in ['{"name":"start","doc":{"uid":"run-b"}}\n', "not json\n", '{"name":"stop","doc":{}}\n']:
        with pytest.raises(StoreError):
            store.save_documents("run-c", foreign)
    assert store.documents("run-c") is None


def test_a_result_whose_documents_cannot_be_written_is_not_acknowledged(store: Store, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A full disk: the daemon logged "documents of run ... not kept: [Errno 28] No space left on device", stored
    and acknowledged the result, and the station deleted the run's only other copy of its documents."""
    store.documents_dir.write_text("")  # not a folder: every write of documents fails, as on a full disk
    daemon = Daemon(store, [_campaign("nodocs", 1, latency=0.0)], heartbeat_s=0.2)
    try:
        with station(daemon.endpoint, "s", tmp_path) as worker:
            thread, failed = started_catching(daemon.serve)
            thread.join(timeout=15)
            assert not thread.is_alive()
            assert failed and isinstance(failed[0], StoreUnwritable), "the daemon went on without keeping the documents"
            trial = store.trials(store.campaign_row("nodocs").id)[0]
            # stored, not acknowledged: the station keeps it, and sends it again with its documents after a restart
            assert trial.status == "completed"
            assert [t for t, _ in worker.outbox.pending()] == [trial.id]
    finally:
        daemon.close()
    assert any(r.levelno == logging.CRITICAL and "the daemon stops: StoreUnwritable: cannot keep the documents of run"
               in r.getMessage() and str(store.documents_dir) in r.getMessage() for r in caplog.records)


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "closedloop.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env())
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


@pytest.mark.slow
def test_sigterm_stops_dispatch_waits_for_results_in_flight_and_a_restart_finishes(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(campaign_yaml("term", 10, latency=0.6))
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    workers = [start_worker(tmp_path, endpoint, f"t{i}") for i in (1, 2)]
    try:
        deadline = time.monotonic() + 60
        while completed(tmp_path / "s.db") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        gone = subprocess.run([sys.executable, "-m", "closedloop.cli", "health", "--control", control, "--timeout", "1"],
                              capture_output=True, text=True, timeout=60, env=env())
        assert gone.returncode == 1 and '"healthy": false' in gone.stdout
        store = Store(tmp_path / "s.db")
        trials = store.trials(store.campaign_row("term").id)
        assert "dispatched" not in {t.status for t in trials}, "SIGTERM left results in flight"
        assert len(trials) < 10
        assert 'state="completed"' in (tmp_path / "daemon.log").read_text()
        for worker in workers:  # idle (nothing dispatched, above); stations come back after the operator's commands
            kill9(worker)
        daemon = start_daemon(tmp_path, endpoint, control)
        # the operator's commands, against the restarted daemon, once it answers: under load its start took more
        # than the commands' 5 s, and with its stations back it could finish the campaign before them
        wait_for(lambda: health(control, timeout_s=1)["healthy"], 90, "the restarted daemon to answer")
        assert "paused term" in _cli("pause", "term", "--control", control)
        assert '"healthy": true' in _cli("health", "--control", control)
        assert "resumed term" in _cli("resume", "--control", control)
        workers = [start_worker(tmp_path, endpoint, f"t{i}") for i in (1, 2)]
        assert daemon.wait(timeout=90) == 0
    finally:
        for proc in [daemon, *workers]:
            kill9(proc)
    trials = Store(tmp_path / "s.db").trials(1)
    assert len(trials) == 10 and {t.status for t in trials} == {"completed"}


def test_an_assign_that_never_reached_its_station_goes_back_to_the_queue(store: Store) -> None:
    """A campaign with no timeout must not wait forever on an assign lost on the way (in a reconnect): the
    station's heartbeat lists what it holds after reading one of the daemon's heartbeats, and a trial
    assigned before that heartbeat and not listed is dispatched again. One assigned after it is not."""
    daemon = Daemon(store, [_campaign("lost-assign", 1, latency=0.05, concurrency=1, retries=0)], heartbeat_s=5.0)
    with raw_station(daemon.endpoint, "robot") as sock:
        sock.send(protocol.encode(protocol.Hello(station="robot", instance="p1")))
        with serving(daemon) as thread:
            _next_message(sock, "welcome")
            first = _next_message(sock, "assign")
            sock.send(protocol.encode(protocol.Heartbeat(holds=[])))  # names no heartbeat it read: proves nothing
            mark = _next_message(sock, "heartbeat")  # the daemon's, sent after `first`
            assert store.trial(first.trial_id).status == "dispatched"
            # listed after reading `mark`, and `first` is not there: it never arrived
            sock.send(protocol.encode(protocol.Heartbeat(holds=[], seen=mark.msg_id)))
            again = _next_message(sock, "assign")
            assert again.trial_id == first.trial_id and again.msg_id != first.msg_id
            # `again` left after `mark`: the same listing says nothing about it
            sock.send(protocol.encode(protocol.Heartbeat(holds=[], seen=mark.msg_id)))
            _next_message(sock, "heartbeat")
            assert not sock.poll(300), "assigned a third time"
            assert store.trial(first.trial_id).status == "dispatched"
            sock.send(protocol.encode(protocol.ResultMessage(trial_id=first.trial_id, assignment=again.msg_id,
                                                             run_uid="run-1", values={"y": 1.5})))
            _next_message(sock, "ack")
            thread.join(timeout=20)
        assert not thread.is_alive()
        row = store.trial(first.trial_id)
        # the lost assign is no attempt: nothing ran (it had counted, and used up a retry)
        assert (row.status, row.attempts, row.error) == ("completed", 1, None)


def test_an_experiment_far_longer_than_any_completed_one_is_said_once(store: Store,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A campaign without a timeout waits on a hung device forever: after three experiments of 0.2 s, the fourth,
    silent for over 5 s (five times the longest, at least a second), is logged and published once as running
    long; it still completes when its result comes."""
    events: list[tuple[str, dict]] = []
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [_campaign("hang", 4, latency=0.05, concurrency=1)], heartbeat_s=0.5, control=control,
                    on_event=lambda kind, details: events.append((kind, details)))
    with raw_station(daemon.endpoint, "robot") as sock, caplog.at_level(logging.WARNING, "closedloop.daemon"):
        sock.send(protocol.encode(protocol.Hello(station="robot", instance="p1")))
        with serving(daemon) as thread:
            _next_message(sock, "welcome")
            for n in range(4):
                assign = _next_message(sock, "assign")
                if n == 3:
                    waited = time.monotonic()
                    while not any(k == "trial_running_long" for k, _ in events) and time.monotonic() - waited < 20:
                        sock.send(protocol.encode(protocol.Heartbeat(holds=[assign.trial_id])))  # alive, still busy
                        time.sleep(0.3)
                    assert time.monotonic() - waited >= 5.0 - 0.5, "said before five times the longest (1 s floor)"
                    assert control_request(control, "health")["running_long"] == {"hang #4": "robot"}
                    for _ in range(4):  # said once, not on every look
                        sock.send(protocol.encode(protocol.Heartbeat(holds=[assign.trial_id])))
                        time.sleep(0.3)
                sock.send(protocol.encode(protocol.ResultMessage(trial_id=assign.trial_id, assignment=assign.msg_id,
                                                                 run_uid=f"run-{n}", values={"y": 1.0 + n},
                                                                 duration_s=0.2)))
                _next_message(sock, "ack")
            thread.join(timeout=20)
        assert not thread.is_alive()
    said = [d for k, d in events if k == "trial_running_long"]
    assert len(said) == 1 and said[0]["trial"] == 4 and said[0]["station"] == "robot"
    assert said[0]["longest_s"] == pytest.approx(0.2) and said[0]["elapsed_s"] > 5.0
    assert sum("running for" in r.getMessage() and "no timeout" in r.getMessage() for r in caplog.records) == 1
    assert [t.status for t in store.trials(store.campaign_row("hang").id)] == ["completed"] * 4


def test_a_station_that_cannot_reach_its_instrument_gets_the_trial_back_after_a_rest(store: Store) -> None:
    """A failure marked ``unavailable`` (nothing ran) is neither an attempt nor a failure: with no retries allowed
    the trial still runs, first on the same station after 2 s, then 4 s; ``status`` says why it waits."""
    from closedloop.view import daemon_lines

    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [_campaign("reach", 1, latency=0.05, concurrency=1, retries=0)], heartbeat_s=5.0,
                    control=control)
    with raw_station(daemon.endpoint, "robot") as sock:
        sock.send(protocol.encode(protocol.Hello(station="robot", instance="p1")))
        with serving(daemon) as thread:
            _next_message(sock, "welcome")
            assigned = [_next_message(sock, "assign")]
            trial_id = assigned[0].trial_id
            refused_at = []
            for rest in (2.0, 4.0):
                refused_at.append(time.monotonic())
                sock.send(protocol.encode(protocol.Failure(trial_id=trial_id, unavailable=True,
                                                           error="InstrumentUnavailable: robot powered off")))
                _next_message(sock, "ack")
                row = store.trial(trial_id)
                assert (row.status, row.attempts, row.station) == ("proposed", 0, None)
                assert "powered off" in row.error
                waiting = control_request(control, "status")["stations"][0]["unreachable"]
                (label, left), = waiting.items()
                assert label.startswith("simulators.") and 0 <= left <= rest
                assert any("cannot reach simulators." in line for line in daemon_lines(control, ["reach"]))
                health = control_request(control, "health")
                assert health["healthy"] and health["unreachable_instruments"] == {"robot": [label]}
                assigned.append(_next_message(sock, "assign"))
                assert assigned[-1].trial_id == trial_id
                assert time.monotonic() - refused_at[-1] >= rest - 0.1, "dispatched again before the rest was over"
            sock.send(protocol.encode(protocol.ResultMessage(trial_id=trial_id, run_uid="run-1", values={"y": 1.5})))
            _next_message(sock, "ack")
            thread.join(timeout=20)
        assert not thread.is_alive()
        row = store.trial(trial_id)
        assert (row.status, row.attempts, row.error) == ("completed", 1, None)


def test_a_finite_space_a_planner_will_not_repeat_ends_the_campaign_once_every_point_is_run(store: Store) -> None:
    """Ax never repeats a point: a campaign of 8 experiments over 4 points said "the planner failed" and
    tried again every second, for good."""
    from closedloop.daemon import run_embedded

    campaign = Campaign.from_yaml_text("""
name: four-points
parameters:
  x1: {type: discrete, values: [1, 2]}
  x2: {type: discrete, values: [3, 4]}
objectives: {y: {goal: minimize}}
budget: {experiments: 8}
execution: {concurrency: 3}
planner: {backend: ax, seed: 3}
instrument: {simulator: "simulators.surfaces:Branin"}
""")
    assert campaign.space_size() == 4
    events: list[str] = []
    deadline = time.monotonic() + 120
    run = run_embedded(campaign, store, on_event=lambda kind, details: events.append(kind),
                       should_stop=lambda: time.monotonic() > deadline)
    assert time.monotonic() < deadline, "the campaign did not end"
    trials = store.trials(run.id)
    assert sorted((t.parameters["x1"], t.parameters["x2"]) for t in trials) == [(1, 3), (1, 4), (2, 3), (2, 4)]
    assert {t.status for t in trials} == {"completed"}
    assert store.campaign_row("four-points").status == "completed"
    assert "space_exhausted" in events and "planner_error" not in events


def test_an_embedded_run_whose_planner_keeps_failing_goes_on_with_space_filling_points(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """``closedloop run`` takes no space-filling points (its runs are reproducible whatever the machine's speed), and a
    failed suggestion is tried again when a result comes in: with nothing in flight, a planner that kept failing
    held the robot idle for good. A planner fault is injected, as no campaign makes the planner fail today."""
    from closedloop.daemon import run_embedded
    from closedloop.planner.botorch_backend import BotorchPlanner

    def broken(self: BotorchPlanner, n: int = 1, pending: object = None) -> list:
        raise RuntimeError("injected planner fault")

    monkeypatch.setattr(BotorchPlanner, "suggest", broken)
    campaign = _campaign("stuck", 3, backend="botorch", latency=0.01, concurrency=1)
    events: list[tuple[str, dict]] = []
    deadline = time.monotonic() + 60
    run = run_embedded(campaign, store, on_event=lambda kind, details: events.append((kind, details)),
                       should_stop=lambda: time.monotonic() > deadline)
    assert time.monotonic() < deadline, "the campaign stood still"
    trials = store.trials(run.id)
    assert [t.status for t in trials] == ["completed"] * 3
    assert {t.planner.get("generator") for t in trials} == {"filler"}
    errors = [d["error"] for kind, d in events if kind == "planner_error"]
    assert errors and all("injected planner fault" in e for e in errors)


def test_an_assignment_that_never_left_for_a_station_gone_is_not_an_attempt(store: Store) -> None:
    """A station is welcomed and gone before its first assignment leaves: the assignment cannot leave
    (ROUTER_MANDATORY: host unreachable). The trial goes back to the queue as never tried, so the campaign's
    retries are not spent on it (with `retries: 0` it was abandoned: CI's partition test). (A station gone before
    the daemon read its hello is not registered at all: test_a_hello_over_a_connection_closed_since_...)"""
    daemon = Daemon(store, [_campaign("gone", 1, retries=0)], heartbeat_s=1.0)
    cid = store.campaign_row("gone").id
    started = time.monotonic()
    context = zmq.Context()
    ghost = context.socket(zmq.DEALER)
    ghost.setsockopt(zmq.ROUTING_ID, b"ghost")
    ghost.setsockopt(zmq.LINGER, 0)
    ghost.connect(daemon.endpoint)
    # paused until the station is gone, so that its first assignment is sent after it went
    daemon.handle_control("pause", {"campaign": "gone"})
    ghost.send(protocol.encode(protocol.Hello(station="ghost")))

    def between_turns() -> bool:
        if not ghost.closed and ghost.poll(0) and protocol.decode(ghost.recv()).type == "welcome":
            ghost.close()
            time.sleep(0.3)  # the daemon's socket has seen the connection close
            daemon.handle_control("resume", {"campaign": "gone"})
        trials = store.trials(cid)
        return bool(trials and trials[0].error) or time.monotonic() - started > 20

    try:
        daemon.serve(should_stop=between_turns)
    finally:
        daemon.close()
        ghost.close()
        context.term()
    [trial] = store.trials(cid)
    assert trial.status == "proposed" and "station ghost unreachable" in trial.error
    assert trial.attempts == 0, "a dispatch that never left the daemon counted as an attempt"


def _talk(sock: zmq.Socket, seconds: float, heartbeat: protocol.Heartbeat | None = None) -> list[protocol.Message]:
    """What the daemon sends a hand-driven station in ``seconds``, beating ``heartbeat`` every 0.1 s meanwhile."""
    heard: list[protocol.Message] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        while sock.poll(100):
            heard.append(protocol.decode(sock.recv()))
        if heartbeat is not None:
            sock.send(protocol.encode(heartbeat))
    return heard


def test_a_trial_of_a_campaign_the_daemon_does_not_run_stays_with_its_station_until_one_does(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    mine, theirs = _campaign("mine", 40, latency=0.05), _campaign("theirs", 4, retries=0)
    store.open_campaign(mine)
    # what a daemon killed while it ran both left: two trials of "theirs" on station "st", one running there and
    # one whose result is in its outbox; this daemon is restarted with "mine" only
    running, measured = (store.add_dispatched(store.open_campaign(theirs), {"x1": x, "x2": 2.0}, {}, "st").id
                         for x in (1.0, 2.0))
    result = protocol.ResultMessage(trial_id=measured, run_uid="run-measured", values={"y": 3.5})
    failure = protocol.Failure(trial_id=running, error="DeviceError: jammed", run_uid="run-jammed")
    hello = protocol.Hello(station="st", campaigns=["theirs"], outstanding=[running, measured], instance="i1")
    daemon = Daemon(store, [mine], heartbeat_s=0.2, drain_s=0.5)
    with caplog.at_level(logging.WARNING, logger="closedloop.daemon"), serving(daemon), \
            raw_station(daemon.endpoint, "st") as sock:
        sock.send(protocol.encode(hello))
        sock.send(protocol.encode(result))
        heard = _talk(sock, 1.5, protocol.Heartbeat(running=[running], holds=[running, measured]))
        # it cancelled the experiment (its run then ran again once "theirs" was served) and acked the failure
        assert "welcome" in [m.type for m in heard] and "cancel" not in [m.type for m in heard], heard
        sock.send(protocol.encode(failure))
        heard = _talk(sock, 1.0)
        assert "ack" not in [m.type for m in heard], "an answer for a campaign not run here was acknowledged: lost"
    assert [store.trial(t).status for t in (running, measured)] == ["dispatched", "dispatched"]
    said = [r.getMessage() for r in caplog.records if "which this daemon does not run" in r.getMessage()]
    assert len(said) == 3 and all("campaign theirs" in s for s in said), said  # each once, not at every heartbeat

    # served again: the station's outbox delivers both, each taken once
    daemon = Daemon(store, [mine, theirs], heartbeat_s=0.2, drain_s=0.5)
    with serving(daemon), raw_station(daemon.endpoint, "st") as sock:
        sock.send(protocol.encode(hello.model_copy(update={"instance": "i2"})))
        sock.send(protocol.encode(result))
        sock.send(protocol.encode(failure))
        acked = {m.trial_id for m in _talk(sock, 1.5) if isinstance(m, protocol.Ack)}
        assert acked == {running, measured}
    assert store.trial(measured).status == "completed"
    assert store.observations(store.campaign_row("theirs").id)[measured].run_uid == "run-measured"
    jammed = store.trial(running)
    assert (jammed.status, jammed.run_uids) == ("failed", ["run-jammed"])


def test_a_station_whose_only_campaign_finished_is_told_once_while_others_run(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from closedloop.view import daemon_lines

    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = Daemon(store, [_campaign("quick", 2, latency=0.05), _campaign("long", 40, latency=0.05)],
                    heartbeat_s=0.2, control=control)
    with caplog.at_level(logging.INFO, logger="closedloop.worker"), \
            station(daemon.endpoint, "for-quick", tmp_path, campaigns=["quick"]) as done, \
            station(daemon.endpoint, "for-both", tmp_path, campaigns=["quick", "long"]) as both, \
            station(daemon.endpoint, "for-any", tmp_path) as any_, serving(daemon):
        _wait(lambda: done.finished == {"quick"} and both.finished == {"quick"}, 20, "the stations told of quick's end")
        # one that registers later is told too, at its hello
        with station(daemon.endpoint, "late", tmp_path, campaigns=["quick"]) as late:
            _wait(lambda: late.finished == {"quick"}, 20, "the late station told")
            time.sleep(0.5)  # a few heartbeats: still said once
            lines = daemon_lines(control, ["quick", "long"], timeout_s=3)
        assert any_.finished == set(), "a station serving any campaign has nothing to be told"
        assert store.campaign_row("long").status == "running"
    said = [(r.threadName, r.levelname, r.getMessage()) for r in caplog.records if "has finished" in r.getMessage()]
    by_station = sorted((name.removeprefix("closedloop-comms-"), level) for name, level, _ in said)
    assert by_station == [("for-both", "INFO"), ("for-quick", "WARNING"), ("late", "WARNING")], said
    assert all("nothing more to run" in text for _, level, text in said if level == "WARNING")
    [daemon_line] = [line for line in lines if line.startswith("daemon at")]
    assert "for-quick 0/1 busy, seen 0 s ago, nothing to run here (serves quick)" in daemon_line
    assert "for-both" in daemon_line and daemon_line.count("nothing to run here") == 2  # for-quick and late


@pytest.mark.parametrize(("option", "endpoint", "says"), [
    ("bind", "127.0.0.1:5701", "an endpoint is tcp://HOST:PORT or ipc://PATH (did you mean tcp://127.0.0.1:5701?)"),
    ("bind", "tcp://127.0.0.1:99999", "an endpoint is tcp://HOST:PORT or ipc://PATH (a port is at most 65535)"),
    ("bind", "tcp://nohost:1", "'nohost' is neither an address, a host name nor a network interface of this machine"),
    ("publish", "5702", "(did you mean tcp://127.0.0.1:5702?)"),
    ("control", "127.0.0.1:5700", "(did you mean tcp://127.0.0.1:5700?)"),
])
def test_a_bad_endpoint_is_a_value_error_in_the_command_lines_words_before_anything_is_claimed(
        tmp_path: Path, option: str, endpoint: str, says: str) -> None:
    """Daemon(bind='127.0.0.1:5701') said the address was 'reachable from other machines'; 'tcp://127.0.0.1:99999'
    was taken (ZeroMQ listened on port 34463); a control endpoint without tcp:// gave ZeroMQ's 'Invalid argument'
    after the campaign was claimed in the store."""
    store = Store(tmp_path / "s.db")
    with pytest.raises(ValueError) as caught:
        Daemon(store, [Campaign.from_yaml_text(branin_yaml("bad-endpoint", 5, initial=2, seed=0, noise=0.0, backend="sobol"))],
               **{option: endpoint})
    assert str(caught.value).startswith(f"{option} {endpoint!r}: ") and says in str(caught.value), caught.value
    assert store.campaigns() == []


def test_a_port_in_use_is_said_naming_which_of_the_daemons_endpoints_it_is(tmp_path: Path) -> None:
    """Said as 'ZMQError: Address already in use (addr=...)', it named no endpoint of the three; and by then the
    campaign was claimed and its row written, where a daemon that cannot listen now writes nothing (and lets go of
    the endpoints it had bound before the one in use)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
    campaign = Campaign.from_yaml_text(branin_yaml("busy", 5, initial=2, seed=0, noise=0.0, backend="sobol"))
    store = Store(tmp_path / "s.db")
    try:
        for option, purpose in (("bind", "for stations"), ("publish", "to publish events"),
                                ("control", "for control requests")):
            stations = socket.socket()
            stations.bind(("127.0.0.1", 0))
            free = stations.getsockname()[1]
            stations.close()
            endpoints = {"bind": f"tcp://127.0.0.1:{free}", option: endpoint}
            with pytest.raises(ClosedLoopError) as caught:
                Daemon(store, [campaign], **endpoints)
            assert str(caught.value) == (f"cannot listen {purpose} at {endpoint}: Address already in use (another "
                                         "daemon or program listens there: stop it, or choose another port)")
            assert store.campaigns() == []
            if option != "bind":
                _bound_within(free, 5.0)
    finally:
        busy.close()


def _bound_within(port: int, seconds: float) -> None:
    """Bind loopback ``port`` once it is free: ZeroMQ closes a socket in its I/O thread, a moment after close()."""
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


def _control_daemon(tmp_path: Path, control: str) -> Daemon:
    return Daemon(Store(tmp_path / "s.db"), [Campaign.from_yaml_text(branin_yaml("ctl", 5, initial=2, seed=0, noise=0.0,
                                                                                 backend="sobol"))], control=control)


def test_the_control_socket_is_refused_anywhere_but_loopback_or_ipc(tmp_path: Path) -> None:
    """The unauthenticated control socket was taken as local when its endpoint merely contained '127.0.0.1' or
    'localhost', and this machine's own name, which resolves to loopback, was refused; the rule is now the station
    endpoints' (keys.is_local): every address of the host must be loopback."""
    import socket

    from closedloop.errors import ProtocolError
    from tests.test_keys import _own_address

    hostile = [f"tcp://{own}:0" for own in [_own_address()] if own is not None] + ["tcp://*:0", "tcp://0.0.0.0:0",
                                                                                    "tcp://[::]:0"]
    for control in hostile:
        with pytest.raises(ProtocolError, match=r"control endpoint .* is reachable from other machines"):
            _control_daemon(tmp_path, control)
    for control in ("tcp://localhost.example.invalid:5700", "tcp://127.0.0.1.example.invalid:5700"):
        with pytest.raises(ValueError, match=r"is neither an address, a host name nor a network interface"):
            _control_daemon(tmp_path, control)
    accepted = [f"ipc://{tmp_path}/control", "tcp://127.0.0.1:0", "tcp://localhost:0"]
    if _ipv6_loopback_problem() is None:  # loopback by IPv6, and IPv4 as IPv6 sees it
        accepted += ["tcp://[::1]:0", "tcp://[::ffff:127.0.0.1]:0"]
    if all(info[4][0].startswith("127.") for info in socket.getaddrinfo(socket.gethostname(), None)):
        accepted.append(f"tcp://{socket.gethostname()}:0")  # 'vm' is 127.0.0.1 in this machine's /etc/hosts
    for control in accepted:
        daemon = _control_daemon(tmp_path, control)
        try:
            assert daemon.control is not None
            bound = daemon.control.getsockopt(zmq.LAST_ENDPOINT).decode()
            assert bound.startswith(("ipc://", "tcp://127.0.0.1:", "tcp://[::1]:", "tcp://[::ffff:127.0.0.1]:")), \
                (control, bound)
        finally:
            daemon.close()


def _ipv6_loopback_problem() -> str | None:
    """Why this machine cannot listen on ::1 (no IPv6, or loopback without it), or None."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"this machine cannot listen on IPv6 loopback [::1]: {exc}"
    return None


def test_a_daemon_on_ipv6_loopback_serves_its_station_and_its_control_socket(store: Store, tmp_path: Path) -> None:
    """The daemon refused IPv6 endpoints ('the daemon does not listen on IPv6 addresses'), its sockets lacking
    ZeroMQ's IPV6 option: without it ZeroMQ cannot bind [::1] ('No such device'), and a station connecting to it
    waits for good, silently. Every socket to such an endpoint now has the option."""
    if problem := _ipv6_loopback_problem():
        pytest.skip(problem)
    daemon = Daemon(store, [_campaign("six", 4, latency=0.05)], bind="tcp://[::1]:0", publish="tcp://[::1]:0",
                    control="tcp://[::1]:0", heartbeat_s=0.2)
    assert daemon.endpoint.startswith("tcp://[::1]:") and daemon.control_endpoint is not None
    with serving(daemon) as thread:
        assert control_request(daemon.control_endpoint, "status")["success"] is True
        with station(daemon.endpoint, "six-a", tmp_path):
            thread.join(timeout=60)
        assert not thread.is_alive()
    trials = store.trials(store.campaign_row("six").id)
    assert [(t.status, t.station) for t in trials] == [("completed", "six-a")] * 4


def test_a_daemon_on_every_interface_welcomes_stations_of_both_families(store: Store) -> None:
    """'tcp://*:PORT' listened on IPv4 alone: a station of an IPv6-only network could not reach it. It now listens on
    both families (IPv4 peers as ::ffff:a.b.c.d), and a station connecting by either is welcomed."""
    from closedloop.worker import connect_station

    if problem := _ipv6_loopback_problem():
        pytest.skip(problem)
    daemon = Daemon(store, [_campaign("both", 2)], bind="tcp://*:0", insecure=True, heartbeat_s=0.2, drain_s=0.5)
    port = daemon.endpoint.rpartition(":")[2]
    context = zmq.Context()
    socks = {name: connect_station(context, f"tcp://{host}:{port}", name, None)
             for name, host in (("by-six", "[::1]"), ("by-four", "127.0.0.1"))}
    try:
        with serving(daemon):
            for name, sock in socks.items():
                sock.send(protocol.encode(protocol.Hello(station=name)))
                assert _next_message(sock, "welcome").type == "welcome", name
    finally:
        for sock in socks.values():
            sock.close(linger=0)
        context.term()


def _rows_read(store: Store, call: Callable[[], object]) -> int:
    """How many rows the SELECTs that ``call`` runs on ``store`` return (each run again afterwards to count them)."""
    from sqlalchemy import event

    selects: list[tuple[str, object]] = []

    def seen(_conn: object, _cursor: object, statement: str, parameters: object, _context: object, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    with store.engine.connect() as connection:
        return sum(len(connection.exec_driver_sql(statement, parameters).all())  # type: ignore[arg-type]
                   for statement, parameters in selects)


def test_a_result_told_by_hand_is_noticed_without_reading_every_finished_trial(store: Store) -> None:
    # on a campaign of 20,000 trials a 'closedloop tell' held the daemon's loop 1.8 s (it read every finished trial
    # and every observation to find the one told), and after a 'closedloop import' it did so every second, for good
    from closedloop import hitl

    campaign = _campaign("big", 1000)
    past = [({"x1": i / 100, "x2": 1.0}, {"y": float(i)}, None) for i in range(300)]
    store.import_results(store.open_campaign(campaign), past, "past.csv")
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    try:
        run = next(iter(daemon.runs.values()))
        hand = hitl.suggest(store, campaign, n=2)
        assert _rows_read(store, lambda: daemon._learn_told(run)) < 20
        hitl.tell(store, "big", hand[0].index, {"y": -1.0})
        (imported,) = store.import_results(run.id, past[:1], "more.csv")
        assert _rows_read(store, lambda: daemon._learn_told(run)) < 20
        # an experiment imported while the daemon serves is the campaign's, as one told by hand
        assert run.manual_done == {hand[0].id, imported.id} and run.best is not None and run.best.values == {"y": -1.0}
        assert _rows_read(store, lambda: daemon._learn_told(run)) < 20
        hitl.tell(store, "big", hand[1].index, {"y": 5.0})
        daemon._learn_told(run)
        assert run.manual_done == {hand[0].id, hand[1].id, imported.id}
    finally:
        daemon.close()


def test_a_trial_its_restarted_station_never_ran_keeps_its_retry(store: Store) -> None:
    """A station restarted (Restart=always) before running its queued trial re-registers without it: the trial goes
    back to the queue. That dispatch was counted as an attempt, so with `retries: 1` the trial's one real failure
    afterwards was final: its retry spent on an experiment that never took place (a lost station's unstarted trial
    is not counted)."""
    daemon = Daemon(store, [_campaign("unrun", 1, latency=0.05, concurrency=1, retries=1)], heartbeat_s=5.0,
                    drain_s=0.5)
    with raw_station(daemon.endpoint, "robot") as sock:
        sock.send(protocol.encode(protocol.Hello(station="robot", instance="p1")))
        with serving(daemon):
            _next_message(sock, "welcome")
            first = _next_message(sock, "assign")
            # the station process restarted before starting it: a new instance, holding nothing
            sock.send(protocol.encode(protocol.Hello(station="robot", instance="p2")))
            _next_message(sock, "welcome")
            again = _next_message(sock, "assign")
            assert again.trial_id == first.trial_id
            sock.send(protocol.encode(protocol.Started(trial_id=again.trial_id, assignment=again.msg_id)))
            sock.send(protocol.encode(protocol.Failure(trial_id=again.trial_id, assignment=again.msg_id,
                                                       error="DeviceError: axis x1 stalled")))
            _next_message(sock, "ack")
            retry = _next_message(sock, "assign")  # it was failed for good instead: no assign came
            assert retry.trial_id == first.trial_id
            assert (store.trial(first.trial_id).status, store.trial(first.trial_id).attempts) == ("dispatched", 2)


def test_a_planner_waiting_for_results_is_no_planner_fault(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ax proposes no more than its initial design before a result (tests/planner/test_ax_backend.py), which reached
    the daemon as a fault: "the planner failed" on the terminal and a traceback in the log at each of these normal
    waits. The wait is injected here, in a planner that waits once two experiments are in flight: Ax's own point of
    waiting moves with how the daemon's buffered proposals come and go."""
    from closedloop.errors import PlannerWaiting
    from closedloop.planner.baselines import SobolPlanner

    propose = SobolPlanner.suggest

    def waiting(self: SobolPlanner, n: int = 1, pending: list | None = None) -> list:
        if len(pending or []) >= 2:
            raise PlannerWaiting("waits for a result (2 in flight)")
        return propose(self, min(n, 2 - len(pending or [])), pending=pending)

    monkeypatch.setattr(SobolPlanner, "suggest", waiting)
    # no space-filling points while the planner computes (as `closedloop run`): only a planner that cannot propose
    # has a slot filled, a second after
    daemon = Daemon(store, [_campaign("waits", 12, latency=0.05, concurrency=4)], heartbeat_s=5.0, fill_after_s=None,
                    drain_s=0.5)
    events: list[tuple[str, dict]] = []
    daemon.on_event = lambda kind, details: events.append((kind, details))
    with raw_station(daemon.endpoint, "robot") as sock:
        sock.send(protocol.encode(protocol.Hello(station="robot", capacity=4)))
        with serving(daemon):
            _next_message(sock, "welcome")
            assigned = [_next_message(sock, "assign") for _ in range(4)]
    generators = [store.trial(a.trial_id).planner.get("generator") for a in assigned]
    assert generators == ["sobol", "sobol", "filler", "filler"], generators
    assert not [d for kind, d in events if kind == "planner_error"], events
    assert daemon.runs[store.campaign_row("waits").id].service.waiting == "waits for a result (2 in flight)"


def test_a_hello_over_a_connection_closed_since_registers_nothing(store: Store,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A station waiting for a daemon that is still starting opens a new connection after five silent heartbeats
    and says hello on it. The daemon, reading the closed connection's hellos first, registered the station in a
    session whose welcome and first assign went nowhere ("could not send a message to b'st': welcome: Host
    unreachable", about six a station at each daemon start in the test logs), until the new hello registered it
    again and re-queued the trial; a restarted daemon's answer to the closed connection's heartbeats ('refused:
    unregistered') was logged as a failure the same way."""
    daemon = Daemon(store, [_campaign("late", 1, latency=0.05)], heartbeat_s=0.2)
    context = zmq.Context()
    closed = context.socket(zmq.DEALER)
    closed.setsockopt(zmq.ROUTING_ID, b"st")
    closed.setsockopt(zmq.LINGER, 2000)
    closed.connect(daemon.endpoint)
    # what a station queues while no daemon answers: heartbeats (to a restarted daemon) and hellos
    closed.send(protocol.encode(protocol.Heartbeat(running=[])))
    closed.send(protocol.encode(protocol.Hello(station="st", capacity=1, instance="i1")))
    closed.close()
    context.term()  # after the hello went out (LINGER)
    time.sleep(0.5)  # the daemon's socket has seen the connection close
    with caplog.at_level("WARNING", logger="closedloop.daemon"), serving(daemon):
        for _ in range(10):
            # unanswered, a station opens a new connection and says hello again: one that came while the daemon's
            # socket still held the closed one under the same name is turned away, its hellos with it
            with raw_station(daemon.endpoint, "st") as sock:
                sock.send(protocol.encode(protocol.Hello(station="st", capacity=1, instance="i1")))
                if not sock.poll(1000):
                    continue
                welcome = protocol.decode(sock.recv())
                assert welcome.type == "welcome" and welcome.session == 1, welcome
                assign = _next_message(sock, "assign")
                sock.send(protocol.encode(protocol.ResultMessage(trial_id=assign.trial_id, assignment=assign.msg_id,
                                                                 run_uid="run-1", values={"y": 1.0})))
                _next_message(sock, "ack")
                break
        else:
            raise AssertionError("no welcome on ten connections")
    assert not [r.getMessage() for r in caplog.records if "could not send" in r.getMessage()]
    [trial] = store.trials(store.campaign_row("late").id)
    assert (trial.status, trial.attempts, trial.station) == ("completed", 1, "st")


def test_a_station_registering_again_during_the_drain_is_asked_again_for_what_it_has_not_started(
        store: Store) -> None:
    """The take-back of trials sent ahead went out once, when the drain began: a station whose connection dropped
    with it, registering again holding the trial, was never asked and started it once its run was done."""
    daemon = Daemon(store, [_campaign("again", 4, retries=0)], heartbeat_s=0.2, prefetch=1, drain_s=20.0)
    with serving(daemon) as thread, raw_station(daemon.endpoint, "st") as sock:
        sock.send(protocol.encode(protocol.Hello(station="st", capacity=1, instance="i1")))
        session = _next_message(sock, "welcome").session
        first, second = _next_message(sock, "assign"), _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.Started(trial_id=first.trial_id, assignment=first.msg_id)))
        _wait(lambda: daemon.in_flight[first.trial_id].started, 10, "the first trial to be started")
        daemon.request_stop("test")
        _next_message(sock, "cancel")  # lost with the connection, as far as the station knows
        sock.send(protocol.encode(protocol.Hello(station="st", capacity=1, instance="i1", welcomed=session,
                                                 outstanding=[first.trial_id, second.trial_id])))
        _next_message(sock, "welcome")
        cancel = _next_message(sock, "cancel")
        assert (cancel.trial_id, cancel.unstarted_only) == (second.trial_id, True)
        # it dropped the second: its heartbeats, after the daemon's, hold only the first
        sock.send(protocol.encode(protocol.Heartbeat(running=[first.trial_id])))
        seen = _next_message(sock, "heartbeat").msg_id
        sock.send(protocol.encode(protocol.Heartbeat(running=[first.trial_id], holds=[first.trial_id], seen=seen)))
        _wait(lambda: second.trial_id not in daemon.in_flight, 10, "the second trial handed back")
        sock.send(protocol.encode(protocol.ResultMessage(trial_id=first.trial_id, assignment=first.msg_id,
                                                         run_uid="run-1", values={"y": 1.0})))
        thread.join(timeout=10)
        assert not thread.is_alive()
    trials = store.trials(store.campaign_row("again").id)
    assert [(t.status, t.attempts) for t in trials] == [("completed", 1), ("proposed", 0)], trials


def test_a_trial_sent_ahead_whose_run_began_as_a_stopping_daemon_took_it_back_stays_with_its_station(
        store: Store) -> None:
    """A stopping daemon asks its stations to hand back the trials sent ahead that they have not started. The
    station's `started` may cross that request: the run has begun, so the trial must stay there (never re-queued,
    which would run it twice) and the drain waits for its result like any run in progress."""
    campaign = _campaign("crossed", 4, retries=0)
    daemon = Daemon(store, [campaign], heartbeat_s=0.2, prefetch=1, drain_s=20.0)
    with serving(daemon) as thread, raw_station(daemon.endpoint, "st") as sock:
        heard: list[protocol.Message] = []
        seen: str | None = None

        def beat(seconds: float, holds: list[int]) -> None:
            """Heartbeats listing ``holds`` after the daemon's latest, as a station sends them, for ``seconds``."""
            nonlocal seen
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                while sock.poll(50):
                    heard.append(protocol.decode(sock.recv()))
                    seen = heard[-1].msg_id if heard[-1].type == "heartbeat" else seen
                sock.send(protocol.encode(protocol.Heartbeat(running=holds[:1], holds=holds, seen=seen)))

        sock.send(protocol.encode(protocol.Hello(station="st", capacity=1, instance="i1")))
        _next_message(sock, "welcome")
        first, second = _next_message(sock, "assign"), _next_message(sock, "assign")
        sock.send(protocol.encode(protocol.Started(trial_id=first.trial_id, assignment=first.msg_id)))
        _wait(lambda: daemon.in_flight[first.trial_id].started, 10, "the first trial to be started")
        daemon.request_stop("test")
        cancel = _next_message(sock, "cancel")
        assert (cancel.trial_id, cancel.unstarted_only) == (second.trial_id, True)
        # the station had begun the second when the request came (first done, its result on its way)
        sock.send(protocol.encode(protocol.Started(trial_id=second.trial_id, assignment=second.msg_id)))
        sock.send(protocol.encode(protocol.ResultMessage(trial_id=first.trial_id, assignment=first.msg_id,
                                                         run_uid="run-1", values={"y": 1.0})))
        beat(1.5, [second.trial_id])
        assert thread.is_alive(), "the daemon left while the trial it had asked back ran on its station"
        assert store.trial(second.trial_id).status == "dispatched" and second.trial_id in daemon.in_flight
        sock.send(protocol.encode(protocol.ResultMessage(trial_id=second.trial_id, assignment=second.msg_id,
                                                         run_uid="run-2", values={"y": 2.0})))
        beat(1.0, [second.trial_id])
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert [(t.status, t.attempts, t.run_uids) for t in store.trials(store.campaign_row("crossed").id)] == [
        ("completed", 1, ["run-1"]), ("completed", 1, ["run-2"])]
