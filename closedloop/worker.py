"""A station worker: receives trials from the daemon, runs each as a Bluesky run, sends results back.

Threads: the RunEngine runs in the thread that calls :meth:`StationWorker.run` (the process's main
thread for ``closedloop worker``); a communication thread owns the DEALER socket (ZeroMQ sockets
belong to one thread), sends heartbeats and keeps every unacknowledged result in a local SQLite
outbox that is re-sent after reconnecting, so a result measured is never lost.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted

from closedloop import protocol
from closedloop.errors import ClosedLoopError, DeviceError, ProtocolError
from drivers.binding import InstrumentBinding, load_binding
from drivers.plans import experiment_plan

log = logging.getLogger("closedloop.worker")


class Outbox:
    """Results and failures not yet acknowledged by the daemon, on disk."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (trial_id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        self._lock = threading.Lock()

    def put(self, trial_id: int, payload: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO outbox VALUES (?, ?)", (trial_id, payload))

    def get(self, trial_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT payload FROM outbox WHERE trial_id = ?", (trial_id,)).fetchone()
        return row[0] if row else None

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE trial_id = ?", (trial_id,))

    def pending(self) -> list[tuple[int, bytes]]:
        with self._lock:
            return list(self._db.execute("SELECT trial_id, payload FROM outbox ORDER BY trial_id"))

    def close(self) -> None:
        self._db.close()


def default_station_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StationWorker:
    """Runs trials sent by a daemon on this station's instruments.

    Args:
        connect: the daemon's ROUTER endpoint, e.g. ``tcp://127.0.0.1:5701``.
        name: station name (ZeroMQ routing id); unique among the daemon's stations.
        instruments: import paths of instruments this station may drive; ``["*"]`` accepts any.
        outbox: path of the SQLite outbox of unacknowledged results.
    """

    def __init__(
        self,
        connect: str,
        *,
        name: str | None = None,
        instruments: list[str] | None = None,
        outbox: str | Path | None = None,
        heartbeat_s: float = 1.0,
        context: zmq.Context | None = None,
    ):
        self.endpoint = connect
        self.name = name or default_station_name()
        self.instruments = instruments or ["*"]
        self.outbox = Outbox(outbox or Path.home() / ".closedloop" / f"outbox-{self.name}.db")
        self.heartbeat_s = heartbeat_s
        self.context = context or zmq.Context.instance()
        self.assignments: queue.Queue[protocol.Assign] = queue.Queue()
        self._outgoing: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        self._running: set[int] = set()
        self._cancelled: set[int] = set()
        self._bindings: dict[str, InstrumentBinding] = {}
        self.RE: RunEngine | None = None
        self.completed = 0

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve trials until ``stop`` (or :meth:`stop`) is set. Blocks; runs the RunEngine here."""
        if stop is not None:
            self._stop = stop
        self.RE = RunEngine({}, context_managers=[])
        comms = threading.Thread(target=self._communicate, name=f"closedloop-comms-{self.name}", daemon=True)
        comms.start()
        try:
            while not self._stop.is_set():
                try:
                    assignment = self.assignments.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._execute(assignment)
        finally:
            self._stop.set()
            comms.join(timeout=5)
            self.outbox.close()

    # -- experiments ------------------------------------------------------------------------

    def _binding(self, spec: protocol.InstrumentSpec) -> InstrumentBinding:
        key = json.dumps([spec.target, spec.options], sort_keys=True, default=str)
        if key not in self._bindings:
            self._bindings[key] = load_binding(spec.target, spec.options)
        return self._bindings[key]

    def _execute(self, assignment: protocol.Assign) -> None:
        trial = assignment.trial_id
        stored = self.outbox.get(trial)
        if stored is not None:  # already measured before a reconnect: send the same result, never re-run
            self._outgoing.put(stored)
            return
        if trial in self._cancelled:
            return
        self._running.add(trial)
        self._outgoing.put(protocol.encode(protocol.Started(trial_id=trial)))
        started = time.monotonic()
        try:
            message: protocol.ResultMessage | protocol.Failure = self._measure(assignment, started)
        except Exception as exc:  # every failure is reported with its error, never swallowed
            log.warning("trial %s of %s failed: %s", trial, assignment.campaign, exc)
            message = protocol.Failure(trial_id=trial, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._running.discard(trial)
        payload = protocol.encode(message)
        self.outbox.put(trial, payload)  # persisted before it is sent: survives a crash from here on
        self._outgoing.put(payload)
        self.completed += 1

    def _measure(self, assignment: protocol.Assign, started: float) -> protocol.ResultMessage | protocol.Failure:
        binding = self._binding(assignment.instrument)
        binding.check_limits(assignment.setpoints)
        md = {
            "campaign": assignment.campaign,
            "trial_id": assignment.trial_id,
            "trial_index": assignment.trial_index,
            "station": self.name,
            "planner": assignment.metadata,
        }
        events: list[dict[str, Any]] = []
        stops: list[dict[str, Any]] = []

        def collect(name: str, doc: dict[str, Any]) -> None:
            if name == "event":
                events.append(doc)
            elif name == "event_page":
                events.extend({"data": {k: v[i] for k, v in doc["data"].items()}} for i in range(len(doc["seq_num"])))
            elif name == "stop":
                stops.append(doc)

        assert self.RE is not None
        try:
            uids = self.RE(experiment_plan(binding, assignment.setpoints, md), collect)
        except RunEngineInterrupted:
            self.RE.abort(reason="cancelled")
            raise DeviceError(f"trial {assignment.trial_id} cancelled") from None
        if not uids:
            raise DeviceError("the plan opened no run")
        if stops and stops[-1].get("exit_status") != "success":
            raise DeviceError(f"run ended with {stops[-1].get('exit_status')}: {stops[-1].get('reason')}")
        if not events:
            raise DeviceError("the run produced no event documents")
        data = events[-1]["data"]
        values: dict[str, float] = {}
        for output in assignment.outputs:
            key = binding.outputs.get(output)
            if key is None or key not in data:
                raise DeviceError(f"output {output!r} not in the run's readings ({', '.join(sorted(data))})")
            values[output] = float(data[key])
        return protocol.ResultMessage(
            trial_id=assignment.trial_id, run_uid=str(uids[-1]), values=values, duration_s=time.monotonic() - started
        )

    # -- communication (owns the socket) ------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.name.encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        sock.connect(self.endpoint)
        return sock

    def _hello(self) -> bytes:
        outstanding = sorted(self._running | {trial for trial, _ in self.outbox.pending()})
        return protocol.encode(protocol.Hello(station=self.name, instruments=self.instruments, outstanding=outstanding))

    def _communicate(self) -> None:
        sock = self._connect()
        sock.send(self._hello())
        last_sent = last_heard = time.monotonic()
        registered = False
        try:
            while not self._stop.is_set():
                if sock.poll(50, zmq.POLLIN):
                    last_heard = time.monotonic()
                    registered = self._on_message(sock, sock.recv(), registered)
                while True:
                    try:
                        sock.send(self._outgoing.get_nowait())
                        last_sent = time.monotonic()
                    except queue.Empty:
                        break
                now = time.monotonic()
                if now - last_sent >= self.heartbeat_s:
                    message = protocol.Heartbeat(running=sorted(self._running)) if registered else None
                    sock.send(protocol.encode(message) if message else self._hello())
                    last_sent = now
                if registered and now - last_heard > 10 * self.heartbeat_s:
                    log.warning("no word from the daemon for %.0f s; reconnecting", now - last_heard)
                    sock.close(linger=0)
                    sock = self._connect()
                    sock.send(self._hello())
                    registered, last_heard = False, now
        finally:
            sock.close(linger=0)

    def _on_message(self, sock: zmq.Socket, frame: bytes, registered: bool) -> bool:
        try:
            message = protocol.decode(frame)
        except ProtocolError as exc:
            log.warning("dropped a message from the daemon: %s", exc)
            return registered
        if isinstance(message, protocol.Welcome):
            for _, payload in self.outbox.pending():  # the daemon may have restarted: offer what it never acked
                sock.send(payload)
            return True
        if isinstance(message, protocol.Refused):
            if message.reason.startswith("unregistered"):
                sock.send(self._hello())
                return False
            log.error("daemon refused this station: %s", message.reason)
            self._stop.set()
            return False
        if isinstance(message, protocol.Ack):
            self.outbox.remove(message.trial_id)
        elif isinstance(message, protocol.Assign):
            self.assignments.put(message)
        elif isinstance(message, protocol.Cancel):
            self._cancelled.add(message.trial_id)
            if message.trial_id in self._running and self.RE is not None:
                try:
                    self.RE.request_pause(defer=False)
                except ClosedLoopError:
                    pass
        return registered
