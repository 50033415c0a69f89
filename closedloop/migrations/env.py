"""alembic environment: migrations run on the connection closedloop hands over (see __init__.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import closedloop.store  # noqa: F401  (registers every table on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: object) -> None:
    # batch mode: SQLite alters a table by copying it ("move and copy"); a no-op elsewhere
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set sqlalchemy.url, or call closedloop.migrations.migrate(engine)")
    with create_engine(url).begin() as conn:
        _run(conn)
