"""Training on downsampled legitimate transactions (weighted back) vs on everything, Handbook protocol.

Reuses a data directory in which `fraud bench quality` (or `fraud features build` + `fraud features
apply`) has built the offline tables of the default simulation, builds the point-in-time sets of
the Handbook's test week and of its four prequential test blocks, and runs
`fraud.training.quality_bench.downsampling_study` with one XGBoost grid point (default: depth 3,
300 trees, lr 0.05, scale_pos_weight 1, 4,096 histogram bins, the point the full bench selects for
seed 0).

    .venv/bin/python benchmarks/bench_downsampling.py /tmp/quality-seed0/work --legit-per-day 1000 100

Writes benchmarks/results/training_downsampling_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="data directory with raw/, features/ and the applied feast/")
    parser.add_argument("--legit-per-day", type=int, nargs="+", default=[1000, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--n-estimators", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--scale-pos-weight", default="1")
    parser.add_argument("--max-bin", type=int, default=4096, help="histogram bins (the grid's XGBOOST_MAX_BIN)")
    args = parser.parse_args()
    os.environ["FRAUD_DATA_DIR"] = str(args.data_dir.resolve())

    from fraud.config import DataLayout
    from fraud.features.offline import labelled_transactions
    from fraud.training.dataset import SplitPlan, build_training_sets
    from fraud.training.models import ModelSpec
    from fraud.training.quality_bench import BOOK_TEST_FOLDS_ANCHOR, BOOK_TRAIN_START, downsampling_study

    layout = DataLayout.current()
    started = time.perf_counter()
    plan = SplitPlan.create(BOOK_TRAIN_START, n_validation_folds=1)
    sets = build_training_sets(plan, labelled=labelled_transactions(plan.span.start, plan.span.end, layout))
    book_plan = SplitPlan.create(BOOK_TEST_FOLDS_ANCHOR, n_validation_folds=4)
    book_sets = build_training_sets(
        book_plan, labelled=labelled_transactions(book_plan.span.start, book_plan.span.end, layout)
    )
    sets_s = time.perf_counter() - started
    spec = ModelSpec(
        "xgboost",
        {
            "max_depth": args.max_depth,
            "n_estimators": args.n_estimators,
            "learning_rate": args.learning_rate,
            "scale_pos_weight": args.scale_pos_weight,
            "max_bin": args.max_bin,
        },
    )
    step = time.perf_counter()
    rows = downsampling_study(sets, book_sets, spec, tuple(args.legit_per_day), args.seed)
    result = {
        "benchmark": "training_downsampling",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": "Handbook: train 2018-07-25..31, delay 7 days, test 2018-08-08..14; book blocks 08-08..08-29",
        "model": spec.label,
        "sets": sets.summary(),
        "rows": rows,
        "timings": {"training_sets_s": sets_s, "study_s": time.perf_counter() - step},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"training_downsampling_{datetime.now(UTC).date().isoformat()}.json"
    target.write_text(json.dumps(result, indent=2, default=float))
    for row in rows:
        print(json.dumps(row, default=float))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
