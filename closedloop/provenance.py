"""Why each experiment was chosen: a provenance record per trial, and replaying a decision.

Every proposal the daemon turns into a trial gets one row in the ``provenance`` table (same SQL
database and SQLModel metadata as :mod:`closedloop.store`), written in the transaction that stores the
trial, so it is durable before the trial is dispatched or shown to a person. The row says what the planner had (the trials it had ingested, the experiments it
treated as pending, the batch size and the proposal's place in the batch), what it was (backend and
versions, seed), what it thought (fitted hyperparameters, the acquisition function and its value at
the chosen point, the model's predicted mean and uncertainty there), how long it took, and who
approved, edited or rejected it. The Bluesky run uids of the experiment's attempts, failed ones first, are
``trial.run_uids``; the completed run's is also ``observation.run_uid``::

    SELECT t."index", p.generator, p.acquisition_value, p.predicted, p.reviewed_by, t.run_uids, o.run_uid
    FROM provenance p JOIN trial t ON t.id = p.trial_id LEFT JOIN observation o ON o.trial_id = t.id
    WHERE p.campaign_id = 1 ORDER BY t."index";

:func:`replay` rebuilds the planner from the store as it was before a trial (the same results in the
same order, the same pending set and batch size, the same seed) and asks it again, which is how a
scientist audits a decision: ``closedloop replay CAMPAIGN --until TRIAL``.

Example:
    >>> planner = Recorder(make_planner(campaign))          # doctest: +SKIP
    >>> proposal = planner.suggest(1)[0]                     # doctest: +SKIP
    >>> row = store.add_dispatched(cid, proposal.parameters, proposal.metadata, "station-a",
    ...                            companion=companion(store, planner, [proposal]))  # doctest: +SKIP
    >>> replay(store, "branin", row.index).same              # doctest: +SKIP
    True
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, bindparam, event, inspect, union_all, update
from sqlalchemy.engine import Connection
from sqlmodel import Field, Session, SQLModel, select

from closedloop.campaign import SOURCE
from closedloop.errors import CampaignError, StoreError
from closedloop.planner.base import Proposal, Result
from closedloop.store import OPEN_STATUSES, REJECTED_BY, Store, TrialCompanion, TrialRow, TrialStatus, _json_safe, utcnow

log = logging.getLogger("closedloop.provenance")

# hyperparameters larger than this (JSON bytes) go to a file beside a SQLite store; the row keeps a digest
INLINE_LIMIT = 16_384
# proposals whose trial was never written (a batch replaced by a newer one) are forgotten after this many
_KEEP = 512
# Planners seed torch's one global generator around their random steps (fits, samplers, restarts); two
# planners (campaigns, the dashboard's model view) doing so at once in one process would draw from each
# other's seeds, and a decision would no longer follow from its data and seed. They take turns.
planning_lock = threading.RLock()
_OWN_GENERATORS = ("sobol", "random")
_PACKAGES = {"botorch": ("botorch", "gpytorch", "torch"), "ax": ("ax-platform", "botorch", "torch"),
             "sobol": ("torch",), "random": ("torch",)}


class ProvenanceRow(SQLModel, table=True):
    """The decision behind one trial (one row per trial the daemon proposed)."""

    __tablename__ = "provenance"

    trial_id: int = Field(primary_key=True, foreign_key="trial.id")
    campaign_id: int = Field(foreign_key="campaign.id", index=True)
    backend: str
    backend_version: str | None = None
    versions: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    generator: str | None = None
    # 64-bit: a derived seed is any unsigned 32-bit number, beyond PostgreSQL's INTEGER
    seed: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))  # the campaign's planner seed
    # the seed the planner derived for this decision (sampler, restarts)
    acquisition_seed: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    batch_size: int = 1  # ``n`` of the ``suggest(n, pending)`` call that chose it
    batch_position: int = 0
    # the trials whose results the planner had, and those of them that had failed, as ``[first, last]`` ranges
    # of trial numbers (``[[1, 57], [59, 60]]``): a list of every number would grow with the square of the campaign
    observed: list[list[int]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    failed: list[list[int]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    pending: list[int | None] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # trial numbers
    pending_parameters: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    proposed_parameters: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    acquisition: str | None = None
    acquisition_value: float | None = None  # at the chosen point alone, given the pending experiments
    acquisition_joint: float | None = None  # of the whole batch, as the optimizer reported it
    predicted: dict[str, dict[str, float]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # with sources (multi-fidelity), why this one: each cheaper source's posterior standard deviation at the point, in
    # cost order up to the one chosen, and the threshold it had to pass (the cheapest above it runs, else the target)
    source_std: dict[str, float] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    source_threshold: float | None = None
    hyperparameters: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    hyperparameters_digest: str | None = None
    hyperparameters_file: str | None = None
    fit_seconds: float | None = None
    optimize_seconds: float | None = None
    suggest_seconds: float | None = None
    decided_at: datetime | None = None
    review: str | None = None  # approved, edited or rejected (people in the loop)
    reviewed_by: str | None = None


# -- recording ---------------------------------------------------------------------------------------


def _versions(backend: str) -> dict[str, str]:
    out = {}
    for package in ("closedloop", *_PACKAGES.get(backend, ())):
        try:
            out[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


# what each proposal not yet written as a trial rested on, by the proposal object (any Recorder's)
_decisions: OrderedDict[int, tuple[Proposal, dict[str, Any]]] = OrderedDict()
_decisions_lock = threading.Lock()


def _keep(proposal: Proposal, decision: dict[str, Any]) -> None:
    with _decisions_lock:
        _decisions[id(proposal)] = (proposal, decision)
        while len(_decisions) > _KEEP:
            _decisions.popitem(last=False)


def _take(proposal: Proposal) -> dict[str, Any] | None:
    with _decisions_lock:
        entry = _decisions.pop(id(proposal), None)
    # the id could be reused by a new object once the old proposal is gone: check it is this one
    return entry[1] if entry is not None and entry[0] is proposal else None


def derive(proposal: Proposal, parameters: dict[str, Any] | None = None, **metadata: Any) -> Proposal:
    """``proposal`` with more metadata (``generator="filler"``), or with ``parameters`` completed by whoever
    decided the rest (the daemon names the source of a filler's point), keeping the record of the decision.

    Example:
        >>> filled = derive(proposal, generator="filler", reason="the model was still fitting")  # doctest: +SKIP
    """
    new = Proposal(proposal.parameters if parameters is None else dict(parameters), {**proposal.metadata, **metadata})
    decision = _take(proposal)
    if decision is not None:
        changed = {"generator": metadata["generator"]} if "generator" in metadata else {}
        if parameters is not None:
            changed["proposed_parameters"] = dict(parameters)
        _keep(new, {**decision, **changed})
    return new


class Recorder:
    """A planner that remembers what it was given and what each of its proposals rested on.

    It forwards every call to the wrapped planner; :meth:`decision` hands the record of a proposal to
    :func:`record`. Safe to call from the planner's thread (``suggest``/``ingest``) and the daemon's
    (``decision``) at once.

    Example:
        >>> planner = Recorder(make_planner(campaign))     # doctest: +SKIP
        >>> planner.ingest(store.results(cid)); planner.suggest(2)   # doctest: +SKIP
    """

    def __init__(self, planner: Any):
        self.planner = planner
        self._lock = threading.Lock()
        # the trials it has seen, and the failed ones, as ranges kept up to date on ingest: a list of every result,
        # sorted into ranges twice per proposal, cost the planner thread O(n log n) per proposal (87 s of 141 s
        # at 6 000 experiments, every step slower as the campaign grew)
        self._observed = _Ranges()
        self._failed = _Ranges()
        self.versions = _versions(planner.backend)

    def __getattr__(self, name: str) -> Any:
        # everything else (best, pareto_front, seed, ...) is the planner's own
        return getattr(self.planner, name)

    @property
    def backend(self) -> str:
        return self.planner.backend

    def ingest(self, results: list[Result]) -> None:
        self.planner.ingest(results)
        with self._lock:
            for r in results:
                if r.trial is not None:
                    self._observed.add(r.trial)
                    if r.values is None:
                        self._failed.add(r.trial)

    def suggest(self, n: int = 1, pending: list[dict[str, Any]] | None = None) -> list[Proposal]:
        pending = [dict(p) for p in (pending or [])]
        with self._lock:
            observed, failed = self._observed.ranges(), self._failed.ranges()
        if hasattr(self.planner, "last_decision"):
            self.planner.last_decision = None
        decided_at = utcnow()
        # Sobol and random planners draw from generators of their own: they need not wait (the daemon's
        # filler runs in its loop, and must not wait for a model fit)
        with planning_lock if self.planner.backend not in _OWN_GENERATORS else nullcontext():
            started = time.perf_counter()
            proposals = self.planner.suggest(n, pending=pending)
            elapsed = time.perf_counter() - started
        evidence = getattr(self.planner, "last_decision", None) or {}
        points = evidence.get("points") or []
        for position, proposal in enumerate(proposals):
            point = next((p for p in points if p.get("parameters") == proposal.parameters), None)
            meta = proposal.metadata
            decision = {
                "backend": self.planner.backend, "versions": {**self.versions, **_threads(evidence, self.planner)},
                "generator": meta.get("generator"),
                "seed": getattr(self.planner, "seed", None),
                # a point's own (the multi-fidelity planner seeds each), else the decision's
                "acquisition_seed": point.get("seed", evidence.get("seed")) if point is not None else None,
                "batch_size": n, "batch_position": position,
                "observed": [list(r) for r in observed],
                "failed": [list(r) for r in failed],
                "pending_parameters": pending,
                "proposed_parameters": dict(proposal.parameters),
                "acquisition": evidence.get("acquisition") if point is not None else None,
                "acquisition_value": point.get("acquisition_value") if point else None,
                # a planner choosing one point at a time (multi-fidelity) has no batch value: its point's is the one
                "acquisition_joint": (evidence["acquisition_joint"] if point is not None and "acquisition_joint" in evidence
                                      else meta.get("acquisition_value")),
                "predicted": point.get("prediction") if point else None,
                "source_std": point.get("source_std") if point else None,
                "source_threshold": point.get("source_threshold") if point else None,
                "hyperparameters": evidence.get("hyperparameters") if point is not None else None,
                "fit_seconds": meta.get("fit_seconds"), "optimize_seconds": meta.get("optimize_seconds"),
                "suggest_seconds": round(elapsed, 4), "decided_at": decided_at,
            }
            _keep(proposal, decision)
        return proposals

    def decision(self, proposal: Proposal) -> dict[str, Any] | None:
        """What ``proposal`` rested on (once: the record is handed over)."""
        return _take(proposal)


def _threads(evidence: dict[str, Any], planner: Any) -> dict[str, str]:
    """torch's intra-op thread count: sums split across threads round differently, and a model fitted or an
    acquisition optimized with another count can end elsewhere, so a replay uses the same count.

    The count the planner says this decision was made with, else the one its class declares it thinks with (ours:
    one thread, whatever the process's), else the process's (Ax's). Without the class's, a decision that left no
    evidence (the Sobol start, the daemon's Sobol filler, a multi-fidelity one) was recorded with the process's count.
    """
    count = evidence.get("torch_threads")
    if count is None:
        count = getattr(planner, "torch_threads", None)
    if count is not None:
        return {"torch_threads": str(count)}
    torch = sys.modules.get("torch")  # only a planner that uses torch imports it
    return {"torch_threads": str(torch.get_num_threads())} if torch is not None else {}


@contextmanager
def _torch_threads(count: str | None) -> Iterator[None]:
    """Run with torch's intra-op thread count set to ``count`` (as recorded), then restore it."""
    torch = sys.modules.get("torch")
    if count is None or torch is None or int(count) == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def companion(store: Store, planner: Any, proposals: list[Proposal]) -> TrialCompanion:
    """The provenance of the trials about to be stored from ``proposals`` (in order), for the store to write in
    the trials' own transaction (``Store.add_dispatched(..., companion=...)``, ``Store.add_trials``): a trial is
    never dispatched, nor shown to a person, before the record of why it was chosen is durable.

    The proposals should come from a :class:`Recorder`; else ``planner`` is named as their author, without the
    data it had. A record that cannot be written is logged and left out (a savepoint on PostgreSQL; SQLite undoes
    just the failed statement): the trial and the experiment go ahead.

    Example:
        >>> row = store.add_dispatched(cid, p.parameters, p.metadata, "station-a",
        ...                            companion=companion(store, planner, [p]))   # doctest: +SKIP
    """
    decisions = [_take(p) or {"backend": getattr(planner, "backend", "unknown"), "generator": p.metadata.get("generator"),
                              "proposed_parameters": dict(p.parameters)} for p in proposals]

    def write(connection: Connection, trials: list[TrialRow]) -> None:
        for trial, decision in zip(trials, decisions):
            try:
                # a failed statement leaves SQLite's transaction as it was; PostgreSQL's needs a savepoint
                with connection.begin_nested() if connection.dialect.name != "sqlite" else nullcontext():
                    _write(connection, store, trial, decision)
            except Exception:  # noqa: BLE001 - the record explains the loop; it must never stop it
                log.exception("campaign_id=%s trial=%s: provenance not recorded", trial.campaign_id, trial.index)

    return write


def _write(connection: Connection, store: Store, trial: TrialRow, decision: dict[str, Any]) -> None:
    assert trial.id is not None
    fields = {k: v for k, v in decision.items() if k in ProvenanceRow.model_fields}
    fields["backend_version"] = (fields.get("versions") or {}).get(
        {"ax": "ax-platform"}.get(fields["backend"], fields["backend"]), (fields.get("versions") or {}).get("closedloop"))
    fields["pending"] = _pending_trials(connection, trial, fields.get("pending_parameters") or [],
                                        fields.get("decided_at"))
    hyper = fields.get("hyperparameters")
    if hyper is not None:
        text = json.dumps(_json_safe(hyper), sort_keys=True)
        fields["hyperparameters_digest"] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        folder = _files_folder(store)
        if len(text) > INLINE_LIMIT and folder is not None:
            path = folder / f"campaign-{trial.campaign_id}" / f"trial-{trial.index}-hyperparameters.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            fields["hyperparameters"], fields["hyperparameters_file"] = None, str(path)
    for key in ("hyperparameters", "predicted", "pending_parameters", "proposed_parameters", "source_std"):
        if fields.get(key) is not None:
            fields[key] = _json_safe(fields[key])
    for key in ("acquisition_value", "acquisition_joint", "source_threshold"):
        fields[key] = _json_safe(fields.get(key))
    # SQL Core on the trial's own connection; the model's defaults for the fields not given (building a
    # ProvenanceRow to fill them in took a quarter of a millisecond of the daemon's dispatch)
    connection.execute(_INSERT, {**_DEFAULTS, **fields, "trial_id": trial.id, "campaign_id": trial.campaign_id})


# constant statements with parameters, compiled once: they run in the daemon's dispatch
_INSERT = ProvenanceRow.__table__.insert()  # type: ignore[attr-defined]
# read only (the insert serializes them), so one empty list or dict serves every row
_DEFAULTS = {name: field.get_default(call_default_factory=True) for name, field in ProvenanceRow.model_fields.items()
             if not field.is_required()}
_OTHER_TRIALS = (select(TrialRow.index, TrialRow.parameters)
                 .where(TrialRow.campaign_id == bindparam("campaign"), TrialRow.id != bindparam("trial"))
                 .order_by(TrialRow.index))
# pending then: open now (never finished, so no finished_at), or finished since. Two halves, each a range of the
# (campaign_id, finished_at) index: as one OR, ordered by index, it scanned every trial of the campaign at each
# dispatch, decoding their parameters (16 ms of daemon CPU per experiment by 28 000 trials, from 5 ms)
_THEN = _OTHER_TRIALS.order_by(None).where(TrialRow.proposed_at <= bindparam("until"))  # type: ignore[operator]
_PENDING_THEN = union_all(
    _THEN.where(TrialRow.finished_at.is_(None),  # type: ignore[union-attr]
                TrialRow.status.in_([*OPEN_STATUSES, TrialStatus.held.value])),  # type: ignore[attr-defined]
    _THEN.where(TrialRow.finished_at >= bindparam("since")))  # type: ignore[operator]


def _files_folder(store: Store) -> Path | None:
    location = store.location
    if "://" in location and not location.startswith("sqlite:///"):
        return None
    path = Path(location.removeprefix("sqlite:///"))
    return path.parent / f"{path.stem}.provenance"


def _pending_trials(connection: Connection, trial: TrialRow, pending: list[dict[str, Any]],
                    decided_at: datetime | None) -> list[int | None]:
    """Trial numbers of the experiments that were pending: open ones, or finished after the decision."""
    if not pending:
        return []
    # Core on the trial's own connection, inside its transaction: this runs in the daemon's loop
    if decided_at is None:
        rows = connection.execute(_OTHER_TRIALS, {"campaign": trial.campaign_id, "trial": trial.id})
    else:
        # pending then: proposed before the decision, and open now or finished since; with a margin, as the
        # planner thread took its pending set a moment before it started deciding
        margin = timedelta(seconds=0.5)
        rows = connection.execute(_PENDING_THEN, {"campaign": trial.campaign_id, "trial": trial.id,
                                                  "until": decided_at + margin, "since": decided_at - margin})
    candidates = sorted(tuple(r) for r in rows)  # by trial number: the earliest matching trial is taken
    out: list[int | None] = []
    used: set[int] = set()
    for parameters in pending:
        match = next((i for i, p in candidates if p == parameters and i not in used), None)
        if match is not None:
            used.add(match)
        out.append(match)
    return out


# -- people in the loop: who approved, edited or rejected --------------------------------------------


@event.listens_for(TrialRow, "after_update")
def _follow_review(_mapper: Any, connection: Any, target: TrialRow) -> None:
    """Copy an approval (with or without edits) or a rejection into the trial's provenance, in the same
    transaction as the store's change (:meth:`Store.approve_held`, :meth:`Store.reject`)."""
    state = inspect(target)
    if not (state.attrs.planner.history.has_changes() or state.attrs.error.history.has_changes()):
        return
    planner = target.planner or {}
    if target.error and target.error.startswith(REJECTED_BY):
        review, by = "rejected", target.error.removeprefix(REJECTED_BY)
    elif planner.get("approved_by"):
        review, by = ("edited" if "proposed_parameters" in planner else "approved"), planner["approved_by"]
    else:
        return
    connection.execute(update(ProvenanceRow.__table__).where(ProvenanceRow.__table__.c.trial_id == target.id)  # type: ignore[attr-defined]
                       .values(review=review, reviewed_by=by))


# -- reading --------------------------------------------------------------------------------------------


def _trial(store: Store, campaign: str, index: int) -> tuple[int, TrialRow]:
    campaign_id = store.campaign_row(campaign).id
    assert campaign_id is not None
    row = None
    if -2**63 <= index < 2**63:  # a number past SQL's integers (a typo) raised OverflowError: a 500 on the dashboard
        with Session(store.engine) as session:
            row = session.exec(select(TrialRow).where(TrialRow.campaign_id == campaign_id,
                                                      TrialRow.index == index)).first()
    if row is None:
        raise CampaignError(no_trial(store, campaign_id, campaign, index))
    return campaign_id, row


def no_trial(store: Store, campaign_id: int, campaign: str, index: int) -> str:
    """The line for a trial number the campaign does not have, with the numbers it has: a person mistyped it, so it
    is bad input (exit 2) wherever it is given, as ``show``, ``explain``, ``replay`` and ``approve`` all take one."""
    with Session(store.engine) as session:
        indices = session.exec(select(TrialRow.index).where(TrialRow.campaign_id == campaign_id)).all()
    if not indices:
        return f"{campaign} has no trial #{index}: {campaign} has no trials yet"
    low, high = min(indices), max(indices)
    return f"{campaign} has no trial #{index}: {campaign} has " + (f"trial {low}" if low == high else f"trials {low}-{high}")


def provenance(store: Store, campaign: str, index: int) -> ProvenanceRow | None:
    """The provenance row of trial ``index`` (None for imported or hand-suggested trials, which have none)."""
    _, trial = _trial(store, campaign, index)
    with Session(store.engine) as session:
        return session.get(ProvenanceRow, trial.id)


def rows(store: Store, campaign_id: int) -> dict[int, ProvenanceRow]:
    """Every provenance row of a campaign, keyed by trial id."""
    with Session(store.engine) as session:
        return {r.trial_id: r for r in session.exec(select(ProvenanceRow).where(ProvenanceRow.campaign_id == campaign_id))}


def explain(store: Store, campaign: str, index: int) -> dict[str, Any]:
    """Everything known about why trial ``index`` was run and what came of it, JSON-ready."""
    from closedloop.store import ObservationRow

    _, trial = _trial(store, campaign, index)
    with Session(store.engine) as session:
        prov = session.get(ProvenanceRow, trial.id)
        obs = session.exec(select(ObservationRow).where(ObservationRow.trial_id == trial.id)).first()
    out: dict[str, Any] = {
        "campaign": campaign, "trial": trial.index, "status": trial.status, "parameters": trial.parameters,
        "values": obs.values if obs else None, "error": trial.error, "station": trial.station,
        # every attempt's Bluesky run in order; ``run_uid`` is the one whose result was stored
        "attempts": trial.attempts, "run_uids": list(trial.run_uids or []), "run_uid": obs.run_uid if obs else None,
        # results that came after the trial had finished (run uid -> values); every other run but ``run_uid`` failed
        "late_results": dict(trial.late_results or {}),
        "planner_metadata": trial.planner,
        # a run's documents over half a message (an image detector's) stay on its station; without this the
        # trial's run uid led nowhere, and `closedloop run` shows no station log that says where they went
        "documents_in_store": [u for u in trial.run_uids or [] if (store.documents_dir / f"{u}.jsonl").is_file()],
        # absent, the store was copied or moved without it (or predates it): no run's documents can be found here
        "documents_folder": str(store.documents_dir), "documents_folder_found": store.documents_dir.is_dir(),
    }
    if prov is None:
        out["provenance"] = None
        return out
    data = prov.model_dump(exclude={"trial_id", "campaign_id"})
    if prov.hyperparameters is None and prov.hyperparameters_file:
        text = _hyperparameters_text(store, prov)
        data["hyperparameters"] = json.loads(text) if text is not None else None
    data["decided_at"] = prov.decided_at.isoformat() if prov.decided_at else None
    out["provenance"] = data
    return out


def _hyperparameters_text(store: Store, prov: ProvenanceRow) -> str | None:
    """The hyperparameters kept in a file beside the store, found where they were written or beside the store as
    it is opened now: the path is as the daemon named it, relative to its working folder (``results/...``), and
    a store read from another folder, or moved with its folder, had shown none. Only a file with the recorded
    digest is taken."""
    assert prov.hyperparameters_file is not None
    written = Path(prov.hyperparameters_file)
    folder = _files_folder(store)
    candidates = [written] + ([folder / written.parent.name / written.name] if folder is not None else [])
    for path in candidates:
        if path.is_file():
            text = path.read_text()
            if prov.hyperparameters_digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest():
                return text
    return None


def _what_came_of(run_uid: str, info: dict[str, Any], fmt: Callable[[Any], str]) -> str:
    """What came of one run of a trial, as the store knows it: its result stored, a result that came too late (a
    station declared lost delivered it; it had been labelled failed), or a failed attempt."""
    if run_uid == info["run_uid"]:
        return "result stored"
    late = info.get("late_results", {}).get(run_uid)
    if late is not None:
        after = "run again" if info["run_uid"] is not None else "given up"
        return f"result {fmt(late)} not used: it arrived after the trial was {after}"
    return "failed"


def explain_lines(info: dict[str, Any]) -> list[str]:
    """``explain`` as lines for a terminal."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, dict):
            return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
        return "-" if v is None else str(v)

    lines = [f"{info['campaign']} trial #{info['trial']}: {info['status']}",
             f"  parameters: {fmt(info['parameters'])}",
             f"  values:     {fmt(info['values'])}" + (f"   error: {info['error']}" if info["error"] else ""),
             f"  station:    {fmt(info['station'])} (attempts {info['attempts']}); run uids: "
             f"{', '.join(f'{u} ({_what_came_of(u, info, fmt)})' for u in info['run_uids']) or '-'}"]
    # a trial no station ran (told by hand, imported) has a run uid but never had a Bluesky run to keep, and nor
    # has a compute station's Dask task (closedloop/compute.py names its result dask-KEY)
    elsewhere = [u for u in info["run_uids"] if u not in info.get("documents_in_store", info["run_uids"])
                 and info["station"] is not None and not u.startswith("dask-")]
    if elsewhere:
        # the store cannot tell a folder left behind from runs that were all too large to carry: say both
        missing = (f"no folder {info['documents_folder']} beside this store (copied or moved without it?); or "
                   if not info.get("documents_folder_found", True) else "")
        if info["provenance"] is None:
            # documents were kept from soon after decision records were: a trial without one may predate both
            missing = "run by a closedloop from before documents were kept; or " + missing
        lines.append(f"  documents:  not in the store for run {', '.join(elsewhere)}: {missing}over 512 KiB (an image "
                     f"detector's), they stay on station {fmt(info['station'])} beside its outbox, in "
                     "OUTBOX.documents/RUN_UID.jsonl (for `closedloop run`: STORE.outbox.documents/)")
    p = info["provenance"]
    if p is None:
        lines.append("  no decision record (imported, suggested by hand, or run before provenance was kept); "
                     f"planner metadata: {fmt(info['planner_metadata'])}")
        return lines
    versions = ", ".join(f"{k} {v}" for k, v in (p["versions"] or {}).items())
    lines += [
        f"  planner:    {p['backend']} {p['backend_version'] or ''} ({versions}); generator {p['generator']}",
        f"  seed:       {p['seed']} (decision seed {fmt(p['acquisition_seed'])}); batch of {p['batch_size']}, "
        f"position {p['batch_position']}; decided {p['decided_at'] or '-'}",
        # failures apart from results, as the dashboard's model view counts them: "11 results" had counted failures
        f"  data:       {_data(len(expand(p['observed'])), len(expand(p['failed'])))} "
        f"(trials {_ranges(expand(p['observed']))}"
        + (f"; failed {_ranges(expand(p['failed']))}" if p["failed"] else "") + ")"
        + f"; pending {len(p['pending'])} (trials {_ranges([i for i in p['pending'] if i is not None])})",
    ]
    if p["acquisition"]:
        lines.append(f"  acquisition: {p['acquisition']} = {fmt(p['acquisition_value'])} at this point"
                     f" (batch {fmt(p['acquisition_joint'])})")
    if p["predicted"]:
        lines.append("  predicted:  " + ", ".join(f"{k} = {v['mean']:.6g} ± {v['std']:.3g}"
                                                   for k, v in p["predicted"].items()))
    if p["source_std"]:
        threshold = p["source_threshold"]
        lines.append(f"  source:     {fmt(p['proposed_parameters'].get(SOURCE))}; std at this point: "
                     + ", ".join(f"{k} {v:.3g}" for k, v in p["source_std"].items())
                     + f" (threshold {'-' if threshold is None else f'{threshold:.3g}'}: the cheapest source above "
                     "it runs, else the target)")
    if p["hyperparameters"]:
        lines.append("  hyperparameters: " + "; ".join(
            f"{k.split('.')[-1] if k.count('.') < 2 else k} {', '.join(f'{x:.4g}' for x in v)}"
            for k, v in p["hyperparameters"].items()))
    if p["hyperparameters_digest"]:
        lines.append(f"  hyperparameters digest: {p['hyperparameters_digest']}"
                     + (f" ({p['hyperparameters_file']})" if p["hyperparameters_file"] else ""))
    lines.append(f"  time:       fit {fmt(p['fit_seconds'])} s, optimize {fmt(p['optimize_seconds'])} s, "
                 f"suggest {fmt(p['suggest_seconds'])} s")
    if p["proposed_parameters"] != info["parameters"]:
        lines.append(f"  proposed:   {fmt(p['proposed_parameters'])} (edited before it ran)")
    if p["review"]:
        lines.append(f"  review:     {p['review']} by {p['reviewed_by']}")
    return lines


def ranges_of(numbers: Any) -> list[list[int]]:
    """Trial numbers as sorted ``[first, last]`` ranges: ``[1, 2, 3, 5]`` -> ``[[1, 3], [5, 5]]``."""
    out: list[list[int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


class _Ranges:
    """Trial numbers as :func:`ranges_of` gives them, kept up to date as numbers arrive (in any order, repeated):
    the cost of an addition grows with the number of gaps, not of trials."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[list[int]] = []

    def add(self, n: int) -> None:
        i = bisect.bisect_right(self._starts, n)  # ranges[i - 1] starts at or before n, ranges[i] after it
        if i and n <= self._ranges[i - 1][1]:
            return
        left = bool(i) and self._ranges[i - 1][1] == n - 1
        right = i < len(self._ranges) and self._ranges[i][0] == n + 1
        if left and right:
            self._ranges[i - 1][1] = self._ranges[i][1]
            del self._ranges[i], self._starts[i]
        elif left:
            self._ranges[i - 1][1] = n
        elif right:
            self._ranges[i][0] = self._starts[i] = n
        else:
            self._ranges.insert(i, [n, n])
            self._starts.insert(i, n)

    def ranges(self) -> list[list[int]]:
        return [list(r) for r in self._ranges]


def expand(ranges: list[list[int]] | list[int]) -> list[int]:
    """The trial numbers of ``[first, last]`` ranges, in order (plain numbers, as first written, pass through)."""
    out: list[int] = []
    for item in ranges:
        out.extend([item] if isinstance(item, int) else range(item[0], item[1] + 1))
    return out


def _ranges(numbers: list[int]) -> str:
    """``1-5, 7, 9-10``."""
    if not numbers:
        return "-"
    values = sorted(set(numbers))
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _data(observed: int, failed: int) -> str:
    """``9 results, 2 failures``: ``observed`` experiments a planner was given, ``failed`` of them without a value,
    counted apart (the BoTorch planner learns from those where experiments fail, not what they measure)."""
    results = f"{observed - failed} result{'' if observed - failed == 1 else 's'}"
    return f"{results}, {failed} failure{'' if failed == 1 else 's'}" if failed else results


# -- replay ---------------------------------------------------------------------------------------------


@dataclass
class Replay:
    """A decision made again: the recorded proposal, the replayed one, and whether they are the same."""

    campaign: str
    trial: int
    recorded: dict[str, Any]
    replayed: dict[str, Any] | None
    batch: list[dict[str, Any]]
    observed: int  # experiments the planner was given, failures included
    pending: int
    seconds: float
    # package -> (version recorded with the decision, version replaying it), where they differ
    versions: dict[str, tuple[str, str]] | None = None
    failed: int = 0  # of the ``observed`` experiments, those without a result

    @property
    def same(self) -> bool:
        return self.replayed == self.recorded

    def lines(self) -> list[str]:
        from closedloop.view import format_values

        verdict = "the same experiment" if self.same else "a DIFFERENT experiment"
        lines = [f"{self.campaign} trial #{self.trial}: planner rebuilt with {_data(self.observed, self.failed)} and "
                 f"{self.pending} pending experiments ({self.seconds:.2f} s)",
                 f"  recorded: {format_values(self.recorded)}",
                 f"  replayed: {format_values(self.replayed)}"]
        if self.versions:
            # a replay is exact only with the recorded versions: without this a referee who upgraded since saw a
            # different experiment and no reason
            lines.append("  versions: " + ", ".join(f"{k} {then} when decided, {now} here"
                                                    for k, (then, now) in self.versions.items()))
        return [*lines, f"  -> {verdict}"]


def replay(store: Store, campaign: str, index: int) -> Replay:
    """Rebuild the planner as it was before trial ``index`` and ask it again.

    The planner gets exactly the results it had (in the order it received them, values from the store),
    the same experiments as pending and the same batch size; the proposal at the recorded place in the
    batch is compared with what the planner proposed then (before any person edited it).

    Raises:
        CampaignError: the campaign has no trial ``index``.
        StoreError: the trial has no provenance record, or a result it rested on is no longer in the store.
    """
    from closedloop.planner import make_planner

    campaign_id, trial = _trial(store, campaign, index)
    with Session(store.engine) as session:
        prov = session.get(ProvenanceRow, trial.id)
    if prov is None:
        raise StoreError(f"trial #{index} of {campaign!r} has no provenance record: it cannot be replayed")
    if prov.backend == "ax":
        # Ax keeps the proposals the daemon made ahead and dropped (its Sobol sequence has passed them, its model
        # counts them as pending for good), which the store does not hold: a fresh Client told the same results
        # proposed another point from trial #2 of a daemon's run on
        raise StoreError(f"trial #{index} of {campaign!r} was proposed by Ax, which keeps the proposals the daemon "
                         "dropped, and the store does not: it cannot be replayed")
    spec = store.campaign(campaign_id)
    source = None
    if prov.backend != spec.planner.backend or (prov.seed is not None and prov.seed != spec.planner.seed):
        # another planner than the campaign's made it (the daemon's space-filling filler): rebuild that one; with
        # sources it covered the parameters alone and the daemon chose the source (``CampaignRun.fill``)
        if spec.sources:
            source = prov.proposed_parameters.get(SOURCE)
            spec = spec.at_source(spec.target_source)  # type: ignore[arg-type]
        spec = spec.model_copy(update={"planner": spec.planner.model_copy(update={"backend": prov.backend,
                                                                                  "seed": prov.seed})})
    results = {r.trial: r for r in store.results(campaign_id)}
    failed = set(expand(prov.failed))
    given = []
    for number in expand(prov.observed):
        result = results.get(number)
        if result is None or (number in failed) != (result.values is None):
            raise StoreError(f"trial #{index} rested on trial #{number}, which the store no longer has as it was")
        given.append(result)
    started = time.perf_counter()
    planner = make_planner(spec)
    if given:
        planner.ingest(given)
    with planning_lock, _torch_threads((prov.versions or {}).get("torch_threads")):
        proposals = planner.suggest(prov.batch_size, pending=[dict(p) for p in prov.pending_parameters])
    seconds = time.perf_counter() - started
    replayed = proposals[prov.batch_position].parameters if prov.batch_position < len(proposals) else None
    if replayed is not None and source is not None:
        replayed = {**replayed, SOURCE: source}
    # through JSON like the recorded one, so that equal means equal as stored
    replayed = json.loads(json.dumps(_json_safe(replayed))) if replayed is not None else None
    installed = _versions(prov.backend)
    differ = {k: (v, installed.get(k, "not installed")) for k, v in (prov.versions or {}).items()
              if k != "torch_threads" and installed.get(k) != v}
    return Replay(campaign, index, prov.proposed_parameters, replayed, [p.parameters for p in proposals],
                  len(given), len(prov.pending_parameters), seconds, differ, len(failed))
