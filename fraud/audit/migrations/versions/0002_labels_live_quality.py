"""labels and live_quality: delayed fraud labels and the model quality measured with them

Revision ID: 0002_labels_live_quality
Revises: 0001_decisions
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_labels_live_quality"
down_revision = "0001_decisions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("transaction_id", sa.String(64), nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=False),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.Column("ingested_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.String(512), nullable=False),
        sa.PrimaryKeyConstraint("transaction_id", name="pk_labels"),
        sa.CheckConstraint("label IN (0, 1)", name="ck_labels_label_binary"),
    )
    op.create_table(
        "live_quality",
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("n_decisions", sa.Integer(), nullable=False),
        sa.Column("n_labelled", sa.Integer(), nullable=False),
        sa.Column("n_fraud", sa.Integer(), nullable=False),
        sa.Column("n_flagged", sa.Integer(), nullable=False),
        sa.Column("precision", sa.Float(), nullable=True),
        sa.Column("recall", sa.Float(), nullable=True),
        sa.Column("average_precision", sa.Float(), nullable=True),
        sa.Column("card_precision_at_100", sa.Float(), nullable=True),
        sa.Column("computed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("model_name", "model_version", "day", name="pk_live_quality"),
    )


def downgrade() -> None:
    op.drop_table("live_quality")
    op.drop_table("labels")
