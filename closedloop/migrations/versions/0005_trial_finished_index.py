"""An index of each campaign's trials by the time they finished: each dispatch's provenance looks up the trials
pending at its decision (open, or finished since), which scanned every trial of the campaign.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_trial_campaign_finished", "trial", ["campaign_id", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_trial_campaign_finished", table_name="trial")
