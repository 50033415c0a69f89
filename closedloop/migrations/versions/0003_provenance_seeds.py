"""Provenance seeds as 64-bit integers: a derived seed is any unsigned 32-bit number (issue 9).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("provenance", schema=None) as batch_op:
        for column in ("seed", "acquisition_seed"):
            batch_op.alter_column(column, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("provenance", schema=None) as batch_op:
        for column in ("seed", "acquisition_seed"):
            batch_op.alter_column(column, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True)
