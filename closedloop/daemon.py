"""The loop daemon: keeps every station busy with the planner's proposals and stores every result once.

Sockets (docs/daemon.md has the diagram and every message):

- ROUTER (``bind``) for stations (DEALER, routing id = station name): the protocol in
  :mod:`closedloop.protocol`.
- PUB (``publish``) streaming campaign events as ``[topic, json]`` (:mod:`closedloop.events`).
- control (``control``, ROUTER serving REQ clients) taking ``{"method", "params"}`` and answering
  ``{"success", "msg", ...}``: ``status``, ``health``, ``pause``, ``resume``, ``stop``, ``cancel``, and
  ``approve`` / ``edit`` / ``reject`` of proposals held for a person.
  :func:`control_request` is the client.

Ordering rules that make the loop lose nothing and run nothing twice: a trial is written to the store
as dispatched before the ``assign`` leaves; results are stored (a batch per loop turn, one
transaction) before they are acknowledged; duplicates (same trial, same run uid) are acknowledged
again and otherwise ignored; a station that re-registers lists the trials it still holds, and a trial
dispatched to it that it does not hold is re-queued. Planning runs in one background thread per
campaign that keeps a small buffer of proposals, refreshed whenever results arrive, so intake and
dispatch never wait on a model fit.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from closedloop import events as event_format
from closedloop import protocol, provenance
from closedloop.campaign import SOURCE, Campaign
from closedloop.errors import (CampaignError, ClosedLoopError, PlannerWaiting, ProtocolError, SpaceExhausted, StoreError,
                               StoreUnwritable)
from closedloop.keys import ServerKeys, Unprotected, check_exposure, is_local
from closedloop.planner import Planner, Proposal, Result, make_planner
from closedloop.store import FINISHED_STATUSES, Store, TrialRow, TrialStatus, displayed, used_instrument
from closedloop.view import runs_long

log = logging.getLogger("closedloop.daemon")
translog = logging.getLogger("closedloop.trial")  # one structured line per trial transition

EventSink = Callable[[str, dict[str, Any]], None]

DEFAULT_CONTROL = "tcp://127.0.0.1:5700"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5702"
_HELD = getattr(TrialStatus, "held", None)  # approval mode (people in the loop), when the store has it
# proposals stored but not yet dispatched: queued for a station, or held for a person
_WAITING = [TrialStatus.proposed.value] + ([_HELD.value] if _HELD is not None else [])
# assigns remembered (their station and trial), so a late failure can show it answers one this daemon sent
_SENT_KEPT = 100_000
# how long a daemon whose campaigns are done still waits for the answer of a run it cancelled (a timeout):
# the answer carries the aborted run's documents, which would otherwise never be kept
OWED_GRACE_S = 10.0
# an instrument its station could not reach gets none of its trials for this long, doubled after each failure
# in a row up to the longest: a powered-off robot is tried again soon, one down for the night now and then
REST_FIRST_S = 2.0
REST_LONGEST_S = 300.0
# a free instrument whose planner failed (it tries again on the next result) gets a space-filling point after this
# long even where the campaign takes none (closedloop run), so that a next result comes at all
FILL_AFTER_PLANNER_ERROR_S = 1.0
# a trial's timeout counts from its start; until the station says it started, allow this much more for the message
# and the station's queue
START_GRACE_S = 30.0
# a peer's dropped messages (and those it does not read) are logged one by one up to DROPS_LOGGED in each
# DROP_WINDOW_S, then counted and said in one line: a peer sending garbage as fast as it could wrote 2.8 MB of log a
# second, and the rotated log (120 MB) lost the campaign's history within a minute
DROPS_LOGGED = 20
DROP_WINDOW_S = 10.0
# what one peer may have queued here unread: at 100 000 (each up to 1 MiB) a peer sending faster than the loop reads
# grew the daemon by gigabytes in seconds; a station sending more (its outbox after a restart) waits its turn
RECEIVE_QUEUE = 100
# how long one turn of the loop may hand out trials before it reads its socket again: a station answers each assign
# at once ('started', a result), past RECEIVE_QUEUE unread libzmq stops reading its connection, and the connection's
# ZMTP heartbeat (5 s) then timed it out while 1,024 free slots were filled in one turn
DISPATCH_SLICE_S = 0.1


def _instrument_label(instrument: Any) -> str:
    """An instrument as a station reaches it: its driver and options (one driver may serve several robots)."""
    options = json.dumps(instrument.options, sort_keys=True, default=str) if instrument.options else ""
    return f"{instrument.target} {options}".strip()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _logfmt(**fields: Any) -> str:
    return " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, (int, float)) else v}"
                    for k, v in fields.items() if v is not None)


@dataclass
class _Drops:
    """Messages from (or to) one peer dropped in the current window: how many were logged, how many were not."""

    since: float
    logged: int = 0
    unlogged: int = 0
    last: str = ""


@dataclass
class Station:
    name: str
    identity: bytes
    instruments: list[str]
    campaigns: list[str]
    capacity: int
    session: int
    last_seen: float
    sources: list[str] = field(default_factory=lambda: ["*"])  # issue 8: the campaign sources it serves
    running: dict[int, float] = field(default_factory=dict)  # trial id -> dispatch time
    declared: set[int] = field(default_factory=set)  # trials its hello said it holds (results in its outbox)
    prefetch: int = 0  # trials queued on the station beyond its capacity, so it never waits for a round trip
    instance: str = ""  # the station process, and the welcomes it had had, as its registering hello said
    welcomed: int = 0
    resting: dict[str, tuple[float, float]] = field(default_factory=dict)  # unreachable instrument -> (until, rest s)
    pings: dict[str, float] = field(default_factory=dict)  # our recent heartbeats to it -> when sent

    def serves(self, run: CampaignRun, parameters: dict[str, Any] | None = None) -> bool:
        """Whether this station may run the campaign's experiments: any of them, or the one at ``parameters``
        (which, in a campaign with sources, runs only on a station serving its source's instrument)."""
        if not ("*" in self.campaigns or run.campaign.name in self.campaigns):
            return False
        wanted = run.campaign.instruments if parameters is None else [run.campaign.source_of(parameters)]
        return any(("*" in self.instruments or run.campaign.instruments[source].target in self.instruments)
                   and (source is None or "*" in self.sources or source in self.sources) for source in wanted)

    def ready(self, run: CampaignRun, parameters: dict[str, Any] | None = None) -> bool:
        """:meth:`serves`, and the instrument (any of the campaign's, or the one for ``parameters``) is not
        resting after this station could not reach it."""
        if not self.serves(run, parameters):
            return False
        if not self.resting:  # the usual case, asked every loop turn: nothing to label or compare
            return True
        now = time.monotonic()
        wanted = run.campaign.instruments.values() if parameters is None else [run.campaign.instrument_for(parameters)]
        return any(self.resting.get(_instrument_label(i), (0.0, 0.0))[0] <= now for i in wanted)

    @property
    def free(self) -> int:
        return self.capacity + self.prefetch - len(self.running)


@dataclass
class InFlight:
    trial_id: int
    campaign_id: int
    index: int
    parameters: dict[str, Any]
    station: str | None
    deadline: float | None
    dispatched: float = field(default_factory=time.monotonic)
    started: bool = False
    reconciling: bool = False  # waiting for its station to say what it holds: left by an earlier daemon, or lost
    lost: str | None = None  # why it waits, when its station was declared lost (None: an earlier daemon's)
    behind: bool = False  # queued behind its lost station's run in progress: nothing ran
    # the assign's message id, which the station's answers name; None when an earlier daemon sent it
    assignment: str | None = None
    said_long: bool = False  # logged once as running long (a campaign without a timeout)
    taken_back: bool = False  # asked back from its station, unstarted, by a stopping daemon

    def answered_by(self, message: protocol.Started | protocol.ResultMessage | protocol.Failure) -> bool:
        """Whether a station's message answers this assignment, not an earlier one of the same trial (a
        retry on the same station: the aborted attempt's failure must not fail the new one)."""
        return self.assignment is None or message.assignment is None or message.assignment == self.assignment


class PlannerService:
    """A campaign's planner in its own thread: ingests results and keeps a buffer of proposals.

    The daemon thread only calls :meth:`ingest`, :meth:`take` and sets :attr:`pending` and
    :attr:`want`; the planner object is touched by this thread alone. A batch of ``want`` proposals
    is chosen jointly with the experiments in flight as pending; when results arrive the batch is
    recomputed. Until the new batch is ready the previous one stays available, because an idle
    instrument costs more than a proposal that has not seen the last result yet.
    """

    def __init__(self, planner: Planner, name: str, wake: Callable[[], None], fresh_only: bool = False):
        self.planner = planner
        self.fresh_only = fresh_only  # hand out only proposals that have seen every result
        self.name = name
        self._wake = wake
        self._cond = threading.Condition()
        self._incoming: list[Result] = []
        self._buffer: list[Proposal] = []
        self._taken: list[dict[str, Any]] = []
        self._data_version = 0
        self._buffer_version = -1
        self.want = 1
        self.pending: list[dict[str, Any]] = []
        self._asked = False  # work asked of the thread this turn, told at the turn's end (see begin)
        self.events: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.error: str | None = None
        # the planner proposes nothing more until a result comes in (Ax with its initial design all in flight)
        self.waiting: str | None = None
        # the planner has proposed every point it will (a finite space, a planner that never repeats one)
        self.exhausted: str | None = None
        self.fits = 0
        self.busy_s = 0.0
        self._stop = False
        # waited on rather than join(): a join cut short by Ctrl-C marks the thread ended while it runs on
        # (CPython 3.11, bpo-45274), and a second stop() then returned at once with the model fit going on
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"closedloop-planner-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._ended.wait(timeout=60)

    def _serve(self) -> None:
        try:
            self._run()
        finally:
            self._ended.set()

    def ingest(self, results: list[Result]) -> None:
        self.update(results=results)

    def update(self, *, results: list[Result] | None = None, pending: list[dict[str, Any]] | None = None,
               want: int | None = None) -> None:
        """New results, the experiments now pending and the batch size, all at once: the thread never
        sees a finished experiment both as a result and as pending, or as neither."""
        with self._cond:
            if results:
                self._incoming.extend(results)
                self._data_version += 1
            if pending is not None:
                self.pending = pending
            if want is not None:
                self.want = want
            self._asked = True

    def take(self) -> Proposal | None:
        with self._cond:
            stale = self._incoming or self._buffer_version != self._data_version
            if not self._buffer or (self.fresh_only and stale):
                self._asked = True
                return None
            proposal = self._buffer.pop(0)
            self._taken.append(proposal.parameters)
            self.pending = [*self.pending, proposal.parameters]
            if len(self._buffer) < self.want:
                self._asked = True
            return proposal

    def begin(self) -> None:
        """Let the thread start on what this turn of the daemon asked of it (:meth:`update`, :meth:`take`).

        Told at the end of the turn, not in the middle: woken at once, the thread took the GIL from the daemon
        while it was storing a result and recording the next trial, and a zero-latency loop's experiment cost
        about a millisecond more, waiting for a planner that could as well think while the instrument runs."""
        with self._cond:
            if self._asked:
                self._asked = False
                self._cond.notify_all()

    def buffered(self) -> int:
        return len(self._buffer)

    def _needs_work(self) -> bool:
        if self._incoming:
            return True
        if self.want <= 0 or self.error is not None or self.waiting is not None or self.exhausted is not None:
            return False
        return len(self._buffer) < self.want or self._buffer_version != self._data_version

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._needs_work():
                    self._cond.wait(timeout=1.0)
                    if self.error is not None and self._incoming:
                        break
                if self._stop:
                    return
                results, self._incoming = self._incoming, []
                want, pending, version = self.want, list(self.pending), self._data_version
                self._taken = []
            started = time.perf_counter()
            try:
                if results:
                    self.planner.ingest(results)
                    self.error = None
                proposals = self.planner.suggest(want, pending=pending) if want > 0 else []
                self.exhausted = self.waiting = None
            except SpaceExhausted as exc:
                # nothing is wrong and nothing to retry: the campaign ends once what is in flight is in (it
                # had said "the planner failed" and tried again every second, for good)
                self.exhausted = str(exc)
                self._wake()
                continue
            except PlannerWaiting as exc:
                # asked again when a result comes in, as after a fault, but not said as one: the terminal read
                # "the planner failed" and the log held a traceback at each of Ax's normal waits
                if self.waiting is None:
                    log.info("campaign=%s %s", self.name, exc)
                self.waiting = str(exc)
                self._wake()
                continue
            except Exception as exc:  # a planner fault must not stop intake; it is reported and retried
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("campaign=%s planner failed", self.name)
                self.events.put(("planner_error", {"error": self.error}))
                self._wake()
                time.sleep(1.0)
                continue
            elapsed = time.perf_counter() - started
            self.busy_s += elapsed
            with self._cond:
                # a proposal handed out while this batch was computed is not in its pending set: a
                # deterministic design (Sobol) would propose it again
                taken = self._taken
                self._buffer = [p for p in proposals if p.parameters not in taken]
                self._buffer_version = version
            if proposals:
                self.fits += 1
                meta = proposals[0].metadata
                self.events.put(("model_updated", {
                    "generator": meta.get("generator"), "observations": meta.get("observations"),
                    "pending": len(pending), "batch": len(proposals), "seconds": round(elapsed, 4),
                    "fit_seconds": meta.get("fit_seconds")}))
            self._wake()


class CampaignRun:
    """One campaign's state inside the daemon: planner service, queue, counters, pause flag."""

    def __init__(self, campaign: Campaign, store: Store):
        self.campaign = campaign
        self.store = store
        self.id = store.open_campaign(campaign)
        # -- issue 9: the planner remembers what each proposal rested on (closedloop.provenance)
        self.planner: Planner = provenance.Recorder(make_planner(campaign))
        # -- end issue 9
        # what told() has seen: every trial up to this id (read before the finished ones, so that none told in
        # between is missed), and the hand trials among them not finished then
        self.seen_id = store.last_trial_id(self.id)
        # the finished trials in one read: their results for the planner, and what the counters need
        finished = store.finished_trials(self.id)
        results = [Result(t.parameters, t.values, t.index) for t in finished
                   if t.status in (TrialStatus.completed.value, TrialStatus.failed.value)]
        self.planner.ingest(results)
        # budget.hours counts from the campaign's start, as `closedloop status` does, not from this daemon's: a
        # daemon restarted (a crash, systemd) gave the campaign all its hours again
        created = store.campaign_row(self.id).created_at
        since = datetime.now(timezone.utc) - (created if created.tzinfo else created.replace(tzinfo=timezone.utc))
        self.started = time.monotonic() - max(0.0, since.total_seconds())
        self.stopping = False
        self.closed = False  # marked completed and announced (campaign_finished), while the daemon serves others
        self.unserved = False  # stations are connected and none serves it (logged once, until one does)
        self.said_waiting: frozenset[int] = frozenset()  # the hand-run trials it was last said to wait for
        self.paused = False
        self.paused_at = 0.0  # monotonic time of the pause: its length is added back to the deadlines on resume
        self.paused_on: set[str] = set()  # stations told to pause, to be told to resume even if its trials left
        self.finished = len(finished)
        # issue 8: a budget in cost; a proposal rejected before it ran cost nothing (as in a running daemon)
        self.spent = sum(campaign.cost_of(t.parameters) for t in finished if used_instrument(t.attempts, t.error))
        self.best: Result | None = None
        for result in results:
            self._consider_best(result)
        # the completed experiments' durations, as status counts them: what "running long" is judged by
        timed = [(t.finished_at - t.dispatched_at).total_seconds() for t in finished
                 if t.status == TrialStatus.completed.value and t.finished_at and t.dispatched_at]
        self.timed, self.longest_s = len(timed), max(timed, default=0.0)
        self.queue: deque[int] = deque()
        self.held = 0
        self.held_ids: set[int] = set()  # issue 7: to notice proposals a person rejected
        # trials from `closedloop suggest`: open ones count against the budget and are pending for the planner; a
        # result told by hand is learned (a daemon held trial 7 of 6 while two hand trials were open, and its
        # planner never saw what was told)
        self.manual_open: set[int] = set()
        self.manual_done: set[int] = {t.id for t in finished if t.execution == "manual"}
        self.refresh_queue()
        self.manual_waiting = store.hand_trial_ids(self.id, self.seen_id) - self.manual_done
        self.service: PlannerService | None = None
        self.starved_since: float | None = None  # a station has waited on the planner since then
        self.filler: Planner | None = None
        self.filled = 0
        self.unfilled: set[str] = set()  # stations told they wait for the model (sources: target only)
        self.fill_after_s: float | None = 0.2

    def fill(self, station: Station) -> Proposal | None:
        """A space-filling (Sobol, own seed) proposal for a station the model cannot serve in time.

        In a campaign with sources the point goes to the cheapest source the station serves that is cheaper
        than the target: an idle simulation costs more than a cheap exploratory point, but the target's
        experiments are the budget, and where to spend them is the multi-fidelity model's to choose. A station
        serving only the target waits for the model.
        """
        source = None
        if self.campaign.sources:
            target = self.campaign.sources[self.campaign.target_source].cost  # type: ignore[index]
            cheaper = sorted((s.cost, name) for name, s in self.campaign.sources.items()
                             if s.cost < target and station.serves(self, {SOURCE: name}))
            if not cheaper:
                if station.name not in self.unfilled:  # once per station, not every loop turn
                    self.unfilled.add(station.name)
                    log.info("campaign=%s station %s waits for the model: space-filling points go only to sources "
                             "cheaper than the target", self.campaign.name, station.name)
                return None
            source = cheaper[0][1]
        if self.filler is None:
            settings = self.campaign.planner.model_copy(update={"backend": "sobol",
                                                                "seed": (self.campaign.planner.seed or 0) + 104_729})
            # Sobol covers the parameters; with sources the daemon, not the sequence, says where it runs
            spec = self.campaign.at_source(self.campaign.target_source) if self.campaign.sources else self.campaign  # type: ignore[arg-type]
            try:
                self.filler = provenance.Recorder(make_planner(spec.model_copy(update={"planner": settings})))
            except ClosedLoopError as exc:  # a campaign Sobol cannot serve: stations wait for the model
                log.warning("campaign=%s no filler proposals: %s", self.campaign.name, exc)
                self.fill_after_s = None
                return None
        # the filler's Sobol position is its own count of points handed out
        proposal = self.filler.suggest(1, pending=[{}] * self.filled)[0]
        self.filled += 1
        if source is not None:
            proposal = provenance.derive(proposal, parameters={**proposal.parameters, SOURCE: source})
        # issue 9: derive keeps the filler's record (its own Sobol sequence and seed) with the proposal
        return provenance.derive(proposal, generator="filler",
                                 reason="the model was still fitting while a station was free")

    def count_finished(self, parameters: dict[str, Any]) -> None:
        self.finished += 1
        self.spent += self.campaign.cost_of(parameters)

    def budget_spent(self) -> bool:
        budget = self.campaign.budget
        return self.finished >= self.campaign.max_experiments or (budget.cost is not None
                                                                   and self.spent >= budget.cost - 1e-9)

    @property
    def approve(self) -> bool:
        return bool(getattr(self.campaign.execution, "approve", False)) and _HELD is not None

    def refresh_queue(self) -> list[TrialRow]:
        """Proposed trials (re-queued, approved) waiting for a station; hand-run ones are left to people.

        Returns the held proposals a person rejected since the last look (now failed in the store).
        """
        queued, held = [], 0
        held_ids: set[int] = set()
        manual: set[int] = set()
        for trial in self.store.trials(self.id, _WAITING):
            if (trial.planner or {}).get("execution") == "manual":
                manual.add(trial.id)  # type: ignore[arg-type]
                continue
            if trial.status == TrialStatus.proposed.value:
                queued.append(trial.id)
            else:
                held += 1
                held_ids.add(trial.id)  # type: ignore[arg-type]
        self.queue = deque(queued)
        self.held = held
        self.manual_open = manual
        # -- issue 7: `closedloop reject` records a held proposal failed; the planner must learn it
        decided = [self.store.trial(t) for t in self.held_ids - held_ids]
        self.held_ids = held_ids
        return [t for t in decided if t.status == TrialStatus.failed.value]
        # -- end issue 7

    def told(self) -> list[TrialRow]:
        """Hand-run trials (from `closedloop suggest`) finished since the last look, and experiments imported since
        (`closedloop import`), counted as finished here: both are the campaign's experiments, of its budget.

        Only what may have changed is read: the trials added since the last look and the hand trials open then.
        Reading every finished trial (and every observation) held the loop 1 to 2 s at 20,000 trials, and after a
        `closedloop import` it did so every second, for good.
        """
        if self.store.finished_count(self.id) <= self.finished:
            return []  # nothing finished that this daemon has not counted
        told = []
        for trial in self.store.trials_after(self.id, self.seen_id, self.manual_waiting):
            self.seen_id = max(self.seen_id, trial.id)  # type: ignore[type-var]
            # an import while a daemon served was not counted: it ran its whole budget on top, and never learned them
            made = trial.planner or {}
            if (made.get("execution") != "manual" and made.get("generator") != "import") or trial.id in self.manual_done:
                continue
            if trial.status not in FINISHED_STATUSES:
                self.manual_waiting.add(trial.id)  # type: ignore[arg-type]
                continue
            self.manual_waiting.discard(trial.id)  # type: ignore[arg-type]
            self.manual_done.add(trial.id)  # type: ignore[arg-type]
            self.count_finished(trial.parameters)
            told.append(trial)
        return told

    def finished_count(self) -> int:
        return self.finished

    def out_of_time(self) -> bool:
        hours = self.campaign.budget.hours
        return hours is not None and time.monotonic() - self.started > hours * 3600

    def _consider_best(self, result: Result) -> bool:
        if result.values is None or not self.campaign.counts(result.parameters):
            return False  # a cheaper source's result says where to look, not what was found
        name, objective = next(iter(self.campaign.objectives.items()))
        if name not in result.values:
            return False
        if not all(b.satisfied(result.values[b.output]) for b in self.campaign.output_bounds if b.output in result.values):
            return False  # outside the outcome constraints: not a good experiment, as status and the report count
        if self.best is None or self.best.values is None:
            self.best = result
            return True
        better = (result.values[name] > self.best.values[name] if objective.goal == "maximize"
                  else result.values[name] < self.best.values[name])
        if better:
            self.best = result
        return better

    def goal_reached(self, values: dict[str, float]) -> bool:
        rule = self.campaign.stop_rule
        return rule is not None and rule.output in values and rule.satisfied(values[rule.output])


class Daemon:
    """Serves stations until every campaign has met its budget or goal, or until stopped.

    Args:
        store: where campaigns, trials and results live (the daemon is its only writer).
        campaigns: campaigns to run (resumed when already in the store), each served by the
            stations whose hello names its instrument (or ``*``) and its campaign (or ``*``).
        bind: ROUTER endpoint for stations; ``tcp://127.0.0.1:0`` picks a free port (see :attr:`endpoint`).
        publish: PUB endpoint for events (None: no PUB socket).
        control: control endpoint (None: no control socket); must be loopback or ipc.
        keys: CURVE server keys; without them only loopback endpoints are allowed unless ``insecure``. With
            them a station is admitted only under the name of its key's file in the allowed directory.
        heartbeat_s: how often stations heartbeat; a station silent for ``lost_after`` heartbeats is lost.
        reconcile_s: how long trials left in flight by an earlier daemon, or by a station declared lost, wait for
            their station to come back holding them before the retry policy decides.
        drain_s: on stop, how long to wait for results of trials in flight.
        prefetch: trials sent to a station ahead of its capacity; it starts the next the moment the
            last ends instead of waiting for a result-dispatch round trip (0: only when a slot is free).
        fill_after_s: when a station has had a free slot this long and the planner is still fitting,
            it gets a space-filling (Sobol) proposal instead of waiting; None: always wait for the model
            to propose with every result so far (with ``prefetch=0`` and one station, a seeded campaign
            then makes the same decisions every time).
        on_event: called with (kind, details) for every transition, in the daemon thread.

    Raises:
        ValueError: an endpoint that is not ``tcp://HOST:PORT`` or ``ipc://PATH``, or whose host this machine lacks
            (checked before anything is claimed or bound, in the command line's words).
        ProtocolError: a network-reachable endpoint without ``keys`` or ``insecure``.
        ClosedLoopError: an endpoint it cannot listen on (a port in use), said before any campaign is claimed or
            written to the store.

    Example:
        >>> daemon = Daemon(Store("s.db"), [campaign], bind="tcp://127.0.0.1:5701")  # doctest: +SKIP
        >>> daemon.serve()                                                           # doctest: +SKIP
    """

    def __init__(
        self,
        store: Store,
        campaigns: list[Campaign],
        *,
        bind: str = "tcp://127.0.0.1:0",
        publish: str | None = None,
        control: str | None = None,
        keys: ServerKeys | None = None,
        insecure: bool = False,
        heartbeat_s: float = 1.0,
        lost_after: float = 5.0,
        reconcile_s: float = 10.0,
        fill_after_s: float | None = 0.2,
        prefetch: int = 1,
        drain_s: float = 60.0,
        start_grace_s: float = START_GRACE_S,
        on_event: EventSink | None = None,
        context: zmq.Context | None = None,
    ):
        for option, endpoint in (("bind", bind), ("publish", publish), ("control", control)):
            if endpoint is not None and (problem := protocol.endpoint_problem(endpoint, listen=True)):
                raise ValueError(f"{option} {endpoint!r}: {problem}")  # the command line's words, before a claim
        for endpoint in (bind, publish):
            if endpoint is not None:
                check_exposure(endpoint, keys, insecure)
        if control is not None and not is_local(control):
            raise Unprotected(f"control endpoint {control} is reachable from other machines and has no keys: "
                              "use ipc://PATH or tcp://127.0.0.1:PORT")
        self.store = store
        self.runs: dict[int, CampaignRun] = {}
        self._claimed: list[str] = []
        self.context = context or (zmq.Context() if keys else zmq.Context.instance())
        self._own_context = context is None and keys is not None
        self.keys = keys
        self.auth: ThreadAuthenticator | None = None
        self.pub: zmq.Socket | None = None
        self.publish_endpoint: str | None = None
        self.control: zmq.Socket | None = None
        self.control_endpoint: str | None = None
        # every endpoint is bound before the store is touched: a daemon that could not listen (a port in use) had
        # claimed its campaigns and written their rows first, and a store made for it was left behind
        try:
            self.auth = keys.start_authenticator(self.context) if keys else None
            self.socket = self.context.socket(zmq.ROUTER)
            self.socket.setsockopt(zmq.LINGER, 500)
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # No ROUTER_HANDOVER: with it a second process started under a station's name took the name's connection
            # each time it (re)connected, re-registered with nothing held, and the trials the first was running were
            # handed out again and measured twice. A second connection with a name in use is now ignored; the ZMTP
            # heartbeat frees the name of a station whose host died (a killed process closes its connection at once).
            self.socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            self.socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES + 1024)
            self.socket.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
            self.socket.setsockopt(zmq.SNDHWM, 100_000)
            if keys:
                keys.apply(self.socket)
            self.endpoint = self._bind(self.socket, bind, "for stations")
            if publish is not None:
                self.pub = self.context.socket(zmq.PUB)
                self.pub.setsockopt(zmq.LINGER, 0)
                self.pub.setsockopt(zmq.SNDHWM, 10_000)
                if keys:
                    keys.apply(self.pub)
                self.publish_endpoint = self._bind(self.pub, publish, "to publish events")
            if control is not None:
                self.control = self.context.socket(zmq.ROUTER)
                self.control.setsockopt(zmq.LINGER, 0)
                self.control.setsockopt(zmq.MAXMSGSIZE, 65536)
                self.control_endpoint = self._bind(self.control, control, "for control requests")
            self._wake_address = f"inproc://closedloop-wake-{id(self)}"
            self._wake_pull = self.context.socket(zmq.PULL)
            self._wake_pull.bind(self._wake_address)
            self._wake_lock = threading.Lock()
            self._wake_push = self.context.socket(zmq.PUSH)
            self._wake_push.setsockopt(zmq.SNDHWM, 1)
            self._wake_push.connect(self._wake_address)
            self.poller = zmq.Poller()
            for sock in (self.socket, self.control, self._wake_pull):
                if sock is not None:
                    self.poller.register(sock, zmq.POLLIN)
            for c in campaigns:
                store.claim(c.name)
                self._claimed.append(c.name)
            self.runs = {run.id: run for run in (CampaignRun(c, store) for c in campaigns)}
        except BaseException:
            self._release_campaigns()
            self._close_sockets()
            raise
        self.heartbeat_s = heartbeat_s
        self.lost_after = lost_after
        self.reconcile_s = reconcile_s
        self.drain_s = drain_s
        self.start_grace_s = start_grace_s
        self.prefetch = prefetch
        # campaigns in the order they next take a free slot, kept across turns: a turn cut short (DISPATCH_SLICE_S)
        # would otherwise begin with the same campaign each time
        self._turns = list(self.runs.values())
        for run in self.runs.values():
            run.fill_after_s = fill_after_s
        self.on_event: EventSink = on_event or (lambda kind, details: None)
        self.stations: dict[bytes, Station] = {}
        self.in_flight: dict[int, InFlight] = {}
        # trials re-queued because their station was lost, by that station: if it comes back holding one,
        # the experiment is still running (or done) there, and the trial goes back to it
        self._left_behind: dict[int, str] = {}
        # assigns sent (msg_id -> trial, station), the latest _SENT_KEPT: a late failure is taken as the record
        # of a run only when it answers one of them, so no station can attach runs to a trial not given to it
        self._sent: dict[str, tuple[int, str]] = {}
        # station name -> trials this daemon has assigned to it that it may still hold (queued, running, or an
        # answer not yet acknowledged): a hello listing one of them is answered. Pruned when the station's answer
        # is acknowledged and at each hello, so it holds what is out, not every trial of a weeks-long run
        self._given: dict[str, set[int]] = {}
        # (trial id, station name) -> monotonic deadline: runs cancelled on a station that has not yet answered
        self._owed: dict[tuple[int, str], float] = {}
        # trial id -> its campaign, for trials stations hold of campaigns this daemon does not run (left in flight by
        # a daemon that ran them): never cancelled or acknowledged here, and each said once in the log
        self._unrun: dict[int, str] = {}
        self._unrun_said: set[tuple[int, str, str]] = set()  # (trial id, station, what)
        self._session = 0
        self._seq = 0
        self._stop_requested = False
        self._draining_until: float | None = None
        self._last_check = 0.0
        self._dispatch_cut = False  # the last turn left free slots to fill when its time was up
        self._last_queue_refresh = time.monotonic()
        self.started = time.monotonic()
        self.stats = {"results": 0, "duplicates": 0, "dropped": 0, "dispatched": 0}
        self._drops: dict[tuple[bytes, str], _Drops] = {}  # by peer, and "dropped" or "could not send"
        for run in self.runs.values():
            if store.campaign_row(run.id).status != "paused":
                continue
            if self.control is not None:
                # an operator's pause outlives the daemon: a daemon killed and restarted (systemd) ran experiments
                # again on an instrument its operator had stopped. Only a daemon with a control socket can resume
                run.paused, run.paused_at = True, time.monotonic()
                log.warning("campaign=%s stays paused, as an operator left it; 'closedloop resume %s' continues it",
                            run.campaign.name, run.campaign.name)
            else:
                # `closedloop run` has no control socket to resume it from: starting it is the resume, and the store
                # must not go on saying paused while it runs
                store.set_campaign_status(run.id, "running")
                log.info("campaign=%s was paused; run here without a control socket, it resumes", run.campaign.name)
        self._reconcile(reconcile_s)

    @staticmethod
    def _bind(sock: zmq.Socket, bind: str, purpose: str) -> str:
        sock.setsockopt(zmq.IPV6, protocol.wants_ipv6(bind))
        try:
            if bind.endswith(":0"):
                port = sock.bind_to_random_port(bind[: bind.rindex(":")])
                return f"{bind[: bind.rindex(':')]}:{port}"
            sock.bind(bind)
        except zmq.ZMQError as exc:
            # said as 'ZMQError: Address already in use', it did not say which of the daemon's three endpoints
            busy = " (another daemon or program listens there: stop it, or choose another port)" \
                if exc.errno == errno.EADDRINUSE else ""
            raise ClosedLoopError(f"cannot listen {purpose} at {bind}: {os.strerror(exc.errno)}{busy}") from None
        return bind

    def _reconcile(self, grace_s: float) -> None:
        """Trials left dispatched by an earlier daemon: wait for their stations to say what they hold."""
        deadline = time.monotonic() + grace_s
        for run in self.runs.values():
            for trial in self.store.trials(run.id, [TrialStatus.dispatched.value]):
                assert trial.id is not None
                self.in_flight[trial.id] = InFlight(trial.id, run.id, trial.index, trial.parameters, trial.station,
                                                    deadline, reconciling=True)
                self._transition(run, trial.index, trial.id, "reconciling", station=trial.station)

    # -- the loop ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop turn now (thread-safe): the planner has proposals, or a stop was asked."""
        with self._wake_lock:
            try:
                self._wake_push.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is already pending

    def request_stop(self, reason: str = "requested") -> None:
        """Stop dispatching, take back the trials sent ahead that no station has started, wait for results in
        flight up to ``drain_s``, then leave :meth:`serve`."""
        if not self._stop_requested:
            log.info("stopping (%s): no new dispatch; waiting up to %.0f s for %d trials in flight", reason,
                     self.drain_s, len(self.in_flight))
        self._stop_requested = True

    def done(self) -> bool:
        return all(self._campaign_done(run) for run in self.runs.values())

    def _campaign_done(self, run: CampaignRun) -> bool:
        if any(f.campaign_id == run.id for f in self.in_flight.values()):
            return False
        exhausted = run.service is not None and run.service.exhausted is not None and not run.queue and not run.held
        return run.stopping or run.budget_spent() or exhausted

    def serve(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Run until every campaign is done, or until stopped (``should_stop()``, :meth:`request_stop`, SIGTERM)."""
        # the planner threads hold the GIL through long stretches of model fitting; a short switch
        # interval lets this loop thread answer a station within a millisecond or so instead of 5 ms turns
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        for run in self.runs.values():
            run.service = PlannerService(run.planner, run.campaign.name, self.wake,
                                         fresh_only=run.fill_after_s is None)
            self._update_planner(run)
            run.service.start()
            self._emit("campaign_started", run, total=run.campaign.max_experiments, finished=run.finished)
        try:
            while True:
                if should_stop():
                    self.request_stop("should_stop")
                if self._stop_requested and self._draining_until is None:
                    self._draining_until = time.monotonic() + self.drain_s
                    self._emit_daemon("daemon_stopping", in_flight=len(self.in_flight), drain_s=self.drain_s)
                    self._take_back_unstarted()
                if self._draining_until is not None:
                    # a trial waiting for its lost station is waited for too: a station silent for a moment (a
                    # loaded host) is back within reconcile_s with its result, which the daemon otherwise left for
                    # its next start to take
                    if not self.in_flight or time.monotonic() > self._draining_until:
                        if self.in_flight:
                            log.warning("stopping with %d trials in flight; the next start reconciles them",
                                        len(self.in_flight))
                        break
                elif self.done() and not self._owing():
                    break
                self.step(timeout_ms=50)
                # a campaign that finishes while others run is completed now, not when the daemon exits: it
                # read "running, 6/6" in `closedloop status` and no campaign_finished came for as long as the rest ran
                for run in self.runs.values():
                    if not run.closed and self._campaign_done(run):
                        self._close(run)
        except Exception as exc:
            # the reason went to stderr alone: a service's --logfile ended at its last trial line, saying nothing
            log.critical("the daemon stops: %s: %s", type(exc).__name__, " ".join(str(exc).split())[:500],
                         exc_info=True)
            raise
        finally:
            for run in self.runs.values():
                if run.service is not None:
                    run.service.stop()
                    self._drain_service_events(run)
                if not run.closed and self._campaign_done(run):
                    self._close(run)

    def _take_back_unstarted(self, only: Station | None = None) -> None:
        """Ask each station (or ``only`` that one) to hand back the trials sent ahead to it that it has not started.
        Told nothing, it started them once its run in progress was done, after the stop: the drain waited for
        experiments begun after it, or ran out and left them 'dispatched', shown in flight with no daemon running.
        A station answers in its holdings (:meth:`_on_heartbeat`): one it dropped goes back to the queue, not as an
        attempt; one whose run had begun stays with it and is waited for. A station of an earlier release drops the
        message and runs the trial, as before."""
        by_name = {station.name: station for station in ([only] if only else self.stations.values())}
        for flight in self.in_flight.values():
            station = by_name.get(flight.station or "")
            if flight.started or flight.reconciling or station is None or flight.trial_id not in station.running:
                continue
            if self._send(station.identity, protocol.Cancel(trial_id=flight.trial_id, reason="the daemon is stopping",
                                                            unstarted_only=True)):
                flight.taken_back = True

    def _note_unserved(self) -> None:
        """Log once when no connected station serves an open campaign (its instrument or name), and once when one
        does again: such a campaign made no progress with nothing in the log, `status` or `health` saying why."""
        for run in self.runs.values():
            unserved = (not run.closed and bool(self.stations)
                        and not any(s.serves(run) for s in self.stations.values()))
            if unserved and not run.unserved:
                log.warning("campaign=%s waits: no connected station serves it (instruments %s; stations %s)",
                            run.campaign.name, ", ".join(sorted({i.target for i in run.campaign.instruments.values()})),
                            "; ".join(f"{s.name}: instruments {s.instruments}, campaigns {s.campaigns}"
                                      for s in self.stations.values()))
            elif run.unserved and not unserved and not run.closed:
                log.info("campaign=%s has a station again", run.campaign.name)
            run.unserved = unserved

    def _note_waiting_for_hand(self) -> None:
        """Say once when an open campaign has nothing left to do but wait for experiments suggested by hand: its
        budget is committed to them, and `closedloop run` sat silent after its last experiment until Ctrl-C."""
        for run in self.runs.values():
            waiting = (not run.closed and bool(run.manual_open) and not run.queue and not run.held
                       and not self._in_flight_count(run) and self._remaining(run) <= 0)
            open_now = frozenset(run.manual_open) if waiting else frozenset()
            if open_now and open_now != run.said_waiting:
                indexes = sorted(self.store.trial(t).index for t in open_now)
                log.warning("campaign=%s waits for %d experiment(s) suggested by hand: %s", run.campaign.name,
                            len(indexes), ", ".join(f"#{i}" for i in indexes))
                self._emit("waiting_for_hand", run, trials=indexes)
            run.said_waiting = open_now

    def _close(self, run: CampaignRun) -> None:
        """Mark a finished campaign completed in the store and announce it (once)."""
        run.closed = True
        if run.service is not None and run.service.exhausted is not None and not run.budget_spent():
            self._emit("space_exhausted", run, finished=run.finished, reason=run.service.exhausted)
        self.store.set_campaign_status(run.id, "completed")
        log.info("campaign=%s finished: %d experiments", run.campaign.name, run.finished)
        # a station serving only this campaign idled from here on with nothing in its log saying why
        for station in self.stations.values():
            if run.campaign.name in station.campaigns:
                self._send(station.identity, protocol.Finished(campaign=run.campaign.name))
        self._emit("campaign_finished", run, best=_result_dict(run.best), finished=run.finished)

    def _owing(self) -> bool:
        """Whether a station still owes the answer (and documents) of a run cancelled here, and may give it."""
        now, connected = time.monotonic(), {station.name for station in self.stations.values()}
        for key, deadline in list(self._owed.items()):
            if now > deadline or key[1] not in connected:
                del self._owed[key]
        return bool(self._owed)

    def _release_campaigns(self) -> None:
        for name in self._claimed:
            self.store.release(name)
        self._claimed = []

    def close(self) -> None:
        # the planner threads first: one still fitting when the interpreter exits aborts the process (torch
        # retakes the GIL after shutdown: "terminate called without an active exception"), and one that wakes
        # the loop must not find its socket closed under it. serve() stops them, unless interrupted there
        for run in self.runs.values():
            if run.service is not None:
                run.service.stop()
        self._say_unlogged_drops(math.inf)
        self._release_campaigns()
        self._close_sockets()

    def _close_sockets(self) -> None:
        """Close what :meth:`__init__` opened of the sockets, the authenticator and an own context."""
        for name in ("socket", "pub", "control", "_wake_pull", "_wake_push"):
            sock = getattr(self, name, None)  # one not made yet where binding an earlier one failed
            if sock is not None:
                sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self._own_context:
            self.context.term()
            self._own_context = False

    def step(self, timeout_ms: int = 50) -> None:
        """One turn: read messages (results in one batch), answer control, enforce timeouts, dispatch."""
        ready = dict(self.poller.poll(0 if self._dispatch_cut else timeout_ms))
        if self._wake_pull in ready:
            while True:
                try:
                    self._wake_pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
        if self.socket in ready:
            self._receive_batch()
        if self.control is not None and self.control in ready:
            self._serve_control()
        for run in self.runs.values():
            self._drain_service_events(run)
        now = time.monotonic()
        if now - self._last_check > 0.1:
            self._forgive_own_stall(now - self._last_check, now)
            self._last_check = now
            self._check_liveness()
            self._say_unlogged_drops(now)
        if now - self._last_queue_refresh > 1.0:
            self._last_queue_refresh = now
            # a PostgreSQL restart ends the sessions holding the campaigns: take them again before another daemon does
            self.store.keep_claims(self._claimed)
            for run in self.runs.values():
                if run.approve or _HELD is not None:
                    for trial in run.refresh_queue():  # issue 7: rejected by a person, a known-bad point
                        run.finished += 1
                        self._update_planner(run, [Result(trial.parameters, None, trial.index)])
                        self._emit("trial_failed", run, trial=trial.index, error=trial.error, finished=run.finished)
            for run in self.runs.values():
                self._learn_told(run)
        self._dispatch()
        for run in self.runs.values():
            if run.service is not None:
                run.service.begin()

    def _learn_told(self, run: CampaignRun) -> None:
        """Results told by hand (`closedloop tell`) while this daemon serves the campaign: counted and learned."""
        told = run.told()
        if not told:
            return
        observations = self.store.observations_of(t.id for t in told)  # type: ignore[misc]
        results = []
        for trial in told:
            observed = observations.get(trial.id)  # type: ignore[arg-type]
            values = observed.values if observed is not None and trial.status == TrialStatus.completed.value else None
            result = Result(trial.parameters, values, trial.index)
            results.append(result)
            if values is None:
                self._emit("trial_failed", run, trial=trial.index, error=trial.error, finished=run.finished)
                continue
            is_best = run._consider_best(result)
            self._emit("trial_completed", run, trial=trial.index, parameters=trial.parameters, values=values,
                       noise=None, run_uid=observed.run_uid if observed is not None else None, duration_s=None,
                       best=_result_dict(run.best), is_best=is_best, finished=run.finished, spent=run.spent)
            if is_best:
                self._emit("best", run, **(_result_dict(run.best) or {}))
            if run.goal_reached(values) and not run.stopping:
                run.stopping = True
                self._emit("goal_reached", run, rule=run.campaign.budget.stop_when, trial=trial.index)
        self._update_planner(run, results)

    # -- intake -----------------------------------------------------------------------------

    def _receive_batch(self, limit: int = 1000, limit_s: float = 0.1) -> None:
        results: list[tuple[bytes, protocol.ResultMessage]] = []
        # bounded in time too: a thousand 1 MiB frames take seconds to parse, and `closedloop health` (3 s) went
        # unanswered while peers sent them
        deadline = time.monotonic() + limit_s
        for _ in range(limit):
            if time.monotonic() > deadline:
                break
            try:
                frames, key_name = self._recv()
            except zmq.Again:
                break
            message = self._parse(frames, key_name)
            if message is None:
                continue
            identity, msg = message
            if isinstance(msg, protocol.ResultMessage):
                results.append((identity, msg))
                continue
            handler = {
                protocol.Hello: self._on_hello,
                protocol.Heartbeat: self._on_heartbeat,
                protocol.Started: self._on_started,
                protocol.Failure: self._on_failure,
            }.get(type(msg))
            if handler is None:
                self._drop(identity, f"unexpected {msg.type} message")
                continue
            try:
                handler(identity, msg)
            except StoreError as exc:
                self._drop(identity, f"{msg.type}: {exc}")
        if results:
            self._intake(results)

    def _recv(self) -> tuple[list[bytes], str | None]:
        """A message's frames and, with keys, the name of the key its connection holds (ZAP's User-Id)."""
        if self.keys is None:
            return self.socket.recv_multipart(zmq.NOBLOCK), None
        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        try:
            key_name = frames[-1].get("User-Id")
        except zmq.ZMQError:  # never after a CURVE handshake, which ZAP answers with the key's name
            key_name = ""
        return [frame.bytes for frame in frames], key_name

    def _parse(self, frames: list[bytes], key_name: str | None = None) -> tuple[bytes, Any] | None:
        if len(frames) != 2:
            self._drop(frames[0] if frames else b"", f"a message of {len(frames)} frames")
            return None
        identity, frame = frames
        if key_name is not None and identity != key_name.encode():
            # with keys a station's name is its key's (keys.py): any allowed key could otherwise say hello as
            # another station and take its trials, or, in the seconds before a station that left is counted
            # lost, connect under its routing id and report results for the trials it held
            self._drop(identity, f"the connection holds the key of station {key_name!r}")
            self._send(identity, protocol.Refused(reason=f"this station's key admits only a station named "
                                                  f"{key_name!r} (the name of its file in the allowed directory)"))
            return None
        try:
            message = protocol.decode(frame)
        except protocol.VersionMismatch as exc:
            self._drop(identity, str(exc))
            self._send_raw(identity, protocol.refusal_for(exc))
            return None
        except protocol.UnknownField as exc:
            self._drop(identity, str(exc))
            # dropped in silence, a newer station waits for ever for a welcome, or for acks, with no word of why
            self._send(identity, protocol.Refused(reason=f"{exc}: the station is of a later closedloop release than "
                                                  "this daemon; upgrade the daemon before its stations"))
            return None
        except ProtocolError as exc:
            self._drop(identity, str(exc))
            return None
        station = self.stations.get(identity)
        if station is not None:
            station.last_seen = time.monotonic()
        elif not isinstance(message, protocol.Hello):
            # results and the rest only from registered stations; a restarted daemon meets this first
            self.stats["dropped"] += 1
            self._reply_if_connected(identity, protocol.Refused(reason="unregistered: send hello"))
            return None
        return identity, message

    def _drop(self, identity: bytes, why: str) -> None:
        self.stats["dropped"] += 1
        self._say_dropped(identity, "dropped", why)

    def _say_dropped(self, identity: bytes, what: str, why: str) -> None:
        key, now = (identity, what), time.monotonic()
        drops = self._drops.get(key)
        if drops is None or now - drops.since >= DROP_WINDOW_S:
            if drops is not None:
                self._say_unlogged(key, drops)
            drops = self._drops[key] = _Drops(now)
        if drops.logged < DROPS_LOGGED:
            drops.logged += 1
            log.warning("%s a message %s %r: %s", what, "from" if what == "dropped" else "to", identity[:64], why)
        else:
            drops.unlogged += 1
            drops.last = why

    def _say_unlogged_drops(self, now: float) -> None:
        """Close the windows that have ended (all, at ``now`` infinite), saying what each did not log."""
        for key, drops in list(self._drops.items()):
            if now - drops.since >= DROP_WINDOW_S:
                del self._drops[key]
                self._say_unlogged(key, drops)

    @staticmethod
    def _say_unlogged(key: tuple[bytes, str], drops: _Drops) -> None:
        identity, what = key
        if drops.unlogged:
            log.warning("%s %d more messages %s %r within %.0f s of the %d logged above; the last: %s", what,
                        drops.unlogged, "from" if what == "dropped" else "to", identity[:64], DROP_WINDOW_S,
                        drops.logged, drops.last)

    def _intake(self, batch: list[tuple[bytes, protocol.ResultMessage]]) -> None:
        """Validate, store in one transaction, then acknowledge and tell the planners."""
        items, accepted = [], []
        for identity, result in batch:
            flight = self.in_flight.get(result.trial_id)
            station = self.stations[identity]
            self._owed.pop((result.trial_id, station.name), None)
            if not ((flight is not None and flight.station == station.name) or result.trial_id in station.declared):
                # only the station a trial was given to (or one that re-registered holding its result) may report it
                self._drop(identity, f"result for trial {result.trial_id}, which station {station.name} does not hold")
                continue
            if flight is not None:
                if flight.station != station.name and not self._was_given(station, result):
                    self._drop(identity, f"result for trial {result.trial_id}, which was never given to station "
                                         f"{station.name} (it is in flight on {flight.station})")
                    continue
                run, index, parameters = self.runs[flight.campaign_id], flight.index, flight.parameters
            else:
                try:
                    trial = self.store.trial(result.trial_id)
                except StoreError as exc:
                    self._drop(identity, f"result: {exc}")
                    continue
                if trial.station != station.name and not self._was_given(station, result):
                    # a hello may list any trial: listing one is no claim to it
                    self._drop(identity, f"result for trial {result.trial_id}, which was never given to station "
                                         f"{station.name}")
                    if trial.status in FINISHED_STATUSES:
                        # finished: nothing will ever take it, so the station may forget it. Left unacknowledged,
                        # a result measured before a daemon restart, whose trial was run again elsewhere since
                        # (its station back after reconcile_s), stayed in that station's outbox for good, sent
                        # again and dropped at each registration. Acknowledging it changes no stored row; its values
                        # go to the log, the only record left of them (a forged one's too, which is harmless there)
                        log.warning("trial %s: result of run %s from station %s acknowledged, not kept (the trial is "
                                    "%s and was not given to it): %s", result.trial_id, result.run_uid, station.name,
                                    trial.status, result.values)
                        self._send(identity, protocol.Ack(trial_id=result.trial_id, assignment=result.assignment))
                        self._acknowledged(station, result.trial_id)
                    continue
                run = self.runs.get(trial.campaign_id)  # type: ignore[assignment]
                if run is None:
                    self._leave_unrun(station, result.trial_id, "result")
                    continue
                index, parameters = trial.index, trial.parameters
            missing = set(run.campaign.outputs) - set(result.values)
            if missing:
                self._drop(identity, f"result for trial {result.trial_id}: missing outputs {sorted(missing)}")
                continue
            values = {k: result.values[k] for k in run.campaign.outputs}
            noise = {k: v for k, v in (result.noise or {}).items() if k in values} or None
            items.append((result.trial_id, result.run_uid, values, noise, result.duration_s))
            # an earlier attempt's result on the station that now holds a retry: the retry must not run
            retry_here = flight is not None and flight.station == station.name and not flight.answered_by(result)
            accepted.append((identity, result, run, index, parameters, values, retry_here))
        if not items:
            return
        outcomes = self.store.record_results(items)
        ingest: dict[int, list[Result]] = {}
        replies: list[tuple[bytes, protocol.Ack | protocol.Cancel]] = []  # sent once the documents are kept
        for (identity, result, run, index, parameters, values, retry_here), outcome in zip(accepted, outcomes):
            station_name = self.stations[identity].name
            if isinstance(outcome, str):
                self._drop(identity, f"result refused: {outcome}")
                try:
                    status = self.store.trial(result.trial_id).status
                except StoreError:
                    continue
                if status not in (TrialStatus.proposed.value, TrialStatus.dispatched.value):
                    # the trial is finished: acknowledging lets the station forget a result the store will never
                    # take, so its reading stays on record here and in the run's documents (kept below), and the
                    # trial keeps the run among its attempts' and its values as a late result: it took place at the
                    # instrument, and was acknowledged. Only a result answering an assignment of its own, not yet
                    # answered, is another run: a second answer to one assignment (a station reporting its trial
                    # again under a new run uid) is logged, not kept, or any station could grow a finished row
                    if self._answered(result.assignment, result.trial_id, station_name):
                        self.store.record_run(result.trial_id, result.run_uid, values)
                        log.warning("trial %s is %s: late result %s of run %s not stored as an observation",
                                    result.trial_id, status, values, result.run_uid)
                    else:
                        log.warning("trial %s is %s: result %s of run %s from station %s answers no assignment of "
                                    "its that is still open: not kept", result.trial_id, status, values,
                                    result.run_uid, station_name)
                    replies.append((identity, protocol.Ack(trial_id=result.trial_id, assignment=result.assignment)))
                continue
            replies.append((identity, protocol.Ack(trial_id=result.trial_id, assignment=result.assignment)))
            if outcome is False:
                self.stats["duplicates"] += 1
                self._release(result.trial_id)
                continue
            self.stats["results"] += 1
            self._answered(result.assignment, result.trial_id, station_name)
            self._release(result.trial_id, cancel_elsewhere=identity)
            if retry_here:
                replies.append((identity, protocol.Cancel(trial_id=result.trial_id, reason="result already stored")))
            resting = self.stations[identity].resting
            if resting:
                resting.pop(_instrument_label(run.campaign.instrument_for(parameters)), None)
            run.count_finished(parameters)
            if result.duration_s is not None:
                run.timed, run.longest_s = run.timed + 1, max(run.longest_s, result.duration_s)
            finished = Result(parameters, values, index)
            ingest.setdefault(run.id, []).append(finished)
            is_best = run._consider_best(finished)
            self._transition(run, index, result.trial_id, "completed", values=values, run_uid=result.run_uid,
                             duration_s=result.duration_s)
            self._emit("trial_completed", run, trial=index, parameters=parameters, values=values,
                       noise=result.noise, run_uid=result.run_uid, duration_s=result.duration_s,
                       best=_result_dict(run.best), is_best=is_best, finished=run.finished, spent=run.spent)
            if is_best:
                self._emit("best", run, **(_result_dict(run.best) or {}))
            if run.goal_reached(values) and not run.stopping:
                run.stopping = True
                self._emit("goal_reached", run, rule=run.campaign.budget.stop_when, trial=index)
        for campaign_id, results in ingest.items():
            self._update_planner(self.runs[campaign_id], results)
        # the stations freed get their next experiments before the documents are written, which then takes place
        # while those run (a millisecond sooner each, out of five); nothing is acknowledged before its documents
        # are on disk: a stored result whose documents are not is sent again, a duplicate, and they are kept then
        self._dispatch()
        for identity, result, *_ in accepted:
            self._keep_documents(result.trial_id, result.run_uid, result.documents)
        for identity, reply in replies:
            self._send(identity, reply)
            station = self.stations.get(identity)
            if isinstance(reply, protocol.Ack) and station is not None:
                self._acknowledged(station, reply.trial_id)

    def _was_given(self, station: Station, result: protocol.ResultMessage) -> bool:
        """Whether this daemon gave the result's trial to ``station`` (an earlier attempt's, re-queued since)."""
        return (self._sent_to(result.assignment, result.trial_id, station.name)
                or result.trial_id in self._given.get(station.name, ())
                or self._left_behind.get(result.trial_id) == station.name)

    def _answered(self, assignment: str | None, trial_id: int, station: str) -> bool:
        """Whether ``assignment`` was sent to ``station`` for ``trial_id`` and not yet answered; it is answered now,
        so that a second answer to it is not taken as the record of another run."""
        if not self._sent_to(assignment, trial_id, station):
            return False
        del self._sent[assignment]  # type: ignore[arg-type]
        return True

    def _sent_to(self, assignment: str | None, trial_id: int, station: str) -> bool:
        """Whether ``assignment`` is an assign of ``trial_id`` this daemon sent ``station`` (the latest _SENT_KEPT)."""
        return assignment is not None and self._sent.get(assignment) == (trial_id, station)

    def _keep_documents(self, trial_id: int, run_uid: str | None, documents: str | None) -> None:
        """A run's Bluesky documents, kept before its result or failure is acknowledged.

        Documents the store refuses (a forged or mislabelled run) are dropped; a write that fails (a full disk)
        stops the daemon like a failed store write: it had acknowledged the result all the same, and the station
        deleted the run's only other copy of its documents."""
        if not documents or not run_uid:
            return
        try:
            self.store.save_documents(run_uid, documents)
        except StoreError as exc:
            log.warning("trial %s: documents of run %s not kept: %s", trial_id, run_uid, exc)
        except OSError as exc:
            # said at 3 a.m. as 'OSError: [Errno 28] No space left on device': which disk, and is anything lost?
            raise StoreUnwritable(
                f"cannot keep the documents of run {run_uid} (trial {trial_id}) in {self.store.documents_dir.absolute()}: "
                f"{exc.strerror or exc}; the daemon stops, and nothing unstored was acknowledged (the station keeps "
                "the result and sends it again): free space there and start the daemon again") from None

    def _send(self, identity: bytes, message: Any) -> bool:
        return self._send_raw(identity, protocol.encode(message), message.type)

    def _send_raw(self, identity: bytes, payload: bytes, kind: str = "refused") -> bool:
        try:
            self.socket.send_multipart([identity, payload], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # the peer is gone (ROUTER_MANDATORY) or its queue is full
            self._say_dropped(identity, "could not send", f"{kind}: {exc}")
            return False

    def _reply_if_connected(self, identity: bytes, message: Any) -> bool:
        """Answer a message that may have come over a connection closed since: the hellos and heartbeats a station
        queued while no daemon answered, read after it opened a new connection and said hello on that one. Its
        answer cannot leave, which is no fault (the new connection is answered), so it is not logged as one."""
        try:
            self.socket.send_multipart([identity, protocol.encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.debug("no %s to %r: the connection it came over is gone (%s)", message.type, identity[:64], exc)
            return False

    # -- handlers -----------------------------------------------------------------------------

    def _on_hello(self, identity: bytes, hello: protocol.Hello) -> None:
        if identity != hello.station.encode():
            # a station's routing id is its name (connect_station): a hello naming another station would take
            # that station's trials, re-queue the one it runs and hand it out again, to be measured twice
            self._drop(identity, f"hello names station {hello.station!r}, not this connection's routing id")
            self._send(identity, protocol.Refused(reason="a station's hello must name its own routing id"))
            return
        now = time.monotonic()
        current = self.stations.get(identity)
        if (current is not None and hello.instance and hello.instance == current.instance
                and hello.welcomed == current.welcomed):
            # the same process asking again before our welcome reached it: its session stands, with what
            # was dispatched in it since. A new session would re-queue those trials (this hello cannot list
            # them) while the station, welcomed into the first one, runs them: a trial measured twice
            self._send(identity, protocol.Welcome(heartbeat_s=self.heartbeat_s, session=current.session))
            return
        # welcomed first, so that nothing is registered over a connection closed since the hello: a station
        # waiting for a daemon that is still starting opens a new one after five silent heartbeats, and says
        # hello on it. Registered from the closed one's queued hellos, its session's welcome and assigns went
        # nowhere ("could not send ... welcome: Host unreachable", six lines a station at a daemon's start)
        # until the new hello registered it again and re-queued what had been sent
        if not self._reply_if_connected(identity, protocol.Welcome(heartbeat_s=self.heartbeat_s,
                                                                   session=self._session + 1)):
            return
        self._session += 1
        previous = self.stations.pop(identity, None)
        holds = set(hello.outstanding)
        station = Station(hello.station, identity, hello.instruments, hello.campaigns, hello.capacity, self._session,
                          now, sources=hello.sources, declared=holds, prefetch=self.prefetch, instance=hello.instance,
                          welcomed=hello.welcomed)
        for trial_id, flight in list(self.in_flight.items()):
            if trial_id in holds and flight.station == hello.station:
                # the station still has it (running, queued or in its outbox): it stays there. (Any station listing
                # a trial that waits to be reconciled had taken it over, and its result was stored.) A reconciled
                # trial's deadline was the grace for its station to come back, not the experiment's timeout
                # (kept, a campaign with no timeout cancelled a running experiment reconcile_s after a restart)
                if flight.reconciling or (flight.deadline is not None
                                          and flight.deadline < now + self.heartbeat_s * self.lost_after):
                    flight.deadline = self._deadline(self.runs[flight.campaign_id], started=flight.started)
                if flight.lost:
                    log.info("station %s came back holding trial %s: it stays there", hello.station, trial_id)
                flight.station, flight.reconciling, flight.lost, flight.behind = hello.station, False, None, False
                station.running[trial_id] = flight.dispatched
            elif flight.station == hello.station and flight.lost:
                # back without it (restarted, the run lost with the process): the attempt failed as the station did
                self._give_up_waiting(flight)
            elif (flight.station == hello.station and flight.started and previous is not None and hello.instance
                  and previous.instance and hello.instance != previous.instance):
                # it said it started the run, and another process of the station comes back without it before it
                # was declared lost (restarted at once, as systemd's Restart=always does): the run was lost with the
                # process, an attempt as above. Taken for an assign that never arrived, it went back to the queue
                # whatever execution.retries said: with retries: 0 a trial was run 4 times, and one that kills its
                # station looped for good. (The same process saying so has cut the run short itself, a second
                # Ctrl-C: that trial goes back to the queue as never run, below.)
                self._fail(self.runs[flight.campaign_id], flight,
                           f"station {hello.station} restarted while running it: the run was lost with its process",
                           retry=True, status=TrialStatus.abandoned)
            elif flight.station == hello.station:
                # dispatched to this station, which does not have it: the assign was lost (or the station
                # restarted before it ran): it never ran, so it goes back to the queue
                self._requeue_missing(flight, f"station {hello.station} re-registered without it")
        # only trials this daemon knows (open here, or once given to this station) are answered: the list is the
        # station's word, and a cancel for each of 100 000 listed ids held the loop for seconds
        known = set(self.in_flight).union(self._given.get(hello.station, ()), *(r.queue for r in self.runs.values()))
        for trial_id in (holds - set(station.running)) & known:
            if self._adopt(trial_id, station):
                continue
            # not this station's any more (run elsewhere, finished): it must not run here; a result
            # already in its outbox still arrives and is stored or acknowledged on its merits
            self._send(identity, protocol.Cancel(trial_id=trial_id, reason="not assigned to this station"))
        self.stations[identity] = station
        # what it does not list it no longer holds, and an assign of an earlier session is ignored there
        self._prune_given(hello.station, keep=holds | set(station.running))
        shown = sorted(holds)[:20]  # a hello may list 100 000: one log line each must not fill the rotated logs
        log.info("station %s registered (session %d, capacity %d, instruments %s, campaigns %s, holds %s%s)",
                 hello.station, station.session, hello.capacity, str(hello.instruments)[:500],
                 str(hello.campaigns)[:500], shown, f" and {len(holds) - len(shown)} more" if len(holds) > 20 else "")
        # a station keeps an operator's pause until it hears the resume, which a daemon killed since never sends:
        # tell one welcomed before where it stands (paused only for a paused campaign it holds), or it held every
        # later trial, and `closedloop resume` (nothing paused here) never reached it
        held = [r for r in self.runs.values() if r.paused and (hello.station in r.paused_on or any(
            self.in_flight[t].campaign_id == r.id for t in station.running if t in self.in_flight))]
        for run in held:
            run.paused_on.add(hello.station)
        if held or hello.welcomed:
            self._send(identity, protocol.Control(action="pause" if held else "resume", reason="registered"))
        for run in self.runs.values():
            if run.closed and run.campaign.name in hello.campaigns:
                self._send(identity, protocol.Finished(campaign=run.campaign.name))
        if previous is None:
            self._emit_daemon("station_joined", station=hello.station, capacity=hello.capacity)
        if self._draining_until is not None:
            # registered again during the drain (its connection dropped, the take-back lost with it): asked once,
            # it started what it still held once its run was done, after the stop
            self._take_back_unstarted(only=station)
        for run in self.runs.values():
            self._update_planner(run)

    def _adopt(self, trial_id: int, station: Station) -> bool:
        """Give a re-queued trial back to the station that comes back holding it (it was declared lost, and
        is still running the experiment or holds its result): the same attempt, not a second run."""
        if self._left_behind.get(trial_id) != station.name:
            return False  # re-queued for another reason (its attempt failed): a held failure is a late one
        run = next((r for r in self.runs.values() if trial_id in r.queue), None)
        if run is None or trial_id in self.in_flight:
            return False
        try:
            trial = self.store.mark_dispatched(trial_id, station.name, attempted=False)
        except StoreError:
            return False
        run.queue.remove(trial_id)
        flight = InFlight(trial_id, run.id, trial.index, trial.parameters, station.name,
                          self._deadline(run, started=False))
        self.in_flight[trial_id] = flight
        station.running[trial_id] = flight.dispatched
        log.info("station %s came back holding trial %s: it stays there", station.name, trial_id)
        self._transition(run, trial.index, trial_id, "dispatched", station=station.name, attempt=trial.attempts,
                         reason="the station came back holding it")
        self._emit("trial_dispatched", run, trial=trial.index, station=station.name, parameters=trial.parameters)
        return True

    def _requeue_missing(self, flight: InFlight, reason: str) -> None:
        """A trial its station does not hold (the assign never reached it, or it handed the trial back unstarted
        when asked at a stop: said as such) goes back to the front of the queue."""
        why, level = "station does not hold it", logging.WARNING
        if flight.taken_back:
            # the usual course of a stop, not a lost assignment
            reason = f"station {flight.station} handed it back unstarted as the daemon stops"
            why, level = "handed back unstarted: the daemon is stopping", logging.INFO
        run = self.runs[flight.campaign_id]
        self._release(flight.trial_id)
        # not an attempt: nothing ran (with `retries: 1` the trial's one real failure afterwards had been final)
        self.store.requeue(flight.trial_id, reason, attempted=False)
        run.queue.appendleft(flight.trial_id)
        log.log(level, "trial %s: %s; it goes back to the queue", flight.trial_id, reason)
        self._transition(run, flight.index, flight.trial_id, "requeued", reason=why)
        self._emit("trial_requeued", run, trial=flight.index, reason=why)

    def _unrun_campaign(self, trial_id: int) -> str | None:
        """The campaign of a trial in the store that this daemon does not run; None for its own or an unknown one."""
        if trial_id in self._unrun:
            return self._unrun[trial_id]
        try:
            trial = self.store.trial(trial_id)
        except StoreError:
            return None
        if trial.campaign_id in self.runs:
            return None
        try:
            name = self.store.campaign_row(trial.campaign_id).name
        except StoreError:
            name = f"#{trial.campaign_id}"
        self._unrun[trial_id] = name
        return name

    def _leave_unrun(self, station: Station, trial_id: int, what: str) -> None:
        """A trial of a campaign this daemon does not run stays with its station: its experiment runs on, and its
        answer stays in the station's outbox, unacknowledged, for a daemon that runs the campaign to store."""
        campaign = self._unrun_campaign(trial_id) or "?"
        said = (trial_id, station.name, what)
        if said in self._unrun_said:
            return
        self._unrun_said.add(said)
        log.warning("station %s holds a %s of trial %s of campaign %s, which this daemon does not run: left with the "
                    "station (kept in its outbox) for a daemon that runs %s", station.name, what, trial_id, campaign,
                    campaign)

    def _on_heartbeat(self, identity: bytes, heartbeat: protocol.Heartbeat) -> None:
        station = self.stations[identity]
        if len(heartbeat.running) > station.capacity + station.prefetch:
            # it cannot run more than it was given; each listed trial not its own is answered with a cancel, and
            # five heartbeats listing 100 000 held the loop 14 s (stations are lost after 5) and logged 400 000 lines
            self._drop(identity, f"heartbeat lists {len(heartbeat.running)} running trials; station {station.name} "
                                 f"has capacity {station.capacity}")
            return
        ping = protocol.Heartbeat()
        if self._send(identity, ping):
            station.pings[ping.msg_id] = time.monotonic()
        sent = station.pings.get(heartbeat.seen or "")
        if heartbeat.holds is not None and sent is not None:
            # the station listed what it holds after reading our heartbeat sent at `sent`; an assign sent
            # before that one went down the same connection, so if it is not listed it never arrived (lost
            # in a reconnect): without this, a campaign with no timeout would wait for it forever
            station.pings = {k: t for k, t in station.pings.items() if t >= sent}
            holds = set(heartbeat.holds)
            for trial_id, dispatched in list(station.running.items()):
                flight = self.in_flight.get(trial_id)
                if (dispatched < sent and trial_id not in holds and flight is not None
                        and flight.station == station.name and not flight.reconciling):
                    self._requeue_missing(flight, f"station {station.name} does not hold it")
                    self._update_planner(self.runs[flight.campaign_id])
        elif len(station.pings) > 16:  # a station that never names them (an older one): keep a few
            station.pings = dict(list(station.pings.items())[-8:])
        for trial_id in heartbeat.running:
            flight = self.in_flight.get(trial_id)
            if flight is None and self._unrun_campaign(trial_id) is not None:
                # a daemon killed with it in flight; restarted without its campaign, this one cancelled the
                # experiment, and its aborted run was then run again when the campaign was served again
                self._leave_unrun(station, trial_id, "running experiment")
                continue
            if flight is None or (flight.station != station.name and not flight.reconciling):
                if trial_id not in station.running:
                    self._send(identity, protocol.Cancel(trial_id=trial_id, reason="not assigned to this station"))

    def _on_started(self, identity: bytes, started: protocol.Started) -> None:
        flight = self.in_flight.get(started.trial_id)
        station = self.stations[identity]
        if flight is None or flight.station != station.name or not flight.answered_by(started):
            return
        # taken_back: the station had begun it when asked to hand it back, so it stays there and is waited for
        flight.reconciling, flight.lost, flight.behind, flight.started, flight.taken_back = False, None, False, True, False
        run = self.runs[flight.campaign_id]
        flight.deadline = self._deadline(run, started=True)
        self._transition(run, flight.index, flight.trial_id, "started", station=station.name)
        self._emit("trial_started", run, trial=flight.index, station=station.name)

    def _on_failure(self, identity: bytes, failure: protocol.Failure) -> None:
        flight = self.in_flight.get(failure.trial_id)
        station = self.stations[identity]
        self._owed.pop((failure.trial_id, station.name), None)
        if flight is None and self._unrun_campaign(failure.trial_id) is not None:
            # acknowledged here, the station forgot it: the daemon that runs its campaign then found the trial held
            # by no station and ran it again, as if the device had never failed
            self._leave_unrun(station, failure.trial_id, "failure")
            return
        if flight is None or flight.station != station.name or not flight.answered_by(failure):
            # late (timed out, cancelled, re-queued) or unknown: the store already says what happened, except
            # for the run the station had opened (a timed-out run reports its failure once aborted)
            log.info("failure of trial %s from %s ignored: not in flight there (run %s: %s)", failure.trial_id,
                     station.name, failure.run_uid or "-", failure.error[:200])
            if failure.run_uid and self._answered(failure.assignment, failure.trial_id, station.name):
                self._keep_documents(failure.trial_id, failure.run_uid, failure.documents)
                self.store.record_run(failure.trial_id, failure.run_uid)
            self._send(identity, protocol.Ack(trial_id=failure.trial_id, assignment=failure.assignment))
            self._acknowledged(station, failure.trial_id)
            return
        run = self.runs[flight.campaign_id]
        self._keep_documents(failure.trial_id, failure.run_uid, failure.documents)
        self._answered(failure.assignment, failure.trial_id, station.name)
        if failure.unavailable and not failure.run_uid:
            self._rest(run, flight, station, failure.error)
        else:
            self._fail(run, flight, failure.error, retry=True, run_uid=failure.run_uid)
        self._send(identity, protocol.Ack(trial_id=failure.trial_id, assignment=failure.assignment))
        self._acknowledged(station, failure.trial_id)

    def _rest(self, run: CampaignRun, flight: InFlight, station: Station, error: str) -> None:
        """The station could not reach the trial's instrument, so nothing ran: the trial goes back to the front
        of the queue, not counted as an attempt nor shown to the planner as a failure, and the station gets
        none of that instrument's trials until its rest is over (the trial may go to another station)."""
        instrument = run.campaign.instrument_for(flight.parameters)
        label = _instrument_label(instrument)
        _, last = station.resting.get(label, (0.0, 0.0))
        rest = min(REST_LONGEST_S, 2 * last) if last else REST_FIRST_S
        station.resting[label] = (time.monotonic() + rest, rest)
        self._release(flight.trial_id)
        self.store.requeue(flight.trial_id, error, attempted=False)
        run.queue.appendleft(flight.trial_id)
        log.warning("station %s could not reach %s (%s); its trials wait, next try in %.0f s", station.name, label,
                    error[:200], rest)
        self._transition(run, flight.index, flight.trial_id, "requeued", reason=error, station=station.name,
                         instrument_unavailable=True)
        self._emit("trial_requeued", run, trial=flight.index, reason=error)
        self._emit_daemon("instrument_unavailable", station=station.name, instrument=instrument.target,
                          options=instrument.options, error=error[:500], retry_in_s=rest)
        self._update_planner(run)

    def _fail(self, run: CampaignRun, flight: InFlight, error: str, *, retry: bool,
              status: TrialStatus = TrialStatus.failed, run_uid: str | None = None) -> None:
        """Retry the trial if the campaign allows another attempt, else record it failed (or abandoned); either
        way the store keeps ``run_uid``, the Bluesky run of the failed attempt when it opened one."""
        self._release(flight.trial_id)
        trial = self.store.trial(flight.trial_id)
        if retry and trial.attempts <= run.campaign.execution.retries and trial.status == TrialStatus.dispatched.value:
            self.store.requeue(flight.trial_id, error, run_uid)
            run.queue.append(flight.trial_id)
            self._transition(run, flight.index, flight.trial_id, "requeued", reason=error, attempts=trial.attempts,
                             run_uid=run_uid)
            self._emit("trial_requeued", run, trial=flight.index, reason=error, run_uid=run_uid)
            return
        if self.store.record_failure(flight.trial_id, error, status, run_uid):
            run.count_finished(flight.parameters)
            if status == TrialStatus.failed:
                # a failure teaches the planner to avoid the region; an abandoned trial says nothing about it
                self._update_planner(run, [Result(flight.parameters, None, flight.index)])
            self._transition(run, flight.index, flight.trial_id, status.value, error=error, run_uid=run_uid)
            self._emit(f"trial_{status.value}", run, trial=flight.index, error=error, run_uid=run_uid,
                       finished=run.finished, spent=run.spent, best=_result_dict(run.best))
        self._update_planner(run)

    def _release(self, trial_id: int, cancel_elsewhere: bytes | None = None) -> None:
        self.in_flight.pop(trial_id, None)
        self._left_behind.pop(trial_id, None)
        for station in self.stations.values():
            if station.running.pop(trial_id, None) is not None and cancel_elsewhere not in (None, station.identity):
                # the result came from another station (an outbox after a re-queue): stop the duplicate run
                self._send(station.identity, protocol.Cancel(trial_id=trial_id, reason="result already stored"))

    def _acknowledged(self, station: Station, trial_id: int) -> None:
        """The station's answer for the trial is acknowledged, so it deletes it: unless the trial is in flight
        there again (a retry), the station holds it no more and need not be remembered as given to it."""
        flight = self.in_flight.get(trial_id)
        if flight is None or flight.station != station.name:
            self._prune_given(station.name, drop=trial_id)

    def _prune_given(self, name: str, *, keep: set[int] | None = None, drop: int | None = None) -> None:
        given = self._given.get(name)
        if given is None:
            return
        if keep is not None:
            given &= keep
        if drop is not None:
            given.discard(drop)
        if not given:
            del self._given[name]

    # -- timeouts and lost stations -------------------------------------------------------------

    def _deadline(self, run: CampaignRun, *, started: bool) -> float | None:
        timeout = run.campaign.execution.timeout
        if not timeout:
            return None
        return time.monotonic() + float(timeout) + (0 if started else self.start_grace_s)

    def _forgive_own_stall(self, since_last_check: float, now: float) -> None:
        """A station is not silent while this loop was not listening: a host too busy to run it for a moment (or
        frozen, stations and all) had every station declared lost on waking, before any could beat again, and each
        reconnected under a new session with its trials reconciling. The time the loop missed is not counted."""
        for station in self.stations.values():
            station.last_seen = protocol.heard_allowing_for(since_last_check, station.last_seen, now)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for identity, station in list(self.stations.items()):
            if now - station.last_seen > self.lost_after * self.heartbeat_s:
                log.warning("station %s lost (silent for %.1f s)", station.name, now - station.last_seen)
                del self.stations[identity]
                self._emit_daemon("station_lost", station=station.name, trials=sorted(station.running))
                flights = [f for f in (self.in_flight.get(t) for t in station.running) if f is not None]
                busy = any(f.started for f in flights)
                for trial_id in list(station.running):
                    flight = self.in_flight.get(trial_id)
                    if flight is not None:
                        run = self.runs[flight.campaign_id]
                        # it may still be running there, or done with its result in the outbox, or queued to start
                        # (a frozen host, a partition, a restart): re-queued at once, it was measured again on the
                        # next free station, and the station, back seconds later, delivered its own run as a late
                        # result (or started its queued trial before the cancel reached it). It waits for its
                        # station as after a daemon restart; the retry policy decides only if it does not return
                        flight.behind = busy and flight.assignment is not None and not flight.started
                        flight.reconciling = True
                        flight.lost = f"station {station.name} lost" + (" before starting it" if flight.behind else "")
                        flight.deadline = now + self.reconcile_s
                        log.warning("trial %s: station %s lost while it held it; waiting %.0f s for it to come back",
                                    trial_id, station.name, self.reconcile_s)
                        self._transition(run, flight.index, trial_id, "reconciling", station=station.name,
                                         reason=flight.lost)
        self._say_running_long(now)
        self._note_unserved()
        self._note_waiting_for_hand()
        # stations holding their RunEngines for a paused campaign: every trial there waits, whatever its campaign
        held = set().union(*(r.paused_on for r in self.runs.values() if r.paused))
        for flight in list(self.in_flight.values()):
            if flight.deadline is None or now <= flight.deadline:
                continue
            run = self.runs[flight.campaign_id]
            if not flight.reconciling and (run.paused or flight.station in held):
                continue  # its station holds it for the operator; the clock restarts on resume
            if flight.reconciling:
                self._give_up_waiting(flight)
                continue
            for station in self.stations.values():
                if flight.trial_id in station.running:
                    self._send(station.identity, protocol.Cancel(trial_id=flight.trial_id, reason="timed out"))
                    self._owed[(flight.trial_id, station.name)] = now + OWED_GRACE_S
            self._fail(run, flight, f"timed out after {run.campaign.execution.timeout} s", retry=True)

    def _give_up_waiting(self, flight: InFlight) -> None:
        """A trial waited for in vain for its station (or one back without it): the retry policy decides."""
        run = self.runs[flight.campaign_id]
        why = flight.lost or f"station {flight.station} did not come back after a daemon restart"
        if flight.behind:
            # queued behind the run in progress, never started: nothing ran, so it goes back to the front of the
            # queue (abandoned, with no retries, it was an experiment of the budget that no instrument ran). Without
            # a run in progress it may be what killed the station, and it follows the retry policy
            self._release(flight.trial_id)
            self.store.requeue(flight.trial_id, why, attempted=False)
            run.queue.appendleft(flight.trial_id)
            self._transition(run, flight.index, flight.trial_id, "requeued", reason=why)
            self._emit("trial_requeued", run, trial=flight.index, reason=why)
            self._update_planner(run)
        else:
            self._fail(run, flight, why, retry=True, status=TrialStatus.abandoned)
        if flight.lost and flight.station and flight.trial_id in run.queue:
            self._left_behind[flight.trial_id] = flight.station

    def _say_running_long(self, now: float) -> None:
        """Log (once) and publish an experiment with no timeout that has run far longer than any completed one:
        an unattended station may be waiting on a hung device."""
        for flight in self.in_flight.values():
            run = self.runs[flight.campaign_id]
            if flight.said_long or flight.deadline is not None or run.paused:
                continue
            elapsed = now - flight.dispatched
            if runs_long(elapsed, run.longest_s, run.timed):
                flight.said_long = True
                log.warning("campaign %s trial %s on station %s: running for %.0f s; the longest completed experiment "
                            "took %.0f s and the campaign has no timeout (a hung device?)", run.campaign.name,
                            flight.index, flight.station, elapsed, run.longest_s)
                self._emit("trial_running_long", run, trial=flight.index, station=flight.station, elapsed_s=elapsed,
                           longest_s=run.longest_s)

    # -- dispatch -------------------------------------------------------------------------------

    def _next_queued(self, run: CampaignRun, station: Station) -> int | None:
        """The first queued trial this station can run: in a campaign with sources, one of a source it serves."""
        if not run.campaign.sources:
            return run.queue.popleft()
        for trial_id in run.queue:
            try:
                parameters = self.store.trial(trial_id).parameters
            except StoreError:
                parameters = {}
            if not parameters or station.ready(run, parameters):
                run.queue.remove(trial_id)
                return trial_id
        return None

    def _in_flight_count(self, run: CampaignRun) -> int:
        return sum(1 for f in self.in_flight.values() if f.campaign_id == run.id)

    def _may_dispatch(self, run: CampaignRun) -> bool:
        if self._stop_requested or run.paused or run.stopping:
            return False
        if run.out_of_time():
            run.stopping = True
            return False
        return True

    def _committed(self, run: CampaignRun) -> list[dict[str, Any]]:
        """Parameters of the experiments decided but not finished: in flight, queued or held for a person."""
        committed = [f.parameters for f in self.in_flight.values() if f.campaign_id == run.id]
        if run.queue or run.held or run.manual_open:
            committed += [t.parameters for t in self.store.trials(run.id, _WAITING)]
        return committed

    def _remaining(self, run: CampaignRun, committed: list[dict[str, Any]] | None = None) -> int:
        """Experiments still to propose within the budget (``committed``: :meth:`_committed`, when known)."""
        left = (run.campaign.max_experiments - run.finished - self._in_flight_count(run) - len(run.queue)
                - run.held - len(run.manual_open))
        if run.campaign.budget.cost is not None and left > 0:
            # issue 8: nothing more once the cost spent and committed reaches the budget (the last
            # experiment may pass it by less than its own cost)
            committed = self._committed(run) if committed is None else committed
            if run.spent + sum(run.campaign.cost_of(p) for p in committed) >= run.campaign.budget.cost - 1e-9:
                return 0
        return left

    def _update_planner(self, run: CampaignRun, results: list[Result] | None = None) -> None:
        """Tell the planner thread the new results, what is pending and how many proposals to keep ready."""
        if run.service is None:
            if results:
                run.planner.ingest(results)
            return
        pending = self._committed(run)
        capacity = sum(s.capacity + s.prefetch for s in self.stations.values() if s.serves(run)) or 1
        capacity = min(capacity, run.campaign.execution.concurrency)
        want = max(0, min(capacity, self._remaining(run, pending))) if self._may_dispatch(run) else 0
        run.service.update(results=results, pending=pending, want=want)

    def _dispatch(self) -> None:
        self._dispatch_cut = False
        if self._stop_requested:
            return
        deadline = time.monotonic() + DISPATCH_SLICE_S
        runs = self._turns
        for station in sorted(self.stations.values(), key=lambda s: -s.free):
            while station.free > 0:
                if time.monotonic() > deadline:
                    self._dispatch_cut = True  # the next turn reads what came meanwhile, then goes on at once
                    return
                # campaigns take turns on a station that serves several
                for i, run in enumerate(runs):
                    if station.ready(run) and self._dispatch_one(run, station):
                        runs.append(runs.pop(i))
                        break
                else:
                    break

    def _dispatch_one(self, run: CampaignRun, station: Station) -> bool:
        if not self._may_dispatch(run):
            return False
        if self._in_flight_count(run) >= run.campaign.execution.concurrency:
            return False
        trial: TrialRow | None = None
        proposal: Proposal | None = None
        while run.queue and trial is None:
            trial_id = self._next_queued(run, station)
            if trial_id is None:
                break
            try:
                trial = self.store.mark_dispatched(trial_id, station.name)
            except StoreError:
                trial = None  # finished meanwhile (a late result, a person rejected it)
        if trial is None:
            if self._remaining(run) <= 0 or run.service is None:
                return False
            if run.approve and run.held + len(run.queue) + self._in_flight_count(run) >= run.campaign.execution.concurrency:
                # a person decides on as many proposals as may run at once: each free station's turn held another,
                # and the whole budget (39 of 40) waited for approval within seconds, chosen without a result
                return False
            proposal = run.service.take()
            if proposal is None:
                # the planner is still computing; its wake-up turns the loop again. An instrument idle for
                # fill_after_s costs more than one exploratory point: it gets a space-filling one. A planner that
                # failed tries again only when a result comes in, so then one is given even without fillers
                # (closedloop run's): with nothing in flight the instrument had stood idle for good
                now = time.monotonic()
                run.starved_since = run.starved_since or now
                fill_after_s = run.fill_after_s
                if fill_after_s is None and (run.service.error is not None or run.service.waiting is not None):
                    fill_after_s = FILL_AFTER_PLANNER_ERROR_S
                if fill_after_s is None or now - run.starved_since < fill_after_s:
                    return False
                proposal = run.fill(station)
                if proposal is None:
                    return False
            run.starved_since = None
            if not station.ready(run, proposal.parameters):
                # issue 8: for a source this station does not serve (or cannot reach now); it waits in the queue
                rows = self.store.add_trials(run.id, [(proposal.parameters, proposal.metadata)],
                                             companion=provenance.companion(self.store, run.planner, [proposal]))
                run.queue.append(rows[0].id)  # type: ignore[arg-type]
                self._emit("trial_proposed", run, trial=rows[0].index, parameters=proposal.parameters)
                self._update_planner(run)
                return False
            if run.approve:
                # issue 9: why it was chosen, in the same transaction, before anyone sees it
                rows = self.store.add_trials(run.id, [(proposal.parameters, proposal.metadata)], status=_HELD,  # type: ignore[arg-type]
                                             companion=provenance.companion(self.store, run.planner, [proposal]))
                run.held += 1
                run.held_ids.add(rows[0].id)  # type: ignore[arg-type]  # issue 7: a rejection before the next look counts
                self._transition(run, rows[0].index, rows[0].id, "held", parameters=proposal.parameters)
                self._emit("trial_proposed", run, trial=rows[0].index, parameters=proposal.parameters, held=True)
                self._update_planner(run)
                return False
            # issue 9: why it was chosen, in the trial's own transaction: durable before the assign leaves
            trial = self.store.add_dispatched(run.id, proposal.parameters, proposal.metadata, station.name,
                                              companion=provenance.companion(self.store, run.planner, [proposal]))
            self._emit("trial_proposed", run, trial=trial.index, parameters=trial.parameters,
                       generator=proposal.metadata.get("generator"))
        assert trial.id is not None
        instrument = run.campaign.instrument_for(trial.parameters)
        assignment = protocol.Assign(
            campaign=run.campaign.name,
            trial_id=trial.id,
            trial_index=trial.index,
            # issue 8: the source chooses the instrument; it is not a setting of it
            setpoints={k: v for k, v in trial.parameters.items() if not (run.campaign.sources and k == SOURCE)},
            outputs=run.campaign.outputs,
            instrument=protocol.InstrumentSpec(target=instrument.target, options=instrument.options),
            timeout_s=float(run.campaign.execution.timeout) if run.campaign.execution.timeout else None,
            session=station.session,
            metadata=trial.planner,
        )
        flight = InFlight(trial.id, run.id, trial.index, trial.parameters, station.name,
                          self._deadline(run, started=False), assignment=assignment.msg_id)
        self.in_flight[trial.id] = flight
        station.running[trial.id] = flight.dispatched
        sent = self._send(station.identity, assignment)
        if not sent:
            self._release(trial.id)
            # the assignment never left: not an attempt (counted, `retries: 0` abandoned a trial never tried)
            self.store.requeue(trial.id, f"station {station.name} unreachable", attempted=False)
            run.queue.appendleft(trial.id)
            self.stations.pop(station.identity, None)
            self._update_planner(run)
            return False
        self.stats["dispatched"] += 1
        self._sent[assignment.msg_id] = (trial.id, station.name)
        self._given.setdefault(station.name, set()).add(trial.id)
        if len(self._sent) > _SENT_KEPT:
            del self._sent[next(iter(self._sent))]
        self._transition(run, trial.index, trial.id, "dispatched", station=station.name, attempt=trial.attempts,
                         parameters=trial.parameters)
        self._emit("trial_dispatched", run, trial=trial.index, station=station.name, parameters=trial.parameters)
        self._update_planner(run)
        return True

    # -- control ----------------------------------------------------------------------------------

    def _serve_control(self) -> None:
        assert self.control is not None
        for _ in range(100):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3 or frames[-2] != b"":
                continue
            envelope, body = frames[:-1], frames[-1]
            try:
                request = json.loads(body)
                if not isinstance(request, dict) or set(request) - {"method", "params"}:
                    raise ValueError("a request is {\"method\": ..., \"params\": {...}}")
                reply = self.handle_control(str(request.get("method")), request.get("params") or {})
            except (ValueError, TypeError, RecursionError, ClosedLoopError) as exc:  # RecursionError: deep JSON
                # bad_input: the request (a value, a trial number) was wrong, not the daemon; the command line
                # exits 2 for it, as for the same request checked on its side (an edit out of bounds had exited 1)
                reply = {"success": False, "msg": str(exc),
                         "bad_input": not isinstance(exc, ClosedLoopError) or isinstance(exc, CampaignError)}
            except Exception as exc:  # noqa: BLE001 - a request no check foresaw must not end the loop for good
                log.exception("control request %r failed", body[:200])
                reply = {"success": False, "msg": f"the daemon could not handle this request: {type(exc).__name__}: {exc}"}
            try:
                self.control.send_multipart([*envelope, json.dumps(reply, default=str).encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _select(self, params: dict[str, Any]) -> list[CampaignRun]:
        name = params.get("campaign")
        if name is None:
            return list(self.runs.values())
        chosen = [r for r in self.runs.values() if r.campaign.name == name]
        if not chosen:
            raise ValueError(f"campaign {name!r} is not run by this daemon "
                             f"({', '.join(r.campaign.name for r in self.runs.values())})")
        return chosen

    def handle_control(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request (``status``, ``health``, ``pause``, ``resume``, ``stop``, ``cancel``,
        ``approve``, ``edit``, ``reject``)."""
        if not isinstance(params, dict):
            raise ValueError("params must be an object")
        if method == "status":
            return {"success": True, "msg": "", **self.status()}
        if method == "health":
            return {"success": True, "msg": "ok", "healthy": True, "uptime_s": round(time.monotonic() - self.started, 1),
                    "stations": len(self.stations), "in_flight": len(self.in_flight),
                    "stopping": self._stop_requested,
                    "planner_errors": {r.campaign.name: r.service.error for r in self.runs.values()
                                       if r.service is not None and r.service.error},
                    # open campaigns no connected station serves: they wait for a station a person must start
                    "unserved_campaigns": sorted(r.campaign.name for r in self.runs.values() if r.unserved),
                    # the loop is fine, the lab is not: monitoring should hear of hardware out of reach
                    "unreachable_instruments": {s.name: sorted(s.resting) for s in self.stations.values() if s.resting},
                    "running_long": {f"{self.runs[f.campaign_id].campaign.name} #{f.index}": f.station
                                     for f in self.in_flight.values() if f.said_long}}
        if method in ("pause", "resume"):
            by, runs = _who(params, ""), self._select(params)
            for run in runs:
                if run.paused != (method == "pause") and not run.closed:  # a finished campaign stays completed
                    self.store.set_campaign_status(run.id, "paused" if method == "pause" else "running")
                    run.paused = method == "pause"
                    log.info("campaign=%s %sd", run.campaign.name, method)
                    self._emit(f"campaign_{method}d", run, in_flight=self._in_flight_count(run))
                    # stations running its trials pause their RunEngines at the next checkpoint (moves finish)
                    running = {f.station for f in self.in_flight.values() if f.campaign_id == run.id}
                    if run.paused:
                        run.paused_at, run.paused_on = time.monotonic(), set(running)
                    else:
                        # a trial waits out a pause on its station: the time paused is not the experiment's
                        # (deadlines ran on, and a pause past the timeout failed trials that had not run)
                        # another campaign's trial on a station it paused waited as well (one RunEngine)
                        paused_for = time.monotonic() - run.paused_at
                        for flight in self.in_flight.values():
                            if ((flight.campaign_id == run.id or flight.station in run.paused_on)
                                    and flight.deadline is not None and not flight.reconciling):
                                flight.deadline += paused_for
                        # and every station told to pause hears the resume, even one whose trials have left since
                        # (it held the next ones it was given, for good)
                        running |= run.paused_on
                        run.paused_on = set()
                    for station in list(self.stations.values()):
                        if station.name in running:
                            self._send(station.identity, protocol.Control(action=method, reason=by))
                self._update_planner(run)
            return {"success": True, "msg": f"{method}d {', '.join(r.campaign.name for r in runs)}"}
        if method == "stop":
            if params.get("campaign") is not None:
                # a stop is the whole daemon's: `{"method": "stop", "campaign": "a"}` (the dashboard's API lists a
                # campaign beside pause, resume and stop) stopped every campaign, a name it does not run as well
                return {"success": False, "bad_input": True, "msg": "stop stops the whole daemon and takes no "
                        f"campaign: pause {params['campaign']!r} instead, or stop without naming one"}
            self.request_stop("control")
            self.wake()
            return {"success": True, "msg": f"stopping; {len(self.in_flight)} trials in flight"}
        if method == "cancel":
            return self._cancel(params)
        if method in ("approve", "edit", "reject"):
            return self._review(method, params)
        raise ValueError(f"unknown method {method!r} (status, health, pause, resume, stop, cancel, approve, edit, reject)")

    def _review(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A person's decision on a held proposal: ``approve`` (``edit``: approve with changed ``parameters``,
        checked against the campaign's types, bounds and constraints) or ``reject``.

        The daemon writes it (:mod:`closedloop.hitl`, the same checks as a notebook's) and acts on it in the same
        turn: an approved trial joins the queue and this loop turn dispatches it; a rejected one is a failure the
        planner learns from. Who decided goes into the trial's provenance. Bad input changes nothing.
        """
        from closedloop import hitl

        index, by, edits = params.get("trial"), _who(params), params.get("parameters")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"{method} needs params.trial, the trial number")
        if edits is not None and not isinstance(edits, dict):
            raise ValueError("params.parameters is an object of parameter names and values")
        if method == "edit" and not edits:
            raise ValueError("edit needs params.parameters, the parameters to change (approve takes it as proposed)")
        if method == "reject" and edits:
            raise ValueError("reject takes no params.parameters")
        runs = self._select(params)
        if len(runs) > 1:
            raise ValueError("this daemon runs several campaigns: name one with params.campaign")
        run = runs[0]
        if method == "reject":
            row = hitl.reject(self.store, run.campaign.name, index, by=by)
        else:
            row = hitl.approve(self.store, run.campaign.name, index,
                               {str(k): v for k, v in (edits or {}).items()} or None, by=by)
        assert row.id is not None
        if row.id in run.held_ids:
            run.held_ids.discard(row.id)
            run.held -= 1
        if method == "reject":
            if row.id in run.queue:
                run.queue.remove(row.id)
            if used_instrument(row.attempts, row.error):
                run.count_finished(row.parameters)  # a retry refused: its earlier attempt used the instrument
            else:
                run.finished += 1
            self._transition(run, index, row.id, "rejected", by=by)
            self._update_planner(run, [Result(row.parameters, None, row.index)])  # a known-bad point
            self._emit("trial_failed", run, trial=index, error=row.error, finished=run.finished, review="rejected",
                       by=by, best=_result_dict(run.best))
            return {"success": True, "msg": f"trial {index} of {run.campaign.name} {row.error}", "trial": index}
        run.queue.append(row.id)
        edited = "proposed_parameters" in row.planner
        self._transition(run, index, row.id, "approved", by=by, edited=edited, parameters=row.parameters)
        self._emit("trial_approved", run, trial=index, parameters=row.parameters, by=by, edited=edited)
        self._update_planner(run)  # an edit changes what is pending
        self.wake()
        return {"success": True, "msg": f"trial {index} of {run.campaign.name} {'edited and ' if edited else ''}"
                f"approved by {by}", "trial": index, "parameters": row.parameters}

    def _cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        index = params.get("trial")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError("cancel needs params.trial, the trial number")
        runs = self._select(params)
        if len(runs) > 1:
            raise ValueError("this daemon runs several campaigns: name one with params.campaign")
        run = runs[0]
        reason = f"cancelled by {_who(params)}"
        for flight in list(self.in_flight.values()):
            if flight.campaign_id == run.id and flight.index == index:
                for station in self.stations.values():
                    if flight.trial_id in station.running:
                        self._send(station.identity, protocol.Cancel(trial_id=flight.trial_id, reason=reason))
                self._fail(run, flight, reason, retry=False)
                return {"success": True, "msg": f"trial {index} of {run.campaign.name} cancelled"}
        for trial in self.store.trials(run.id, [TrialStatus.proposed.value]):
            if trial.index == index and trial.id is not None:
                if trial.id in run.queue:
                    run.queue.remove(trial.id)
                if self.store.record_failure(trial.id, reason):
                    run.finished += 1
                    self._emit("trial_failed", run, trial=index, error=reason, finished=run.finished)
                return {"success": True, "msg": f"trial {index} of {run.campaign.name} cancelled before dispatch"}
        from closedloop import hitl

        hitl.trial_by_index(self.store, run.id, index)  # a number the campaign never had is bad input (exit 2)
        return {"success": False, "msg": f"trial {index} of {run.campaign.name} is not queued or in flight"}

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot: campaigns (counts, in flight, best, paused), stations, endpoints."""
        now = time.monotonic()
        campaigns = []
        for run in self.runs.values():
            counts = self.store.counts(run.id)
            flights = sorted((f for f in self.in_flight.values() if f.campaign_id == run.id), key=lambda f: f.index)
            campaigns.append({
                "name": run.campaign.name, "id": run.id, "paused": run.paused, "stopping": run.stopping,
                "budget": run.campaign.max_experiments, "finished": run.finished, "counts": counts,
                "in_flight": [{"trial": f.index, "station": f.station, "started": f.started,
                               "reconciling": f.reconciling, "age_s": round(now - f.dispatched, 2)} for f in flights],
                "queued": len(run.queue), "held": run.held,
                "buffered_proposals": run.service.buffered() if run.service else 0,
                "planner_error": run.service.error if run.service else None,
                "best": _result_dict(run.best),
                "completed": run.closed,
                # the connected stations that serve it: none, and it waits (its instrument or name served by none)
                "stations": sorted(s.name for s in self.stations.values() if s.serves(run)),
            })
        stations = [{"name": s.name, "capacity": s.capacity, "running": sorted(s.running), "instruments": s.instruments,
                     "campaigns": s.campaigns, "last_seen_s": round(now - s.last_seen, 2),
                     "unreachable": {label: round(max(0.0, until - now), 1) for label, (until, _) in s.resting.items()}}
                    for s in self.stations.values()]
        return {"protocol": protocol.PROTOCOL_VERSION, "uptime_s": round(now - self.started, 1),
                "stopping": self._stop_requested, "endpoint": self.endpoint, "publish": self.publish_endpoint,
                "publish_keys": self.keys is not None,  # its subscribers need an allowed key pair (CURVE)
                "store": displayed(self.store.location), "campaigns": campaigns, "stations": stations, "stats": dict(self.stats)}

    # -- events and logs ----------------------------------------------------------------------------

    def _drain_service_events(self, run: CampaignRun) -> None:
        if run.service is None:
            return
        while True:
            try:
                kind, details = run.service.events.get_nowait()
            except queue.Empty:
                return
            self._emit(kind, run, **details)

    def _transition(self, run: CampaignRun, index: int, trial_id: int | None, state: str, **fields: Any) -> None:
        if translog.isEnabledFor(logging.INFO):
            translog.info("%s", _logfmt(campaign=run.campaign.name, trial=index, trial_id=trial_id, state=state,
                                        **fields))

    def _emit(self, kind: str, run: CampaignRun, **details: Any) -> None:
        self._publish(kind, {"campaign": run.campaign.name, "time": _now_iso(), **details})

    def _emit_daemon(self, kind: str, **details: Any) -> None:
        self._publish(kind, {"time": _now_iso(), **details})

    def _publish(self, kind: str, details: dict[str, Any]) -> None:
        self._seq += 1
        if self.pub is not None:
            try:
                self.pub.send_multipart(list(event_format.encode_event(self._seq, kind, details)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # PUB is best-effort by design; the store is the record
        try:
            self.on_event(kind, details)
        except Exception:  # a display bug must not stop the loop
            log.exception("on_event callback failed for %s", kind)


def _who(params: dict[str, Any], unnamed: str = "operator") -> str:
    """Who acts, from a control request's ``by``; checked before the request changes anything (a pause whose
    ``by`` was too long for the station's control message had paused the campaign and then answered failed)."""
    by = params.get("by") or unnamed
    if not isinstance(by, str) or len(by) > 128:
        raise ValueError("params.by is who acts: a name of at most 128 characters")
    return by


def _result_dict(result: Result | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"trial": result.trial, "parameters": result.parameters, "values": result.values}


def control_request(endpoint: str, method: str, params: dict[str, Any] | None = None, *,
                    timeout_s: float = 5.0, context: zmq.Context | None = None) -> dict[str, Any]:
    """Send one control request to a daemon and return its reply (``{"success", "msg", ...}``).

    Raises:
        ProtocolError: no reply within ``timeout_s`` (the daemon is down or stuck).

    Example:
        >>> control_request("tcp://127.0.0.1:5700", "status")["campaigns"][0]["finished"]  # doctest: +SKIP
        42
    """
    context = context or zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, protocol.wants_ipv6(endpoint))
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"method": method, "params": params or {}}).encode())
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise ProtocolError(f"no answer from the daemon at {endpoint} within {timeout_s:g} s")
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)


def health(endpoint: str = DEFAULT_CONTROL, timeout_s: float = 3.0) -> dict[str, Any]:
    """The daemon's health as its monitoring sees it; ``{"healthy": False, "msg": ...}`` if it does not answer."""
    try:
        return control_request(endpoint, "health", timeout_s=timeout_s)
    except ProtocolError as exc:
        return {"success": False, "healthy": False, "msg": str(exc)}


def run_embedded(
    campaign: Campaign,
    store: Store,
    *,
    outbox: str | None = None,
    on_event: EventSink | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    drain_s: float = 60.0,
) -> CampaignRun:
    """The daemon and one station worker in this process, on loopback: ``closedloop run``.

    A campaign with sources gets one station per source, each serving only its source's instrument. Once
    ``should_stop()``, no experiment starts, and those in flight are waited for up to ``drain_s``.
    """
    from closedloop.worker import StationWorker

    # One station per instrument: every experiment waits for the model's proposal on all results so far
    # rather than taking a space-filling or stale one, so a seeded campaign is reproducible whatever this
    # machine's speed (fillers and prefetch pay off with many stations; see Daemon).
    daemon = Daemon(store, [campaign], bind="tcp://127.0.0.1:0", on_event=on_event, reconcile_s=3.0,
                    heartbeat_s=0.5, fill_after_s=None, prefetch=0, drain_s=drain_s)
    stop = threading.Event()
    workers: list[Any] = []
    for source, instrument in campaign.instruments.items():
        name = "embedded" + (f"-{source}" if source is not None else "")
        box = outbox + (f"-{source}" if source is not None else "") if outbox is not None else None
        only = [source] if source is not None else None
        # -- issue 8: a function or command instrument runs on Dask through a compute station (closedloop.compute)
        if instrument.computational:
            from closedloop.compute import ComputeStation

            # an outbox per station name: another station's answers waiting in one keep it from opening it
            box = box + "-compute" if box is not None else None
            workers.append(ComputeStation(daemon.endpoint, name=f"{name}-compute", outbox=box, heartbeat_s=0.5,
                                          capacity=campaign.execution.concurrency, instruments=[instrument.target],
                                          sources=only, scheduler=instrument.options.get("scheduler")))
        else:
            workers.append(StationWorker(daemon.endpoint, name=name, outbox=box, heartbeat_s=0.5,
                                         instruments=[instrument.target] if source is not None else None,
                                         sources=only))
    ended = [threading.Event() for _ in workers]

    def serve_station(worker: Any, done: threading.Event) -> None:
        try:
            worker.run(stop)
        finally:
            done.set()

    threads = [threading.Thread(target=serve_station, args=(w, done), name=f"closedloop-station-{w.name}", daemon=True)
               for w, done in zip(workers, ended)]
    for thread in threads:
        thread.start()

    def wind_down() -> None:
        stop.set()
        # a station leaves within ten heartbeats of the daemon falling silent, then closes its Dask cluster
        # (up to 15 s): one left running as the process exits leaks the cluster's processes and semaphores
        # waited on, not joined: a join that a second Ctrl-C cuts short takes the thread for ended (bpo-45274)
        for done in ended:
            done.wait(timeout=60)
        daemon.close()

    try:
        daemon.serve(should_stop)
    finally:
        try:
            wind_down()
        except KeyboardInterrupt:  # a second Ctrl-C landed here: the threads must still end before the process
            wind_down()
            raise
    return next(iter(daemon.runs.values()))
