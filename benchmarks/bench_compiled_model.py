"""The compiled tree model (predictor/compiled.py) against XGBoost on a pipeline's test week:
largest probability difference over every test transaction, and the cost per call (one core,
alternating, medians) for 1 / 100 / 1,000 rows.

    .venv/bin/python benchmarks/bench_compiled_model.py --training-set DIR [--bundle BUNDLE] [--label L]

DIR is a pipeline run's `build-training-set` output (`train_set`, `test_set` Parquet). With
`--bundle` the bundle's model is used; without, a model of the pipeline grid's largest point
(300 trees, depth 6, learning rate 0.05, scale_pos_weight sqrt(neg/pos)) is trained on `train_set`.
Writes results/compiled_model_testweek[_LABEL].json and the docs section
`bench:compiled-model-testweek[-LABEL]` of docs/performance.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline_scale import save_json, write_docs_section
from loadgen import machine_load

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training-set", type=Path, required=True, help="build-training-set output directory")
    parser.add_argument("--bundle", type=Path, help="serving bundle whose model.ubj is compared")
    parser.add_argument("--label")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    import pandas as pd
    import xgboost as xgb

    from fraud.features.definitions import MODEL_FEATURES
    from predictor.compiled import load_compiled_model

    test = pd.read_parquet(args.training_set / "test_set")
    x_test = test[list(MODEL_FEATURES)].to_numpy(dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="fraud-bench-compiled-") as tmp:
        if args.bundle is not None:
            model_file = args.bundle / "model.ubj"
            source = f"bundle {args.bundle}"
        else:
            train = pd.read_parquet(args.training_set / "train_set")
            labels = train["tx_fraud"].to_numpy()
            positives = max(1, int(labels.sum()))
            booster = xgb.train(
                {
                    "objective": "binary:logistic",
                    "max_depth": 6,
                    "eta": 0.05,
                    "scale_pos_weight": math.sqrt((len(labels) - positives) / positives),
                    "nthread": 1,
                    "tree_method": "hist",
                },
                xgb.DMatrix(train[list(MODEL_FEATURES)].to_numpy(dtype=np.float64), label=labels),
                num_boost_round=300,
            )
            model_file = Path(tmp) / "model.ubj"
            booster.save_model(str(model_file))
            source = f"trained on train_set ({len(train):,} rows): 300 trees, depth 6, eta 0.05"
        booster = xgb.Booster(model_file=str(model_file))
        booster.set_param({"nthread": 1})

        def xgb_predict(values: np.ndarray) -> np.ndarray:
            return booster.inplace_predict(values, validate_features=False)

        started = time.perf_counter()
        compiled = load_compiled_model(model_file, xgb_predict, len(MODEL_FEATURES), x_test[:500], None)
        build_s = time.perf_counter() - started
        if compiled is None:
            print("the compiled model could not be built (see the log)", file=sys.stderr)
            return 2
        expected = xgb_predict(x_test).astype(np.float64)
        got = compiled.predict(x_test)
        difference = float(np.max(np.abs(got - expected)))
        timings = []
        for batch in (1, 100, 1000):
            rows = x_test[:batch]
            samples: dict[str, list[float]] = {"xgboost inplace_predict": [], "compiled": []}
            calls = max(1, 2000 // batch)
            for _ in range(args.repeats):
                for name, fn in (("xgboost inplace_predict", xgb_predict), ("compiled", compiled.predict)):
                    begin = time.perf_counter()
                    for _ in range(calls):
                        fn(rows)
                    samples[name].append((time.perf_counter() - begin) / calls)
            timings.append(
                {
                    "batch": batch,
                    **{f"{name} us_per_call": statistics.median(v) * 1e6 for name, v in samples.items()},
                    "speed_up": statistics.median(samples["xgboost inplace_predict"])
                    / statistics.median(samples["compiled"]),
                }
            )
            print(timings[-1], file=sys.stderr)
    report = {
        "benchmark": "compiled_model_testweek",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_compiled_model.py " + " ".join(argv or sys.argv[1:]),
        "machine": {**machine_load(), "python": sys.version.split()[0]},
        "model": source,
        "trees": booster.num_boosted_rounds(),
        "test_rows": len(x_test),
        "test_rows_with_missing_values": int(np.isnan(x_test).any(axis=1).sum()),
        "max_abs_difference": difference,
        "tolerance": 1e-6,
        "equal_within_tolerance": difference <= 1e-6,
        "build_s": build_s,
        "load_average_1m_end": os.getloadavg()[0],
        "timings": timings,
    }
    suffix = f"_{args.label}" if args.label else ""
    save_json(report, RESULTS_DIR / f"compiled_model_testweek{suffix}.json")
    lines = [
        f"Measured {report['date']}; model: {source}; test week: {len(x_test):,} transactions "
        f"({report['test_rows_with_missing_values']:,} with missing values). Largest difference between the "
        f"compiled model's probability and XGBoost's: **{difference:.2e}** (tolerance 1e-6). Build (TL2cgen + gcc, "
        f"at predictor load): {build_s:.1f} s. One core, {args.repeats} alternating repeats, medians; 1-min load "
        f"average {report['machine']['load_average_1m']:.1f} at start, {report['load_average_1m_end']:.1f} at end. "
        f"Command: `{report['command']}`.",
        "",
        "| rows per call | XGBoost `inplace_predict` (µs) | compiled (µs) | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {t['batch']:,} | {t['xgboost inplace_predict us_per_call']:,.1f} | {t['compiled us_per_call']:,.1f} "
        f"| {t['speed_up']:.1f}x |"
        for t in timings
    ]
    section = "compiled-model-testweek" + (f"-{args.label}" if args.label else "")
    write_docs_section("\n".join(lines), (f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"))
    print("\n".join(lines))
    return 0 if difference <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
