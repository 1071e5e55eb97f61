"""SQLAlchemy 2 models of the audit database: decisions, labels and live model quality.

The schema itself is created and changed only by the Alembic migrations in
`fraud/audit/migrations/versions/`; these models must match them (a test checks it).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    SmallInteger,
    String,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: JSONB on PostgreSQL (indexable, compact), JSON text on SQLite.
JsonColumn = JSON().with_variant(JSONB(), "postgresql")


class AuditBase(DeclarativeBase):
    pass


class Decision(AuditBase):
    """Every scoring decision, exactly once per (transaction_id, model_version)."""

    __tablename__ = "decisions"

    transaction_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(DateTime())
    variant: Mapped[str] = mapped_column(String(16))
    features: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    score: Mapped[float] = mapped_column(Float())
    decision: Mapped[str] = mapped_column(String(16))
    reason_codes: Mapped[list[Any]] = mapped_column(JsonColumn)
    features_missing: Mapped[bool] = mapped_column(Boolean())
    features_stale: Mapped[bool] = mapped_column(Boolean())
    fail_open: Mapped[bool] = mapped_column(Boolean())
    latency_ms: Mapped[float] = mapped_column(Float())
    customer_id: Mapped[str] = mapped_column(String(64))
    terminal_id: Mapped[str] = mapped_column(String(64))
    #: the decision thresholds that applied (null on decisions recorded before they were kept)
    review_threshold: Mapped[float | None] = mapped_column(Float(), nullable=True)
    decline_threshold: Mapped[float | None] = mapped_column(Float(), nullable=True)
    #: hash chain (fraud.audit.chain): which writer chain the row belongs to, its position in it and
    #: HMAC/SHA-256 of (previous row's hash, this row); null only on rows older than the chain
    chain_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    chain_seq: Mapped[int | None] = mapped_column(BigInteger(), nullable=True)
    row_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index("ix_decisions_received_at", "received_at"),
        Index("ix_decisions_customer_id", "customer_id"),
        Index("ux_decisions_chain", "chain_id", "chain_seq", unique=True),
    )


class Explanation(AuditBase):
    """Every explanation given on request (`:explain`): the TreeSHAP contributions disclosed for one
    transaction. Not a decision (no decision is made or changed by an explanation); append-only."""

    __tablename__ = "explanations"

    explanation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    transaction_id: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime())
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    variant: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str] = mapped_column(String(64))
    terminal_id: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float())
    decision: Mapped[str] = mapped_column(String(16))
    #: expected log-odds; bias + sum(contributions) is the model's log-odds for the transaction
    bias: Mapped[float] = mapped_column(Float())
    #: feature name -> log-odds contribution (XGBoost TreeSHAP)
    contributions: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    features_missing: Mapped[bool] = mapped_column(Boolean())
    features_stale: Mapped[bool] = mapped_column(Boolean())
    fail_open: Mapped[bool] = mapped_column(Boolean())

    __table_args__ = (
        Index("ix_explanations_transaction_id", "transaction_id"),
        Index("ix_explanations_received_at", "received_at"),
    )


class AuditCheckpoint(AuditBase):
    """The head of a writer's hash chain after each committed batch, in the same transaction.

    Deleting the newest rows of a chain (which no row after them links to) leaves a checkpoint
    pointing at a missing row; chain `pre-chain` holds one digest of the rows older than chaining.
    """

    __tablename__ = "audit_checkpoints"

    chain_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger(), primary_key=True)
    row_hash: Mapped[str] = mapped_column(String(64))
    written_at: Mapped[datetime] = mapped_column(DateTime())


class Label(AuditBase):
    """Confirmed outcome of a transaction (fraud / chargeback = 1, genuine = 0); latest report wins."""

    __tablename__ = "labels"

    transaction_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[int] = mapped_column(SmallInteger())
    reported_at: Mapped[datetime] = mapped_column(DateTime())
    ingested_at: Mapped[datetime] = mapped_column(DateTime())
    source: Mapped[str] = mapped_column(String(512))

    __table_args__ = (CheckConstraint("label IN (0, 1)", name="ck_labels_label_binary"),)


class LiveQuality(AuditBase):
    """Model quality measured on labelled decisions, per model version and decision day (UTC)."""

    __tablename__ = "live_quality"

    model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date(), primary_key=True)
    n_decisions: Mapped[int] = mapped_column(Integer())
    n_labelled: Mapped[int] = mapped_column(Integer())
    n_fraud: Mapped[int] = mapped_column(Integer())
    n_flagged: Mapped[int] = mapped_column(Integer())
    precision: Mapped[float | None] = mapped_column(Float(), nullable=True)
    recall: Mapped[float | None] = mapped_column(Float(), nullable=True)
    average_precision: Mapped[float | None] = mapped_column(Float(), nullable=True)
    card_precision_at_100: Mapped[float | None] = mapped_column(Float(), nullable=True)
    computed_at: Mapped[datetime] = mapped_column(DateTime())
