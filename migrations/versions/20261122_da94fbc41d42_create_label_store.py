"""create label store

The whole label store of cellspot.store.models: projects, images (with retirement
state), annotators, task runs, clicks, gold cells, consensus snapshots with their
cells, and per-annotator reliability. Constraint names follow the models' naming
convention. ``images.retired_snapshot_id`` is a ``use_alter`` foreign key in the
models; ``op.create_table`` would leave such a key out, so here
``consensus_snapshots`` is created before ``images`` and the key is declared inline
(without ``use_alter``), which also works on SQLite (no ALTER ... ADD CONSTRAINT).
Downgrade drops the tables children first.

Revision ID: da94fbc41d42
Revises:
Create Date: 2026-11-22 02:21:31.838805

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'da94fbc41d42'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('projects',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('description', sa.Text(), nullable=False),
        sa.Column('settings', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_projects')),
        sa.UniqueConstraint('name', name=op.f('uq_projects_name'))
    )
    op.create_table('annotators',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('nickname', sa.String(length=200), nullable=False),
        sa.Column('class_code', sa.String(length=100), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('student', 'expert', 'researcher', 'imported')", name=op.f('ck_annotators_role')),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_annotators_project_id_projects'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_annotators')),
        sa.UniqueConstraint('project_id', 'class_code', 'nickname', name='uq_annotators_identity')
    )
    op.create_index(op.f('ix_annotators_project_id'), 'annotators', ['project_id'], unique=False)
    op.create_table('consensus_snapshots',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('method', sa.String(length=100), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('stats', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_consensus_snapshots_project_id_projects'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_consensus_snapshots'))
    )
    op.create_index(op.f('ix_consensus_snapshots_project_id'), 'consensus_snapshots', ['project_id'], unique=False)
    op.create_table('images',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=500), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('path', sa.String(length=1000), nullable=True),
        sa.Column('width', sa.Integer(), nullable=False),
        sa.Column('height', sa.Integer(), nullable=False),
        sa.Column('channels', sa.Integer(), nullable=False),
        sa.Column('bit_depth', sa.Integer(), nullable=False),
        sa.Column('has_pixels', sa.Boolean(), nullable=False),
        sa.Column('metadata', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('retired_snapshot_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'retired')", name=op.f('ck_images_status')),
        sa.CheckConstraint('width > 0 AND height > 0', name=op.f('ck_images_positive_size')),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_images_project_id_projects'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['retired_snapshot_id'], ['consensus_snapshots.id'], name=op.f('fk_images_retired_snapshot_id_consensus_snapshots'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
        sa.UniqueConstraint('project_id', 'name', name='uq_images_project_name'),
        sa.UniqueConstraint('project_id', 'sha256', name='uq_images_project_sha256')
    )
    op.create_index(op.f('ix_images_project_id'), 'images', ['project_id'], unique=False)
    op.create_table('annotator_reliability',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('snapshot_id', sa.Integer(), nullable=False),
        sa.Column('annotator_id', sa.Integer(), nullable=False),
        sa.Column('sensitivity', sa.Float(), nullable=False),
        sa.Column('precision', sa.Float(), nullable=False),
        sa.Column('accuracy_alive', sa.Float(), nullable=False),
        sa.Column('accuracy_dead', sa.Float(), nullable=False),
        sa.Column('weight', sa.Float(), nullable=False),
        sa.Column('n_runs', sa.Integer(), nullable=False),
        sa.Column('n_clicks', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['annotator_id'], ['annotators.id'], name=op.f('fk_annotator_reliability_annotator_id_annotators'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['snapshot_id'], ['consensus_snapshots.id'], name=op.f('fk_annotator_reliability_snapshot_id_consensus_snapshots'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_annotator_reliability')),
        sa.UniqueConstraint('snapshot_id', 'annotator_id', name='uq_annotator_reliability_snapshot_annotator')
    )
    op.create_index(op.f('ix_annotator_reliability_annotator_id'), 'annotator_reliability', ['annotator_id'], unique=False)
    op.create_table('consensus_cells',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('snapshot_id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('x', sa.Float(), nullable=False),
        sa.Column('y', sa.Float(), nullable=False),
        sa.Column('label', sa.String(length=16), nullable=False),
        sa.Column('p_alive', sa.Float(), nullable=False),
        sa.Column('p_cell', sa.Float(), nullable=False),
        sa.Column('confidence', sa.Float(), nullable=False),
        sa.Column('support', sa.Integer(), nullable=False),
        sa.Column('n_runs', sa.Integer(), nullable=False),
        sa.Column('from_gold', sa.Boolean(), nullable=False),
        sa.CheckConstraint("label IN ('alive', 'dead')", name=op.f('ck_consensus_cells_label')),
        sa.CheckConstraint('confidence >= 0 AND confidence <= 1', name=op.f('ck_consensus_cells_confidence_range')),
        sa.CheckConstraint('p_alive >= 0 AND p_alive <= 1', name=op.f('ck_consensus_cells_p_alive_range')),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_consensus_cells_image_id_images'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['snapshot_id'], ['consensus_snapshots.id'], name=op.f('fk_consensus_cells_snapshot_id_consensus_snapshots'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_consensus_cells'))
    )
    op.create_index(op.f('ix_consensus_cells_image_id'), 'consensus_cells', ['image_id'], unique=False)
    op.create_index('ix_consensus_cells_snapshot_image', 'consensus_cells', ['snapshot_id', 'image_id'], unique=False)
    op.create_table('gold_cells',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('x', sa.Float(), nullable=False),
        sa.Column('y', sa.Float(), nullable=False),
        sa.Column('label', sa.String(length=16), nullable=False),
        sa.Column('source', sa.String(length=500), nullable=False),
        sa.Column('annotator_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("label IN ('alive', 'dead')", name=op.f('ck_gold_cells_label')),
        sa.ForeignKeyConstraint(['annotator_id'], ['annotators.id'], name=op.f('fk_gold_cells_annotator_id_annotators'), ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_gold_cells_image_id_images'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_gold_cells'))
    )
    op.create_index(op.f('ix_gold_cells_image_id'), 'gold_cells', ['image_id'], unique=False)
    op.create_table('task_runs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('image_id', sa.Integer(), nullable=False),
        sa.Column('annotator_id', sa.Integer(), nullable=False),
        sa.Column('client_key', sa.String(length=200), nullable=False),
        sa.Column('source', sa.String(length=500), nullable=False),
        sa.Column('is_gold_check', sa.Boolean(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['annotator_id'], ['annotators.id'], name=op.f('fk_task_runs_annotator_id_annotators'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_task_runs_image_id_images'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_task_runs')),
        sa.UniqueConstraint('client_key', name=op.f('uq_task_runs_client_key'))
    )
    op.create_index(op.f('ix_task_runs_annotator_id'), 'task_runs', ['annotator_id'], unique=False)
    op.create_index('ix_task_runs_image_annotator', 'task_runs', ['image_id', 'annotator_id'], unique=False)
    op.create_index(op.f('ix_task_runs_image_id'), 'task_runs', ['image_id'], unique=False)
    op.create_table('clicks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('task_run_id', sa.Integer(), nullable=False),
        sa.Column('click_index', sa.Integer(), nullable=False),
        sa.Column('x', sa.Float(), nullable=False),
        sa.Column('y', sa.Float(), nullable=False),
        sa.Column('label', sa.String(length=16), nullable=False),
        sa.CheckConstraint("label IN ('alive', 'dead', 'not_sure')", name=op.f('ck_clicks_label')),
        sa.ForeignKeyConstraint(['task_run_id'], ['task_runs.id'], name=op.f('fk_clicks_task_run_id_task_runs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_clicks')),
        sa.UniqueConstraint('task_run_id', 'click_index', name='uq_clicks_run_index')
    )
    op.create_index(op.f('ix_clicks_task_run_id'), 'clicks', ['task_run_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_clicks_task_run_id'), table_name='clicks')
    op.drop_table('clicks')
    op.drop_index(op.f('ix_task_runs_image_id'), table_name='task_runs')
    op.drop_index('ix_task_runs_image_annotator', table_name='task_runs')
    op.drop_index(op.f('ix_task_runs_annotator_id'), table_name='task_runs')
    op.drop_table('task_runs')
    op.drop_index(op.f('ix_gold_cells_image_id'), table_name='gold_cells')
    op.drop_table('gold_cells')
    op.drop_index('ix_consensus_cells_snapshot_image', table_name='consensus_cells')
    op.drop_index(op.f('ix_consensus_cells_image_id'), table_name='consensus_cells')
    op.drop_table('consensus_cells')
    op.drop_index(op.f('ix_annotator_reliability_annotator_id'), table_name='annotator_reliability')
    op.drop_table('annotator_reliability')
    op.drop_index(op.f('ix_images_project_id'), table_name='images')
    op.drop_table('images')
    op.drop_index(op.f('ix_consensus_snapshots_project_id'), table_name='consensus_snapshots')
    op.drop_table('consensus_snapshots')
    op.drop_index(op.f('ix_annotators_project_id'), table_name='annotators')
    op.drop_table('annotators')
    op.drop_table('projects')
