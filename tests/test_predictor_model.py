"""FraudModel in-process (no server, no Feast): parsing, validation, scoring, reason codes,
cold start, staleness, bundle loading. The HTTP/gRPC servers are in test_predictor_server.py."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from kserve.errors import InvalidInput, ServerNotReady
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from prometheus_client import REGISTRY

from fraud.bundle import MODEL_FILE, BundleManifest, file_sha256, read_manifest
from fraud.config import MODEL_NAME
from fraud.features.definitions import (
    BATCH_FEATURE_DEFAULTS,
    CUSTOMER_SPENDING_FEATURES,
    MODEL_FEATURES,
    TERMINAL_RISK_FEATURES,
    model_feature_frame,
)
from fraud.schema import REQUEST_FIELDS
from predictor.edge import REQUEST_SCOPES
from predictor.features import InMemoryFeatureSource
from predictor.idempotency import TransactionConflict
from predictor.model import FraudModel, ModelLoadError, PredictorSettings
from predictor.scoring import resolve_bundle_dir
from tests.factories import make_synthetic_bundle

DAY = pd.Timestamp("2026-03-10")  # a Tuesday


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "fraud-detector", version="7")


def feature_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    customers = pd.DataFrame(
        {
            "customer_id": ["C1", "C2"],
            "snapshot_ts": [DAY, DAY - pd.Timedelta(days=1)],
            **{name: [4.0 + i, 2.0 + i] for i, name in enumerate(CUSTOMER_SPENDING_FEATURES)},
        }
    )
    customers["customer_sum_amount_30d"] = [400.0, 90.0]
    terminals = pd.DataFrame(
        {
            "terminal_id": ["T1", "T2"],
            "snapshot_ts": [DAY, DAY],
            **{name: [0.5, 0.05] for name in TERMINAL_RISK_FEATURES},
        }
    )
    terminals["terminal_nb_tx_7d"] = [40.0, 12.0]
    return customers, terminals


@pytest.fixture(scope="module")
def model(bundle_dir) -> FraudModel:
    customers, terminals = feature_tables()
    fraud_model = FraudModel(
        "fraud-detector",
        PredictorSettings(bundle=str(bundle_dir), max_batch_size=8),
        InMemoryFeatureSource(customers, terminals),
    )
    assert fraud_model.load() is True
    return fraud_model


def tx(i: int = 0, **overrides) -> dict:
    base = {
        "transaction_id": f"TX{i}",
        "customer_id": "C1",
        "terminal_id": "T1",
        "tx_amount": 125.5,
        "tx_datetime": "2026-03-10T14:30:00Z",
    }
    base.update(overrides)
    return base


def call(model: FraudModel, body, scopes: frozenset[str] = frozenset({"score", "debug"})):
    """One request through KServe's model call path, as a caller with `scopes` (default: the
    feature vectors included)."""
    token = REQUEST_SCOPES.set(scopes)
    try:
        response, _headers = asyncio.run(model(body))
    finally:
        REQUEST_SCOPES.reset(token)
    return response


def v2_request(columns: dict[str, tuple[str, list]], shape_suffix: tuple[int, ...] = ()) -> InferRequest:
    inputs = []
    for name, (datatype, values) in columns.items():
        inputs.append(InferInput(name=name, shape=[len(values), *shape_suffix], datatype=datatype, data=values))
    return InferRequest(model_name="fraud-detector", infer_inputs=inputs, request_id="req-1")


def v2_columns(rows: list[dict]) -> dict[str, tuple[str, list]]:
    return {
        "transaction_id": ("BYTES", [r["transaction_id"] for r in rows]),
        "customer_id": ("BYTES", [r["customer_id"] for r in rows]),
        "terminal_id": ("BYTES", [r["terminal_id"] for r in rows]),
        "tx_amount": ("FP64", [r["tx_amount"] for r in rows]),
        "tx_datetime": ("BYTES", [r["tx_datetime"] for r in rows]),
    }


# --- scoring ----------------------------------------------------------------------------------
def test_v1_batch_scores_match_the_booster_and_the_feature_definitions(model, bundle_dir):
    rows = [tx(0), tx(1, customer_id="C2", terminal_id="T2", tx_amount=9.99), tx(2, tx_datetime=1773100800)]
    predictions = call(model, {"instances": rows})["predictions"]
    assert [p["transaction_id"] for p in predictions] == ["TX0", "TX1", "TX2"]

    customers, terminals = feature_tables()
    expected_frame = pd.DataFrame(
        {
            "tx_amount": [r["tx_amount"] for r in rows],
            "tx_datetime": pd.to_datetime(["2026-03-10T14:30:00", "2026-03-10T14:30:00", "2026-03-10T00:00:00"]),
        }
    )
    batch = pd.concat(
        [
            customers.set_index("customer_id")
            .loc[["C1", "C2", "C1"], list(CUSTOMER_SPENDING_FEATURES)]
            .reset_index(drop=True),
            terminals.set_index("terminal_id")
            .loc[["T1", "T2", "T1"], list(TERMINAL_RISK_FEATURES)]
            .reset_index(drop=True),
        ],
        axis=1,
    )
    expected = model_feature_frame(pd.concat([expected_frame, batch], axis=1))
    served = np.array([[p["features"][name] for name in MODEL_FEATURES] for p in predictions])
    np.testing.assert_allclose(served, expected.to_numpy(), rtol=0, atol=1e-12)

    booster = xgb.Booster(model_file=str(bundle_dir / MODEL_FILE))
    direct = booster.predict(xgb.DMatrix(expected, feature_names=list(MODEL_FEATURES)))
    np.testing.assert_allclose([p["fraud_probability"] for p in predictions], direct, rtol=1e-6)
    thresholds = read_manifest(bundle_dir).thresholds
    assert [p["decision"] for p in predictions] == [thresholds.decide(float(p)) for p in direct]
    assert {p["model_version"] for p in predictions} == {"7"}
    assert [p["features_missing"] for p in predictions] == [False, False, False]
    # C2's snapshot is from the day before the transaction: stale; C1/T1/T2 are today's snapshots.
    assert [p["features_stale"] for p in predictions] == [False, True, False]


@pytest.fixture(scope="module")
def explain_all_model(bundle_dir) -> FraudModel:
    customers, terminals = feature_tables()
    fraud_model = FraudModel(
        "fraud-detector",
        PredictorSettings(bundle=str(bundle_dir), max_batch_size=8, reason_codes="all"),
        InMemoryFeatureSource(customers, terminals),
    )
    assert fraud_model.load() is True
    return fraud_model


def expected_reason_codes(bundle_dir: Path, predictions: list[dict]) -> list[list[tuple[str, float]]]:
    """Top positive TreeSHAP contributions per prediction, straight from the booster."""
    manifest: BundleManifest = read_manifest(bundle_dir)
    booster = xgb.Booster(model_file=str(bundle_dir / MODEL_FILE))
    features = pd.DataFrame(
        [[p["features"][n] for n in MODEL_FEATURES] for p in predictions], columns=list(MODEL_FEATURES)
    )
    contribs = booster.predict(xgb.DMatrix(features, feature_names=list(MODEL_FEATURES)), pred_contribs=True)[:, :-1]
    return [
        [(MODEL_FEATURES[j], row[j]) for j in np.argsort(-row) if row[j] > 0][: manifest.max_reason_codes]
        for row in contribs
    ]


def assert_reason_codes(listed: list[dict], positive: list[tuple[str, float]], manifest: BundleManifest) -> None:
    assert [c["feature"] for c in listed] == [name for name, _ in positive]
    np.testing.assert_allclose([c["contribution"] for c in listed], [v for _, v in positive], rtol=1e-5)
    assert [c["description"] for c in listed] == [manifest.reason_codes[name] for name, _ in positive]
    contributions = [c["contribution"] for c in listed]
    assert contributions == sorted(contributions, reverse=True)


REASON_CODE_AMOUNTS = [5.0, 80.0, 400.0, 2500.0, 20.0, 9000.0]


def test_reason_codes_all_are_the_top_positive_shap_contributors(explain_all_model, bundle_dir):
    rows = [tx(i, tx_amount=amount) for i, amount in enumerate(REASON_CODE_AMOUNTS)]
    predictions = call(explain_all_model, {"instances": rows})["predictions"]
    manifest = read_manifest(bundle_dir)
    assert any(len(p["reason_codes"]) == manifest.max_reason_codes for p in predictions)
    for prediction, positive in zip(predictions, expected_reason_codes(bundle_dir, predictions), strict=True):
        assert_reason_codes(prediction["reason_codes"], positive, manifest)


def test_reason_codes_by_default_only_for_transactions_that_are_not_approved(model, bundle_dir):
    rows = [tx(i, tx_amount=amount) for i, amount in enumerate(REASON_CODE_AMOUNTS)]
    predictions = call(model, {"instances": rows})["predictions"]
    decisions = [p["decision"] for p in predictions]
    assert "approve" in decisions and set(decisions) - {"approve"}, f"need both kinds of decision, got {decisions}"
    manifest = read_manifest(bundle_dir)
    for prediction, positive in zip(predictions, expected_reason_codes(bundle_dir, predictions), strict=True):
        if prediction["decision"] == "approve":
            assert prediction["reason_codes"] == []
        else:
            assert positive, "a flagged transaction has at least one positive contribution here"
            assert_reason_codes(prediction["reason_codes"], positive, manifest)


def test_reason_code_policy_is_validated():
    with pytest.raises(ValueError, match="reason_codes must be one of"):
        PredictorSettings(reason_codes="some")


def test_cold_start_scores_with_defaults_and_flags_missing(model):
    predictions = call(
        model, {"instances": [tx(0, customer_id="C-new", terminal_id="T-new"), tx(1, terminal_id="T-new")]}
    )["predictions"]
    assert [p["features_missing"] for p in predictions] == [True, True]
    assert [p["features_stale"] for p in predictions] == [False, False]
    first = predictions[0]["features"]
    assert first["customer_nb_tx_incl_30d"] == 1.0  # zero history + this transaction
    assert first["customer_avg_amount_incl_30d"] == pytest.approx(125.5)
    assert first["amount_to_customer_avg_30d"] == 1.0
    assert all(first[name] == BATCH_FEATURE_DEFAULTS[name] for name in TERMINAL_RISK_FEATURES if name in MODEL_FEATURES)
    assert 0.0 <= predictions[0]["fraud_probability"] <= 1.0


def test_v2_request_returns_named_tensors(model):
    rows = [tx(0), tx(1, customer_id="C-unknown")]
    response = call(model, v2_request(v2_columns(rows), shape_suffix=(1,)))
    assert isinstance(response, InferResponse)
    outputs = {o.name: o for o in response.outputs}
    assert list(outputs) == [
        "transaction_id",
        "fraud_probability",
        "decision",
        "reason_codes",
        "model_version",
        "features_missing",
        "features_stale",
        "feature_vector",
    ]
    assert outputs["feature_vector"].shape == [2, len(MODEL_FEATURES)]
    assert outputs["features_missing"].data == [False, True]
    assert outputs["transaction_id"].data == ["TX0", "TX1"]
    codes = json.loads(outputs["reason_codes"].data[0])
    assert codes and {"feature", "description", "contribution"} <= set(codes[0])
    v1 = call(model, {"instances": rows})["predictions"]
    np.testing.assert_allclose(outputs["fraud_probability"].data, [p["fraud_probability"] for p in v1])


def test_v2_epoch_seconds_equal_iso_timestamps(model):
    columns = v2_columns([tx(0)])
    iso = call(model, v2_request(columns))
    columns["tx_datetime"] = ("INT64", [int(pd.Timestamp("2026-03-10T14:30:00Z").timestamp())])
    epoch = call(model, v2_request(columns))
    assert iso.outputs[7].data == epoch.outputs[7].data


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"instances": [{k: v for k, v in tx().items() if k != "terminal_id"}]},
            "instances[0].terminal_id: is required",
        ),
        ({"instances": [tx(), tx(1, merchant="x")]}, "instances[1].merchant: is not a field"),
        ({"instances": [tx(tx_amount="12.50")]}, "instances[0].tx_amount: must be a number, got str"),
        ({"instances": [tx(customer_id=42)]}, "instances[0].customer_id"),
        ({"instances": [tx(tx_amount=math.nan)]}, "instances[0].tx_amount: must be a finite number"),
        ({"instances": [tx(tx_amount=-3.0)]}, "instances[0].tx_amount: must be > 0"),
        ({"instances": [tx(tx_amount=5e9)]}, "instances[0].tx_amount: must be <= 1000000"),
        ({"instances": [tx(tx_datetime="yesterday")]}, "instances[0].tx_datetime: 'yesterday' is not an ISO-8601"),
        ({"instances": []}, "instances: the batch is empty"),
        ({"instances": [tx(i) for i in range(9)]}, "batch of 9 transactions exceeds the maximum batch size 8"),
        ({"instances": "TX1"}, "instances: must be a list"),
        ({"inputs": []}, "unknown top-level field"),
        ({}, "instances: is required"),
    ],
)
def test_v1_bad_input_names_field_and_reason(model, body, expected):
    with pytest.raises(InvalidInput) as error:
        call(model, body)
    assert expected in str(error.value)


def _wrong_shape():
    request = v2_request(v2_columns([tx(0), tx(1)]))
    request.inputs[3] = InferInput("tx_amount", [1, 2], "FP64", [1.0, 2.0])
    return request


def _mismatched_lengths():
    columns = v2_columns([tx(0), tx(1)])
    columns["terminal_id"] = ("BYTES", ["T1"])
    return v2_request(columns)


@pytest.mark.parametrize(
    ("request_factory", "expected"),
    [
        (_wrong_shape, "input 'tx_amount': shape must be [n] or [n, 1], got [1, 2]"),
        (
            lambda: v2_request({**v2_columns([tx()]), "tx_amount": ("BYTES", ["12"])}),
            "input 'tx_amount': datatype must be FP64",
        ),
        (
            lambda: v2_request({**v2_columns([tx()]), "customer_id": ("INT64", [5])}),
            "input 'customer_id': datatype must be BYTES",
        ),
        (
            lambda: v2_request({k: v for k, v in v2_columns([tx()]).items() if k != "tx_datetime"}),
            "['tx_datetime'] missing",
        ),
        (
            lambda: v2_request({**v2_columns([tx()]), "is_fraud": ("INT64", [1])}),
            "inputs: 6 input tensors given, a request has exactly 5",
        ),
        (
            lambda: v2_request(
                {**{k: v for k, v in v2_columns([tx()]).items() if k != "tx_amount"}, "is_fraud": ("INT64", [1])}
            ),
            "unknown input tensor(s) ['is_fraud']",
        ),
        (_mismatched_lengths, "must all hold the same number of transactions"),
        (lambda: v2_request({**v2_columns([tx()]), "tx_amount": ("FP64", [0.0])}), "input 'tx_amount'[0]: must be > 0"),
        (
            lambda: v2_request({**v2_columns([tx()]), "tx_datetime": ("INT64", [-5])}),
            "input 'tx_datetime'[0]: epoch seconds",
        ),
        (lambda: v2_request({name: (dt, []) for name, (dt, _) in v2_columns([tx()]).items()}), "the batch is empty"),
    ],
)
def test_v2_bad_input_names_tensor_and_reason(model, request_factory, expected):
    with pytest.raises(InvalidInput) as error:
        call(model, request_factory())
    assert expected in str(error.value)


def test_metadata_lists_every_request_field_and_output(model):
    assert [i["name"] for i in model.get_input_types()] == list(REQUEST_FIELDS)
    outputs = {o["name"]: o for o in model.get_output_types()}
    assert outputs["feature_vector"] == {
        "name": "feature_vector",
        "datatype": "FP64",
        "shape": [-1, len(MODEL_FEATURES)],
    }
    assert outputs["features_missing"]["datatype"] == "BOOL"


# --- bundle loading ------------------------------------------------------------------------------
def _load(bundle: str) -> FraudModel:
    customers, terminals = feature_tables()
    fraud_model = FraudModel(
        "fraud-detector", PredictorSettings(bundle=bundle), InMemoryFeatureSource(customers, terminals)
    )
    fraud_model.load()
    return fraud_model


def test_bundle_nested_one_level_as_a_storage_initializer_may_lay_it_out(bundle_dir, tmp_path):
    mount = tmp_path / "mnt-models"
    shutil.copytree(bundle_dir, mount / "fraud-detector")
    assert resolve_bundle_dir(str(mount)) == mount / "fraud-detector"
    assert _load(str(mount)).model_version == "7"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing_dir", "does not exist"),
        ("corrupt_model", "is not a readable XGBoost model"),
        ("no_manifest", "no bundle.json"),
        ("wrong_features", "was trained on features"),
        ("bad_json", "cannot read"),
    ],
)
def test_bad_bundle_refuses_to_load_with_a_clear_reason(bundle_dir, tmp_path, damage, expected):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    manifest_path = target / "bundle.json"
    if damage == "missing_dir":
        target = tmp_path / "nowhere"
    elif damage == "corrupt_model":  # listed with its digest: passes verification, then fails to parse
        (target / MODEL_FILE).write_bytes(b"\x00not a model")
        data = json.loads(manifest_path.read_text())
        data["files"][MODEL_FILE] = file_sha256(target / MODEL_FILE)
        manifest_path.write_text(json.dumps(data))
    elif damage == "no_manifest":
        manifest_path.unlink()
    elif damage == "wrong_features":
        data = json.loads(manifest_path.read_text())
        data["feature_names"] = list(reversed(data["feature_names"]))
        manifest_path.write_text(json.dumps(data))
    elif damage == "bad_json":
        manifest_path.write_text("{not json")
    with pytest.raises(ModelLoadError) as error:
        _load(str(target))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_bundle_from_the_mlflow_registry_by_alias(bundle_dir, data_dir, monkeypatch):
    import mlflow

    from fraud import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.configure()
    with mlflow.start_run(experiment_id=registry.ensure_experiment()) as run:
        mlflow.log_param("purpose", "predictor-test")
    version = registry.register_bundle(bundle_dir, run.info.run_id, alias="champion")
    loaded = _load(f"models:/{MODEL_NAME}@champion")
    assert loaded.model_version == version  # the registry stamps its version into the manifest
    with pytest.raises(ModelLoadError, match="nosuchalias"):
        _load(f"models:/{MODEL_NAME}@nosuchalias")


def test_entry_point_rejects_multiple_workers(capsys):
    from predictor.__main__ import main

    assert main(["--workers", "2", "--bundle", "/nowhere"]) == 2
    assert "--workers must be 1" in capsys.readouterr().err


# --- decision thresholds from a mounted ConfigMap -----------------------------------------------
def test_thresholds_folder_overrides_the_bundle_and_bad_folders_refuse_to_load(bundle_dir, tmp_path):
    from fraud.bundle import DecisionThresholds, read_manifest

    customers, terminals = feature_tables()
    folder = tmp_path / "thresholds"
    folder.mkdir()
    (folder / "review").write_text("0.05\n")
    (folder / "decline").write_text("0.10\n")

    def load(thresholds_dir: str) -> FraudModel:
        fraud_model = FraudModel(
            "fraud-detector",
            PredictorSettings(bundle=str(bundle_dir), thresholds_dir=thresholds_dir),
            InMemoryFeatureSource(customers, terminals),
        )
        fraud_model.load()
        return fraud_model

    assert read_manifest(bundle_dir).thresholds != DecisionThresholds(0.05, 0.10)
    assert load(str(folder)).scorer.manifest.thresholds == DecisionThresholds(review=0.05, decline=0.10)
    # a folder that is not mounted keeps the bundle's thresholds
    assert load(str(tmp_path / "absent")).scorer.manifest.thresholds == read_manifest(bundle_dir).thresholds
    (folder / "decline").write_text("high")
    with pytest.raises(ModelLoadError, match="not a probability"):
        load(str(folder))
    (folder / "decline").write_text("0.01")  # below review
    with pytest.raises(ModelLoadError, match="review <= decline"):
        load(str(folder))
    (folder / "decline").unlink()
    with pytest.raises(ModelLoadError, match="no 'decline' file"):
        load(str(folder))


# --- idempotency (predictor.idempotency) ---------------------------------------------------------------
def ledger_model(bundle_dir, **settings) -> FraudModel:
    customers, terminals = feature_tables()
    fraud_model = FraudModel(
        "fraud-detector",
        PredictorSettings(bundle=str(bundle_dir), max_batch_size=8, **settings),
        InMemoryFeatureSource(customers, terminals),
    )
    assert fraud_model.load() is True
    return fraud_model


@pytest.fixture
def redis_prefix():
    """A key prefix of this test alone in the shared Redis; its keys are deleted afterwards."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({exc})")
    prefix = f"fraud-test-{uuid.uuid4().hex}:"
    yield prefix
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def scored_count() -> float:
    return sum(sample.value for metric in REGISTRY.collect() if metric.name == "fraud_predictor_transactions"
               for sample in metric.samples if sample.name.endswith("_total"))  # fmt: skip


def test_replay_returns_the_recorded_answer_and_other_content_is_a_409(bundle_dir):
    model = ledger_model(bundle_dir, idempotency="memory")
    first = call(model, {"instances": [tx(70), tx(71, customer_id="C2")]})["predictions"]
    before = scored_count()
    again = call(model, {"instances": [tx(70), tx(71, customer_id="C2")]})["predictions"]
    assert again == first and scored_count() == before  # answered from the ledger, not scored again
    with pytest.raises(TransactionConflict, match="'TX70' was already scored with different content"):
        call(model, {"instances": [tx(70, tx_amount=99_999.0)]})
    assert call(model, {"instances": [tx(70)]})["predictions"] == first[:1]  # nothing was overwritten
    mixed = call(model, {"instances": [tx(72), tx(71, customer_id="C2")]})["predictions"]
    assert [p["transaction_id"] for p in mixed] == ["TX72", "TX71"] and mixed[1] == first[1]
    assert scored_count() == before + 1  # only the new transaction was scored
    with pytest.raises(TransactionConflict, match="appears twice in the request"):
        call(model, {"instances": [tx(73), tx(73, tx_amount=1.0)]})


def test_replicas_share_the_redis_ledger(bundle_dir, redis_prefix):
    replica_a = ledger_model(bundle_dir, idempotency="redis", idempotency_prefix=redis_prefix)
    replica_b = ledger_model(bundle_dir, idempotency="redis", idempotency_prefix=redis_prefix)
    answer = call(replica_a, {"instances": [tx(80)]})
    assert call(replica_b, {"instances": [tx(80)]}) == answer
    v2 = call(replica_b, v2_request(v2_columns([tx(80)])))
    assert {o.name: o.data for o in v2.outputs}["fraud_probability"] == [answer["predictions"][0]["fraud_probability"]]
    with pytest.raises(TransactionConflict):
        call(replica_b, {"instances": [tx(80, terminal_id="T2")]})
    with pytest.raises(TransactionConflict):
        call(replica_a, {"instances": [tx(80, tx_datetime="2026-03-10T14:31:00Z")]})


def test_unreachable_redis_ledger_follows_the_degraded_mode(bundle_dir, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("FRAUD_REDIS_URL", f"127.0.0.1:{closed}")
    fail_open = ledger_model(bundle_dir, idempotency="redis", store_timeout_s=0.5)
    assert call(fail_open, {"instances": [tx(90)]})["predictions"][0]["transaction_id"] == "TX90"
    fail_closed = ledger_model(bundle_dir, idempotency="redis", store_timeout_s=0.5, fail_closed=True)
    with pytest.raises(ServerNotReady, match="idempotency ledger is unavailable"):
        call(fail_closed, {"instances": [tx(91)]})


def test_answers_without_the_debug_scope_carry_no_feature_vectors(model):
    plain = call(model, {"instances": [tx(0)]}, scopes=frozenset({"score"}))["predictions"][0]
    assert "features" not in plain and plain["decision"] in ("approve", "review", "decline")
    outputs = [o.name for o in call(model, v2_request(v2_columns([tx(0)])), scopes=frozenset({"score"})).outputs]
    assert "feature_vector" not in outputs and "reason_codes" in outputs
