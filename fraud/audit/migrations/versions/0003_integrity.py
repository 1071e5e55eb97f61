"""integrity: thresholds on every decision, the hash chain, checkpoints, append-only triggers

Revision ID: 0003_integrity
Revises: 0002_labels_live_quality
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fraud.audit.chain import record_pre_chain_digest

revision = "0003_integrity"
down_revision = "0002_labels_live_quality"
branch_labels = None
depends_on = None

APPEND_ONLY_TABLES = ("decisions", "audit_checkpoints")

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION fraud_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the % table is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$
"""


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("review_threshold", sa.Float(), nullable=True))
        batch.add_column(sa.Column("decline_threshold", sa.Float(), nullable=True))
        batch.add_column(sa.Column("chain_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("chain_seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("row_hash", sa.String(64), nullable=True))
    op.create_index("ux_decisions_chain", "decisions", ["chain_id", "chain_seq"], unique=True)
    op.create_table(
        "audit_checkpoints",
        sa.Column("chain_id", sa.String(64), nullable=False),
        sa.Column("chain_seq", sa.BigInteger(), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.Column("written_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("chain_id", "chain_seq", name="pk_audit_checkpoints"),
    )
    bind = op.get_bind()
    record_pre_chain_digest(bind)
    if bind.dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        for table in APPEND_ONLY_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION fraud_audit_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION fraud_audit_append_only()"
            )
    else:
        for table in APPEND_ONLY_TABLES:
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'the {table} table is append-only ({verb} refused)'); END"
                )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS fraud_audit_append_only()")
    else:
        for table in APPEND_ONLY_TABLES:
            for verb in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{verb}")
    op.drop_table("audit_checkpoints")
    op.drop_index("ux_decisions_chain", table_name="decisions")
    with op.batch_alter_table("decisions") as batch:
        for column in ("row_hash", "chain_seq", "chain_id", "decline_threshold", "review_threshold"):
            batch.drop_column(column)
