"""Evaluation jobs (jobs.kind) and evaluation results.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(20), nullable=False, server_default="train"))
    op.create_table(
        "evaluation_models",
        sa.Column("evaluation_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_id", sa.String(40), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
    )
    op.create_index("ix_evaluation_models_model_id", "evaluation_models", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_evaluation_models_model_id", table_name="evaluation_models")
    op.drop_table("evaluation_models")
    # Plain ALTER TABLE DROP COLUMN (SQLite >= 3.35): a batch copy of `jobs` would cascade-delete job_events.
    op.drop_column("jobs", "kind")
