"""Provenance: why each trial was proposed (issue 9).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a store written between the provenance table and the first migration already has it
    if sa.inspect(op.get_bind()).has_table("provenance"):
        return
    op.create_table(
        "provenance",
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("backend", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("backend_version", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("generator", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("acquisition_seed", sa.Integer(), nullable=True),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("batch_position", sa.Integer(), nullable=False),
        sa.Column("observed", sa.JSON(), nullable=False),
        sa.Column("failed", sa.JSON(), nullable=False),
        sa.Column("pending", sa.JSON(), nullable=False),
        sa.Column("pending_parameters", sa.JSON(), nullable=False),
        sa.Column("proposed_parameters", sa.JSON(), nullable=False),
        sa.Column("acquisition", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("acquisition_value", sa.Float(), nullable=True),
        sa.Column("acquisition_joint", sa.Float(), nullable=True),
        sa.Column("predicted", sa.JSON(), nullable=True),
        sa.Column("hyperparameters", sa.JSON(), nullable=True),
        sa.Column("hyperparameters_digest", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("hyperparameters_file", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("fit_seconds", sa.Float(), nullable=True),
        sa.Column("optimize_seconds", sa.Float(), nullable=True),
        sa.Column("suggest_seconds", sa.Float(), nullable=True),
        sa.Column("decided_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("review", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("reviewed_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"]),
        sa.ForeignKeyConstraint(["trial_id"], ["trial.id"]),
        sa.PrimaryKeyConstraint("trial_id"),
    )
    with op.batch_alter_table("provenance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_provenance_campaign_id"), ["campaign_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("provenance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provenance_campaign_id"))
    op.drop_table("provenance")
