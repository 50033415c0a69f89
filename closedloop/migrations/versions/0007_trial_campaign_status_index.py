"""An index of each campaign's trials by status: the count of trials per status (status, list, every dashboard poll,
and a daemon once a second to notice results told by hand) and the look for trials waiting to be dispatched read
every trial of the campaign without it, and now read the index alone.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_trial_campaign_status", "trial", ["campaign_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_trial_campaign_status", table_name="trial")
