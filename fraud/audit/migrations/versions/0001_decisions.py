"""decisions: the audit trail of every scoring decision

Revision ID: 0001_decisions
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001_decisions"
down_revision = None
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("transaction_id", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("features", JSON_TYPE, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason_codes", JSON_TYPE, nullable=False),
        sa.Column("features_missing", sa.Boolean(), nullable=False),
        sa.Column("features_stale", sa.Boolean(), nullable=False),
        sa.Column("fail_open", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("customer_id", sa.String(64), nullable=False),
        sa.Column("terminal_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("transaction_id", "model_version", name="pk_decisions"),
    )
    op.create_index("ix_decisions_received_at", "decisions", ["received_at"])
    op.create_index("ix_decisions_customer_id", "decisions", ["customer_id"])


def downgrade() -> None:
    op.drop_index("ix_decisions_customer_id", table_name="decisions")
    op.drop_index("ix_decisions_received_at", table_name="decisions")
    op.drop_table("decisions")
