"""explanations: every explanation given on request (`:explain`), append-only, apart from the decisions

Revision ID: 0004_explanations
Revises: 0003_integrity
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_explanations"
down_revision = "0003_integrity"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "explanations",
        sa.Column("explanation_id", sa.String(64), nullable=False),
        sa.Column("transaction_id", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("customer_id", sa.String(64), nullable=False),
        sa.Column("terminal_id", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("bias", sa.Float(), nullable=False),
        sa.Column("contributions", _JSON, nullable=False),
        sa.Column("features_missing", sa.Boolean(), nullable=False),
        sa.Column("features_stale", sa.Boolean(), nullable=False),
        sa.Column("fail_open", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id", name="pk_explanations"),
    )
    op.create_index("ix_explanations_transaction_id", "explanations", ["transaction_id"])
    op.create_index("ix_explanations_received_at", "explanations", ["received_at"])
    if op.get_bind().dialect.name == "postgresql":  # the function was created by 0003_integrity
        op.execute(
            "CREATE TRIGGER explanations_append_only BEFORE UPDATE OR DELETE ON explanations "
            "FOR EACH ROW EXECUTE FUNCTION fraud_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER explanations_no_truncate BEFORE TRUNCATE ON explanations "
            "FOR EACH STATEMENT EXECUTE FUNCTION fraud_audit_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER explanations_no_{verb.lower()} BEFORE {verb} ON explanations "
                f"BEGIN SELECT RAISE(ABORT, 'the explanations table is append-only ({verb} refused)'); END"
            )


def downgrade() -> None:
    op.drop_table("explanations")
