"""The drift monitor on its own: batch windows, categorical features, the online detector, the queue."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import AMOUNT, CATEGORICAL_FEATURES, FEATURE_NAMES, sample_vectors, write_bundle
from drift_transformer.drift import (
    DriftConfigError,
    DriftMetrics,
    DriftMonitor,
    DriftReference,
    MonitorConfig,
    OnlineRateLimiter,
)
from prometheus_client import CollectorRegistry

BATCH_ONLY = {"online_ert": 0}


def make_monitor(bundle_dir, **config) -> tuple[DriftMonitor, CollectorRegistry]:
    registry = CollectorRegistry()
    options = {"window_size": 500, **BATCH_ONLY, **config}
    monitor = DriftMonitor(DriftReference.from_bundle(bundle_dir), MonitorConfig(**options), DriftMetrics(registry))
    return monitor, registry


def test_reference_like_windows_raise_no_drift(bundle_dir):
    monitor, registry = make_monitor(bundle_dir)
    results = monitor.process(sample_vectors(1000, seed=11))
    assert len(results) == 2
    assert [r.is_drift for r in results] == [False, False]
    assert registry.get_sample_value("fraud_drift_windows_evaluated_total") == 2
    assert registry.get_sample_value("fraud_drift_detected") == 0
    assert registry.get_sample_value("fraud_drift_feature_drift", {"feature": "tx_amount_feature"}) == 0
    p_amount = registry.get_sample_value("fraud_drift_feature_p_value", {"feature": "tx_amount_feature"})
    assert p_amount is not None and p_amount > results[-1].threshold


def test_amount_times_three_raises_drift_on_the_amount_feature(bundle_dir):
    monitor, registry = make_monitor(bundle_dir)
    results = monitor.process(sample_vectors(500, seed=12, amount_factor=3.0))
    assert len(results) == 1
    result = results[0]
    assert result.is_drift
    assert result.drifted_features == ("tx_amount_feature",)
    assert registry.get_sample_value("fraud_drift_detected") == 1
    assert registry.get_sample_value("fraud_drift_windows_drifted_total") == 1
    assert registry.get_sample_value("fraud_drift_feature_drift", {"feature": "tx_amount_feature"}) == 1
    assert registry.get_sample_value("fraud_drift_feature_drift", {"feature": "terminal_risk_7d"}) == 0
    assert registry.get_sample_value("fraud_drift_feature_p_value", {"feature": "tx_amount_feature"}) < 1e-6
    # K-S distance of a x3 gamma(2) shift is large
    assert registry.get_sample_value("fraud_drift_feature_distance", {"feature": "tx_amount_feature"}) > 0.3


def test_window_fills_across_submissions_and_reports_fill(bundle_dir):
    monitor, registry = make_monitor(bundle_dir, window_size=100)
    data = sample_vectors(250, seed=13)
    assert monitor.process(data[:60]) == []
    assert registry.get_sample_value("fraud_drift_window_fill") == 60
    assert len(monitor.process(data[60:250])) == 2
    assert registry.get_sample_value("fraud_drift_window_fill") == 50
    assert registry.get_sample_value("fraud_drift_vectors_processed_total") == 250


def test_categorical_feature_uses_chi_squared_and_detects_a_category_shift(bundle_dir):
    monitor, registry = make_monitor(bundle_dir)
    shifted = sample_vectors(500, seed=14)
    night = FEATURE_NAMES.index("tx_during_night")
    shifted[:, night] = (np.random.default_rng(3).random(500) < 0.9).astype(float)  # 90% night instead of 50%
    (result,) = monitor.process(shifted)
    assert result.drifted_features == ("tx_during_night",)
    # a chi-squared statistic, not a K-S distance bounded by 1
    assert result.distances["tx_during_night"] > 1.0
    assert registry.get_sample_value("fraud_drift_feature_drift", {"feature": "tx_during_night"}) == 1
    assert registry.get_sample_value("fraud_drift_feature_drift", {"feature": "tx_during_weekend"}) == 0


def test_the_same_shift_on_a_numeric_reading_of_a_flag_would_be_ks(bundle_dir, tmp_path):
    """Without the categorical declaration the flag is tested with K-S (distance <= 1)."""
    numeric_bundle = write_bundle(tmp_path / "numeric", categorical_features=[])
    monitor, _ = make_monitor(numeric_bundle)
    shifted = sample_vectors(500, seed=14)
    night = FEATURE_NAMES.index("tx_during_night")
    shifted[:, night] = (np.random.default_rng(3).random(500) < 0.9).astype(float)
    (result,) = monitor.process(shifted)
    assert 0.0 < result.distances["tx_during_night"] <= 1.0


def test_full_queue_drops_and_counts_vectors_then_worker_drains_it(bundle_dir):
    monitor, registry = make_monitor(bundle_dir, window_size=10, queue_capacity=2)
    data = sample_vectors(15, seed=15)
    # the worker is not started yet, so the queue only fills
    assert monitor.submit(data[0:5]) is True
    assert monitor.submit(data[5:10]) is True
    assert monitor.submit(data[10:15]) is False
    assert registry.get_sample_value("fraud_drift_queue_dropped_vectors_total") == 5
    assert registry.get_sample_value("fraud_drift_vectors_received_total") == 10
    monitor.start()
    try:
        assert monitor.wait_idle(timeout=30)
        assert registry.get_sample_value("fraud_drift_vectors_processed_total") == 10
        assert registry.get_sample_value("fraud_drift_windows_evaluated_total") == 1
        assert registry.get_sample_value("fraud_drift_queue_depth") == 0
    finally:
        monitor.stop()


def test_vectors_of_the_wrong_width_or_not_finite_are_counted_not_processed(bundle_dir):
    monitor, registry = make_monitor(bundle_dir, window_size=10)
    assert monitor.process(np.ones((3, len(FEATURE_NAMES) - 1))) == []
    data = sample_vectors(4, seed=16)
    data[1, 0] = np.nan
    monitor.process(data)
    assert registry.get_sample_value("fraud_drift_invalid_vectors_total") == 4
    assert registry.get_sample_value("fraud_drift_vectors_processed_total") == 3


def test_online_detector_flags_a_sustained_amount_shift(bundle_dir):
    np.random.seed(0)  # alibi-detect configures thresholds by bootstrap on numpy's global generator
    monitor, registry = make_monitor(
        bundle_dir,
        window_size=1000,
        online_ert=1000,
        online_window_sizes=(40,),
        online_bootstraps=2500,
        online_features=("tx_amount_feature", "terminal_risk_7d", "not_a_feature"),
        online_max_vectors_per_second=0,  # every vector
    )
    monitor.build_online_detector()
    assert monitor.online_detector.feature_names == ("tx_amount_feature", "terminal_risk_7d")
    assert registry.get_sample_value("fraud_drift_online_ready") == 1
    monitor.process(sample_vectors(120, seed=21))
    assert registry.get_sample_value("fraud_drift_online_detections_total") == 0
    assert registry.get_sample_value("fraud_drift_online_detected") == 0
    monitor.process(sample_vectors(120, seed=18, amount_factor=3.0))
    assert registry.get_sample_value("fraud_drift_online_detections_total") > 0
    assert registry.get_sample_value("fraud_drift_online_detected") == 1
    amount_stat = registry.get_sample_value(
        "fraud_drift_online_test_statistic", {"feature": "tx_amount_feature", "window_size": "40"}
    )
    assert amount_stat > registry.get_sample_value("fraud_drift_online_threshold")


def test_online_detector_rejects_a_feature_list_without_numeric_features(bundle_dir):
    with pytest.raises(DriftConfigError, match="numeric feature"):
        make_monitor(bundle_dir, online_ert=100, online_features=CATEGORICAL_FEATURES)


def test_too_few_online_bootstraps_fail_at_start_up_with_the_number_needed(bundle_dir):
    config = MonitorConfig(online_ert=2000, online_window_sizes=(50,), online_bootstraps=1000)
    needed = config.min_online_bootstraps(3)
    assert needed > 6000  # beta ~ 1/6000 for 3 features
    with pytest.raises(DriftConfigError, match=f"at least {needed} are needed"):
        make_monitor(bundle_dir, online_ert=2000, online_window_sizes=(50,), online_bootstraps=1000)


def test_automatic_online_bootstraps_configure_the_detector(bundle_dir):
    monitor, registry = make_monitor(bundle_dir, online_ert=300, online_window_sizes=(10, 30))
    monitor.build_online_detector()
    assert registry.get_sample_value("fraud_drift_online_ready") == 1
    monitor.process(sample_vectors(40, seed=19))
    assert (
        registry.get_sample_value(
            "fraud_drift_online_test_statistic", {"feature": "amount_to_customer_avg_30d", "window_size": "30"}
        )
        is not None
    )


def test_bundle_errors_name_the_problem(tmp_path):
    with pytest.raises(DriftConfigError, match=r"no bundle.json"):
        DriftReference.from_bundle(tmp_path)
    narrow = write_bundle(tmp_path / "narrow", reference=np.ones((50, 3)))
    with pytest.raises(DriftConfigError, match=r"shape \[n, 16\]"):
        DriftReference.from_bundle(narrow)
    unknown = write_bundle(tmp_path / "unknown", categorical_features=["merchant_category"])
    with pytest.raises(DriftConfigError, match="merchant_category"):
        DriftReference.from_bundle(unknown)
    broken = write_bundle(tmp_path / "broken")
    (broken / "bundle.json").write_text("{not json")
    with pytest.raises(DriftConfigError, match="cannot read"):
        DriftReference.from_bundle(broken)
    nan_ref = sample_vectors(50, seed=1)
    nan_ref[3, AMOUNT] = np.inf
    with pytest.raises(DriftConfigError, match="NaN or infinite"):
        DriftReference.from_bundle(write_bundle(tmp_path / "nan", reference=nan_ref))


def test_reference_reads_the_manifest(bundle_dir):
    reference = DriftReference.from_bundle(bundle_dir)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert reference.feature_names == tuple(manifest["feature_names"])
    assert reference.categorical_features == CATEGORICAL_FEATURES
    assert reference.model_version == "7"
    assert reference.reference.shape == (500, 16)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"window_size": 1}, "window_size"),
        ({"p_val": 0.0}, "p_val"),
        ({"correction": "holm"}, "correction"),
        ({"online_ert": 100, "online_window_sizes": ()}, "online_window_sizes"),
        ({"queue_capacity": 0}, "queue_capacity"),
        ({"online_max_vectors_per_second": -1.0}, "online_max_vectors_per_second"),
    ],
)
def test_monitor_config_rejects_bad_options(options, message):
    with pytest.raises(DriftConfigError, match=message):
        MonitorConfig(**options)


class ManualClock:
    """A clock the test moves forward explicitly (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_admits_a_burst_then_the_rate_spread_over_each_batch():
    clock = ManualClock()
    limiter = OnlineRateLimiter(50.0, clock)
    assert limiter.admit(30).tolist() == list(range(30))  # within the one-second burst
    admitted = limiter.admit(100)  # 20 tokens left
    assert len(admitted) == 20
    assert admitted.tolist() == list(range(0, 100, 5))  # evenly spread, not the head of the batch
    assert len(limiter.admit(10)) == 0
    clock.now += 0.5  # 25 tokens
    assert len(limiter.admit(100)) == 25
    clock.now += 60.0  # refills to the burst, not beyond
    assert len(limiter.admit(1000)) == 50
    assert OnlineRateLimiter(0.0, clock).admit(5000).tolist() == list(range(5000))  # 0: no limit


def test_online_updates_are_capped_while_the_batch_detector_sees_every_vector(bundle_dir):
    np.random.seed(0)
    clock = ManualClock()
    registry = CollectorRegistry()
    config = MonitorConfig(
        window_size=300, online_ert=300, online_window_sizes=(20,), online_max_vectors_per_second=100
    )
    monitor = DriftMonitor(DriftReference.from_bundle(bundle_dir), config, DriftMetrics(registry), clock=clock)
    assert not monitor.configured
    # vectors that arrive before the online detector is configured are not fed to it, and counted
    monitor.process(sample_vectors(50, seed=30))
    assert registry.get_sample_value("fraud_drift_online_vectors_skipped_total") == 50
    assert monitor.configure()
    assert monitor.configured
    assert registry.get_sample_value("fraud_drift_online_ready") == 1
    results = monitor.process(sample_vectors(550, seed=31))  # one instant: only the burst of 100
    assert len(results) == 2  # 50 + 550 vectors: two windows of 300
    assert registry.get_sample_value("fraud_drift_vectors_processed_total") == 600
    assert registry.get_sample_value("fraud_drift_online_vectors_updated_total") == 100
    assert registry.get_sample_value("fraud_drift_online_vectors_skipped_total") == 50 + 450
    assert monitor.online_detector._detector.t == 100  # alibi-detect's own count of updates
    # a sustained shift is still detected from the sampled stream: 1 s of batches at 3x the amounts
    for second in range(4):
        clock.now += 1.0
        monitor.process(sample_vectors(400, seed=40 + second, amount_factor=3.0))
    assert registry.get_sample_value("fraud_drift_online_vectors_updated_total") == 500
    assert registry.get_sample_value("fraud_drift_online_detections_total") > 0
    assert registry.get_sample_value("fraud_drift_online_detected") == 1
    assert monitor.last_window is not None and monitor.last_window.is_drift


def test_batch_windows_take_an_even_sample_above_their_rate_and_still_see_a_shift(bundle_dir):
    clock = ManualClock()
    registry = CollectorRegistry()
    config = MonitorConfig(window_size=200, online_ert=0, window_max_vectors_per_second=300)
    monitor = DriftMonitor(DriftReference.from_bundle(bundle_dir), config, DriftMetrics(registry), clock=clock)
    assert monitor.configure()
    results = monitor.process(sample_vectors(1000, seed=50))  # one instant: the burst of 300
    assert len(results) == 1 and monitor.window_detector.fill == 100
    assert registry.get_sample_value("fraud_drift_window_vectors_skipped_total") == 700
    assert registry.get_sample_value("fraud_drift_vectors_processed_total") == 1000  # every vector handled
    assert not results[0].is_drift
    clock.now += 1.0  # a second later: another 300 admitted, evenly over the shifted batch
    results = monitor.process(sample_vectors(3000, seed=51, amount_factor=3.0))
    assert len(results) == 2 and results[-1].is_drift  # 100 old + 100 shifted, then 200 shifted
    assert registry.get_sample_value("fraud_drift_window_vectors_skipped_total") == 700 + 2700
    with pytest.raises(DriftConfigError, match="window_max_vectors_per_second"):
        MonitorConfig(window_max_vectors_per_second=-1)


def test_batch_only_monitor_is_configured_without_an_online_detector(bundle_dir):
    monitor, registry = make_monitor(bundle_dir)
    assert monitor.configure()
    assert monitor.configured and monitor.online_detector is None
    assert registry.get_sample_value("fraud_drift_online_ready") == 0  # no online detector to be ready
    monitor.process(sample_vectors(10, seed=3))
    assert registry.get_sample_value("fraud_drift_online_vectors_skipped_total") == 0
