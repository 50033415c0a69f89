"""A station worker: receives trials from the daemon, runs each as a Bluesky run, sends results back.

Threads: the RunEngine runs in the thread that calls :meth:`StationWorker.run` (the process's main
thread for ``closedloop worker``); a communication thread owns the DEALER socket (ZeroMQ sockets
belong to one thread), heartbeats, and keeps every unacknowledged result in a local SQLite outbox
that is re-sent after (re)registering, so a result measured is never lost. A ``cancel`` (timeout,
operator) reaches the RunEngine from the communication thread as ``RE.request_pause(defer=False)``;
the RunEngine thread then aborts the run and reports the failure.

Registration is a session: after sending ``hello`` the station ignores assignments until the
``welcome`` and any assignment of another session, because the daemon re-queues whatever a
re-registering station does not list as held.

Each accepted assignment is a job, and a ``cancel`` ends the job the station holds when it arrives, not
the trial: the daemon may give the same trial to this station again (a retry after a timeout, a trial
re-queued while the station was out of touch), and that new assignment runs. Started, result and failure
messages name the assignment they answer, so the failure of an aborted earlier attempt is not taken for
the new one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from bluesky import RunEngine
from bluesky.utils import RequestAbort, RunEngineInterrupted

from closedloop import protocol
from closedloop.errors import ClosedLoopError, DeviceError, InstrumentUnavailable, ProtocolError
from closedloop.keys import ClientKeys
from drivers.binding import InstrumentBinding, load_binding
from drivers.documents import DocumentCollector
from drivers.plans import experiment_plan
from drivers.readout import failure_reason, outputs_from_events

log = logging.getLogger("closedloop.worker")


# runs kept in the outbox's ``ran`` record, the latest: it had one row per run for as long as the station lived
# (about 60 bytes each, never read by the station itself); a full record is ``--journal``'s to keep
RAN_KEPT = 100_000


def why_unheard(keys: ClientKeys | None, name: str) -> str:
    """What may keep a station from hearing a running daemon, for its log: ZeroMQ says nothing of either cause."""
    # the daemon ignores a connection under a name another process holds; with keys, a wrong --server-key fails
    # the CURVE handshake, and so does a station without keys at a daemon that has them
    keyed = ("the --server-key may not be the daemon's public key, this station's key may not be in its "
             "--allowed-keys, or " if keys is not None else
             "the daemon may require keys (run with --secret-key and --allowed-keys, it hears no station without "
             "them: give this station --secret-key and --server-key, docs/daemon.md), ")
    return (f"if it is running, {keyed}another process may be connected as station {name!r}, or the daemon may be of "
            "an earlier closedloop release, which drops this station's hello (its log says why): upgrade the daemon "
            "before its stations")


class Registration:
    """A station's registration with its daemon, as its welcomes tell it; shared by the station worker and the
    compute station, each logging to its own logger (the one its terminal shows).

    ``session`` is the daemon's session this station is in (None: not registered). :meth:`welcome` takes a
    ``welcome`` into the session it is already in for the answer to a repeat of its hello, and ignores it. A
    station repeats an unanswered hello each heartbeat; while a daemon starts they pile up, and it welcomes each
    into the session it opened for the first: taken as new, each logged 'registered' and had the whole outbox
    sent again. :meth:`unheard` says a silence of the daemon once, not at each reconnect (a daemon down overnight
    filled the station's terminal and log with a line every few heartbeats); the next 'registered' says how long
    it lasted.
    """

    def __init__(self, logger: logging.Logger, endpoint: str, keys: ClientKeys | None, name: str):
        self.log, self.endpoint, self.keys, self.name = logger, endpoint, keys, name
        self.session: int | None = None
        self._unheard_since: float | None = None  # when the daemon was last heard, while this station says it is not

    def welcome(self, message: protocol.Welcome, leaving: bool = False) -> bool:
        """True (and logged) if ``message`` registers this station; False for a welcome into its current session.
        ``leaving``: the welcome of a stopping station's hello (what it no longer holds), no news to its operator."""
        if message.session == self.session:
            return False
        self.session = message.session
        silence = "" if self._unheard_since is None else \
            f" after {time.monotonic() - self._unheard_since:.0f} s without word from it"
        self._unheard_since = None
        self.log.log(logging.DEBUG if leaving else logging.INFO, "registered with %s (session %d)%s", self.endpoint,
                     message.session, silence)
        return True

    def unheard(self, last_heard: float, now: float, doing: str = "reconnecting until it answers") -> None:
        """The daemon, last heard at ``last_heard`` (monotonic), is silent; ``doing``: what the station does about it."""
        if self._unheard_since is None:
            self._unheard_since = last_heard
            self.log.warning("no word from the daemon at %s for %.1f s; %s (%s)", self.endpoint, now - last_heard,
                             doing, why_unheard(self.keys, self.name))
        else:
            self.log.debug("still no word from the daemon at %s; %s", self.endpoint, doing)


class Departure:
    """A stopping station's way out. It tells the daemon once that it is leaving (:meth:`announce`), then leaves
    when it runs nothing and the daemon has acknowledged every answer, or ``ACK_WAIT_BEATS`` heartbeats after it
    fell idle (what is still unacknowledged stays in the outbox, offered again at the next start)."""

    ACK_WAIT_BEATS = 5

    def __init__(self) -> None:
        self._announced = False
        self._idle_since: float | None = None

    def announce(self) -> bool:
        """True the first time it is asked: the moment to tell the daemon."""
        first, self._announced = not self._announced, True
        return first

    def may_leave(self, idle: bool, outbox: Outbox, heartbeat_s: float, heard: bool = True) -> bool:
        """``heard``: whether the daemon has answered what the station last told it (the hello that hands back
        a run cut short by :meth:`StationWorker.abort`)."""
        if not idle:
            return False
        self._idle_since = self._idle_since or time.monotonic()
        return ((heard and not outbox.pending())
                or time.monotonic() - self._idle_since > self.ACK_WAIT_BEATS * heartbeat_s)


def _locked(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite gave up waiting for another connection's lock (after the connection's timeout)."""
    return "locked" in str(exc) or "busy" in str(exc)


class Outbox:
    """Results and failures not yet acknowledged by the daemon, on disk (SQLite, synchronous commits)."""

    def __init__(self, path: str | Path, ran_kept: int = RAN_KEPT, station: str | None = None):
        """``station``: the name of the station that opens it, which it is kept for (see :meth:`_keep_for`)."""
        self.path = Path(path)
        if self.path.is_dir():
            raise ClosedLoopError(f"the outbox {path} is a folder: name a file, a new one or this station's outbox")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a short wait for another program's lock, retried by put() with self._lock let go in between: held for
        # SQLite's 5 s at a time, it starved the comms thread of the outbox, the heartbeats stopped, and the daemon
        # took the station for lost
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=0.5)
        try:
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ClosedLoopError(f"the outbox {path} is not a station's outbox: {exc}") from None
        if foreign := sorted(tables - {"outbox", "ran", "station"}):
            # a daemon's store given as the outbox had the station's tables written into it
            self._db.close()
            raise ClosedLoopError(f"the outbox {path} is another database (it holds the tables "
                                  f"{', '.join(foreign[:5])}): name a new file or this station's outbox")
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of this process (kill -9); only an OS crash or power
        # loss can lose the last ones, which the daemon then times out and retries like a lost station
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (trial_id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        # the station's own record of the runs it measured (the latest ran_kept), written with the outbox entry
        self._db.execute("CREATE TABLE IF NOT EXISTS ran (trial_id INTEGER NOT NULL, run_uid TEXT, at REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS station (name TEXT NOT NULL)")
        self._ran_kept = ran_kept
        self._lock = threading.Lock()
        if station is not None:
            self._keep_for(station)

    def _keep_for(self, station: str) -> None:
        """Record ``station`` as the outbox's owner, refusing it while another station's answers wait here.

        The daemon takes an answer only from the station it gave the trial to: a replacement started under another
        name on a killed station's outbox had its measured result dropped, and the trial, once its station was
        given up, was measured again elsewhere. An outbox with nothing waiting changes hands freely."""
        if self._db.execute("SELECT name FROM station").fetchone() == (station,):
            return  # its own, as at every restart: nothing to write (another program's lock on it waits for put)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            owner = self._db.execute("SELECT name FROM station").fetchone()
            waiting = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            if owner is not None and owner[0] != station and waiting:
                self._db.execute("ROLLBACK")
                self._db.close()
                raise ClosedLoopError(
                    f"the outbox {self.path} holds {waiting} answer{'s' * (waiting != 1)} of station {owner[0]!r} "
                    f"not yet delivered, which only that station can deliver: start it as --name {owner[0]} to "
                    f"deliver {'them' if waiting != 1 else 'it'}, or give station {station!r} an outbox of its own")
            self._db.execute("DELETE FROM station")
            self._db.execute("INSERT INTO station VALUES (?)", (station,))
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def put(self, trial_id: int, payload: bytes, run_uid: str | None = None) -> None:
        """Keep a result until acknowledged; with ``run_uid``, also record in ``ran`` that it was measured.

        Another program holding a write lock on the outbox (a sqlite3 shell after BEGIN, DB Browser with changes
        not written) is waited out, said once: the station had stopped with 'OperationalError: database is
        locked' five seconds into it, and the result it had just measured, in no outbox and never sent, was lost."""
        said = False
        while True:
            try:
                with self._lock:
                    try:
                        self._db.execute("BEGIN IMMEDIATE")
                        self._db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?)", (trial_id, payload))
                        if run_uid is not None:
                            self._db.execute("INSERT INTO ran VALUES (?, ?, ?)", (trial_id, run_uid, time.time()))
                            # rowids grow with each insert: older than the latest ran_kept goes (a seek when nothing
                            # does)
                            self._db.execute("DELETE FROM ran WHERE rowid <= (SELECT max(rowid) FROM ran) - ?",
                                             (self._ran_kept,))
                        self._db.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:
                            self._db.execute("ROLLBACK")
                        raise
                if said:
                    log.warning("the outbox %s could be written again: the answer of trial %s is kept", self.path,
                                trial_id)
                return
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    raise
                if not said:
                    log.error("the outbox %s is locked by another program (a sqlite3 shell or DB Browser with a "
                              "transaction open?): the answer of trial %s waits here, unsent, until it is released; "
                              "end that transaction", self.path, trial_id)
                    said = True
                time.sleep(0.1)  # the comms thread's turn at the outbox: its heartbeats go on

    def ran(self) -> list[tuple[int, str]]:
        """(trial id, run uid) of the runs this outbox's station measured, the latest ``RAN_KEPT``."""
        with self._lock:
            return list(self._db.execute("SELECT trial_id, run_uid FROM ran ORDER BY at"))

    def result(self, trial_id: int) -> bytes | None:
        """The trial's measured result, if it is here: sent again, never measured twice. A failure kept here is
        an earlier attempt's, which a new assignment of the trial is to retry."""
        with self._lock:
            row = self._db.execute("SELECT payload FROM outbox WHERE trial_id = ?", (trial_id,)).fetchone()
        return row[0] if row and _is_result(row[0]) else None

    def remove(self, trial_id: int, assignment: str | None = None) -> None:
        """Forget the trial's answer, once acknowledged; with ``assignment``, only the answer to that assign."""
        with self._lock:
            row = self._db.execute("SELECT payload FROM outbox WHERE trial_id = ?", (trial_id,)).fetchone()
            if row is None or (assignment is not None and _assignment_of(row[0]) not in (None, assignment)):
                return
            try:
                self._db.execute("DELETE FROM outbox WHERE trial_id = ?", (trial_id,))
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    raise
                # kept: sent again at the next registration, and acknowledged again (the daemon ignores a
                # duplicate); waiting here would hold the heartbeats up, raising stopped the station
                log.warning("the outbox %s is locked by another program: trial %s's acknowledged answer stays in it "
                            "for now", self.path, trial_id)

    def pending(self) -> list[tuple[int, bytes]]:
        with self._lock:
            return list(self._db.execute("SELECT trial_id, payload FROM outbox ORDER BY trial_id"))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _StationSocket(zmq.Socket):  # type: ignore[type-arg]
    """A DEALER whose sends never block: a message that cannot be queued is dropped.

    A station whose key the daemon's --allowed-keys does not hold has its connection closed after the handshake,
    and a DEALER with no connection blocks every send: the station hung in its first heartbeat, silent, and never
    said why. Nothing is lost by dropping: results and failures wait in the outbox, offered again at the next
    welcome, and hellos and heartbeats are sent again each heartbeat; the station notices the daemon's silence,
    reconnects and says what may be wrong."""

    def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False, **kwargs: Any) -> Any:
        try:
            return super().send(data, flags | zmq.NOBLOCK, copy=copy, track=track, **kwargs)
        except zmq.Again:
            log.debug("no connection to the daemon to send on: a message of %d bytes dropped", len(data))
            return None


def connect_station(context: zmq.Context, endpoint: str, name: str, keys: ClientKeys | None) -> zmq.Socket:
    """A station's DEALER socket to the daemon: routed by the station name, ZMTP heartbeats, quick reconnects,
    sends that never block."""
    sock = context.socket(zmq.DEALER, socket_class=_StationSocket)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.setsockopt(zmq.LINGER, 500)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.setsockopt(zmq.IPV6, protocol.wants_ipv6(endpoint))
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    return sock


def _carried(documents: DocumentCollector, outbox: Path) -> str | None:
    """A run's documents as JSON lines for its result or failure.

    Past the message's share (an image detector's events) they cannot travel: they are kept on this
    station's disk instead, beside the outbox (``OUTBOX.documents/RUN_UID.jsonl``), and the log says where.
    """
    record = documents.to_jsonl()
    if len(record) <= protocol.MAX_MESSAGE_BYTES // 2:
        return record or None
    uid = (documents.start or {}).get("uid", "unknown")
    kept = outbox.with_name(outbox.name + ".documents") / f"{uid}.jsonl"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(record)
    log.warning("run %s: its documents (%d bytes) are more than a message carries (%d); kept on this station at %s",
                uid, len(record), protocol.MAX_MESSAGE_BYTES // 2, kept)
    return None


def _is_result(payload: bytes) -> bool:
    try:
        return isinstance(protocol.decode(payload), protocol.ResultMessage)
    except ProtocolError:
        return False


def _assignment_of(payload: bytes) -> str | None:
    try:
        return getattr(protocol.decode(payload), "assignment", None)
    except ProtocolError:
        return None


def named(assignment: protocol.Assign) -> str:
    """A trial as its station's operator knows it: its number in the campaign (as ``closedloop status`` and
    ``explain`` show it), and the protocol's trial id where the two differ (campaigns sharing a store)."""
    same = assignment.trial_index == assignment.trial_id
    return f"trial {assignment.trial_index} of {assignment.campaign}" + ("" if same else f" (id {assignment.trial_id})")


def finished(assignment: protocol.Assign, result: protocol.ResultMessage) -> str:
    """The line a station logs for an experiment that returned: trial, duration, values and run uid."""
    values = ", ".join(f"{name}={value:.6g}" for name, value in result.values.items())[:300]
    return f"{named(assignment)} finished in {result.duration_s or 0.0:.1f} s: {values} (run {result.run_uid})"


def asked_abort_said_once(record: logging.LogRecord) -> bool:
    """A filter for the ``bluesky`` logger. bluesky logs every aborted run at ERROR with a traceback ('Run aborted',
    RequestAbort, or the task's CancelledError) and a warning that it had no tracing span left to close: on a
    station's terminal a dozen lines for an abort it asked for itself (a cancel, a timeout, a second Ctrl-C), which
    its own line already says. A run that fails (a device's fault) keeps its traceback."""
    if record.getMessage() == "No open traces left to close!":
        return False
    asked = record.exc_info is not None and isinstance(record.exc_info[1], (RequestAbort, asyncio.CancelledError))
    return not (asked and record.getMessage() == "Run aborted")


def default_station_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Job:
    """One assignment this station accepted: queued or running, until it is measured or cancelled.

    ``id`` is the assignment its messages answer: the assign's message id, or that of a later assign of
    the same trial, which the daemon may send while this job runs and then waits on.
    """

    assignment: protocol.Assign
    cancelled: bool = False
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or self.assignment.msg_id

    @property
    def trial_id(self) -> int:
        return self.assignment.trial_id


class StationWorker:
    """Runs trials sent by a daemon on this station's instruments.

    Args:
        connect: the daemon's ROUTER endpoint, e.g. ``tcp://127.0.0.1:5701``.
        name: station name (ZeroMQ routing id); unique among the daemon's stations; with keys
            by default theirs (``NAME.key_secret``), the only name the daemon admits them under.
        instruments: import paths of instruments this station may drive; ``["*"]`` accepts any.
        campaigns: names of campaigns this station serves; ``["*"]`` serves any.
        sources: names of the campaign sources this station serves (a campaign with ``sources``);
            ``["*"]`` serves any.
        outbox: path of the SQLite outbox of unacknowledged results.
        keys: CURVE keys (this station's pair and the daemon's public key); None for plain loopback.
        journal: optional file to which the id and run uid of every trial measured here is appended
            (the station's own evidence of what it ran).

    Example:
        >>> StationWorker("tcp://127.0.0.1:5701", name="station-a").run()  # doctest: +SKIP
    """

    def __init__(
        self,
        connect: str,
        *,
        name: str | None = None,
        instruments: list[str] | None = None,
        campaigns: list[str] | None = None,
        sources: list[str] | None = None,
        outbox: str | Path | None = None,
        keys: ClientKeys | None = None,
        journal: str | Path | None = None,
        heartbeat_s: float = 1.0,
        context: zmq.Context | None = None,
    ):
        self.endpoint = connect
        self.name = name or (keys.name if keys is not None else default_station_name())
        if (problem := protocol.station_name_problem(self.name)) is not None:
            raise ClosedLoopError(problem)  # before anything starts: the daemon drops such a hello
        self.instruments = instruments or ["*"]
        self.campaigns = campaigns or ["*"]
        self.sources = sources or ["*"]
        self.outbox = Outbox(outbox or Path.home() / ".closedloop" / f"outbox-{self.name}.db", station=self.name)
        self.keys = keys
        self.journal = Path(journal) if journal else None
        self.heartbeat_s = heartbeat_s
        self.context = context or zmq.Context.instance()
        self.assignments: queue.Queue[Job] = queue.Queue()
        self._outgoing: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        self._idle = threading.Event()  # the RunEngine thread will run nothing more
        self.aborted = False  # abort() was called: the run in progress is cut short, not finished
        self._cut_short = threading.Event()  # abort() ended a run, whose trial this station no longer holds
        self._jobs: dict[int, Job] = {}  # by trial: the latest accepted, not yet measured (queued or running)
        self._jobs_lock = threading.Lock()  # the comms thread adds jobs while the RunEngine thread ends them
        self._instance = uuid.uuid4().hex  # this process, in its hellos
        self._welcomed = 0
        self._running: int | None = None
        self._resumed = threading.Event()  # cleared while an operator holds the RunEngine paused
        self._resumed.set()
        self._bindings: dict[str, InstrumentBinding] = {}
        self.finished: set[str] = set()  # campaigns this station names that the daemon says have finished
        self.RE: RunEngine | None = None
        self.registered = threading.Event()
        self.refused: str | None = None
        self.completed = 0
        # the RunEngine thread rings this after queueing a message, so the comms thread sends it now
        # rather than at the end of its poll timeout
        self._wake_address = f"inproc://closedloop-station-wake-{id(self)}"
        self._wake_push: zmq.Socket | None = None

    def _post(self, payload: bytes) -> None:
        """Queue a message for the daemon (RunEngine thread) and wake the comms thread."""
        self._outgoing.put(payload)
        if self._wake_push is None:
            self._wake_push = self.context.socket(zmq.PUSH)
            self._wake_push.setsockopt(zmq.LINGER, 0)
            self._wake_push.setsockopt(zmq.SNDHWM, 1)
            self._wake_push.connect(self._wake_address)
        try:
            self._wake_push.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Start nothing more: the run in progress finishes and its answer is delivered before :meth:`run` returns."""
        self._stop.set()

    def abort(self) -> None:
        """Stop now (a second Ctrl-C): the run in progress is aborted, and its trial goes back to the daemon's
        queue as never run, neither failed nor measured; :meth:`run` returns once the daemon has heard that, or
        five heartbeats later. Safe in a signal handler of the thread that runs the RunEngine."""
        self.aborted = True
        with self._jobs_lock:
            self._stop.set()
            job = self._jobs.get(self._running) if self._running is not None else None
            if job is None:
                return
            job.cancelled = True  # one not yet begun does not begin
        if self.RE is not None and self.RE.state != "idle":
            # bluesky prints "Aborting: running cleanup..." to stdout; the station's own line says it once
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    self.RE.abort(reason="the station was stopped at once (abort)")
                except Exception as exc:  # the run ended meanwhile: its answer is delivered as usual
                    log.debug("abort: %s", exc)

    @property
    def paused(self) -> bool:
        """Whether an operator's pause holds this station (its next trial waits for the resume)."""
        return not self._resumed.is_set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve trials until ``stop`` (or :meth:`stop`) is set. Blocks; runs the RunEngine here."""
        if stop is not None:
            self._stop = stop
        self.RE = RunEngine({}, context_managers=[])
        bluesky_log = logging.getLogger("bluesky")
        if asked_abort_said_once not in bluesky_log.filters:
            bluesky_log.addFilter(asked_abort_said_once)
        failed: list[Exception] = []
        comms = threading.Thread(target=self._communicate_or_stop, args=(failed,), name=f"closedloop-comms-{self.name}",
                                 daemon=True)
        comms.start()
        try:
            while not self._stop.is_set():
                try:
                    job = self.assignments.get(timeout=0.05)
                except queue.Empty:
                    continue
                while not self._resumed.wait(timeout=0.05) and not self._stop.is_set():
                    pass  # an operator paused the campaign: trials already handed to this station wait too
                try:
                    self._execute(job)
                finally:
                    self._forget(job)
                if self.RE.state == "panicked":
                    # every later trial would fail at once ("The RunEngine is panicked and cannot be recovered"),
                    # dozens a second, for as long as the station lived: it stops, for its service manager to
                    # restart it with a new RunEngine (and devices in a known state)
                    failed.append(DeviceError(
                        f"the RunEngine panicked during trial {job.trial_id} (a KeyboardInterrupt while it waited on "
                        "a device) and cannot run another experiment: this station stopped; start it again"))
                    log.error("%s", failed[-1])
                    break
        finally:
            self._stop.set()
            self._idle.set()
            # the comms thread delivers the last run's answer, waiting up to five heartbeats for its ack
            comms.join(timeout=5 * self.heartbeat_s + 5)
            if self._wake_push is not None:
                self._wake_push.close(linger=0)
            self.outbox.close()
        if failed:
            raise failed[0]

    # -- experiments ------------------------------------------------------------------------

    def _binding(self, spec: protocol.InstrumentSpec) -> InstrumentBinding:
        if "*" not in self.instruments and spec.target not in self.instruments:
            # loading a target calls it: an assign naming 'subprocess:call' ran a shell command on a station started
            # with --instrument simulators.surfaces:Branin. Nothing is loaded, so nothing ran
            raise InstrumentUnavailable(f"this station drives only {', '.join(self.instruments)}, not {spec.target!r}")
        key = json.dumps([spec.target, spec.options], sort_keys=True, default=str)
        if key not in self._bindings:
            self._bindings[key] = load_binding(spec.target, spec.options)
        binding = self._bindings[key]
        assert self.RE is not None
        # interlocks declared by the instrument pause the RunEngine without the loop's involvement; only this
        # instrument's: installed for good, another instrument's door held every run of this one while it was open
        own = list(getattr(binding, "suspenders", None) or [])
        for other in self._bindings.values():
            for suspender in getattr(other, "suspenders", None) or []:
                if other is not binding and suspender not in own:
                    self.RE.remove_suspender(suspender)
        for suspender in own:
            if suspender not in getattr(self.RE, "suspenders", ()):
                self.RE.install_suspender(suspender)
        return binding

    def _forget(self, job: Job) -> None:
        """The job is over: a later assignment of its trial is a new job. Called before its answer is sent,
        because the daemon may answer that with the next assignment of the same trial."""
        with self._jobs_lock:
            if self._jobs.get(job.trial_id) is job:
                del self._jobs[job.trial_id]

    def _execute(self, job: Job) -> None:
        assignment, trial = job.assignment, job.trial_id
        stored = self.outbox.result(trial)
        if stored is not None:  # already measured (the trial came back after a reconnect): never a second run
            self._forget(job)
            self._post(stored)
            return
        with self._jobs_lock:
            # atomic with the holdings a stopping station reports: a trial it has said it does not hold, which the
            # daemon then gives to another station, must not start here after all
            if job.cancelled or self._stop.is_set():
                log.info("trial %s %s before it started", trial, "cancelled" if job.cancelled else "not run: stopping")
                return
            self._running = trial
        started, started_at = time.monotonic(), time.time()
        documents = DocumentCollector()
        try:
            # connecting the instrument (a first trial: EPICS devices may take many seconds) is no part of the
            # experiment: announced before it, its time counted against the campaign's timeout, which failed a
            # trial that had not yet opened a run as "timed out"
            binding = self._binding(assignment.instrument)
            self._post(protocol.encode(protocol.Started(trial_id=trial, assignment=job.id)))
            started, started_at = time.monotonic(), time.time()
            log.info("%s started", named(assignment))
            message: protocol.ResultMessage | protocol.Failure = self._measure(job, binding, documents, started,
                                                                              started_at)
        except Exception as exc:  # every failure is reported with its error, never swallowed
            # the run it opened, if it got that far, so the store can point at what the hardware did
            opened = next(iter(documents.run_uids), None)
            if self.aborted and job.cancelled:
                # cut short by abort(): no failure of the experiment, so none is reported (that would count an
                # attempt, and with no retries abandon it); the comms thread tells the daemon this station no
                # longer holds it, and the daemon queues it again
                self._running = None
                self._forget(job)
                self._cut_short.set()
                log.warning("%s cut short after %.1f s (run %s aborted): it goes back to the daemon's queue, to be run "
                            "again; this station stops", named(assignment), time.monotonic() - started,
                            opened or "not opened")
                return
            # bluesky wraps a device's fault as FailedStatus(DeviceStatus(...)), which names no cause
            error = failure_reason(exc)
            log.warning("%s failed after %.1f s (run %s): %s", named(assignment), time.monotonic() - started,
                        opened or "not opened", error)
            # and its documents: a failure is when a scientist most needs to see what the hardware did
            message = protocol.Failure(trial_id=trial, assignment=job.id, error=error,
                                       run_uid=str(opened) if opened else None, duration_s=time.monotonic() - started,
                                       documents=_carried(documents, self.outbox.path) if opened else None,
                                       unavailable=isinstance(exc, InstrumentUnavailable) and not opened)
        if isinstance(message, protocol.ResultMessage):
            log.info("%s", finished(assignment, message))
        payload = protocol.encode(message)
        run_uid = message.run_uid if isinstance(message, protocol.ResultMessage) else None
        self.outbox.put(trial, payload, run_uid)  # persisted before it is sent: survives a crash from here on
        self._running = None
        self._forget(job)
        if self.journal is not None and isinstance(message, protocol.ResultMessage):
            with self.journal.open("a") as journal:
                journal.write(f"{trial} {message.run_uid}\n")
        self._post(payload)
        self.completed += 1

    def _measure(self, job: Job, binding: InstrumentBinding, documents: DocumentCollector, started: float,
                 started_at: float) -> protocol.ResultMessage | protocol.Failure:
        assignment = job.assignment
        binding.check_limits(assignment.setpoints)
        md = {
            "campaign": assignment.campaign,
            "trial_id": assignment.trial_id,
            "trial_index": assignment.trial_index,
            "station": self.name,
            "planner": assignment.metadata,
        }

        assert self.RE is not None
        if job.cancelled:
            raise DeviceError(f"trial {assignment.trial_id} cancelled")
        try:
            uids = self.RE(experiment_plan(binding, assignment.setpoints, md), documents)
        except RunEngineInterrupted:
            if self.RE.state == "panicked":
                raise DeviceError("the RunEngine panicked: a KeyboardInterrupt came while it waited on a device, and "
                                  "the run was cut off where it stood") from None
            uids = self._interrupted(job)
        if not uids:
            raise DeviceError("the plan opened no run")
        if len(documents.run_uids) > 1:
            # one trial is one run: the store keeps one run's documents per trial, and a result read from the
            # last run alone would hide what the others measured
            raise DeviceError(f"the plan opened {len(documents.run_uids)} runs; a trial's plan must open exactly one")
        stop = documents.stop
        if stop is not None and stop.get("exit_status") != "success":
            raise DeviceError(f"run ended with {stop.get('exit_status')}: {stop.get('reason')}")
        values, noise = outputs_from_events(binding, documents.events(), assignment.outputs)
        return protocol.ResultMessage(
            trial_id=assignment.trial_id, assignment=job.id, run_uid=str(uids[-1]), values=values, noise=noise,
            duration_s=time.monotonic() - started, started_at=started_at, finished_at=time.time(),
            documents=_carried(documents, self.outbox.path),
        )

    def _interrupted(self, job: Job) -> Any:
        """The RunEngine paused mid-run: wait for the operator's resume, or end the run on a cancel."""
        assert self.RE is not None
        while True:
            while not self._resumed.wait(timeout=0.1):
                if job.cancelled or self._stop.is_set():
                    break
            if job.cancelled or self._stop.is_set():
                if self.RE.state != "idle":  # not ended already by abort()
                    self.RE.abort(reason="cancelled")
                raise DeviceError(f"trial {job.trial_id} cancelled")
            log.info("trial %s: resuming the RunEngine", job.trial_id)
            try:
                return self.RE.resume()
            except RunEngineInterrupted:
                continue  # paused again before the run ended

    def _control(self, action: str) -> None:
        """Operator pause/resume from the daemon (communication thread)."""
        if action == "pause":
            self._resumed.clear()
            if self._running is not None and self.RE is not None and self.RE.state == "running":
                log.info("pausing the RunEngine at its next checkpoint (trial %s)", self._running)
                self._request_pause(defer=True, what="pause")
        else:
            self._resumed.set()

    def _campaign_finished(self, campaign: str) -> None:
        """Say once that a campaign this station serves has finished, and when it was the last, that nothing is left.

        The station stays connected rather than exit: under a service manager that restarts it (the worker unit's
        ``Restart=always``) an exit would come back every few seconds to be told the same.
        """
        if campaign in self.finished:
            return
        self.finished.add(campaign)
        if "*" not in self.campaigns and set(self.campaigns) <= self.finished:
            log.warning("campaign %s has finished, and with it every campaign this station serves (%s): it has nothing"
                        " more to run and waits idle; stop it, or restart it with --campaign naming the next one",
                        campaign, ", ".join(self.campaigns))
        else:
            log.info("campaign %s has finished: this station gets none of its trials now", campaign)

    def _cancel(self, trial_id: int, reason: str) -> None:
        job = self._jobs.get(trial_id)
        if job is None or job.cancelled:
            return  # nothing held, or already ending: an assignment that follows this cancel is a new job
        job.cancelled = True
        if self._running == trial_id and self.RE is not None:
            log.warning("cancelling running %s: %s", named(job.assignment), reason)
            self._request_pause(defer=False, what=f"cancel of trial {trial_id}")

    def _hand_back(self, trial_id: int, reason: str) -> None:
        """Drop a queued trial the daemon takes back (it is stopping), unless its run has begun: a run in progress
        finishes and is delivered. The next holdings sent tell the daemon which it was."""
        with self._jobs_lock:
            # under the lock _execute decides to start a job: a trial is either started here or never starts
            job = self._jobs.get(trial_id)
            if job is None or job.cancelled:
                return
            if self._running == trial_id:
                log.info("%s is already running: it finishes here (%s)", named(job.assignment), reason)
                return
            job.cancelled = True
        log.info("%s handed back unstarted: %s", named(job.assignment), reason)

    def _request_pause(self, *, defer: bool, what: str) -> None:
        """Ask the RunEngine to pause, without waiting for its event loop to take the request.

        ``RE.request_pause`` blocks its caller until the RunEngine's loop runs it; a driver blocking that loop (a
        serial read without a timeout) then held the communication thread too: the station sent no heartbeat, the
        daemon counted it lost and abandoned the trial it had just been given.
        """
        engine = self.RE
        assert engine is not None

        def ask() -> None:
            try:
                engine.request_pause(defer=defer)
            except Exception as exc:  # the run ended meanwhile: nothing to pause or stop
                log.info("%s: %s", what, exc)

        threading.Thread(target=ask, name=f"closedloop-pause-{self.name}", daemon=True).start()

    # -- communication (owns the socket) ------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        return connect_station(self.context, self.endpoint, self.name, self.keys)

    def _holdings(self) -> list[int]:
        """Trials this station holds: queued, running, or answered and not yet acknowledged.

        A stopping station holds no queued trial: it will not run them, and the daemon re-queues what a station
        does not hold, for the others, instead of losing them with this one.
        """
        with self._jobs_lock:
            leaving = self._stop.is_set()
            outstanding = {trial for trial, job in list(self._jobs.items()) if not job.cancelled and not leaving}
            if self._running is not None:
                outstanding.add(self._running)
        outstanding |= {trial for trial, _ in self.outbox.pending()}
        return sorted(outstanding)

    def _hello(self) -> bytes:
        return protocol.encode(protocol.Hello(station=self.name, instruments=self.instruments,
                                              # a stopping station serves nothing: the daemon sends it no more
                                              campaigns=[] if self._stop.is_set() else self.campaigns,
                                              sources=self.sources,
                                              outstanding=self._holdings(),
                                              software=f"closedloop-worker/{protocol.PROTOCOL_VERSION}",
                                              instance=self._instance, welcomed=self._welcomed))

    def _communicate_or_stop(self, failed: list[Exception]) -> None:
        try:
            self._communicate()
        except Exception as exc:
            # the station ran on for good with nobody to hear from or tell (an endpoint without tcp://): it stops,
            # and run() raises the reason
            log.error("the connection to the daemon at %s failed: %s: %s", self.endpoint, type(exc).__name__, exc)
            failed.append(exc)
            self._stop.set()

    def _communicate(self) -> None:
        wake = self.context.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.bind(self._wake_address)
        sock = self._connect()
        self._registration = Registration(log, self.endpoint, self.keys, self.name)
        self._seen: str | None = None  # the daemon's last heartbeat read here
        sock.send(self._hello())
        last_sent = last_heard = last_turn = time.monotonic()
        # a stop lets the run in progress finish: this thread beats on (a silent station is lost, and its trial
        # run again elsewhere while the run here goes on) until that run's answer is acknowledged
        departure = Departure()
        told_cut = False  # the daemon was told that this station no longer holds the run abort() cut short
        try:
            while True:
                if self._stop.is_set():
                    if self.refused is not None:
                        break
                    # say so now: what is queued here goes to other stations
                    if departure.announce():
                        log.info("stopping: nothing more starts here; %s", "the run in progress finishes and its "
                                 "answer is delivered first" if self._running is not None else "no run in progress")
                        if self._registration.session is not None:
                            self._registration.session = None
                            self.registered.clear()
                            sock.send(self._hello())
                    if self._cut_short.is_set() and not told_cut and self._registration.session is not None:
                        # after the departure's hello is welcomed: one sent before would be taken for a repeat of it
                        told_cut = True
                        self._registration.session = None
                        self.registered.clear()
                        sock.send(self._hello())
                    heard = not self._cut_short.is_set() or (told_cut and self._registration.session is not None)
                    if departure.may_leave(self._idle.is_set(), self.outbox, self.heartbeat_s, heard):
                        break
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLIN)
                poller.register(wake, zmq.POLLIN)
                ready = dict(poller.poll(100))
                if wake in ready:
                    while True:
                        try:
                            wake.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if sock in ready:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_heard = time.monotonic()
                        self._on_message(sock, frame)
                while True:
                    try:
                        sock.send(self._outgoing.get_nowait())
                        last_sent = time.monotonic()
                    except queue.Empty:
                        break
                now = time.monotonic()
                last_heard, last_turn = protocol.heard_allowing_for(now - last_turn, last_heard, now), now
                if now - last_sent >= self.heartbeat_s:
                    if self._registration.session is not None:
                        running = [self._running] if self._running is not None else []
                        sock.send(protocol.encode(protocol.Heartbeat(running=running, holds=self._holdings(),
                                                                     seen=self._seen)))
                    else:
                        sock.send(self._hello())
                    last_sent = now
                if now - last_heard > 5 * self.heartbeat_s:
                    self._registration.unheard(last_heard, now)  # said once a silence
                    sock.close(linger=0)
                    sock = self._connect()
                    self._registration.session = None
                    self.registered.clear()
                    sock.send(self._hello())
                    last_heard = last_sent = now
        finally:
            sock.close(linger=0)
            wake.close(linger=0)

    def _on_message(self, sock: zmq.Socket, frame: bytes) -> None:
        try:
            message = protocol.decode(frame)
        except protocol.VersionMismatch as exc:
            log.error("the daemon speaks another protocol version: %s", exc)
            self.refused = str(exc)
            self._stop.set()
            return
        except ProtocolError as exc:
            log.warning("dropped a message from the daemon: %s", exc)
            return
        if isinstance(message, protocol.Welcome):
            if not self._registration.welcome(message, leaving=self._stop.is_set()):
                return  # the answer to a repeat of our hello, in the session it registered
            # the daemon counts a station lost after a few of its heartbeat intervals: never beat slower than it asks
            self.heartbeat_s = min(self.heartbeat_s, message.heartbeat_s)
            self._welcomed += 1
            self.registered.set()
            for _, payload in self.outbox.pending():  # the daemon may have restarted: offer what it never acked
                sock.send(payload)
        elif isinstance(message, protocol.Refused):
            if message.reason.startswith("unregistered"):
                if self._registration.session is not None:
                    self._registration.session = None
                    self.registered.clear()
                    sock.send(self._hello())
                return
            log.error("the daemon refused this station: %s", message.reason)
            self.refused = message.reason
            self._stop.set()
        elif isinstance(message, protocol.Ack):
            self.outbox.remove(message.trial_id, message.assignment)
        elif isinstance(message, protocol.Assign):
            if self._registration.session is None or message.session != self._registration.session:
                # sent before the daemon saw our hello; it has re-queued the trial
                log.info("ignored trial %s from an earlier session", message.trial_id)
                return
            self.finished.discard(message.campaign)  # it goes on after all (a daemon restarted with a larger budget)
            job = Job(message)
            with self._jobs_lock:
                held = self._jobs.get(message.trial_id)
                repeat = held is not None and not held.cancelled
                if held is not None and repeat:
                    held.id = message.msg_id  # its answer answers this assign
                else:
                    self._jobs[message.trial_id] = job
            if repeat:
                # one experiment is one run, however often the daemon asks for it
                log.warning("trial %s is already queued or running here; its repeated assign is ignored",
                            message.trial_id)
                return
            self.assignments.put(job)
        elif isinstance(message, protocol.Cancel):
            if message.unstarted_only:
                self._hand_back(message.trial_id, message.reason)
            else:
                self._cancel(message.trial_id, message.reason)
        elif isinstance(message, protocol.Control):
            self._control(message.action)
        elif isinstance(message, protocol.Finished):
            self._campaign_finished(message.campaign)
        elif isinstance(message, protocol.Heartbeat):
            self._seen = message.msg_id
