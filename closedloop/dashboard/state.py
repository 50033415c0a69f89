"""A campaign as the page draws it, kept up to date by reading only the trials that are new or still open.

The page asks for ``/api/state`` every 2 s and on every daemon event, for days. Re-reading every trial, result
and decision each time took 2 s a request at 23 000 trials (ORM objects built and JSON columns decoded anew,
most of it for rows that could not have changed), so a :class:`CampaignView` keeps what it built and, on each
poll, reads with one SQL Core select the trials numbered above the highest it has seen and those it last saw
open (proposed, dispatched or held), with their result and decision.

That is exact because nothing the page shows of a finished trial changes. Completed, failed and abandoned are
final in the store: every change of status checks that the trial is open or held first
(``Store.record_result(s)``, ``record_failure``, ``requeue``, ``mark_dispatched``, ``approve_held``,
``reject``). Its observation is written in the transaction that completes it, its provenance in the one that
creates it, and a review (``provenance._follow_review``) in the one that approves or rejects it while it is
still held or proposed; only its list of runs may grow later (``record_run``), which the page does not show.
And trial numbers are allocated one writer at a time (``store.lock_campaign``), so no trial numbered below the
highest one seen is committed later. Only an earlier copy of the store put back at its path breaks this; it holds
fewer trials, or fewer finished ones, than were read, and the campaign is then read anew.

Example:
    >>> view = CampaignView(store, store.campaign_row("branin"))    # doctest: +SKIP
    >>> view.poll(store, store.campaign_row("branin"))["counts"]    # doctest: +SKIP
    {'completed': 40, 'dispatched': 2}
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any

from sqlalchemy import bindparam, or_, select
from sqlalchemy.engine import RowMapping

from closedloop.campaign import Campaign
from closedloop.planner.base import Result
from closedloop.provenance import ProvenanceRow
from closedloop.store import CampaignRow, ObservationRow, Store, TrialRow, TrialStatus, used_instrument
from closedloop.view import shown_status

MAX_TRIALS = 500  # rows sent to the page; the store keeps them all
# points of a chart sent to the page, beyond the best-so-far line's steps and the Pareto front: every result of a
# 50,000-trial campaign made each 2 s poll 4 MB, and the page drew 50,000 circles each time
MAX_POINTS = 2000
FINISHED = (TrialStatus.completed.value, TrialStatus.failed.value, TrialStatus.abandoned.value)
_RESULTS = (TrialStatus.completed.value, TrialStatus.failed.value)  # what a planner is given (Store.results)

_trial = TrialRow.__table__  # type: ignore[attr-defined]
_observation = ObservationRow.__table__  # type: ignore[attr-defined]
_provenance = ProvenanceRow.__table__  # type: ignore[attr-defined]
# the provenance columns the trials table shows, not the hyperparameters and data lists (the page fetches
# those per trial); compiled once, as it runs on every poll
_CHANGED = (
    select(_trial.c.id, _trial.c.index, _trial.c.status, _trial.c.parameters, _trial.c.error, _trial.c.station,
           _trial.c.attempts, _trial.c.planner, _trial.c.dispatched_at, _trial.c.finished_at,
           _observation.c["values"], _observation.c.run_uid, _provenance.c.generator, _provenance.c.acquisition,
           _provenance.c.acquisition_value, _provenance.c.predicted, _provenance.c.review, _provenance.c.reviewed_by)
    .select_from(_trial.outerjoin(_observation, _observation.c.trial_id == _trial.c.id)
                 .outerjoin(_provenance, _provenance.c.trial_id == _trial.c.id))
    .where(_trial.c.campaign_id == bindparam("campaign"),
           or_(_trial.c.index > bindparam("after"), _trial.c.id.in_(bindparam("open", expanding=True))))
    .order_by(_trial.c.index))


class CampaignView:
    """What the page is sent of one campaign, brought up to date on each :meth:`poll`.

    It keeps the campaign's spec, the rows of the last ``MAX_TRIALS`` trials and of the open ones, the
    best-so-far series (one point per result of the first objective, in trial order; the page is sent at most
    about ``MAX_POINTS`` of them, see :func:`thinned`) and the failed trials' numbers, and for several objectives
    the results behind the Pareto front. Memory therefore grows with the series alone, not with the trials table.
    """

    def __init__(self, store: Store, row: CampaignRow):
        assert row.id is not None
        self.key = self.key_of(row)
        self.campaign_id = row.id
        spec = self.spec = store.campaign(row.id)
        objectives = [{"name": n, "goal": o.goal} for n, o in spec.objectives.items()]
        self._first, self._goal = objectives[0]["name"], objectives[0]["goal"]
        self._bounds = spec.output_bounds
        # a budget in cost (sources) is counted in cost, as `closedloop status` counts it: `budget` is then only what it
        # buys at the cheapest source, and a campaign that had spent its cost showed "31/120 done"
        self._static = finite({"budget": spec.max_experiments, "experiments": spec.budget.experiments,
                               "cost_budget": spec.budget.cost, "objectives": objectives, "outputs": spec.outputs,
                               "backend": spec.planner.backend,
                               "parameters": {n: _parameter_summary(p) for n, p in spec.parameters.items()}})
        self._forget()

    def _forget(self) -> None:
        """Start again from the first trial."""
        self._last = 0  # the highest trial number read
        self._finished = 0  # how many trials were read finished
        self._open: dict[int, int] = {}  # trial number -> id of the trials not finished when last read
        self._window: deque[int] = deque()  # the numbers of the last MAX_TRIALS trials, in order
        self._rows: dict[int, dict[str, Any]] = {}  # by trial number: those in the window and the open ones
        self._series: list[dict[str, Any]] = []
        self._thinned: list[dict[str, Any]] | None = None  # what is sent of the series, until it changes
        self._failures: list[dict[str, Any]] = []  # every failed or abandoned trial, in order: the chart marks them
        self._spent = 0.0  # the cost of the finished experiments that used their instrument
        self._front = None if len(self.spec.objectives) < 2 else _Front(self.spec)

    @staticmethod
    def key_of(row: CampaignRow) -> tuple[Any, ...]:
        """What identifies a campaign's record: another store at the same path is another campaign."""
        return row.id, row.spec_hash, row.created_at

    def poll(self, store: Store, row: CampaignRow) -> dict[str, Any]:
        """The campaign's state now, reading only the trials that are new or were open (JSON-ready, finite).

        The lists and dicts returned are never changed afterwards (a later poll builds new ones), so a reply
        can be encoded while the next poll runs.
        """
        counts = store.counts(self.campaign_id)
        if sum(counts.values()) < self._last or sum(counts.get(s, 0) for s in FINISHED) < self._finished:
            # fewer trials, or fewer finished ones, than were read: an earlier copy of the store was put back at its
            # path (a backup restored), whose campaign has the same record; what was kept of the other is wrong
            self._forget()
        with store.engine.connect() as connection:
            changed = connection.execute(_CHANGED, {"campaign": self.campaign_id, "after": self._last,
                                                    "open": list(self._open.values())}).mappings().all()
        for trial in changed:
            self._take(trial)
        held = [self._rows[i] for i in sorted(self._open) if self._rows[i]["status"] == TrialStatus.held.value]
        out: dict[str, Any] = {
            "name": row.name, "status": shown_status(store, row), **self._static, "counts": counts,
            "results": len(self._series), "spent": self._spent, "series": self._drawn(), "failures": list(self._failures), "trials": [self._rows[i] for i in self._window], "held": held,
        }
        if self._front is not None:
            out["pareto"] = self._front.state()
        return out

    def _take(self, trial: RowMapping) -> None:
        index = trial["index"]
        row = _table_row(trial)
        if index > self._last:
            self._last = index
            self._window.append(index)
            if len(self._window) > MAX_TRIALS and (gone := self._window.popleft()) not in self._open:
                del self._rows[gone]
        if trial["status"] not in FINISHED:
            self._open[index] = trial["id"]
            self._rows[index] = row
            return
        self._open.pop(index, None)
        self._finished += 1
        if used_instrument(trial["attempts"], trial["error"]):
            self._spent += self.spec.cost_of(trial["parameters"])
        if trial["status"] != TrialStatus.completed.value:
            bisect.insort(self._failures, {"trial": index, "status": trial["status"]}, key=_trial_number)
        if index >= self._window[0]:
            self._rows[index] = row
        else:
            self._rows.pop(index, None)  # finished long after it was proposed: only its result is still drawn
        values = trial["values"]
        if values is not None and self._first in values:
            # as `closedloop status` and the report count it: a result that breaks an outcome constraint, or one
            # from a cheaper source, is drawn but is no finding (a yield of 0.3 had been the page's best quality)
            counts = self.spec.counts(trial["parameters"]) and all(b.satisfied(values[b.output]) for b in self._bounds
                                                                   if b.output in values)
            self._add_point(index, values[self._first], counts)
        if self._front is not None and trial["status"] in _RESULTS:
            self._front.add(Result(trial["parameters"], values, index))

    def _add_point(self, index: int, value: float, counts: bool) -> None:
        """Put a result into the series in trial order; the best so far changes from there on only."""
        at = bisect.bisect(self._series, index, key=_trial_number)
        best = self._series[at - 1]["best"] if at else None
        # the store keeps finite readings only (Store.record_result(s), hitl's import), so no NaN gets compared
        points = [(index, value, counts)] + [(p["trial"], p["value"], p["counts"]) for p in self._series[at:]]
        tail = []
        for number, v, c in points:
            if c:
                best = v if best is None or (v > best if self._goal == "maximize" else v < best) else best
            tail.append({"trial": number, "value": v, "best": best, "counts": c})
        self._series[at:] = tail
        self._thinned = None

    def _drawn(self) -> list[dict[str, Any]]:
        if self._thinned is None:
            self._thinned = thinned(self._series)
        return self._thinned


class _Front:
    """The Pareto front's points and hypervolume, recomputed only when results have arrived since."""

    def __init__(self, spec: Campaign):
        from closedloop.planner.observations import ObservationLog

        self._log = ObservationLog(spec)  # keeps results in trial order, as Store.results lists them
        self._new: list[Result] = []
        self._state: dict[str, Any] | None = None

    def add(self, result: Result) -> None:
        self._new.append(result)

    def state(self) -> dict[str, Any]:
        if self._state is None or self._new:
            self._log.add(self._new)  # all or none: a result it refuses is refused again on the next poll
            self._new = []
            self._state = finite(_pareto(self._log))
        return self._state


def _pareto(log: Any) -> dict[str, Any]:
    names = log.objectives[:2]
    front = {r.trial for r in log.pareto_front()}
    # counts: within the outcome constraints; one outside them that beat the front was drawn as a plain point
    points = [{"trial": r.trial, "x": r.values[names[0]], "y": r.values[names[1]], "front": r.trial in front,
               "counts": log.feasible(r)} for r in log.completed]
    behind = [p for p in points if not p["front"]]
    if len(behind) > MAX_POINTS:  # the front in full, an even spread of the rest (see MAX_POINTS)
        spread = {id(behind[round(k * (len(behind) - 1) / (MAX_POINTS - 1))]) for k in range(MAX_POINTS)}
        points = [p for p in points if p["front"] or id(p) in spread]
    try:
        hypervolume = log.hypervolume() if points else 0.0
    except Exception:  # noqa: BLE001 - a degenerate front has no hypervolume worth stopping the page for
        hypervolume = None
    # in the objectives' own units: the log's point is oriented (a cost threshold of 5 read -5)
    reference = [s * v for s, v in zip(log.signs, log.reference_point())] if points else None
    return {"x": names[0], "y": names[1], "points": points, "hypervolume": hypervolume, "reference": reference}


def thinned(series: list[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """The best-so-far series as the chart needs it: all of it up to ``limit`` points; beyond, every point where the
    best changes (the line drawn from them is the line drawn from all), the last one, and of each of ``limit / 2``
    runs of consecutive results the lowest and the highest value (the cloud keeps its shape and its outliers)."""
    limit = limit or MAX_POINTS
    if len(series) <= limit:
        return list(series)
    keep = {len(series) - 1}
    best = None
    for i, point in enumerate(series):
        if point["best"] != best:
            keep.add(i)
            best = point["best"]
    size = math.ceil(len(series) / (limit // 2))
    for start in range(0, len(series), size):
        run = range(start, min(start + size, len(series)))
        keep.add(min(run, key=lambda i: series[i]["value"]))
        keep.add(max(run, key=lambda i: series[i]["value"]))
    return [series[i] for i in sorted(keep)]


def campaign_state(store: Store, name: str) -> dict[str, Any]:
    """One campaign as the page draws it, read from scratch: spec summary, counts, best-so-far series, front,
    trials."""
    row = store.campaign_row(name)
    return CampaignView(store, row).poll(store, row)


def _trial_number(point: dict[str, Any]) -> int:
    return point["trial"]


def _table_row(trial: RowMapping) -> dict[str, Any]:
    planner = trial["planner"]
    return finite({
        "trial": trial["index"], "status": trial["status"], "parameters": trial["parameters"],
        "values": trial["values"], "error": trial["error"], "station": trial["station"],
        "attempts": trial["attempts"], "run_uid": trial["run_uid"],
        "generator": trial["generator"] or planner.get("generator"), "acquisition": trial["acquisition"],
        "acquisition_value": trial["acquisition_value"], "predicted": trial["predicted"],
        "review": f"{trial['review']} by {trial['reviewed_by']}" if trial["review"] else planner.get("approved_by"),
        "execution": planner.get("execution"),
        "dispatched_at": _iso(trial["dispatched_at"]), "finished_at": _iso(trial["finished_at"]),
    })


def _parameter_summary(p: Any) -> dict[str, Any]:
    return {"type": p.type, **({"bounds": list(p.bounds)} if hasattr(p, "bounds") and p.bounds is not None else {}),
            **({"values": list(p.values)} if hasattr(p, "values") else {})}


def _iso(moment: Any) -> str | None:
    return moment.isoformat() + ("" if moment.tzinfo else "Z") if moment is not None else None


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
