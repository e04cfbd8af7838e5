"""predicted images

Adds ``predicted_images`` (cellspot.store.models.PredictedImage): one row per image a
detector + classifier pair was run on, with the number of cells it found, so an image
predicted empty is told apart from one the pair never saw (a prediction of part of a
project). A new table only; no existing table is altered and nothing is backfilled: for
pairs stored before it, the active-learning signals keep their earlier rule (images created
before the pair's newest prediction count as predicted). Index operations go through batch
mode as ``render_as_batch`` renders them for SQLite. Downgrade drops the indexes and table.

Revision ID: c4d2e8f1a937
Revises: 88bb3a1d696b
Create Date: 2026-12-05 01:31:50.781477

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c4d2e8f1a937'
down_revision: str | None = '88bb3a1d696b'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('predicted_images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('detector_run_id', sa.Integer(), nullable=True),
    sa.Column('classifier_run_id', sa.Integer(), nullable=True),
    sa.Column('n_cells', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['classifier_run_id'], ['model_runs.id'], name=op.f('fk_predicted_images_classifier_run_id_model_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['detector_run_id'], ['model_runs.id'], name=op.f('fk_predicted_images_detector_run_id_model_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_predicted_images_image_id_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predicted_images'))
    )
    with op.batch_alter_table('predicted_images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predicted_images_classifier_run_id'), ['classifier_run_id'], unique=False)
        batch_op.create_index('ix_predicted_images_image_detector', ['image_id', 'detector_run_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('predicted_images', schema=None) as batch_op:
        batch_op.drop_index('ix_predicted_images_image_detector')
        batch_op.drop_index(batch_op.f('ix_predicted_images_classifier_run_id'))

    op.drop_table('predicted_images')
