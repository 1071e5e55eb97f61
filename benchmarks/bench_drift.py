"""Cost of drift monitoring in the transformer (runs in the drift environment).

* `DriftMonitor.submit` — what a scored request pays on its path: a batch of 1 and of 100 vectors
  put on the bounded queue (microseconds per call; the worker is not running, so nothing competes).
* batch detector: one `TabularDrift` test of a full window (500 and 2000 vectors x 16 features).
* online detector: one `CVMDriftOnline` update (3 features, window 100) per vector, after its
  thresholds are configured (configuration time reported once).
* worker throughput: vectors per second through `DriftMonitor.process` with both detectors.

Vectors are synthetic, shaped like the model's 16 features (2 categorical). Medians over the
repetitions; p90 where it matters.

    cd drift_transformer && .venv/bin/python ../benchmarks/bench_drift.py

Writes benchmarks/results/drift.json and the table between the bench markers of docs/drift.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "drift_transformer"))
sys.path.insert(0, str(ROOT / "drift_transformer" / "tests"))

# after the sys.path lines above: the transformer package and its test helpers live in its own tree
from conftest import sample_vectors, write_bundle  # noqa: E402
from drift_transformer.drift import DriftMetrics, DriftMonitor, DriftReference, MonitorConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "drift.json"
DOC = ROOT / "docs" / "drift.md"
BEGIN, END = "<!-- bench:drift:begin -->", "<!-- bench:drift:end -->"


def timing_row(what: str, timing: dict, unit: str, digits: int) -> str:
    """One markdown row: median and p90 of a timing in us or ms."""
    shown = "µs" if unit == "us" else unit
    median, p90 = timing[f"median_{unit}"], timing[f"p90_{unit}"]
    return f"| {what} | {median:.{digits}f} {shown} | {p90:.{digits}f} {shown} |"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(fn, repetitions: int) -> list[float]:
    samples = []
    for _ in range(repetitions):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def monitor(reference: DriftReference, **options) -> DriftMonitor:
    return DriftMonitor(reference, MonitorConfig(**options), DriftMetrics(CollectorRegistry()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=200)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        reference = DriftReference.from_bundle(write_bundle(Path(tmp) / "bundle"))
    results: dict[str, dict] = {}

    # request path: submit() onto the queue
    for batch in (1, 100):
        m = monitor(reference, online_ert=0, queue_capacity=args.repetitions * 20 + 10)
        vectors = sample_vectors(batch, seed=1)
        samples = time_calls(lambda m=m, vectors=vectors: m.submit(vectors), args.repetitions * 10)
        results[f"submit_batch_{batch}"] = {
            "median_us": statistics.median(samples) * 1e6,
            "p90_us": percentile(samples, 90) * 1e6,
            "p99_us": percentile(samples, 99) * 1e6,
        }

    # batch detector: one full window
    for window in (500, 2000):
        m = monitor(reference, online_ert=0, window_size=window)
        data = sample_vectors(window, seed=2)
        samples = time_calls(lambda m=m, data=data: m.window_detector.evaluate(data), max(10, args.repetitions // 10))
        results[f"window_test_{window}"] = {
            "median_ms": statistics.median(samples) * 1e3,
            "p90_ms": percentile(samples, 90) * 1e3,
        }

    # online detector
    m = monitor(reference, window_size=500, online_ert=1000, online_window_sizes=(100,))
    started = time.perf_counter()
    m.build_online_detector()
    configure_s = time.perf_counter() - started
    stream = sample_vectors(args.repetitions * 5, seed=3)
    per_vector = []
    for vector in stream:
        t0 = time.perf_counter()
        m.online_detector.update(vector)
        per_vector.append(time.perf_counter() - t0)
    results["online_update"] = {
        "median_us": statistics.median(per_vector) * 1e6,
        "p90_us": percentile(per_vector, 90) * 1e6,
        "configure_s": configure_s,
    }

    # worker throughput with both detectors (includes window tests as windows fill)
    data = sample_vectors(5000, seed=4)
    started = time.perf_counter()
    for start in range(0, len(data), 50):
        m.process(data[start : start + 50])
    elapsed = time.perf_counter() - started
    results["worker_throughput"] = {"vectors_per_s": len(data) / elapsed}

    report = {
        "benchmark": "drift",
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "repetitions": args.repetitions,
        "results": results,
    }
    table = "\n".join(
        [
            "| what | median | p90 |",
            "|---|---|---|",
            timing_row("`submit` 1 vector (request path)", results["submit_batch_1"], "us", 1),
            timing_row("`submit` 100 vectors (request path)", results["submit_batch_100"], "us", 1),
            timing_row("TabularDrift test, window 500 x 16", results["window_test_500"], "ms", 1),
            timing_row("TabularDrift test, window 2000 x 16", results["window_test_2000"], "ms", 1),
            timing_row("CVMDriftOnline update (3 features, window 100)", results["online_update"], "us", 0),
            (
                "| CVMDriftOnline threshold configuration (ert 1000, window 100, 3 features, automatic bootstraps) "
                f"| {results['online_update']['configure_s']:.1f} s (once) | |"
            ),
            f"| worker throughput, both detectors | {results['worker_throughput']['vectors_per_s']:.0f} vectors/s | |",
        ]
    )
    print(json.dumps(report, indent=2))
    print(table)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        text = DOC.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
