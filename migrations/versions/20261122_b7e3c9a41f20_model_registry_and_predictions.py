"""model registry and predictions

Adds the model registry and stored predictions of cellspot.store.models:
``model_runs`` (one row per training run: kind, unique version, status, preset, config,
data source and snapshot, progress, curves, metrics, checkpoint path, active flag,
cancel request, times) and ``prediction_cells`` (cells predicted on an image, naming the
detector and classifier runs that produced them). Both are new tables, so no existing
table is altered; index operations go through batch mode as ``render_as_batch`` renders
them for SQLite. Downgrade drops the indexes and tables, children first.

Revision ID: b7e3c9a41f20
Revises: da94fbc41d42
Create Date: 2026-11-22 04:59:59.510669

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b7e3c9a41f20'
down_revision: str | None = 'da94fbc41d42'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_runs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=True),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('version', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('preset', sa.String(length=64), nullable=False),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('data_source', sa.JSON(), nullable=False),
        sa.Column('data_snapshot_id', sa.String(length=200), nullable=True),
        sa.Column('snapshot_id', sa.Integer(), nullable=True),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('progress', sa.JSON(), nullable=False),
        sa.Column('curves', sa.JSON(), nullable=False),
        sa.Column('path', sa.String(length=1000), nullable=True),
        sa.Column('is_active', sa.Boolean(), nullable=False),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('promoted_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('classifier', 'detector')", name=op.f('ck_model_runs_kind')),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name=op.f('ck_model_runs_status')),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_model_runs_project_id_projects'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['snapshot_id'], ['consensus_snapshots.id'], name=op.f('fk_model_runs_snapshot_id_consensus_snapshots'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_model_runs')),
        sa.UniqueConstraint('version', name=op.f('uq_model_runs_version'))
    )
    with op.batch_alter_table('model_runs', schema=None) as batch_op:
        batch_op.create_index('ix_model_runs_project_kind', ['project_id', 'kind'], unique=False)
    op.create_table('prediction_cells',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('detector_run_id', sa.Integer(), nullable=True),
        sa.Column('classifier_run_id', sa.Integer(), nullable=True),
        sa.Column('x', sa.Float(), nullable=False),
        sa.Column('y', sa.Float(), nullable=False),
        sa.Column('label', sa.String(length=16), nullable=True),
        sa.Column('p_alive', sa.Float(), nullable=True),
        sa.Column('uncertainty', sa.Float(), nullable=True),
        sa.Column('score', sa.Float(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("label IN ('alive', 'dead')", name=op.f('ck_prediction_cells_label')),
        sa.CheckConstraint('p_alive >= 0 AND p_alive <= 1', name=op.f('ck_prediction_cells_p_alive_range')),
        sa.ForeignKeyConstraint(['classifier_run_id'], ['model_runs.id'], name=op.f('fk_prediction_cells_classifier_run_id_model_runs'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['detector_run_id'], ['model_runs.id'], name=op.f('fk_prediction_cells_detector_run_id_model_runs'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_prediction_cells_image_id_images'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_prediction_cells'))
    )
    with op.batch_alter_table('prediction_cells', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prediction_cells_classifier_run_id'), ['classifier_run_id'], unique=False)
        batch_op.create_index('ix_prediction_cells_image_detector', ['image_id', 'detector_run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('prediction_cells', schema=None) as batch_op:
        batch_op.drop_index('ix_prediction_cells_image_detector')
        batch_op.drop_index(batch_op.f('ix_prediction_cells_classifier_run_id'))

    op.drop_table('prediction_cells')
    with op.batch_alter_table('model_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_model_runs_project_kind')

    op.drop_table('model_runs')
