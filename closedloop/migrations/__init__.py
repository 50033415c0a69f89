"""Schema migrations of the experiment store (alembic), shipped in the package.

:func:`migrate` brings any store to the current schema when :class:`closedloop.store.Store` opens
it, so an upgrade of closedloop never loses a campaign:

- an empty database gets every table (``create_all``) and is stamped at the newest revision;
- a store written before migrations existed (tables, no ``alembic_version``) is stamped at the
  baseline ``0001`` (the schema of the first release) and upgraded from there;
- any other store is upgraded to ``head``;
- a store stamped with a revision this package does not ship was written by a newer closedloop: it is refused
  (:class:`NewerSchema`) and left as it is, since its tables may hold what this release would drop or misread.

Only one process migrates a database at a time: a PostgreSQL advisory lock held for the migration's
transaction, or a lock file beside a SQLite file, so daemons starting together on one shared store
never race to create the same tables.

A change to a table in :mod:`closedloop.store` (or any module whose tables share its metadata) needs
a new revision in ``closedloop/migrations/versions``; ``tests/test_migrations.py`` fails until the
migrations produce exactly the tables the models describe. To draft one::

    python -m closedloop.migrations revision "add trial.priority"   # autogenerates from the models

Example:
    >>> from sqlalchemy import create_engine
    >>> migrate(create_engine("sqlite://"))                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from closedloop.errors import StoreError

log = logging.getLogger("closedloop.migrations")

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
_PG_LOCK_KEY = 0x636C6F73  # 'clos': the advisory lock every closedloop migration takes on PostgreSQL


def alembic_config(connection: Connection | None = None) -> Any:
    """An alembic ``Config`` for the migrations in this package, bound to ``connection`` if given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def known_revision(revision: str) -> bool:
    """Whether this closedloop ships ``revision``."""
    from alembic.script import ScriptDirectory

    return revision in {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


class NewerSchema(StoreError):
    """The store is at a revision a newer closedloop wrote; the caller names the store before the message."""

    def __init__(self, revision: str):
        super().__init__(f"was written by a newer closedloop (schema {revision}; this one knows schemas up to "
                         f"{head_revision()}): upgrade closedloop here to open it; nothing was changed")
        self.revision = revision


def migrate(engine: Engine) -> str:
    """Bring the database behind ``engine`` to the newest schema; returns what was done."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        from filelock import FileLock

        with FileLock(f"{engine.url.database}.migrate.lock", timeout=120):
            return _migrate(engine)
    return _migrate(engine)


def _migrate(engine: Engine) -> str:
    from alembic import command
    from sqlmodel import SQLModel

    import closedloop.store  # noqa: F401  (its tables, and those registered with it, are on the metadata)

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # held until this transaction ends; PostgreSQL's DDL is transactional, so a second daemon
            # waits here and then finds the schema complete
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        tables = set(inspect(connection).get_table_names())
        config = alembic_config(connection)
        if "alembic_version" not in tables or current_revision(connection) is None:
            if "campaign" not in tables:
                SQLModel.metadata.create_all(connection)
                command.stamp(config, "head")
                action = f"created the schema at revision {head_revision()}"
                log.info("store: %s", action)
                return action
            # a store from before migrations: its tables are the baseline's
            command.stamp(config, BASELINE)
        before = current_revision(connection)
        if before is not None and not known_revision(before):
            # alembic's own refusal ("Can't locate revision identified by ...") says nothing of what to do
            raise NewerSchema(before)
        command.upgrade(config, "head")
        # tables that no migration knows yet (added to the models without one) still appear; the
        # migration test is what insists that they get a revision
        SQLModel.metadata.create_all(connection)
        after = current_revision(connection)
    action = "up to date" if before == after else f"upgraded from {before} to {after}"
    if before != after:
        log.info("store: %s", action)
    return action


def _main(argv: list[str]) -> int:
    """``python -m closedloop.migrations revision MESSAGE [--url URL]``: autogenerate a revision draft."""
    from alembic import command
    from sqlalchemy import create_engine

    if len(argv) < 2 or argv[0] != "revision":
        print(_main.__doc__)
        return 2
    url = argv[argv.index("--url") + 1] if "--url" in argv else "sqlite://"
    engine = create_engine(url)
    with engine.begin() as connection:
        if url == "sqlite://":  # compare the models with a database built by the migrations alone
            command.upgrade(alembic_config(connection), "head")
        command.revision(alembic_config(connection), message=argv[1], autogenerate=True)
    return 0
