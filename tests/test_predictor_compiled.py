"""The compiled tree model (predictor.compiled): the same probabilities as XGBoost's, and XGBoost
whenever it cannot be built, does not match, or its cache is not private."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from fraud.bundle import MODEL_FILE, REFERENCE_FILE
from fraud.features.definitions import MODEL_FEATURES
from predictor import compiled
from predictor.scoring import BundleScorer
from tests.conftest import require
from tests.factories import make_synthetic_bundle, restamp_bundle_digests, synthetic_feature_matrix

pytestmark = pytest.mark.usefixtures("needs_gcc")


@pytest.fixture(scope="module")
def needs_gcc() -> None:
    import shutil

    require(shutil.which("gcc") is not None, "gcc is not installed (Debian package gcc)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("compiled") / "bundle", version="3")


@pytest.fixture(scope="module")
def deep_bundle(tmp_path_factory) -> Path:
    """A pipeline-sized model (300 trees, depth 6, trained with missing values so the default
    branches matter) in an otherwise synthetic bundle."""
    directory = make_synthetic_bundle(tmp_path_factory.mktemp("compiled-deep") / "bundle", version="4", seed=1)
    features, label = synthetic_feature_matrix(6000, seed=2)
    values = features.to_numpy().copy()
    rng = np.random.default_rng(3)
    values[rng.random(values.shape) < 0.05] = np.nan
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 6, "eta": 0.1, "nthread": 1, "scale_pos_weight": 5.0},
        xgb.DMatrix(values, label=label, feature_names=list(MODEL_FEATURES)),
        num_boost_round=300,
    )
    booster.save_model(str(directory / MODEL_FILE))
    return restamp_bundle_digests(directory)


def hard_rows(booster: xgb.Booster, n_random: int = 4000) -> np.ndarray:
    """Random rows, rows with missing values, and rows whose values sit exactly on, and one float32
    step either side of, every split threshold of the model (where a float32/float64 or `<`/`<=`
    mismatch would show)."""
    rng = np.random.default_rng(7)
    features, _ = synthetic_feature_matrix(n_random, seed=9)
    base = features.to_numpy()
    holes = base.copy()
    holes[rng.random(holes.shape) < 0.2] = np.nan
    splits = booster.trees_to_dataframe()
    splits = splits[splits["Feature"] != "Leaf"]
    index = {name: i for i, name in enumerate(MODEL_FEATURES)}
    edge_rows = []
    for k, (feature, threshold) in enumerate(zip(splits["Feature"], splits["Split"], strict=True)):
        t32 = np.float32(threshold)
        for value in (t32, np.nextafter(t32, np.float32(-np.inf)), np.nextafter(t32, np.float32(np.inf))):
            row = base[k % len(base)].copy()
            row[index[feature]] = float(value)
            edge_rows.append(row)
    return np.vstack([base, holes, np.array(edge_rows), np.full((1, len(MODEL_FEATURES)), np.nan)])


@pytest.mark.parametrize("which", ["bundle", pytest.param("deep_bundle", marks=pytest.mark.slow)])
def test_compiled_probabilities_equal_xgboost(which: str, request, tmp_path) -> None:
    directory: Path = request.getfixturevalue(which)
    booster = xgb.Booster(model_file=str(directory / MODEL_FILE))
    booster.set_param({"nthread": 1})
    model = compiled.load_compiled_model(
        directory / MODEL_FILE,
        lambda v: booster.inplace_predict(v, validate_features=False),
        len(MODEL_FEATURES),
        np.load(directory / REFERENCE_FILE),
        tmp_path / "cache",
    )
    assert model is not None
    rows = hard_rows(booster)
    expected = booster.inplace_predict(rows, validate_features=False).astype(np.float64)
    got = model.predict(rows)
    assert got.dtype == np.float64 and got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-6
    # one row at a time (the single-request path) gives the same answers as the batch
    singles = np.array([model.predict(rows[i : i + 1])[0] for i in range(0, len(rows), 97)])
    np.testing.assert_array_equal(singles, got[::97])
    # the caller's matrix is not modified (missing values are rewritten in a copy)
    assert np.isnan(rows).any()


def test_scorer_uses_compiled_model_and_scores_like_xgboost(bundle: Path, tmp_path) -> None:
    fast = BundleScorer(bundle, compiled="auto", compiled_cache=tmp_path / "cache")
    plain = BundleScorer(bundle, compiled="off")
    assert fast.compiled is not None and plain.compiled is None
    rows = hard_rows(plain.booster, 500)
    a, b = fast.score(rows), plain.score(rows)
    assert np.max(np.abs(a.probabilities - b.probabilities)) <= 1e-6
    assert a.decisions == b.decisions
    assert [[c.feature for c in row] for row in a.reason_codes] == [[c.feature for c in row] for row in b.reason_codes]
    # a second load reuses the cached library
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1
    again = BundleScorer(bundle, compiled="auto", compiled_cache=tmp_path / "cache")
    assert again.compiled is not None and again.compiled.library == fast.compiled.library


def test_without_cache_the_library_is_built_in_a_private_temporary_directory(bundle: Path) -> None:
    scorer = BundleScorer(bundle, compiled="auto")
    assert scorer.compiled is not None
    assert not scorer.compiled.library.exists()  # removed after loading; the mapping stays usable
    assert scorer.score(np.load(bundle / REFERENCE_FILE)[:5]).probabilities.shape == (5,)


def test_no_compiler_falls_back_to_xgboost(bundle: Path, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="kserve.fraud_predictor.compiled"):
        scorer = BundleScorer(bundle, compiled="auto", compiled_cache=tmp_path / "cache")
    assert scorer.compiled is None
    assert "gcc is not installed" in caplog.text and "scoring with XGBoost" in caplog.text
    reference = np.load(bundle / REFERENCE_FILE)[:20]
    expected = scorer.booster.inplace_predict(reference, validate_features=False)
    np.testing.assert_array_equal(scorer.score(reference).probabilities, expected.astype(np.float64))


def test_a_library_that_disagrees_with_xgboost_is_not_used(bundle: Path, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(compiled, "TOLERANCE", -1.0)  # no difference, not even zero, is accepted
    with caplog.at_level(logging.WARNING, logger="kserve.fraud_predictor.compiled"):
        scorer = BundleScorer(bundle, compiled="auto", compiled_cache=tmp_path / "cache")
    assert scorer.compiled is None
    assert "differ from XGBoost" in caplog.text


def test_a_cache_others_can_write_is_not_used(bundle: Path, tmp_path, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="kserve.fraud_predictor.compiled"):
        scorer = BundleScorer(bundle, compiled="auto", compiled_cache=shared)
    assert scorer.compiled is not None  # built in a private temporary directory instead
    assert not list(shared.iterdir())
    assert "writable by others" in caplog.text
    created = tmp_path / "new-cache"
    BundleScorer(bundle, compiled="auto", compiled_cache=created)
    assert stat.S_IMODE(created.stat().st_mode) == 0o700
    assert created.stat().st_uid == os.getuid()


def test_a_broken_build_falls_back(bundle: Path, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(compiled, "_BATCH_SOURCE", "this is not C")
    with caplog.at_level(logging.WARNING, logger="kserve.fraud_predictor.compiled"):
        scorer = BundleScorer(bundle, compiled="auto", compiled_cache=tmp_path / "cache")
    assert scorer.compiled is None
    assert "gcc failed" in caplog.text
    assert not list((tmp_path / "cache").glob("*.so"))


def test_large_batches_go_to_xgboost(bundle: Path, tmp_path, monkeypatch) -> None:
    scorer = BundleScorer(bundle, compiled="auto", compiled_cache=tmp_path / "cache")
    assert scorer.compiled is not None
    calls: list[int] = []
    original = compiled.CompiledModel.predict

    def counting(self, values):
        calls.append(len(values))
        return original(self, values)

    monkeypatch.setattr(compiled.CompiledModel, "predict", counting)
    reference = np.load(bundle / REFERENCE_FILE)
    small = reference[: compiled.MAX_COMPILED_ROWS]
    large = np.vstack([reference, reference])[: compiled.MAX_COMPILED_ROWS + 1]
    scorer.score(small)
    assert calls == [len(small)]
    expected = scorer.booster.inplace_predict(large, validate_features=False).astype(np.float64)
    np.testing.assert_array_equal(scorer.score(large).probabilities, expected)
    assert calls == [len(small)]  # the large batch did not reach the compiled model
