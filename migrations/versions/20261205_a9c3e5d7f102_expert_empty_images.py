"""images.expert_empty: an expert decided that an image has no cells

Adds ``images.expert_empty`` (boolean, not null, false for every existing image). An image's
expert cells replace its consensus; with no expert cells there was no way to say "an expert
looked and found no cell", so deleting an image's last expert cell gave it back to consensus
and the deleted cell came back at the next aggregate. True means: the expert set of this
image is empty and replaces its consensus. Downgrade drops the column (images so marked go
back to their consensus).

Revision ID: a9c3e5d7f102
Revises: f1b7a2c9d4e6
Create Date: 2026-12-05 16:00:00.000000

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'a9c3e5d7f102'
down_revision: str | None = 'f1b7a2c9d4e6'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# A plain ALTER TABLE, not batch mode: batch mode on SQLite copies the table to a new one and
# drops the old, and with foreign keys on that drop deleted every row that points at an image
# (task runs, clicks, expert and consensus cells). cellspot.store.migrate also switches SQLite's
# foreign keys off while migrating.


def upgrade() -> None:
    op.add_column('images', sa.Column('expert_empty', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column('images', 'expert_empty')  # SQLite >= 3.35 drops a column in place
