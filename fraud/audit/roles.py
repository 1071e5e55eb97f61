"""Least privilege in the audit database (PostgreSQL).

Three roles, each with only what its job needs:

* the **migration role** owns the tables: `fraud audit migrate` and `fraud audit grant` run as it
  (the audit-migrate Job); nothing else does;
* the **writer role** (the audit-writer containers) may read and INSERT decisions and chain
  checkpoints, nothing more: no UPDATE, DELETE or TRUNCATE, no labels;
* the **reader role** (exports, label ingestion, live quality, the retraining job) reads the
  decisions and maintains `labels` and `live_quality` (INSERT ... ON CONFLICT DO UPDATE).

On top of the grants, the migration puts append-only triggers on `decisions` and
`audit_checkpoints`, which refuse UPDATE, DELETE and TRUNCATE for every role, the owner included.
Roles are created by the database administrator (`CREATE ROLE ... LOGIN PASSWORD ...`), not here.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine, text

from fraud.audit.store import ALEMBIC_VERSION_TABLE
from fraud.errors import UserError

APPEND_ONLY = ("decisions", "explanations", "audit_checkpoints")
MAINTAINED = ("labels", "live_quality")
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_$-]{0,62}$")


def _quoted(role: str) -> str:
    if not _ROLE_NAME.match(role):
        raise UserError(f"role name {role!r} must be 1-63 lowercase letters, digits, '_', '$' or '-'")
    return f'"{role}"'


def grant_statements(writer_role: str, reader_role: str) -> list[str]:
    writer, reader = _quoted(writer_role), _quoted(reader_role)
    if writer == reader:
        raise UserError("the writer and the reader role must differ")
    tables = (*APPEND_ONLY, *MAINTAINED, ALEMBIC_VERSION_TABLE)
    statements = [f"REVOKE ALL ON {', '.join(tables)} FROM PUBLIC, {writer}, {reader}"]
    statements += [f"GRANT USAGE ON SCHEMA {{schema}} TO {writer}, {reader}"]
    statements += [
        f"GRANT SELECT ON {ALEMBIC_VERSION_TABLE} TO {writer}, {reader}",
        f"GRANT SELECT, INSERT ON {', '.join(APPEND_ONLY)} TO {writer}",
        f"GRANT SELECT ON {', '.join(APPEND_ONLY)} TO {reader}",
        f"GRANT SELECT, INSERT, UPDATE ON {', '.join(MAINTAINED)} TO {reader}",
    ]
    return statements


def grant_roles(engine: Engine, writer_role: str, reader_role: str) -> None:
    """Apply `grant_statements` (idempotent); UserError on SQLite or a role that does not exist."""
    if engine.dialect.name != "postgresql":
        raise UserError("database roles exist on PostgreSQL only; the embedded SQLite audit database has none")
    statements = grant_statements(writer_role, reader_role)
    with engine.begin() as connection:
        for role in (writer_role, reader_role):
            if connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is None:
                raise UserError(
                    f"role {role!r} does not exist; create it first (CREATE ROLE {role} LOGIN PASSWORD ...)"
                )
        schema = connection.execute(text("SELECT current_schema()")).scalar_one()
        for statement in statements:
            connection.exec_driver_sql(statement.replace("{schema}", f'"{schema}"'))
