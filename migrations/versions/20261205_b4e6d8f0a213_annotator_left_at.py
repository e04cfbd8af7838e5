"""annotators.left_at: when a student last pressed Leave

Adds ``annotators.left_at`` (nullable timestamp, empty for every existing annotator). A new
nickname that joined within the lease time counts as someone labelling under it right now,
so a second student typing it is asked "is that you?"; after that student pressed Leave, the
nickname is free again. Joining again clears it. A plain ALTER TABLE (see a9c3e5d7f102).
Downgrade drops the column.

Revision ID: b4e6d8f0a213
Revises: a9c3e5d7f102
Create Date: 2026-12-05 17:00:00.000000

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b4e6d8f0a213'
down_revision: str | None = 'a9c3e5d7f102'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('annotators', sa.Column('left_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('annotators', 'left_at')
