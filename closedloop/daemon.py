"""The loop daemon: asks the planner for experiments, dispatches them to stations, stores results.

Ordering rules that make the loop lose nothing: a trial is written to the store before it is
proposed to a station and marked dispatched before the message leaves; a result is stored before it
is acknowledged; duplicates (same trial, same run uid) are acknowledged again and otherwise ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import zmq

from closedloop import protocol
from closedloop.campaign import Campaign
from closedloop.errors import ProtocolError, StoreError
from closedloop.planner import Planner, Result, make_planner
from closedloop.store import Store, TrialRow, TrialStatus

log = logging.getLogger("closedloop.daemon")

EventSink = Callable[[str, dict[str, Any]], None]


@dataclass
class Station:
    name: str
    identity: bytes
    instruments: list[str]
    capacity: int
    last_seen: float
    running: dict[int, float] = field(default_factory=dict)  # trial id -> dispatch time

    def serves(self, target: str) -> bool:
        return "*" in self.instruments or target in self.instruments

    @property
    def free(self) -> int:
        return self.capacity - len(self.running)


@dataclass
class InFlight:
    trial_id: int
    campaign_id: int
    station: str | None
    deadline: float | None
    reconciling: bool = False  # dispatched by an earlier daemon; its station may never answer


class CampaignRun:
    """One campaign's state inside the daemon: its planner, queue and experiments in flight."""

    def __init__(self, campaign: Campaign, store: Store):
        self.campaign = campaign
        self.store = store
        self.id = store.open_campaign(campaign)
        self.planner: Planner = make_planner(campaign)
        self.planner.ingest(store.results(self.id))
        self.started = time.monotonic()
        self.stopping = False
        self.best: Result | None = self.planner.best()

    @property
    def target(self) -> str:
        return self.campaign.instrument.target

    def finished_count(self) -> int:
        counts = self.store.counts(self.id)
        return sum(counts.get(s, 0) for s in ("completed", "failed", "abandoned"))

    def remaining(self, in_flight: int, queued: int) -> int:
        """Experiments still to propose within the budget."""
        return self.campaign.budget.experiments - self.finished_count() - in_flight - queued

    def out_of_time(self) -> bool:
        hours = self.campaign.budget.hours
        return hours is not None and time.monotonic() - self.started > hours * 3600

    def goal_reached(self) -> bool:
        rule = self.campaign.stop_rule
        if rule is None:
            return False
        return any(
            r.values is not None and rule.output in r.values and rule.satisfied(r.values[rule.output])
            for r in self.store.results(self.id)
        )


class Daemon:
    """Serves stations on a ROUTER socket until every campaign has met its budget or goal.

    Args:
        store: where campaigns, trials and results live.
        campaigns: campaigns to run (resumed when already in the store).
        bind: ROUTER endpoint; ``tcp://127.0.0.1:0`` picks a free port (see :attr:`endpoint`).
        on_event: called with (kind, details) for every transition, for progress displays.
    """

    def __init__(
        self,
        store: Store,
        campaigns: list[Campaign],
        *,
        bind: str = "tcp://127.0.0.1:0",
        heartbeat_s: float = 1.0,
        reconcile_s: float = 10.0,
        on_event: EventSink | None = None,
        context: zmq.Context | None = None,
    ):
        self.store = store
        self.runs = {run.id: run for run in (CampaignRun(c, store) for c in campaigns)}
        self.heartbeat_s = heartbeat_s
        self.on_event = on_event or (lambda kind, details: None)
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.endpoint = self._bind(bind)
        self.stations: dict[bytes, Station] = {}
        self.in_flight: dict[int, InFlight] = {}
        self._reconcile(reconcile_s)

    def _bind(self, bind: str) -> str:
        if bind.endswith(":0"):
            port = self.socket.bind_to_random_port(bind[: bind.rindex(":")])
            return f"{bind[: bind.rindex(':')]}:{port}"
        self.socket.bind(bind)
        return bind

    def _reconcile(self, grace_s: float) -> None:
        """Trials left dispatched by an earlier daemon: wait for their results, then re-dispatch."""
        deadline = time.monotonic() + grace_s
        for run in self.runs.values():
            for trial in self.store.trials(run.id, [TrialStatus.dispatched.value]):
                assert trial.id is not None
                self.in_flight[trial.id] = InFlight(trial.id, run.id, trial.station, deadline, reconciling=True)
                log.info("campaign=%s trial=%s reconciling (was on %s)", run.campaign.name, trial.index, trial.station)

    # -- the loop ---------------------------------------------------------------------------

    def done(self) -> bool:
        return all(self._campaign_done(run) for run in self.runs.values())

    def _campaign_done(self, run: CampaignRun) -> bool:
        if any(f.campaign_id == run.id for f in self.in_flight.values()):
            return False
        return run.stopping or run.finished_count() >= run.campaign.budget.experiments

    def serve(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Run until every campaign is done or ``should_stop()`` turns true."""
        for run in self.runs.values():
            self._emit("campaign_started", run, total=run.campaign.budget.experiments, finished=run.finished_count())
        try:
            while not self.done() and not should_stop():
                self.step(timeout_ms=20)
        finally:
            for run in self.runs.values():
                if self._campaign_done(run):
                    self.store.set_campaign_status(run.id, "completed")
                    self._emit("campaign_finished", run, best=_result_dict(run.best))

    def close(self) -> None:
        self.socket.close(linger=0)

    def step(self, timeout_ms: int = 20) -> None:
        """One turn of the loop: read messages, enforce timeouts, fill free station slots."""
        deadline = time.monotonic() + timeout_ms / 1000
        while self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            self._receive()
            if time.monotonic() >= deadline:
                break
        self._check_liveness()
        self._dispatch()

    def _receive(self) -> None:
        frames = self.socket.recv_multipart()
        if len(frames) != 2:
            log.warning("dropped a message of %d frames", len(frames))
            return
        identity, frame = frames
        try:
            message = protocol.decode(frame)
        except ProtocolError as exc:
            log.warning("dropped a message from %r: %s", identity[:64], exc)
            if "protocol version" in str(exc):
                self._send(identity, protocol.Refused(reason=str(exc)))
            return
        station = self.stations.get(identity)
        if station is not None:
            station.last_seen = time.monotonic()
        handler = {
            protocol.Hello: self._on_hello,
            protocol.Heartbeat: self._on_heartbeat,
            protocol.Started: self._on_started,
            protocol.ResultMessage: self._on_result,
            protocol.Failure: self._on_failure,
        }.get(type(message))
        if handler is None:
            log.warning("dropped an unexpected %s message from %r", message.type, identity[:64])
            return
        handler(identity, message)

    def _send(self, identity: bytes, message: Any) -> bool:
        try:
            self.socket.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # the peer is gone (ROUTER_MANDATORY) or its queue is full
            log.warning("could not send %s to %r: %s", message.type, identity[:64], exc)
            return False

    # -- handlers -----------------------------------------------------------------------------

    def _on_hello(self, identity: bytes, hello: protocol.Hello) -> None:
        station = self.stations.get(identity)
        running = station.running if station else {}
        # trials the station still holds stay assigned to it; others it was given are not coming back
        for trial_id in hello.outstanding:
            flight = self.in_flight.get(trial_id)
            if flight is not None:
                flight.station, flight.reconciling = hello.station, False
                running.setdefault(trial_id, time.monotonic())
        self.stations[identity] = Station(hello.station, identity, hello.instruments, hello.capacity, time.monotonic(),
                                          running)
        log.info("station %s registered (capacity %d, instruments %s)", hello.station, hello.capacity, hello.instruments)
        self._send(identity, protocol.Welcome(heartbeat_s=self.heartbeat_s))
        self.on_event("station_joined", {"station": hello.station})

    def _on_heartbeat(self, identity: bytes, heartbeat: protocol.Heartbeat) -> None:
        if identity not in self.stations:
            self._send(identity, protocol.Refused(reason="unregistered: send hello"))

    def _on_started(self, identity: bytes, started: protocol.Started) -> None:
        flight = self.in_flight.get(started.trial_id)
        if flight is not None:
            flight.reconciling = False
            run = self.runs[flight.campaign_id]
            timeout = run.campaign.execution.timeout
            flight.deadline = time.monotonic() + timeout if timeout else None

    def _on_result(self, identity: bytes, result: protocol.ResultMessage) -> None:
        try:
            trial = self.store.trial(result.trial_id)
        except StoreError as exc:
            log.warning("dropped a result: %s", exc)
            return
        run = self.runs.get(trial.campaign_id)
        if run is None:
            log.warning("dropped a result for trial %s of a campaign this daemon does not run", result.trial_id)
            return
        missing = set(run.campaign.outputs) - set(result.values)
        if missing:
            log.warning("dropped a result for trial %s: missing outputs %s", result.trial_id, sorted(missing))
            return
        values = {k: result.values[k] for k in run.campaign.outputs}
        try:
            new = self.store.record_result(trial.id, result.run_uid, values, result.noise, result.duration_s)  # type: ignore[arg-type]
        except StoreError as exc:
            log.warning("dropped a result: %s", exc)
            return
        self._send(identity, protocol.Ack(trial_id=result.trial_id))
        self._release(result.trial_id)
        if not new:
            return
        finished = Result(trial.parameters, values, trial.index)
        run.planner.ingest([finished])
        improved = run.planner.best()
        is_best = improved is not None and improved.trial == trial.index
        run.best = improved
        log.info("campaign=%s trial=%s completed values=%s", run.campaign.name, trial.index, values)
        self._emit("trial_completed", run, trial=trial.index, parameters=trial.parameters, values=values,
                   best=_result_dict(improved), is_best=is_best, finished=run.finished_count())
        if run.goal_reached() and not run.stopping:
            run.stopping = True
            self._emit("goal_reached", run, rule=run.campaign.budget.stop_when)

    def _on_failure(self, identity: bytes, failure: protocol.Failure) -> None:
        try:
            trial = self.store.trial(failure.trial_id)
        except StoreError as exc:
            log.warning("dropped a failure: %s", exc)
            return
        run = self.runs.get(trial.campaign_id)
        if run is None:
            return
        self._fail(run, trial, failure.error)
        self._send(identity, protocol.Ack(trial_id=failure.trial_id))

    def _fail(self, run: CampaignRun, trial: TrialRow, error: str) -> None:
        """Retry a failed trial if the campaign allows it, else record the failure."""
        assert trial.id is not None
        self._release(trial.id)
        if trial.attempts <= run.campaign.execution.retries and trial.status == TrialStatus.dispatched.value:
            self.store.requeue(trial.id, error)
            log.info("campaign=%s trial=%s failed (%s); retrying", run.campaign.name, trial.index, error)
            return
        if self.store.record_failure(trial.id, error):
            run.planner.ingest([Result(trial.parameters, None, trial.index)])
            log.info("campaign=%s trial=%s failed: %s", run.campaign.name, trial.index, error)
            self._emit("trial_failed", run, trial=trial.index, error=error, finished=run.finished_count())

    def _release(self, trial_id: int) -> None:
        self.in_flight.pop(trial_id, None)
        for station in self.stations.values():
            station.running.pop(trial_id, None)

    # -- timeouts and lost stations -------------------------------------------------------------

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for identity, station in list(self.stations.items()):
            if now - station.last_seen > 5 * self.heartbeat_s:
                log.warning("station %s lost (silent for %.1f s)", station.name, now - station.last_seen)
                del self.stations[identity]
                self.on_event("station_lost", {"station": station.name})
                for trial_id in list(station.running):
                    flight = self.in_flight.get(trial_id)
                    if flight is not None:
                        self._lost(flight, f"station {station.name} lost")
        for flight in list(self.in_flight.values()):
            if flight.deadline is not None and now > flight.deadline:
                self._lost(flight, "timed out")

    def _lost(self, flight: InFlight, reason: str) -> None:
        run = self.runs[flight.campaign_id]
        trial = self.store.trial(flight.trial_id)
        if flight.reconciling:  # never heard of since the restart: the experiment did not happen
            self._release(flight.trial_id)
            self.store.requeue(flight.trial_id, f"not reconciled: {reason}")
            log.info("campaign=%s trial=%s re-queued after restart", run.campaign.name, trial.index)
            return
        for station in self.stations.values():
            if flight.trial_id in station.running:
                self._send(station.identity, protocol.Cancel(trial_id=flight.trial_id, reason=reason))
        self._fail(run, trial, reason)

    # -- dispatch -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for station in sorted(self.stations.values(), key=lambda s: -s.free):
            while station.free > 0:
                sent = False
                for run in self.runs.values():
                    if station.serves(run.target) and self._dispatch_one(run, station):
                        sent = True
                        break
                if not sent:
                    break

    def _dispatch_one(self, run: CampaignRun, station: Station) -> bool:
        if run.stopping or run.out_of_time():
            run.stopping = True
            return False
        in_flight = sum(1 for f in self.in_flight.values() if f.campaign_id == run.id)
        if in_flight >= run.campaign.execution.concurrency:
            return False
        queued = self.store.trials(run.id, [TrialStatus.proposed.value])
        if not queued:
            if run.remaining(in_flight, 0) <= 0:
                return False
            pending = [self.store.trial(t).parameters for t, f in self.in_flight.items() if f.campaign_id == run.id]
            proposal = run.planner.suggest(1, pending=pending)[0]
            queued = self.store.add_trials(run.id, [(proposal.parameters, proposal.metadata)])
            self._emit("trial_proposed", run, trial=queued[0].index, parameters=proposal.parameters)
        trial = queued[0]
        assert trial.id is not None
        trial = self.store.mark_dispatched(trial.id, station.name)
        timeout = run.campaign.execution.timeout
        assignment = protocol.Assign(
            campaign=run.campaign.name,
            trial_id=trial.id,  # type: ignore[arg-type]
            trial_index=trial.index,
            setpoints=trial.parameters,
            outputs=run.campaign.outputs,
            instrument=protocol.InstrumentSpec(target=run.target, options=run.campaign.instrument.options),
            timeout_s=timeout,
            metadata=trial.planner,
        )
        # until the station says it started, give it the timeout plus a margin for the message to arrive
        deadline = time.monotonic() + (timeout or 0) + 30 if timeout else None
        self.in_flight[trial.id] = InFlight(trial.id, run.id, station.name, deadline)  # type: ignore[index]
        station.running[trial.id] = time.monotonic()  # type: ignore[index]
        if not self._send(station.identity, assignment):
            self.store.requeue(trial.id, f"station {station.name} unreachable")  # type: ignore[arg-type]
            self._release(trial.id)  # type: ignore[arg-type]
            self.stations.pop(station.identity, None)
            return False
        log.info("campaign=%s trial=%s dispatched to %s setpoints=%s", run.campaign.name, trial.index, station.name,
                 trial.parameters)
        self._emit("trial_dispatched", run, trial=trial.index, station=station.name, parameters=trial.parameters)
        return True

    def _emit(self, kind: str, run: CampaignRun, **details: Any) -> None:
        self.on_event(kind, {"campaign": run.campaign.name, "time": datetime.now().isoformat(), **details})


def _result_dict(result: Result | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"trial": result.trial, "parameters": result.parameters, "values": result.values}


def run_embedded(
    campaign: Campaign,
    store: Store,
    *,
    outbox: str | None = None,
    on_event: EventSink | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> CampaignRun:
    """The daemon and one station worker in this process, on loopback: ``closedloop run``."""
    import threading

    from closedloop.worker import StationWorker

    daemon = Daemon(store, [campaign], bind="tcp://127.0.0.1:0", on_event=on_event, reconcile_s=3.0)
    stop = threading.Event()
    worker = StationWorker(daemon.endpoint, name="embedded", outbox=outbox, heartbeat_s=0.5)
    thread = threading.Thread(target=worker.run, args=(stop,), name="closedloop-station", daemon=True)
    thread.start()
    try:
        daemon.serve(should_stop)
    finally:
        stop.set()
        thread.join(timeout=10)
        daemon.close()
    return next(iter(daemon.runs.values()))
