"""Offline feature tables: DuckDB against a plain-pandas reference and hand-computed values.

The reference implementation below is written straight from the docstring of
`fraud.features.definitions` (a brute-force sum over the days of each window), so a one-day shift
of any window in the DuckDB SQL makes `test_duckdb_tables_equal_pandas_reference` fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraud.config import DataLayout
from fraud.errors import UserError
from fraud.features.definitions import (
    CARD_RECENT_VIEW,
    CUSTOMER_SPENDING_FEATURES,
    CUSTOMER_WINDOWS_DAYS,
    LABEL_DELAY_DAYS,
    SNAPSHOT_TIMESTAMP,
    TERMINAL_RECENT_VIEW,
    TERMINAL_RISK_FEATURES,
    TERMINAL_WINDOWS_DAYS,
)
from fraud.features.offline import (
    EVENT_TIMESTAMP,
    LABELLED_TRANSACTION_COLUMNS,
    build_offline_features,
    customer_features_path,
    labelled_transactions,
    read_feature_table,
    terminal_features_path,
)
from fraud.features.velocity_offline import recent_state_path, velocity_features_path
from fraud.schema import RAW_TRANSACTION_SCHEMA

# --- raw data helpers (also used by test_feature_store.py) ----------------------------------------


def raw_frame(rows: list[tuple[str, str, str, float, int]]) -> pd.DataFrame:
    """Raw transactions from (timestamp, customer, terminal, amount, fraud) tuples."""
    frame = pd.DataFrame(rows, columns=["tx_datetime", "customer_id", "terminal_id", "tx_amount", "tx_fraud"])
    frame["tx_datetime"] = pd.to_datetime(frame["tx_datetime"])
    return frame


def write_raw_transactions(layout: DataLayout, frame: pd.DataFrame) -> pd.DataFrame:
    """Write transactions in the simulator's layout (one Parquet file per day partition) and return
    them completed with every column of RAW_TRANSACTION_SCHEMA."""
    frame = frame.sort_values("tx_datetime", kind="stable").reset_index(drop=True).copy()
    start = frame["tx_datetime"].min().normalize()
    frame["transaction_id"] = [f"TX{i:010d}" for i in range(len(frame))]
    elapsed = (frame["tx_datetime"] - start).dt.total_seconds().astype("int64")
    frame["tx_time_seconds"] = elapsed
    frame["tx_time_days"] = elapsed // 86_400
    frame["tx_fraud"] = frame["tx_fraud"].astype("int8")
    frame["tx_fraud_scenario"] = np.where(frame["tx_fraud"] == 1, 1, 0).astype("int8")
    frame["tx_datetime"] = frame["tx_datetime"].astype("datetime64[us]")
    frame = frame[RAW_TRANSACTION_SCHEMA.names]
    for day, part in frame.groupby(frame["tx_datetime"].dt.date):
        folder = layout.transactions / f"day={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(part, schema=RAW_TRANSACTION_SCHEMA, preserve_index=False)
        pq.write_table(table, folder / "part-0.parquet")
    return frame


def random_transactions(seed: int, n_customers: int = 25, n_terminals: int = 20, n_days: int = 45) -> pd.DataFrame:
    """Random transactions with gaps, late-starting entities, frauds and exact day-boundary times."""
    rng = np.random.default_rng(seed)
    start = datetime(2024, 2, 20)  # crosses 29 February and a month end
    rows = []
    for c in range(n_customers):
        first_day = int(rng.integers(0, n_days // 2))
        for day in range(first_day, n_days):
            if rng.random() < 0.35:  # zero-activity days
                continue
            for _ in range(int(rng.integers(1, 4))):
                second = int(rng.choice([0, 86_399, int(rng.integers(0, 86_400))]))
                rows.append(
                    (
                        start + timedelta(days=day, seconds=second),
                        f"C{c:07d}",
                        f"T{int(rng.integers(0, n_terminals)):07d}",
                        float(np.round(rng.gamma(2.0, 25.0), 2)),
                        int(rng.random() < 0.15),
                    )
                )
    return raw_frame(rows)


# --- pandas reference ------------------------------------------------------------------------------


def _days(series: pd.Series) -> np.ndarray:
    return (series.dt.floor("D") - pd.Timestamp("1970-01-01")).dt.days.to_numpy()


def reference_tables(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Brute force, straight from the definitions: for every entity and every day D from its first
    activity day through (last transaction day + 1), sum over the days of each window."""
    raw = raw.assign(day=_days(raw["tx_datetime"]))
    last_snapshot = int(raw["day"].max()) + 1
    customers, terminals = [], []
    for customer, group in raw.groupby("customer_id"):
        for d in range(int(group["day"].min()), last_snapshot + 1):
            row = {"customer_id": customer, SNAPSHOT_TIMESTAMP: pd.Timestamp("1970-01-01") + pd.Timedelta(days=d)}
            for w in CUSTOMER_WINDOWS_DAYS:
                inside = group[(group["day"] >= d - w) & (group["day"] <= d - 1)]
                row[f"customer_nb_tx_{w}d"] = len(inside)
                row[f"customer_sum_amount_{w}d"] = float(inside["tx_amount"].sum())
            customers.append(row)
    for terminal, group in raw.groupby("terminal_id"):
        for d in range(int(group["day"].min()), last_snapshot + 1):
            row = {"terminal_id": terminal, SNAPSHOT_TIMESTAMP: pd.Timestamp("1970-01-01") + pd.Timedelta(days=d)}
            for w in TERMINAL_WINDOWS_DAYS:
                inside = group[(group["day"] >= d - LABEL_DELAY_DAYS - w) & (group["day"] <= d - LABEL_DELAY_DAYS - 1)]
                nb_tx, nb_fraud = len(inside), int(inside["tx_fraud"].sum())
                row[f"terminal_nb_tx_{w}d"] = nb_tx
                row[f"terminal_nb_fraud_{w}d"] = nb_fraud
                row[f"terminal_risk_{w}d"] = nb_fraud / nb_tx if nb_tx else 0.0
            terminals.append(row)
    customer_table = pd.DataFrame(customers)[["customer_id", SNAPSHOT_TIMESTAMP, *CUSTOMER_SPENDING_FEATURES]]
    terminal_table = pd.DataFrame(terminals)[["terminal_id", SNAPSHOT_TIMESTAMP, *TERMINAL_RISK_FEATURES]]
    return customer_table, terminal_table


def _sorted(frame: pd.DataFrame, entity: str) -> pd.DataFrame:
    frame = frame.sort_values([entity, SNAPSHOT_TIMESTAMP]).reset_index(drop=True)
    frame[SNAPSHOT_TIMESTAMP] = pd.to_datetime(frame[SNAPSHOT_TIMESTAMP]).astype("datetime64[us]")
    return frame


def _row(table: pd.DataFrame, entity: str, key: str, day: str) -> pd.Series:
    match = table[(table[entity] == key) & (table[SNAPSHOT_TIMESTAMP] == pd.Timestamp(day))]
    assert len(match) == 1, f"expected one snapshot of {key} on {day}, got {len(match)}"
    return match.iloc[0]


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_duckdb_tables_equal_pandas_reference(data_dir: Path, seed: int) -> None:
    layout = DataLayout.current()
    raw = write_raw_transactions(layout, random_transactions(seed))
    result = build_offline_features(layout)
    expected_customers, expected_terminals = reference_tables(raw)

    customers = _sorted(read_feature_table(result.customer.path), "customer_id")
    terminals = _sorted(read_feature_table(result.terminal.path), "terminal_id")
    expected_customers = _sorted(expected_customers, "customer_id")
    expected_terminals = _sorted(expected_terminals, "terminal_id")

    assert list(customers.columns) == ["customer_id", SNAPSHOT_TIMESTAMP, *CUSTOMER_SPENDING_FEATURES]
    assert list(terminals.columns) == ["terminal_id", SNAPSHOT_TIMESTAMP, *TERMINAL_RISK_FEATURES]
    pd.testing.assert_frame_equal(customers, expected_customers, check_dtype=False, rtol=1e-12, atol=1e-9)
    pd.testing.assert_frame_equal(terminals, expected_terminals, check_dtype=False, rtol=1e-12, atol=1e-12)
    assert result.transactions == len(raw)
    assert result.customer.rows == len(expected_customers)
    assert result.terminal.rows == len(expected_terminals)
    assert result.last_day == raw["tx_datetime"].max().date()


@pytest.fixture
def hand_made(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A dataset small enough to compute every expected value by hand (see the tests below)."""
    rows = [
        # customer C1 on terminal T1: two on 1 Jan (last one at 23:59:59), one at 2 Jan 00:00:00, one on 5 Jan
        ("2024-01-01 10:00:00", "C1", "T1", 10.0, 1),
        ("2024-01-01 23:59:59", "C1", "T1", 20.0, 0),
        ("2024-01-02 00:00:00", "C1", "T9", 5.0, 0),
        ("2024-01-03 12:00:00", "C1", "T1", 7.0, 0),
        ("2024-01-05 08:00:00", "C1", "T9", 100.0, 0),
        # the dataset's last transaction day is 20 Jan
        ("2024-01-20 09:30:00", "C2", "T2", 42.0, 1),
    ]
    layout = DataLayout.current()
    write_raw_transactions(layout, raw_frame(rows))
    result = build_offline_features(layout)
    return read_feature_table(result.customer.path), read_feature_table(result.terminal.path)


def test_customer_windows_cover_complete_previous_days(hand_made) -> None:
    customers, _ = hand_made
    first = _row(customers, "customer_id", "C1", "2024-01-01")  # nothing before the first day
    assert [first[c] for c in CUSTOMER_SPENDING_FEATURES] == [0, 0.0, 0, 0.0, 0, 0.0]
    jan2 = _row(customers, "customer_id", "C1", "2024-01-02")  # 1 Jan: 10 + 20 (23:59:59 included)
    assert (jan2["customer_nb_tx_1d"], jan2["customer_sum_amount_1d"]) == (2, 30.0)
    jan3 = _row(customers, "customer_id", "C1", "2024-01-03")  # 2 Jan 00:00:00 belongs to 2 Jan
    assert (jan3["customer_nb_tx_1d"], jan3["customer_sum_amount_1d"]) == (1, 5.0)
    assert (jan3["customer_nb_tx_7d"], jan3["customer_sum_amount_7d"]) == (3, 35.0)
    jan5 = _row(customers, "customer_id", "C1", "2024-01-05")  # 4 Jan had no activity
    assert (jan5["customer_nb_tx_1d"], jan5["customer_sum_amount_1d"]) == (0, 0.0)
    assert (jan5["customer_nb_tx_7d"], jan5["customer_sum_amount_7d"]) == (4, 42.0)
    jan8 = _row(customers, "customer_id", "C1", "2024-01-08")  # 7d = 1..7 Jan
    assert (jan8["customer_nb_tx_7d"], jan8["customer_sum_amount_7d"]) == (5, 142.0)
    jan9 = _row(customers, "customer_id", "C1", "2024-01-09")  # 7d = 2..8 Jan: 1 Jan left the window
    assert (jan9["customer_nb_tx_7d"], jan9["customer_sum_amount_7d"]) == (3, 112.0)
    assert (jan9["customer_nb_tx_30d"], jan9["customer_sum_amount_30d"]) == (5, 142.0)


def test_one_row_per_entity_day_through_the_day_after_the_last_transaction(hand_made) -> None:
    customers, terminals = hand_made
    c1 = customers[customers["customer_id"] == "C1"][SNAPSHOT_TIMESTAMP]
    assert list(c1.sort_values()) == list(pd.date_range("2024-01-01", "2024-01-21", freq="D"))
    c2 = customers[customers["customer_id"] == "C2"][SNAPSHOT_TIMESTAMP]
    assert list(c2.sort_values()) == [pd.Timestamp("2024-01-20"), pd.Timestamp("2024-01-21")]
    last = _row(customers, "customer_id", "C2", "2024-01-21")  # "today's" snapshot after the last day
    assert (last["customer_nb_tx_1d"], last["customer_sum_amount_1d"]) == (1, 42.0)
    assert not customers.duplicated(["customer_id", SNAPSHOT_TIMESTAMP]).any()
    assert not terminals.duplicated(["terminal_id", SNAPSHOT_TIMESTAMP]).any()
    assert set(terminals["terminal_id"]) == {"T1", "T2", "T9"}
    assert (terminals[SNAPSHOT_TIMESTAMP] == terminals[SNAPSHOT_TIMESTAMP].dt.normalize()).all()


def test_terminal_risk_waits_for_the_label_delay(hand_made) -> None:
    _, terminals = hand_made
    # T1: 1 Jan 2 tx (1 fraud), 3 Jan 1 tx (0 fraud). The 1-day window of day D is day D-8.
    jan8 = _row(terminals, "terminal_id", "T1", "2024-01-08")  # day D-8 = 31 Dec: no transaction
    assert [jan8[f"terminal_nb_tx_{w}d"] for w in TERMINAL_WINDOWS_DAYS] == [0, 0, 0]
    assert [jan8[f"terminal_risk_{w}d"] for w in TERMINAL_WINDOWS_DAYS] == [0.0, 0.0, 0.0]
    jan9 = _row(terminals, "terminal_id", "T1", "2024-01-09")  # 1 Jan becomes known
    assert (jan9["terminal_nb_tx_1d"], jan9["terminal_nb_fraud_1d"], jan9["terminal_risk_1d"]) == (2, 1, 0.5)
    jan10 = _row(terminals, "terminal_id", "T1", "2024-01-10")  # day D-8 = 2 Jan: nothing, risk 0 not NaN
    assert (jan10["terminal_nb_tx_1d"], jan10["terminal_risk_1d"]) == (0, 0.0)
    assert (jan10["terminal_nb_tx_7d"], jan10["terminal_risk_7d"]) == (2, 0.5)
    jan11 = _row(terminals, "terminal_id", "T1", "2024-01-11")  # 7d = 28 Dec .. 3 Jan
    assert (jan11["terminal_nb_tx_7d"], jan11["terminal_nb_fraud_7d"]) == (3, 1)
    assert jan11["terminal_risk_7d"] == pytest.approx(1 / 3, abs=1e-15)
    jan16 = _row(terminals, "terminal_id", "T1", "2024-01-16")  # 7d = 2 .. 8 Jan: 1 Jan left
    assert (jan16["terminal_nb_tx_7d"], jan16["terminal_nb_fraud_7d"], jan16["terminal_risk_7d"]) == (1, 0, 0.0)
    jan18 = _row(terminals, "terminal_id", "T1", "2024-01-18")  # 7d = 4 .. 10 Jan: empty
    assert (jan18["terminal_nb_tx_7d"], jan18["terminal_risk_7d"]) == (0, 0.0)
    assert (jan18["terminal_nb_tx_30d"], jan18["terminal_nb_fraud_30d"]) == (3, 1)
    t2 = _row(terminals, "terminal_id", "T2", "2024-01-21")  # a fraud on 20 Jan is not known yet
    assert (t2["terminal_nb_tx_30d"], t2["terminal_nb_fraud_30d"], t2["terminal_risk_30d"]) == (0, 0, 0.0)
    assert terminals[[f"terminal_risk_{w}d" for w in TERMINAL_WINDOWS_DAYS]].notna().all().all()


def test_labelled_transactions_window_is_half_open(hand_made) -> None:
    frame = labelled_transactions("2024-01-01 23:59:59", "2024-01-05 08:00:00")
    assert list(frame.columns) == list(LABELLED_TRANSACTION_COLUMNS)
    assert list(frame["tx_amount"]) == [20.0, 5.0, 7.0]  # start included, end excluded
    assert (frame[EVENT_TIMESTAMP] == frame["tx_datetime"]).all()
    assert list(frame["tx_fraud"]) == [0, 0, 0]
    everything = labelled_transactions(date(2023, 12, 1), date(2024, 2, 1))
    assert len(everything) == 6 and everything["tx_fraud"].sum() == 2
    assert everything["transaction_id"].is_unique
    assert labelled_transactions("2025-01-01", "2025-02-01").empty
    with pytest.raises(UserError, match="must be after start"):
        labelled_transactions("2024-01-05", "2024-01-01")


def test_missing_raw_data_is_a_user_error(data_dir: Path) -> None:
    with pytest.raises(UserError, match="fraud simulate"):
        build_offline_features(DataLayout.current())
    (DataLayout.current().transactions / "day=2024-01-01").mkdir(parents=True)
    with pytest.raises(UserError, match="no day=YYYY-MM-DD"):
        build_offline_features(DataLayout.current())


def test_failed_rebuild_leaves_previous_tables_intact(hand_made, data_dir: Path) -> None:
    layout = DataLayout.current()
    before = (
        customer_features_path(layout).read_bytes(),
        terminal_features_path(layout).read_bytes(),
        velocity_features_path(layout).read_bytes(),
    )
    broken = layout.transactions / "day=2024-01-21"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read the raw transactions"):
        build_offline_features(layout)
    after = (
        customer_features_path(layout).read_bytes(),
        terminal_features_path(layout).read_bytes(),
        velocity_features_path(layout).read_bytes(),
    )
    assert after == before
    written = (customer_features_path(layout), terminal_features_path(layout), velocity_features_path(layout))
    states = tuple(recent_state_path(layout, view) for view in (CARD_RECENT_VIEW, TERMINAL_RECENT_VIEW))
    assert sorted(p.name for p in layout.features.iterdir()) == sorted(path.name for path in written + states)


def _fraud_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [str(Path(sys.executable).parent / "fraud"), "features", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_build_reports_tables_and_rejects_missing_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    failed = _fraud_cli("build", data_dir=empty)
    assert failed.returncode == 2
    assert "no raw transactions" in failed.stderr and "Traceback" not in failed.stderr
    bad_threads = _fraud_cli("build", "--threads", "0", data_dir=empty)
    assert bad_threads.returncode == 2 and "--threads" in bad_threads.stderr

    full = tmp_path / "full"
    write_raw_transactions(DataLayout(full), random_transactions(seed=4, n_customers=5, n_terminals=4, n_days=12))
    built = _fraud_cli("build", "--threads", "1", "--memory-limit", "512MB", data_dir=full)
    assert built.returncode == 0, built.stderr
    assert "customer_spending_features" in built.stdout and "terminal_risk_features" in built.stdout
    assert customer_features_path(DataLayout(full)).is_file() and terminal_features_path(DataLayout(full)).is_file()
