"""Learning-center progress per user.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "learn_users",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
        sa.Column("imported_from", sa.Text),
    )
    op.create_table(
        "learn_topic_reads",
        sa.Column("user_id", sa.String(64), sa.ForeignKey("learn_users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("topic_id", sa.String(64), primary_key=True),
        sa.Column("read_at", sa.Float, nullable=False),
    )
    op.create_table(
        "learn_quiz_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(64), sa.ForeignKey("learn_users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("topic_id", sa.String(64), nullable=False),
        sa.Column("lang", sa.String(5), nullable=False),
        sa.Column("score", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("answers", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_learn_quiz_attempts_user_topic", "learn_quiz_attempts", ["user_id", "topic_id"])
    op.create_table(
        "learn_steps",
        sa.Column("user_id", sa.String(64), sa.ForeignKey("learn_users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("topic_id", sa.String(64), primary_key=True),
        sa.Column("step_id", sa.String(64), primary_key=True),
        sa.Column("done_at", sa.Float),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("learn_steps", "learn_quiz_attempts", "learn_topic_reads", "learn_users"):
        op.drop_table(table)
