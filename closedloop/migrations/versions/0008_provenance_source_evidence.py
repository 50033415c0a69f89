"""The evidence of a multi-fidelity decision for its source: each cheaper source's posterior standard deviation at the
point and the threshold it had to pass. The planner computed them, and replay reproduced the choice, but the record
had no place for them, so `explain` could not say why an experiment went to its source.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain nullable ADD COLUMNs, as 0004 and 0006: no table copy, and a decision recorded before has none
    op.add_column("provenance", sa.Column("source_std", sa.JSON(), nullable=True))
    op.add_column("provenance", sa.Column("source_threshold", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("provenance", "source_threshold")
    op.drop_column("provenance", "source_std")
