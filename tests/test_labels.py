"""Delayed labels: validated ingest (idempotent), live quality against hand-computed values on
SQLite and PostgreSQL, the Prometheus gauges, and the label feed of a simulated period."""

from __future__ import annotations

import os
import subprocess
from datetime import date, datetime, timedelta

import pandas as pd
import pytest
from prometheus_client import REGISTRY

from fraud.audit.store import create_audit_engine, insert_decisions, upgrade_database
from fraud.errors import UserError
from fraud.labels import (
    export_live_quality_gauges,
    ingest_label_file,
    read_label_file,
    read_live_quality,
    simulated_labels,
)
from tests.test_audit_support import FRAUD_CLI, make_decision, pg_database, scrape  # noqa: F401

DAY1 = datetime(2026, 11, 1)
DAY2 = datetime(2026, 11, 2)

# (index, model version, received at, customer, score, decision, label or None)
SCENARIO = [
    (1, "1", DAY1 + timedelta(hours=1), "C1", 0.90, "decline", 1),
    (2, "1", DAY1 + timedelta(hours=2), "C2", 0.80, "review", 0),
    (3, "1", DAY1 + timedelta(hours=3), "C3", 0.60, "review", 1),
    (4, "1", DAY1 + timedelta(hours=4), "C4", 0.20, "approve", 1),
    (5, "1", DAY1 + timedelta(hours=5), "C5", 0.10, "approve", 0),
    (6, "1", DAY1 + timedelta(hours=6), "C6", 0.05, "approve", None),  # label not known yet
    (7, "1", DAY1 + timedelta(hours=7), "C1", 0.30, "approve", 0),  # second transaction of card C1
    (8, "2", DAY2 + timedelta(hours=1), "C1", 0.70, "decline", 0),
    (9, "2", DAY2 + timedelta(hours=2), "C7", 0.40, "approve", 1),
    (10, "1", DAY2 + timedelta(hours=3), "C8", 0.50, "review", 0),
    (11, "1", DAY2 + timedelta(hours=4), "C9", 0.10, "approve", None),
]


def _label_frame(rows=SCENARIO, reported_at=datetime(2026, 11, 20)) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"transaction_id": f"TX{index:010d}", "label": label, "reported_at": reported_at.isoformat()}
            for index, *_rest, label in rows
            if label is not None
        ]
    )


def _seed_decisions(engine) -> None:
    rows = [
        make_decision(
            index, model_version=version, received_at=at, score=score, decision=decision, customer_id=customer
        ).to_row()
        for index, version, at, customer, score, decision, _label in SCENARIO
    ]
    with engine.begin() as connection:
        insert_decisions(connection, rows)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'audit.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_database").url
    )
    engine = create_audit_engine(url)
    upgrade_database(engine)
    _seed_decisions(engine)
    yield engine
    engine.dispose()


def _by_key(rows):
    return {(row.model_version, row.day): row for row in rows}


def test_live_quality_matches_hand_computed_values(engine, tmp_path):
    path = tmp_path / "labels.csv"
    _label_frame().to_csv(path, index=False)
    report = ingest_label_file(engine, path)
    assert (report.labels_in_file, report.labels_changed) == (9, 9)
    assert report.matched_decision_days == [date(2026, 11, 1), date(2026, 11, 2)]
    stored = _by_key(read_live_quality(engine))
    assert set(stored) == {("1", date(2026, 11, 1)), ("1", date(2026, 11, 2)), ("2", date(2026, 11, 2))}

    v1d1 = stored[("1", date(2026, 11, 1))]
    # 7 decisions, 6 labelled; frauds TX1, TX3, TX4; alerts TX1, TX2, TX3 -> TP 2
    assert (v1d1.n_decisions, v1d1.n_labelled, v1d1.n_fraud, v1d1.n_flagged) == (7, 6, 3, 3)
    assert v1d1.precision == pytest.approx(2 / 3)
    assert v1d1.recall == pytest.approx(2 / 3)
    # ranking 1(F) 2 3(F) 7 4(F) 5: precision at the frauds 1, 2/3, 3/5
    assert v1d1.average_precision == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 5 labelled cards (C1 counts once, compromised), 3 compromised, all within the top 100
    assert v1d1.card_precision_at_100 == pytest.approx(3 / 100)

    v2d2 = stored[("2", date(2026, 11, 2))]
    assert (v2d2.n_labelled, v2d2.n_fraud, v2d2.n_flagged) == (2, 1, 1)
    assert (v2d2.precision, v2d2.recall) == (0.0, 0.0)
    assert v2d2.average_precision == pytest.approx(0.5)
    assert v2d2.card_precision_at_100 == pytest.approx(1 / 100)

    v1d2 = stored[("1", date(2026, 11, 2))]
    assert (v1d2.n_decisions, v1d2.n_labelled, v1d2.n_fraud, v1d2.n_flagged) == (2, 1, 0, 1)
    assert v1d2.precision == 0.0
    assert v1d2.recall is None and v1d2.average_precision is None  # undefined without frauds
    assert v1d2.card_precision_at_100 == 0.0


def test_reingest_is_idempotent_and_a_newer_report_wins(engine, tmp_path):
    path = tmp_path / "labels.parquet"
    _label_frame().to_parquet(path, index=False)
    ingest_label_file(engine, path)
    before = _by_key(read_live_quality(engine))
    again = ingest_label_file(engine, path)
    assert again.labels_changed == 0
    assert {k: (r.precision, r.n_labelled) for k, r in _by_key(read_live_quality(engine)).items()} == {
        k: (r.precision, r.n_labelled) for k, r in before.items()
    }
    # TX2 turns out to be a chargeback too (reported later); an older contradicting report is ignored
    update = pd.DataFrame(
        {
            "transaction_id": ["TX0000000002", "TX0000000005"],
            "label": [1, 1],
            "reported_at": ["2026-11-25T09:00:00", "2026-11-10T00:00:00"],
        }
    )
    update_path = tmp_path / "update.csv"
    update.to_csv(update_path, index=False)
    report = ingest_label_file(engine, update_path)
    assert report.labels_changed == 1
    v1d1 = _by_key(read_live_quality(engine))[("1", date(2026, 11, 1))]
    assert v1d1.n_fraud == 4 and v1d1.precision == pytest.approx(1.0) and v1d1.recall == pytest.approx(3 / 4)


def test_gauges_publish_the_latest_day_with_enough_labels(engine, tmp_path):
    path = tmp_path / "labels.csv"
    _label_frame().to_csv(path, index=False)
    ingest_label_file(engine, path)
    published = export_live_quality_gauges(engine, min_label_coverage=0.8)
    # version 1: day 2 has coverage 1/2 < 0.8, so day 1 (6/7) is published; version 2: day 2
    assert {key: row.day for key, row in published.items()} == {
        ("fraud-detector", "1"): date(2026, 11, 1),
        ("fraud-detector", "2"): date(2026, 11, 2),
    }

    def gauge(version: str, metric: str) -> float:
        return REGISTRY.get_sample_value(
            "fraud_live_quality", {"model_name": "fraud-detector", "model_version": version, "metric": metric}
        )

    assert gauge("1", "precision") == pytest.approx(2 / 3)
    assert gauge("1", "card_precision_at_100") == pytest.approx(0.03)
    assert gauge("2", "average_precision") == pytest.approx(0.5)
    assert (
        REGISTRY.get_sample_value(
            "fraud_live_quality_day_timestamp_seconds", {"model_name": "fraud-detector", "model_version": "2"}
        )
        == (datetime(2026, 11, 2) - datetime(1970, 1, 1)).total_seconds()
    )
    assert REGISTRY.get_sample_value(
        "fraud_live_quality_label_coverage", {"model_name": "fraud-detector", "model_version": "1"}
    ) == pytest.approx(6 / 7)
    export_live_quality_gauges(engine, min_label_coverage=1.0)  # only version 2 has a fully labelled day
    assert gauge("1", "precision") is None  # version 1 has no day with full coverage: its series disappear
    assert gauge("2", "precision") == 0.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("transaction_id,label\nTX1,1\n", "missing column(s) ['reported_at']"),
        (
            "transaction_id,label,reported_at\nTX1,1,2026-11-01\nTX2,2,2026-11-01\nTX3,yes,2026-11-01\n",
            "column label must be 0 or 1 (lines 3, 4: '2', 'yes')",
        ),
        (
            "transaction_id,label,reported_at\nTX1,1,last tuesday\n",
            "column reported_at must be an ISO-8601 timestamp (lines 2",
        ),
        ("transaction_id,label,reported_at\n,1,2026-11-01\n", "column transaction_id must be a non-empty id"),
        (
            "transaction_id,label,reported_at\nTX1,1,2026-11-01\n4111111111111111,1,2026-11-01\n",
            "lines 3; first: looks like a card number",
        ),
        ('transaction_id,label,reported_at\n"TX\x01",1,2026-11-01\n', "may only hold the characters"),
        ("transaction_id,label,reported_at\n", "has no rows"),
        ("transaction_id,label,reported_at\nTX1,1,2026-11-01\nTX1,0,2026-11-01\n", "reported as both 0 and 1"),
    ],
)
def test_bad_label_files_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        read_label_file(path)
    assert message in str(error.value)


def test_label_file_of_an_unknown_format_or_missing_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_label_file(tmp_path / "none.csv")
    (tmp_path / "labels.json").write_text("{}")
    with pytest.raises(UserError, match="unknown format"):
        read_label_file(tmp_path / "labels.json")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable PARQUET file"):
        read_label_file(tmp_path / "broken.parquet")


def test_emit_writes_the_delayed_label_feed_of_a_simulated_period(data_dir, tmp_path):
    from fraud.config import DataLayout
    from fraud.simulator import SimulationConfig, read_transactions, simulate, write_dataset

    config = SimulationConfig(n_customers=60, n_terminals=120, n_days=12, start_date=date(2026, 1, 1), seed=3)
    write_dataset(simulate(config), DataLayout.current().raw)
    out = tmp_path / "labels.parquet"
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [str(FRAUD_CLI), "labels", "emit", "--from", "2026-01-03", "--to", "2026-01-08", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    transactions = read_transactions(DataLayout.current().raw, "2026-01-03", "2026-01-08")
    labels = read_label_file(out)  # the emitted file passes the ingest validation
    assert sorted(labels["transaction_id"]) == sorted(transactions["transaction_id"])
    merged = labels.merge(transactions, on="transaction_id")
    assert (merged["label"] == merged["tx_fraud"]).all()
    delay = merged["reported_at"] - merged["tx_datetime"]
    genuine = merged["tx_fraud"] == 0
    assert (delay[genuine] == pd.Timedelta(days=7)).all()
    assert delay[~genuine].between(pd.Timedelta(hours=1), pd.Timedelta(days=60)).all()
    assert merged["tx_fraud"].sum() > 0

    as_of = datetime(2026, 1, 10)
    known = simulated_labels(transactions, as_of=as_of, include_genuine=False)
    assert (known["label"] == 1).all() and (known["reported_at"] <= as_of).all()
    assert 0 < len(known) <= int(transactions["tx_fraud"].sum())

    empty = subprocess.run(
        [
            str(FRAUD_CLI),
            "labels",
            "emit",
            "--from",
            "2030-01-01",
            "--to",
            "2030-01-02",
            "--out",
            str(tmp_path / "x.csv"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert empty.returncode == 2 and "no simulated transactions" in empty.stderr
    assert not (tmp_path / "x.csv").exists()
