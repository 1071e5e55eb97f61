"""Drift monitoring of the model's input feature vectors with Alibi Detect.

Two detectors watch the same stream of vectors (one per scored transaction, columns in the
bundle's `feature_names` order):

* a **batch detector** (`alibi_detect.cd.TabularDrift`): every time a window of `window_size`
  vectors fills, each feature of the window is compared with the reference sample — a two-sample
  Kolmogorov-Smirnov test for numeric features and a chi-squared test for the bundle's
  `categorical_features` — with a Bonferroni (or FDR) correction for the window-level flag;
* an **online detector** (`alibi_detect.cd.CVMDriftOnline`) on a few key numeric features,
  updated per vector, with thresholds configured for an expected run time (`ert`, in vectors)
  between false alarms. Configuring its thresholds takes seconds (bootstrap simulation, numba
  compilation), so it is built on the worker thread at start; the monitor reports `configured`
  (and the transformer reports ready) only once it is. Each update costs a fixed amount of CPU per
  vector, so the online detector is fed at most `online_max_vectors_per_second` vectors per second
  (a token bucket, evenly spaced within each batch); the rest are skipped and counted. The batch
  detector always sees every vector.

`DriftMonitor.submit` never blocks the request path: vectors go into a bounded queue drained by
one background thread; when the queue is full the vectors are dropped and counted.

This module reads the serving bundle with the standard library and numpy only; it must not import
the core `fraud` package (which runs on another numpy).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

MANIFEST_FILE = "bundle.json"
REFERENCE_FILE = "reference_features.npy"

#: Key numeric features watched by the online detector when they are in the bundle.
DEFAULT_ONLINE_FEATURES: tuple[str, ...] = ("tx_amount_feature", "amount_to_customer_avg_30d", "terminal_risk_7d")


class DriftConfigError(ValueError):
    """The bundle or the monitor options cannot configure a drift monitor."""


@dataclass(frozen=True)
class DriftReference:
    """What the monitor needs from the serving bundle."""

    model_name: str
    model_version: str
    feature_names: tuple[str, ...]
    categorical_features: tuple[str, ...]
    reference: np.ndarray

    def __post_init__(self) -> None:
        if not self.feature_names:
            raise DriftConfigError("the bundle lists no feature_names")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise DriftConfigError("the bundle's feature_names contain duplicates")
        unknown = sorted(set(self.categorical_features) - set(self.feature_names))
        if unknown:
            raise DriftConfigError(f"categorical_features {unknown} are not in feature_names")
        if self.reference.ndim != 2 or self.reference.shape[1] != len(self.feature_names):
            raise DriftConfigError(
                f"{REFERENCE_FILE} must have shape [n, {len(self.feature_names)}], got {list(self.reference.shape)}"
            )
        if self.reference.shape[0] < 10:
            raise DriftConfigError(f"{REFERENCE_FILE} has {self.reference.shape[0]} rows; at least 10 are needed")
        if not np.isfinite(self.reference).all():
            raise DriftConfigError(f"{REFERENCE_FILE} contains NaN or infinite values")

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def from_bundle(cls, bundle_dir: Path | str) -> DriftReference:
        """Read bundle.json and reference_features.npy of a serving bundle directory."""
        bundle_dir = Path(bundle_dir)
        manifest_path = bundle_dir / MANIFEST_FILE
        reference_path = bundle_dir / REFERENCE_FILE
        if not manifest_path.is_file():
            raise DriftConfigError(f"no {MANIFEST_FILE} in {bundle_dir}")
        if not reference_path.is_file():
            raise DriftConfigError(f"no {REFERENCE_FILE} in {bundle_dir}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DriftConfigError(f"cannot read {manifest_path}: {exc}") from None
        if not isinstance(manifest, dict):
            raise DriftConfigError(f"{manifest_path} is not a JSON object")
        feature_names = manifest.get("feature_names")
        if not isinstance(feature_names, list) or not all(isinstance(n, str) for n in feature_names):
            raise DriftConfigError(f"{manifest_path}: feature_names must be a list of strings")
        categorical = manifest.get("categorical_features", [])
        if not isinstance(categorical, list) or not all(isinstance(n, str) for n in categorical):
            raise DriftConfigError(f"{manifest_path}: categorical_features must be a list of strings")
        try:
            reference = np.load(reference_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DriftConfigError(f"cannot read {reference_path}: {exc}") from None
        return cls(
            model_name=str(manifest.get("model_name", "")),
            model_version=str(manifest.get("model_version", "")),
            feature_names=tuple(feature_names),
            categorical_features=tuple(categorical),
            reference=np.asarray(reference, dtype=np.float64),
        )


@dataclass(frozen=True)
class MonitorConfig:
    """Options of the drift monitor (CLI flags of the transformer)."""

    #: vectors per batch-detector window
    window_size: int = 500
    #: significance level of the per-feature tests (before correction)
    p_val: float = 0.05
    #: multiple-testing correction of the window-level flag: "bonferroni" or "fdr"
    correction: str = "bonferroni"
    #: features of the online detector; those missing from the bundle or categorical are skipped
    online_features: tuple[str, ...] = DEFAULT_ONLINE_FEATURES
    #: expected run time (in vectors) between false alarms of the online detector; 0 disables it
    online_ert: float = 1000.0
    #: sliding-window sizes of the online detector
    online_window_sizes: tuple[int, ...] = (100,)
    #: bootstrap simulations used to configure the online thresholds; None: 10% above the minimum
    #: CVMDriftOnline needs for ert, window sizes and feature count (see `min_online_bootstraps`)
    online_bootstraps: int | None = None
    #: capacity (in submitted batches) of the queue between the request path and the worker
    queue_capacity: int = 1000
    #: most vectors per second fed to the online detector (burst: one second's worth); the others
    #: are skipped and counted. 0: no limit (every vector, whatever it costs)
    online_max_vectors_per_second: float = 50.0
    #: most vectors per second fed to the batch (window) detector: above it the windows are filled
    #: with an even sample of the traffic (one window test costs ~7-15 ms; at 10,000 vectors/s
    #: every vector would mean 20 tests a second). 0: no limit
    window_max_vectors_per_second: float = 2000.0

    def __post_init__(self) -> None:
        if self.window_size < 2:
            raise DriftConfigError(f"window_size must be >= 2, got {self.window_size}")
        if not (0.0 < self.p_val < 1.0):
            raise DriftConfigError(f"p_val must be in (0, 1), got {self.p_val}")
        if self.correction not in ("bonferroni", "fdr"):
            raise DriftConfigError(f"correction must be 'bonferroni' or 'fdr', got {self.correction!r}")
        if self.online_ert < 0:
            raise DriftConfigError(f"online_ert must be >= 0, got {self.online_ert}")
        if self.online_ert and (not self.online_window_sizes or min(self.online_window_sizes) < 2):
            raise DriftConfigError(f"online_window_sizes must be sizes >= 2, got {list(self.online_window_sizes)}")
        if self.online_bootstraps is not None and self.online_bootstraps < 100:
            raise DriftConfigError(f"online_bootstraps must be >= 100, got {self.online_bootstraps}")
        if self.queue_capacity < 1:
            raise DriftConfigError(f"queue_capacity must be >= 1, got {self.queue_capacity}")
        if not (0.0 <= self.online_max_vectors_per_second < float("inf")):
            raise DriftConfigError(
                f"online_max_vectors_per_second must be >= 0 (0: no limit), got {self.online_max_vectors_per_second}"
            )
        if not (0.0 <= self.window_max_vectors_per_second < float("inf")):
            raise DriftConfigError(
                f"window_max_vectors_per_second must be >= 0 (0: no limit), got {self.window_max_vectors_per_second}"
            )

    def min_online_bootstraps(self, n_features: int) -> int:
        """Fewest bootstrap streams from which CVMDriftOnline can estimate its thresholds.

        It calibrates each feature to beta = 1 - (1 - 1/ert)^(1/n_features) and estimates the
        (1 - beta) quantile of the simulated statistics at every step from min(window) - 1 to
        2 * max(window) - 2, dropping the streams above the threshold after each step (at least one,
        about beta * N). A quantile of level 1 - beta needs at least 1/beta streams left at the end.
        """
        if not self.online_ert or not self.online_window_sizes or n_features < 1:
            return 0
        beta = 1.0 - (1.0 - 1.0 / self.online_ert) ** (1.0 / n_features)
        steps = 2 * max(self.online_window_sizes) - min(self.online_window_sizes)
        return int(np.ceil((1.0 / beta + 1.0) / (1.0 - beta) ** steps)) + steps + 1

    def online_bootstraps_for(self, n_features: int) -> int:
        """The bootstrap count to use: the configured one (checked), or 10% above the minimum."""
        needed = self.min_online_bootstraps(n_features)
        if self.online_bootstraps is None:
            return max(100, int(np.ceil(needed * 1.1)))
        if self.online_bootstraps < needed:
            raise DriftConfigError(
                f"online_bootstraps={self.online_bootstraps} is too few for online_ert={self.online_ert:g}, window "
                f"sizes {list(self.online_window_sizes)} and {n_features} feature(s): at least {needed} are needed "
                "(or leave it unset to choose automatically)"
            )
        return self.online_bootstraps


def online_feature_names(reference: DriftReference, config: MonitorConfig) -> tuple[str, ...]:
    """The configured online features that are numeric features of the bundle; DriftConfigError if none."""
    names = tuple(
        name
        for name in config.online_features
        if name in reference.feature_names and name not in reference.categorical_features
    )
    if not names:
        raise DriftConfigError(
            f"none of the online features {list(config.online_features)} is a numeric feature of the bundle"
        )
    return names


class DriftMetrics:
    """The Prometheus metrics of the monitor, registered in `registry` (the process default by default)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.feature_p_value = Gauge(
            "fraud_drift_feature_p_value", "p-value of the last window's per-feature drift test", ["feature"], **kw
        )
        self.feature_distance = Gauge(
            "fraud_drift_feature_distance",
            "K-S distance (numeric) or chi-squared statistic (categorical) of the last window",
            ["feature"],
            **kw,
        )
        self.feature_drift = Gauge(
            "fraud_drift_feature_drift",
            "1 if the feature drifted in the last window (corrected threshold)",
            ["feature"],
            **kw,
        )
        self.drift_detected = Gauge("fraud_drift_detected", "1 if the last evaluated window drifted", **kw)
        self.windows_evaluated = Counter("fraud_drift_windows_evaluated", "windows tested by the batch detector", **kw)
        self.windows_drifted = Counter("fraud_drift_windows_drifted", "windows in which drift was detected", **kw)
        self.window_fill = Gauge("fraud_drift_window_fill", "vectors collected in the current window", **kw)
        self.window_size = Gauge("fraud_drift_window_size", "vectors per batch-detector window", **kw)
        self.online_ready = Gauge(
            "fraud_drift_online_ready", "1 once the online detector's thresholds are configured", **kw
        )
        self.online_test_statistic = Gauge(
            "fraud_drift_online_test_statistic",
            "online CVM test statistic per feature and sliding window size",
            ["feature", "window_size"],
            **kw,
        )
        self.online_threshold = Gauge(
            "fraud_drift_online_threshold", "online detector threshold at the current time", **kw
        )
        self.online_drift = Gauge("fraud_drift_online_detected", "1 if the online detector currently flags drift", **kw)
        self.online_vectors_updated = Counter(
            "fraud_drift_online_vectors_updated", "feature vectors fed to the online detector", **kw
        )
        self.online_vectors_skipped = Counter(
            "fraud_drift_online_vectors_skipped",
            "feature vectors not fed to the online detector (over online_max_vectors_per_second, or received "
            "while it was not configured)",
            **kw,
        )
        self.window_vectors_skipped = Counter(
            "fraud_drift_window_vectors_skipped",
            "feature vectors not put into the batch detector's windows (over window_max_vectors_per_second: "
            "the windows hold an even sample of the traffic)",
            **kw,
        )
        self.online_detections = Counter(
            "fraud_drift_online_detections", "vectors at which the online detector flagged drift", **kw
        )
        self.vectors_received = Counter("fraud_drift_vectors_received", "feature vectors accepted into the queue", **kw)
        self.vectors_processed = Counter(
            "fraud_drift_vectors_processed", "feature vectors processed by the detectors", **kw
        )
        self.queue_dropped = Counter(
            "fraud_drift_queue_dropped_vectors", "feature vectors dropped because the monitor queue was full", **kw
        )
        self.queue_depth = Gauge("fraud_drift_queue_depth", "batches waiting in the monitor queue", **kw)
        self.invalid_vectors = Counter(
            "fraud_drift_invalid_vectors", "feature vectors rejected (wrong width or not finite)", **kw
        )
        self.detection_seconds = Histogram(
            "fraud_drift_detection_seconds",
            "time spent in a detector",
            ["detector"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            **kw,
        )


@dataclass(frozen=True)
class WindowResult:
    """Outcome of one batch-detector window."""

    is_drift: bool
    threshold: float
    p_values: dict[str, float]
    distances: dict[str, float]
    drifted_features: tuple[str, ...]


@dataclass(frozen=True)
class OnlineResult:
    is_drift: bool
    threshold: float
    #: feature -> window size -> statistic
    test_statistics: dict[str, dict[int, float]] = field(default_factory=dict)


class WindowDriftDetector:
    """TabularDrift over consecutive, non-overlapping windows of `window_size` vectors."""

    def __init__(self, reference: DriftReference, config: MonitorConfig) -> None:
        from alibi_detect.cd import TabularDrift

        self.feature_names = reference.feature_names
        self.window_size = config.window_size
        categorical_idx = {reference.feature_names.index(name): None for name in reference.categorical_features}
        self._detector = TabularDrift(
            reference.reference,
            p_val=config.p_val,
            categories_per_feature=categorical_idx,
            correction=config.correction,
        )
        self._buffer = np.empty((config.window_size, reference.n_features), dtype=np.float64)
        self._fill = 0

    @property
    def fill(self) -> int:
        return self._fill

    def add(self, vectors: np.ndarray) -> list[WindowResult]:
        """Append vectors; test and return every window that fills."""
        results: list[WindowResult] = []
        start = 0
        while start < len(vectors):
            take = min(self.window_size - self._fill, len(vectors) - start)
            self._buffer[self._fill : self._fill + take] = vectors[start : start + take]
            self._fill += take
            start += take
            if self._fill == self.window_size:
                results.append(self.evaluate(self._buffer))
                self._fill = 0
        return results

    def evaluate(self, window: np.ndarray) -> WindowResult:
        prediction = self._detector.predict(window, drift_type="batch", return_p_val=True, return_distance=True)
        data = prediction["data"]
        threshold = float(data["threshold"])
        p_values = np.asarray(data["p_val"], dtype=np.float64)
        distances = np.asarray(data["distance"], dtype=np.float64)
        drifted = tuple(name for name, p in zip(self.feature_names, p_values, strict=True) if p < threshold)
        return WindowResult(
            is_drift=bool(data["is_drift"]),
            threshold=threshold,
            p_values=dict(zip(self.feature_names, p_values.tolist(), strict=True)),
            distances=dict(zip(self.feature_names, distances.tolist(), strict=True)),
            drifted_features=drifted,
        )


class OnlineDriftDetector:
    """CVMDriftOnline on a subset of numeric features, updated one vector at a time."""

    def __init__(self, reference: DriftReference, config: MonitorConfig) -> None:
        from alibi_detect.cd import CVMDriftOnline

        names = online_feature_names(reference, config)
        self.feature_names = names
        self.window_sizes = tuple(int(w) for w in config.online_window_sizes)
        self._columns = np.array([reference.feature_names.index(n) for n in names])
        self._detector = CVMDriftOnline(
            reference.reference[:, self._columns],
            ert=config.online_ert,
            window_sizes=list(self.window_sizes),
            n_bootstraps=config.online_bootstraps_for(len(names)),
            verbose=False,
        )

    def update(self, vector: np.ndarray) -> OnlineResult:
        data = self._detector.predict(vector[self._columns], return_test_stat=True)["data"]
        stats = np.asarray(data["test_stat"], dtype=np.float64).reshape(len(self.window_sizes), len(self.feature_names))
        return OnlineResult(
            is_drift=bool(data["is_drift"]),
            threshold=float(np.asarray(data["threshold"]).ravel()[0]),
            test_statistics={
                name: {w: float(stats[i, j]) for i, w in enumerate(self.window_sizes)}
                for j, name in enumerate(self.feature_names)
            },
        )


class OnlineRateLimiter:
    """Token bucket choosing which vectors of each batch the online detector sees.

    Holds at most one second's worth (`rate`, at least 1) of tokens, refilled at `rate` per second;
    a batch of n vectors takes min(n, tokens) of them, spread evenly over the batch so that the
    sample follows the whole stream rather than the head of each batch. `rate` 0 admits everything.
    """

    def __init__(
        self, rate: float, clock: Callable[[], float] = time.monotonic, name: str = "online_max_vectors_per_second"
    ) -> None:
        if rate < 0:
            raise DriftConfigError(f"{name} must be >= 0, got {rate}")
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def admit(self, n: int) -> np.ndarray:
        """Indices (ascending) of the vectors of an n-vector batch to feed to the online detector."""
        if n <= 0:
            return np.empty(0, dtype=np.intp)
        if not self.rate:
            return np.arange(n)
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        take = min(n, int(self._tokens))
        self._tokens -= take
        if take == n:
            return np.arange(n)
        return (np.arange(take) * n) // take if take else np.empty(0, dtype=np.intp)


class DriftMonitor:
    """Feeds submitted feature vectors to the batch and online detectors on a background thread."""

    def __init__(
        self,
        reference: DriftReference,
        config: MonitorConfig | None = None,
        metrics: DriftMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reference = reference
        self.config = config or MonitorConfig()
        self.metrics = metrics or DriftMetrics()
        self.window_detector = WindowDriftDetector(reference, self.config)
        if self.config.online_ert:
            # fail at start-up, not later on the worker thread that configures the detector
            self.config.online_bootstraps_for(len(online_feature_names(reference, self.config)))
        self.online_detector: OnlineDriftDetector | None = None
        self.online_limiter = OnlineRateLimiter(self.config.online_max_vectors_per_second, clock)
        self.window_limiter = OnlineRateLimiter(
            self.config.window_max_vectors_per_second, clock, name="window_max_vectors_per_second"
        )
        #: set once the monitor is fully configured (online detector built, or disabled)
        self._configured = threading.Event()
        #: why configuring the online detector failed (the monitor then never becomes configured)
        self.configuration_error: str | None = None
        self.last_window: WindowResult | None = None
        self.last_online: OnlineResult | None = None
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=self.config.queue_capacity)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self.metrics.window_size.set(self.config.window_size)
        self.metrics.window_fill.set(0)
        self.metrics.online_ready.set(0)
        for name in reference.feature_names:
            # expose every feature from the start so dashboards see the series before the first window
            self.metrics.feature_drift.labels(feature=name).set(0)

    # --- request path -------------------------------------------------------------------------
    def submit(self, vectors: np.ndarray | list[list[float]]) -> bool:
        """Queue vectors for detection without blocking; False (and counted) if the queue is full."""
        batch = np.asarray(vectors, dtype=np.float64)
        if batch.ndim == 1:
            batch = batch.reshape(1, -1)
        if batch.size == 0:
            return True
        with self._lock:
            try:
                self._queue.put_nowait(batch)
            except queue.Full:
                self.metrics.queue_dropped.inc(len(batch))
                return False
            self._pending += 1
        self.metrics.vectors_received.inc(len(batch))
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    # --- worker --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent); it first configures the online detector."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish the queued work and exit."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("drift monitor queue still full at shutdown; queued vectors are discarded")
        self._thread.join(timeout)
        self._thread = None

    @property
    def configured(self) -> bool:
        """True once both detectors are ready: the online one configured (or disabled by online_ert=0)."""
        return self._configured.is_set()

    def wait_configured(self, timeout: float | None = None) -> bool:
        """Block until `configured` (True) or the timeout passes (False)."""
        return self._configured.wait(timeout)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every submitted batch has been processed (for tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def build_online_detector(self) -> None:
        """Configure the online detector's thresholds (seconds of bootstrap); no-op if disabled."""
        if not self.config.online_ert or self.online_detector is not None:
            return
        logger.info("configuring the online drift detector's thresholds (not ready until done)")
        started = time.perf_counter()
        self.online_detector = OnlineDriftDetector(self.reference, self.config)
        self.metrics.online_ready.set(1)
        logger.info(
            "online drift detector ready on %s (ert=%s, windows=%s) in %.1fs",
            list(self.online_detector.feature_names),
            self.config.online_ert,
            list(self.config.online_window_sizes),
            time.perf_counter() - started,
        )

    def configure(self) -> bool:
        """Build the online detector (if enabled) and mark the monitor configured; False if that failed."""
        try:
            self.build_online_detector()
        except Exception as exc:  # the batch detector keeps working, but the monitor never reports configured
            self.configuration_error = f"{type(exc).__name__}: {exc}"
            logger.exception(
                "could not configure the online drift detector; the transformer will not report ready "
                "(the batch detector keeps running)"
            )
            return False
        self._configured.set()
        return True

    def _run(self) -> None:
        self.configure()
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self.process(batch)
            except Exception:
                logger.exception("drift detection failed on a batch of %d vectors", len(batch))
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
                self.metrics.queue_depth.set(self._queue.qsize())

    def process(self, vectors: np.ndarray) -> list[WindowResult]:
        """Run the detectors on vectors synchronously; returns the windows that completed."""
        batch = np.asarray(vectors, dtype=np.float64)
        if batch.ndim == 1:
            batch = batch.reshape(1, -1)
        if batch.ndim != 2 or batch.shape[1] != self.reference.n_features:
            self.metrics.invalid_vectors.inc(batch.shape[0] if batch.ndim >= 1 else 1)
            logger.warning(
                "dropping %s feature vectors of shape %s: expected width %d",
                batch.shape[0] if batch.ndim else 1,
                list(batch.shape),
                self.reference.n_features,
            )
            return []
        finite = np.isfinite(batch).all(axis=1)
        if not finite.all():
            self.metrics.invalid_vectors.inc(int((~finite).sum()))
            batch = batch[finite]
        if self.online_detector is not None:
            admitted = self.online_limiter.admit(len(batch))
            if len(admitted) < len(batch):
                self.metrics.online_vectors_skipped.inc(len(batch) - len(admitted))
            if len(admitted):
                with self.metrics.detection_seconds.labels(detector="online").time():
                    for vector in batch[admitted]:
                        self._record_online(self.online_detector.update(vector))
                self.metrics.online_vectors_updated.inc(len(admitted))
        elif self.config.online_ert:
            self.metrics.online_vectors_skipped.inc(len(batch))
        sampled = self.window_limiter.admit(len(batch))
        window_batch = batch if len(sampled) == len(batch) else batch[sampled]
        if len(sampled) < len(batch):
            self.metrics.window_vectors_skipped.inc(len(batch) - len(sampled))
        with self.metrics.detection_seconds.labels(detector="batch").time():
            results = self.window_detector.add(window_batch)
        for result in results:
            self._record_window(result)
        self.metrics.window_fill.set(self.window_detector.fill)
        self.metrics.vectors_processed.inc(len(batch))
        return results

    def _record_window(self, result: WindowResult) -> None:
        self.last_window = result
        for name in self.reference.feature_names:
            self.metrics.feature_p_value.labels(feature=name).set(result.p_values[name])
            self.metrics.feature_distance.labels(feature=name).set(result.distances[name])
            self.metrics.feature_drift.labels(feature=name).set(1 if name in result.drifted_features else 0)
        self.metrics.drift_detected.set(1 if result.is_drift else 0)
        self.metrics.windows_evaluated.inc()
        if result.is_drift:
            self.metrics.windows_drifted.inc()
            logger.warning("feature drift detected in features %s", list(result.drifted_features))

    def _record_online(self, result: OnlineResult) -> None:
        self.last_online = result
        for name, by_window in result.test_statistics.items():
            for window, value in by_window.items():
                self.metrics.online_test_statistic.labels(feature=name, window_size=str(window)).set(value)
        self.metrics.online_threshold.set(result.threshold)
        self.metrics.online_drift.set(1 if result.is_drift else 0)
        if result.is_drift:
            self.metrics.online_detections.inc()
