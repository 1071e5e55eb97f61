"""Delayed fraud labels and the live quality of the served models.

Chargebacks and confirmed frauds arrive days or weeks after the decision. `ingest_label_file`
loads a label file (CSV or Parquet: transaction_id, label 0/1, reported_at) into the `labels`
table of the audit database (idempotent; the latest report of a transaction wins), then
`refresh_live_quality` joins labels to the recorded decisions and stores, per model version and
decision day (UTC), precision and recall of the alerts (decision review or decline), average
precision of the scores and Card Precision@100, all from `fraud.quality_metrics`, in `live_quality`.
`export_live_quality_gauges` publishes the latest mature day as Prometheus gauges.

Only labelled decisions are evaluated; the coverage (`n_labelled / n_decisions`) is stored so a
day whose labels are still coming in is recognisable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from prometheus_client import Gauge
from sqlalchemy import Engine, and_, select

from fraud import atomic, quality_metrics
from fraud.audit.store import dialect_insert
from fraud.audit.tables import Decision, Label, LiveQuality
from fraud.errors import UserError
from fraud.features.definitions import LABEL_DELAY_DAYS
from fraud.schema import (
    CUSTOMER_ID,
    ID_CHARACTERS,
    MAX_ID_LENGTH,
    TRANSACTION_ID,
    TX_DATETIME,
    TX_FRAUD,
    identifier_problem,
)

LABEL_COLUMNS: tuple[str, ...] = ("transaction_id", "label", "reported_at")
LABEL_FILE_FORMATS = ("csv", "parquet")
#: Decisions that raise an alert (an analyst looks at them); "approve" does not.
ALERT_DECISIONS = ("review", "decline")
CARD_PRECISION_K = 100
QUALITY_METRICS = ("precision", "recall", "average_precision", "card_precision_at_100")
_UPSERT_CHUNK = 1_000
_SHOWN_ERRORS = 5

LIVE_QUALITY_GAUGE = Gauge(
    "fraud_live_quality",
    "Live model quality on delayed labels, latest decision day with enough label coverage "
    "(metric: precision, recall, average_precision, card_precision_at_100)",
    ["model_name", "model_version", "metric"],
)
LIVE_QUALITY_DAY_GAUGE = Gauge(
    "fraud_live_quality_day_timestamp_seconds",
    "Start (UTC midnight) of the decision day the fraud_live_quality values describe",
    ["model_name", "model_version"],
)
LIVE_LABEL_COVERAGE_GAUGE = Gauge(
    "fraud_live_quality_label_coverage",
    "Share of that day's decisions that have a label",
    ["model_name", "model_version"],
)


# --- reading and validating label files ----------------------------------------------------
def _file_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("parquet", "pq"):
        return "parquet"
    if suffix == "csv":
        return "csv"
    raise UserError(f"label file {path}: unknown format {path.suffix!r}; use .csv or .parquet")


def _row_list(positions: np.ndarray, offset: int) -> str:
    shown = ", ".join(str(int(p) + offset) for p in positions[:_SHOWN_ERRORS])
    more = f" and {len(positions) - _SHOWN_ERRORS} more" if len(positions) > _SHOWN_ERRORS else ""
    return shown + more


def read_label_file(path: Path | str) -> pd.DataFrame:
    """Read and validate a label file; returns transaction_id (str), label (int8), reported_at
    (UTC, tz-naive), one row per transaction (the latest report). Raises UserError naming the
    column and the offending rows (CSV: file line numbers; Parquet: 0-based row indices)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist")
    fmt = _file_format(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False) if fmt == "csv" else pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many parser error types
        raise UserError(f"label file {path} is not a readable {fmt.upper()} file: {exc}") from None
    where = "line" if fmt == "csv" else "row"
    offset = 2 if fmt == "csv" else 0  # header line + 1-based lines
    missing = [column for column in LABEL_COLUMNS if column not in frame.columns]
    if missing:
        raise UserError(
            f"label file {path}: missing column(s) {missing}; "
            f"expected {list(LABEL_COLUMNS)}, found {list(frame.columns)}"
        )
    if frame.empty:
        raise UserError(f"label file {path} has no rows")
    frame = frame[list(LABEL_COLUMNS)].reset_index(drop=True)

    ids = frame["transaction_id"].astype("string").str.strip()
    problems = ids.fillna("").map(identifier_problem)
    bad_id = problems.notna().to_numpy(dtype=bool)
    if bad_id.any():
        first = problems[bad_id].iloc[0]
        raise UserError(
            f"label file {path}: column transaction_id must be a non-empty id of at most {MAX_ID_LENGTH} "
            f"characters from {ID_CHARACTERS}, never a card number "
            f"({where}s {_row_list(np.flatnonzero(bad_id), offset)}; "
            f"first: {first})"
        )

    raw_labels = frame["label"]
    if pd.api.types.is_bool_dtype(raw_labels) or pd.api.types.is_float_dtype(raw_labels):
        numeric = pd.to_numeric(raw_labels.astype("float64"), errors="coerce")
    else:
        numeric = pd.to_numeric(raw_labels.astype("string").str.strip(), errors="coerce")
    bad_label = ~numeric.isin([0, 1]).to_numpy(dtype=bool)
    if bad_label.any():
        examples = ", ".join(repr(v) for v in raw_labels[bad_label].head(3).tolist())
        raise UserError(
            f"label file {path}: column label must be 0 or 1 ({where}s {_row_list(np.flatnonzero(bad_label), offset)}: "
            f"{examples})"
        )

    reported = _parse_reported_at(frame["reported_at"])
    bad_time = reported.isna().to_numpy(dtype=bool)
    if bad_time.any():
        examples = ", ".join(repr(v) for v in frame["reported_at"][bad_time].head(3).tolist())
        raise UserError(
            f"label file {path}: column reported_at must be an ISO-8601 timestamp "
            f"({where}s {_row_list(np.flatnonzero(bad_time), offset)}: {examples})"
        )
    labels = pd.DataFrame({"transaction_id": ids.astype(str), "label": numeric.astype("int8"), "reported_at": reported})
    latest = labels.sort_values(["transaction_id", "reported_at"], kind="mergesort")
    conflicting = latest.duplicated(["transaction_id", "reported_at"], keep=False) & ~latest.duplicated(
        ["transaction_id", "reported_at", "label"], keep=False
    )
    if conflicting.any():
        tx = latest.loc[conflicting, "transaction_id"].iloc[0]
        raise UserError(f"label file {path}: transaction {tx!r} is reported as both 0 and 1 at the same reported_at")
    return latest.drop_duplicates("transaction_id", keep="last").reset_index(drop=True)


def _parse_reported_at(values: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = pd.to_datetime(values, utc=True)
    else:
        text = values.astype("string").str.strip()
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    out_of_range = (parsed.dt.year < 1970) | (parsed.dt.year >= 2100)
    return parsed.mask(out_of_range)


# --- storing labels -------------------------------------------------------------------------
def store_labels(engine: Engine, labels: pd.DataFrame, source: str) -> int:
    """Upsert labels: new transactions are inserted, a newer report replaces an older one, an
    identical or older report changes nothing (so re-ingesting a file is a no-op).
    Returns the number of rows inserted or updated."""
    ingested_at = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    changed = 0
    records = [
        {
            "transaction_id": tx,
            "label": int(label),
            "reported_at": reported.to_pydatetime(),
            "ingested_at": ingested_at,
            "source": source[-512:],
        }
        for tx, label, reported in labels[list(LABEL_COLUMNS)].itertuples(index=False, name=None)
    ]
    table = Label.__table__
    with engine.begin() as connection:
        statement = dialect_insert(connection, table)
        statement = statement.on_conflict_do_update(
            index_elements=["transaction_id"],
            set_={
                "label": statement.excluded.label,
                "reported_at": statement.excluded.reported_at,
                "ingested_at": statement.excluded.ingested_at,
                "source": statement.excluded.source,
            },
            where=table.c.reported_at < statement.excluded.reported_at,
        ).returning(table.c.transaction_id)  # rows inserted or updated; skipped ones return nothing
        for start in range(0, len(records), _UPSERT_CHUNK):
            changed += len(connection.execute(statement, records[start : start + _UPSERT_CHUNK]).all())
    return changed


def decision_days_of(engine: Engine, transaction_ids: Sequence[str]) -> list[date]:
    """The UTC days on which the given transactions were decided (any model version)."""
    days: set[date] = set()
    with engine.connect() as connection:
        for start in range(0, len(transaction_ids), _UPSERT_CHUNK):
            chunk = list(transaction_ids[start : start + _UPSERT_CHUNK])
            query = select(Decision.received_at).where(Decision.transaction_id.in_(chunk))
            days.update(received.date() for received in connection.execute(query).scalars())
    return sorted(days)


# --- live quality ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DailyQuality:
    """Quality of one model version on the labelled decisions of one day (None = undefined)."""

    model_name: str
    model_version: str
    day: date
    n_decisions: int
    n_labelled: int
    n_fraud: int
    n_flagged: int
    precision: float | None
    recall: float | None
    average_precision: float | None
    card_precision_at_100: float | None

    @property
    def label_coverage(self) -> float:
        return self.n_labelled / self.n_decisions if self.n_decisions else 0.0


def _defined(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def compute_daily_quality(model_name: str, model_version: str, day: date, frame: pd.DataFrame) -> DailyQuality:
    """Quality of one (model version, day) from its decisions: columns score, decision,
    customer_id, received_at and label (NaN where not labelled yet)."""
    labelled = frame[frame["label"].notna()]
    n_labelled = len(labelled)
    labels = labelled["label"].astype(int).to_numpy()
    flagged = labelled["decision"].isin(ALERT_DECISIONS).to_numpy()
    precision = recall = average_precision = card_precision = None
    if n_labelled:
        confusion = quality_metrics.confusion_at_threshold(labels, flagged.astype("float64"), 0.5)
        precision = _defined(confusion.precision)
        recall = _defined(confusion.recall)
        average_precision = _defined(quality_metrics.average_precision(labels, labelled["score"].to_numpy()))
        card_frame = pd.DataFrame(
            {
                quality_metrics.SCORE: labelled["score"].to_numpy(dtype="float64"),
                TX_FRAUD: labels,
                CUSTOMER_ID: labelled["customer_id"].to_numpy(),
                TX_DATETIME: labelled["received_at"].to_numpy(),
            }
        )
        cp = quality_metrics.card_precision_top_k(card_frame, CARD_PRECISION_K)
        card_precision = _defined(cp.mean)
    return DailyQuality(
        model_name=model_name,
        model_version=model_version,
        day=day,
        n_decisions=len(frame),
        n_labelled=n_labelled,
        n_fraud=int(labels.sum()),
        n_flagged=int(flagged.sum()),
        precision=precision,
        recall=recall,
        average_precision=average_precision,
        card_precision_at_100=card_precision,
    )


def _decisions_with_labels(engine: Engine, day: date) -> pd.DataFrame:
    start = datetime(day.year, day.month, day.day)
    query = (
        select(
            Decision.model_name,
            Decision.model_version,
            Decision.received_at,
            Decision.score,
            Decision.decision,
            Decision.customer_id,
            Label.label,
        )
        .select_from(Decision)
        .outerjoin(Label, Label.transaction_id == Decision.transaction_id)
        .where(and_(Decision.received_at >= start, Decision.received_at < start + timedelta(days=1)))
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    columns = ["model_name", "model_version", "received_at", "score", "decision", "customer_id", "label"]
    return pd.DataFrame(rows, columns=columns)


def refresh_live_quality(engine: Engine, days: Sequence[date]) -> list[DailyQuality]:
    """Recompute and store `live_quality` for the given decision days (all model versions)."""
    results: list[DailyQuality] = []
    for day in sorted(set(days)):
        frame = _decisions_with_labels(engine, day)
        for (name, version), group in frame.groupby(["model_name", "model_version"], sort=True):
            results.append(compute_daily_quality(str(name), str(version), day, group))
    _store_quality(engine, results)
    return results


def _store_quality(engine: Engine, rows: Sequence[DailyQuality]) -> None:
    if not rows:
        return
    computed_at = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    values = [
        {
            "model_name": row.model_name,
            "model_version": row.model_version,
            "day": row.day,
            "n_decisions": row.n_decisions,
            "n_labelled": row.n_labelled,
            "n_fraud": row.n_fraud,
            "n_flagged": row.n_flagged,
            "precision": row.precision,
            "recall": row.recall,
            "average_precision": row.average_precision,
            "card_precision_at_100": row.card_precision_at_100,
            "computed_at": computed_at,
        }
        for row in rows
    ]
    keys = ("model_name", "model_version", "day")
    with engine.begin() as connection:
        for start in range(0, len(values), _UPSERT_CHUNK):
            statement = dialect_insert(connection, LiveQuality.__table__).values(values[start : start + _UPSERT_CHUNK])
            statement = statement.on_conflict_do_update(
                index_elements=list(keys),
                set_={column: statement.excluded[column] for column in values[0] if column not in keys},
            )
            connection.execute(statement)


def read_live_quality(engine: Engine, model_version: str | None = None) -> list[DailyQuality]:
    """Stored live quality rows, oldest day first."""
    table = LiveQuality.__table__
    query = select(table).order_by(table.c.model_name, table.c.model_version, table.c.day)
    if model_version is not None:
        query = query.where(table.c.model_version == model_version)
    fields = DailyQuality.__dataclass_fields__
    with engine.connect() as connection:
        return [
            DailyQuality(**{name: value for name, value in row._mapping.items() if name in fields})
            for row in connection.execute(query)
        ]


def export_live_quality_gauges(engine: Engine, min_label_coverage: float = 0.9) -> dict[tuple[str, str], DailyQuality]:
    """Set the `fraud_live_quality*` gauges from the stored table: per model version, the latest
    day whose label coverage reaches `min_label_coverage`. Series of versions no longer in the
    table disappear. Returns the rows published, by (model_name, model_version)."""
    latest: dict[tuple[str, str], DailyQuality] = {}
    for row in read_live_quality(engine):
        if row.n_labelled and row.label_coverage >= min_label_coverage:
            latest[(row.model_name, row.model_version)] = row  # rows come oldest day first
    for gauge in (LIVE_QUALITY_GAUGE, LIVE_QUALITY_DAY_GAUGE, LIVE_LABEL_COVERAGE_GAUGE):
        gauge.clear()
    for (name, version), row in latest.items():
        for metric in QUALITY_METRICS:
            value = getattr(row, metric)
            LIVE_QUALITY_GAUGE.labels(name, version, metric).set(float("nan") if value is None else value)
        midnight = datetime(row.day.year, row.day.month, row.day.day)
        LIVE_QUALITY_DAY_GAUGE.labels(name, version).set((midnight - datetime(1970, 1, 1)).total_seconds())
        LIVE_LABEL_COVERAGE_GAUGE.labels(name, version).set(row.label_coverage)
    return latest


# --- the whole ingest -----------------------------------------------------------------------
@dataclass(frozen=True)
class LabelIngestReport:
    labels_in_file: int
    labels_changed: int
    matched_decision_days: list[date]
    quality: list[DailyQuality]


def ingest_labels(engine: Engine, labels: pd.DataFrame, source: str) -> LabelIngestReport:
    """Store validated labels (see `read_label_file`) idempotently and re-evaluate the decision
    days they touch."""
    changed = store_labels(engine, labels, source=source)
    days = decision_days_of(engine, labels["transaction_id"].tolist())
    quality = refresh_live_quality(engine, days)
    return LabelIngestReport(len(labels), changed, days, quality)


def ingest_label_file(engine: Engine, path: Path | str) -> LabelIngestReport:
    """Validate, store (idempotently) and evaluate one label file."""
    return ingest_labels(engine, read_label_file(path), source=str(Path(path).resolve()))


# --- labels of a simulated period -----------------------------------------------------------
@dataclass(frozen=True)
class ReportingDelay:
    """When labels become known: a fraud is reported after a log-normal delay (chargebacks,
    customer complaints: median `fraud_median_hours`), clipped to [`fraud_min_hours`,
    `fraud_max_days`]; a genuine transaction is confirmed when no report came within the label
    delay (`LABEL_DELAY_DAYS`, the Handbook's assumption)."""

    fraud_median_hours: float = 48.0
    fraud_sigma: float = 0.9
    fraud_min_hours: float = 1.0
    fraud_max_days: float = 60.0
    genuine_after_days: float = float(LABEL_DELAY_DAYS)


def simulated_labels(
    transactions: pd.DataFrame,
    delay: ReportingDelay = ReportingDelay(),
    seed: int = 0,
    as_of: datetime | None = None,
    include_genuine: bool = True,
) -> pd.DataFrame:
    """Label records (transaction_id, label, reported_at) for simulated transactions, as a label
    feed would deliver them; `as_of` keeps only the reports known by then."""
    rng = np.random.default_rng(seed)
    fraud = transactions[TX_FRAUD].astype(int).to_numpy()
    tx_time = pd.to_datetime(transactions[TX_DATETIME]).to_numpy()
    hours = rng.lognormal(mean=math.log(delay.fraud_median_hours), sigma=delay.fraud_sigma, size=len(fraud))
    hours = np.clip(hours, delay.fraud_min_hours, delay.fraud_max_days * 24.0)
    fraud_delay = (hours * 3_600_000_000).astype("int64").astype("timedelta64[us]")
    genuine_delay = np.timedelta64(int(delay.genuine_after_days * 86_400_000_000), "us")
    reported = np.where(fraud == 1, tx_time + fraud_delay, tx_time + genuine_delay)
    labels = pd.DataFrame(
        {
            "transaction_id": transactions[TRANSACTION_ID].astype(str).to_numpy(),
            "label": fraud.astype("int8"),
            "reported_at": pd.to_datetime(reported).floor("s"),
        }
    )
    keep = np.ones(len(labels), dtype=bool)
    if not include_genuine:
        keep &= labels["label"].to_numpy() == 1
    if as_of is not None:
        keep &= (labels["reported_at"] <= pd.Timestamp(as_of)).to_numpy()
    return labels[keep].sort_values(["reported_at", "transaction_id"], kind="mergesort").reset_index(drop=True)


def write_label_file(labels: pd.DataFrame, out: Path | str) -> Path:
    """Write labels as CSV or Parquet (by the suffix of `out`), atomically."""
    out = Path(out).expanduser()
    fmt = _file_format(out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    frame = labels[list(LABEL_COLUMNS)]
    with atomic.replacing(out) as tmp:
        if fmt == "csv":
            frame.assign(reported_at=frame["reported_at"].dt.strftime("%Y-%m-%dT%H:%M:%S")).to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    return out
