"""one open round per project

Adds the partial unique index ``uq_al_rounds_one_open`` on ``al_rounds(project_id)`` where
``status = 'open'``: two researchers (or a double click) opening a round at the same moment
left several rounds open. A store that already has several open rounds in a project keeps the
newest open and closes the others first (at the time they were created: they never served
alone). Downgrade drops the index only.

Revision ID: f1b7a2c9d4e6
Revises: e5a1f3c7b209
Create Date: 2026-12-05 12:30:00.000000

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'f1b7a2c9d4e6'
down_revision: str | None = 'e5a1f3c7b209'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = sa.text("status = 'open'")


def upgrade() -> None:
    op.execute(
        "UPDATE al_rounds SET status = 'closed', closed_at = created_at "
        "WHERE status = 'open' AND id NOT IN "
        "(SELECT MAX(id) FROM al_rounds WHERE status = 'open' GROUP BY project_id)"
    )
    with op.batch_alter_table('al_rounds', schema=None) as batch_op:
        batch_op.create_index('uq_al_rounds_one_open', ['project_id'], unique=True,
                              sqlite_where=OPEN, postgresql_where=OPEN)


def downgrade() -> None:
    with op.batch_alter_table('al_rounds', schema=None) as batch_op:
        batch_op.drop_index('uq_al_rounds_one_open', sqlite_where=OPEN, postgresql_where=OPEN)
