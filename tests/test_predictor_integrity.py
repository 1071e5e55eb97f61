"""Bundle integrity: bundle.json lists the SHA-256 of every file, bundle.sig optionally signs it
(Ed25519); any changed, added or removed file, a bad signature or a missing one while a public key
is configured makes the predictor refuse the bundle with one line, in process and as
`python -m predictor`. Also the predictor's readiness, which follows the audit spool's backlog,
and the variant and thresholds it records with every decision."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fraud.bundle import (
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    REFERENCE_FILE,
    SIGNATURE_FILE,
    BundleError,
    file_sha256,
    generate_key_pair,
    load_private_key,
    load_public_key,
    read_manifest,
    sign_bundle,
    verify_bundle,
)
from fraud.config import PROJECT_ROOT
from predictor.features import InMemoryFeatureSource
from predictor.model import FraudModel, ModelLoadError, PredictorSettings
from tests.factories import make_synthetic_bundle
from tests.test_audit_support import make_decision
from tests.test_predictor_model import feature_tables


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair(folder / "signing.pem", folder / "public.pem")
    return folder / "signing.pem", folder / "public.pem"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, keys) -> Path:
    bundle = make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "bundle", version="5")
    sign_bundle(bundle, load_private_key(keys[0]))
    return bundle


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(pristine, copy)
    return copy


def test_the_manifest_lists_the_digest_of_every_file(pristine, keys):
    manifest = read_manifest(pristine)
    assert set(manifest.files) == {MODEL_FILE, REFERENCE_FILE, MODEL_CARD_FILE}
    assert manifest.files[MODEL_FILE] == file_sha256(pristine / MODEL_FILE)
    assert verify_bundle(pristine) == manifest
    assert verify_bundle(pristine, load_public_key(keys[1])) == manifest


def _edit_manifest(bundle: Path, **changes) -> None:
    path = bundle / MANIFEST_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


TAMPERING = {
    "changed-file": (
        lambda b: (b / MODEL_FILE).write_bytes((b / MODEL_FILE).read_bytes() + b" "),
        "changed: model.ubj",
    ),
    "added-file": (lambda b: (b / "backdoor.py").write_text("print('hi')"), "not listed in bundle.json: backdoor.py"),
    "removed-file": (lambda b: (b / MODEL_CARD_FILE).unlink(), "has no model_card.md"),
    "removed-listed-file": (lambda b: _edit_manifest(b, files={}), "lists no file digests"),
    "digest-rewritten": (
        lambda b: (
            (b / MODEL_FILE).write_bytes(b"swapped"),
            _edit_manifest(b, files=read_manifest(b).files | {MODEL_FILE: file_sha256(b / MODEL_FILE)}),
        ),
        "not a valid signature",
    ),
    "thresholds-changed": (
        lambda b: _edit_manifest(b, thresholds={"review": 0.99, "decline": 1.0}),
        "not a valid signature",
    ),
    "bad-signature": (
        lambda b: (b / SIGNATURE_FILE).write_text(base64.b64encode(b"\0" * 64).decode()),
        "not a valid signature",
    ),
    "garbage-signature": (lambda b: (b / SIGNATURE_FILE).write_text("not base64!"), "not a valid signature"),
    "missing-signature": (lambda b: (b / SIGNATURE_FILE).unlink(), "has no bundle.sig"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_refused(bundle, keys, case):
    tamper, expected = TAMPERING[case]
    tamper(bundle)
    with pytest.raises(BundleError) as error:
        verify_bundle(bundle, load_public_key(keys[1]))
    assert expected in str(error.value)


def test_mlflow_model_metadata_around_a_registered_bundle_is_not_part_of_it(bundle, keys):
    """A registered version's directory is an MLflow model too: MLflow's own files sit beside the
    bundle and are never read by the servers; any other unlisted file is still refused."""
    from fraud.bundle import MLFLOW_MODEL_FILES

    for name in MLFLOW_MODEL_FILES:
        (bundle / name).write_text("mlflow metadata")
    assert verify_bundle(bundle, load_public_key(keys[1])) == read_manifest(bundle)
    (bundle / "MLmodel.bak").write_text("not MLflow's")
    with pytest.raises(BundleError, match=r"not listed in bundle\.json: MLmodel\.bak"):
        verify_bundle(bundle, load_public_key(keys[1]))


def test_a_signature_by_another_key_is_refused(bundle, tmp_path):
    generate_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    with pytest.raises(BundleError, match="not a valid signature"):
        verify_bundle(bundle, load_public_key(tmp_path / "other.pub"))


def test_registry_stamping_keeps_the_signature_valid(bundle, keys):
    """Registration rewrites model_name, model_version and mlflow_run_id in bundle.json."""
    manifest = read_manifest(bundle)
    stamped = dataclasses.replace(manifest, model_version="42", mlflow_run_id="run-1")
    (bundle / MANIFEST_FILE).write_text(stamped.to_json())
    assert verify_bundle(bundle, load_public_key(keys[1])).model_version == "42"


def test_keys_that_are_not_ed25519_or_unreadable_are_refused(tmp_path):
    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(BundleError, match="cannot read the bundle public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(BundleError, match="cannot read the bundle signing key"):
        load_private_key(tmp_path / "absent.pem")


def _model(bundle: Path, **settings) -> FraudModel:
    customers, terminals = feature_tables()
    return FraudModel(
        "fraud-detector", PredictorSettings(bundle=str(bundle), **settings), InMemoryFeatureSource(customers, terminals)
    )


def test_the_predictor_verifies_before_loading(bundle, keys):
    assert _model(bundle, bundle_public_key=str(keys[1])).load()
    (bundle / MODEL_FILE).write_bytes(b"swapped model")
    model = _model(bundle, bundle_public_key=str(keys[1]))
    with pytest.raises(ModelLoadError) as error:
        model.load()
    assert "changed: model.ubj" in str(error.value) and "\n" not in str(error.value)
    assert model.scorer is None and not model.ready


def test_python_m_predictor_refuses_a_tampered_bundle_with_one_log_line(bundle, keys, tmp_path):
    (bundle / SIGNATURE_FILE).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--bundle", str(bundle), "--model_name", "fraud-detector",
         "--http_port", "0", "--bundle-public-key", str(keys[1])],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "bundle" in line]
    assert len(lines) == 1, result.stderr
    assert "has no bundle.sig but a bundle public key is configured" in lines[0]
    assert "Traceback" not in result.stderr


# --- readiness follows the audit spool -------------------------------------------------------


def _probe(model: FraudModel) -> int:
    """The `/ready` answer; the model's readiness over V1, V2 and gRPC gives the same (one data plane)."""
    from kserve.model_repository import ModelRepository

    from predictor.__main__ import readiness_endpoint
    from predictor.server import ReadinessDataPlane

    registry = ModelRepository()
    registry.update(model)
    dataplane = ReadinessDataPlane(model_registry=registry)
    status = asyncio.run(readiness_endpoint(dataplane)()).status_code
    assert asyncio.run(dataplane.model_ready(model.name)) is (status == 200)
    return status


def test_readiness_turns_false_before_the_spool_refuses(pristine, tmp_path):
    model = _model(
        pristine, audit_spool=str(tmp_path / "spool.db"), audit_spool_max_records=10, audit_stall_seconds=30.0
    )
    assert _probe(model) == 503  # not loaded
    model.load()
    assert _probe(model) == 200
    spool = model.audit_spool
    spool.append([make_decision(i) for i in range(4)])
    assert _probe(model) == 200  # below the high-water mark (5 of 10), fresh
    spool.append([make_decision(4)])
    assert _probe(model) == 503  # at the high-water mark: out of rotation ...
    assert "high-water" in model.not_ready_reason()
    assert asyncio.run(model.healthy())  # ... while KServe still serves it (and never reloads it)
    model.close_audit_trail()

    stalled = _model(pristine, audit_spool=str(tmp_path / "stalled.db"), audit_stall_seconds=30.0)
    stalled.load()
    stalled.audit_spool.append([make_decision(1)])
    stalled.audit_spool._conn.execute("UPDATE spool SET enqueued_at = ?", (time.time() - 31.0,))
    assert _probe(stalled) == 503  # the writer has not taken anything for 31 s
    assert "waits" in stalled.not_ready_reason()
    stalled.close_audit_trail()


# --- what every decision records ------------------------------------------------------------


def test_decisions_record_the_true_variant_and_the_thresholds(pristine, tmp_path):
    """The stable version comes from a file (the rollout's ConfigMap, updated under running pods):
    this pod's version is recorded as canary until it is the stable one."""
    from fraud.audit.records import DecisionRecord
    from predictor.codec import PROTOCOL_V1, parse_v1

    stable_file = tmp_path / "stable-version"
    stable_file.write_text("4\n")
    model = _model(
        pristine,
        audit_spool=str(tmp_path / "spool.db"),
        stable_version_file=str(stable_file),
        thresholds_dir=str(tmp_path / "thresholds"),
    )
    (tmp_path / "thresholds").mkdir()
    (tmp_path / "thresholds" / "review").write_text("0.2")
    (tmp_path / "thresholds" / "decline").write_text("0.9")
    model.load()
    assert model.model_version == "5"
    request = {"instances": [{"transaction_id": "TX-variant-1", "customer_id": "C1", "terminal_id": "T1",
                              "tx_amount": 12.5, "tx_datetime": "2026-11-01T12:00:00"}]}  # fmt: skip
    parsed = parse_v1(request, 10)
    assert parsed.protocol == PROTOCOL_V1
    model.score_and_audit(parsed)
    stable_file.write_text("5\n")  # promoted
    model._stable_version = (-1e9, None)  # skip the refresh interval
    model.score_and_audit(parse_v1({"instances": [{**request["instances"][0], "transaction_id": "TX-variant-2"}]}, 10))
    records = [DecisionRecord.from_payload(p) for p in model.audit_spool.oldest(10).payloads]
    assert [r.variant for r in records] == ["canary", "stable"]
    assert {(r.review_threshold, r.decline_threshold) for r in records} == {(0.2, 0.9)}
    stable_file.unlink()  # no rollout state: the configured variant
    model._stable_version = (-1e9, None)
    assert model.variant_of("5") == "stable"
    model.close_audit_trail()


def test_the_drift_transformer_reads_a_signed_bundle(pristine):
    """The transformer's own environment (no `fraud` package) loads the reference of a bundle that
    carries digests and a signature: the extra manifest field and file do not break it."""
    from fraud.serving_stack import DRIFT_PYTHON

    if not DRIFT_PYTHON.is_file():
        pytest.skip(f"{DRIFT_PYTHON} is absent: run `make setup`")
    assert (pristine / SIGNATURE_FILE).is_file() and read_manifest(pristine).files
    script = (
        "import sys; from drift_transformer.drift import DriftReference; "
        "r = DriftReference.from_bundle(sys.argv[1]); print(r.model_version, r.reference.shape[1])"
    )
    result = subprocess.run(
        [str(DRIFT_PYTHON), "-c", script, str(pristine)], cwd=PROJECT_ROOT / "drift_transformer",
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", str(len(read_manifest(pristine).feature_names))]
