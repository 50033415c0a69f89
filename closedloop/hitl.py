"""People in the loop: experiments proposed for hand execution, results told by hand, approval of
proposals, and past experiments imported from a table.

Every function here works on a :class:`~closedloop.store.Store` and a campaign name, so the command
line and a notebook do exactly the same thing.

Example:
    >>> store = Store("results/branin.db")                          # doctest: +SKIP
    >>> trials = suggest(store, campaign, n=2)                     # doctest: +SKIP
    >>> tell(store, "branin", trials[0].index, {"y": 3.2})         # doctest: +SKIP
"""

from __future__ import annotations

import csv
import getpass
import io
import logging
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from closedloop.campaign import (
    Campaign,
    CategoricalParameter,
    DiscreteParameter,
    FixedParameter,
    IntegerParameter,
    TABLE_COLUMNS,
    decimal_number,
)
from closedloop.errors import CampaignError
from closedloop.planner import make_planner
from closedloop.store import Store, TrialRow, TrialStatus

log = logging.getLogger("closedloop.hitl")

MANUAL = "manual"  # planner metadata "execution" marker: a person runs this trial, not a station


class DataError(CampaignError):
    """Values given by a person (on the command line or in a table) do not fit the campaign.

    ``problems`` holds one line per bad value: row, column, value and why.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def user() -> str:
    """Who is acting, for the record (``rejected by <user>``)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


# -- values ---------------------------------------------------------------------------------------

# a text cell starting with one of these is run as a formula by a spreadsheet that opens the CSV (OWASP, "CSV
# injection"); "'" is among them so that the cell an export writes reads back as the value it was
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV export writes it: text a spreadsheet would take for a formula gets a leading ``'``.

    >>> csv_cell("=SUM(A1)"), csv_cell(-2.5), csv_cell("DMF")
    ("'=SUM(A1)", -2.5, 'DMF')
    """
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def _from_csv_cell(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text



def parse_value(campaign: Campaign, name: str, text: Any) -> Any:
    """``text`` converted to parameter ``name``'s declared type and checked against its limits.

    Raises ValueError with the reason (the caller adds where it came from).
    """
    p = campaign.parameters[name]
    if isinstance(p, CategoricalParameter):
        for allowed in p.values:
            if text == allowed or str(text).strip() == str(allowed):
                return allowed
        raise ValueError(f"is not one of {', '.join(map(str, p.values))}")
    if isinstance(p, FixedParameter):
        if text == p.value or str(text).strip() == str(p.value):
            return p.value
        try:
            if float(text) == float(p.value):
                return p.value
        except (TypeError, ValueError):
            pass
        raise ValueError(f"is fixed at {p.value}")
    number = _number(text)
    if isinstance(p, IntegerParameter):
        if number != round(number):
            raise ValueError("is not an integer")
        number = int(round(number))
    if isinstance(p, DiscreteParameter):
        allowed = p.allowed(number)
        if allowed is None:
            raise ValueError(f"is not one of the allowed values {', '.join(f'{v:g}' for v in p.values)}")
        return allowed
    low, high = p.bounds  # type: ignore[union-attr]
    if not low <= number <= high:
        raise ValueError(f"is outside the bounds [{low:g}, {high:g}]")
    return number if isinstance(p, IntegerParameter) else float(number)


def _number(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError("is not a number")
    try:
        number = decimal_number(text) if isinstance(text, str) else float(text)
    except (TypeError, ValueError):
        raise ValueError("is not a number") from None
    except OverflowError:  # an integer beyond any float (JSON allows it)
        raise ValueError("is not a finite number") from None
    if not math.isfinite(number):
        raise ValueError("is not a finite number")
    return number


def parse_output(text: Any) -> float:
    """A measured value: a finite number."""
    return _number(text)


def check_constraints(campaign: Campaign, parameters: dict[str, Any]) -> list[str]:
    """One message per linear constraint the parameters break."""
    broken = []
    for c in campaign.linear_constraints:
        terms = [coefficient * float(parameters[name]) for name, coefficient in c.coefficients.items()]
        total = sum(terms)
        # an inequality holds to the sum's rounding (0.1 + 0.2 <= 0.3), no more: at 1e-9 of the right side an edit
        # of x1 + x2 = 1.5000000014 passed x1 + x2 <= 1.5, and reached the instrument
        tolerance = 1e-12 * max(1.0, abs(c.rhs), *(abs(t) for t in terms))
        ok = {"<=": total <= c.rhs + tolerance, ">=": total >= c.rhs - tolerance,
              "==": abs(total - c.rhs) <= max(tolerance, 1e-6 * max(1.0, abs(c.rhs)))}[c.op]
        if not ok:
            broken.append(f"breaks constraint {c.text!r} (left side is {total!r})")
    return broken


def _assignments(pairs: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise DataError([f"{pair!r}: write NAME=VALUE"])
        if name.strip() in out:
            raise DataError([f"{pair!r}: {name.strip()} is given twice"])
        out[name.strip()] = value.strip()
    return out


# -- lookups ----------------------------------------------------------------------------------------


def trial_by_index(store: Store, campaign_id: int, index: int) -> TrialRow:
    """The trial numbered ``index`` (as shown to people: #1, #2, ...) in a campaign."""
    for trial in store.trials(campaign_id):
        if trial.index == index:
            return trial
    from closedloop.provenance import no_trial

    raise DataError([no_trial(store, campaign_id, store.campaign_row(campaign_id).name, index)])


def is_manual(trial: TrialRow) -> bool:
    return trial.planner.get("execution") == MANUAL


# -- suggest and tell ------------------------------------------------------------------------------


def suggest(store: Store, campaign: Campaign | str, n: int = 1) -> list[TrialRow]:
    """Ask the campaign's planner for ``n`` experiments to run by hand and record them as pending.

    Trials already open (pending, held, in flight) are passed to the planner as pending so it does
    not propose them again. The new trials are ``proposed`` with ``execution: manual`` in their
    planner metadata, so a daemon leaves them to the person.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # "2" and None had raised a bare TypeError
        raise DataError([f"-n {n!r}: ask for at least one proposal, a whole number"])
    if isinstance(campaign, str):
        campaign = store.campaign(campaign)
    stored = any(row.name == campaign.name for row in store.campaigns())
    if n > campaign.max_experiments and not stored:  # before the campaign is written to a new store
        _over_budget(campaign, n, 0, 0)
    campaign_id = store.open_campaign(campaign)
    # one suggest at a time: two at once both passed the budget check and were given the same points
    with store.serialized(campaign.name, "suggest"):
        open_trials = store.trials(campaign_id, [TrialStatus.proposed.value, TrialStatus.dispatched.value,
                                                 TrialStatus.held.value])
        finished = len(store.trials(campaign_id, [TrialStatus.completed.value, TrialStatus.failed.value,
                                                  TrialStatus.abandoned.value]))
        if n > campaign.max_experiments - finished - len(open_trials):
            _over_budget(campaign, n, finished, len(open_trials))
        from closedloop import provenance  # issue 9: hand-run trials are explained like the daemon's

        planner = provenance.Recorder(make_planner(campaign))
        planner.ingest(store.results(campaign_id))
        proposals = planner.suggest(n, pending=[t.parameters for t in open_trials])
        rows = store.add_trials(campaign_id, [(p.parameters, {**p.metadata, "execution": MANUAL,
                                                              "suggested_by": user()}) for p in proposals],
                                companion=provenance.companion(store, planner, proposals))  # issue 9: why, with them
    for row in rows:
        log.info("campaign=%s trial=%s suggested for hand execution parameters=%s", campaign.name, row.index,
                 row.parameters)
    return rows


def _over_budget(campaign: Campaign, n: int, finished: int, open_trials: int) -> NoReturn:
    """Refuse ``n`` hand proposals past the budget, as a daemon counts it (they were recorded, and the
    campaign ran over its budget)."""
    room = max(campaign.max_experiments - finished - open_trials, 0)
    counted = f"({finished} finished, {open_trials} open)"
    if room == 0:  # "ask for at most 0" read as a suggestion to make
        # not "raise budget.experiments": a store refuses a changed file under the same name
        then = "tell the open trials' results" if open_trials else (
            "the campaign is done; to go on, give its file a new name and a larger budget and seed it with these "
            f"results: closedloop export {campaign.name} -f csv -o {campaign.name}.csv, then closedloop import "
            f"NEW_FILE {campaign.name}.csv")
        raise DataError([f"the budget of {campaign.max_experiments} experiments is used up {counted}: {then}"])
    raise DataError([f"-n {n}: the budget of {campaign.max_experiments} experiments leaves {room} {counted}; ask "
                     f"for at most {room}"])


def tell(store: Store, campaign_name: str, index: int, values: dict[str, Any],
         duration_s: float | None = None) -> TrialRow:
    """Record the measured ``values`` of trial ``index``, run by hand, like any station result.

    The result gets a synthetic run uid ``manual-<uuid>``. Raises :class:`DataError` when an output
    is missing, unknown or not a finite number.
    """
    campaign = store.campaign(campaign_name)
    campaign_id = store.campaign_row(campaign_name).id
    assert campaign_id is not None
    trial = trial_by_index(store, campaign_id, index)
    parsed = _check_outputs(campaign, values, f"trial #{index}")
    refusal = _takes_no_result(trial)
    if refusal:  # the person named a trial that takes no result (as the same row of a table is reported)
        raise DataError([refusal])
    assert trial.id is not None
    store.record_result(trial.id, f"manual-{uuid.uuid4()}", parsed, duration_s=duration_s)
    log.info("campaign=%s trial=%s completed by hand values=%s", campaign.name, index, parsed)
    return store.trial(trial.id)


def _takes_no_result(trial: TrialRow) -> str | None:
    """Why a result told by hand cannot be recorded for ``trial`` (None if it can): only an open trial from
    :func:`suggest` takes one. A trial the daemon proposed goes to a station, whose measurement would
    otherwise be thrown away, and the budget passed."""
    if trial.status == TrialStatus.held.value:
        return f"trial #{trial.index} is held for approval; approve it before telling its result"
    if trial.status not in (TrialStatus.proposed.value, TrialStatus.dispatched.value):
        return f"trial #{trial.index} is {trial.status}; it takes no result"
    if not is_manual(trial):
        return (f"trial #{trial.index} was proposed for a station, which measures it; only trials from "
                "'closedloop suggest' take results by hand")
    return None


def _check_outputs(campaign: Campaign, values: dict[str, Any], where: str) -> dict[str, float]:
    problems: list[str] = []
    parsed: dict[str, float] = {}
    for name, text in values.items():
        if name not in campaign.outputs:
            problems.append(f"{where}: {name!r} is not an output of {campaign.name} "
                            f"(outputs: {', '.join(campaign.outputs)})")
            continue
        try:
            parsed[name] = parse_output(text)
        except ValueError as exc:
            problems.append(f"{where}: {name}={text!r} {exc}")
    missing = [name for name in campaign.outputs if name not in values]
    if missing:
        problems.append(f"{where}: missing output {', '.join(missing)}")
    if problems:
        raise DataError(problems)
    return parsed


def tell_csv(store: Store, campaign_name: str, path: Path) -> list[TrialRow]:
    """Results of several hand-run trials from a CSV with a ``trial`` column and one per output.

    Every row is checked before any is stored.
    """
    campaign = store.campaign(campaign_name)
    campaign_id = store.campaign_row(campaign_name).id
    assert campaign_id is not None
    header, rows = _read_table(path)
    if "trial" not in header:
        raise DataError([f"{path}: no 'trial' column (columns: {', '.join(header)})"])
    missing = [n for n in campaign.outputs if n not in header]
    if missing:  # else every row is refused as if its cells were empty
        raise DataError([f"{path}: missing column {name!r}" for name in missing])
    problems: list[str] = []
    checked: list[tuple[TrialRow, dict[str, float]]] = []
    by_index = {t.index: t for t in store.trials(campaign_id)}
    rows_of: dict[int, int] = {}
    for number, row in rows:
        where = f"{path} row {number}"
        try:
            index = int(row["trial"])
            trial = by_index[index]
        except (ValueError, KeyError):
            problems.append(f"{where}, column trial: {row['trial']!r} is not a trial of {campaign.name}")
            continue
        if index in rows_of:
            problems.append(f"{where}, column trial: trial #{index} is also on row {rows_of[index]}; "
                            "a trial takes one result")
            continue
        rows_of[index] = number
        refusal = _takes_no_result(trial)
        if refusal:
            problems.append(f"{where}, column trial: {refusal}")
            continue
        # a parameter column (an export, or the setting actually used) must agree with the trial: x1=3 for a
        # trial proposed at x1=3.68145 was recorded at 3.68145 without a word
        differs = [f"{where}, column {name}: {row[name]!r} is not trial #{index}'s {name}={trial.parameters[name]!r}; "
                   "a result is for the experiment as proposed (record one run elsewhere with 'closedloop import')"
                   for name in campaign.parameters if name in row and row[name] != ""
                   and not _same_value(campaign, name, row[name], trial.parameters.get(name))]
        if differs:
            problems.extend(differs)
            continue
        try:
            values = _check_outputs(campaign, {k: row.get(k, "") for k in campaign.outputs}, where)
        except DataError as exc:
            problems.extend(exc.problems)
            continue
        checked.append((trial, values))
    if problems:
        raise DataError(problems)
    for trial, values in checked:
        assert trial.id is not None
        store.record_result(trial.id, f"manual-{uuid.uuid4()}", values)
    return [store.trial(t.id) for t, _ in checked]  # type: ignore[arg-type]


def _same_value(campaign: Campaign, name: str, text: str, stored: Any) -> bool:
    try:
        value = parse_value(campaign, name, text)
    except ValueError:
        return False
    if isinstance(value, float) and isinstance(stored, (int, float)) and not isinstance(stored, bool):
        return math.isclose(value, float(stored), rel_tol=1e-9, abs_tol=1e-12)
    return bool(value == stored)


# -- approval --------------------------------------------------------------------------------------


def approve(store: Store, campaign_name: str, index: int, edits: dict[str, Any] | None = None,
            by: str | None = None) -> TrialRow:
    """Let a held proposal run, with parameters edited within the campaign's limits if ``edits``.

    This writes the store: with a daemon serving the campaign, ask it instead (its ``approve`` control
    request calls this and then dispatches the trial at once). Raises :class:`DataError` (nothing
    changes) when an edit names no parameter, has the wrong type, leaves the bounds or breaks a constraint.
    """
    campaign = store.campaign(campaign_name)
    campaign_id = store.campaign_row(campaign_name).id
    assert campaign_id is not None
    trial = trial_by_index(store, campaign_id, index)
    parameters = None
    if edits:
        parameters = dict(trial.parameters)
        problems = []
        for name, text in edits.items():
            if name not in campaign.parameters:
                problems.append(f"trial #{index}: {name!r} is not a parameter of {campaign.name} "
                                f"(parameters: {', '.join(campaign.parameters)})")
                continue
            try:
                parameters[name] = parse_value(campaign, name, text)
            except ValueError as exc:
                problems.append(f"trial #{index}: {name}={text} {exc}")
        if not problems:
            problems = [f"trial #{index}: the edit {message}" for message in check_constraints(campaign, parameters)]
        if problems:
            raise DataError(problems)
    assert trial.id is not None
    row = store.approve_held(trial.id, by or user(), parameters)
    log.info("campaign=%s trial=%s approved by %s parameters=%s", campaign.name, index, by or user(), row.parameters)
    return row


def reject(store: Store, campaign_name: str, index: int, by: str | None = None) -> TrialRow:
    """Refuse a held (or pending) proposal: it is stored as failed, ``rejected by <user>``.

    Like :func:`approve`, this writes the store; a daemon serving the campaign takes a ``reject`` control request.
    """
    campaign_id = store.campaign_row(campaign_name).id
    assert campaign_id is not None
    trial = trial_by_index(store, campaign_id, index)
    assert trial.id is not None
    row = store.reject(trial.id, by or user())
    log.info("campaign=%s trial=%s %s", campaign_name, index, row.error)
    return row


# -- import ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportSummary:
    trials: list[TrialRow]
    ignored_columns: list[str]


def import_csv(store: Store, campaign: Campaign | str, path: Path) -> ImportSummary:
    """Seed a campaign with past experiments from a CSV: one column per parameter and per output.

    Fixed parameters may be left out. Extra columns of an export (trial, status, ...) are ignored;
    a ``status`` of ``failed`` imports the row as a failed experiment (with its ``error``). Every
    bad cell is reported (row, column, value, why) and nothing is written if any is bad.
    """
    if isinstance(campaign, str):
        campaign = store.campaign(campaign)
    header, rows = _read_table(path)
    problems: list[str] = []
    required = [n for n, p in campaign.parameters.items() if not isinstance(p, FixedParameter)] + campaign.outputs
    missing = [n for n in required if n not in header]
    if missing:
        raise DataError([f"{path}: missing column {name!r}" for name in missing])
    known = set(campaign.parameters) | set(campaign.outputs) | set(TABLE_COLUMNS)  # an import ignores these
    ignored = [h for h in header if h not in known]
    parsed_rows: list[tuple[dict[str, Any], dict[str, float] | None, str | None]] = []
    for number, row in rows:
        where = f"{path} row {number}"
        parameters: dict[str, Any] = {}
        for name, p in campaign.parameters.items():
            if name not in row or (isinstance(p, FixedParameter) and row[name] == ""):
                if isinstance(p, FixedParameter):
                    parameters[name] = p.value
                continue
            try:
                parameters[name] = parse_value(campaign, name, row[name])
            except ValueError as exc:
                problems.append(f"{where}, column {name}: {row[name]!r} {exc}")
        if len(parameters) == len(campaign.parameters):
            problems.extend(f"{where}: {message}" for message in check_constraints(campaign, parameters))
        status = row.get("status", "completed").strip() or "completed"
        if status == TrialStatus.failed.value:
            parsed_rows.append((parameters, None, row.get("error") or None))
            continue
        if status != TrialStatus.completed.value:
            problems.append(f"{where}, column status: {status!r} is neither completed nor failed")
            continue
        values: dict[str, float] = {}
        for name in campaign.outputs:
            try:
                values[name] = parse_output(row.get(name, ""))
            except ValueError as exc:
                problems.append(f"{where}, column {name}: {row.get(name, '')!r} {exc}")
        parsed_rows.append((parameters, values, None))
    if not rows:
        problems.append(f"{path}: no rows to import")
    if problems:
        raise DataError(problems)
    campaign_id = store.open_campaign(campaign)
    trials = store.import_results(campaign_id, parsed_rows, source=Path(path).name)
    log.info("campaign=%s imported %d experiments from %s", campaign.name, len(trials), path)
    return ImportSummary(trials, ignored)


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A table of experiments, as ``closedloop export`` writes them: CSV, or JSON or parquet by the file's suffix.

    Header and (row number, row of cells as text); a CSV's row numbers are a spreadsheet's (the header is row 1),
    a JSON or parquet table's count its records from 1. Cells are text, as a CSV's are, so that every format is
    checked by the same rules (an export in JSON or parquet had been read as CSV: "2 cells for 1 columns").
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return _read_csv(path)


def _cell(value: Any) -> str:
    """A JSON or parquet value as the CSV cell an export writes for it (repr keeps every digit of a float)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _records(path: Path, records: Any) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError([f"{path}: not a table of experiments (a list of objects, as `closedloop export -f json` "
                         "writes)"])
    header: list[str] = []
    for record in records:
        header.extend(str(k) for k in record if str(k) not in header)
    if not header:
        raise DataError([f"{path}: the file is empty"])
    return header, [(number, {str(k): _cell(v) for k, v in record.items()})
                    for number, record in enumerate(records, start=1)]


def _read_json(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    import json

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise DataError([f"{path}: not a JSON file: {exc}"]) from None
    try:
        records = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DataError([f"{path}: not a JSON file: {str(exc)[:200]}"]) from None
    return _records(path, records)


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise DataError([f"{path}: reading parquet needs pyarrow: pip install pyarrow"]) from None
    except OSError as exc:
        raise DataError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    except Exception as exc:  # noqa: BLE001 - pyarrow's own errors for a file that is not parquet
        raise DataError([f"{path}: not a parquet file: {str(exc)[:200]}"]) from None
    records = [{k: (None if v is pd.NaT else v) for k, v in row.items()} for row in frame.to_dict("records")]
    return _records(path, records)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (row number as a spreadsheet shows it, row) pairs; the header is row 1."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Excel's plain "CSV" is Windows-1252 ('°C', 'é'): the decoder's error stopped import and tell --csv with
        # exit code 1 and a byte offset ('position 84'), where the row tells a scientist what to look at
        row = data.count(b"\n", 0, exc.start) + 1
        raise DataError([f"{path} row {row}: not UTF-8 text (the byte 0x{data[exc.start]:02x}, perhaps Latin-1 or "
                         "Windows-1252); save it as UTF-8 (in Excel: 'CSV UTF-8')"]) from None
    try:
        with io.StringIO(text, newline="") as handle:
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError([f"{path}: the file is empty"])
            if any(";" in h for h in header):
                # Excel in a language with decimal commas saves 'CSV' with ';': the message was "row 2: 4 cells for
                # 1 columns", which says nothing of the cause (names of parameters and outputs hold no ';')
                raise DataError([f"{path}: the header {','.join(header)!r} seems to use ';' as separator; the table "
                                 "must be comma-separated, with '.' as decimal point"])
            duplicates = sorted({h for h in header if header.count(h) > 1})
            if duplicates:
                raise DataError([f"{path}: column {h!r} appears twice" for h in duplicates])
            rows = []
            for number, cells in enumerate(reader, start=2):
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise DataError([f"{path} row {number}: {len(cells)} cells for {len(header)} columns"])
                rows.append((number, {h: _from_csv_cell(c.strip()) for h, c in zip(header, cells)}))
    except csv.Error as exc:
        raise DataError([f"{path}: not a CSV file: {exc}"]) from None
    return header, rows
