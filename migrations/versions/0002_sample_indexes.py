"""indexes from samples to their shadow results and judgments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 22:20:00
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('shadow_results', schema=None) as batch_op:
        batch_op.create_index('ix_shadow_results_sample_id_target', ['sample_id', 'target'], unique=False)
    with op.batch_alter_table('judgments', schema=None) as batch_op:
        batch_op.create_index('ix_judgments_sample_id_evaluator', ['sample_id', 'evaluator'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('judgments', schema=None) as batch_op:
        batch_op.drop_index('ix_judgments_sample_id_evaluator')
    with op.batch_alter_table('shadow_results', schema=None) as batch_op:
        batch_op.drop_index('ix_shadow_results_sample_id_target')
