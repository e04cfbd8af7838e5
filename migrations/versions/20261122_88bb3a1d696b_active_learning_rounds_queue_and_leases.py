"""active learning rounds queue and leases

Adds the active-learning tables of cellspot.store.models: ``al_rounds`` (one row per round
of a project: number, status open/closed/rolled_back, strategy, params, the detector and
classifier runs whose predictions were scored), ``al_queue`` (the round's ranked images
with score, score components and reason) and ``image_leases`` (an image handed to a
student until it is submitted or the lease expires; unique per image and student, and per
image and slot so concurrent requests collide in the database). Only new tables, so no
existing table is altered; index operations go through batch mode as ``render_as_batch``
renders them for SQLite. Downgrade drops the indexes and tables, children first.

Revision ID: 88bb3a1d696b
Revises: b7e3c9a41f20
Create Date: 2026-11-22 05:22:38.271731

"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '88bb3a1d696b'
down_revision: str | None = 'b7e3c9a41f20'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('al_rounds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('strategy', sa.String(length=100), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('detector_run_id', sa.Integer(), nullable=True),
    sa.Column('classifier_run_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('open', 'closed', 'rolled_back')", name=op.f('ck_al_rounds_status')),
    sa.ForeignKeyConstraint(['classifier_run_id'], ['model_runs.id'], name=op.f('fk_al_rounds_classifier_run_id_model_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['detector_run_id'], ['model_runs.id'], name=op.f('fk_al_rounds_detector_run_id_model_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_al_rounds_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_al_rounds')),
    sa.UniqueConstraint('project_id', 'number', name='uq_al_rounds_project_number')
    )
    with op.batch_alter_table('al_rounds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_al_rounds_project_id'), ['project_id'], unique=False)

    op.create_table('al_queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('components', sa.JSON(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_al_queue_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['round_id'], ['al_rounds.id'], name=op.f('fk_al_queue_round_id_al_rounds'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_al_queue')),
    sa.UniqueConstraint('round_id', 'image_id', name='uq_al_queue_round_image'),
    sa.UniqueConstraint('round_id', 'rank', name='uq_al_queue_round_rank')
    )
    with op.batch_alter_table('al_queue', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_al_queue_image_id'), ['image_id'], unique=False)

    op.create_table('image_leases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=True),
    sa.Column('slot', sa.Integer(), nullable=False),
    sa.Column('leased_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('slot >= 0', name=op.f('ck_image_leases_slot_nonnegative')),
    sa.ForeignKeyConstraint(['annotator_id'], ['annotators.id'], name=op.f('fk_image_leases_annotator_id_annotators'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_image_leases_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['round_id'], ['al_rounds.id'], name=op.f('fk_image_leases_round_id_al_rounds'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_image_leases')),
    sa.UniqueConstraint('image_id', 'annotator_id', name='uq_image_leases_image_annotator'),
    sa.UniqueConstraint('image_id', 'slot', name='uq_image_leases_image_slot')
    )
    with op.batch_alter_table('image_leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_image_leases_annotator_id'), ['annotator_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_image_leases_round_id'), ['round_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('image_leases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_image_leases_round_id'))
        batch_op.drop_index(batch_op.f('ix_image_leases_annotator_id'))

    op.drop_table('image_leases')
    with op.batch_alter_table('al_queue', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_al_queue_image_id'))

    op.drop_table('al_queue')
    with op.batch_alter_table('al_rounds', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_al_rounds_project_id'))

    op.drop_table('al_rounds')
