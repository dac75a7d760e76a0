"""Generations, feedback and A/B tests.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("requested_model", sa.String(300), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("base_model", sa.String(300), nullable=False),
        sa.Column("adapter", sa.Text),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("prompt_hash", sa.String(64), nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("outputs", sa.JSON, nullable=False),
        sa.Column("finish_reason", sa.String(20)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("ab_test_id", sa.String(40)),
        sa.Column("arm", sa.String(1)),
        sa.Column("subject", sa.String(200)),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_generations_ab_arm", "generations", ["ab_test_id", "arm"])
    op.create_index("ix_generations_model", "generations", ["model"])
    op.create_index("ix_generations_prompt_hash", "generations", ["prompt_hash"])
    op.create_index("ix_generations_created_at", "generations", ["created_at"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("generation_id", sa.String(40)),
        sa.Column("choice", sa.Integer, nullable=False),
        sa.Column("model", sa.String(300)),
        sa.Column("input", sa.JSON),
        sa.Column("output", sa.Text),
        sa.Column("rating", sa.Integer),
        sa.Column("thumbs", sa.String(4)),
        sa.Column("corrected", sa.Text),
        sa.Column("comment", sa.Text),
        sa.Column("user", sa.String(200)),
        sa.Column("ab_test_id", sa.String(40)),
        sa.Column("arm", sa.String(1)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_feedback_generation_id", "feedback", ["generation_id"])
    op.create_index("ix_feedback_model", "feedback", ["model"])
    op.create_index("ix_feedback_ab_test_id", "feedback", ["ab_test_id"])
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
    op.create_table(
        "ab_tests",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("model_a", sa.String(300), nullable=False),
        sa.Column("model_b", sa.String(300), nullable=False),
        sa.Column("split", sa.Float, nullable=False),
        sa.Column("metric", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("winner", sa.String(1)),
        sa.Column("promoted_model", sa.String(300)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float),
    )
    op.create_index("ix_ab_tests_name", "ab_tests", ["name"])
    op.create_table(
        "ab_assignments",
        sa.Column("ab_test_id", sa.String(40), sa.ForeignKey("ab_tests.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("subject", sa.String(200), primary_key=True),
        sa.Column("arm", sa.String(1), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ab_assignments")
    op.drop_index("ix_ab_tests_name", table_name="ab_tests")
    op.drop_table("ab_tests")
    for name in ("generation_id", "model", "ab_test_id", "created_at"):
        op.drop_index(f"ix_feedback_{name}", table_name="feedback")
    op.drop_table("feedback")
    for name in ("ab_arm", "model", "prompt_hash", "created_at"):
        op.drop_index(f"ix_generations_{name}", table_name="generations")
    op.drop_table("generations")
