"""`fraud registry register --bundle DIR`: the pipeline's bundle validation plus a load check,
then a new registered version (alias challenger) that `fraud deploy` can roll out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xgboost as xgb

from fraud import registry
from fraud.bundle import MANIFEST_FILE, MODEL_CARD_FILE
from fraud.commands.registry import check_bundle
from fraud.errors import UserError
from tests.factories import make_synthetic_bundle, restamp_bundle_digests, synthetic_feature_matrix


@pytest.mark.slow  # three `fraud` processes, each importing MLflow: ~30 s on an idle 2-core machine
def test_register_a_bundle_and_refuse_broken_ones(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry.ensure_experiment(uri=uri)
    bundle = make_synthetic_bundle(tmp_path / "hotfix", version="0")
    fraud = Path(sys.executable).parent / "fraud"  # the real console entry point
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir)}

    def run(path):
        args = ["registry", "register", "--bundle", str(path), "--mlflow-tracking-uri", uri, "--description", "hot-fix"]
        done = subprocess.run([str(fraud), *args], capture_output=True, text=True, env=env, timeout=300, check=False)
        return done.returncode, done.stdout + done.stderr

    code, output = run(bundle)
    assert code == 0, output
    assert "version 1" in output and "fraud deploy --version 1" in output
    assert registry.get_version_by_alias("challenger", uri=uri) == "1"
    version = registry.client(uri).get_model_version(registry.MODEL_NAME, "1")
    assert version.tags["registered_by"] == "cli" and version.description == "hot-fix"
    stored = registry.download_bundle(f"models:/{registry.MODEL_NAME}/1", tmp_path / "stored", uri=uri)
    assert json.loads((stored / MANIFEST_FILE).read_text())["model_version"] == "1"

    # no model card: the pipeline's validation refuses it, nothing is registered
    no_card = tmp_path / "no-card"
    shutil.copytree(bundle, no_card)
    (no_card / MODEL_CARD_FILE).unlink()
    code, output = run(no_card)
    assert code == 2 and "model_card.md" in output

    # a model that loads but returns two outputs per row
    two = tmp_path / "two-outputs"
    shutil.copytree(bundle, two)
    features, label = synthetic_feature_matrix(300, 0)
    booster = xgb.train(
        {"objective": "multi:softprob", "num_class": 2, "nthread": 1},
        xgb.DMatrix(features, label=label, feature_names=list(features.columns)),
        num_boost_round=2,
    )
    booster.save_model(two / "model.ubj")
    restamp_bundle_digests(two)
    code, output = run(two)
    assert code == 2 and "one fraud probability per row" in output
    assert "Traceback" not in output

    # a file that is not a model, a directory that does not exist (the same check, in-process)
    (two / "model.ubj").write_bytes(b"not a model")
    restamp_bundle_digests(two)
    with pytest.raises(UserError, match="does not load as an XGBoost model"):
        check_bundle(two)
    with pytest.raises(UserError, match="does not exist"):
        check_bundle(tmp_path / "nowhere")
    versions = registry.client(uri).search_model_versions(f"name='{registry.MODEL_NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
