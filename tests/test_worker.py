"""The station worker: its outbox, and the instrument's suspenders in its RunEngine."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from bluesky.suspenders import SuspendBoolHigh
from ophyd import Signal

from closedloop import protocol
from closedloop.campaign import Campaign
from closedloop.daemon import Daemon
from closedloop.errors import ClosedLoopError
from closedloop.store import Store
from closedloop.worker import Outbox, StationWorker
from drivers.binding import InstrumentBinding
from tests.daemon.procs import receive, started_catching
from simulators.surfaces import Branin, branin_campaign

# the campaign names this module by import path; make that path resolve to this very module (pytest may
# have imported it under another name), so the station's binding shares the test's interlock signal
sys.modules.setdefault("tests.test_worker", sys.modules[__name__])

BEAM_DOWN = Signal(name="beam_down", value=0)
SUSPENDER = SuspendBoolHigh(BEAM_DOWN, sleep=0)


def interlocked_branin(**options: object) -> InstrumentBinding:
    """Branin behind a beam interlock: the RunEngine suspends while ``BEAM_DOWN`` is high."""
    binding = Branin(**options)  # type: ignore[arg-type]
    binding.suspenders = [SUSPENDER]
    return binding


def test_outbox_keeps_results_until_removed_and_records_every_run(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    payload = protocol.encode(protocol.ResultMessage(trial_id=4, run_uid="r4", values={"y": 1.0}))
    outbox.put(4, payload, "r4")
    outbox.put(5, protocol.encode(protocol.Failure(trial_id=5, error="x")))
    outbox.close()
    reopened = Outbox(tmp_path / "o.db")  # what a restarted station finds
    assert [t for t, _ in reopened.pending()] == [4, 5] and reopened.result(4) == payload
    assert reopened.result(5) is None  # an earlier attempt's failure does not answer a new assignment
    reopened.remove(4)
    assert [t for t, _ in reopened.pending()] == [5]
    assert reopened.ran() == [(4, "r4")]  # failures are not runs that measured something
    # a retry's answer replaces the trial's entry; a late ack of the earlier attempt leaves it
    reopened.put(5, protocol.encode(protocol.Failure(trial_id=5, assignment="retry", error="y")))
    reopened.remove(5, "first")
    assert [t for t, _ in reopened.pending()] == [5]
    reopened.remove(5, "retry")
    assert reopened.pending() == []


def test_an_outbox_holding_another_stations_answers_is_refused_until_they_are_delivered(tmp_path: Path) -> None:
    """A replacement started under another name on a killed station's outbox sent its measured result, which the
    daemon takes only from the station it gave the trial to: dropped, and once the killed station was given up the
    trial was measured again elsewhere (crash test, trial 48 in station-4's and station-3's records)."""
    path = tmp_path / "o.db"
    first = Outbox(path, station="station-4")
    first.put(48, protocol.encode(protocol.ResultMessage(trial_id=48, run_uid="r48", values={"y": 1.0})), "r48")
    first.close()
    before = path.read_bytes()
    with pytest.raises(ClosedLoopError, match=re.escape(
            f"the outbox {path} holds 1 answer of station 'station-4' not yet delivered, which only that station can "
            "deliver: start it as --name station-4 to deliver it, or give station 'station-5' an outbox of its own")):
        StationWorker("tcp://127.0.0.1:5701", name="station-5", outbox=path)
    assert path.read_bytes() == before
    again = Outbox(path, station="station-4")  # its own station opens it, and delivers
    assert [t for t, _ in again.pending()] == [48]
    again.remove(48)
    again.close()
    taken = Outbox(path, station="station-5")  # nothing waiting: it changes hands, failures count as answers
    taken.put(7, protocol.encode(protocol.Failure(trial_id=7, error="x")))
    taken.close()
    with pytest.raises(ClosedLoopError, match="holds 1 answer of station 'station-5'"):
        Outbox(path, station="station-4")


def test_an_outbox_locked_by_another_program_is_waited_out_and_the_measured_result_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sqlite3 shell holding ``BEGIN EXCLUSIVE`` on a station's outbox: five seconds after its run finished the
    station stopped with 'OperationalError: database is locked', exit 1, and the result it had measured, in no
    outbox and never sent, was lost (the daemon abandoned the trial). It waits, says so once, and keeps it."""
    path = tmp_path / "o.db"
    outbox = Outbox(path, station="st")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(7)\n"
        "db.execute('ROLLBACK')\n"), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        Outbox(path, station="st").close()  # a station started meanwhile opens its own outbox: it writes nothing
        payload = protocol.encode(protocol.ResultMessage(trial_id=3, run_uid="r3", values={"y": 2.0}))
        with caplog.at_level("WARNING", logger="closedloop.worker"):
            outbox.put(3, payload, "r3")
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    assert any("is locked by another program" in r.getMessage() for r in caplog.records)
    outbox.close()
    reopened = Outbox(path)
    assert reopened.result(3) == payload and reopened.ran() == [(3, "r3")]


def test_an_outbox_that_is_a_folder_another_file_or_a_daemons_store_is_refused_unchanged(tmp_path: Path) -> None:
    """`--outbox` given a daemon's store wrote the station's tables into it without a word; given a text file or a
    folder, it failed with SQLite's words, naming no outbox."""
    store_path = tmp_path / "s.db"
    Store(store_path).close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    before = {path: path.read_bytes() for path in (store_path, text)}
    for path, said in ((tmp_path, "is a folder"), (text, "is not a station's outbox"),
                       (store_path, "is another database (it holds the tables")):
        with pytest.raises(ClosedLoopError, match=f"the outbox {path} {re.escape(said)}"):
            Outbox(path)
    assert {path: path.read_bytes() for path in before} == before
    Outbox(tmp_path / "o.db").close()
    assert [t for t, _ in Outbox(tmp_path / "o.db").pending()] == []  # its own outbox opens again


@pytest.mark.slow
def test_the_instruments_suspenders_hold_the_run_until_the_interlock_clears(tmp_path: Path) -> None:
    campaign = Campaign.from_yaml_text(branin_campaign(
        "interlock", 2, planner={"backend": "sobol"}, instrument={"simulator": "tests.test_worker:interlocked_branin"}))
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)
    worker = StationWorker(daemon.endpoint, name="beamline", outbox=tmp_path / "o.db", heartbeat_s=0.2)
    stop = threading.Event()
    threads = [threading.Thread(target=worker.run, args=(stop,), daemon=True),
               threading.Thread(target=daemon.serve, daemon=True)]
    BEAM_DOWN.put(1)
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while worker.RE is None or SUSPENDER not in worker.RE.suspenders or worker.RE.state != "running":
            assert time.monotonic() < deadline, "the station never started the run"
            time.sleep(0.05)
        time.sleep(1.0)  # a zero-latency instrument would have finished both experiments by now
        assert SUSPENDER.tripped
        assert store.counts(store.campaign_row("interlock").id).get("completed", 0) == 0
        BEAM_DOWN.put(0)
        threads[1].join(timeout=30)
        assert not threads[1].is_alive()
    finally:
        BEAM_DOWN.put(0)
        stop.set()
        threads[0].join(timeout=10)
        daemon.request_stop()
        threads[1].join(timeout=10)
        daemon.close()
    assert store.counts(store.campaign_row("interlock").id) == {"completed": 2}


@contextmanager
def _registered_with_a_hand_driven_daemon(tmp_path: Path, instruments: list[str] | None = None
                                          ) -> Iterator[tuple[Any, bytes, protocol.Hello, StationWorker]]:
    """A station on a thread of its own, welcomed by a ROUTER socket the test drives as the daemon: that socket, the
    station's identity on it, its hello and the station; stopped and closed at the end."""
    import zmq

    context = zmq.Context()
    daemon = context.socket(zmq.ROUTER)
    daemon.setsockopt(zmq.LINGER, 0)
    port = daemon.bind_to_random_port("tcp://127.0.0.1")
    worker = StationWorker(f"tcp://127.0.0.1:{port}", name="s", outbox=tmp_path / "s.outbox", heartbeat_s=0.2,
                           instruments=instruments, context=context)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        identity, hello = receive(daemon, protocol.Hello)
        daemon.send_multipart([identity, protocol.encode(protocol.Welcome(heartbeat_s=0.2, session=1))])
        yield daemon, identity, hello, worker
    finally:
        stop.set()
        thread.join(timeout=30)
        daemon.close()
        context.term()


def test_an_assign_repeated_while_the_trial_is_queued_or_running_runs_it_once(tmp_path: Path) -> None:
    with _registered_with_a_hand_driven_daemon(tmp_path) as (daemon, identity, hello, worker):
        assert hello.instance and hello.welcomed == 0  # a repeat of this hello would say the same

        def assign(trial: int) -> bytes:
            return protocol.encode(protocol.Assign(
                campaign="c", trial_id=trial, trial_index=trial, setpoints={"x1": 1.0, "x2": 2.0}, outputs=["y"],
                session=1, instrument=protocol.InstrumentSpec(target="simulators.surfaces:Branin",
                                                              options={"latency": 0.3})))

        # trial 7 asked for again while it is queued or running, with trial 8 between: the repeat would run
        # after 7's result was acknowledged (gone from the outbox), so nothing but the station's memory of
        # what it holds stops a second run
        for trial in (7, 8, 7):
            daemon.send_multipart([identity, assign(trial)])
        for _ in range(2):
            _, result = receive(daemon, protocol.ResultMessage)
            daemon.send_multipart([identity, protocol.encode(protocol.Ack(trial_id=result.trial_id))])
        time.sleep(1.5)  # a second run of trial 7 would have finished by now
        assert [trial for trial, _ in worker.outbox.ran()] == [7, 8] and worker.completed == 2


def test_a_trial_handed_back_at_a_daemons_stop_is_dropped_only_if_it_has_not_started(tmp_path: Path) -> None:
    """A stopping daemon takes back what it sent ahead (``cancel`` with ``unstarted_only``). The run in progress,
    asked too (its ``started`` may cross the request), must go on and be delivered, never aborted; the queued trial
    must never start, and the station's holdings must leave it out, which is how the daemon learns it may queue it
    again. A later assign of it (the next daemon's) runs it, once."""
    with _registered_with_a_hand_driven_daemon(tmp_path) as (daemon, identity, _, worker):

        def send(message: protocol._Message) -> None:
            daemon.send_multipart([identity, protocol.encode(message)])

        def assign(trial: int) -> protocol.Assign:
            return protocol.Assign(campaign="c", trial_id=trial, trial_index=trial, setpoints={"x1": 1.0, "x2": 2.0},
                                   outputs=["y"], session=1, instrument=protocol.InstrumentSpec(
                                       target="simulators.surfaces:Branin", options={"latency": 1.0}))

        def answer_for(seconds: float, until: Callable[[list[Any]], bool] = lambda _: False) -> list[Any]:
            """What the station sends meanwhile, its heartbeats answered as the daemon does (else it reconnects)."""
            seen: list[Any] = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not until(seen):
                if daemon.poll(100):
                    seen.append(protocol.decode(daemon.recv_multipart()[1]))
                    if isinstance(seen[-1], protocol.Heartbeat):
                        ping = protocol.Heartbeat()
                        pings.add(ping.msg_id)
                        send(ping)
            return seen

        pings: set[str] = set()  # sent after the hand-back: a heartbeat answering one lists holdings that follow it

        def results(seen: list[Any]) -> list[protocol.ResultMessage]:
            return [m for m in seen if isinstance(m, protocol.ResultMessage)]

        send(assign(1))
        send(assign(2))
        _, started = receive(daemon, protocol.Started)
        assert started.trial_id == 1
        for trial in (1, 2):
            send(protocol.Cancel(trial_id=trial, reason="the daemon is stopping", unstarted_only=True))
        seen = answer_for(20, results)
        (result,) = results(seen)
        assert result.trial_id == 1 and not [m for m in seen if isinstance(m, (protocol.Failure, protocol.Started))]
        holds = [m.holds for m in seen if isinstance(m, protocol.Heartbeat) and m.seen in pings]
        assert holds and all(h == [1] for h in holds), f"holdings after the hand-back: {holds}"
        send(protocol.Ack(trial_id=1, assignment=result.assignment))
        seen = answer_for(1.5)  # trial 2 would have started and finished by now
        assert not [m for m in seen if isinstance(m, (protocol.Started, protocol.ResultMessage, protocol.Failure))]
        assert [trial for trial, _ in worker.outbox.ran()] == [1]

        send(assign(2))
        seen = answer_for(20, results)
        assert [m.trial_id for m in results(seen)] == [2] and [trial for trial, _ in worker.outbox.ran()] == [1, 2]


def test_a_station_beats_at_least_as_often_as_the_daemon_asks(tmp_path: Path) -> None:
    campaign = Campaign.from_yaml_text(branin_campaign("beats", 2, planner={"backend": "sobol"}))
    store = Store(tmp_path / "s.db")
    events: list[str] = []
    daemon = Daemon(store, [campaign], heartbeat_s=0.15, on_event=lambda kind, details: events.append(kind))
    # the station's own default is 1 s: beating at that pace, a daemon that counts a station lost after five
    # missed 0.15 s beats lost and re-registered this healthy one again and again, its trials with it
    worker = StationWorker(daemon.endpoint, name="slow", outbox=tmp_path / "o.db")
    stop = threading.Event()
    threads = [threading.Thread(target=worker.run, args=(stop,), daemon=True),
               threading.Thread(target=daemon.serve, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        assert worker.registered.wait(10)
        assert worker.heartbeat_s == pytest.approx(0.15)
        threads[1].join(timeout=30)
        assert not threads[1].is_alive()
    finally:
        stop.set()
        threads[0].join(timeout=10)
        daemon.request_stop()
        threads[1].join(timeout=10)
        daemon.close()
    assert "station_lost" not in events
    assert store.counts(store.campaign_row("beats").id) == {"completed": 2}


@pytest.mark.slow
def test_a_device_fault_is_stored_with_the_devices_own_error_and_its_runs_documents(tmp_path: Path) -> None:
    from closedloop.daemon import run_embedded
    from drivers.documents import DocumentCollector

    # bluesky raises a device's fault as FailedStatus, whose text ("DeviceStatus(device=y, ...)") names no cause
    campaign = Campaign.from_yaml_text(branin_campaign("faulty", 2, options={"failure_rate": 1.0, "seed": 0}))
    store = Store(tmp_path / "s.db")
    run = run_embedded(campaign, store, outbox=str(tmp_path / "o.db"))
    trials = store.trials(run.id)
    assert [t.status for t in trials] == ["failed", "failed"]
    for trial in trials:
        assert trial.error is not None and trial.error.startswith("DeviceError: y: simulated device fault at {"), trial.error
        (run_uid,) = trial.run_uids
        documents = DocumentCollector.from_jsonl(store.documents(run_uid) or "")
        assert documents.start is not None and documents.start["trial_id"] == trial.id
        assert documents.stop is not None and documents.stop["exit_status"] == "fail"
    store.close()


def image_instrument() -> InstrumentBinding:
    """One axis and a 300 x 300 image detector (about 0.7 MB of documents a run); the output is its mean."""
    import numpy as np
    from ophyd.sim import SynSignal

    from drivers.binding import Derived
    from simulators.devices import LimitedAxis

    x = LimitedAxis(name="x", limits=(0.0, 1.0))
    image = SynSignal(func=lambda: np.full((300, 300), x.position), name="image")
    return InstrumentBinding(name="camera", positioners={"x": x}, detectors=[image],
                             outputs={"y": Derived(keys=("image",), func=lambda a: float(np.mean(a)))})


@pytest.mark.slow
def test_documents_too_large_for_a_message_are_kept_on_the_station_not_dropped(tmp_path: Path) -> None:
    from closedloop.daemon import run_embedded
    from drivers.documents import DocumentCollector

    campaign = Campaign.from_yaml_text("""
name: camera
parameters: {x: {type: continuous, bounds: [0, 1]}}
objectives: {y: {goal: minimize}}
budget: {experiments: 1}
planner: {backend: sobol, seed: 0}
instrument: {simulator: "tests.test_worker:image_instrument"}
""")
    store = Store(tmp_path / "s.db")
    run = run_embedded(campaign, store, outbox=str(tmp_path / "o.db"))
    (trial,) = store.trials(run.id)
    assert trial.status == "completed"
    (run_uid,) = trial.run_uids
    assert store.documents(run_uid) is None  # more than a message may carry to the daemon
    kept = tmp_path / "o.db.documents" / f"{run_uid}.jsonl"
    documents = DocumentCollector.from_jsonl(kept.read_text())
    assert documents.run_uids == [run_uid] and documents.stop is not None
    assert len(documents.events()[0]["data"]["image"]) == 300
    store.close()


def two_run_instrument() -> InstrumentBinding:
    """Branin whose custom plan measures twice, each time in a run of its own (the docs ask for exactly one)."""
    from drivers.plans import measure

    def measure_twice(binding: InstrumentBinding, setpoints: dict, md: dict):  # type: ignore[type-arg]
        yield from measure(binding, setpoints, md)
        return (yield from measure(binding, setpoints, md))

    binding = Branin()
    binding.plan = measure_twice
    return binding


@pytest.mark.slow
def test_a_plan_that_opens_two_runs_fails_and_both_runs_documents_are_kept(tmp_path: Path) -> None:
    from closedloop.daemon import run_embedded
    from drivers.documents import DocumentCollector

    campaign = Campaign.from_yaml_text(branin_campaign("two-runs", 1, instrument={
        "simulator": "tests.test_worker:two_run_instrument"}))
    store = Store(tmp_path / "s.db")
    run = run_embedded(campaign, store, outbox=str(tmp_path / "o.db"))
    (trial,) = store.trials(run.id)
    # not a result read from the last run alone, with documents the store refused (they open another run)
    assert trial.status == "failed"
    assert trial.error == "DeviceError: the plan opened 2 runs; a trial's plan must open exactly one"
    (first,) = trial.run_uids
    documents = DocumentCollector.from_jsonl(store.documents(first) or "")
    assert len(documents.run_uids) == 2 and documents.run_uids[0] == first
    store.close()


def slow_to_connect_branin(*, connect_s: float = 0.0, **options: object) -> InstrumentBinding:
    """Branin whose devices take ``connect_s`` to connect, as EPICS devices may on a station's first trial."""
    time.sleep(connect_s)
    return Branin(**options)  # type: ignore[arg-type]


@pytest.mark.slow
def test_connecting_the_instrument_is_not_counted_against_the_experiments_timeout(tmp_path: Path) -> None:
    from closedloop.daemon import run_embedded

    # a driver (imported, never built by the loader) that connects for 3 s; each experiment takes milliseconds
    campaign = Campaign.from_yaml_text(branin_campaign("slow-connect", 2, execution={"timeout": 1}, instrument={
        "driver": "tests.test_worker:slow_to_connect_branin", "options": {"connect_s": 3.0}}))
    store = Store(tmp_path / "s.db")
    run = run_embedded(campaign, store, outbox=str(tmp_path / "o.db"))
    trials = store.trials(run.id)
    # the first trial failed "timed out after 1.0 s" with no run opened: the station announced it before connecting
    assert [(t.status, t.error) for t in trials] == [("completed", None), ("completed", None)]
    assert all(t.attempts == 1 for t in trials)
    store.close()


def test_a_station_that_repeats_its_hello_while_the_daemon_starts_registers_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from tests.daemon.procs import serving, station, wait_for

    campaign = Campaign.from_yaml_text(branin_campaign("early", 1, planner={"backend": "sobol"}))
    store = Store(tmp_path / "s.db")
    daemon = Daemon(store, [campaign], heartbeat_s=0.2)  # bound, and not yet reading: a daemon starting
    # an answer the daemon never acknowledged, offered again at each registration
    kept = Outbox(tmp_path / "early.outbox")
    kept.put(999, protocol.encode(protocol.ResultMessage(trial_id=999, run_uid="r999", values={"y": 1.0})))
    kept.close()
    caplog.set_level(logging.INFO)
    with station(daemon.endpoint, "early", tmp_path) as worker:
        time.sleep(0.7)  # the station repeats its unanswered hello every 0.2 s meanwhile: 4 hellos wait
        with serving(daemon):
            wait_for(lambda: store.counts(store.campaign_row("early").id).get("completed") == 1, 20, "the experiment")
            time.sleep(0.3)  # the answers to the repeated hellos arrive by now
    registered = [r for r in caplog.records if r.name == "closedloop.worker" and "registered" in r.getMessage()]
    offered = [r for r in caplog.records if r.name == "closedloop.daemon" and "id 999" in r.getMessage()]
    # each welcome was taken for a new registration: 4 log lines, the outbox sent 4 times
    assert len(registered) == 1 and worker.completed == 1, [r.getMessage() for r in registered]
    assert len(offered) == 1, [r.getMessage() for r in offered]


CALLED: list[dict[str, object]] = []


def record_call(**options: object) -> InstrumentBinding:
    """A target no station here drives: loading it would call it (as loading 'subprocess:call' runs a command)."""
    CALLED.append(options)
    return Branin()


def test_an_assign_for_an_instrument_the_station_does_not_drive_loads_nothing(tmp_path: Path) -> None:
    """A station started for Branin alone loaded whatever target an assign named, calling it with the assign's
    options: 'subprocess:call' with {args: 'touch FILE', shell: true} ran the command, then failed the trial."""
    CALLED.clear()
    with _registered_with_a_hand_driven_daemon(tmp_path, ["simulators.surfaces:Branin"]) as (daemon, identity, _,
                                                                                              worker):
        for trial, target in ((1, "tests.test_worker:record_call"), (2, "simulators.surfaces:Branin")):
            daemon.send_multipart([identity, protocol.encode(protocol.Assign(
                campaign="c", trial_id=trial, trial_index=trial, setpoints={"x1": 1.0, "x2": 2.0}, outputs=["y"],
                session=1, instrument=protocol.InstrumentSpec(target=target, options={"marker": 1})
                if trial == 1 else protocol.InstrumentSpec(target=target)))])
        _, failure = receive(daemon, protocol.Failure)
        assert failure.trial_id == 1 and failure.unavailable and failure.run_uid is None
        assert "drives only simulators.surfaces:Branin" in failure.error and "record_call" in failure.error
        _, result = receive(daemon, protocol.ResultMessage)  # and it goes on serving what it drives
        assert result.trial_id == 2
        assert CALLED == [] and [trial for trial, _ in worker.outbox.ran()] == [2]


def test_a_station_whose_connection_fails_stops_and_says_why(tmp_path: Path) -> None:
    """`closedloop worker --connect 127.0.0.1:5701` (no tcp://) printed the comms thread's traceback and then ran
    on for good, connected to nothing: a service that never restarts and never works."""
    import zmq

    worker = StationWorker("127.0.0.1:5701", name="typo", outbox=tmp_path / "o.db", heartbeat_s=0.2)
    thread, failed = started_catching(worker.run)
    thread.join(timeout=5)
    worker.stop()
    assert not thread.is_alive(), "the station ran on without its connection"
    assert failed and isinstance(failed[0], zmq.ZMQError) and "127.0.0.1:5701" in str(failed[0])


@pytest.mark.slow
def test_a_run_engine_that_panicked_stops_its_station_rather_than_fail_every_trial(tmp_path: Path) -> None:
    """A RunEngine interrupted by KeyboardInterrupt while its thread waits on a device cannot be recovered
    (bluesky's 'panicked' state). The station, a StationWorker run by a script in its main thread and given
    Ctrl-C, went on taking trials and failed every one with 'The RunEngine is panicked and cannot be recovered',
    dozens a second, and never stopped. It now fails the trial the panic cut off, hands back the rest and stops
    with an error saying why, for its service manager to restart it."""
    import os
    import signal
    import subprocess

    from tests.daemon.procs import campaign_yaml, default_ctrl_c, env, free_port, kill9, start_daemon, wait_for

    (tmp_path / "c.yaml").write_text(campaign_yaml("panic", 6, latency=3.0, concurrency=4, retries=0))
    (tmp_path / "station.py").write_text(
        "import sys\nfrom closedloop.worker import StationWorker\n"
        "StationWorker(sys.argv[1], name='st', outbox='st.outbox', heartbeat_s=0.3).run()\n")
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = start_daemon(tmp_path, endpoint, control)
    with (tmp_path / "st.out").open("w") as out:
        station = subprocess.Popen([sys.executable, "station.py", endpoint], cwd=tmp_path, stdout=out,
                                   stderr=subprocess.STDOUT, env=env(), preexec_fn=default_ctrl_c)
    log = tmp_path / "daemon.log"
    try:
        wait_for(lambda: log.exists() and 'state="started"' in log.read_text(), 60, "an experiment")
        time.sleep(0.5)
        os.kill(station.pid, signal.SIGINT)  # the RunEngine's thread waits 2.5 s more on the simulated motor
        returncode = station.wait(timeout=30)
    finally:
        for proc in (station, daemon):
            kill9(proc)
    output = (tmp_path / "st.out").read_text()
    assert returncode == 1, output[-3000:]
    assert "RunEngine panicked" in output.strip().splitlines()[-1], output[-3000:]
    assert log.read_text().count('state="failed"') == 1, log.read_text()[-3000:]


RELEASE_READ = threading.Event()


class BlockingRead(Signal):
    """A detector whose read blocks the RunEngine's event loop until released: a serial read with no timeout."""

    def read(self):  # noqa: ANN201 - ophyd's
        RELEASE_READ.wait(timeout=20)
        return super().read()


def blocking_read_instrument() -> InstrumentBinding:
    binding = Branin()
    binding.detectors = [*binding.detectors, BlockingRead(name="probe", value=0.0)]
    return binding


def test_a_station_whose_driver_blocks_the_run_engine_keeps_beating_through_a_cancel(tmp_path: Path) -> None:
    """RE.request_pause waits for the RunEngine's loop: called from the communication thread while a driver blocked
    that loop, the station fell silent, the daemon counted it lost and abandoned the trial it had just given it."""
    RELEASE_READ.clear()
    with _registered_with_a_hand_driven_daemon(tmp_path, ["tests.test_worker:blocking_read_instrument"]) as (
            daemon, identity, _, _):
        try:
            daemon.send_multipart([identity, protocol.encode(protocol.Assign(
                campaign="c", trial_id=1, trial_index=1, setpoints={"x1": 1.0, "x2": 2.0}, outputs=["y"], session=1,
                instrument=protocol.InstrumentSpec(target="tests.test_worker:blocking_read_instrument")))])
            receive(daemon, protocol.Started)
            time.sleep(0.3)  # the RunEngine is in the blocking read
            daemon.send_multipart([identity, protocol.encode(protocol.Cancel(trial_id=1, reason="timed out"))])
            time.sleep(0.2)
            beats, failures = 0, []
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline or (not failures and time.monotonic() < deadline + 20):
                if time.monotonic() >= deadline:
                    RELEASE_READ.set()  # the read returns: the cancel ends the run
                if not daemon.poll(100):
                    continue
                _, frame = daemon.recv_multipart()
                message = protocol.decode(frame)
                if isinstance(message, protocol.Heartbeat):  # answered, as the daemon does
                    beats += time.monotonic() < deadline
                    daemon.send_multipart([identity, protocol.encode(protocol.Heartbeat())])
                elif isinstance(message, protocol.Failure):
                    failures.append(message)
            assert beats >= 3, f"{beats} heartbeats in 1.5 s at 0.2 s while the RunEngine was blocked"
            (failure,) = failures
            assert failure.trial_id == 1 and "cancelled" in failure.error
        finally:
            RELEASE_READ.set()  # before the station is stopped: its RunEngine waits in the read


def test_another_instruments_interlock_does_not_hold_this_ones_runs(tmp_path: Path) -> None:
    """A station driving two instruments installed each one's suspenders for good: with the interlocked one's beam
    down, every run of the other was held, for as long as the beam stayed down."""

    def answer_of(trial: int, target: str) -> protocol.ResultMessage | None:
        daemon.send_multipart([identity, protocol.encode(protocol.Assign(
            campaign="c", trial_id=trial, trial_index=trial, setpoints={"x1": 1.0, "x2": 2.0}, outputs=["y"],
            session=1, instrument=protocol.InstrumentSpec(target=target)))])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if daemon.poll(100):
                message = protocol.decode(daemon.recv_multipart()[1])
                if isinstance(message, protocol.Heartbeat):  # answered, as the daemon does
                    daemon.send_multipart([identity, protocol.encode(protocol.Heartbeat())])
                elif isinstance(message, protocol.ResultMessage) and message.trial_id == trial:
                    return message
        return None

    BEAM_DOWN.put(0)
    try:
        with _registered_with_a_hand_driven_daemon(tmp_path) as (daemon, identity, _, worker):
            assert answer_of(1, "tests.test_worker:interlocked_branin") is not None
            BEAM_DOWN.put(1)  # the interlocked instrument's beam goes down: nothing to do with the other one
            assert answer_of(2, "simulators.surfaces:Branin") is not None, "the other instrument's run was held"
            assert SUSPENDER not in worker.RE.suspenders
            BEAM_DOWN.put(0)
            assert answer_of(3, "tests.test_worker:interlocked_branin") is not None
            assert SUSPENDER in worker.RE.suspenders
    finally:
        BEAM_DOWN.put(0)
