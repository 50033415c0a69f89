"""The experiment store: campaigns, trials and observations in SQL (SQLite in WAL mode by default).

Every trial is written before it is dispatched and every result before it is acknowledged, so the
store is the record of what happened; the planner can always be rebuilt from it.

Example:
    >>> store = Store("results/demo.db")                       # doctest: +SKIP
    >>> cid = store.open_campaign(campaign)                   # doctest: +SKIP
    >>> [t.index for t in store.trials(cid)]                  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, bindparam, event, func, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field, Session, SQLModel, create_engine, select

from closedloop.campaign import Campaign
from closedloop.errors import NotAStore, StoreError
from closedloop.planner.base import Result

# Writes rows that belong with new trials (their provenance) on the connection and in the transaction that
# stores the trials, so neither exists without the other and both are durable before a trial is dispatched.
TrialCompanion = Callable[[Connection, "list[TrialRow]"], None]

_RUN_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Row defaults come from Python functions, not the builtins dict and list: pydantic inspects a default
# factory's signature on every row it builds, and a builtin's signature is parsed from text into an AST,
# which CPython 3.11.7 cannot do in two threads at once ("AST constructor recursion depth mismatch")
def _empty_metadata() -> dict[str, Any]:
    return {}


def _no_runs() -> list[str]:
    return []


class TrialStatus(str, Enum):
    proposed = "proposed"
    dispatched = "dispatched"
    completed = "completed"
    failed = "failed"
    abandoned = "abandoned"
    held = "held"  # approval mode: waits for a person to approve (-> proposed) or reject (-> failed)


OPEN_STATUSES = (TrialStatus.proposed.value, TrialStatus.dispatched.value)


class CampaignRow(SQLModel, table=True):
    __tablename__ = "campaign"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    spec_yaml: str
    spec_hash: str
    status: str = "running"
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class TrialRow(SQLModel, table=True):
    __tablename__ = "trial"
    # ix_trial_campaign_finished: each dispatch's provenance looks up the trials open or finished since its
    # decision (provenance._PENDING_THEN), a few rows that without it were found by scanning every trial;
    # ix_trial_campaign_status: counts per status and the trials waiting are read from the index alone
    __table_args__ = (UniqueConstraint("campaign_id", "index", name="uq_trial_campaign_index"),
                      Index("ix_trial_campaign_finished", "campaign_id", "finished_at"),
                      Index("ix_trial_campaign_status", "campaign_id", "status"))

    id: int | None = Field(default=None, primary_key=True)
    campaign_id: int = Field(foreign_key="campaign.id", index=True)
    index: int
    parameters: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(default=TrialStatus.proposed.value, index=True)
    station: str | None = None
    attempts: int = 0
    planner: dict[str, Any] = Field(default_factory=_empty_metadata, sa_column=Column(JSON, nullable=False))
    error: str | None = None
    proposed_at: datetime = Field(default_factory=utcnow)
    dispatched_at: datetime | None = None
    finished_at: datetime | None = None
    # the Bluesky run of every attempt, in order: failed ones (their run opened, then the device failed) first,
    # the completed one (also ``observation.run_uid``) last. A server default, as the daemon inserts with SQL Core
    run_uids: list[str] = Field(default_factory=_no_runs,
                                sa_column=Column(JSON, nullable=False, server_default=text("'[]'")))
    # run uid -> values of a result that came after the trial had finished (a station declared lost delivered it
    # once the trial had been run again or given up): acknowledged, so kept, but not the trial's observation; its
    # run is also in ``run_uids``, where without this it could not be told from a failed attempt
    late_results: dict[str, dict[str, float]] = Field(
        default_factory=_empty_metadata, sa_column=Column(JSON, nullable=False, server_default=text("'{}'")))


REJECTED_BY = "rejected by "


def used_instrument(attempts: int, error: str | None) -> bool:
    """Whether a finished trial took its instrument's time and cost: every one but a proposal a person
    rejected before it was ever dispatched (``Store.reject``)."""
    return attempts > 0 or not (error or "").startswith(REJECTED_BY)


def _with_run(run_uids: list[str] | None, run_uid: str | None) -> list[str]:
    """``run_uids`` with ``run_uid`` added at the end, once (a failure or result may be delivered twice)."""
    uids = list(run_uids or [])
    if run_uid and run_uid not in uids:
        uids.append(run_uid)
    return uids


@dataclass(frozen=True, slots=True)
class FinishedTrial:
    """What :meth:`Store.finished_trials` reads of a finished trial."""

    id: int
    index: int
    status: str
    parameters: dict[str, Any]
    values: dict[str, float] | None  # its result's, if it has one
    attempts: int
    error: str | None
    execution: str | None  # "manual" for a trial proposed for hand execution
    dispatched_at: datetime | None
    finished_at: datetime | None


class ObservationRow(SQLModel, table=True):
    __tablename__ = "observation"

    id: int | None = Field(default=None, primary_key=True)
    trial_id: int = Field(foreign_key="trial.id", unique=True)
    run_uid: str = Field(unique=True)
    values: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    noise: dict[str, float] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    duration_s: float | None = None
    received_at: datetime = Field(default_factory=utcnow)


BUSY_S = 10  # how long a SQLite store waits for another connection's write lock

#: what "database is locked" means once the wait is over, and what to do: said for a daemon, which stops there, and
#: for every command
LOCKED = (f"database is locked: another program has held a write transaction on it for over {BUSY_S} s (a sqlite3 "
          "shell, or DB Browser with changes not yet written?); end it, then start again: nothing was written, and a "
          "daemon acknowledged nothing it did not store")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # FULL: each commit is on the disk (the -wal fsynced) before the daemon acknowledges what it holds, and the
    # station then deletes its only other copy. NORMAL, in WAL mode, synced only at checkpoints: a power cut or an
    # OS crash of the control host lost every result acknowledged since the last one (12 of 12 in a probe)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", f"busy_timeout={BUSY_S * 1000}"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


class _Unheld:
    """A hold on a campaign that no process ever held: nothing to let go of."""

    def close(self) -> None:
        pass


class _AdvisoryHold:
    """A PostgreSQL session-level advisory lock and the connection that holds it."""

    def __init__(self, connection: Connection, key: int):
        self.connection, self.key = connection, key

    def alive(self) -> bool:
        """Whether the session holding the lock is still there: a server restart (or a dropped connection) ends
        it, and the lock with it, silently."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            self.connection.execute(text("SELECT 1"))
        except SQLAlchemyError:  # the server's error, or the dead connection's pending rollback after it
            return False
        return True

    def close(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        # the pool keeps the session alive: closing the connection alone would keep the lock
        try:
            self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        except SQLAlchemyError:  # the session ended (a server restart): the lock ended with it, nothing to let go
            pass
        self.connection.close()


# campaigns this process holds (see Store.claim): (store location, campaign) -> (hold, claims)
_claims: dict[tuple[str, str], tuple[Any, int]] = {}
CLAIM_PATIENCE_S = 1.0  # how long a claim waits out another process's hold before calling it a rival
_claims_lock = threading.Lock()


def make_engine(url_or_path: str | Path) -> Engine:
    """An engine for a database URL, or for a SQLite file path."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_S})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = _server_engine(url)
    return engine


def _server_engine(url: str) -> Engine:
    """An engine for a database server's URL; one whose dialect or driver is missing is a StoreError naming it
    (said as 'ModuleNotFoundError: No module named MySQLdb')."""
    from sqlalchemy.exc import NoSuchModuleError

    try:
        return create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        missing = f"the module {exc.name} it needs is not installed" if isinstance(exc, ModuleNotFoundError) \
            else "SQLAlchemy knows no such database"
        raise StoreError(f"cannot open the store {displayed(url)}: {missing} (a store is an SQLite file or a "
                         "postgresql+psycopg:// URL)") from None


def displayed(url_or_path: str | Path) -> str:
    """A store's location as messages and pages show it: a database URL without its password (the dashboard
    serves its state beyond loopback, and errors go to logs)."""
    location = str(url_or_path)
    if "://" not in location:
        return location
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(location).render_as_string(hide_password=True)
    except ArgumentError:
        return location.split("://", 1)[0] + "://..."


def _sqlite_file(url_or_path: str | Path) -> str | None:
    """The file behind a SQLite path or ``sqlite:///`` URL; None for another database or an in-memory one."""
    url = str(url_or_path)
    if "://" not in url:
        return url
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url[len("sqlite:///"):]
    return None


def _missing(path: str | None) -> list[Path]:
    """The folders above ``path`` that are not there yet (outermost first), then ``path`` itself; [] where
    ``path`` is there already or is no file (another database, an in-memory one)."""
    if not path or path == ":memory:" or Path(path).exists():
        return []
    made = [Path(path)]
    while not made[0].parent.exists():
        made.insert(0, made[0].parent)
    return made


def _unwritable(display: str, reason: str) -> str:
    """The one line for a command that writes to its store (suggest, run, daemon, tell, import) on one it cannot
    write: what is needed, and that the commands that only look still read it there."""
    return (f"cannot write the store {display}: {reason}; this command needs a store it can write, in a folder it "
            "can write (copy it to one with 'closedloop backup STORE COPY' and give --store COPY); show, status, "
            "export and report read it where it is")


def _not_writable(path: str | Path | None) -> str | None:
    """Why a store at ``path`` (a SQLite file, or the outermost folder above it still to be made) cannot be written,
    if so: asked before opening, since SQLite opens a read-only file for reading and fails on the first write, after
    leaving a -wal and a -shm beside it."""
    if not path or path == ":memory:":
        return None
    path = Path(path)
    for there, which in ((path, "it"), (path.parent, f"its folder {path.parent}")):
        if there.exists() and not os.access(there, os.W_OK):
            if os.statvfs(there).f_flag & os.ST_RDONLY:
                return f"{which} is on a read-only file system"
            return f"{which} is not writable by this user"
    return None


def _damaged(error: BaseException | None) -> bool:
    """Whether a database error says the SQLite file is not a database or not a whole one."""
    import sqlite3

    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF in (
        sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class _StaysInPlace:
    """Checks, as each transaction of a SQLite store begins, that its file is still where it was opened.

    A process writes on into a file deleted or moved under it (it holds the file open), so a daemon whose store
    was removed acknowledged every result and said 'results stored in s.db', and when it ended there was no s.db;
    a moved file left its -wal behind, and with it every commit not yet merged. Once the file is gone from its
    place, what the open connection still reads is copied out (once) and every transaction is refused, so nothing
    more is acknowledged: the stations keep those results for the process started again.
    """

    def __init__(self, path: Path, display: str):
        self.path, self.display = path, display
        self.identity = _file_identity(path)
        self.gone: str | None = None
        self._lock = threading.Lock()

    def check(self, connection: Connection) -> None:
        if self.gone is None and _file_identity(self.path) == self.identity:
            return
        with self._lock:
            if self.gone is None:
                self.gone = f"the store {self.display} was deleted or moved while in use: {self._rescue(connection)}"
        raise StoreError(self.gone)

    def _rescue(self, connection: Connection) -> str:
        import sqlite3
        from contextlib import closing

        # an old -wal (a moved store's) beside a new file would be read as that file's own
        free = not any(Path(f"{self.path}{suffix}").exists() for suffix in ("", "-wal", "-shm"))
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
        target = self.path if free else self.path.with_name(f"{self.path.name}.rescued-{stamp}.db")
        try:
            with closing(sqlite3.connect(target)) as copy:
                connection.connection.dbapi_connection.backup(copy)  # type: ignore[union-attr]
        except (sqlite3.Error, OSError) as exc:
            return (f"what it held could not be saved ({exc}); the results the stations still hold are sent again "
                    "to a daemon started on a store put back from a backup")
        if free:
            return f"what it held is put back at {target}: start again to go on"
        return (f"what it held is saved in {target}: move that to {self.path} (with no {self.path.name}-wal or -shm "
                "beside it) and start again")


def _sync_folder(folder: Path) -> None:
    """The folder's entries (a file made or renamed there) on the disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _reading_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # no journal_mode: setting it writes the file header (it had turned another program's database into WAL)
    for pragma in ("query_only=ON", "busy_timeout=10000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def connect_reading(path: str) -> sqlite3.Connection:
    """A connection that only reads the SQLite file ``path``, writing nothing to it.

    A WAL database needs its ``-shm`` index, which a reader creates beside it if it may (with an empty ``-wal``;
    SQLite leaves both); in a folder it cannot write, and with no ``-wal`` file (no writer has it open, nothing
    unmerged), the file is read as immutable.
    """
    import sqlite3
    from urllib.parse import quote

    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_S)
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return connection
    except sqlite3.DatabaseError as exc:
        connection.close()  # a damaged file's too: left open, it kept the -wal and -shm it had made beside it
        wal = Path(path + "-wal")
        if not isinstance(exc, sqlite3.OperationalError) or (wal.exists() and wal.stat().st_size > 0):
            raise
    return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False, timeout=BUSY_S)


def reading_engine(url_or_path: str | Path) -> Engine:
    """An engine that can only read (:func:`connect_reading`): a missing SQLite file is an error, not a new store,
    and nothing is written to the file or beside it (a results folder may be read-only, an archive or a
    colleague's)."""
    from sqlalchemy.pool import NullPool

    path = _sqlite_file(url_or_path)
    if path is None:
        return _server_engine(str(url_or_path))
    if not Path(path).is_file():
        raise StoreError(f"no store {url_or_path}")
    file = path

    def connect() -> sqlite3.Connection:
        return connect_reading(file)

    engine = create_engine("sqlite://", creator=connect, poolclass=NullPool)
    event.listen(engine, "connect", _reading_pragmas)
    return engine


def lock_campaign(connection: Connection, campaign_id: int) -> None:
    """Hold the campaign's row until the transaction ends, so trial numbers are allocated one writer at a time.

    Several daemons (or a daemon and the CLI) may add trials to one store: PostgreSQL locks the row
    (``SELECT ... FOR UPDATE``); SQLite takes its database write lock before the highest number is read, by
    ``BEGIN IMMEDIATE`` (or, in a transaction that has already written, a no-op update of the campaign's row).
    The unique ``(campaign_id, index)`` constraint remains the last guard.
    """
    if connection.dialect.name != "sqlite":
        connection.execute(_LOCK_CAMPAIGN, {"campaign": campaign_id})
        return
    raw = connection.connection.dbapi_connection
    if raw is not None and not raw.in_transaction:
        # the lock without a write: the no-op update put the campaign's row in every trial's commit (bench loop:
        # 0.4 ms less per experiment)
        raw.execute("BEGIN IMMEDIATE")
        return
    connection.execute(_TOUCH_CAMPAIGN, {"campaign": campaign_id})


_campaign_table = CampaignRow.__table__  # type: ignore[attr-defined]
_trial_table = TrialRow.__table__  # type: ignore[attr-defined]
_TOUCH_CAMPAIGN = (_campaign_table.update().where(_campaign_table.c.id == bindparam("campaign"))
                   .values(id=_campaign_table.c.id))
_LOCK_CAMPAIGN = select(_campaign_table.c.id).where(_campaign_table.c.id == bindparam("campaign")).with_for_update()
_LAST_INDEX = select(func.max(_trial_table.c.index)).where(_trial_table.c.campaign_id == bindparam("campaign"))
_INSERT_TRIAL = _trial_table.insert()
FINISHED_STATUSES = (TrialStatus.completed.value, TrialStatus.failed.value, TrialStatus.abandoned.value)
_FINISHED_COUNT = (select(func.count()).select_from(_trial_table)
                   .where(_trial_table.c.campaign_id == bindparam("campaign"), _trial_table.c.status.in_(FINISHED_STATUSES)))
_LAST_ID = select(func.max(_trial_table.c.id)).where(_trial_table.c.campaign_id == bindparam("campaign"))
_observation_table = ObservationRow.__table__  # type: ignore[attr-defined]
# each trial with its observation's run, if it has one (observation.trial_id is unique: one row per trial)
_TRIALS_BY_ID = (select(_trial_table.c.id, _trial_table.c.status, _trial_table.c.run_uids,
                        _observation_table.c.run_uid.label("observed_run"))
                 .outerjoin(_observation_table, _observation_table.c.trial_id == _trial_table.c.id)
                 .where(_trial_table.c.id.in_(bindparam("ids", expanding=True))))
_TRIALS_BY_RUN = (select(_observation_table.c.run_uid, _observation_table.c.trial_id)
                  .where(_observation_table.c.run_uid.in_(bindparam("uids", expanding=True))))
_INSERT_OBSERVATION = _observation_table.insert()
_COMPLETE_TRIAL = (_trial_table.update().where(_trial_table.c.id == bindparam("done_id"))
                   .values(status=TrialStatus.completed.value, finished_at=bindparam("finished"), error=None,
                           run_uids=bindparam("uids")))


def _start_uid(jsonl: str) -> str | None:
    """The uid of the run whose start document opens these JSON lines, or None."""
    try:
        first = json.loads(jsonl.split("\n", 1)[0])
        return str(first["doc"]["uid"]) if first.get("name") == "start" else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # nesting beyond the parser's depth
        return None


class Store:
    """Campaigns, their trials and the observations that completed them."""

    def __init__(self, url_or_path: str | Path, *, read_only: bool = False):
        """Open a store, creating it (or bringing its schema up to date) unless ``read_only``.

        A read-only store is one that exists and holds closedloop's tables; nothing is written to it, so the
        commands that only look (status, show, export, report, explain, the dashboard) cannot change a file,
        create one from a mistyped path, or put closedloop's tables into another program's database.
        """
        from sqlalchemy.exc import DatabaseError

        from closedloop.migrations import NewerSchema

        self.location = str(url_or_path)
        self.display = displayed(self.location)
        self.read_only = read_only
        self._lock = threading.RLock()  # one writer at a time within this process
        # what opening makes of a SQLite file not there yet (the file, the folders above it), for discard_if_unused
        self._made: list[Path] = [] if read_only else _missing(_sqlite_file(self.location))
        # what was beside it before, so that a damaged file is refused without leaving a -wal, -shm or lock file
        self._beside_before = {Path(f"{file}{suffix}"): Path(f"{file}{suffix}").exists()
                               for file in [_sqlite_file(self.location)] if file and file != ":memory:"
                               for suffix in ("-wal", "-shm", ".migrate.lock")}
        try:
            if read_only:
                self.engine = reading_engine(url_or_path)
                self._check_readable()
            else:
                if why := _not_writable(self._made[0] if self._made else _sqlite_file(self.location)):
                    raise StoreError(_unwritable(self.display, why))
                self._refuse_another_programs()
                self.engine = make_engine(url_or_path)
                # issue 8: alembic migrations (closedloop/migrations) bring any store, SQLite or PostgreSQL, to
                # this schema
                from closedloop.migrations import migrate

                migrate(self.engine)
                if (file := _sqlite_file(self.location)) and file != ":memory:":
                    event.listen(self.engine, "begin", _StaysInPlace(Path(file).resolve(), self.display).check)
        except NewerSchema as exc:
            raise StoreError(f"{self.display} {exc}") from None
        except OSError as exc:
            # a read-only mount or a folder this user may not write: the migration lock, the folders or the file
            # cannot be made (Errno 30 or 13, naming the lock file, told the operator nothing of what to do)
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise StoreError(_unwritable(self.display, f"{exc.strerror}: {exc.filename}")) from None
        except DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            # one line: a server's refusal comes over several (psycopg: "...refused\n\tIs the server running ...")
            reason = " ".join(str(exc.orig or exc).split())
            reason = LOCKED if reason == "database is locked" else reason
            if not _damaged(exc.orig):
                raise StoreError(f"cannot open the store {self.display}: {reason}") from None
            self._discard_beside()
            raise NotAStore(f"cannot open the store {self.display}: {reason}") from None

    def _refuse_another_programs(self) -> None:
        """Refuse, writing nothing, a SQLite file that holds tables and none of a store's: another program's database
        (`--store inventory.db`), into which `run` and `daemon` had written their tables, WAL mode and documents."""
        file = _sqlite_file(self.location)
        if not file or file == ":memory:" or not Path(file).is_file() or not Path(file).stat().st_size:
            return
        from sqlalchemy import inspect

        reader = reading_engine(self.location)
        try:
            with reader.connect() as connection:
                tables = set(inspect(connection).get_table_names())
        finally:
            reader.dispose()
        if tables and not tables & {"campaign", "alembic_version"}:
            raise NotAStore(f"{self.display} is not a closedloop store (it has no campaign table): another program's "
                            "database is not written to; name a new file")

    def _check_readable(self) -> None:
        """Refuse, writing nothing, a database that is not a closedloop store; upgrade an older store's schema
        where it can be written (as any command opening it would), else say what to do."""
        from sqlalchemy import inspect

        from closedloop.migrations import NewerSchema, current_revision, head_revision, known_revision, migrate

        with self.engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            revision = current_revision(connection) if "alembic_version" in tables else None
        if "campaign" not in tables:
            raise NotAStore(f"{self.display} is not a closedloop store (it has no campaign table)")
        if revision == head_revision():
            return
        if revision is not None and not known_revision(revision):
            raise StoreError(f"{self.display} {NewerSchema(revision)}")
        writer = make_engine(self.location)
        try:
            migrate(writer)
        except Exception as exc:  # noqa: BLE001 - a folder or file it may not write, a lock: the reader is told the same
            raise StoreError(f"{self.display} was written by an older closedloop (schema {revision or 'before 0001'}, "
                             f"this one reads {head_revision()}) and cannot be upgraded here ({exc}); open it once "
                             "with closedloop where it can be written") from None
        finally:
            writer.dispose()

    def close(self) -> None:
        self.engine.dispose()

    def _discard_beside(self) -> None:
        """Remove what opening a damaged SQLite file made beside it (its -wal and -shm, the migration lock): a
        refused store is left as it was found."""
        file = _sqlite_file(self.location)
        if not file:
            return
        if hasattr(self, "engine"):  # none yet where the check for another program's database found the damage
            self.close()
        for path, there in self._beside_before.items():
            if not there:
                path.unlink(missing_ok=True)

    def discard_if_unused(self) -> None:
        """Remove the SQLite store this object made, if it holds no campaign, with the files opening it made
        beside it (its lock file, its folders): a command that refused its request (an import whose every row
        was bad) writes nothing, and had left an empty store and ``STORE.migrate.lock`` where there was none."""
        if not self._made or self.campaigns():  # a store that was there, or one written since
            return
        self.close()
        database = str(self._made[-1])
        for suffix in ("", "-wal", "-shm", "-journal", ".migrate.lock"):
            Path(database + suffix).unlink(missing_ok=True)
        for folder in reversed(self._made[:-1]):
            try:
                folder.rmdir()
            except OSError:  # not empty: something else was put there meanwhile
                break
        self._made = []

    # -- who runs a campaign ---------------------------------------------------------------

    def claim(self, campaign: str) -> None:
        """Hold ``campaign`` for this process until :meth:`release`: raises StoreError if another process
        on this store holds it. Two daemons on one campaign both dispatched its budget (19 + 23 experiments
        of 12, points run twice). The hold is the operating system's (a file lock beside a SQLite file, an
        advisory lock on PostgreSQL), so a process that dies lets go at once."""
        key = (self.location, campaign)
        with _claims_lock:
            if key in _claims:
                handle, count = _claims[key]
                _claims[key] = (handle, count + 1)
                return
            handle = self._take(campaign)
            # a look from `closedloop status` or the dashboard (which polls) holds it for a moment: only a hold that
            # lasts is another process running the campaign, and a daemon restarting must not take one for it
            patience = time.monotonic() + CLAIM_PATIENCE_S
            while handle is False and time.monotonic() < patience:
                time.sleep(0.05)
                handle = self._take(campaign)
            if handle is False:
                raise StoreError(f"campaign {campaign!r} is being run by another process on {self.display}; "
                                 "stop it first, or watch it with 'closedloop status'")
            _claims[key] = (handle, 1)

    def release(self, campaign: str) -> None:
        """Let go of a campaign held by :meth:`claim` (once per claim)."""
        key = (self.location, campaign)
        with _claims_lock:
            if key not in _claims:
                return
            handle, count = _claims.pop(key)
            if count > 1:
                _claims[key] = (handle, count - 1)
            elif handle is not None:
                handle.close()

    def keep_claims(self, campaigns: Iterable[str]) -> None:
        """Make sure this process still holds ``campaigns`` (claimed with :meth:`claim`), taking a hold again that
        the database lost; raises StoreError when another process took it meanwhile. A PostgreSQL restart ends the
        session holding each advisory lock: the daemon ran on, and a second daemon started on the same campaign was
        let in ('resuming ...') and would dispatch its budget again. A server not back yet is asked again next time."""
        from sqlalchemy.exc import DBAPIError

        if self.engine.dialect.name != "postgresql":
            return  # a SQLite file's lock is the operating system's, held as long as this process lives
        with _claims_lock:
            for campaign in campaigns:
                key = (self.location, campaign)
                if key not in _claims or _claims[key][0].alive():
                    continue
                hold, count = _claims[key]
                try:
                    retaken = self._take(campaign)
                except DBAPIError:
                    continue  # the server is not back yet: nobody else can take the lock either
                if retaken is False:
                    del _claims[key]
                    hold.close()
                    raise StoreError(f"lost the hold on campaign {campaign!r} (the database server of {self.display} "
                                     "restarted or dropped the connection) and another process runs it now; this one "
                                     "stops so that no experiment is run twice")
                hold.close()
                _claims[key] = (retaken, count)

    def held(self, campaign: str) -> bool | None:
        """Whether a process (this one included) runs ``campaign`` now; None where this store cannot tell."""
        with _claims_lock:
            if (self.location, campaign) in _claims:
                return True
            handle = self._take(campaign, create=False)
        if handle is None or handle is False:
            return None if handle is None else True
        handle.close()
        return False

    @contextmanager
    def serialized(self, campaign: str, purpose: str, timeout_s: float = 300.0) -> Iterator[None]:
        """Hold ``campaign`` for ``purpose`` (one ``suggest`` at a time) across processes, waiting for another
        holder up to ``timeout_s``. Unlike :meth:`claim` it does not keep a daemon out. Two people's ``suggest``
        at once both passed the budget check and were given the same points. The hold is the operating
        system's (a file lock beside a SQLite file, an advisory lock on PostgreSQL); no hold where there is none."""
        deadline = time.monotonic() + timeout_s
        # the same hold as a daemon's claim (:meth:`_take`), under a name no campaign has
        while (hold := self._take(f"{purpose}\0{campaign}")) is False:
            if time.monotonic() > deadline:
                raise StoreError(f"another {purpose} of {campaign!r} has held it for {timeout_s:g} s")
            time.sleep(0.05)
        try:
            yield
        finally:
            if hold is not None:
                hold.close()

    def _take(self, campaign: str, create: bool = True) -> Any:
        """The operating system's hold on ``campaign`` (an object with ``close``), None where this kind of
        store has none, False where another process holds it. Without ``create`` nothing is written (a
        status read from another terminal): a campaign no process ever held there is free."""
        digest = hashlib.sha256(campaign.encode()).digest()
        if self.engine.dialect.name == "postgresql":
            connection = self.engine.connect()
            key = int.from_bytes(digest[:8], "big", signed=True)
            if connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                return _AdvisoryHold(connection, key)
            connection.close()
            return False
        # the file as given, not the engine's URL: a read-only engine connects through a URI of its own
        database = _sqlite_file(self.location)
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no hold
            return None
        path = Path(database + ".claims") / digest.hex()[:24]
        if not create and not path.exists():
            return _Unheld()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+" if create else "r")  # noqa: SIM115 - held open until release
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        if not create:
            return handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"{campaign}\npid {os.getpid()}\n")
        handle.flush()
        return handle

    # -- Bluesky documents ------------------------------------------------------------------

    @property
    def documents_dir(self) -> Path:
        """Where each run's Bluesky documents are kept: beside a SQLite file, else ``results/documents``."""
        url = self.location
        if "://" not in url:
            return Path(url + ".documents")
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return Path(url[len("sqlite:///"):] + ".documents")
        return Path("results") / "documents"

    def save_documents(self, run_uid: str, jsonl: str) -> Path:
        """Keep a run's documents (JSON lines, as the RunEngine emitted them) under its run uid.

        Written once: a later copy (a resent or forged message) never replaces a run's record, and
        documents whose start document opens another run are refused.
        """
        if not _RUN_UID.fullmatch(run_uid):
            raise StoreError(f"run uid {run_uid[:80]!r} is not a valid file name")
        if _start_uid(jsonl) != run_uid:
            raise StoreError(f"the documents do not open run {run_uid}")
        folder = self.documents_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_uid}.jsonl"
        if path.exists():
            return path
        partial = path.with_suffix(".partial")
        try:
            with partial.open("w") as out:
                out.write(jsonl)
                out.flush()
                # on the disk before the result is stored and acknowledged (the station then deletes its copy):
                # after a power cut an unsynced file renamed into place can be there empty, and, being there,
                # is never written again
                os.fsync(out.fileno())
            partial.replace(path)  # a crash never leaves half a record under the final name
            _sync_folder(folder)  # the rename itself, likewise
        except OSError:
            partial.unlink(missing_ok=True)  # a full disk: the record is written again, whole, from the station
            raise
        return path

    def documents(self, run_uid: str) -> str | None:
        """The documents of a run as JSON lines, or None when none were kept."""
        if not _RUN_UID.fullmatch(run_uid):
            return None
        path = self.documents_dir / f"{run_uid}.jsonl"
        return path.read_text() if path.exists() else None

    # -- campaigns ------------------------------------------------------------------------

    def open_campaign(self, campaign: Campaign) -> int:
        """The id of ``campaign`` in this store, creating it on first use.

        Raises StoreError if a campaign of the same name was run with a different file.
        """
        spec_yaml = campaign.to_yaml()
        with self._lock, Session(self.engine) as session:
            row = session.exec(select(CampaignRow).where(CampaignRow.name == campaign.name)).first()
            if row is None:
                row = CampaignRow(name=campaign.name, spec_yaml=spec_yaml, spec_hash=campaign.spec_hash)
                session.add(row)
                session.commit()
                session.refresh(row)
            elif row.spec_hash not in campaign.spec_hashes and (
                    (stored := Campaign.from_stored_yaml(row.spec_yaml, self.display)).spec_hash != campaign.spec_hash):
                # its results (and the record of why each experiment was chosen) were made under the stored file
                raise StoreError(
                    f"campaign {campaign.name!r} already exists in {self.display} with a different definition ("
                    + "; ".join(stored.differences(campaign)) + "). To go on under the new file (more experiments,"
                    f" say), give it a new name and seed it with these results: closedloop export {campaign.name} -f"
                    f" csv -o {campaign.name}.csv, then closedloop import NEW_FILE {campaign.name}.csv"
                )
            assert row.id is not None
            return row.id

    def campaign_row(self, name_or_id: str | int) -> CampaignRow:
        if not isinstance(name_or_id, (str, int)):
            # suggest() takes the Campaign itself, so a notebook passes it on to tell(), best(), ...; it reached
            # SQLite as a query parameter and came back as an sqlite3.ProgrammingError
            name = getattr(name_or_id, "name", None)
            raise TypeError(f"a campaign is named by its name or id, not a {type(name_or_id).__name__}"
                            + (f": pass campaign.name ({name!r})" if isinstance(name, str) else ""))
        with Session(self.engine) as session:
            if isinstance(name_or_id, int) or str(name_or_id).isdigit():
                row = session.get(CampaignRow, int(name_or_id))
            else:
                row = session.exec(select(CampaignRow).where(CampaignRow.name == name_or_id)).first()
        if row is None:
            raise StoreError(f"no campaign {name_or_id!r} in {self.display}{self._holds(str(name_or_id))}")
        return row

    def _holds(self, wanted: str) -> str:
        """What the store holds, for a name it does not: a mistyped name, or a mistyped path (which opened a new,
        empty store) read alike."""
        names = [row.name for row in self.campaigns()]
        if not names:
            return "; it holds no campaign (is the path right?)"
        close = difflib.get_close_matches(wanted, names, n=1)
        return f" (did you mean {close[0]!r}?)" if close else f"; it holds {', '.join(names)}"

    def campaign(self, name_or_id: str | int) -> Campaign:
        """The campaign as it was stored."""
        return Campaign.from_stored_yaml(self.campaign_row(name_or_id).spec_yaml, f"{self.display}:{name_or_id}")

    def campaigns(self) -> list[CampaignRow]:
        with Session(self.engine) as session:
            return list(session.exec(select(CampaignRow).order_by(CampaignRow.id)))

    def set_campaign_status(self, campaign_id: int, status: str) -> None:
        with self._lock, Session(self.engine) as session:
            row = session.get(CampaignRow, campaign_id)
            if row is None:
                raise StoreError(f"no campaign with id {campaign_id}")
            row.status = status
            row.finished_at = utcnow() if status in ("completed", "stopped") else None
            session.add(row)
            session.commit()

    # -- trials ---------------------------------------------------------------------------

    def add_trials(self, campaign_id: int, proposals: Iterable[tuple[dict[str, Any], dict[str, Any]]],
                   status: TrialStatus = TrialStatus.proposed, companion: TrialCompanion | None = None) -> list[TrialRow]:
        """Record new proposals (parameters, planner metadata) as trials numbered from 1 upwards.

        ``status`` is ``held`` for proposals that wait for a person's approval. ``companion`` writes
        rows that belong with the new trials in the same transaction.
        """
        with self._lock, Session(self.engine) as session:
            lock_campaign(session.connection(), campaign_id)
            last = session.exec(select(func.max(TrialRow.index)).where(TrialRow.campaign_id == campaign_id)).one()
            rows = []
            for offset, (parameters, metadata) in enumerate(proposals, start=1):
                row = TrialRow(campaign_id=campaign_id, index=(last or 0) + offset, parameters=parameters,
                               planner=_json_safe(metadata), status=status.value)
                session.add(row)
                rows.append(row)
            if companion is not None:
                session.flush()  # the trials' ids
                companion(session.connection(), rows)
            session.commit()
            for row in rows:
                session.refresh(row)
            return rows

    def mark_dispatched(self, trial_id: int, station: str, *, attempted: bool = True) -> TrialRow:
        """Record that a trial is being sent to ``station`` (before the message leaves). Without
        ``attempted`` it is not a new attempt: ``station`` came back still holding the one it was given."""
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            if row.status not in OPEN_STATUSES:
                raise StoreError(f"trial {trial_id} is {row.status}; it cannot be dispatched")
            row.status, row.station = TrialStatus.dispatched.value, station
            row.attempts += 1 if attempted else 0
            row.dispatched_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return row

    def requeue(self, trial_id: int, reason: str, run_uid: str | None = None, *, attempted: bool = True) -> None:
        """Put a dispatched trial back to be dispatched again (its station never started it, or its attempt
        failed: ``run_uid`` is the Bluesky run of that attempt, when it opened one). Without ``attempted``
        the dispatch does not count as an attempt: the station could not reach its instrument."""
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            if row.status == TrialStatus.dispatched.value:
                row.status, row.station, row.error = TrialStatus.proposed.value, None, reason
                if not attempted:
                    row.attempts = max(0, row.attempts - 1)
                row.run_uids = _with_run(row.run_uids, run_uid)
                session.add(row)
                session.commit()

    def record_run(self, trial_id: int, run_uid: str, values: dict[str, float] | None = None) -> bool:
        """Keep the run uid of an attempt whose failure arrived after the trial had moved on (a timed-out run
        reported once the station aborted it), or whose result did (``values``: the run of a station declared
        lost, the trial since run again or given up); False if the trial already had it."""
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            uids = _with_run(row.run_uids, run_uid)
            late = dict(row.late_results or {})
            if values is not None and run_uid not in late and run_uid not in row.run_uids:
                late[run_uid] = dict(values)
            if uids == row.run_uids and late == row.late_results:
                return False
            row.run_uids, row.late_results = uids, late
            session.add(row)
            session.commit()
            return True

    def record_result(
        self,
        trial_id: int,
        run_uid: str,
        values: dict[str, float],
        noise: dict[str, float] | None = None,
        duration_s: float | None = None,
    ) -> bool:
        """Store a result; True if it was new, False for a duplicate of a stored one.

        Raises StoreError for an unknown trial, a trial already finished by another run, or
        non-finite values.
        """
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise StoreError(f"trial {trial_id}: value {key}={value!r} is not a finite number")
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            existing = session.exec(select(ObservationRow).where(ObservationRow.trial_id == trial_id)).first()
            if existing is not None:
                if existing.run_uid == run_uid:
                    return False
                raise StoreError(f"trial {trial_id} already has a result from run {existing.run_uid}")
            if session.exec(select(ObservationRow).where(ObservationRow.run_uid == run_uid)).first() is not None:
                raise StoreError(f"run {run_uid} already stored for another trial")
            if row.status not in OPEN_STATUSES:
                raise StoreError(f"trial {trial_id} is {row.status}; result refused")
            session.add(ObservationRow(trial_id=trial_id, run_uid=run_uid, values=dict(values), noise=noise,
                                       duration_s=duration_s))
            row.status, row.finished_at, row.error = TrialStatus.completed.value, utcnow(), None
            row.run_uids = _with_run(row.run_uids, run_uid)
            session.add(row)
            session.commit()
            return True

    def record_results(
        self, items: list[tuple[int, str, dict[str, float], dict[str, float] | None, float | None]]
    ) -> list[bool | str]:
        """Store many results (trial id, run uid, values, noise, duration) in one transaction (daemon intake).

        Returns per item True (stored), False (duplicate of a stored result: same trial, same run uid)
        or the reason it was refused (unknown trial, finished by another run, run uid reused,
        non-finite value); a refused item changes nothing. Idempotency rests on the unique
        ``observation.trial_id`` and ``observation.run_uid`` indexes. SQL Core, not the ORM: this is
        the daemon's hot path.
        """
        outcomes: list[bool | str] = []
        if not items:
            return outcomes
        now = utcnow()
        with self._lock, self.engine.begin() as conn:
            ids = list({item[0] for item in items})
            known = conn.execute(_TRIALS_BY_ID, {"ids": ids}).all()
            status = {row.id: row.status for row in known}
            earlier = {row.id: row.run_uids for row in known}  # the runs of failed attempts
            by_trial = {row.id: row.observed_run for row in known if row.observed_run is not None}
            used_uids = dict(conn.execute(_TRIALS_BY_RUN, {"uids": list({item[1] for item in items})}).all())
            new_rows: list[dict[str, Any]] = []
            for trial_id, run_uid, values, noise, duration_s in items:
                bad = [k for k, v in values.items()
                       if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)]
                if bad:
                    outcomes.append(f"trial {trial_id}: value {bad[0]}={values[bad[0]]!r} is not a finite number")
                elif trial_id not in status:
                    outcomes.append(f"no trial with id {trial_id}")
                elif trial_id in by_trial:
                    same = by_trial[trial_id] == run_uid
                    outcomes.append(False if same else f"trial {trial_id} already has a result from run {by_trial[trial_id]}")
                elif run_uid in used_uids:
                    outcomes.append(f"run {run_uid} already stored for another trial")
                elif status[trial_id] not in OPEN_STATUSES:
                    outcomes.append(f"trial {trial_id} is {status[trial_id]}; result refused")
                else:
                    new_rows.append({"trial_id": trial_id, "run_uid": run_uid, "values": dict(values), "noise": noise,
                                     "duration_s": duration_s, "received_at": now})
                    by_trial[trial_id], used_uids[run_uid] = run_uid, trial_id
                    outcomes.append(True)
            if new_rows:
                conn.execute(_INSERT_OBSERVATION, new_rows)
                conn.execute(_COMPLETE_TRIAL, [{"done_id": row["trial_id"], "finished": now,
                                                "uids": _with_run(earlier[row["trial_id"]], row["run_uid"])}
                                               for row in new_rows])
        return outcomes

    def add_dispatched(self, campaign_id: int, parameters: dict[str, Any], metadata: dict[str, Any],
                       station: str, companion: TrialCompanion | None = None) -> TrialRow:
        """Record a new proposal already dispatched to ``station``, in one transaction (the daemon's hot path),
        with ``companion``'s rows for it (its provenance)."""
        now = utcnow()
        values = {"campaign_id": campaign_id, "parameters": parameters, "planner": _json_safe(metadata),
                  "status": TrialStatus.dispatched.value, "station": station, "attempts": 1, "proposed_at": now,
                  "dispatched_at": now}
        with self._lock, self.engine.begin() as conn:
            lock_campaign(conn, campaign_id)  # issue 8: one allocator at a time, even across daemons
            last = conn.execute(_LAST_INDEX, {"campaign": campaign_id}).scalar()
            values["index"] = (last or 0) + 1
            # constant statements with parameters: compiled once, not rebuilt for every experiment
            row = TrialRow(id=conn.execute(_INSERT_TRIAL, values).inserted_primary_key[0], **values)
            if companion is not None:
                companion(conn, [row])
        return row

    def record_failure(self, trial_id: int, error: str, status: TrialStatus = TrialStatus.failed,
                       run_uid: str | None = None) -> bool:
        """Mark an open trial failed (or abandoned) with its error and the Bluesky run of the failed attempt, if
        it opened one; False if it was already finished."""
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            if row.status not in OPEN_STATUSES:
                return False
            row.status, row.error, row.finished_at = status.value, error, utcnow()
            row.run_uids = _with_run(row.run_uids, run_uid)
            session.add(row)
            session.commit()
            return True

    # -- people in the loop (issue 7) ----------------------------------------------------------

    def approve_held(self, trial_id: int, by: str, parameters: dict[str, Any] | None = None) -> TrialRow:
        """A held trial goes to ``proposed`` (dispatchable), with ``parameters`` if a person edited them.

        The caller validates edited parameters against the campaign; the planner metadata keeps who
        approved and what the planner had proposed.
        """
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            if row.status != TrialStatus.held.value:
                raise StoreError(f"trial {row.index} is {row.status}, not held for approval")
            metadata = dict(row.planner, approved_by=by)
            if parameters is not None and parameters != row.parameters:
                metadata["proposed_parameters"] = row.parameters
                row.parameters = dict(parameters)
            row.planner, row.status = _json_safe(metadata), TrialStatus.proposed.value
            session.add(row)
            session.commit()
            session.refresh(row)
            return row

    def reject(self, trial_id: int, by: str) -> TrialRow:
        """A held or not yet dispatched trial becomes failed with error ``rejected by <by>``.

        Recording it as a failure is what makes the planner treat the point as known-bad.
        """
        with self._lock, Session(self.engine) as session:
            row = self._trial(session, trial_id)
            if row.status not in (TrialStatus.held.value, TrialStatus.proposed.value):
                raise StoreError(f"trial {row.index} is {row.status}; only held or proposed trials can be rejected")
            row.status, row.error, row.finished_at = TrialStatus.failed.value, f"{REJECTED_BY}{by}", utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return row

    def import_results(
        self, campaign_id: int, rows: list[tuple[dict[str, Any], dict[str, float] | None, str | None]], source: str
    ) -> list[TrialRow]:
        """Seed a campaign with finished experiments (parameters, values or None, error) in one transaction.

        All rows are written or none. Each completed row gets a synthetic run uid ``import-<uuid>``.
        """
        import uuid

        with self._lock, Session(self.engine) as session:
            lock_campaign(session.connection(), campaign_id)
            last = session.exec(select(func.max(TrialRow.index)).where(TrialRow.campaign_id == campaign_id)).one() or 0
            now = utcnow()
            trials = []
            for offset, (parameters, values, error) in enumerate(rows, start=1):
                trial = TrialRow(campaign_id=campaign_id, index=last + offset, parameters=dict(parameters),
                                 planner={"generator": "import", "source": source},
                                 status=TrialStatus.completed.value if values is not None else TrialStatus.failed.value,
                                 error=None if values is not None else (error or "failed (imported)"), finished_at=now)
                session.add(trial)
                trials.append((trial, values))
            session.flush()
            for trial, values in trials:
                if values is not None:
                    trial.run_uids = [f"import-{uuid.uuid4()}"]
                    session.add(ObservationRow(trial_id=trial.id, run_uid=trial.run_uids[0], values=dict(values)))  # type: ignore[arg-type]
            session.commit()
            for trial, _ in trials:
                session.refresh(trial)
            return [trial for trial, _ in trials]

    def trial(self, trial_id: int) -> TrialRow:
        with Session(self.engine) as session:
            return self._trial(session, trial_id)

    @staticmethod
    def _trial(session: Session, trial_id: int) -> TrialRow:
        row = session.get(TrialRow, trial_id)
        if row is None:
            raise StoreError(f"no trial with id {trial_id}")
        return row

    def trials(self, campaign_id: int, statuses: Iterable[str] | None = None) -> list[TrialRow]:
        with Session(self.engine) as session:
            query = select(TrialRow).where(TrialRow.campaign_id == campaign_id)
            if statuses is None:
                return list(session.exec(query.order_by(TrialRow.index)))
            # sorted here: ORDER BY made SQLite walk every trial of the campaign in index order, not the few of
            # these statuses (the daemon looks for the waiting ones every second)
            query = query.where(TrialRow.status.in_(list(statuses)))  # type: ignore[attr-defined]
            return sorted(session.exec(query), key=lambda row: row.index)

    def observations(self, campaign_id: int) -> dict[int, ObservationRow]:
        """Observations of a campaign keyed by trial id."""
        with Session(self.engine) as session:
            query = select(ObservationRow).join(TrialRow).where(TrialRow.campaign_id == campaign_id)
            return {o.trial_id: o for o in session.exec(query)}

    def results(self, campaign_id: int) -> list[Result]:
        """Finished trials as planner results, in experiment order (failures have no values).

        One SQL Core select of the three columns a result holds: ORM objects of every trial and observation took
        12.8 s at 50,000 trials (benchmarks/big_store.py), most of it building rows and decoding JSON never used."""
        query = (select(_trial_table.c.parameters, _observation_table.c["values"], _trial_table.c.index)
                 .select_from(_trial_table.outerjoin(_observation_table,
                                                     _observation_table.c.trial_id == _trial_table.c.id))
                 .where(_trial_table.c.campaign_id == campaign_id,
                        _trial_table.c.status.in_([TrialStatus.completed.value, TrialStatus.failed.value]))
                 .order_by(_trial_table.c.index))
        with self.engine.connect() as connection:
            return [Result(parameters, values, index) for parameters, values, index in connection.execute(query)]

    def finished_trials(self, campaign_id: int) -> list[FinishedTrial]:
        """The campaign's finished trials (completed, failed, abandoned), in trial order, with their results' values:
        what a daemon starting on the store needs of them, in one select."""
        trial = _trial_table
        query = (select(trial.c.id, trial.c.index, trial.c.status, trial.c.parameters, _observation_table.c["values"],
                        trial.c.attempts, trial.c.error, trial.c.planner["execution"], trial.c.dispatched_at,
                        trial.c.finished_at)
                 .select_from(trial.outerjoin(_observation_table, _observation_table.c.trial_id == trial.c.id))
                 .where(trial.c.campaign_id == campaign_id, trial.c.status.in_(FINISHED_STATUSES))
                 .order_by(trial.c.index))
        with self.engine.connect() as connection:
            return [FinishedTrial(*row) for row in connection.execute(query)]

    def record_columns(self, campaign_id: int) -> list[tuple[Any, ...]]:
        """Every trial of the campaign in trial order, as the columns a table or export shows: index, status,
        parameters, its result's values, station, error, its result's run uid, run uids, the planner's generator and
        execution, attempts, its result's duration, proposed, dispatched and finished at. One SQL Core select, the
        generator and execution picked out of the planner's metadata by the database: ORM objects of every trial and
        observation took 13.6 s at 50,000 trials."""
        trial, observation = _trial_table, _observation_table
        query = (select(trial.c.index, trial.c.status, trial.c.parameters, observation.c["values"], trial.c.station,
                        trial.c.error, observation.c.run_uid, trial.c.run_uids, trial.c.planner["generator"],
                        trial.c.planner["execution"], trial.c.attempts, observation.c.duration_s, trial.c.proposed_at,
                        trial.c.dispatched_at, trial.c.finished_at)
                 .select_from(trial.outerjoin(observation, observation.c.trial_id == trial.c.id))
                 .where(trial.c.campaign_id == campaign_id).order_by(trial.c.index))
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def finished_count(self, campaign_id: int) -> int:
        """How many of the campaign's trials are finished (completed, failed or abandoned): one count over the
        (campaign, status) index, which a daemon asks every second to notice results told by hand."""
        with self.engine.connect() as connection:
            return connection.execute(_FINISHED_COUNT, {"campaign": campaign_id}).scalar_one()

    def trials_after(self, campaign_id: int, after_id: int, also: Iterable[int] = ()) -> list[TrialRow]:
        """The campaign's trials of id above ``after_id``, and those of ids ``also``: what a reader that has seen
        every trial up to ``after_id`` needs to read again, not the whole campaign."""
        also = [i for i in also if i <= after_id]
        with Session(self.engine) as session:
            query = select(TrialRow).where(TrialRow.campaign_id == campaign_id, TrialRow.id > after_id)  # type: ignore[operator]
            rows = list(session.exec(query))
            if also:
                rows += session.exec(select(TrialRow).where(TrialRow.id.in_(also)))  # type: ignore[union-attr]
        return sorted(rows, key=lambda row: row.index)

    def observations_of(self, trial_ids: Iterable[int]) -> dict[int, ObservationRow]:
        """The observations of these trials, keyed by trial id."""
        ids = list(trial_ids)
        if not ids:
            return {}
        with Session(self.engine) as session:
            query = select(ObservationRow).where(ObservationRow.trial_id.in_(ids))  # type: ignore[attr-defined]
            return {o.trial_id: o for o in session.exec(query)}

    def hand_trial_ids(self, campaign_id: int, up_to: int) -> set[int]:
        """The ids, up to ``up_to``, of the campaign's trials proposed for hand execution (`closedloop suggest`)."""
        query = select(_trial_table.c.id).where(
            _trial_table.c.campaign_id == campaign_id, _trial_table.c.id <= up_to,
            _trial_table.c.planner["execution"].as_string() == "manual")
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())

    def last_trial_id(self, campaign_id: int) -> int:
        """The highest trial id of the campaign (0 for none)."""
        with self.engine.connect() as connection:
            return connection.execute(_LAST_ID, {"campaign": campaign_id}).scalar() or 0

    def counts(self, campaign_id: int) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.exec(
                select(TrialRow.status, func.count()).where(TrialRow.campaign_id == campaign_id).group_by(TrialRow.status)
            ).all()
        return {status: count for status, count in rows}


def _json_safe(value: Any) -> Any:
    """Metadata with non-finite floats and non-JSON objects made storable."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# -- issue 9: the provenance table is on this metadata, so every store has it; it follows approvals
from closedloop import provenance as _provenance  # noqa: E402,F401  (imports this module's tables)
