"""What a scientist sees of a running campaign: a snapshot read from the store, drawn with rich.

The same :class:`Snapshot` feeds the live view of ``closedloop run`` / ``daemon`` (rebuilt on every
daemon event) and ``closedloop status`` / ``watch`` in another terminal (rebuilt from the store), so
the two always agree. When output is not a terminal the views print plain lines instead.

Example:
    >>> snap = Snapshot.from_store(Store("results/branin.db"), "branin")   # doctest: +SKIP
    >>> print("\\n".join(snap.lines()))                                     # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from closedloop.campaign import SOURCE, Campaign
from closedloop.errors import StoreError

if TYPE_CHECKING:  # the store (SQLAlchemy) is imported only when a view reads one: `closedloop validate` stays quick
    from closedloop.store import Store

# trial statuses as the store spells them
FINISHED = ("completed", "failed", "abandoned")
DISPATCHED, HELD, PROPOSED = "dispatched", "held", "proposed"
# an experiment in flight this many times longer than the longest completed one is shown as running long: a
# campaign without a timeout waits for a hung device forever, and a station left for days should say so
LONG_FACTOR = 5.0
LONG_AFTER = 3  # completed experiments needed before their durations say what is long
# a running campaign with nothing in flight for this long is waiting (for a station, say), not choosing its next
# experiment: the pace so far no longer says when it ends, and the time remaining is not estimated
WAITING_AFTER_S = 60.0


def format_values(values: dict[str, Any] | None) -> str:
    """``a=1.5, b=2`` with floats to six significant digits; ``-`` for nothing."""
    if not values:
        return "-"
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def format_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _utc(moment: datetime | None) -> datetime | None:
    # SQLite hands datetimes back without a zone; the store writes UTC
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def runs_long(elapsed_s: float, longest_s: float, completed: int) -> bool:
    """Whether an experiment in flight for ``elapsed_s`` runs long: ``LONG_FACTOR`` times the longest of the
    ``completed`` experiments (at least a second), once there are ``LONG_AFTER`` of them to judge by. The daemon
    logs it by the same rule."""
    return completed >= LONG_AFTER and elapsed_s > LONG_FACTOR * max(longest_s, 1.0)


def shown_status(store: Store, row: Any) -> str:
    """A campaign's status as a person is shown it (``status``, the dashboard): ``idle`` where its row says running
    but no process runs it now (stopped, killed, or run by hand only)."""
    return "idle" if row.status == "running" and store.held(row.name) is False else row.status


def active_seconds(spans: Iterable[tuple[float, float]], bridge_s: float = WAITING_AFTER_S) -> float:
    """The time covered by ``spans`` (start, end, in seconds), with the gaps between them of up to ``bridge_s``:
    a planner choosing the next experiment leaves nothing in flight for a moment, and that is the campaign's
    time; a longer gap is a pause, a stop or a wait (``Snapshot.no_estimate``), and is not."""
    total, reach = 0.0, None
    # trials are dispatched nearly in the order they are read (by index): the sort is close to linear
    for start, end in sorted(spans):
        if reach is None or start > reach + bridge_s:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    start, end = _utc(start), _utc(end)
    return (end - start).total_seconds() if start is not None and end is not None else None


@dataclass(frozen=True)
class Finished:
    """One finished experiment as the view lists it."""

    index: int
    status: str
    values: dict[str, float] | None
    error: str | None
    finished_at: datetime | None


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Which rows of ``points`` (``n x m``, larger is better) no other row dominates."""
    mask = np.ones(len(points), dtype=bool)
    for i in range(len(points)):
        dominated = np.all(points >= points[i], axis=1) & np.any(points > points[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def _front(contenders: list[tuple[int, list[float]]]) -> list[int]:
    """The trial numbers of ``contenders`` (trial, oriented values) on their Pareto front, in trial order."""
    if not contenders:
        return []
    mask = non_dominated(np.array([values for _, values in contenders]))
    return sorted(trial for (trial, _), keep in zip(contenders, mask) if keep)


@dataclass
class Snapshot:
    """A campaign's state at one moment: counts, experiments in flight, best so far, recent results."""

    name: str
    status: str
    budget: int
    objective: str
    goal: str
    counts: dict[str, int]
    in_flight: dict[str, list[int]]  # station -> trial numbers
    held: list[int]
    manual: list[int]  # proposed for hand execution, not yet told
    best: Finished | None
    best_after: int | None  # the best came from the n-th finished experiment
    recent: list[Finished]
    started: datetime | None
    ended: datetime | None
    hours: float | None
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # issue 8: a budget in cost (sources) is counted in cost; ``budget`` is then only what it buys at the cheapest
    # source, an upper bound, not the campaign's measure of progress
    cost_budget: float | None = None
    spent: float = 0.0  # cost of the finished experiments, counted as the daemon counts it
    experiments: int | None = None  # the budget's limit in experiments, None with a budget in cost alone
    # in-flight trials running LONG_FACTOR times longer than the longest completed experiment: (trial, seconds)
    running_long: list[tuple[int, float]] = field(default_factory=list)
    longest_s: float | None = None  # the longest completed experiment, dispatch to result
    timeout_s: float | None = None  # the campaign's execution timeout
    # several objectives: the trial numbers of the counted experiments no other dominates (there is no one best)
    front: list[int] | None = None
    objectives: tuple[str, ...] = ()
    last_activity: datetime | None = None  # the latest dispatch or finish of any trial
    # the time up to ``now`` in which experiments could run (active_seconds); None where unknown, and the pace is
    # then the wall time since ``started``
    active: float | None = None

    @classmethod
    def from_store(cls, store: Store, campaign: str | int, recent: int = 5) -> Snapshot:
        """Read a campaign's state; raises StoreError when the store has no such campaign."""
        row = store.campaign_row(campaign)
        spec: Campaign = store.campaign(row.id)  # type: ignore[arg-type]
        trials = _trial_facts(store, row.id, parameters=bool(spec.sources) or spec.budget.cost is not None)  # type: ignore[arg-type]
        name, objective = next(iter(spec.objectives.items()))
        sign = 1.0 if objective.goal == "minimize" else -1.0
        bounds = spec.output_bounds
        finished = sorted((t for t in trials if t.status in FINISHED),
                          key=lambda t: (_utc(t.finished_at) or datetime.min.replace(tzinfo=timezone.utc), t.index))
        best: Finished | None = None
        best_after = None
        in_flight: dict[str, list[int]] = {}
        for t in trials:
            if t.status == DISPATCHED:
                in_flight.setdefault(t.station or "?", []).append(t.index)
        entries = []
        contenders: list[tuple[int, list[float]]] = []  # several objectives: (trial, values oriented larger-better)
        for n, t in enumerate(finished, start=1):
            entry = Finished(t.index, t.status, t.values, t.error, _utc(t.finished_at))
            entries.append(entry)
            values = entry.values
            if values is None or name not in values or not spec.counts(t.parameters):
                continue  # issue 8: a cheaper source's result is not a finding
            if not all(b.satisfied(values[b.output]) for b in bounds if b.output in values):
                continue
            if best is None or sign * values[name] < sign * best.values[name]:  # type: ignore[index]
                best, best_after = entry, n
            if len(spec.objectives) > 1 and all(o in values for o in spec.objectives):
                contenders.append((entry.index, [values[o] if g.goal == "maximize" else -values[o]
                                                 for o, g in spec.objectives.items()]))
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        from closedloop.store import used_instrument

        spent = (sum(spec.cost_of(t.parameters) for t in finished if used_instrument(t.attempts, t.error))
                 if spec.budget.cost is not None else 0.0)
        now = datetime.now(timezone.utc)
        durations = [d for t in finished if t.status == "completed"
                     and (d := _seconds(t.dispatched_at, t.finished_at)) is not None]
        longest = max(durations, default=0.0)
        status = shown_status(store, row)
        started, ended = _utc(row.created_at), _utc(row.finished_at)
        # Nothing records when a campaign was paused or stopped, but the trials record when experiments were in
        # flight: the pace is counted over that time. An experiment in flight across a stop or a pause (Ctrl-C
        # leaves one, abandoned when the campaign runs again) counts for no more than a long experiment would
        cap = LONG_FACTOR * max(longest, 1.0) if durations else float("inf")
        until = (ended or now).timestamp()
        spans = [(started.timestamp(), started.timestamp())] if started is not None else []
        last_activity: datetime | None = None  # the latest dispatch or finish of any trial
        for t in trials:
            begun, done = _utc(t.dispatched_at), _utc(t.finished_at)
            first = begun or done
            if first is None:
                continue
            last_activity = max(m for m in (last_activity, begun, done) if m is not None)
            start = first.timestamp()
            # a trial sent back to be dispatched again has no end of its earlier attempt: its dispatch alone
            end = done.timestamp() if done is not None else until if t.status == DISPATCHED else start
            spans.append((start, min(max(start, end), start + cap)))
        spans.append((until, until))
        # nothing runs an idle campaign's trials left in flight (its process was stopped or killed): none runs long
        running_long = [] if status == "idle" else [
            (t.index, d) for t in trials if t.status == DISPATCHED
            and (d := _seconds(t.dispatched_at, now)) is not None and runs_long(d, longest, len(durations))]
        return cls(
            name=row.name, status=status, budget=spec.max_experiments, objective=name, goal=objective.goal,
            counts=counts, in_flight=in_flight,
            held=[t.index for t in trials if t.status == HELD],
            manual=[t.index for t in trials
                    if t.status == PROPOSED and t.planner.get("execution") == "manual"],
            best=best, best_after=best_after, recent=entries[-recent:][::-1] if recent else [],
            started=started, ended=ended, hours=spec.budget.hours,
            cost_budget=spec.budget.cost, spent=spent, experiments=spec.budget.experiments,
            running_long=running_long, longest_s=longest if durations else None, now=now,
            timeout_s=float(spec.execution.timeout) if spec.execution.timeout else None,
            front=_front(contenders) if len(spec.objectives) > 1 else None, objectives=tuple(spec.objectives),
            last_activity=last_activity,
            active=active_seconds(spans),
        )

    # -- derived numbers --------------------------------------------------------------------------

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED)

    def elapsed_s(self, now: datetime | None = None) -> float | None:
        """The wall time since the campaign's first start, stops and pauses included, as ``budget.hours`` counts
        it."""
        if self.started is None:
            return None
        end = self.ended or now or datetime.now(timezone.utc)
        return (end - self.started).total_seconds()

    def used(self) -> float:
        """How much of the budget is spent, 0 to 1: of its experiments or of its cost, whichever is further."""
        parts = [self.finished / self.experiments] if self.experiments else []
        if self.cost_budget:
            parts.append(self.spent / self.cost_budget)
        return min(1.0, max(parts, default=self.finished / max(1, self.budget)))

    def progress_text(self) -> str:
        """``12/30 experiments``; with a budget in cost ``cost 3.2/12, 14 experiments``."""
        experiments = f"{self.finished}/{self.experiments}" if self.experiments else f"{self.finished}"
        if self.cost_budget is None:
            return f"{experiments} experiments"
        return f"cost {self.spent:.4g}/{self.cost_budget:g}, {experiments} experiments"

    def active_s(self, now: datetime | None = None) -> float | None:
        """The time in which experiments could run: while they were in flight, and the moments between them.
        Unlike :meth:`elapsed_s` it leaves out pauses and stops, which said nothing of how long experiments take."""
        if self.active is None:
            return self.elapsed_s(now)
        # a later ``now`` than the snapshot's: the experiments in flight have run on
        later = (now - self.now).total_seconds() if now is not None and self.in_flight else 0.0
        return self.active + max(0.0, later)

    def remaining_s(self, now: datetime | None = None) -> float | None:
        """Time left at the pace so far (:meth:`active_s` over the budget used), capped by what the budget's
        hours leave of the wall time; 0 once the budget is spent. The views show it only while experiments run
        (:meth:`remaining_text`)."""
        elapsed, active = self.elapsed_s(now), self.active_s(now)
        used = self.used()
        if used >= 1.0 - 1e-9 or self.ended is not None:
            return 0.0
        if not active or used == 0:
            estimate = None
        else:
            estimate = active * (1 - used) / used
        if self.hours is not None and elapsed is not None:
            cap = max(0.0, self.hours * 3600 - elapsed)
            estimate = cap if estimate is None else min(estimate, cap)
        return estimate

    def no_estimate(self) -> str | None:
        """Why the time remaining is not estimated now (``paused``, ``waiting for approval``), or None while
        experiments run: paused, idle, waiting or over, the pace so far counted time in which nothing ran, and
        ``status`` showed an hour left of a campaign no process ran."""
        if self.ended is not None or self.status != "running":
            return "idle: no process runs it" if self.status == "idle" else self.status
        if self.in_flight:
            return None
        if self.held:
            return "waiting for approval"
        if self.manual:
            return "waiting for results by hand"
        since = self.last_activity or self.started
        waited = (self.now - since).total_seconds() if since is not None else 0.0
        # a planner choosing the next experiment leaves nothing in flight for a moment: that is not waiting
        return f"nothing in flight for {format_seconds(waited)}" if waited > WAITING_AFTER_S else None

    def remaining_text(self) -> str:
        """``25 min 10 s`` while experiments run; otherwise ``- (paused)``, ``- (completed)`` and the like."""
        reason = self.no_estimate()
        return format_seconds(self.remaining_s(self.now)) if reason is None else f"- ({reason})"

    def best_label(self, goal: bool = True) -> str:
        # several objectives have a front, not a best: the first objective's best alone hid every trade-off found
        if self.front is not None:
            return "Pareto front"
        return f"best {self.goal[:3]}" if goal else "best"

    def best_text(self, most: int = 10) -> str:
        """The best experiment, or for several objectives the front's size and its first ``most`` trial numbers."""
        if self.front is not None:
            if not self.front:
                return "-"
            shown = ", ".join(f"#{i}" for i in self.front[:most]) + (", ..." if len(self.front) > most else "")
            return f"{len(self.front)} of {self.finished} experiments ({', '.join(self.objectives)}): {shown}"
        if self.best is None or self.best.values is None:
            return "-"
        when = f" at {self.best.finished_at.astimezone():%H:%M:%S}" if self.best.finished_at else ""
        return (f"{self.objective}={self.best.values[self.objective]:.6g} (#{self.best.index}, "
                f"experiment {self.best_after} of {self.finished}{when})")

    def in_flight_label(self) -> str:
        return "left in flight" if self.status == "idle" else "in flight"

    def in_flight_text(self) -> str:
        """``embedded: #5, #6``; for an idle campaign also what becomes of them."""
        text = "; ".join(f"{s}: " + ", ".join(f"#{i}" for i in sorted(t)) for s, t in sorted(self.in_flight.items()))
        if self.status == "idle":
            # a station keeps a run it finished in its outbox and delivers it on reconnecting; one it never
            # finished is run again (the daemon reconciles what each station still holds)
            text += (" (nothing runs them now; when the campaign runs again, their stations deliver those they"
                     " finished and the rest are queued again, or follow the retry policy if a station does not"
                     " come back)")
        return text

    def running_long_text(self) -> str | None:
        """``#12 for 2 h 05 min (the longest completed took 4 min 10 s; no timeout set)``; None when none."""
        if not self.running_long:
            return None
        limit = f"timeout {format_seconds(self.timeout_s)}" if self.timeout_s else "no timeout set"
        return (", ".join(f"#{i} for {format_seconds(s)}" for i, s in self.running_long)
                + f" (the longest completed took {format_seconds(self.longest_s)}; {limit})")

    # -- output -----------------------------------------------------------------------------------

    def lines(self) -> list[str]:
        """Plain text, for logs and scripts."""
        out = [f"{self.name}: {self.status}, {self.progress_text()} "
               f"({self.counts.get('completed', 0)} completed, {self.counts.get('failed', 0)} failed"
               + (f", {self.counts.get('abandoned', 0)} abandoned" if self.counts.get("abandoned") else "") + ")",
               f"  {self.best_label()} {self.best_text()}"]
        if self.in_flight:
            out.append(f"  {self.in_flight_label()}: {self.in_flight_text()}")
        if (long := self.running_long_text()) is not None:
            out.append("  running long: " + long)
        if self.held:
            out.append("  held for approval: " + ", ".join(f"#{i}" for i in self.held))
        if self.manual:
            out.append("  waiting for results by hand: " + ", ".join(f"#{i}" for i in self.manual))
        out.append(f"  elapsed {format_seconds(self.elapsed_s())}, remaining {self.remaining_text()}")
        for entry in self.recent:
            outcome = format_values(entry.values) if entry.values else f"{entry.status}: {entry.error}"
            out.append(f"  #{entry.index:>3} {outcome}")
        return out

    def __rich__(self) -> RenderableType:
        head = Table.grid(padding=(0, 1), expand=True)
        head.add_column(ratio=1)
        head.add_column(justify="right")
        # every text from the store is a Text, not markup: a station '[lab]robot' or a name holding ':cd:' is as written
        head.add_row(ProgressBar(total=1.0, completed=self.used()), Text(self.progress_text()))
        facts = Table.grid(padding=(0, 2))
        facts.add_column(style="bold")
        facts.add_column()
        facts.add_row("Pareto front" if self.front is not None else f"best ({self.goal})", Text(self.best_text()))
        remaining = self.remaining_text()
        facts.add_row("time", f"{format_seconds(self.elapsed_s())} elapsed, "
                              + (f"remaining {remaining}" if remaining.startswith("-") else f"{remaining} remaining"))
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
        facts.add_row("trials", counts or "none yet")
        if self.in_flight:
            facts.add_row(self.in_flight_label(), Text(self.in_flight_text()))
        if (long := self.running_long_text()) is not None:
            facts.add_row("running long", Text(long, style="bold yellow"))
        if self.held:
            facts.add_row("held", ", ".join(f"#{i}" for i in self.held) + "  (closedloop approve / reject)")
        if self.manual:
            facts.add_row("by hand", ", ".join(f"#{i}" for i in self.manual) + "  (closedloop tell)")
        parts: list[RenderableType] = [head, facts]
        if self.recent:
            table = Table(box=None, padding=(0, 1), show_header=True, header_style="dim")
            table.add_column("#", justify="right")
            table.add_column("result")
            table.add_column("at", style="dim")
            for entry in self.recent:
                best = self.best is not None and entry.index == self.best.index
                outcome = (Text(format_values(entry.values), style="bold green" if best else "")
                           if entry.values else Text(f"{entry.status}: {entry.error}", style="red"))
                when = f"{entry.finished_at.astimezone():%H:%M:%S}" if entry.finished_at else ""
                table.add_row(str(entry.index), outcome, when)
            parts.append(table)
        return Panel(Group(*parts), title=Text.assemble((self.name, "bold"), f" ({self.status})"), title_align="left")


class ProgressView:
    """The live view of ``closedloop run`` and ``closedloop daemon``: an ``on_event`` sink.

    On a terminal it redraws a panel per campaign from the store after each event; otherwise it
    prints one plain line per event.
    """

    def __init__(self, campaigns: Campaign | list[Campaign], store: Store | None = None,
                 console: Console | None = None):
        self.campaigns = campaigns if isinstance(campaigns, list) else [campaigns]
        self.store = store
        self.console = console or Console()
        self.live_mode = self.console.is_terminal and store is not None
        self.snapshots: dict[str, Snapshot] = {}
        self.best: dict[str, str] = {}
        self.live: Live | None = None
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._dirty = False
        self._planner_errors: dict[str, str] = {}  # the last one shown, per campaign

    def __enter__(self) -> ProgressView:
        if self.live_mode:
            self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self._refresh()
            self.live.stop()

    def _render(self) -> RenderableType:
        # Called by Live's refresh thread, never the daemon's: the store is read at most four times a
        # second after events (a daemon finishing thousands of trials a second is not slowed), and every
        # two seconds without (approvals and results told by hand arrive without a daemon event).
        if time.monotonic() - self._read_at > (0.25 if self._dirty else 2.0):
            self._dirty = False
            self._refresh()
        with self._lock:
            shown = [self.snapshots[c.name] for c in self.campaigns if c.name in self.snapshots]
        return Group(*shown) if shown else Text("starting ...", style="dim")

    def _refresh(self, name: str | None = None) -> None:
        assert self.store is not None
        self._read_at = time.monotonic()
        for campaign in self.campaigns:
            if name is not None and campaign.name != name:
                continue
            try:
                snap = Snapshot.from_store(self.store, campaign.name)
            except StoreError:  # not opened in the store yet
                continue
            with self._lock:
                self.snapshots[campaign.name] = snap

    def __call__(self, kind: str, details: dict[str, Any]) -> None:
        if kind in ("planner_error", "model_updated"):
            # the planner tries again every second: say so once, not once a second, until it has recovered
            name = details.get("campaign", self.campaigns[0].name)
            error = details.get("error") if kind == "planner_error" else None
            if error and self._planner_errors.get(name) != error:
                prefix = f"{name}: " if len(self.campaigns) > 1 else ""
                self.console.print(f"{prefix}the planner failed ({error}); it tries again every second "
                                   "('closedloop run -v' logs the traceback)", highlight=False, markup=False,
                                   soft_wrap=True)
            if error:
                self._planner_errors[name] = error
            else:
                self._planner_errors.pop(name, None)
            return
        if self.live_mode:
            self._dirty = True
            notice = _notice(kind, details)
            if notice and self.live is not None:
                self.live.console.print(notice, highlight=False, markup=False)
            return
        self._plain(kind, details)

    def _plain(self, kind: str, details: dict[str, Any]) -> None:
        name = details.get("campaign", self.campaigns[0].name)
        spec = next((c for c in self.campaigns if c.name == name), self.campaigns[0])
        prefix = f"{name} " if len(self.campaigns) > 1 else ""
        if kind in ("trial_completed", "trial_failed"):
            best = details.get("best")
            if best:
                self.best[name] = f"{format_values(best['values'])} (#{best['trial']})"
            outcome = (format_values(details.get("values")) if kind == "trial_completed"
                       else f"failed: {details['error']}")
            done = f"{details['finished']}/{spec.budget.experiments or spec.max_experiments}"
            if spec.budget.cost is not None and details.get("spent") is not None:  # issue 8: counted in cost
                done = (f"cost {details['spent']:.4g}/{spec.budget.cost:g}, "
                        + (done if spec.budget.experiments else str(details["finished"])))
            # not markup: "[cost 4.5/12, 9]" would read as a style tag, and an error may hold brackets too
            self.console.print(f"{prefix}[{done}] experiment {details['trial']}: {outcome}; "
                               f"best {self.best.get(name, '-')}", highlight=False, soft_wrap=True, markup=False)
        elif kind == "trial_proposed" and details.get("held"):
            self.console.print(f"{prefix}experiment {details['trial']} held for approval: "
                               f"{format_values(details.get('parameters'))}", highlight=False, soft_wrap=True,
                               markup=False)
        elif kind == "trial_approved":
            self.console.print(f"{prefix}experiment {details['trial']} {'edited and ' if details.get('edited') else ''}"
                               f"approved by {details.get('by')}: {format_values(details.get('parameters'))}",
                               highlight=False, soft_wrap=True, markup=False)
        elif kind == "campaign_started" and details.get("finished"):
            self.console.print(f"resuming {name}: {details['finished']} experiments already done", highlight=False)
        elif notice := _notice(kind, details):
            self.console.print(notice, highlight=False, soft_wrap=True, markup=False)


def _notice(kind: str, details: dict[str, Any]) -> str | None:
    """The line an event gets even on the live panel: what a scientist watching must not miss."""
    if kind == "goal_reached":
        return f"goal reached: {details['rule']}"
    if kind == "waiting_for_hand":
        trials = ", ".join(f"#{i}" for i in details["trials"])
        return (f"waiting for experiments suggested by hand: {trials} (their results: closedloop tell "
                f"{details['campaign']} TRIAL OUTPUT=VALUE)")
    if kind == "space_exhausted":
        return f"every point of the space has been run: the campaign ends after {details['finished']} experiments"
    if kind == "instrument_unavailable":
        return (f"station {details['station']} cannot reach {details['instrument']} ({details['error']}); "
                f"the experiment waits, next try in {details['retry_in_s']:.0f} s")
    return None


def watch(store: Store, campaign: str, console: Console, interval_s: float = 1.0,
          timeout_s: float | None = None) -> Snapshot:
    """Follow a campaign from the store until it is completed (or ``timeout_s`` passes).

    On a terminal the panel is redrawn every ``interval_s``; otherwise a plain line is printed each
    time the number of finished experiments changes.
    """
    snap = Snapshot.from_store(store, campaign)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def done() -> bool:
        return snap.status in ("completed", "stopped") or (deadline is not None and time.monotonic() >= deadline)

    if console.is_terminal:
        with Live(snap, console=console, refresh_per_second=4) as live:
            while not done():
                time.sleep(interval_s)
                snap = Snapshot.from_store(store, campaign)
                live.update(snap)
        return snap
    last = -1
    while True:
        if snap.finished != last:
            last = snap.finished
            console.print(f"{snap.name}: {snap.progress_text()}, {snap.best_label(goal=False)} {snap.best_text()}, "
                          f"in flight {sum(len(v) for v in snap.in_flight.values())}", highlight=False, soft_wrap=True)
        if done():
            return snap
        time.sleep(interval_s)
        snap = Snapshot.from_store(store, campaign)


@dataclass(frozen=True, slots=True)
class _Fact:
    """What a snapshot reads of one trial (its parameters only where sources make them count)."""

    index: int
    status: str
    station: str | None
    error: str | None
    attempts: int
    dispatched_at: datetime | None
    finished_at: datetime | None
    planner: dict[str, Any]
    parameters: dict[str, Any]
    values: dict[str, Any] | None


def _trial_facts(store: Store, campaign_id: int, parameters: bool) -> list[_Fact]:
    """A campaign's trials for a snapshot, in trial order, in one SQL Core select: ``closedloop status`` and
    ``list`` built an ORM object of every trial and observation, 12 s for a campaign of 50,000 trials, most of
    it decoding JSON the snapshot never looks at (the run uids, every trial's planner metadata)."""
    from sqlalchemy import case, null, select

    from closedloop.store import ObservationRow, TrialRow

    trial, observation = TrialRow.__table__, ObservationRow.__table__  # type: ignore[attr-defined]
    query = (select(trial.c.index, trial.c.status, trial.c.station, trial.c.error, trial.c.attempts,
                    trial.c.dispatched_at, trial.c.finished_at,
                    # only a proposal's: a trial suggested for hand execution says so there
                    case((trial.c.status == PROPOSED, trial.c.planner), else_=null()).label("planner"),
                    trial.c.parameters if parameters else null().label("parameters"), observation.c["values"])
             .select_from(trial.outerjoin(observation, observation.c.trial_id == trial.c.id))
             .where(trial.c.campaign_id == campaign_id).order_by(trial.c.index))
    with store.engine.connect() as connection:
        return [_Fact(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7] or {}, r[8] or {}, r[9])
                for r in connection.execute(query)]


def trial_records(store: Store, campaign: str | int) -> list[dict[str, Any]]:
    """One flat dict per trial (parameters and outputs as columns), for tables and exports."""
    row = store.campaign_row(campaign)
    spec = store.campaign(row.id)  # type: ignore[arg-type]
    records = []
    for (index, status, parameters, values, station, error, run_uid, run_uids, generator, execution, attempts,
         duration_s, proposed_at, dispatched_at, finished_at) in store.record_columns(row.id):  # type: ignore[arg-type]
        record: dict[str, Any] = {"trial": index, "status": status}
        record.update({name: parameters.get(name) for name in spec.parameters})
        if spec.sources:  # issue 8: which source measured it, a column of its own
            record[SOURCE] = parameters.get(SOURCE)
        record.update({name: (values.get(name) if values is not None else None) for name in spec.outputs})
        record.update({
            "station": station, "error": error,
            # the result's run, or a failed trial's last attempt's: the documents that show what went wrong
            "run_uid": run_uid if run_uid is not None else (run_uids[-1] if run_uids else None),
            "generator": generator, "execution": execution,
            "attempts": attempts, "duration_s": duration_s,
            "proposed_at": _iso(proposed_at), "dispatched_at": _iso(dispatched_at),
            "finished_at": _iso(finished_at),
        })
        records.append(record)
    return records


def trial_columns(spec: Campaign) -> list[str]:
    """The columns of :func:`trial_records`, in order, known before any trial (an empty export keeps its header)."""
    return (["trial", "status", *spec.parameters] + ([SOURCE] if spec.sources else []) + list(spec.outputs)
            + ["station", "error", "run_uid", "generator", "execution", "attempts", "duration_s", "proposed_at",
               "dispatched_at", "finished_at"])


def _iso(moment: datetime | None) -> str | None:
    moment = _utc(moment)
    return moment.isoformat() if moment else None


def daemon_events_endpoint(control: str, campaign: str, timeout_s: float = 0.5) -> str | None:
    """The PUB endpoint of a daemon that answers on ``control`` and runs ``campaign``, else None."""
    from closedloop.daemon import control_request
    from closedloop.errors import ClosedLoopError

    try:
        status = control_request(control, "status", timeout_s=timeout_s)
    except (ClosedLoopError, OSError, ValueError):
        return None
    names = [c.get("name") for c in status.get("campaigns", [])]
    if status.get("publish_keys"):
        return None  # a plain SUB never completes a CURVE handshake: watch heard nothing for the whole campaign
    return status.get("publish") if campaign in names else None


def watch_events(store: Store, campaign: str, console: Console, endpoint: str,
                 timeout_s: float | None = None, idle_check_s: float = 1.0) -> Snapshot:
    """Follow a campaign from a daemon's event stream (PUB, see closedloop.events) until it finishes.

    Each event is drawn as ``closedloop run`` draws it: on a terminal the panel is re-read from the
    store (the daemon stores before it announces), otherwise one plain line per event. Events can be
    dropped by PUB/SUB, so the store is also read when the stream is quiet.
    """
    import zmq

    from closedloop.events import decode_event
    from closedloop.protocol import wants_ipv6

    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, f"campaign.{campaign}.".encode())
    sub.setsockopt(zmq.IPV6, wants_ipv6(endpoint))
    sub.connect(endpoint)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    spec = store.campaign(campaign)
    snap = Snapshot.from_store(store, campaign)
    view = ProgressView(spec, store, console)
    try:
        with view:
            if not view.live_mode:
                console.print(f"following {campaign} on {endpoint}: {snap.progress_text()}, "
                              f"{snap.best_label(goal=False)} {snap.best_text()}", highlight=False, soft_wrap=True)
            else:
                view._refresh()
            while deadline is None or time.monotonic() < deadline:
                wait_ms = idle_check_s * 1000
                if deadline is not None:
                    wait_ms = max(0.0, min(wait_ms, (deadline - time.monotonic()) * 1000))
                if sub.poll(int(wait_ms), zmq.POLLIN):
                    _topic, body = sub.recv_multipart()
                    event = decode_event(body)
                    view(event.get("kind", ""), event)
                    if event.get("kind") == "campaign_finished":
                        break
                else:
                    snap = Snapshot.from_store(store, campaign)
                    if snap.status in ("completed", "stopped"):
                        break
                    if view.live_mode:
                        view._refresh()
    finally:
        sub.close(linger=0)
    return Snapshot.from_store(store, campaign)


def daemon_lines(control: str, campaigns: list[str], timeout_s: float = 0.3, idle: Iterable[str] = ()) -> list[str]:
    """What a daemon answering on ``control`` says of its stations and of ``campaigns``; [] if none answers. Of the
    ``idle`` campaigns (open, and no process runs them) it says which it does not run.

    The store knows trials; only the daemon knows idle stations, its queue and proposals computed ahead.
    """
    from closedloop.daemon import control_request
    from closedloop.errors import ClosedLoopError

    try:
        status = control_request(control, "status", timeout_s=timeout_s)
    except (ClosedLoopError, OSError, ValueError):
        return []
    stations = status.get("stations", [])
    open_here = {str(c.get("name")) for c in status.get("campaigns", []) if not c.get("completed")}

    def nothing_to_run(station: dict[str, Any]) -> str:
        # a station named for campaigns that are over (or not run here) idles, and only this line says why
        named = station.get("campaigns") or ["*"]
        return "" if "*" in named or open_here & set(named) else f", nothing to run here (serves {', '.join(named)})"

    lines = [f"daemon at {status.get('endpoint')} (up {format_seconds(status.get('uptime_s'))}): "
             + ("; ".join(f"{s['name']} {len(s.get('running', []))}/{s.get('capacity', '?')} busy, "
                          f"seen {s.get('last_seen_s', 0):.0f} s ago" + nothing_to_run(s)
                          + "".join(f", cannot reach {instrument} (next try in {left:.0f} s)"
                                    for instrument, left in s.get("unreachable", {}).items())
                          for s in stations) or "no station connected")]
    for c in status.get("campaigns", []):
        if c.get("name") in campaigns:
            flags = [f for f in ("paused", "stopping") if c.get(f)]
            lines.append(f"  {c['name']}: {c.get('queued', 0)} queued, {c.get('held', 0)} held, "
                         f"{c.get('buffered_proposals', 0)} proposals ready"
                         + (f" ({', '.join(flags)})" if flags else "")
                         + (f"; planner error: {c['planner_error']}" if c.get("planner_error") else "")
                         + ("; no connected station serves it" if stations and c.get("stations") == []
                            and not c.get("completed") else ""))
    run_here = [str(c.get("name")) for c in status.get("campaigns", [])]
    for name in idle:
        if name not in run_here:
            # its trials left in flight are not this daemon's to settle: their stations keep what they finish
            lines.append(f"  {name}: not run by this daemon (it runs {', '.join(run_here) or 'none'})")
    return lines
