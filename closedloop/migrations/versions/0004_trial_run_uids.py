"""The Bluesky run uid of every attempt of a trial, failed ones included (issue 9).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN, which SQLite does in place: a batch copy would drop the table that observation and
    # provenance rows refer to
    op.add_column("trial", sa.Column("run_uids", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
    # until now only a completed attempt's run was kept (the observation's): it is every trial's only known run
    trial = sa.table("trial", sa.column("id", sa.Integer()), sa.column("run_uids", sa.JSON()))
    observation = sa.table("observation", sa.column("trial_id", sa.Integer()), sa.column("run_uid", sa.String()))
    bind = op.get_bind()
    runs = bind.execute(sa.select(observation.c.trial_id, observation.c.run_uid)).all()
    if runs:
        bind.execute(trial.update().where(trial.c.id == sa.bindparam("done_id")).values(run_uids=sa.bindparam("uids")),
                     [{"done_id": trial_id, "uids": [run_uid]} for trial_id, run_uid in runs])


def downgrade() -> None:
    op.drop_column("trial", "run_uids")
