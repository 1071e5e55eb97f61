"""Benchmark the feature pipeline on a simulated dataset: offline feature computation (DuckDB),
`feast apply`, materialisation into the SQLite online store, a month of point-in-time training
features, and batched online lookups.

Each phase runs in a fresh child process (imports excluded from the timings, measured inside the
child); its peak RSS is the child's ru_maxrss. The feature computation is repeated (median
reported). The dataset directory is only read: the outputs go to a temporary data directory whose
raw/ is a symlink to the dataset's.

    .venv/bin/python benchmarks/bench_features.py                       # /tmp/shared-full/data
    .venv/bin/python benchmarks/bench_features.py /path/to/data --repetitions 1 --no-save

Writes benchmarks/results/features.json and the table between the bench markers of docs/features.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "features.json"
DOCS = ROOT / "docs" / "features.md"
DEFAULT_DATASET = Path("/tmp/shared-full/data")
MARK_START, MARK_END = "<!-- bench:features:start -->", "<!-- bench:features:end -->"

# Child programs: each prints one JSON line. sys.argv[1] is the work data dir (FRAUD_DATA_DIR is set).
_BUILD = r"""
import json, resource, time
from fraud.features.offline import build_offline_features
t0 = time.perf_counter()
result = build_offline_features()
seconds = time.perf_counter() - t0
print(json.dumps({
    "seconds": seconds,
    "transactions": result.transactions,
    "customer_rows": result.customer.rows,
    "terminal_rows": result.terminal.rows,
    "customers": result.customer.entities,
    "terminals": result.terminal.entities,
    "days": (result.last_day - result.first_day).days + 1,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""

_APPLY = r"""
import json, resource, time
import feast.repo_operations  # import time is not apply time
from fraud.feature_store import apply_repo
t0 = time.perf_counter()
apply_repo()
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_MATERIALIZE = r"""
import json, resource, time
import feast
from fraud.feature_store import materialize_incremental
t0 = time.perf_counter()
materialize_incremental()
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_HISTORICAL = r"""
import json, resource, time
from datetime import timedelta
import feast
from fraud.feature_store import get_feature_store, historical_features
from fraud.features.offline import labelled_transactions, raw_transaction_span
first, last = raw_transaction_span()
entity_df = labelled_transactions(last - timedelta(days=29), last + timedelta(days=1))
store = get_feature_store()
t0 = time.perf_counter()
frame = historical_features(entity_df, store=store)
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": len(frame),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_ONLINE = r"""
import json, resource, time
import numpy as np
import pandas as pd
from fraud.config import DataLayout
from fraud.feature_store import online_client
from fraud.features.offline import customer_features_path, terminal_features_path
layout = DataLayout.current()
customers = pd.read_parquet(customer_features_path(layout), columns=["customer_id"])["customer_id"].unique()
terminals = pd.read_parquet(terminal_features_path(layout), columns=["terminal_id"])["terminal_id"].unique()
rng = np.random.default_rng(0)
client = online_client()
client.batch(customers[:1], terminals[:1])  # warm-up
result = {}
for batch in (1, 8, 64):
    times = []
    for _ in range(200):
        c = list(rng.choice(customers, batch)); t = list(rng.choice(terminals, batch))
        t0 = time.perf_counter(); client.batch(c, t); times.append(time.perf_counter() - t0)
    result[f"batch_{batch}"] = {
        "median_ms": float(np.median(times) * 1e3),
        "p95_ms": float(np.percentile(times, 95) * 1e3),
    }
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run_child(program: str, work: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter and return its JSON line plus the wall time of the child."""
    env = {**os.environ, "FRAUD_DATA_DIR": str(work), "PYTHONWARNINGS": "ignore"}
    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
        env.pop(name, None)
    started = datetime.now(UTC)
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark phase failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = (datetime.now(UTC) - started).total_seconds()
    return result


def markdown(report: dict[str, Any]) -> str:
    d, b = report["dataset"], report["build"]
    lines = [
        (
            f"Dataset: {d['transactions']:,} transactions, {d['days']} days, {d['customers']:,} customers, "
            f"{d['terminals']:,} terminals; {report['machine']['cpus']} CPUs (shared, load average "
            f"{report['machine']['load_average_1m']:.1f} at start), {report['date'][:10]}."
        ),
        "",
        "| phase | wall time (median) | throughput | peak RSS MiB |",
        "|---|---:|---:|---:|",
        (
            f"| offline features (DuckDB, {b['repetitions']} runs) | {b['median_s']:.1f} s "
            f"| {b['transactions_per_s']:,.0f} tx/s | {b['peak_rss_mib']:.0f} |"
        ),
        f"| feast apply | {report['apply']['seconds']:.1f} s | - | {report['apply']['peak_rss_mib']:.0f} |",
        (
            f"| materialise (SQLite, {report['materialize']['entities']:,} entities) "
            f"| {report['materialize']['seconds']:.1f} s | {report['materialize']['entities_per_s']:,.0f} entities/s "
            f"| {report['materialize']['peak_rss_mib']:.0f} |"
        ),
        (
            f"| historical features, last 30 days ({report['historical']['rows']:,} rows) "
            f"| {report['historical']['seconds']:.1f} s | {report['historical']['rows_per_s']:,.0f} rows/s "
            f"| {report['historical']['peak_rss_mib']:.0f} |"
        ),
    ]
    for batch in (1, 8, 64):
        o = report["online"][f"batch_{batch}"]
        lines.append(
            f"| online lookup, {batch} pair(s) per call (SQLite) | {o['median_ms']:.1f} ms "
            f"| p95 {o['p95_ms']:.1f} ms | {report['online']['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def update_docs(table: str) -> None:
    if not DOCS.is_file():
        return
    text = DOCS.read_text()
    if MARK_START not in text or MARK_END not in text:
        return
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    DOCS.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET, help="data dir holding raw/")
    parser.add_argument("--repetitions", type=int, default=3, help="runs of the offline computation")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the JSON and docs")
    args = parser.parse_args()
    raw = args.dataset / "raw"
    if not (raw / "transactions").is_dir():
        raise SystemExit(f"{raw}/transactions does not exist (wait for the dataset, or pass its data dir)")
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        work = Path(tmp) / "data"
        work.mkdir()
        (work / "raw").symlink_to(raw.resolve(), target_is_directory=True)
        report: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_1m": os.getloadavg()[0],
                "python": platform.python_version(),
            },
            "dataset_dir": str(args.dataset),
        }
        builds = [run_child(_BUILD, work) for _ in range(max(1, args.repetitions))]
        first = builds[0]
        report["dataset"] = {k: first[k] for k in ("transactions", "days", "customers", "terminals")}
        median_s = statistics.median(b["seconds"] for b in builds)
        report["build"] = {
            "repetitions": len(builds),
            "seconds": [b["seconds"] for b in builds],
            "median_s": median_s,
            "transactions_per_s": first["transactions"] / median_s,
            "rows_written": first["customer_rows"] + first["terminal_rows"],
            "peak_rss_mib": max(b["peak_rss_mib"] for b in builds),
        }
        report["apply"] = run_child(_APPLY, work)
        materialized = run_child(_MATERIALIZE, work)
        entities = first["customers"] + first["terminals"]
        report["materialize"] = {
            **materialized,
            "entities": entities,
            "entities_per_s": entities / materialized["seconds"],
        }
        historical = run_child(_HISTORICAL, work)
        report["historical"] = {**historical, "rows_per_s": historical["rows"] / historical["seconds"]}
        report["online"] = run_child(_ONLINE, work)
    table = markdown(report)
    print(json.dumps(report, indent=2))
    print(table)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        update_docs(table)


if __name__ == "__main__":
    main()
