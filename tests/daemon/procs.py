"""Real processes for daemon tests: the daemon and station workers as `closedloop` subprocesses, or as threads
of the test's process (:func:`serving`, :func:`station`) on real loopback sockets."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from closedloop import protocol
from closedloop.daemon import Daemon
from closedloop.worker import StationWorker
from simulators.surfaces import branin_campaign

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "closedloop.cli"]


def campaign_yaml(name: str = "crash", experiments: int = 100, *, latency: float = 0.2, backend: str = "sobol",
                  concurrency: int = 16, retries: int = 20, timeout: float | None = None) -> str:
    execution: dict[str, object] = {"concurrency": concurrency, "retries": retries}
    if timeout:
        execution["timeout"] = timeout
    return branin_campaign(name, experiments, planner={"backend": backend, "seed": 3}, execution=execution,
                           options={"latency": latency, "seed": 1})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_daemon(cwd: Path, endpoint: str, control: str, *extra: str, log_name: str = "daemon",
                 drain_s: float = 5.0) -> subprocess.Popen:
    out = (cwd / f"{log_name}.out").open("a")
    return subprocess.Popen([*CLI, "daemon", "c.yaml", "--bind", endpoint, "--store", "s.db", "--publish", "",
                             "--control", control, "--heartbeat", "0.3", "--drain", f"{drain_s:g}", "--logfile",
                             f"{log_name}.log", *extra], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env(),
                            preexec_fn=default_ctrl_c)


@dataclass
class Lab:
    """A `closedloop daemon` on free loopback ports and its stations (by name), as :func:`lab` started them."""

    daemon: subprocess.Popen
    stations: dict[str, subprocess.Popen]
    endpoint: str
    log: Path  # the daemon's log file


@contextmanager
def lab(cwd: Path, campaign: str, *stations: str) -> Iterator[Lab]:
    """``campaign`` written to c.yaml, its daemon and a station per name started; the daemon and every station in
    ``Lab.stations`` on the way out (those added later too) killed, whatever the test left running."""
    (cwd / "c.yaml").write_text(campaign)
    endpoint, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    the_lab = Lab(start_daemon(cwd, endpoint, control), {}, endpoint, cwd / "daemon.log")
    try:
        for name in stations:
            the_lab.stations[name] = start_worker(cwd, endpoint, name)
        yield the_lab
    finally:
        for proc in (the_lab.daemon, *the_lab.stations.values()):
            kill9(proc)


def start_worker(cwd: Path, endpoint: str, name: str, *extra: str, outbox: str | None = None) -> subprocess.Popen:
    out = (cwd / f"{name}.out").open("a")
    return subprocess.Popen([*CLI, "worker", "--connect", endpoint, "--name", name, "--outbox",
                             outbox or f"{name}.outbox", "--journal", f"{name}.journal", "--heartbeat", "0.3",
                             "--logfile", f"{name}.log", *extra], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            env=env(), preexec_fn=default_ctrl_c)


def start_compute_station(cwd: Path, endpoint: str, name: str, *extra: str) -> subprocess.Popen:
    """`closedloop compute-station` of one experiment at a time on a local cluster of one worker process."""
    out = (cwd / f"{name}.out").open("a")
    return subprocess.Popen([*CLI, "compute-station", "--connect", endpoint, "--name", name, "--outbox",
                             f"{name}.outbox", "--capacity", "1", "--workers", "1", *extra], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT, env=env(), preexec_fn=default_ctrl_c)


def default_ctrl_c() -> None:
    """A child's Ctrl-C as at a terminal: a test run in the background (``nohup ... &``) ignores SIGINT, and its
    children inherit that, so a SIGINT sent to them would change nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def completed(store_path: Path) -> int:
    """Completed trials, read the way a dashboard would (read-only, while the daemon writes)."""
    return trials_in(store_path, "completed")


def trials_in(store_path: Path, status: str) -> int:
    """Trials of ``status``, read the way a dashboard would (read-only, while the daemon writes)."""
    if not store_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM trial WHERE status = ?", (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ran(outbox: Path) -> list[tuple[int, str]]:
    """The station's own record of the runs it measured (written with its outbox entry)."""
    with sqlite3.connect(outbox) as db:
        return list(db.execute("SELECT trial_id, run_uid FROM ran"))


def sigterm_mid_run(station: subprocess.Popen, output: Path, leave_within_s: float) -> None:
    """SIGTERM to ``station`` half a second into its run; it must exit 0 within ``leave_within_s``."""
    time.sleep(0.5)
    os.kill(station.pid, signal.SIGTERM)
    asked = time.monotonic()
    assert station.wait(timeout=3 * leave_within_s) == 0, output.read_text()[-3000:]
    assert time.monotonic() - asked < leave_within_s, "the station did not leave once its run was delivered"


def check_one_run_then_handed_back(cwd: Path, campaign: str, experiments: int) -> None:
    """After :func:`sigterm_mid_run` on station ``stopped`` beside station ``other`` (outboxes and the daemon's
    store and log in ``cwd``): the stopped station finished the one run it was in, nothing ran twice, every
    experiment completed, and the trial queued behind the run went back to the queue, not as a lost station's."""
    from collections import Counter

    from closedloop.store import Store

    runs = ran(cwd / "stopped.outbox") + ran(cwd / "other.outbox")
    twice = sorted(trial for trial, n in Counter(trial for trial, _ in runs).items() if n > 1)
    assert not twice, f"trials run twice: {twice}"
    assert len(ran(cwd / "stopped.outbox")) == 1, "the stopping station ran more than the run it was in"
    store = Store(cwd / "s.db")
    try:
        trials = store.trials(store.campaign_row(campaign).id)
        assert Counter(t.status for t in trials) == {"completed": experiments}
        assert {(o.trial_id, o.run_uid) for o in store.observations(trials[0].campaign_id).values()} == set(runs)
    finally:
        store.close()
    log = (cwd / "daemon.log").read_text()
    assert 'state="requeued" reason="station does not hold it"' in log
    assert 'reason="station stopped lost"' not in log


def receive(router: zmq.Socket, kind: type, limit_s: float = 30.0, *, refuse_heartbeats: bool = False) -> tuple[bytes, Any]:
    """The next message of ``kind`` from a station, read on a ROUTER socket standing in for the daemon.

    Other messages are skipped; with ``refuse_heartbeats`` a heartbeat is answered "unregistered", as a
    restarted daemon does, so that the station registers again at once.
    """
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if router.poll(100):
            identity, frame = router.recv_multipart()
            message = protocol.decode(frame)
            if isinstance(message, kind):
                return identity, message
            if refuse_heartbeats and isinstance(message, protocol.Heartbeat):
                router.send_multipart([identity, protocol.encode(protocol.Refused(reason="unregistered: send hello"))])
    raise AssertionError(f"no {kind.__name__} within {limit_s} s")


def started_catching(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """``target`` running in a started thread, and the list that will hold what ended it, if it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - the caller asserts what ended it
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


@contextmanager
def serving(daemon: Daemon) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=daemon.serve, name="test-daemon", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        daemon.request_stop("test over")
        thread.join(timeout=30)
        daemon.close()


@contextmanager
def station(endpoint: str, name: str, tmp_path: Path, **kw: object) -> Iterator[StationWorker]:
    worker = StationWorker(endpoint, name=name, outbox=tmp_path / f"{name}.outbox", heartbeat_s=0.2, **kw)  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=15)
