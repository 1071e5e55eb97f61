"""Where the predictor gets the batch (daily-snapshot) features of a request's entities.

`OnlineFeatureSource` is the small seam between the model server and the feature store: one call
per request, for all of its transactions at once. `FeastFeatureSource` is the production
implementation (one batched Feast `get_online_features` call through
`fraud.feature_store.online_batch_features`); `InMemoryFeatureSource` serves the same contract from
DataFrames for tests and tools that need no Feast repository.

The lookup result (`FeatureLookup.frame`) is aligned with the request rows (row i belongs to the
i-th transaction) and holds every column of `CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES`
(NaN where the store does not know the entity) plus the snapshot timestamps of each entity
(`CUSTOMER_SNAPSHOT_COLUMN`, `TERMINAL_SNAPSHOT_COLUMN`; tz-naive UTC, NaT where unknown).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from fraud.feature_store import CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN
from fraud.features.definitions import (
    CUSTOMER_SPENDING_FEATURES,
    SNAPSHOT_TIMESTAMP,
    TERMINAL_RISK_FEATURES,
)
from fraud.schema import CUSTOMER_ID, TERMINAL_ID

logger = logging.getLogger("kserve.fraud_predictor")

BATCH_FEATURES: tuple[str, ...] = CUSTOMER_SPENDING_FEATURES + TERMINAL_RISK_FEATURES
LOOKUP_COLUMNS: tuple[str, ...] = (*BATCH_FEATURES, CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN)


class FeatureSourceUnavailable(RuntimeError):
    """The online store could not answer (unreachable, timed out, or failed).

    `fresh` is False when the source did not even try because a recent failure marked it down."""

    def __init__(self, message: str, fresh: bool = True) -> None:
        super().__init__(message)
        self.fresh = fresh


@dataclass(frozen=True)
class FeatureLookup:
    """Batch features for the rows of one request (see the module docstring for the columns)."""

    frame: pd.DataFrame
    #: the store was unreachable: these are cold-start defaults of the fail-open mode
    fail_open: bool = False

    @classmethod
    def empty(cls, rows: int) -> FeatureLookup:
        """A lookup in which no entity is known (every feature NaN, every snapshot NaT)."""
        frame = pd.DataFrame({name: np.full(rows, np.nan) for name in BATCH_FEATURES})
        frame[CUSTOMER_SNAPSHOT_COLUMN] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns]")
        frame[TERMINAL_SNAPSHOT_COLUMN] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns]")
        return cls(frame)


@runtime_checkable
class OnlineFeatureSource(Protocol):
    """Answers one batched lookup per request."""

    name: str

    def lookup(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> FeatureLookup:
        """Features of customer_ids[i] and terminal_ids[i] in row i. Raises FeatureSourceUnavailable."""
        ...


def to_naive_utc(values: Any) -> pd.Series:
    """Timestamps (tz-aware or naive, or NaT) as tz-naive UTC datetime64[ns]."""
    series = pd.to_datetime(pd.Series(values), utc=True, errors="coerce")
    return series.dt.tz_localize(None).astype("datetime64[ns]")


def normalise_lookup(frame: pd.DataFrame, rows: int) -> FeatureLookup:
    """Check and coerce a source's answer into the `FeatureLookup` layout."""
    if len(frame) != rows:
        raise FeatureSourceUnavailable(f"feature source returned {len(frame)} rows for {rows} requested")
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame(index=frame.index)
    for name in BATCH_FEATURES:
        if name in frame.columns:
            out[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
        else:
            out[name] = np.nan
    for column in (CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN):
        out[column] = to_naive_utc(frame[column]) if column in frame.columns else pd.NaT
        out[column] = out[column].astype("datetime64[ns]")
    return FeatureLookup(out)


class InMemoryFeatureSource:
    """Serves snapshots held in two DataFrames (one row per entity, latest snapshot).

    `customers` has `customer_id`, `snapshot_ts` and the `CUSTOMER_SPENDING_FEATURES`;
    `terminals` has `terminal_id`, `snapshot_ts` and the `TERMINAL_RISK_FEATURES`.
    """

    name = "memory"

    def __init__(self, customers: pd.DataFrame, terminals: pd.DataFrame) -> None:
        self._customers = self._index(customers, CUSTOMER_ID, CUSTOMER_SPENDING_FEATURES)
        self._terminals = self._index(terminals, TERMINAL_ID, TERMINAL_RISK_FEATURES)

    @staticmethod
    def _index(frame: pd.DataFrame, key: str, features: tuple[str, ...]) -> pd.DataFrame:
        missing = [c for c in (key, SNAPSHOT_TIMESTAMP, *features) if c not in frame.columns]
        if missing:
            raise ValueError(f"feature table lacks columns {missing}")
        table = frame[[key, SNAPSHOT_TIMESTAMP, *features]].copy()
        table[key] = table[key].astype(str)
        table[SNAPSHOT_TIMESTAMP] = to_naive_utc(table[SNAPSHOT_TIMESTAMP]).to_numpy()
        table = table.sort_values(SNAPSHOT_TIMESTAMP).drop_duplicates(key, keep="last")
        return table.set_index(key)

    def lookup(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> FeatureLookup:
        customers = self._customers.reindex(list(customer_ids)).reset_index(drop=True)
        terminals = self._terminals.reindex(list(terminal_ids)).reset_index(drop=True)
        frame = pd.concat(
            [
                customers[list(CUSTOMER_SPENDING_FEATURES)],
                terminals[list(TERMINAL_RISK_FEATURES)],
                customers[SNAPSHOT_TIMESTAMP].rename(CUSTOMER_SNAPSHOT_COLUMN),
                terminals[SNAPSHOT_TIMESTAMP].rename(TERMINAL_SNAPSHOT_COLUMN),
            ],
            axis=1,
        )
        return normalise_lookup(frame, len(customer_ids))


class FeastFeatureSource:
    """The Feast online store, through `fraud.feature_store.online_batch_features`: one
    `get_online_features` round trip per request, on a process-wide client whose registry is read
    once (and refreshed in the background as the feature_store yaml says).

    Outage handling, so that the degraded mode answers within a bounded time:

    * a lookup taking longer than `timeout_s` counts as failed (the Redis client's own connection
      retries can take many seconds); it finishes in the background;
    * after a failure the store is considered down for `retry_after_s` seconds: lookups in that
      window fail at once. The first lookup after the window probes the store again.
    """

    name = "feast"

    def __init__(self, online_store: str | None = None, retry_after_s: float = 5.0, timeout_s: float = 1.0) -> None:
        self.online_store = online_store
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="feast-lookup")
        self._down_until = 0.0
        self._last_error = ""
        self._lock = threading.Lock()

    @classmethod
    def connect(
        cls, online_store: str | None = None, retry_after_s: float = 5.0, timeout_s: float = 1.0
    ) -> FeastFeatureSource:
        """Open the store now (registry read, configuration checked) so that a broken repository
        fails the model load instead of the first request. Does not contact the online store."""
        from fraud.feature_store import online_client

        online_client(online_store)
        return cls(online_store, retry_after_s, timeout_s)

    def _mark_down(self, error: str) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after_s
            self._last_error = error

    def lookup(self, customer_ids: Sequence[str], terminal_ids: Sequence[str]) -> FeatureLookup:
        from fraud.feature_store import online_batch_features

        with self._lock:
            remaining = self._down_until - time.monotonic()
            if remaining > 0:
                raise FeatureSourceUnavailable(
                    f"online store marked down for another {remaining:.1f}s after: {self._last_error}", fresh=False
                )
        future = self._executor.submit(
            online_batch_features, list(customer_ids), list(terminal_ids), online=self.online_store
        )
        try:
            frame = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            error = f"lookup took longer than {self.timeout_s:g}s"
            self._mark_down(error)
            raise FeatureSourceUnavailable(error) from None
        except Exception as exc:  # any failure of the online store is an outage for the predictor
            error = f"{type(exc).__name__}: {exc}"
            self._mark_down(error)
            raise FeatureSourceUnavailable(error) from exc
        return normalise_lookup(frame, len(customer_ids))
