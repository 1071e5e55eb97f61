"""Where the predictor gets the batch (daily-snapshot) features of a request's entities.

`OnlineFeatureSource` is the small seam between the model server and the feature store: one call
per request, for all of its transactions at once. `FeastFeatureSource` is the production
implementation (the online store's `online_read` once per batch feature view, through
`fraud.feature_store.online_batch_arrays`); `InMemoryFeatureSource` serves the same contract from
DataFrames for tests and tools that need no Feast repository.

The lookup result (`FeatureLookup`) is aligned with the request rows (row i belongs to the i-th
transaction): `values` holds `CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES` as a float64
matrix (NaN where the store does not know the entity) and `customer_snapshot` / `terminal_snapshot`
the snapshot timestamps of each entity (datetime64[ns], tz-naive UTC, NaT where unknown). Plain
arrays, because the predictor's per-request work must not pay for DataFrame construction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from feast.errors import FeastError
from redis import RedisError

from fraud.feature_store import CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN
from fraud.features.definitions import (
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_SPENDING_VIEW,
    NS_PER_DAY,
    SNAPSHOT_TIMESTAMP,
    SNAPSHOT_TTL_DAYS,
    TERMINAL_RISK_FEATURES,
    TERMINAL_RISK_VIEW,
)
from fraud.schema import CUSTOMER_ID, TERMINAL_ID

logger = logging.getLogger("kserve.fraud_predictor")

BATCH_FEATURES: tuple[str, ...] = CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES
#: Time to live of each batch view's snapshots (the views' `ttl` in feature_repo/feature_views.py):
#: a snapshot older than this before the transaction is not served, as Feast's point-in-time join
#: gives training no value for it either.
SNAPSHOT_TTL_NS: int = SNAPSHOT_TTL_DAYS * NS_PER_DAY
_CUSTOMER_COLUMNS = slice(0, len(CUSTOMER_SPENDING_FEATURES))
_TERMINAL_COLUMNS = slice(len(CUSTOMER_SPENDING_FEATURES), len(BATCH_FEATURES))
LOOKUP_COLUMNS: tuple[str, ...] = (*BATCH_FEATURES, CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN)


class FeatureSourceUnavailable(RuntimeError):
    """The online store could not answer (unreachable, timed out, or failed).

    `fresh` is False when the source did not even try because a recent failure marked it down."""

    def __init__(self, message: str, fresh: bool = True) -> None:
        super().__init__(message)
        self.fresh = fresh


@dataclass(frozen=True)
class FeatureLookup:
    """Batch features for the rows of one request (see the module docstring for the layout)."""

    #: [n, len(BATCH_FEATURES)] float64 in BATCH_FEATURES order, NaN where the entity is unknown
    values: np.ndarray
    #: [n] datetime64[ns] snapshot time of each row's customer / terminal values (NaT: unknown)
    customer_snapshot: np.ndarray
    terminal_snapshot: np.ndarray
    #: the store was unreachable: these are cold-start defaults of the fail-open mode
    fail_open: bool = False

    @classmethod
    def empty(cls, rows: int) -> FeatureLookup:
        """A lookup in which no entity is known (every feature NaN, every snapshot NaT)."""
        unknown = np.full(rows, np.datetime64("NaT"), dtype="datetime64[ns]")
        return cls(np.full((rows, len(BATCH_FEATURES)), np.nan), unknown, unknown.copy())

    @property
    def missing(self) -> np.ndarray:
        """[n] bool: some batch feature of the row is unknown (cold-start default used)."""
        return np.isnan(self.values).any(axis=1)

    def expire(self, tx_epoch_ns: np.ndarray, ttl_ns: int = SNAPSHOT_TTL_NS) -> tuple[FeatureLookup, np.ndarray]:
        """The lookup with every snapshot older than `ttl_ns` before its transaction treated as
        unknown (values NaN: cold-start defaults; snapshot NaT), and [n] bool: the rows that had one.
        The boundary is Feast's: a snapshot exactly `ttl_ns` before the transaction is served."""
        tx_ns = np.asarray(tx_epoch_ns, dtype=np.int64)
        oldest = tx_ns - ttl_ns
        values = self.values
        snapshots = []
        expired = np.zeros(len(values), dtype=bool)
        blocks = ((self.customer_snapshot, _CUSTOMER_COLUMNS), (self.terminal_snapshot, _TERMINAL_COLUMNS))
        for snapshot, columns in blocks:
            too_old = ~np.isnat(snapshot) & (snapshot.view("int64") < oldest)
            if too_old.any():
                if values is self.values:
                    values = values.copy()
                values[too_old, columns] = np.nan
                snapshot = snapshot.copy()
                snapshot[too_old] = np.datetime64("NaT")
                expired |= too_old
            snapshots.append(snapshot)
        if not expired.any():
            return self, expired
        return replace(self, values=values, customer_snapshot=snapshots[0], terminal_snapshot=snapshots[1]), expired

    def newest_snapshots(self) -> dict[str, int | None]:
        """Epoch nanoseconds of the newest customer and terminal snapshot in the lookup, per view
        (None: the lookup served none of that view)."""
        newest: dict[str, int | None] = {}
        views = ((CUSTOMER_SPENDING_VIEW, self.customer_snapshot), (TERMINAL_RISK_VIEW, self.terminal_snapshot))
        for view, snapshot in views:
            stamps = snapshot.view("int64")  # NaT is the smallest int64
            best = int(stamps.max()) if len(stamps) else None
            newest[view] = None if best is None or np.isnat(snapshot).all() else best
        return newest

    def stale(self, tx_epoch_ns: np.ndarray) -> np.ndarray:
        """[n] bool: a known entity's snapshot is older than the transaction's (UTC) day."""
        tx_day = np.floor_divide(np.asarray(tx_epoch_ns, dtype=np.int64), NS_PER_DAY) * NS_PER_DAY
        stale = np.zeros(len(self.values), dtype=bool)
        for snapshot in (self.customer_snapshot, self.terminal_snapshot):
            known = ~np.isnat(snapshot)
            stale |= known & (snapshot.view("int64") < tx_day)
        return stale


@runtime_checkable
class OnlineFeatureSource(Protocol):
    """Answers one batched lookup per request."""

    name: str

    def lookup(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> FeatureLookup:
        """Features of customer_ids[i] and terminal_ids[i] in row i. Raises FeatureSourceUnavailable."""
        ...


def to_naive_utc(values: Any) -> np.ndarray:
    """Timestamps (tz-aware or naive, or NaT) as tz-naive UTC datetime64[ns]."""
    series = pd.to_datetime(pd.Series(values), utc=True, errors="coerce")
    return series.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")


class InMemoryFeatureSource:
    """Serves snapshots held in two DataFrames (one row per entity, latest snapshot).

    `customers` has `customer_id`, `snapshot_ts` and the `CUSTOMER_SPENDING_FEATURES`;
    `terminals` has `terminal_id`, `snapshot_ts` and the `TERMINAL_RISK_FEATURES`.
    """

    name = "memory"

    def __init__(self, customers: pd.DataFrame, terminals: pd.DataFrame) -> None:
        self._customers = _EntityTable(customers, CUSTOMER_ID, CUSTOMER_SPENDING_FEATURES)
        self._terminals = _EntityTable(terminals, TERMINAL_ID, TERMINAL_RISK_FEATURES)

    def lookup(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> FeatureLookup:
        if len(customer_ids) != len(terminal_ids):
            raise FeatureSourceUnavailable(f"got {len(customer_ids)} customer ids but {len(terminal_ids)} terminal ids")
        customer_values, customer_snapshot = self._customers.take(customer_ids)
        terminal_values, terminal_snapshot = self._terminals.take(terminal_ids)
        return FeatureLookup(np.hstack([customer_values, terminal_values]), customer_snapshot, terminal_snapshot)


class _EntityTable:
    """The latest snapshot of each entity as arrays, with a last all-NaN/NaT row for unknown ids."""

    def __init__(self, frame: pd.DataFrame, key: str, features: tuple[str, ...]) -> None:
        missing = [c for c in (key, SNAPSHOT_TIMESTAMP, *features) if c not in frame.columns]
        if missing:
            raise ValueError(f"feature table lacks columns {missing}")
        table = frame[[key, SNAPSHOT_TIMESTAMP, *features]].copy()
        table[key] = table[key].astype(str)
        table[SNAPSHOT_TIMESTAMP] = to_naive_utc(table[SNAPSHOT_TIMESTAMP].to_numpy())
        table = table.sort_values(SNAPSHOT_TIMESTAMP, kind="stable").drop_duplicates(key, keep="last")
        self._row = {entity: i for i, entity in enumerate(table[key].tolist())}
        unknown = len(self._row)
        self._values = np.vstack(
            [table[list(features)].to_numpy(dtype=np.float64, na_value=np.nan), np.full((1, len(features)), np.nan)]
        )
        self._snapshots = np.append(
            table[SNAPSHOT_TIMESTAMP].to_numpy(dtype="datetime64[ns]"), np.datetime64("NaT", "ns")
        )
        self._unknown = unknown

    def take(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.fromiter((self._row.get(str(e), self._unknown) for e in ids), dtype=np.intp, count=len(ids))
        return self._values[rows], self._snapshots[rows]


class FeastFeatureSource:
    """The Feast online store, through `fraud.feature_store.online_batch_arrays`: one online-store
    read per batch feature view and request, on a process-wide client whose registry is read
    once (and refreshed in the background as the feature_store yaml says).

    Outage handling, so that the degraded mode answers within a bounded time:

    * a lookup taking longer than `timeout_s` counts as failed (the Redis client's own connection
      retries can take many seconds); it finishes in the background;
    * after a failure the store is considered down for `retry_after_s` seconds: lookups in that
      window fail at once. The first lookup after the window probes the store again.
    """

    name = "feast"
    #: seconds a health check of the online store (`problem`) is reused (readiness probes)
    PROBLEM_CHECK_S = 10.0

    def __init__(self, online_store: str | None = None, retry_after_s: float = 5.0, timeout_s: float = 1.0) -> None:
        self.online_store = online_store
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feast-lookup")
        self._down_until = 0.0
        self._last_error = ""
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._problem_checked_until = 0.0

    @classmethod
    def connect(
        cls, online_store: str | None = None, retry_after_s: float = 5.0, timeout_s: float = 1.0
    ) -> FeastFeatureSource:
        """Open the store now (registry read, configuration checked) so that a broken repository
        fails the model load instead of the first request. Does not contact the online store."""
        from fraud.feature_store import online_client

        online_client(online_store)
        return cls(online_store, retry_after_s, timeout_s)

    def problem(self) -> str | None:
        """Why the online store cannot serve (lost or emptied, never materialised: see
        `fraud.feature_store.online_store_problem`), checked at most every `PROBLEM_CHECK_S`
        seconds. An unreachable store is an outage, not a problem: the degraded mode answers."""
        now = time.monotonic()
        with self._lock:
            if now < self._problem_checked_until:
                return self._problem
        from fraud.feature_store import online_client, online_store_problem

        try:
            problem = online_store_problem(online_client(self.online_store).store)
        except (RedisError, OSError) as exc:
            logger.debug("online store health not checked (unreachable): %s", exc)
            problem = None
        except Exception as exc:  # noqa: BLE001 - any failure to read a store that answers makes it unusable
            problem = f"cannot check the online store: {type(exc).__name__}: {exc}"
        with self._lock:
            self._problem, self._problem_checked_until = problem, now + self.PROBLEM_CHECK_S
        return problem

    def _mark_down(self, error: str) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after_s
            self._last_error = error

    def lookup(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> FeatureLookup:
        from fraud.feature_store import online_batch_arrays

        with self._lock:
            remaining = self._down_until - time.monotonic()
            if remaining > 0:
                raise FeatureSourceUnavailable(
                    f"online store marked down for another {remaining:.1f}s after: {self._last_error}", fresh=False
                )
        future = self._executor.submit(
            online_batch_arrays, list(customer_ids), list(terminal_ids), online=self.online_store
        )
        try:
            arrays = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            error = f"lookup took longer than {self.timeout_s:g}s"
            self._mark_down(error)
            raise FeatureSourceUnavailable(error) from None
        except Exception as exc:  # any failure of the online store is an outage for the predictor
            error = f"{type(exc).__name__}: {exc}"
            self._mark_down(error)
            raise FeatureSourceUnavailable(error) from exc
        if len(arrays.values) != len(customer_ids):
            raise FeatureSourceUnavailable(
                f"feature source returned {len(arrays.values)} rows for {len(customer_ids)} requested"
            )
        return FeatureLookup(arrays.values, arrays.customer_snapshot, arrays.terminal_snapshot)


class VelocitySource:
    """The real-time velocity features of a request and the publication of what it scores.

    `features` reads the window states of the request's cards and terminals from the Feast online
    store (`fraud.streaming.state`, two online reads) and evaluates
    `fraud.features.definitions.velocity_features` at each transaction's time; `publish` XADDs the
    scored transactions to the stream the aggregator consumes (`fraud.streaming.events`). Both
    fail open: an unreachable store gives NaN (the defaults of "no earlier transaction"), an
    unreachable stream loses the publication (logged), and either is then left alone for
    `retry_after_s` seconds so that an outage does not add a timeout to every request.
    """

    def __init__(self, states: Any, publisher: Any | None, retry_after_s: float = 5.0) -> None:
        self.states = states
        self.publisher = publisher
        self.retry_after_s = retry_after_s
        self._down_until = {"read": 0.0, "publish": 0.0}

    @classmethod
    def connect(cls, online_store: str | None, publish: bool, retry_after_s: float = 5.0) -> VelocitySource:
        from fraud.feature_store import online_client
        from fraud.streaming.events import StreamSettings, TransactionPublisher
        from fraud.streaming.state import WindowStateStore

        states = WindowStateStore(online_client(online_store).store)
        publisher = TransactionPublisher(StreamSettings.from_settings()) if publish else None
        return cls(states, publisher, retry_after_s)

    def _available(self, what: str) -> bool:
        return time.monotonic() >= self._down_until[what]

    def _failed(self, what: str, exc: Exception) -> None:
        self._down_until[what] = time.monotonic() + self.retry_after_s
        logger.warning(
            "velocity %s failed (%s: %s); retrying in %.0fs", what, type(exc).__name__, exc, self.retry_after_s
        )

    def features(self, tx_epoch_ns: np.ndarray, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> np.ndarray:
        """[n, len(VELOCITY_FEATURES)] float64; NaN rows when the states cannot be read."""
        from fraud.features.definitions import VELOCITY_FEATURES
        from fraud.streaming.state import read_velocity

        if self._available("read"):
            try:
                return read_velocity(self.states, tx_epoch_ns, customer_ids, terminal_ids)
            except (FeastError, RedisError, sqlite3.Error, OSError) as exc:  # serve without velocity history
                self._failed("read", exc)
        return np.full((len(customer_ids), len(VELOCITY_FEATURES)), np.nan)

    def publish(self, transactions: Sequence[tuple[str, str, str, float, int]]) -> bool:
        """XADD (transaction_id, customer_id, terminal_id, amount, ts_ns) tuples; False if not published."""
        if self.publisher is None or not self._available("publish"):
            return False
        try:
            self.publisher.publish(transactions)
            return True
        except (RedisError, OSError) as exc:  # the stream is best effort for the scoring path
            self._failed("publish", exc)
            return False
