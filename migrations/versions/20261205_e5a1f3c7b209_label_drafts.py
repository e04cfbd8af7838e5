"""label drafts

Adds ``label_drafts`` (cellspot.store.models.LabelDraft): one row per student with the marks
they have placed on the image on their screen and not submitted yet, so a reload keeps the
image and the marks. A new table only; no existing table is altered. Downgrade drops it (the
drafts are unsubmitted work in progress, nothing stored is lost).

Revision ID: e5a1f3c7b209
Revises: c4d2e8f1a937
Create Date: 2026-12-05 10:00:00.000000

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'e5a1f3c7b209'
down_revision: str | None = 'c4d2e8f1a937'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('label_drafts',
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('marks', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['annotator_id'], ['annotators.id'], name=op.f('fk_label_drafts_annotator_id_annotators'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_label_drafts_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('annotator_id', name=op.f('pk_label_drafts'))
    )
    with op.batch_alter_table('label_drafts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_label_drafts_image_id'), ['image_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('label_drafts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_label_drafts_image_id'))

    op.drop_table('label_drafts')
