"""What detecting and repairing a lost online store costs: the health check the predictor's
readiness probe runs (`fraud.feature_store.online_store_problem`), against the baseline of one
batched online lookup of one (card, terminal) pair (`online_batch_arrays`), and the full
re-materialisation of `fraud features rebuild-online`, against the baseline of one
materialisation of the same window into the intact store - on SQLite and on Redis (loopback, own Feast project).

Setup: a temporary data directory with a random dataset (`--customers` cards, as many terminals,
`--days` days), `fraud features build` + `apply` + `materialize`. The check and the lookup are
timed `--repeat` times each, interleaved; rebuild and materialisation 3 times each (medians).

    .venv/bin/python benchmarks/bench_online_health.py
    .venv/bin/python benchmarks/bench_online_health.py --customers 50 --repeat 50 --no-save

Writes benchmarks/results/online_health-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000.0


def measure(online: str, project: str, repeat: int) -> dict:
    from fraud.feature_store import (
        default_materialization_end,
        get_feature_store,
        materialize,
        materialize_incremental,
        online_batch_arrays,
        online_store_problem,
        rebuild_online,
        snapshot_span,
        teardown,
    )
    from fraud.features.definitions import SNAPSHOT_TTL_DAYS

    store = get_feature_store(online, project=project)
    materialize_incremental(online=online, project=project)
    store.refresh_registry()
    assert online_store_problem(store) is None, "the freshly materialised store reports a problem"  # noqa: S101 - benchmark precondition
    online_batch_arrays(["C0"], ["T0"], online, project=project)  # warm the client
    checks, lookups = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        online_store_problem(store)
        checks.append(time.perf_counter() - started)
        started = time.perf_counter()
        online_batch_arrays(["C0"], ["T0"], online, project=project)
        lookups.append(time.perf_counter() - started)
    # baseline: one materialisation of the window rebuild-online re-materialises, on an intact store
    end = default_materialization_end()
    first, last = snapshot_span()
    window_start = max(first, min(end, last) - timedelta(days=SNAPSHOT_TTL_DAYS))
    rebuilds, firsts = [], []
    for _ in range(3):
        started = time.perf_counter()
        materialize(window_start, end, online, project=project)
        firsts.append(time.perf_counter() - started)
        started = time.perf_counter()
        rebuild_online(end, online, project=project)
        rebuilds.append(time.perf_counter() - started)
    teardown(online, project=project)
    return {
        "online": online,
        "check_ms": _median_ms(checks),
        "lookup_ms": _median_ms(lookups),
        "check_over_lookup": statistics.median(checks) / statistics.median(lookups),
        "rebuild_s": statistics.median(rebuilds),
        "materialise_s": statistics.median(firsts),
        "rebuild_over_materialise": statistics.median(rebuilds) / statistics.median(firsts),
        "repeat": repeat,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-online-health-") as folder:
        os.environ["FRAUD_DATA_DIR"] = str(Path(folder) / "data")  # this benchmark process's own data dir
        from test_features_offline import random_transactions, write_raw_transactions

        from fraud.config import DataLayout
        from fraud.feature_store import apply_repo
        from fraud.features.offline import build_offline_features

        layout = DataLayout.current()
        raw = random_transactions(seed=3, n_customers=args.customers, n_terminals=args.customers, n_days=args.days)
        write_raw_transactions(layout, raw)
        build_offline_features(layout)
        results = []
        for online in args.stores:
            project = f"bench_health_{uuid.uuid4().hex[:8]}"
            apply_repo(online, project=project)
            result = measure(online, project, args.repeat)
            print(json.dumps(result), flush=True)
            results.append(result)
    report = {
        "benchmark": "online_health",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "dataset": {
            "customers": args.customers,
            "terminals": args.customers,
            "days": args.days,
            "transactions": len(raw),
        },
        "results": results,
    }
    if not args.no_save:
        path = RESULTS_DIR / f"online_health-{report['date']}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
