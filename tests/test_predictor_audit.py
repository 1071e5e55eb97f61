"""The decision audit trail wired into the predictor: real `python -m predictor` servers on the real
Feast store of tests/test_predictor_server.py, a real SQLite audit database, the real spool.

* every decision a server returns (V1 and V2) is in the audit table exactly once, with its score,
  decision, model version, variant and feature vector;
* a request whose decisions cannot be spooled (spool full) is answered 503 and never audited;
* in process: coalesced requests are audited once per batch, and auditing off creates no spool.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, func, select

from fraud.audit import AuditSpool, AuditWriter, create_audit_engine, upgrade_database
from fraud.audit.store import table_names
from fraud.audit.tables import Decision
from fraud.features.definitions import CUSTOMER_SPENDING_FEATURES, MODEL_FEATURES, TERMINAL_RISK_FEATURES
from fraud.net import free_port
from predictor.__main__ import build_parser, settings_from_args
from predictor.features import InMemoryFeatureSource
from predictor.model import AuditUnavailable, FraudModel, PredictorSettings
from tests.test_predictor_server import (
    CUSTOMERS,
    TERMINALS,
    bundle,  # noqa: F401 - module fixture (synthetic bundle, version "3")
    data_root,  # noqa: F401 - module fixture (materialised Feast SQLite store)
    infer_v2,
    outputs_by_name,
    predict_v1,
    start_predictor,
    tx,
    v2_body,
)

FULL_SPOOL_RECORDS = 3


def migrated_engine(url: str) -> Engine:
    engine = create_audit_engine(url)
    upgrade_database(engine)
    return engine


def audited_rows(engine: Engine) -> list[dict]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(select(Decision.__table__))]


def wait_for_rows(engine: Engine, expected: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as connection:
            count = connection.execute(select(func.count()).select_from(Decision.__table__)).scalar_one()
        if count >= expected or time.monotonic() > deadline:
            return audited_rows(engine)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, data_root, bundle):  # noqa: F811 - pytest fixtures
    """An audited canary predictor with its writer thread, and one whose tiny spool nobody drains
    (the sidecar mode without its sidecar), started together to share the start-up wait."""
    folder = tmp_path_factory.mktemp("audit")
    db_url = f"sqlite:///{folder / 'audit.db'}"
    engine = migrated_engine(db_url)
    started = {
        "audited": start_predictor(
            folder, bundle, data_root, "--online-store", "sqlite", "--store-timeout", "10",
            "--audit-spool", str(folder / "audited" / "spool.db"), "--audit-db-url", db_url,
            env={"FRAUD_MODEL_VARIANT": "canary"},
        ),
        "full": start_predictor(
            folder, bundle, data_root, "--online-store", "sqlite",
            "--audit-spool", str(folder / "full" / "spool.db"),
            "--audit-spool-max-records", str(FULL_SPOOL_RECORDS),
        ),
    }  # fmt: skip
    try:
        for predictor in started.values():
            predictor.wait_ready()
        yield {"engine": engine, "folder": folder, **started}
    finally:
        for predictor in started.values():
            predictor.stop()
        engine.dispose()


def test_every_returned_decision_is_audited_exactly_once(servers):
    predictor, engine = servers["audited"], servers["engine"]
    v1_rows = [tx(101), tx(102, customer="C-never-seen", terminal="T-never-seen"), tx(103, customer=CUSTOMERS[3])]
    v2_rows = [tx(104, customer=CUSTOMERS[2], terminal=TERMINALS[4]), tx(105, amount=1234.5)]
    v1 = predict_v1(predictor, {"instances": v1_rows})
    v2 = infer_v2(predictor, v2_body(v2_rows))
    assert v1.status_code == 200 and v2.status_code == 200, v1.text + v2.text

    returned = {
        p["transaction_id"]: (p["fraud_probability"], p["decision"], p["model_version"], p["features"],
                              p["features_missing"])
        for p in v1.json()["predictions"]
    }  # fmt: skip
    out = outputs_by_name(v2.json())
    vectors = np.asarray(out["feature_vector"]).reshape(len(v2_rows), -1)
    for i, transaction_id in enumerate(out["transaction_id"]):
        features = dict(zip(MODEL_FEATURES, vectors[i].tolist(), strict=True))
        returned[transaction_id] = (
            out["fraud_probability"][i], out["decision"][i], out["model_version"][i], features,
            out["features_missing"][i],
        )  # fmt: skip

    rows = wait_for_rows(engine, len(returned))
    assert sorted(row["transaction_id"] for row in rows) == sorted(returned), "each decision once, no other"
    by_id = {row["transaction_id"]: row for row in rows}
    for transaction_id, (score, decision, version, features, missing) in returned.items():
        row = by_id[transaction_id]
        assert row["score"] == pytest.approx(score, abs=1e-12)
        assert (row["decision"], row["model_version"], row["variant"]) == (decision, version, "canary")
        assert row["model_name"] == "fraud-detector" and version == "3"
        assert list(row["features"]) == list(MODEL_FEATURES)
        np.testing.assert_allclose([row["features"][n] for n in MODEL_FEATURES], [features[n] for n in MODEL_FEATURES])
        assert row["features_missing"] is missing and row["fail_open"] is False
        assert row["latency_ms"] >= 0.0
    assert by_id["RQ0102"]["features_missing"] is True  # the cold-start card
    assert (by_id["RQ0101"]["customer_id"], by_id["RQ0101"]["terminal_id"]) == (CUSTOMERS[1], TERMINALS[0])
    # the writer thread committed and then emptied the spool
    with AuditSpool(servers["folder"] / "audited" / "spool.db") as spool:
        deadline = time.monotonic() + 10
        while spool.depth() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spool.depth() == 0


def test_a_request_whose_decisions_cannot_be_spooled_is_refused_and_not_audited(servers):
    predictor = servers["full"]
    accepted = predict_v1(predictor, {"instances": [tx(201), tx(202)]})
    assert accepted.status_code == 200, accepted.text
    refused = predict_v1(predictor, {"instances": [tx(203), tx(204)]})  # 2 more do not fit in 3
    assert refused.status_code == 503, refused.text
    assert "cannot be audited" in refused.json()["error"] and "spool is full" in refused.json()["error"]
    refused_v2 = infer_v2(predictor, v2_body([tx(205), tx(206)]))
    assert refused_v2.status_code == 503, refused_v2.text
    last = predict_v1(predictor, {"instances": [tx(207)]})  # exactly the room left
    assert last.status_code == 200, last.text
    metrics_text = httpx.get(f"{predictor.url}/metrics", timeout=10).text
    assert 'fraud_predictor_errors_total{kind="audit_unavailable"} 2.0' in metrics_text

    # what a sidecar writer would move to the database: only the answered decisions
    engine = migrated_engine(f"sqlite:///{servers['folder'] / 'sidecar.db'}")
    writer = AuditWriter(servers["folder"] / "full" / "spool.db", engine=engine)
    try:
        assert writer.drain_all() == 3
    finally:
        writer.close()
    rows = audited_rows(engine)
    engine.dispose()
    assert sorted(row["transaction_id"] for row in rows) == ["RQ0201", "RQ0202", "RQ0207"]
    assert {row["variant"] for row in rows} == {"stable"}


# --- in process -----------------------------------------------------------------------------------
DAY = pd.Timestamp("2026-03-09")


def memory_source() -> InMemoryFeatureSource:
    ids = [f"C{i}" for i in range(5)]
    customers = pd.DataFrame({"customer_id": ids, "snapshot_ts": DAY,
                              **{name: np.arange(5, dtype=float) * (j + 1)
                                 for j, name in enumerate(CUSTOMER_SPENDING_FEATURES)}})  # fmt: skip
    terminals = pd.DataFrame({"terminal_id": [f"T{i}" for i in range(5)], "snapshot_ts": DAY,
                              **{name: np.linspace(0.0, 0.4, 5) for name in TERMINAL_RISK_FEATURES}})  # fmt: skip
    return InMemoryFeatureSource(customers, terminals)


def v1_request(i: int, rows: int) -> dict:
    return {
        "instances": [
            {"transaction_id": f"P{i}-{k}", "customer_id": f"C{(i + k) % 5}", "terminal_id": f"T{k % 5}",
             "tx_amount": 10.0 + i + k, "tx_datetime": "2026-03-10T02:30:00Z"}
            for k in range(rows)
        ]
    }  # fmt: skip


async def answer_all(model: FraudModel, bodies: list[dict]) -> list:
    """Each request through the model as KServe calls it: its response body, or its exception."""
    outcomes = await asyncio.gather(*(model(body) for body in bodies), return_exceptions=True)
    return [outcome if isinstance(outcome, BaseException) else outcome[0] for outcome in outcomes]


@pytest.mark.parametrize("micro_batch_rows", [1024, 1])
def test_in_process_every_decision_is_spooled_before_the_answer(tmp_path, bundle, micro_batch_rows):  # noqa: F811
    spool_path = tmp_path / "spool.db"
    settings = PredictorSettings(bundle=str(bundle), audit_spool=str(spool_path), micro_batch_rows=micro_batch_rows)
    model = FraudModel("fraud-detector", settings, memory_source())
    assert model.load()
    try:
        bodies = [v1_request(i, rows=1 + i % 3) for i in range(12)]
        answers = asyncio.run(answer_all(model, bodies))
        assert all(isinstance(answer, dict) for answer in answers), answers
        with AuditSpool(spool_path) as spool:  # no writer: everything answered is still spooled
            batch = spool.oldest(1000)
        assert batch is not None
        spooled = [json.loads(payload) for payload in batch.payloads]
        answered = {p["transaction_id"]: p for answer in answers for p in answer["predictions"]}
        assert sorted(record["transaction_id"] for record in spooled) == sorted(answered)
        for record in spooled:
            prediction = answered[record["transaction_id"]]
            assert record["score"] == prediction["fraud_probability"] and record["decision"] == prediction["decision"]
            assert record["variant"] == "stable" and record["model_version"] == "3"
        if micro_batch_rows > 1:
            assert model.batcher.batches < len(bodies)  # coalesced, and still one record per decision
    finally:
        model.stop()
    assert model.audit_spool is None


def test_in_process_full_spool_fails_every_request_of_the_batch(tmp_path, bundle):  # noqa: F811
    settings = PredictorSettings(bundle=str(bundle), audit_spool=str(tmp_path / "spool.db"), audit_spool_max_records=2)
    model = FraudModel("fraud-detector", settings, memory_source())
    assert model.load()
    try:
        answers = asyncio.run(answer_all(model, [v1_request(i, rows=2) for i in range(4)]))
        assert all(isinstance(answer, AuditUnavailable) for answer in answers[1:]), answers
        with AuditSpool(tmp_path / "spool.db") as spool:
            assert spool.depth() == (2 if isinstance(answers[0], dict) else 0)
    finally:
        model.stop()


def test_auditing_off_creates_no_spool(tmp_path, monkeypatch, bundle):  # noqa: F811
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "data"))
    for name in ("FRAUD_AUDIT_SPOOL", "FRAUD_AUDIT_DB_URL", "FRAUD_MODEL_VARIANT"):
        monkeypatch.delenv(name, raising=False)
    settings = settings_from_args(build_parser().parse_args(["--bundle", str(bundle)]))
    assert not settings.audit_enabled and settings.model_variant == "stable"
    model = FraudModel("fraud-detector", settings, memory_source())
    assert model.load()
    try:
        (answer,) = asyncio.run(answer_all(model, [v1_request(0, rows=2)]))
        assert len(answer["predictions"]) == 2
        assert model.audit_spool is None and model.audit_writer is None
    finally:
        model.stop()
    assert not list(tmp_path.rglob("*spool*"))


def test_audit_options_are_validated():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-variant", "beta"])
    with pytest.raises(ValueError, match="audit_spool_max_records"):
        PredictorSettings(audit_spool="/tmp/x.db", audit_spool_max_records=0)
    with pytest.raises(ValueError, match="audit_spool_sync"):
        PredictorSettings(audit_spool="/tmp/x.db", audit_spool_sync="OFF")
    assert PredictorSettings(audit_spool="/tmp/x.db").resolved_audit_spool_sync() in ("NORMAL", "FULL")


# --- the local stack (`fraud serve`) ------------------------------------------------------------------
def test_fraud_serve_audits_by_default_and_no_audit_strips_every_audit_setting(tmp_path, monkeypatch):
    from fraud.audit.store import migrate_audit_database
    from fraud.errors import UserError
    from fraud.serving_stack import ServingStack, StackConfig

    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FRAUD_AUDIT_SPOOL", raising=False)
    monkeypatch.delenv("FRAUD_AUDIT_DB_URL", raising=False)
    audited = ServingStack(StackConfig(bundle=tmp_path / "bundle"))
    command = audited.predictor_command()
    assert command[command.index("--audit-spool") + 1] == str((tmp_path / "data" / "audit" / "spool.db").resolve())
    # the predictor only spools; the sidecar writer gets the database URL in its environment
    assert "FRAUD_AUDIT_DB_URL" not in audited.predictor_env()
    writer = audited.audit_writer_command()
    assert writer[writer.index("--spool") + 1] == str((tmp_path / "data" / "audit" / "spool.db").resolve())
    db_url = audited.audit_writer_env()["FRAUD_AUDIT_DB_URL"]
    assert db_url == f"sqlite:///{tmp_path / 'data' / 'audit' / 'audit.db'}"
    assert db_url not in command and db_url not in writer
    assert migrate_audit_database(db_url) is not None  # what ServingStack.start() runs first
    engine = create_audit_engine(db_url)
    assert {"decisions", "labels", "live_quality"} <= table_names(engine)
    engine.dispose()

    monkeypatch.setenv("FRAUD_AUDIT_SPOOL", str(tmp_path / "elsewhere.db"))
    monkeypatch.setenv("FRAUD_AUDIT_DB_URL", db_url)
    silent = ServingStack(StackConfig(bundle=tmp_path / "bundle", audit=False))
    assert not any(arg.startswith("--audit") for arg in silent.predictor_command())
    assert not any(
        name.startswith("FRAUD_AUDIT_") and name != "FRAUD_AUDIT_SPOOL_SYNC" for name in silent.predictor_env()
    )

    with pytest.raises(UserError, match=r"cannot migrate the audit database postgresql://postgres:\*\*\*@"):
        migrate_audit_database(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/audit")
