"""The transaction simulator (fraud/simulator.py, `fraud simulate`): the book's process, the
files it writes, determinism, atomic writes and CLI errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fraud import simulator
from fraud.errors import UserError
from fraud.schema import (
    CUSTOMER_PROFILE_SCHEMA,
    MERCHANT_CATEGORIES,
    RAW_TRANSACTION_SCHEMA,
    TERMINAL_PROFILE_SCHEMA,
    customer_key,
    terminal_key,
    transaction_key,
)
from fraud.simulator import (
    SimulatedData,
    SimulationConfig,
    read_customers,
    read_manifest,
    read_terminals,
    read_transactions,
    simulate,
    write_dataset,
)

FRAUD_CLI = Path(sys.executable).with_name("fraud")
SMALL = SimulationConfig(n_customers=200, n_terminals=400, n_days=30, seed=3)
SMALL_ARGS = ["--customers", "200", "--terminals", "400", "--days", "30", "--seed", "3"]


@pytest.fixture(scope="module")
def data() -> SimulatedData:
    return simulate(SMALL)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("sim") / "raw"
    write_dataset(data, out)
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir), "COLUMNS": "200"}
    return subprocess.run(
        [str(FRAUD_CLI), "simulate", *args], check=False, capture_output=True, text=True, env=env, timeout=120
    )


# --- structure of the written dataset --------------------------------------------------------


def test_written_files_have_exactly_the_contract_schemas(raw_dir, data):
    day_files = sorted((raw_dir / "transactions").glob("day=*/part-0.parquet"))
    assert len(day_files) == SMALL.n_days
    expected_days = [(SMALL.start_date + timedelta(days=i)).isoformat() for i in range(SMALL.n_days)]
    assert [f.parent.name for f in day_files] == [f"day={d}" for d in expected_days]
    for path in day_files:
        assert pq.read_schema(path).remove_metadata() == RAW_TRANSACTION_SCHEMA
    assert pq.read_schema(raw_dir / "customers.parquet").remove_metadata() == CUSTOMER_PROFILE_SCHEMA
    assert pq.read_schema(raw_dir / "terminals.parquet").remove_metadata() == TERMINAL_PROFILE_SCHEMA
    # no pandas metadata (which would carry library versions) in what others read
    assert b"pandas" not in (pq.read_schema(day_files[0]).metadata or {})


def test_manifest_records_parameters_and_counts(raw_dir, data):
    manifest = read_manifest(raw_dir)
    tx = data.transactions
    assert manifest["parameters"] == {
        "n_customers": 200,
        "n_terminals": 400,
        "n_days": 30,
        "start_date": "2018-04-01",
        "radius": 5.0,
        "seed": 3,
    }
    assert manifest["n_transactions"] == len(tx)
    assert manifest["n_fraud"] == int(tx.tx_fraud.sum()) > 0
    assert manifest["fraud_by_scenario"] == {str(k): int((tx.tx_fraud_scenario == k).sum()) for k in (1, 2, 3)}


def test_read_back_equals_simulated_data(raw_dir, data):
    back = read_transactions(raw_dir)
    assert list(back.columns) == RAW_TRANSACTION_SCHEMA.names
    pd.testing.assert_frame_equal(back, data.transactions, check_dtype=False)
    pd.testing.assert_frame_equal(read_customers(raw_dir), data.customers, check_dtype=False)
    pd.testing.assert_frame_equal(read_terminals(raw_dir), data.terminals, check_dtype=False)


def test_read_transactions_filters_on_datetime_and_prunes_days(raw_dir, data):
    start, end = datetime(2018, 4, 5, 12, 0), date(2018, 4, 9)
    window = read_transactions(raw_dir, start=start, end=end)
    tx = data.transactions
    expected = tx[(tx.tx_datetime >= start) & (tx.tx_datetime < pd.Timestamp(end))].reset_index(drop=True)
    assert len(window) > 0
    pd.testing.assert_frame_equal(window, expected, check_dtype=False)
    only_start = read_transactions(raw_dir, start="2018-04-29")
    assert set(only_start.tx_time_days) == {28, 29}
    with pytest.raises(UserError, match="start"):
        read_transactions(raw_dir, start="not-a-date")
    with pytest.raises(UserError, match="fraud simulate"):
        read_transactions(raw_dir.parent / "nothing-here")


# --- the generative process -----------------------------------------------------------------


def test_ids_and_chronological_order(data):
    tx = data.transactions
    assert tx.transaction_id.tolist() == [transaction_key(i) for i in range(len(tx))]
    assert tx.tx_datetime.is_monotonic_increasing
    assert data.customers.customer_id.tolist() == [customer_key(i) for i in range(SMALL.n_customers)]
    assert data.terminals.terminal_id.tolist() == [terminal_key(i) for i in range(SMALL.n_terminals)]
    assert set(tx.customer_id) <= set(data.customers.customer_id)
    assert set(tx.terminal_id) <= set(data.terminals.terminal_id)


def test_times_lie_within_their_day(data):
    tx = data.transactions
    time_of_day = tx.tx_time_seconds - tx.tx_time_days * 86_400
    assert ((time_of_day > 0) & (time_of_day < 86_400)).all()
    start = pd.Timestamp(SMALL.start_date)
    assert (tx.tx_datetime == start + pd.to_timedelta(tx.tx_time_seconds, unit="s")).all()
    assert tx.tx_time_days.between(0, SMALL.n_days - 1).all()
    # Normal(43200, 20000) truncated to the day: centred on noon
    assert abs(time_of_day.mean() - 43_200) < 1_000
    assert 17_000 < time_of_day.std() < 20_000


def test_customers_only_use_terminals_within_the_radius(data):
    tx = data.transactions.merge(data.customers, on="customer_id").merge(data.terminals, on="terminal_id")
    distance = np.hypot(tx.x_customer_id - tx.x_terminal_id, tx.y_customer_id - tx.y_terminal_id)
    assert (distance < SMALL.radius).all()
    # nb_available_terminals is the number of terminals strictly within the radius
    cust = data.customers
    term = data.terminals
    dx = cust.x_customer_id.to_numpy()[:, None] - term.x_terminal_id.to_numpy()[None, :]
    dy = cust.y_customer_id.to_numpy()[:, None] - term.y_terminal_id.to_numpy()[None, :]
    expected = (np.hypot(dx, dy) < SMALL.radius).sum(axis=1)
    assert (cust.nb_available_terminals.to_numpy() == expected).all()
    without = set(cust.customer_id[cust.nb_available_terminals == 0])
    assert without and not (without & set(data.transactions.customer_id))


def test_profile_distributions(data):
    cust = data.customers
    assert cust.x_customer_id.between(0, 100).all() and cust.y_customer_id.between(0, 100).all()
    assert cust.mean_amount.between(5, 100).all()
    assert np.allclose(cust.std_amount, cust.mean_amount / 2)
    assert cust.mean_nb_tx_per_day.between(0, 4).all()
    assert cust.age.between(18, 90).all()
    opened = pd.to_datetime(cust.account_open_date)
    assert (opened < pd.Timestamp(SMALL.start_date)).all()
    # opened as an adult
    assert (opened >= pd.Timestamp(SMALL.start_date) - pd.to_timedelta((cust.age - 18) * 366 + 1, unit="D")).all()
    assert set(data.terminals.merchant_category) == set(MERCHANT_CATEGORIES)


def test_transaction_counts_and_amounts_follow_the_profiles(data):
    tx, cust = data.transactions, data.customers.set_index("customer_id")
    legit = tx[tx.tx_fraud_scenario != 3]
    assert (tx.tx_amount > 0).all()
    assert np.allclose(tx.tx_amount, tx.tx_amount.round(2))
    # Poisson(lambda) draws per day, ~96.9 % of which fall inside the day (|Z| < 2.16)
    active = cust[cust.nb_available_terminals > 0]
    expected = active.mean_nb_tx_per_day.sum() * SMALL.n_days * 0.969
    assert abs(len(tx) - expected) < 4 * np.sqrt(expected)
    per_customer = legit.groupby("customer_id").tx_amount.mean()
    busy = legit.customer_id.value_counts()
    busy = busy[busy >= 40].index
    ratio = per_customer[busy] / cust.loc[busy, "mean_amount"]
    assert ratio.between(0.85, 1.2).all()


# --- fraud scenarios --------------------------------------------------------------------------


def test_fraud_label_matches_scenario(data):
    tx = data.transactions
    assert set(tx.tx_fraud_scenario.unique()) <= {0, 1, 2, 3}
    assert ((tx.tx_fraud == 1) == (tx.tx_fraud_scenario > 0)).all()
    assert {1, 2, 3} <= set(tx.tx_fraud_scenario.unique())


def test_scenario_1_is_exactly_amount_above_220(data):
    tx = data.transactions
    rest = tx[~tx.tx_fraud_scenario.isin([2, 3])]
    assert ((rest.tx_fraud_scenario == 1) == (rest.tx_amount > 220)).all()


def _book_scenario_2(tx: pd.DataFrame, schedule: pd.DataFrame) -> pd.Series:
    """The book's loop: for each compromise day, flag the terminals' transactions of the next 28 days."""
    flagged = pd.Series(False, index=tx.index)
    for day, group in schedule.groupby("tx_time_days"):
        window = (tx.tx_time_days >= day) & (tx.tx_time_days < day + 28)
        flagged |= window & tx.terminal_id.isin(group.terminal_id)
    return flagged


def test_scenario_2_is_the_compromised_terminals_next_28_days(data):
    tx, schedule = data.transactions, data.compromised_terminals
    # the book's range(max day): compromise on every observed day but the last, 2 distinct terminals
    assert sorted(schedule.tx_time_days.unique()) == list(range(int(tx.tx_time_days.max())))
    assert (schedule.groupby("tx_time_days").terminal_id.nunique() == 2).all()
    flagged = _book_scenario_2(tx, schedule)
    assert flagged.any()
    # every scenario-2 label is a compromised terminal's transaction, and every such transaction
    # is fraud of scenario 2 unless scenario 3 overwrote it
    assert (tx.tx_fraud_scenario[~flagged] != 2).all()
    assert tx.tx_fraud_scenario[flagged].isin([2, 3]).all()


def test_scenario_3_picks_a_third_of_the_compromised_customers_transactions(data):
    tx, schedule = data.transactions, data.compromised_customers
    assert (schedule.groupby("tx_time_days").customer_id.nunique() == 3).all()
    candidates = pd.Series(False, index=tx.index)
    total_picks = 0
    for day, group in schedule.groupby("tx_time_days"):
        window = (tx.tx_time_days >= day) & (tx.tx_time_days < day + 14) & tx.customer_id.isin(group.customer_id)
        n_picked = int(window.sum()) // 3
        total_picks += n_picked
        # that day's picks are all labelled scenario 3 (a later scenario never overwrites 3)
        assert int((tx.tx_fraud_scenario[window] == 3).sum()) >= n_picked
        candidates |= window
    n_scenario_3 = int((tx.tx_fraud_scenario == 3).sum())
    assert 0 < n_scenario_3 <= total_picks
    assert (tx.tx_fraud_scenario[~candidates] != 3).all()
    # amounts multiplied by 5: the scenario-3 mean amount is ~5x the customers' own mean
    s3 = tx[tx.tx_fraud_scenario == 3].merge(data.customers, on="customer_id")
    assert 3.5 < (s3.tx_amount / s3.mean_amount).mean() < 7


def test_default_scale_fraud_mix_is_the_books():
    """Default customers/terminals over 61 days: fraud rate close to the book's ~0.84 %."""
    result = simulate(SimulationConfig(n_days=61, seed=0)).summary()
    assert 0.006 < result["fraud_rate"] < 0.011
    mix = result["fraud_by_scenario"]
    assert mix["2"] > mix["3"] > mix["1"] > 0


# --- reproducibility ---------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, raw_dir):
    again = tmp_path / "again"
    write_dataset(simulate(SMALL), again)
    assert _tree_digest(again) == _tree_digest(raw_dir)
    other = tmp_path / "other"
    write_dataset(simulate(SimulationConfig(n_customers=200, n_terminals=400, n_days=30, seed=4)), other)
    digest, reference = _tree_digest(other), _tree_digest(raw_dir)
    assert digest.keys() == reference.keys()
    assert digest["customers.parquet"] != reference["customers.parquet"]
    assert (
        digest["transactions/day=2018-04-01/part-0.parquet"] != reference["transactions/day=2018-04-01/part-0.parquet"]
    )


def test_extra_attributes_and_horizon_do_not_move_the_process(data):
    longer = simulate(SimulationConfig(n_customers=200, n_terminals=400, n_days=31, seed=3))
    pd.testing.assert_frame_equal(longer.customers, data.customers)
    pd.testing.assert_frame_equal(longer.terminals, data.terminals)
    base_cols = ["customer_id", "terminal_id", "tx_time_seconds"]
    first_day = longer.transactions[longer.transactions.tx_time_days == 0][base_cols].reset_index(drop=True)
    reference = data.transactions[data.transactions.tx_time_days == 0][base_cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(first_day, reference)


def test_config_rejects_bad_values():
    for kwargs, field in [
        ({"n_customers": 0}, "n_customers"),
        ({"n_terminals": -1}, "n_terminals"),
        ({"n_days": 0}, "n_days"),
        ({"radius": 0.0}, "radius"),
        ({"radius": float("nan")}, "radius"),
        ({"seed": -1}, "seed"),
        ({"start_date": date(2099, 12, 1), "n_days": 60}, "period"),
    ]:
        with pytest.raises(UserError, match=field):
            SimulationConfig(**kwargs)


# --- atomic writes -----------------------------------------------------------------------------


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path, data):
    out = tmp_path / "raw"
    write_dataset(data, out)
    before = _tree_digest(out)
    other = simulate(SimulationConfig(n_customers=50, n_terminals=100, n_days=3, seed=9))
    with pytest.raises(UserError, match="--overwrite"):
        write_dataset(other, out)
    assert _tree_digest(out) == before
    write_dataset(other, out, overwrite=True)
    assert read_manifest(out)["parameters"]["n_days"] == 3
    assert len(list((out / "transactions").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp or old folders left


def test_a_crash_while_writing_leaves_the_previous_dataset_intact(tmp_path, data, monkeypatch):
    out = tmp_path / "raw"
    write_dataset(data, out)
    before = _tree_digest(out)
    real_write = simulator._write_parquet
    calls = {"n": 0}

    def fail_on_fifth_file(table, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        real_write(table, path)

    monkeypatch.setattr(simulator, "_write_parquet", fail_on_fifth_file)
    with pytest.raises(OSError, match="No space left"):
        write_dataset(data, out, overwrite=True)
    assert calls["n"] == 5
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# --- CLI -------------------------------------------------------------------------------------


def test_cli_writes_the_default_layout_and_is_deterministic(tmp_path, raw_dir):
    result = _run_cli(*SMALL_ARGS, data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "transactions" in result.stderr
    assert _tree_digest(tmp_path / "data" / "raw") == _tree_digest(raw_dir)

    refused = _run_cli(*SMALL_ARGS, data_dir=tmp_path / "data")
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _tree_digest(tmp_path / "data" / "raw") == _tree_digest(raw_dir)

    replaced = _run_cli(
        "--customers", "20", "--terminals", "50", "--days", "2", "--overwrite", data_dir=tmp_path / "data"
    )
    assert replaced.returncode == 0, replaced.stderr
    assert read_manifest(tmp_path / "data" / "raw")["n_customers"] == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--customers", "0"], "n_customers must be a positive integer"),
        (["--terminals", "-5"], "n_terminals must be a positive integer"),
        (["--days", "0"], "n_days must be a positive integer"),
        (["--start-date", "2018-13-01"], "--start-date '2018-13-01' is not a valid date"),
        (["--start-date", "April 1st"], "--start-date must be a date in YYYY-MM-DD format"),
        (["--radius", "-1"], "radius must be a positive finite number"),
    ],
)
def test_cli_rejects_bad_input_with_exit_code_2(tmp_path, args, message):
    result = _run_cli(*args, data_dir=tmp_path / "data")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_cli_rejects_an_unwritable_output_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _run_cli(
        "--customers", "5", "--terminals", "5", "--days", "1", "--out", str(blocker / "raw"), data_dir=tmp_path
    )
    assert result.returncode == 2
    assert "not writable" in result.stderr and "a-file" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run_cli("--days", "1", "--out", str(blocker), data_dir=tmp_path)
    assert result.returncode == 2 and "not a directory" in result.stderr


def test_cli_help_lists_every_option():
    result = subprocess.run(
        [str(FRAUD_CLI), "simulate", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0
    for option in (
        "--customers",
        "--terminals",
        "--days",
        "--start-date",
        "--seed",
        "--radius",
        "--out",
        "--overwrite",
    ):
        assert option in result.stdout
    top = subprocess.run([str(FRAUD_CLI), "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "simulate" in top.stdout


# --- card-testing scenario (off by default) ---------------------------------------------------------

#: sha256 over the relative paths and bytes of `write_dataset(simulate(GOLDEN))`, recorded with the
#: Handbook-only simulator before the card-testing scenario existed: the default output must not move.
GOLDEN = SimulationConfig(n_customers=50, n_terminals=100, n_days=5, seed=21)
GOLDEN_DIGEST = "21cbe61e595c5d5f86dee2952ab3f1a0c18594021e5fa5294f54fbe61bdc2a45"


def _combined_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_output_is_byte_identical_to_the_handbook_only_simulator(tmp_path):
    write_dataset(simulate(GOLDEN), tmp_path / "raw")
    assert _combined_digest(tmp_path / "raw") == GOLDEN_DIGEST
    assert "card_testing_per_day" not in read_manifest(tmp_path / "raw")["parameters"]


def test_card_testing_bursts_are_added_on_top_of_the_books_process(data):
    burst = simulate(SimulationConfig(n_customers=200, n_terminals=400, n_days=30, seed=3, card_testing_per_day=2))
    tx = burst.transactions
    added = tx[tx["tx_fraud_scenario"] == simulator.SCENARIO_CARD_TESTING]
    assert (added["tx_fraud"] == 1).all()
    # the book's transactions are untouched (ids are renumbered in time order)
    columns = ["tx_datetime", "customer_id", "terminal_id", "tx_amount", "tx_fraud", "tx_fraud_scenario"]
    pd.testing.assert_frame_equal(
        tx[tx["tx_fraud_scenario"] != simulator.SCENARIO_CARD_TESTING][columns].reset_index(drop=True),
        data.transactions[columns].reset_index(drop=True),
    )
    assert tx["transaction_id"].tolist() == [transaction_key(i) for i in range(len(tx))]
    assert tx["tx_datetime"].is_monotonic_increasing
    bursts = 0
    for (_, _day), group in added.groupby(["customer_id", "tx_time_days"]):
        group = group.sort_values("tx_datetime")
        # several bursts of one card on one day are possible only across cards: one per card and day here
        gaps = group["tx_time_seconds"].diff().dropna()
        if len(group) > simulator.CARD_TESTING_SMALL_TX[1] + 1:
            continue  # two bursts of the same card on the same day (rare): not checked in detail
        bursts += 1
        lo, hi = simulator.CARD_TESTING_SMALL_TX
        assert lo + 1 <= len(group) <= hi + 1
        assert gaps.between(*simulator.CARD_TESTING_GAP_SECONDS).all()
        small, large = group["tx_amount"].iloc[:-1], group["tx_amount"].iloc[-1]
        assert small.between(*simulator.CARD_TESTING_SMALL_AMOUNT).all()
        assert simulator.CARD_TESTING_LARGE_AMOUNT[0] <= large <= simulator.CARD_TESTING_LARGE_AMOUNT[1]
        assert group["terminal_id"].nunique() >= 2
    assert bursts >= 50  # 2 cards x 30 days
    summary = burst.summary()["fraud_by_scenario"]
    assert summary[str(simulator.SCENARIO_CARD_TESTING)] == len(added)


def test_card_testing_option_of_the_cli(tmp_path):
    result = _run_cli(
        *SMALL_ARGS, "--days", "3", "--card-testing-per-day", "1", "--out", str(tmp_path / "raw"), data_dir=tmp_path
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "raw")
    assert manifest["parameters"]["card_testing_per_day"] == 1
    assert manifest["fraud_by_scenario"]["4"] >= 3 * (simulator.CARD_TESTING_SMALL_TX[0] + 1)
    bad = _run_cli(*SMALL_ARGS, "--card-testing-per-day", "-1", "--out", str(tmp_path / "bad"), data_dir=tmp_path)
    assert bad.returncode == 2 and "card_testing_per_day" in bad.stderr


# --- streaming writer (`fraud simulate`) -----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        GOLDEN,
        SimulationConfig(n_customers=200, n_terminals=400, n_days=40, seed=3),
        SimulationConfig(n_customers=200, n_terminals=400, n_days=30, seed=3, card_testing_per_day=2),
        # three cards: the last day has no transaction, so the book draws one compromise day fewer
        SimulationConfig(n_customers=3, n_terminals=4, n_days=20, seed=28),
    ],
    ids=["golden", "40-days", "card-testing", "sparse-days"],
)
def test_streaming_writer_is_byte_identical_to_the_in_memory_one(tmp_path, config):
    write_dataset(simulate(config), tmp_path / "memory")
    summary = simulator.simulate_to(config, tmp_path / "streamed")
    assert _tree_digest(tmp_path / "streamed") == _tree_digest(tmp_path / "memory")
    assert summary == {k: v for k, v in read_manifest(tmp_path / "memory").items() if k in summary}
    if config == GOLDEN:
        assert _combined_digest(tmp_path / "streamed") == GOLDEN_DIGEST


def test_streaming_writer_holds_at_most_the_scenario_3_window_of_days(tmp_path):
    generated: list[int] = []
    held: list[int] = []

    def progress(stage: str, completed: int, total: int) -> None:
        if stage == "transactions":
            generated.append(completed)
        elif stage == "write":
            held.append(generated[-1] - (completed - 1))

    config = SimulationConfig(n_customers=100, n_terminals=200, n_days=60, seed=2)
    simulator.simulate_to(config, tmp_path / "raw", progress=progress)
    assert len(held) == config.n_days
    # a day is written as soon as the last scenario-3 draw that can touch it is known
    assert max(held) == simulator.SCENARIO_3_DURATION_DAYS


def test_streaming_writer_refuses_an_existing_dataset_and_leaves_no_temporary_folder(tmp_path):
    simulator.simulate_to(GOLDEN, tmp_path / "raw")
    before = _tree_digest(tmp_path / "raw")
    with pytest.raises(UserError, match="--overwrite"):
        simulator.simulate_to(GOLDEN, tmp_path / "raw")
    simulator.simulate_to(SimulationConfig(n_customers=50, n_terminals=100, n_days=5, seed=22), tmp_path / "raw", True)
    assert _tree_digest(tmp_path / "raw") != before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


@pytest.mark.slow
def test_streaming_writer_matches_the_in_memory_one_at_the_default_sizes(tmp_path):
    """The default dataset (~1.75 M transactions): streamed files == the in-memory simulator's."""
    write_dataset(simulate(SimulationConfig()), tmp_path / "memory")
    simulator.simulate_to(SimulationConfig(), tmp_path / "streamed")
    assert _tree_digest(tmp_path / "streamed") == _tree_digest(tmp_path / "memory")
