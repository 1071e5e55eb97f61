"""Tamper evidence of the decisions table: a per-writer hash chain with checkpoints.

Every writer process starts its own chain (`chain_id`, unique per process) and numbers the rows it
inserts 1, 2, 3, ... (`chain_seq`). Each row stores

    row_hash = MAC(previous row's row_hash, canonical JSON of the row incl. chain_id and chain_seq)

where MAC is HMAC-SHA256 with the chain key (`FRAUD_AUDIT_CHAIN_KEY`) or plain SHA-256 without
one. In the same transaction the writer inserts the chain's new head into `audit_checkpoints`.

`verify_decisions` recomputes everything and reports:

* a changed row: its recomputed hash differs from the stored one;
* a deleted row: a gap in its chain's numbering, or a checkpoint naming a row that is gone (the
  newest rows of a chain have no successor linking to them, the checkpoint catches them);
* an inserted row: a row without a chain, a row after the chain's last checkpoint, or a row whose
  hash does not follow from its predecessor.

Without a key anyone who can UPDATE both tables can recompute a consistent chain; with a key kept
out of the database (only the writer and the verifier hold it) they cannot. The database roles
(`fraud audit grant`) and the append-only triggers stop the writer itself from changing rows.

Rows written before chaining existed are covered by one digest (checkpoint chain `pre-chain`,
recorded by the migration that introduced the chain).
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

import orjson
from sqlalchemy import Connection, Engine, Table, select

from fraud.audit.tables import AuditCheckpoint, Decision
from fraud.settings import Settings, current

#: Environment variable with the chain's HMAC key (read by the CLI entry points only).
CHAIN_KEY_ENV = "FRAUD_AUDIT_CHAIN_KEY"
GENESIS_HASH = "0" * 64
#: Checkpoint chain holding the digest of the rows older than the chain.
PRE_CHAIN_ID = "pre-chain"
CHAIN_COLUMNS = ("chain_id", "chain_seq", "row_hash")
#: The columns a row's hash covers: every column of the table except its own hash.
HASHED_COLUMNS: tuple[str, ...] = tuple(c.name for c in Decision.__table__.columns if c.name != "row_hash")


def chain_key_from_env(settings: Settings | None = None) -> bytes | None:
    """The HMAC key of the chain: the setting `audit_chain_key` (FRAUD_AUDIT_CHAIN_KEY), or None."""
    value = (settings or current()).audit_chain_key
    return value.encode() if value else None


def new_chain_id() -> str:
    """A chain id unique to one writer process: host name and a random suffix (<= 64 chars)."""
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:16]}"


def _timestamp(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds")
    return value


def canonical_row(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers: its hashed columns as JSON with every object's keys sorted.

    Values read back from PostgreSQL and SQLite are the ones written: floats as doubles (the JSON
    columns keep 1 and 1.0 apart on both, JSONB's key order is undone by the sorting), timestamps
    as naive UTC with microseconds."""
    data = {name: row.get(name) for name in HASHED_COLUMNS}
    data["received_at"] = _timestamp(data["received_at"])
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def row_hash(previous: str, row: Mapping[str, Any], key: bytes | None) -> str:
    mac = _keyed(key).copy() if key else hashlib.sha256()
    mac.update(previous.encode() + b"\n" + canonical_row(row))
    return mac.hexdigest()


@lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """The HMAC state after the key (copied per row: the key schedule is computed once)."""
    return hmac.new(key, digestmod=hashlib.sha256)


@dataclass
class ChainState:
    """The head of this writer's chain; advanced only after a commit (`advance`)."""

    chain_id: str = field(default_factory=new_chain_id)
    seq: int = 0
    head: str = GENESIS_HASH
    key: bytes | None = None

    def link(self, rows: list[dict[str, Any]]) -> tuple[int, str]:
        """Number and hash `rows` (in place) after the current head; returns the new (seq, head)
        without advancing: call `advance` once the transaction committed."""
        seq, head = self.seq, self.head
        for row in rows:
            seq += 1
            row["chain_id"], row["chain_seq"] = self.chain_id, seq
            head = row_hash(head, row, self.key)
            row["row_hash"] = head
        return seq, head

    def advance(self, seq: int, head: str) -> None:
        self.seq, self.head = seq, head


def checkpoint_row(chain_id: str, seq: int, head: str) -> dict[str, Any]:
    return {
        "chain_id": chain_id,
        "chain_seq": seq,
        "row_hash": head,
        "written_at": datetime.now(UTC).replace(tzinfo=None),
    }


def pre_chain_digest(rows: Iterable[Mapping[str, Any]]) -> tuple[int, str]:
    """(count, SHA-256) of unchained rows taken in (transaction_id, model_version) order."""
    digest = hashlib.sha256()
    count = 0
    for row in rows:
        digest.update(canonical_row(row) + b"\n")
        count += 1
    return count, digest.hexdigest()


def _unchained_rows(connection: Connection, chunk_size: int) -> Iterator[dict[str, Any]]:
    table = Decision.__table__
    query = (
        select(table)
        .where(table.c.chain_id.is_(None))
        .order_by(table.c.transaction_id, table.c.model_version)
        .execution_options(yield_per=chunk_size)
    )
    for row in connection.execute(query):
        yield dict(row._mapping)


def record_pre_chain_digest(connection: Connection) -> None:
    """Checkpoint the rows older than the chain (run once, by the migration adding the chain)."""
    count, digest = pre_chain_digest(_unchained_rows(connection, 10_000))
    if count:
        connection.execute(
            cast(Table, AuditCheckpoint.__table__).insert(), [checkpoint_row(PRE_CHAIN_ID, count, digest)]
        )


@dataclass
class VerifyReport:
    rows: int = 0
    chains: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_decisions(
    engine: Engine, key: bytes | None, chunk_size: int = 10_000, max_problems: int = 100
) -> VerifyReport:
    """Recompute every chain and checkpoint of the decisions table (streamed, one pass per chain)."""
    report = VerifyReport()
    table = Decision.__table__

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)
        elif len(report.problems) == max_problems:
            report.problems.append("... (more problems not listed)")

    with engine.connect() as connection:
        checkpoints: dict[str, dict[int, str]] = {}
        for checkpoint_chain, checkpoint_seq, checkpoint_hash in connection.execute(
            select(AuditCheckpoint.chain_id, AuditCheckpoint.chain_seq, AuditCheckpoint.row_hash)
        ):
            checkpoints.setdefault(checkpoint_chain, {})[int(checkpoint_seq)] = checkpoint_hash

        # rows older than the chain: one digest, recorded by the migration
        count, digest = pre_chain_digest(_unchained_rows(connection, chunk_size))
        report.rows += count
        recorded = checkpoints.pop(PRE_CHAIN_ID, {})
        if recorded:
            (expected_count, expected_digest), *_ = recorded.items()
            if (count, digest) != (expected_count, expected_digest):
                problem(
                    f"rows without a hash chain changed, inserted or deleted: {count} now, "
                    f"{expected_count} when chaining began, "
                    f"digest {'matches' if digest == expected_digest else 'differs'}"
                )
        elif count:
            problem(f"{count} rows have no hash chain (inserted outside the audit writer)")

        query = (
            select(table)
            .where(table.c.chain_id.is_not(None))
            .order_by(table.c.chain_id, table.c.chain_seq)
            .execution_options(yield_per=chunk_size)
        )
        chain_id: str | None = None
        seq, head = 0, GENESIS_HASH
        seen_chains: set[str] = set()

        def close_chain(name: str, last_seq: int) -> None:
            marks = checkpoints.get(name, {})
            if not marks:
                problem(f"chain {name}: rows 1..{last_seq} have no checkpoint (inserted)")
                return
            newest = max(marks)
            if newest > last_seq:
                problem(f"chain {name}: checkpoint at row {newest} but the chain ends at row {last_seq} (rows deleted)")
            elif newest < last_seq:
                problem(f"chain {name}: rows {newest + 1}..{last_seq} come after its last checkpoint (inserted)")

        for row in connection.execute(query):
            data = dict(row._mapping)
            report.rows += 1
            if data["chain_id"] != chain_id:
                if chain_id is not None:
                    close_chain(chain_id, seq)
                chain_id, seq, head = data["chain_id"], 0, GENESIS_HASH
                seen_chains.add(chain_id)
            where = f"chain {chain_id} row {data['chain_seq']} (transaction {data['transaction_id']!r})"
            if data["chain_seq"] != seq + 1:
                problem(f"{where}: rows {seq + 1}..{data['chain_seq'] - 1} of the chain are missing (deleted)")
            expected = row_hash(head, data, key)
            if expected != data["row_hash"]:
                problem(f"{where}: content or link does not match its hash (changed, or inserted before it)")
            mark = checkpoints.get(data["chain_id"], {}).get(int(data["chain_seq"]))
            if mark is not None and mark != data["row_hash"]:
                problem(f"{where}: differs from the checkpoint recorded when it was written")
            seq, head = int(data["chain_seq"]), data["row_hash"] or ""
        if chain_id is not None:
            close_chain(chain_id, seq)
        for missing in sorted(set(checkpoints) - seen_chains):
            problem(f"chain {missing}: checkpointed up to row {max(checkpoints[missing])} but has no rows (deleted)")
        report.chains = len(seen_chains)
    return report
