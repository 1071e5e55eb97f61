"""Card-transaction simulator: the generative process of the Fraud Detection Handbook.

Reproduces *Reproducible Machine Learning for Credit Card Fraud Detection - Practical Handbook*
(Le Borgne et al.), chapter 3.2 "Transaction data simulator", vectorised with numpy so the default
dataset (5,000 customers, 10,000 terminals, 183 days, ~1.75 M transactions) takes seconds.

The process, per the book's code (``generate_customer_profiles_table``,
``generate_terminal_profiles_table``, ``get_list_terminals_within_radius``,
``generate_transactions_table``, ``add_frauds``):

* customers at (x, y) ~ U(0, 100)², mean amount ~ U(5, 100), std = mean / 2, mean number of
  transactions per day ~ U(0, 4);
* terminals at (x, y) ~ U(0, 100)²; a customer uses only the terminals at Euclidean distance < r;
* each day, each customer makes Poisson(mean_nb_tx_per_day) draws; a draw's time of day is
  ``int(Normal(43200, 20000))`` seconds and is kept only if ``0 < t < 86400`` (no redraw); its
  amount is Normal(mean, std), a negative draw replaced by U(0, 2·mean), rounded to cents; its
  terminal is uniform among the customer's terminals (no terminal in range: no transaction);
* fraud, in the book's order, each later scenario overwriting the label of an earlier one:
  (1) amount > 220; (2) on each day d in ``range(max tx day)``, 2 random terminals are
  compromised and all their transactions on days [d, d + 28) are fraud; (3) on each such day 3
  random customers are compromised and ⌊n/3⌋ of their n transactions on days [d, d + 14) are
  picked at random, their amount multiplied by 5 and labelled fraud.

Deviations, all documented in docs/simulator.md: numpy's ``Generator`` replaces the book's global
seeds (different numbers, same distributions); an amount that rounds to 0.00 becomes 0.01 so every
simulated transaction is a valid scoring request; amounts multiplied by 5 are rounded to cents
(removes float noise only); fewer than 2 terminals / 3 customers compromise them all.

Each random component has its own child stream of ``SeedSequence(seed)``, so the extra profile
attributes (age, account opening date, merchant category) never change the published process and
changing e.g. the number of days does not move the customers.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from fraud import atomic
from fraud.errors import UserError
from fraud.schema import (
    CUSTOMER_ID,
    CUSTOMER_PROFILE_SCHEMA,
    MERCHANT_CATEGORIES,
    RAW_TRANSACTION_SCHEMA,
    TERMINAL_ID,
    TERMINAL_PROFILE_SCHEMA,
    TRANSACTION_ID,
    TX_AMOUNT,
    TX_DATETIME,
    TX_FRAUD,
    TX_FRAUD_SCENARIO,
    customer_key,
    terminal_key,
    transaction_key,
)

SECONDS_PER_DAY = 86_400
#: Book constants (chapter 3.2).
GRID_SIZE = 100.0
MEAN_AMOUNT_RANGE = (5.0, 100.0)
MEAN_NB_TX_PER_DAY_RANGE = (0.0, 4.0)
TIME_OF_DAY_MEAN = SECONDS_PER_DAY / 2
TIME_OF_DAY_STD = 20_000.0
SCENARIO_1_AMOUNT_THRESHOLD = 220.0
SCENARIO_2_TERMINALS_PER_DAY = 2
SCENARIO_2_DURATION_DAYS = 28
SCENARIO_3_CUSTOMERS_PER_DAY = 3
SCENARIO_3_DURATION_DAYS = 14
SCENARIO_3_AMOUNT_FACTOR = 5.0
#: Smallest amount written; a draw that rounds to 0.00 is raised to it (a request must be > 0).
MIN_AMOUNT = 0.01
#: Card testing (scenario 4, not in the book, off by default): a stolen card makes
#: CARD_TESTING_SMALL_TX small purchases U(CARD_TESTING_SMALL_AMOUNT) at random terminals, each
#: CARD_TESTING_GAP_SECONDS after the previous one, then one large purchase U(CARD_TESTING_LARGE_AMOUNT).
SCENARIO_CARD_TESTING = 4
CARD_TESTING_SMALL_TX = (4, 12)
CARD_TESTING_SMALL_AMOUNT = (0.5, 5.0)
CARD_TESTING_GAP_SECONDS = (10, 120)
CARD_TESTING_LARGE_AMOUNT = (200.0, 1_500.0)
#: spawn key of the card-testing random stream (independent of the book's five streams)
_CARD_TESTING_STREAM = 1_000

#: Customers per chunk when finding the terminals within the radius (bounds that step's memory).
_RADIUS_CHUNK = 20_000

#: Extra profile attributes (not in the book), from their own random stream.
CUSTOMER_AGE_RANGE = (18, 90)
MAX_ACCOUNT_AGE_YEARS = 30

#: Partition column of the transactions dataset (hive style: ``day=YYYY-MM-DD``).
DAY_PARTITION = "day"
PART_FILE_NAME = "part-0.parquet"
SUCCESS_FILE_NAME = "_SUCCESS.json"
FORMAT_VERSION = 1

#: Parquet writer options: fixed so the same data always gives the same bytes.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
}

#: progress(stage, completed, total): called as long stages advance.
ProgressCallback = Callable[[str, int, int], None]


def _no_progress(stage: str, completed: int, total: int) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# configuration and result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of one simulation. Defaults are the book's published dataset."""

    n_customers: int = 5_000
    n_terminals: int = 10_000
    n_days: int = 183
    start_date: date = date(2018, 4, 1)
    radius: float = 5.0
    seed: int = 0
    #: stolen cards per day used in a card-testing burst (scenario 4); 0 = the book's process only
    card_testing_per_day: int = 0

    def __post_init__(self) -> None:
        for name in ("n_customers", "n_terminals", "n_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UserError(f"{name} must be an integer, got {value!r}")
            if value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if (
            isinstance(self.card_testing_per_day, bool)
            or not isinstance(self.card_testing_per_day, (int, np.integer))
            or self.card_testing_per_day < 0
        ):
            raise UserError(f"card_testing_per_day must be a non-negative integer, got {self.card_testing_per_day!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)):
            raise UserError(f"radius must be a number, got {self.radius!r}")
        if not np.isfinite(self.radius) or self.radius <= 0:
            raise UserError(f"radius must be a positive finite number, got {self.radius}")
        if isinstance(self.start_date, datetime) or not isinstance(self.start_date, date):
            raise UserError(f"start_date must be a date, got {self.start_date!r}")
        end = self.end_date
        if not (self.start_date.year >= 1970 and end.year < 2100):
            raise UserError(
                f"simulated period {self.start_date.isoformat()}..{end.isoformat()} must lie within 1970..2099"
            )

    @property
    def end_date(self) -> date:
        """Last simulated day (inclusive)."""
        try:
            return self.start_date + timedelta(days=int(self.n_days) - 1)
        except OverflowError:
            raise UserError(f"n_days={self.n_days} runs past the year 9999") from None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "n_customers": int(self.n_customers),
            "n_terminals": int(self.n_terminals),
            "n_days": int(self.n_days),
            "start_date": self.start_date.isoformat(),
            "radius": float(self.radius),
            "seed": int(self.seed),
            # only when enabled, so the book's datasets keep their exact manifest
            **({"card_testing_per_day": int(self.card_testing_per_day)} if self.card_testing_per_day else {}),
        }


@dataclass
class SimulatedData:
    """Output of :func:`simulate`; columns and dtypes follow the schemas in fraud.schema."""

    transactions: pd.DataFrame
    customers: pd.DataFrame
    terminals: pd.DataFrame
    config: SimulationConfig = field(default_factory=SimulationConfig)
    #: Fraud schedule (not written to disk): which terminal (scenario 2) / customer (scenario 3)
    #: was compromised on which day index ``tx_time_days``.
    compromised_terminals: pd.DataFrame = field(default_factory=lambda: _schedule_frame(TERMINAL_ID, [], []))
    compromised_customers: pd.DataFrame = field(default_factory=lambda: _schedule_frame(CUSTOMER_ID, [], []))

    def summary(self) -> dict[str, Any]:
        """Row count, fraud count and per-scenario counts (final labels)."""
        tx = self.transactions
        scenario_counts = tx[TX_FRAUD_SCENARIO].value_counts()
        n_rows = len(tx)
        n_fraud = int(tx[TX_FRAUD].sum())
        return {
            "n_transactions": n_rows,
            "n_fraud": n_fraud,
            "fraud_rate": (n_fraud / n_rows) if n_rows else 0.0,
            "fraud_by_scenario": {
                str(k): int(scenario_counts.get(k, 0))
                for k in ((1, 2, 3, SCENARIO_CARD_TESTING) if self.config.card_testing_per_day else (1, 2, 3))
            },
            "n_customers": len(self.customers),
            "n_terminals": len(self.terminals),
            "n_customers_without_terminal": int((self.customers["nb_available_terminals"] == 0).sum()),
            "first_day": self.config.start_date.isoformat(),
            "last_day": self.config.end_date.isoformat(),
        }


@dataclass(frozen=True)
class _Streams:
    customers: np.random.Generator
    terminals: np.random.Generator
    transactions: np.random.Generator
    frauds: np.random.Generator
    attributes: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> _Streams:
        children = np.random.SeedSequence(seed).spawn(5)
        return cls(*(np.random.default_rng(child) for child in children))


# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CustomerArrays:
    xy: np.ndarray  # (n, 2)
    mean_amount: np.ndarray
    std_amount: np.ndarray
    mean_nb_tx_per_day: np.ndarray


def _draw_customers(n: int, rng: np.random.Generator) -> _CustomerArrays:
    # One (n, 4) draw per row = x, y, mean amount, mean nb tx, as the book draws per customer.
    u = rng.random((n, 4))
    xy = u[:, :2] * GRID_SIZE
    lo, hi = MEAN_AMOUNT_RANGE
    mean_amount = lo + u[:, 2] * (hi - lo)
    lo, hi = MEAN_NB_TX_PER_DAY_RANGE
    mean_nb_tx = lo + u[:, 3] * (hi - lo)
    return _CustomerArrays(xy=xy, mean_amount=mean_amount, std_amount=mean_amount / 2, mean_nb_tx_per_day=mean_nb_tx)


def _draw_terminals(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random((n, 2)) * GRID_SIZE


@dataclass(frozen=True)
class _TerminalLists:
    """Each customer's available terminals, CSR style: customer i uses flat[offsets[i]:offsets[i+1]]."""

    flat: np.ndarray
    offsets: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def terminals_within_radius(customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float) -> _TerminalLists:
    """Terminals at Euclidean distance strictly below ``radius`` of each customer, sorted by index."""
    from scipy.spatial import cKDTree

    n_customers = len(customer_xy)
    terminal_tree = cKDTree(terminal_xy)
    # Terminal indices fit int32 for any realistic size: half the memory of the largest array here.
    index_type = np.int32 if len(terminal_xy) < np.iinfo(np.int32).max else np.int64
    flats: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    # Customers in chunks: the (i, j, distance) pairs of one chunk at a time stay within memory.
    for lo in range(0, n_customers, _RADIUS_CHUNK):
        chunk = customer_xy[lo : lo + _RADIUS_CHUNK]
        pairs = cKDTree(chunk).sparse_distance_matrix(terminal_tree, radius, output_type="ndarray")
        # sparse_distance_matrix includes the boundary (<= r); the book uses a strict "< r".
        pairs = pairs[pairs["v"] < radius]
        order = np.lexsort((pairs["j"], pairs["i"]))
        flats.append(pairs["j"][order].astype(index_type))
        counts.append(np.bincount(pairs["i"][order].astype(np.int64), minlength=len(chunk)).astype(np.int64))
        del pairs, order
    flat = np.concatenate(flats) if flats else np.empty(0, dtype=index_type)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts) if counts else [])]).astype(np.int64)
    return _TerminalLists(flat=flat, offsets=offsets)


# ---------------------------------------------------------------------------------------------
# transactions
# ---------------------------------------------------------------------------------------------


@dataclass
class _TxArrays:
    customer: np.ndarray  # int64 customer index
    terminal: np.ndarray  # int64 terminal index
    time_seconds: np.ndarray  # int64 seconds since start date 00:00
    day: np.ndarray  # int64 day index
    amount: np.ndarray  # float64
    fraud: np.ndarray  # int8
    scenario: np.ndarray  # int8


def _round_amount(amount: np.ndarray) -> np.ndarray:
    return np.maximum(np.round(amount, 2), MIN_AMOUNT)


def _draw_day(
    customers: _CustomerArrays,
    terminals: _TerminalLists,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One day of transactions for all customers: (customer, terminal, time of day, amount)."""
    n_tx = rng.poisson(customers.mean_nb_tx_per_day)
    customer = np.repeat(np.arange(len(n_tx)), n_tx)
    time_of_day = np.trunc(rng.normal(TIME_OF_DAY_MEAN, TIME_OF_DAY_STD, size=customer.size))
    in_day = (time_of_day > 0) & (time_of_day < SECONDS_PER_DAY)
    n_available = terminals.counts[customer]
    keep = in_day & (n_available > 0)
    customer, time_of_day, n_available = customer[keep], time_of_day[keep].astype(np.int64), n_available[keep]

    mean = customers.mean_amount[customer]
    amount = rng.normal(mean, customers.std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    amount = _round_amount(amount)

    pick = rng.integers(0, n_available)
    terminal = terminals.flat[terminals.offsets[customer] + pick]
    return customer, terminal, time_of_day, amount


def _generate_transactions(
    config: SimulationConfig,
    customers: _CustomerArrays,
    terminals: _TerminalLists,
    rng: np.random.Generator,
    progress: ProgressCallback,
) -> _TxArrays:
    parts: list[tuple[np.ndarray, ...]] = []
    for day in range(config.n_days):
        customer, terminal, time_of_day, amount = _draw_day(customers, terminals, rng)
        parts.append((customer, terminal, time_of_day + day * SECONDS_PER_DAY, amount))
        progress("transactions", day + 1, config.n_days)
    customer = np.concatenate([p[0] for p in parts]).astype(np.int64)
    terminal = np.concatenate([p[1] for p in parts]).astype(np.int64)
    time_seconds = np.concatenate([p[2] for p in parts]).astype(np.int64)
    amount = np.concatenate([p[3] for p in parts]).astype(np.float64)
    no_fraud = np.zeros(time_seconds.size, dtype=np.int8)
    return _chronological(customer, terminal, time_seconds, amount, no_fraud, no_fraud)


def _chronological(
    customer: np.ndarray,
    terminal: np.ndarray,
    time_seconds: np.ndarray,
    amount: np.ndarray,
    fraud: np.ndarray,
    scenario: np.ndarray,
) -> _TxArrays:
    """The transactions in chronological order; a stable sort keeps ties in generation order
    (customer index, then anything appended later) so the result is deterministic."""
    order = np.argsort(time_seconds, kind="stable")
    return _TxArrays(
        customer=customer[order],
        terminal=terminal[order],
        time_seconds=time_seconds[order],
        day=time_seconds[order] // SECONDS_PER_DAY,
        amount=amount[order],
        fraud=fraud[order],
        scenario=scenario[order],
    )


# ---------------------------------------------------------------------------------------------
# fraud scenarios
# ---------------------------------------------------------------------------------------------


def _compromised_per_day(n_days: int, population: int, per_day: int, rng: np.random.Generator) -> np.ndarray:
    """(n_days, k) distinct random members per day, k = min(per_day, population)."""
    k = min(per_day, population)
    if n_days == 0:
        return np.empty((0, k), dtype=np.int64)
    return np.stack([rng.choice(population, size=k, replace=False) for _ in range(n_days)]).astype(np.int64)


def _apply_scenario_1(tx: _TxArrays) -> None:
    hit = tx.amount > SCENARIO_1_AMOUNT_THRESHOLD
    tx.fraud[hit] = 1
    tx.scenario[hit] = 1


def _apply_scenario_2(tx: _TxArrays, compromised: np.ndarray, horizon_days: int) -> np.ndarray:
    """Terminals compromised on day d make every transaction on days [d, d+28) fraud.

    Returns the (terminal, day) keys that were compromised (for inspection/tests)."""
    n_start_days, k = compromised.shape
    if n_start_days == 0 or tx.day.size == 0:
        return np.empty(0, dtype=np.int64)
    start = np.repeat(np.arange(n_start_days), k)
    terminal = compromised.reshape(-1)
    offsets = np.arange(SCENARIO_2_DURATION_DAYS)
    active_day = (start[:, None] + offsets[None, :]).reshape(-1)
    active_terminal = np.repeat(terminal, SCENARIO_2_DURATION_DAYS)
    valid = active_day < horizon_days
    keys = np.unique(active_terminal[valid] * horizon_days + active_day[valid])
    hit = np.isin(tx.terminal * horizon_days + tx.day, keys)
    tx.fraud[hit] = 1
    tx.scenario[hit] = 2
    return keys


def _apply_scenario_3(tx: _TxArrays, compromised: np.ndarray, horizon_days: int, rng: np.random.Generator) -> None:
    """On day d, ⌊n/3⌋ of the n transactions of that day's compromised customers on days
    [d, d+14) get amount x 5 and are fraud. A transaction picked on several days is multiplied
    each time, as in the book's loop."""
    n_start_days, k = compromised.shape
    if n_start_days == 0 or tx.day.size == 0:
        return
    # Transactions grouped by (customer, day), chronological inside a group.
    key = tx.customer * horizon_days + tx.day
    by_key = np.argsort(key, kind="stable")
    sorted_key = key[by_key]

    start_day = np.repeat(np.arange(n_start_days), k)
    customer = compromised.reshape(-1)
    lo = np.searchsorted(sorted_key, customer * horizon_days + start_day, side="left")
    end_day = np.minimum(start_day + SCENARIO_3_DURATION_DAYS, horizon_days)
    hi = np.searchsorted(sorted_key, customer * horizon_days + end_day, side="left")
    lengths = hi - lo
    # Expand the [lo, hi) ranges: candidate rows and the compromise day each belongs to.
    total = int(lengths.sum())
    if total == 0:
        return
    range_start = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    candidate = by_key[range_start + np.arange(total)]
    group = np.repeat(start_day, lengths)

    # Per compromise day, a uniform random subset of size ⌊n/3⌋: rank candidates by a random key.
    group_size = np.bincount(group, minlength=n_start_days)
    n_picked = group_size // 3
    priority = rng.random(total)
    order = np.lexsort((priority, group))
    group_sorted = group[order]
    first_of_group = np.concatenate([[0], np.cumsum(group_size)[:-1]])
    rank = np.arange(total) - first_of_group[group_sorted]
    picked = candidate[order][rank < n_picked[group_sorted]]

    times_picked = np.bincount(picked, minlength=tx.day.size)
    hit = times_picked > 0
    tx.amount[hit] = np.round(tx.amount[hit] * SCENARIO_3_AMOUNT_FACTOR ** times_picked[hit], 2)
    tx.fraud[hit] = 1
    tx.scenario[hit] = 3


def _add_frauds(
    tx: _TxArrays, config: SimulationConfig, rng: np.random.Generator, progress: ProgressCallback
) -> tuple[np.ndarray, np.ndarray]:
    """Label frauds in place; returns the (start days, k) compromised terminals and customers."""
    # The book loops over range(TX_TIME_DAYS.max()): no compromise starts on the last observed day.
    n_start_days = int(tx.day.max()) if tx.day.size else 0
    _apply_scenario_1(tx)
    progress("frauds", 1, 3)
    terminals = _compromised_per_day(n_start_days, config.n_terminals, SCENARIO_2_TERMINALS_PER_DAY, rng)
    _apply_scenario_2(tx, terminals, config.n_days)
    progress("frauds", 2, 3)
    customers = _compromised_per_day(n_start_days, config.n_customers, SCENARIO_3_CUSTOMERS_PER_DAY, rng)
    _apply_scenario_3(tx, customers, config.n_days, rng)
    progress("frauds", 3, 3)
    return terminals, customers


def _add_card_testing(tx: _TxArrays, config: SimulationConfig, rng: np.random.Generator) -> _TxArrays:
    """Scenario 4: on each day, `card_testing_per_day` random cards are used by a fraudster in a
    burst - small purchases at random terminals seconds to minutes apart, then a large one - all
    labelled fraud (scenario 4). Returns the arrays with the bursts added, in time order."""
    parts: list[tuple[np.ndarray, ...]] = []
    for day in range(config.n_days):
        parts.extend(_card_testing_day(day, config, rng))
    return _with_card_testing(tx, parts)


def _card_testing_rng(config: SimulationConfig) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(config.seed), spawn_key=(_CARD_TESTING_STREAM,)))


def _card_testing_day(day: int, config: SimulationConfig, rng: np.random.Generator) -> list[tuple[np.ndarray, ...]]:
    """The bursts of one day, (customer, terminal, time, amount) per stolen card, in draw order."""
    k = min(config.card_testing_per_day, config.n_customers)
    parts: list[tuple[np.ndarray, ...]] = []
    for card in rng.choice(config.n_customers, size=k, replace=False):
        n_small = int(rng.integers(CARD_TESTING_SMALL_TX[0], CARD_TESTING_SMALL_TX[1] + 1))
        gaps = rng.integers(CARD_TESTING_GAP_SECONDS[0], CARD_TESTING_GAP_SECONDS[1] + 1, size=n_small)
        start = day * SECONDS_PER_DAY + int(rng.integers(0, SECONDS_PER_DAY - int(gaps.sum()) - 1))
        times = start + np.concatenate([[0], np.cumsum(gaps)])
        amounts = np.concatenate(
            [rng.uniform(*CARD_TESTING_SMALL_AMOUNT, size=n_small), [rng.uniform(*CARD_TESTING_LARGE_AMOUNT)]]
        )
        terminals = rng.integers(0, config.n_terminals, size=n_small + 1)
        parts.append((np.full(n_small + 1, card), terminals, times, _round_amount(amounts)))
    return parts


def _with_card_testing(tx: _TxArrays, parts: list[tuple[np.ndarray, ...]]) -> _TxArrays:
    if not parts:
        return tx
    customer = np.concatenate([tx.customer, *(p[0] for p in parts)]).astype(np.int64)
    terminal = np.concatenate([tx.terminal, *(p[1] for p in parts)]).astype(np.int64)
    time_seconds = np.concatenate([tx.time_seconds, *(p[2] for p in parts)]).astype(np.int64)
    amount = np.concatenate([tx.amount, *(p[3] for p in parts)]).astype(np.float64)
    added = time_seconds.size - tx.time_seconds.size
    fraud = np.concatenate([tx.fraud, np.ones(added, dtype=np.int8)])
    scenario = np.concatenate([tx.scenario, np.full(added, SCENARIO_CARD_TESTING, dtype=np.int8)])
    return _chronological(customer, terminal, time_seconds, amount, fraud, scenario)


def _schedule_frame(id_column: str, days: Any, ids: Any) -> pd.DataFrame:
    return pd.DataFrame({"tx_time_days": np.asarray(days, dtype=np.int64), id_column: pd.Series(ids, dtype=object)})


def _schedule(compromised: np.ndarray, id_column: str, key: Callable[[int], str]) -> pd.DataFrame:
    n_start_days, k = compromised.shape
    days = np.repeat(np.arange(n_start_days), k)
    return _schedule_frame(id_column, days, [key(int(i)) for i in compromised.reshape(-1)])


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _prefixed_keys(prefix: str, width: int, index: np.ndarray) -> pa.Array:
    """Vectorised ``f"{prefix}{i:0{width}d}"``."""
    digits = pc.utf8_lpad(pc.cast(pa.array(index, type=pa.int64()), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


@dataclass(frozen=True)
class _EntityKeys:
    """The string keys of every customer and terminal, built once per simulation."""

    customers: pa.Array
    terminals: pa.Array

    @classmethod
    def of(cls, config: SimulationConfig) -> _EntityKeys:
        return cls(
            customers=_prefixed_keys("C", 7, np.arange(config.n_customers)),
            terminals=_prefixed_keys("T", 7, np.arange(config.n_terminals)),
        )


def _transaction_table(
    tx: _TxArrays, config: SimulationConfig, keys: _EntityKeys | None = None, first_id: int = 0
) -> pa.Table:
    """The transactions as an Arrow table; ids count from ``first_id`` (the rows of earlier days)."""
    n = tx.day.size
    keys = keys or _EntityKeys.of(config)
    ids = _prefixed_keys("TX", 10, np.arange(first_id, first_id + n))
    last = first_id + n - 1
    if n and (ids[0].as_py() != transaction_key(first_id) or ids[n - 1].as_py() != transaction_key(last)):
        raise RuntimeError("vectorised transaction ids disagree with fraud.schema.transaction_key")
    if keys.customers[-1].as_py() != customer_key(len(keys.customers) - 1) or keys.terminals[
        -1
    ].as_py() != terminal_key(len(keys.terminals) - 1):
        raise RuntimeError("vectorised entity keys disagree with fraud.schema")
    start = np.datetime64(config.start_date.isoformat(), "us")
    datetimes = start + tx.time_seconds.astype("timedelta64[s]").astype("timedelta64[us]")
    columns = {
        TRANSACTION_ID: ids,
        TX_DATETIME: pa.array(datetimes, type=pa.timestamp("us")),
        CUSTOMER_ID: keys.customers.take(pa.array(tx.customer)),
        TERMINAL_ID: keys.terminals.take(pa.array(tx.terminal)),
        TX_AMOUNT: pa.array(tx.amount, type=pa.float64()),
        "tx_time_seconds": pa.array(tx.time_seconds, type=pa.int64()),
        "tx_time_days": pa.array(tx.day, type=pa.int64()),
        TX_FRAUD: pa.array(tx.fraud, type=pa.int8()),
        TX_FRAUD_SCENARIO: pa.array(tx.scenario, type=pa.int8()),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=RAW_TRANSACTION_SCHEMA)


def _customer_frame(
    config: SimulationConfig, customers: _CustomerArrays, terminals: _TerminalLists, rng: np.random.Generator
) -> pd.DataFrame:
    n = config.n_customers
    lo, hi = CUSTOMER_AGE_RANGE
    age = rng.integers(lo, hi + 1, size=n)
    # The account was opened on a day before the start date, while the customer was an adult,
    # at most MAX_ACCOUNT_AGE_YEARS earlier.
    adult_days = np.minimum(age - lo, MAX_ACCOUNT_AGE_YEARS) * 365
    days_before = 1 + np.floor(rng.random(n) * np.maximum(adult_days, 1)).astype(np.int64)
    open_date = np.datetime64(config.start_date.isoformat(), "D") - days_before.astype("timedelta64[D]")
    frame = pd.DataFrame(
        {
            CUSTOMER_ID: [customer_key(i) for i in range(n)],
            "x_customer_id": customers.xy[:, 0],
            "y_customer_id": customers.xy[:, 1],
            "mean_amount": customers.mean_amount,
            "std_amount": customers.std_amount,
            "mean_nb_tx_per_day": customers.mean_nb_tx_per_day,
            "age": age.astype(np.int16),
            "account_open_date": pd.Series(open_date).dt.date,
            "nb_available_terminals": terminals.counts.astype(np.int32),
        }
    )
    return frame


def _terminal_frame(config: SimulationConfig, terminal_xy: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    categories = np.array(MERCHANT_CATEGORIES, dtype=object)
    return pd.DataFrame(
        {
            TERMINAL_ID: [terminal_key(i) for i in range(config.n_terminals)],
            "x_terminal_id": terminal_xy[:, 0],
            "y_terminal_id": terminal_xy[:, 1],
            "merchant_category": categories[rng.integers(0, len(categories), size=config.n_terminals)],
        }
    )


def simulate(config: SimulationConfig | None = None, progress: ProgressCallback | None = None) -> SimulatedData:
    """Run the book's generative process; the same config always gives the same data."""
    config = config or SimulationConfig()
    report = progress or _no_progress
    streams = _Streams.from_seed(int(config.seed))
    customers = _draw_customers(config.n_customers, streams.customers)
    terminal_xy = _draw_terminals(config.n_terminals, streams.terminals)
    available = terminals_within_radius(customers.xy, terminal_xy, float(config.radius))
    tx = _generate_transactions(config, customers, available, streams.transactions, report)
    compromised_terminals, compromised_customers = _add_frauds(tx, config, streams.frauds, report)
    if config.card_testing_per_day:
        tx = _add_card_testing(tx, config, _card_testing_rng(config))
    transactions = _transaction_table(tx, config).to_pandas()
    return SimulatedData(
        transactions=transactions,
        customers=_customer_frame(config, customers, available, streams.attributes),
        terminals=_terminal_frame(config, terminal_xy, streams.attributes),
        config=config,
        compromised_terminals=_schedule(compromised_terminals, TERMINAL_ID, terminal_key),
        compromised_customers=_schedule(compromised_customers, CUSTOMER_ID, customer_key),
    )


# ---------------------------------------------------------------------------------------------
# streaming: simulate and write day by day
# ---------------------------------------------------------------------------------------------


@dataclass
class _PendingDay:
    """One generated day, held until every scenario-3 compromise that reaches it has been drawn."""

    index: int
    tx: _TxArrays
    times_picked: np.ndarray


@dataclass
class _StreamCounts:
    n_transactions: int = 0
    n_fraud: int = 0
    by_scenario: dict[int, int] = field(default_factory=dict)
    last_day_with_transactions: int = -1


def simulate_to(
    config: SimulationConfig | None = None,
    out_dir: Path | str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Simulate and write the dataset day by day; returns the manifest's summary.

    The files are byte-identical to ``write_dataset(simulate(config), out_dir)``, but only a
    window of ``SCENARIO_3_DURATION_DAYS`` days of transactions is in memory at any time (a
    day's final amounts depend on the compromised customers of the 13 days before and the
    scenario-3 draws of the 13 days after), so the memory does not grow with the number of days.
    Written atomically like :func:`write_dataset`.
    """
    config = config or SimulationConfig()
    report = progress or _no_progress
    if out_dir is None:
        raise UserError("simulate_to needs an output folder")
    out_dir = check_output_dir(Path(out_dir), overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out_dir.parent}: {exc.strerror or exc}") from None
    # The book draws compromises for range(last day with a transaction); that is the last
    # simulated day unless it is empty (tiny populations only): then run again with the right count.
    n_start_days = int(config.n_days) - 1
    while True:
        tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
        try:
            summary, last_day = _stream_into(config, tmp_dir, n_start_days, report)
            if max(last_day, 0) != n_start_days:
                n_start_days = max(last_day, 0)
                shutil.rmtree(tmp_dir, ignore_errors=True)
                continue
            _swap_into_place(tmp_dir, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return summary


def _stream_into(
    config: SimulationConfig, tmp_dir: Path, n_start_days: int, report: ProgressCallback
) -> tuple[dict[str, Any], int]:
    streams = _Streams.from_seed(int(config.seed))
    customers = _draw_customers(config.n_customers, streams.customers)
    terminal_xy = _draw_terminals(config.n_terminals, streams.terminals)
    available = terminals_within_radius(customers.xy, terminal_xy, float(config.radius))
    n_days = int(config.n_days)
    compromised_terminals = _compromised_per_day(
        n_start_days, config.n_terminals, SCENARIO_2_TERMINALS_PER_DAY, streams.frauds
    )
    compromised_customers = _compromised_per_day(
        n_start_days, config.n_customers, SCENARIO_3_CUSTOMERS_PER_DAY, streams.frauds
    )
    card_testing = _card_testing_rng(config) if config.card_testing_per_day else None
    keys = _EntityKeys.of(config)
    tx_root = tmp_dir / "transactions"
    tx_root.mkdir(parents=True)
    counts = _StreamCounts()
    pending: deque[_PendingDay] = deque()
    resolved = 0  # scenario-3 compromise days whose picks are drawn

    def flush(day: _PendingDay) -> None:
        tx = day.tx
        hit = day.times_picked > 0
        tx.amount[hit] = np.round(tx.amount[hit] * SCENARIO_3_AMOUNT_FACTOR ** day.times_picked[hit], 2)
        tx.fraud[hit] = 1
        tx.scenario[hit] = 3
        if card_testing is not None:
            tx = _with_card_testing(tx, _card_testing_day(day.index, config, card_testing))
        table = _transaction_table(tx, config, keys, first_id=counts.n_transactions)
        day_dir = tx_root / f"{DAY_PARTITION}={(config.start_date + timedelta(days=day.index)).isoformat()}"
        day_dir.mkdir()
        _write_parquet(table, day_dir / PART_FILE_NAME)
        counts.n_transactions += tx.day.size
        counts.n_fraud += int(tx.fraud.sum())
        for scenario, n in zip(*np.unique(tx.scenario, return_counts=True), strict=True):
            counts.by_scenario[int(scenario)] = counts.by_scenario.get(int(scenario), 0) + int(n)
        report("write", day.index + 1, n_days)

    for index in range(n_days):
        tx = _draw_tx_day(index, customers, available, streams.transactions)
        _label_scenarios_1_2(tx, index, compromised_terminals)
        if tx.day.size:
            counts.last_day_with_transactions = index
        pending.append(_PendingDay(index, tx, np.zeros(tx.day.size, dtype=np.int64)))
        report("transactions", index + 1, n_days)
        while resolved < n_start_days and min(resolved + SCENARIO_3_DURATION_DAYS, n_days) - 1 <= index:
            _pick_scenario_3(resolved, compromised_customers[resolved], pending, n_days, streams.frauds)
            resolved += 1
        while pending and resolved >= min(pending[0].index + 1, n_start_days):
            flush(pending.popleft())
    while pending:
        flush(pending.popleft())

    n_rows = counts.n_transactions
    scenarios = (1, 2, 3, SCENARIO_CARD_TESTING) if config.card_testing_per_day else (1, 2, 3)
    summary = {
        "n_transactions": n_rows,
        "n_fraud": counts.n_fraud,
        "fraud_rate": (counts.n_fraud / n_rows) if n_rows else 0.0,
        "fraud_by_scenario": {str(k): counts.by_scenario.get(k, 0) for k in scenarios},
        "n_customers": int(config.n_customers),
        "n_terminals": int(config.n_terminals),
        "n_customers_without_terminal": int((available.counts == 0).sum()),
        "first_day": config.start_date.isoformat(),
        "last_day": config.end_date.isoformat(),
    }
    customer_frame = _customer_frame(config, customers, available, streams.attributes)
    terminal_frame = _terminal_frame(config, terminal_xy, streams.attributes)
    _write_profiles_and_manifest(tmp_dir, config, customer_frame, terminal_frame, summary)
    return summary, counts.last_day_with_transactions


def _draw_tx_day(
    index: int, customers: _CustomerArrays, terminals: _TerminalLists, rng: np.random.Generator
) -> _TxArrays:
    """Day ``index`` of the book's process, chronological (as :func:`_generate_transactions` sorts it)."""
    customer, terminal, time_of_day, amount = _draw_day(customers, terminals, rng)
    time_seconds = (time_of_day + index * SECONDS_PER_DAY).astype(np.int64)
    no_fraud = np.zeros(time_seconds.size, dtype=np.int8)
    return _chronological(
        customer.astype(np.int64),
        terminal.astype(np.int64),
        time_seconds,
        amount.astype(np.float64),
        no_fraud,
        no_fraud,
    )


def _label_scenarios_1_2(tx: _TxArrays, index: int, compromised_terminals: np.ndarray) -> None:
    """Scenarios 1 and 2 on one day: terminals compromised on days (index - 28, index] are active."""
    _apply_scenario_1(tx)
    first = max(0, index - SCENARIO_2_DURATION_DAYS + 1)
    active = compromised_terminals[first : index + 1].reshape(-1)
    if active.size and tx.day.size:
        hit = np.isin(tx.terminal, active)
        tx.fraud[hit] = 1
        tx.scenario[hit] = 2


def _pick_scenario_3(
    start_day: int,
    customers: np.ndarray,
    pending: deque[_PendingDay],
    n_days: int,
    rng: np.random.Generator,
) -> None:
    """The picks of the customers compromised on ``start_day``, in the order of
    :func:`_apply_scenario_3` (customer, then day, then time), with the same random draws."""
    end_day = min(start_day + SCENARIO_3_DURATION_DAYS, n_days)
    window = [day for day in pending if start_day <= day.index < end_day]
    owners: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for customer in customers:
        for position, day in enumerate(window):
            found = np.flatnonzero(day.tx.customer == customer)
            owners.append(np.full(found.size, position, dtype=np.int64))
            rows.append(found)
    owner = np.concatenate(owners) if owners else np.empty(0, dtype=np.int64)
    row = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    total = row.size
    if total == 0:
        return
    priority = rng.random(total)
    picked = np.argsort(priority, kind="stable")[: total // 3]
    for position, day in enumerate(window):
        chosen = row[picked[owner[picked] == position]]
        day.times_picked[chosen] += 1


# ---------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------


def _to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    return table.replace_schema_metadata(None)


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, **_PARQUET_OPTIONS)


def check_output_dir(out_dir: Path, overwrite: bool) -> Path:
    """Fail early (UserError) if ``out_dir`` cannot receive a dataset; returns the resolved path."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output {out_dir} already exists and is not empty; pass --overwrite to replace it")
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"output path {out_dir} is not writable: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output path {out_dir} is not writable: no write permission on {ancestor}")
    return out_dir


def write_dataset(
    data: SimulatedData,
    out_dir: Path | str,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write ``data`` below ``out_dir`` (the ``raw`` folder) atomically.

    Layout: ``transactions/day=YYYY-MM-DD/part-0.parquet`` (one file per simulated day, empty days
    included), ``customers.parquet``, ``terminals.parquet``, ``_SUCCESS.json``. Everything is written
    into a temporary sibling folder which is then renamed into place; an existing dataset is
    replaced only with ``overwrite`` and only once the new one is complete.
    """
    report = progress or _no_progress
    out_dir = check_output_dir(Path(out_dir), overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out_dir.parent}: {exc.strerror or exc}") from None
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_into(data, tmp_dir, report)
        _swap_into_place(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _write_into(data: SimulatedData, tmp_dir: Path, report: ProgressCallback) -> None:
    config = data.config
    tx_root = tmp_dir / "transactions"
    tx_root.mkdir(parents=True)
    table = _to_arrow(data.transactions, RAW_TRANSACTION_SCHEMA)
    days = table.column("tx_time_days").to_numpy()
    if days.size and np.any(np.diff(days) < 0):
        raise ValueError("transactions must be sorted chronologically before writing")
    bounds = np.searchsorted(days, np.arange(config.n_days + 1), side="left")
    for day in range(config.n_days):
        day_dir = tx_root / f"{DAY_PARTITION}={(config.start_date + timedelta(days=day)).isoformat()}"
        day_dir.mkdir()
        lo, hi = int(bounds[day]), int(bounds[day + 1])
        _write_parquet(table.slice(lo, hi - lo), day_dir / PART_FILE_NAME)
        report("write", day + 1, config.n_days)
    _write_profiles_and_manifest(tmp_dir, config, data.customers, data.terminals, data.summary())


def _write_profiles_and_manifest(
    tmp_dir: Path, config: SimulationConfig, customers: pd.DataFrame, terminals: pd.DataFrame, summary: dict[str, Any]
) -> None:
    _write_parquet(_to_arrow(customers, CUSTOMER_PROFILE_SCHEMA), tmp_dir / "customers.parquet")
    _write_parquet(_to_arrow(terminals, TERMINAL_PROFILE_SCHEMA), tmp_dir / "terminals.parquet")
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "fraud.simulator (Fraud Detection Handbook ch. 3.2)",
        "parameters": config.to_json_dict(),
        **summary,
        "partitioning": {"column": DAY_PARTITION, "flavor": "hive", "file": PART_FILE_NAME},
    }
    (tmp_dir / SUCCESS_FILE_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _swap_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:  # written while we were simulating
        raise UserError(f"output {out_dir} already exists and is not empty; pass --overwrite to replace it")
    atomic.replace_dir(tmp_dir, out_dir)


def _as_datetime(value: date | datetime | str, name: str) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise UserError(f"{name} must be an ISO date or datetime, got {value!r}") from None


def read_transactions(
    raw_dir: Path | str,
    start: date | datetime | str | None = None,
    end: date | datetime | str | None = None,
) -> pd.DataFrame:
    """Read simulated transactions with ``start <= tx_datetime < end`` (either bound optional).

    Dates mean midnight. Only the needed day partitions are opened. Returns exactly the columns of
    RAW_TRANSACTION_SCHEMA, in chronological (= transaction id) order.
    """
    tx_dir = Path(raw_dir) / "transactions"
    if not tx_dir.is_dir():
        raise UserError(f"no simulated transactions in {raw_dir} (missing {tx_dir}); run `fraud simulate` first")
    partitioning = ds.partitioning(pa.schema([(DAY_PARTITION, pa.date32())]), flavor="hive")
    dataset = ds.dataset(
        tx_dir,
        format="parquet",
        partitioning=partitioning,
        schema=RAW_TRANSACTION_SCHEMA.append(pa.field(DAY_PARTITION, pa.date32())),
    )
    condition: ds.Expression | None = None
    if start is not None:
        lower = _as_datetime(start, "start")
        part = ds.field(DAY_PARTITION) >= pa.scalar(lower.date(), pa.date32())
        row = ds.field(TX_DATETIME) >= pa.scalar(lower, pa.timestamp("us"))
        condition = part & row
    if end is not None:
        upper = _as_datetime(end, "end")
        part = ds.field(DAY_PARTITION) <= pa.scalar(upper.date(), pa.date32())
        row = ds.field(TX_DATETIME) < pa.scalar(upper, pa.timestamp("us"))
        condition = (part & row) if condition is None else (condition & part & row)
    table = dataset.to_table(columns=RAW_TRANSACTION_SCHEMA.names, filter=condition)
    table = table.sort_by([(TX_DATETIME, "ascending"), (TRANSACTION_ID, "ascending")])
    return table.to_pandas()


def read_customers(raw_dir: Path | str) -> pd.DataFrame:
    """The customer profile table written by :func:`write_dataset`."""
    return _read_profile(Path(raw_dir) / "customers.parquet")


def read_terminals(raw_dir: Path | str) -> pd.DataFrame:
    """The terminal profile table written by :func:`write_dataset`."""
    return _read_profile(Path(raw_dir) / "terminals.parquet")


def read_manifest(raw_dir: Path | str) -> dict[str, Any]:
    """The ``_SUCCESS.json`` of a complete dataset (parameters and counts)."""
    path = Path(raw_dir) / SUCCESS_FILE_NAME
    if not path.is_file():
        raise UserError(f"no complete simulated dataset in {raw_dir} (missing {SUCCESS_FILE_NAME})")
    return json.loads(path.read_text())


def _read_profile(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"missing {path}; run `fraud simulate` first")
    return pq.read_table(path).to_pandas()
