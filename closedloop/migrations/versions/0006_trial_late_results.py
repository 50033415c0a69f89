"""The values of a result that came after its trial had finished, by run uid: acknowledged, so kept, and its run
(in ``trial.run_uids``) no longer reads as a failed attempt.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN, as 0004: a batch copy would drop the table that observation and provenance rows refer to.
    # Late results stored before it are only in the log: their runs still read as failed attempts
    op.add_column("trial", sa.Column("late_results", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    op.drop_column("trial", "late_results")
