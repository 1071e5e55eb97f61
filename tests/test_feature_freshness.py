"""Operating the online store, on real Feast stores (SQLite files, Redis on 127.0.0.1:6379):

* a copied data directory never touches the original's store (Feast's registry records the
  online tables' absolute paths; `fraud features apply` in the copy adopts its own);
* a lost or emptied online store is detected (materialisation, predictor start, readiness) and
  rebuilt by `fraud features rebuild-online`;
* the views' TTL applied online, the freshness gauge and the expired counter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from kserve import Model
from kserve.errors import ModelNotFound
from kserve.model_repository import ModelRepository
from prometheus_client import REGISTRY
from test_features_offline import random_transactions, write_raw_transactions

from fraud.config import MODEL_NAME, DataLayout
from fraud.errors import UserError
from fraud.feature_store import (
    DEFAULT_REDIS_URL,
    apply_repo,
    foreign_online_tables,
    get_feature_store,
    materialize,
    materialize_incremental,
    online_batch_features,
    online_store_problem,
    rebuild_online,
    repo_config,
    snapshot_span,
    teardown,
)
from fraud.features.definitions import (
    CUSTOMER_SPENDING_VIEW,
    NS_PER_DAY,
    SNAPSHOT_TTL_DAYS,
    TERMINAL_RISK_VIEW,
)
from fraud.features.offline import build_offline_features
from predictor.edge import REQUEST_SCOPES
from predictor.features import BATCH_FEATURES, FeastFeatureSource, FeatureLookup
from predictor.model import FraudModel, PredictorSettings
from tests.factories import make_synthetic_bundle

FEAST_CLI = Path(sys.executable).parent / "feast"
BATCH_TABLES = (f"fraud_detection_{CUSTOMER_SPENDING_VIEW}", f"fraud_detection_{TERMINAL_RISK_VIEW}")


def _raw() -> pd.DataFrame:
    return random_transactions(seed=11, n_customers=12, n_terminals=10, n_days=12)


@pytest.fixture(scope="module")
def store_a(tmp_path_factory) -> Path:
    """Data dir A: raw data, offline tables, an applied and fully materialised SQLite store."""
    root = tmp_path_factory.mktemp("fresh") / "A"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FRAUD_DATA_DIR", str(root))
        for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
            patch.delenv(name, raising=False)
        layout = DataLayout(root)
        write_raw_transactions(layout, _raw())
        build_offline_features(layout)
        apply_repo("sqlite")
        first, last = snapshot_span(layout)
        materialize(first, last + timedelta(seconds=1), "sqlite")
        yield root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "fraud-detector", version="5")


@pytest.fixture(autouse=True)
def _store_selection(monkeypatch):
    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def _use(monkeypatch, root: Path) -> Path:
    monkeypatch.setenv("FRAUD_DATA_DIR", str(root))
    return root


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _drop_batch_tables(root: Path) -> None:
    with sqlite3.connect(root / "feast" / "online_store.db") as con:
        for table in BATCH_TABLES:
            con.execute(f'DROP TABLE "{table}"')


def _fraud(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The `fraud` CLI in-process: (exit code, stdout, stderr). FRAUD_DATA_DIR, which --data-dir
    sets, is restored by the caller's monkeypatch."""
    from fraud.cli import main

    monkeypatch.setenv("FRAUD_DATA_DIR", os.environ.get("FRAUD_DATA_DIR", "/nonexistent"))
    monkeypatch.setattr(sys, "argv", ["fraud", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as exited:
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _entities(root: Path) -> tuple[list[str], list[str]]:
    raw = _raw()
    return sorted(raw["customer_id"].unique())[:4], sorted(raw["terminal_id"].unique())[:4]


# --- a copied data directory ----------------------------------------------------------------------


def test_apply_in_a_copy_adopts_its_registry_and_leaves_the_original(store_a, tmp_path, monkeypatch) -> None:
    original = store_a / "feast" / "online_store.db"
    before = _tables(original)
    assert set(BATCH_TABLES) <= before
    customers, terminals = _entities(store_a)
    expected = online_batch_features(customers, terminals, "sqlite")
    copy = _use(monkeypatch, _copy(store_a, tmp_path / "C"))
    assert foreign_online_tables(repo_config("sqlite")) == [str(original)]
    with pytest.raises(UserError, match=r"outside this data directory .* run `fraud features apply` here"):
        materialize_incremental(online="sqlite")
    apply_repo("sqlite")
    assert foreign_online_tables(repo_config("sqlite")) == []
    assert _tables(original) == before, "applying the copy changed the original's online store"
    pd.testing.assert_frame_equal(online_batch_features(customers, terminals, "sqlite"), expected)
    _drop_batch_tables(copy)  # the copy's store is its own: the original keeps its tables
    assert _tables(original) == before


@pytest.mark.slow
def test_fraud_features_all_in_a_copy_never_touches_the_original(tmp_path, monkeypatch, capsys, caplog) -> None:
    """The reported scenario, through the CLI: build A, `cp -r A C`, build C, rebuild A (~60 s)."""
    a = tmp_path / "A"
    write_raw_transactions(DataLayout(a), _raw())
    code, _, err = _fraud(monkeypatch, capsys, "features", "all", "--data-dir", str(a), "--samples", "1")
    assert code == 0, err
    original = a / "feast" / "online_store.db"
    before = _tables(original)
    assert set(BATCH_TABLES) <= before
    c = _copy(a, tmp_path / "C")
    with caplog.at_level("WARNING", logger="fraud.feature_store"):
        code, _, err = _fraud(monkeypatch, capsys, "features", "all", "--data-dir", str(c), "--samples", "1")
    assert code == 0, err
    assert "was copied from another data directory" in caplog.text
    assert _tables(original) == before, "building the copy changed the original's online store"
    code, out, err = _fraud(monkeypatch, capsys, "features", "all", "--data-dir", str(a), "--samples", "1")
    assert code == 0, err
    assert "Traceback" not in out + err
    assert _tables(original) == before


# --- a lost or emptied online store ---------------------------------------------------------------


def test_lost_sqlite_store_is_detected_and_rebuilt_by_one_command(store_a, tmp_path, monkeypatch, capsys) -> None:
    customers, terminals = _entities(store_a)
    expected = online_batch_features(customers, terminals, "sqlite")
    own = _use(monkeypatch, _copy(store_a, tmp_path / "D"))
    apply_repo("sqlite")  # adopts the copied registry
    assert online_store_problem(get_feature_store("sqlite")) is None

    _drop_batch_tables(own)
    problem = online_store_problem(get_feature_store("sqlite"))
    assert problem is not None and "has no table" in problem and "fraud features rebuild-online" in problem
    code, out, err = _fraud(monkeypatch, capsys, "features", "materialize", "--data-dir", str(own))
    assert code != 0 and "fraud features rebuild-online" in err and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err

    code, out, err = _fraud(monkeypatch, capsys, "features", "rebuild-online", "--data-dir", str(own))
    assert code == 0, err
    assert "re-materialised" in out
    assert online_store_problem(get_feature_store("sqlite")) is None
    pd.testing.assert_frame_equal(online_batch_features(customers, terminals, "sqlite"), expected)

    with sqlite3.connect(own / "feast" / "online_store.db") as con:  # emptied, tables kept
        for table in BATCH_TABLES:
            con.execute(f'DELETE FROM "{table}"')  # noqa: S608 - the test's own table-name constants
    assert "holds no" in (online_store_problem(get_feature_store("sqlite")) or "")
    (own / "feast" / "online_store.db").unlink()  # lost altogether
    assert "is missing" in (online_store_problem(get_feature_store("sqlite")) or "")
    rebuild_online(online="sqlite")
    assert online_store_problem(get_feature_store("sqlite")) is None
    pd.testing.assert_frame_equal(online_batch_features(customers, terminals, "sqlite"), expected)


def test_rebuild_without_an_applied_repository_is_a_user_error(store_a, tmp_path, monkeypatch, capsys) -> None:
    own = _use(monkeypatch, tmp_path / "E")
    shutil.copytree(store_a / "features", own / "features")
    code, out, err = _fraud(monkeypatch, capsys, "features", "rebuild-online", "--data-dir", str(own))
    assert code != 0 and "fraud features apply" in err and "Traceback" not in out + err


@pytest.mark.redis
def test_lost_redis_store_is_detected_and_rebuilt(store_a, bundle, tmp_path, monkeypatch) -> None:
    """... and the predictor's readiness (its data plane: every readiness surface) follows it."""
    import redis

    from predictor.server import ReadinessDataPlane

    client = redis.Redis.from_url(f"redis://{DEFAULT_REDIS_URL}")
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"the Redis server on {DEFAULT_REDIS_URL} is not reachable (run `make services`)")
    own = _use(monkeypatch, tmp_path / "R")
    shutil.copytree(store_a / "features", own / "features")
    project = f"fraud_test_{uuid.uuid4().hex[:12]}"
    customers, terminals = _entities(store_a)
    try:
        apply_repo("redis", project=project)
        store = get_feature_store("redis", project=project)
        assert "never materialised" in (online_store_problem(store) or "")
        materialize_incremental(online="redis", project=project)
        expected = online_batch_features(customers, terminals, "redis", project=project)
        assert online_store_problem(get_feature_store("redis", project=project)) is None
        monkeypatch.setenv("FRAUD_FEAST_PROJECT", project)  # the predictor's project
        monkeypatch.setattr(FeastFeatureSource, "PROBLEM_CHECK_S", 0.0)
        model = FraudModel(
            "fraud-detector",
            PredictorSettings(bundle=str(bundle), online_store="redis", idempotency="off"),
            FeastFeatureSource.connect("redis", timeout_s=30.0),
        )
        model.load()
        registry = ModelRepository()
        registry.update(model)
        dataplane = ReadinessDataPlane(model_registry=registry)

        async def readiness() -> tuple[bool, bool, bool]:
            return (
                await dataplane.ready(),
                await dataplane.model_ready(model.name),
                await dataplane.model_ready(model.name, True),
            )

        assert asyncio.run(readiness()) == (True, True, True)
        lost = [key for key in client.scan_iter(count=1000) if key.endswith(project.encode())]
        assert lost
        client.delete(*lost)
        problem = online_store_problem(get_feature_store("redis", project=project))
        assert problem is not None and "Redis" in problem and "rebuild-online" in problem
        assert asyncio.run(readiness()) == (False, False, True)  # out of rotation, still scoring
        with pytest.raises(UserError, match="rebuild-online"):
            materialize_incremental(online="redis", project=project)
        rebuild_online(online="redis", project=project)
        assert online_store_problem(get_feature_store("redis", project=project)) is None
        assert asyncio.run(readiness()) == (True, True, True)
        pd.testing.assert_frame_equal(online_batch_features(customers, terminals, "redis", project=project), expected)
    finally:
        teardown("redis", project=project)


# --- the predictor: TTL online, freshness, readiness -----------------------------------------------


def _score(model: FraudModel, rows: list[dict]) -> list[dict]:
    token = REQUEST_SCOPES.set(frozenset({"score", "debug"}))
    try:
        response, _headers = asyncio.run(model({"instances": rows}))
    finally:
        REQUEST_SCOPES.reset(token)
    return response["predictions"]


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_lookup_expire_treats_snapshots_beyond_the_ttl_as_unknown() -> None:
    day = np.datetime64("2024-03-10T00:00:00", "ns")
    ttl = SNAPSHOT_TTL_DAYS * NS_PER_DAY
    values = np.arange(2 * len(BATCH_FEATURES), dtype=np.float64).reshape(2, -1)
    lookup = FeatureLookup(values, np.array([day, day], dtype="datetime64[ns]"), np.array([day, day]))
    at_ttl = day.astype("int64") + ttl  # exactly the TTL: still served (Feast's boundary)
    tx = np.array([at_ttl, at_ttl + 1], dtype=np.int64)
    expired_lookup, expired = lookup.expire(tx, ttl)
    assert expired.tolist() == [False, True]
    assert expired_lookup.missing.tolist() == [False, True]
    np.testing.assert_array_equal(expired_lookup.values[0], values[0])
    assert np.isnat(expired_lookup.customer_snapshot[1]) and np.isnat(expired_lookup.terminal_snapshot[1])
    assert lookup.expire(tx[:1], ttl)[0] is lookup  # nothing expired: no copy
    assert lookup.newest_snapshots() == {CUSTOMER_SPENDING_VIEW: int(day.astype("int64"))} | {
        TERMINAL_RISK_VIEW: int(day.astype("int64"))
    }
    assert FeatureLookup.empty(3).newest_snapshots() == {CUSTOMER_SPENDING_VIEW: None, TERMINAL_RISK_VIEW: None}


def test_predictor_applies_the_ttl_and_exports_freshness_on_a_feast_store(store_a, bundle, monkeypatch) -> None:
    _use(monkeypatch, store_a)
    model = FraudModel(
        "fraud-detector",
        PredictorSettings(bundle=str(bundle), online_store="sqlite"),
        FeastFeatureSource.connect("sqlite", timeout_s=30.0),
    )
    assert model.load() is True
    assert model.not_ready_reason() is None
    _, last = snapshot_span(DataLayout(store_a))
    customers, terminals = _entities(store_a)
    fresh_at = last + pd.Timedelta(hours=1)
    expired_at = last + pd.Timedelta(days=SNAPSHOT_TTL_DAYS, hours=1)
    rows = [
        {
            "transaction_id": f"TTL{i}",
            "customer_id": customers[0],
            "terminal_id": terminals[0],
            "tx_amount": 42.0,
            "tx_datetime": when.isoformat(),
        }
        for i, when in enumerate((fresh_at, expired_at))
    ]
    expired_before = _sample("fraud_predictor_features_expired_total", model_version="5") or 0.0
    missing_before = _sample("fraud_predictor_features_missing_total", model_version="5") or 0.0
    fresh, expired = _score(model, rows)
    assert fresh["features_missing"] is False
    assert fresh["features"]["customer_nb_tx_incl_30d"] > 1.0  # served from the online store
    assert expired["features_missing"] is True  # older than the TTL: cold-start defaults
    cold = _score(model, [{**rows[1], "transaction_id": "COLD", "customer_id": "C-nobody", "terminal_id": "T-nobody"}])
    assert expired["features"] == cold[0]["features"]  # every model feature as for an unknown entity
    assert _sample("fraud_predictor_features_expired_total", model_version="5") == expired_before + 1
    assert _sample("fraud_predictor_features_missing_total", model_version="5") == missing_before + 2
    now = time.time()
    for view in (CUSTOMER_SPENDING_VIEW, TERMINAL_RISK_VIEW):
        age = _sample("fraud_predictor_feature_snapshot_age_seconds", view=view)
        assert age is not None and abs(age - (now - last.timestamp())) < 120, (view, age)


def test_predictor_readiness_reports_a_lost_store_until_it_is_rebuilt(
    store_a, bundle, tmp_path, monkeypatch, caplog
) -> None:
    own = _use(monkeypatch, _copy(store_a, tmp_path / "P"))
    apply_repo("sqlite")
    _drop_batch_tables(own)
    monkeypatch.setattr(FeastFeatureSource, "PROBLEM_CHECK_S", 0.0)
    model = FraudModel(
        "fraud-detector",
        PredictorSettings(bundle=str(bundle), online_store="sqlite"),
        FeastFeatureSource.connect("sqlite", timeout_s=30.0),
    )
    with caplog.at_level("ERROR", logger="kserve.fraud_predictor"):
        assert model.load() is True  # up (the degraded mode answers), but out of rotation
    started = [r.getMessage() for r in caplog.records if "online feature store not usable" in r.getMessage()]
    assert len(started) == 1 and "rebuild-online" in started[0]
    reason = model.not_ready_reason()
    assert reason is not None and "has no table" in reason
    rebuild_online(online="sqlite")
    assert model.not_ready_reason() is None


class _StoreModel(Model):
    """A loaded model whose `not_ready_reason` is what the test says (FraudModel's interface)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True
        self.reason: str | None = "the online store /x holds no customer_spending_features rows: run rebuild"

    def not_ready_reason(self) -> str | None:
        return self.reason


def test_one_readiness_decision_answers_every_route_and_is_logged_once(caplog) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from predictor.__main__ import READINESS_PATH, readiness_endpoint
    from predictor.server import ReadinessDataPlane

    model = _StoreModel("fraud-detector")
    registry = ModelRepository()
    registry.update(model)
    dataplane = ReadinessDataPlane(model_registry=registry)
    app = FastAPI()
    app.add_api_route(READINESS_PATH, readiness_endpoint(dataplane), methods=["GET"])
    client = TestClient(app)

    async def answers() -> tuple[bool, bool, bool]:
        return (
            await dataplane.ready(),
            await dataplane.model_ready("fraud-detector"),
            await dataplane.model_ready("fraud-detector", True),  # what the scoring paths ask
        )

    with caplog.at_level("INFO", logger="kserve"):
        assert asyncio.run(answers()) == (False, False, True)  # out of rotation, still answering
        assert asyncio.run(answers()) == (False, False, True)
        answer = client.get(READINESS_PATH)
        assert answer.status_code == 503 and answer.json() == {"ready": False}
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not ready: ")]
        assert logged == ["not ready: the online store /x holds no customer_spending_features rows: run rebuild"]
        model.reason = None
        assert asyncio.run(answers()) == (True, True, True)
        assert client.get(READINESS_PATH).json() == {"ready": True}
        assert [r.getMessage() for r in caplog.records].count("ready again: fraud-detector") == 1
        model.ready = False  # not loaded: not ready for the scoring paths either
        assert asyncio.run(answers()) == (False, False, False)
    with pytest.raises(ModelNotFound):
        asyncio.run(dataplane.model_ready("another-model"))


# --- every readiness surface, predictor and transformer, on a real store -------------------------


def _grpc_ready(target: str, model_name: str) -> dict[str, bool]:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        return {
            "grpc ServerLive": stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live,
            "grpc ServerReady": stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready,
            "grpc ModelReady": stub.ModelReady(pb.ModelReadyRequest(name=model_name), timeout=10).ready,
        }


def _surfaces(url: str, grpc_target: str, model_name: str, own_probe: bool) -> dict[str, bool]:
    """Every readiness (and liveness) answer of one server: REST 200 / gRPC true is True. A 503 is
    False; anything else fails the test (a readiness answer is 200 or 503, never an error)."""
    answers = {}
    paths = ["/v2/health/live", "/v2/health/ready", f"/v2/models/{model_name}/ready", f"/v1/models/{model_name}"]
    for path in (["/ready"] if own_probe else []) + paths:
        status = httpx.get(url + path, timeout=10).status_code
        assert status in (200, 503), (path, status)
        answers[path] = status == 200
    return answers | _grpc_ready(grpc_target, model_name)


def _wait_for(what: str, check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout_s:.0f}s; last answers: {last}")


def test_every_readiness_surface_follows_a_lost_store_through_the_transformer(
    store_a, bundle, tmp_path, monkeypatch
) -> None:
    """A running predictor and drift transformer (`fraud serve`'s stack; the transformer reads the
    predictor over gRPC): the online tables dropped -> every readiness surface of both, REST and
    gRPC, answers not ready while liveness stays up and scoring still answers; `fraud features
    rebuild-online` -> every one answers ready again, with no restart."""
    from fraud.net import free_port
    from fraud.serving_stack import ServingStack, StackConfig
    from fraud.settings import Settings

    own = _use(monkeypatch, _copy(store_a, tmp_path / "S"))
    apply_repo("sqlite")
    config = StackConfig(
        bundle=bundle,
        port=free_port(),
        grpc_port=free_port(),
        predictor_port=free_port(),
        predictor_grpc_port=free_port(),
        online_store="sqlite",
        store_timeout_s=30.0,
        log_dir=tmp_path / "logs",
        transformer_args=("--online-ert", "0", "--enable_predictor_health_check"),  # as the manifests
        audit=False,
        velocity=False,
        settings=Settings.from_env(),
    )
    statuses: list[str] = []
    stack = ServingStack(config, on_status=statuses.append)
    stack.start()  # waits until both answer their model's readiness
    try:
        predictor_url = config.predictor_url
        predictor_grpc = f"127.0.0.1:{config.predictor_grpc_port}"
        transformer_grpc = f"127.0.0.1:{config.grpc_port}"

        def answers() -> dict[str, dict[str, bool]]:
            return {
                "predictor": _surfaces(predictor_url, predictor_grpc, MODEL_NAME, own_probe=True),
                "transformer": _surfaces(config.url, transformer_grpc, MODEL_NAME, own_probe=False),
            }

        def all_ready(expected: bool):
            current = answers()
            for server in current.values():
                live = {k: v for k, v in server.items() if "live" in k.lower()}
                assert all(live.values()), current  # liveness never follows the store
            readiness = [v for server in current.values() for k, v in server.items() if "live" not in k.lower()]
            return True if all(v is expected for v in readiness) else current

        assert all_ready(True) is True
        _drop_batch_tables(own)
        _wait_for("every surface not ready", lambda: all_ready(False))  # checked at most every 10 s
        scored = httpx.post(
            f"{config.url}/v1/models/{MODEL_NAME}:predict",
            json={"instances": [_transaction("LOST1")]},
            timeout=30,
        )
        assert scored.status_code == 200, scored.text  # out of rotation, not refusing what reaches it
        predictor_log = (config.log_dir / "predictor.log").read_text()
        assert "not ready: " in predictor_log and "rebuild-online" in predictor_log
        assert "Traceback" not in predictor_log
        assert not any("not ready" in status for status in statuses)  # started ready: no warning
        stack._report_predictor_readiness()  # what `fraud serve` says when it starts on a lost store
        assert "warning: the predictor is up but not ready" in statuses[-1] and "rebuild-online" in statuses[-1]
        rebuild_online(online="sqlite")
        _wait_for("every surface ready again", lambda: all_ready(True))
        assert "ready again: " + MODEL_NAME in (config.log_dir / "predictor.log").read_text()
        assert stack.predictor is not None and stack.predictor.alive()  # no restart
    finally:
        stack.stop()


def _transaction(transaction_id: str) -> dict:
    customers, terminals = _entities(Path(os.environ["FRAUD_DATA_DIR"]))
    return {
        "transaction_id": transaction_id,
        "customer_id": customers[0],
        "terminal_id": terminals[0],
        "tx_amount": 42.0,
        "tx_datetime": "2024-03-10T12:00:00Z",
    }
