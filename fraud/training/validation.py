"""Ingest validation of raw transaction files.

Input: a URI naming a Parquet or CSV file, or a directory of them (searched recursively; a raw
data directory with a `transactions/` sub-folder is accepted too). Local paths and `file://`
work out of the box; `gs://`, `s3://` and other remote schemes go through fsspec and need its
filesystem package (gcsfs, s3fs, ...) — without it the error says which one to install.

Fatal problems stop the ingest with a `ValidationError` (a `UserError`) naming the file and the
problem: nothing to read, an unreadable file, a required column missing. Row-level problems
reject the row and are counted per reason (a row is counted under its first failing reason, in
the order of `REJECTION_REASONS`):

* `invalid_type`   — a value that cannot be converted to the column's type;
* `null_value`     — a required value is missing;
* `non_positive_amount` — `tx_amount` <= 0 (or not finite);
* `invalid_label`  — `tx_fraud` not 0/1 or a negative fraud scenario;
* `timestamp_out_of_range` — `tx_datetime` outside [min, max] (default 2000-01-01 .. now + 1 day);
* `duplicate_transaction_id` — a transaction id seen before (the first occurrence is kept);
* `invalid_identifier` — an id outside `fraud.schema`'s identifier rule (characters, length) or
  shaped like a card number; such a card number is not copied into the rejected rows either.

The valid rows are written in the simulator's layout (Hive partitions `day=YYYY-MM-DD/part-0.parquet`,
`RAW_TRANSACTION_SCHEMA`) so that the offline feature builder reads them unchanged.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fraud import atomic
from fraud.errors import UserError
from fraud.schema import (
    CUSTOMER_ID,
    RAW_TRANSACTION_SCHEMA,
    TERMINAL_ID,
    TRANSACTION_ID,
    TX_AMOUNT,
    TX_DATETIME,
    TX_FRAUD,
    TX_FRAUD_SCENARIO,
    identifier_problem,
    looks_like_card_number,
)

REJECTION_REASONS: tuple[str, ...] = (
    "invalid_type",
    "null_value",
    "non_positive_amount",
    "invalid_label",
    "timestamp_out_of_range",
    "duplicate_transaction_id",
    "invalid_identifier",
)
ID_COLUMNS = (TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID)
CARD_NUMBER_REMOVED = "<card number removed>"
DEFAULT_MIN_TIMESTAMP = datetime(2000, 1, 1)
DAY_PARTITION = "day"
PARTITION_FILE = "part-0.parquet"
REJECTED_FILE = "rejected.parquet"
_SUPPORTED_SUFFIXES = (".parquet", ".csv")
_REMOTE_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "az": "adlfs", "abfs": "adlfs"}


class ValidationError(UserError):
    """The input cannot be ingested at all (missing column, unreadable file, nothing to read)."""


@dataclass
class ValidationReport:
    source_uri: str
    files: int
    rows_read: int
    rows_valid: int
    rejected: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in REJECTION_REASONS})
    first_timestamp: str = ""
    last_timestamp: str = ""

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict:
        out = asdict(self)
        out["rows_rejected"] = self.rows_rejected
        return out


@dataclass(frozen=True)
class ValidationResult:
    valid: pd.DataFrame
    rejected: pd.DataFrame
    report: ValidationReport


# --- reading ------------------------------------------------------------------------------------


def _filesystem(uri: str):
    """(fsspec filesystem, path inside it) for `uri`; local paths use pyarrow's local filesystem."""
    if "://" not in uri or uri.startswith("file://"):
        return None, uri.removeprefix("file://")
    scheme = uri.split("://", 1)[0]
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a core dependency
        raise ValidationError(f"reading {uri} needs the fsspec package, which is not installed") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        package = _REMOTE_PACKAGES.get(scheme, f"the fsspec implementation for {scheme}://")
        raise ValidationError(f"reading {uri} needs {package} (not installed here): {exc}") from None
    return fs, path


def _list_files(uri: str) -> tuple[object, list[str]]:
    fs, path = _filesystem(uri)
    if fs is None:
        local = Path(path)
        if not local.exists():
            raise ValidationError(f"input {uri} does not exist")
        if local.is_file():
            files = [str(local)]
        else:
            root = local / "transactions" if (local / "transactions").is_dir() else local
            files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix in _SUPPORTED_SUFFIXES)
    else:
        try:
            if not fs.exists(path):
                raise ValidationError(f"input {uri} does not exist")
            if fs.isfile(path):
                files = [path]
            else:
                nested = f"{path.rstrip('/')}/transactions"
                files = sorted(
                    f for f in fs.find(nested if fs.isdir(nested) else path) if f.endswith(_SUPPORTED_SUFFIXES)
                )
        except OSError as exc:
            raise ValidationError(f"cannot list {uri}: {exc}") from None
    files = [f for f in files if not Path(f).name.startswith((".", "_"))]
    if not files:
        raise ValidationError(f"no Parquet or CSV transaction files under {uri}")
    return fs, files


def _read_file(fs, path: str) -> pd.DataFrame:
    try:
        if path.endswith(".csv"):
            if fs is None:
                return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
            with fs.open(path, "rb") as handle:
                return pd.read_csv(handle, dtype=str, keep_default_na=False, na_values=[""])
        table = pq.read_table(path, filesystem=fs) if fs is not None else pq.read_table(path)
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException, pd.errors.ParserError) as exc:
        raise ValidationError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    # a Hive partition column that was written into the file is not part of the schema
    names = [n for n in table.column_names if n in RAW_TRANSACTION_SCHEMA.names]
    return table.select(names).to_pandas() if names else table.to_pandas()


def read_raw_files(uri: str) -> tuple[pd.DataFrame, int]:
    """All rows of every transaction file under `uri` (columns checked, types not yet), file count."""
    fs, files = _list_files(uri)
    frames = []
    for path in files:
        frame = _read_file(fs, path)
        missing = [name for name in RAW_TRANSACTION_SCHEMA.names if name not in frame.columns]
        if missing:
            raise ValidationError(f"{path} is missing required column(s) {', '.join(missing)}")
        frames.append(frame[list(RAW_TRANSACTION_SCHEMA.names)])
    return pd.concat(frames, ignore_index=True), len(files)


# --- checking -----------------------------------------------------------------------------------


def _convert(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """Typed columns, plus masks of rows with an unconvertible value and with a null."""
    typed = pd.DataFrame(index=raw.index)
    bad_type = pd.Series(False, index=raw.index)
    null = pd.Series(False, index=raw.index)
    for field_ in RAW_TRANSACTION_SCHEMA:
        column = raw[field_.name]
        if pa.types.is_string(field_.type):
            converted = column.astype("string").str.strip()
            converted = converted.where(converted != "", pd.NA)
            null |= converted.isna()
        else:
            if pa.types.is_timestamp(field_.type):
                converted = pd.to_datetime(column, errors="coerce", utc=True, format="mixed").dt.tz_localize(None)
            else:
                converted = pd.to_numeric(column, errors="coerce")
                if pa.types.is_integer(field_.type):
                    fractional = converted.notna() & (converted != np.floor(converted.fillna(0)))
                    converted = converted.where(~fractional)
            was_null = column.isna()
            bad_type |= converted.isna() & ~was_null
            null |= was_null
        typed[field_.name] = converted
    return typed, bad_type, null


def validate_frame(
    raw: pd.DataFrame,
    *,
    min_timestamp: datetime = DEFAULT_MIN_TIMESTAMP,
    max_timestamp: datetime | None = None,
    source_uri: str = "",
    files: int = 1,
) -> ValidationResult:
    """Split `raw` (columns of RAW_TRANSACTION_SCHEMA, any types) into valid and rejected rows."""
    missing = [name for name in RAW_TRANSACTION_SCHEMA.names if name not in raw.columns]
    if missing:
        raise ValidationError(f"input is missing required column(s) {', '.join(missing)}")
    max_timestamp = max_timestamp or (datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1))
    raw = raw.reset_index(drop=True)
    typed, bad_type, null = _convert(raw)
    reason = pd.Series(pd.NA, index=raw.index, dtype="string")

    def mark(mask: pd.Series, name: str) -> None:
        reason.loc[mask & reason.isna()] = name

    mark(bad_type, "invalid_type")
    mark(null, "null_value")
    amount = typed[TX_AMOUNT]
    mark(~(np.isfinite(amount.fillna(1.0)) & (amount.fillna(1.0) > 0)), "non_positive_amount")
    label_ok = typed[TX_FRAUD].isin([0, 1]) & (typed[TX_FRAUD_SCENARIO].fillna(0) >= 0)
    mark(~label_ok, "invalid_label")
    when = typed[TX_DATETIME]
    mark((when < pd.Timestamp(min_timestamp)) | (when > pd.Timestamp(max_timestamp)), "timestamp_out_of_range")
    candidate = reason.isna()
    duplicate = (
        candidate & typed[TRANSACTION_ID].where(candidate).duplicated(keep="first") & typed[TRANSACTION_ID].notna()
    )
    mark(duplicate, "duplicate_transaction_id")
    card_numbers = pd.Series(False, index=raw.index)
    for column in ID_COLUMNS:
        values = typed[column]
        mark(values.notna() & values.fillna("").map(identifier_problem).notna(), "invalid_identifier")
        card_numbers |= values.fillna("").map(looks_like_card_number).astype(bool)

    ok = reason.isna()
    valid = typed.loc[ok].copy()
    for field_ in RAW_TRANSACTION_SCHEMA:
        if pa.types.is_string(field_.type):
            valid[field_.name] = valid[field_.name].astype(str)
        elif pa.types.is_timestamp(field_.type):
            valid[field_.name] = valid[field_.name].astype("datetime64[us]")
        else:
            valid[field_.name] = valid[field_.name].astype(field_.type.to_pandas_dtype())
    valid = valid.sort_values([TX_DATETIME, TRANSACTION_ID], kind="mergesort").reset_index(drop=True)
    rejected = raw.loc[~ok].astype(str).assign(rejection_reason=reason.loc[~ok].astype(str))
    for column in ID_COLUMNS:  # never store a card number, not even among the rejected rows
        pan = card_numbers.loc[~ok] & typed[column].loc[~ok].fillna("").map(looks_like_card_number).astype(bool)
        rejected.loc[pan, column] = CARD_NUMBER_REMOVED
    counts = reason.value_counts()
    report = ValidationReport(
        source_uri=source_uri,
        files=files,
        rows_read=len(raw),
        rows_valid=int(ok.sum()),
        rejected={name: int(counts.get(name, 0)) for name in REJECTION_REASONS},
        first_timestamp=valid[TX_DATETIME].min().isoformat() if len(valid) else "",
        last_timestamp=valid[TX_DATETIME].max().isoformat() if len(valid) else "",
    )
    return ValidationResult(valid=valid, rejected=rejected.reset_index(drop=True), report=report)


def validate_uri(
    uri: str, *, min_timestamp: datetime = DEFAULT_MIN_TIMESTAMP, max_timestamp: datetime | None = None
) -> ValidationResult:
    """Read and validate every transaction file under `uri`."""
    raw, files = read_raw_files(uri)
    result = validate_frame(raw, min_timestamp=min_timestamp, max_timestamp=max_timestamp, source_uri=uri, files=files)
    if result.report.rows_valid == 0:
        raise ValidationError(
            f"no valid transactions in {uri}: all {result.report.rows_read} rows rejected "
            f"({', '.join(f'{k}={v}' for k, v in result.report.rejected.items() if v)})"
        )
    return result


# --- writing ------------------------------------------------------------------------------------


def write_partitioned(valid: pd.DataFrame, out_dir: Path) -> Path:
    """Write valid transactions as `out_dir/day=YYYY-MM-DD/part-0.parquet` (replaced atomically)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        days = valid[TX_DATETIME].dt.floor("D")
        for day, part in valid.groupby(days, sort=True):
            folder = staging / f"{DAY_PARTITION}={pd.Timestamp(day).date().isoformat()}"
            folder.mkdir()
            table = pa.Table.from_pandas(
                part.reset_index(drop=True), schema=RAW_TRANSACTION_SCHEMA, preserve_index=False
            )
            pq.write_table(table, folder / PARTITION_FILE)
        return atomic.replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
