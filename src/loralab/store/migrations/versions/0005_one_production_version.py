"""One production version and one deployed version per model name, enforced by partial unique indexes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# A version is "newer" when updated later (ties: the larger id); older duplicates are demoted before indexing.
_OLDER = ("EXISTS (SELECT 1 FROM models AS m2 WHERE m2.name = models.name AND m2.{col} = {val} "
          "AND (m2.updated_at > models.updated_at OR (m2.updated_at = models.updated_at AND m2.id > models.id)))")


def upgrade() -> None:
    true = "1" if op.get_bind().dialect.name == "sqlite" else "true"
    false = "0" if true == "1" else "false"
    # Rows written by a concurrent promotion before this index existed: keep the newest of each name.
    op.execute("UPDATE models SET stage = 'archived' WHERE stage = 'production' AND "
               + _OLDER.format(col="stage", val="'production'"))
    op.execute(f"UPDATE models SET deployed = {false} WHERE deployed = {true} AND "
               + _OLDER.format(col="deployed", val=true))
    op.create_index("uq_models_production_name", "models", ["name"], unique=True,
                    sqlite_where=sa.text("stage = 'production'"), postgresql_where=sa.text("stage = 'production'"))
    op.create_index("uq_models_deployed_name", "models", ["name"], unique=True,
                    sqlite_where=sa.text("deployed"), postgresql_where=sa.text("deployed"))


def downgrade() -> None:
    op.drop_index("uq_models_deployed_name", table_name="models")
    op.drop_index("uq_models_production_name", table_name="models")
