"""Export of the audit trail for auditors: CSV or Parquet, streamed, written atomically."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from fraud import atomic
from fraud.audit.store import iter_decisions
from fraud.errors import UserError

EXPORT_FORMATS = ("csv", "parquet")
_JSON_COLUMNS = ("features", "reason_codes")

#: Column types of an export; JSON columns are exported as JSON text.
EXPORT_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("received_at", pa.timestamp("us"), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("features", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),
        pa.field("reason_codes", pa.string(), nullable=False),
        pa.field("features_missing", pa.bool_(), nullable=False),
        pa.field("features_stale", pa.bool_(), nullable=False),
        pa.field("fail_open", pa.bool_(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("terminal_id", pa.string(), nullable=False),
    ]
)


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in EXPORT_SCHEMA.names}
    for row in rows:
        for name in EXPORT_SCHEMA.names:
            value = row[name]
            if name in _JSON_COLUMNS:
                value = json.dumps(value, sort_keys=True, separators=(",", ":"))
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=EXPORT_SCHEMA)


class _Sink:
    def __init__(self, fmt: str, path: Path) -> None:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(str(path), EXPORT_SCHEMA, compression="zstd")
        else:
            import pyarrow.csv as pacsv

            self._writer = pacsv.CSVWriter(str(path), EXPORT_SCHEMA)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


def export_decisions(engine, start: datetime | None, end: datetime | None, fmt: str, out: Path) -> int:
    """Write decisions with start <= received_at < end to `out`; returns the row count.

    The file appears only when complete (written next to `out`, then renamed); a failure leaves
    any previous `out` untouched.
    """
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    count = 0
    with atomic.replacing(out) as tmp:
        sink = _Sink(fmt, tmp)
        try:
            for rows in iter_decisions(engine, start, end):
                sink.write(_to_table(rows))
                count += len(rows)
        finally:
            sink.close()
    return count
