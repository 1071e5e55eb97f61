"""Benchmark `fraud simulate`: simulate + write the default dataset (5,000 customers, 10,000
terminals, 183 days) into a temporary folder, several times, each in a fresh child process.

Reports per run the wall time of simulate() and write_dataset() (measured in the child, imports
excluded), the child's peak RSS, and the medians; writes benchmarks/results/simulate.json and
prints a Markdown table (pasted into docs/simulator.md).

    .venv/bin/python benchmarks/bench_simulate.py              # default dataset, 3 repetitions
    .venv/bin/python benchmarks/bench_simulate.py --days 30 --repetitions 1 --no-save
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
RESULTS = Path(__file__).resolve().parent / "results" / "simulate.json"

# Runs in the child: one simulate + write, prints a JSON line with timings and peak RSS.
_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import scipy.spatial  # imported lazily by the simulator: keep import time out of the measurement
from fraud.simulator import SimulationConfig, simulate, write_dataset

params = json.loads(sys.argv[1])
out = Path(sys.argv[2])
config = SimulationConfig(
    n_customers=params["customers"], n_terminals=params["terminals"], n_days=params["days"], seed=params["seed"]
)
t0 = time.perf_counter()
data = simulate(config)
t1 = time.perf_counter()
write_dataset(data, out)
t2 = time.perf_counter()
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
summary = data.summary()
print(json.dumps({
    "simulate_s": t1 - t0,
    "write_s": t2 - t1,
    "total_s": t2 - t0,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "n_transactions": summary["n_transactions"],
    "fraud_rate": summary["fraud_rate"],
    "output_mib": size / 2**20,
}))
"""


def run_once(params: dict[str, int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-simulate-") as tmp:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(params), str(Path(tmp) / "raw")],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(report: dict[str, Any]) -> str:
    p = report["parameters"]
    m = report["median"]
    lines = [
        "| dataset | transactions | simulate (s) | write (s) | total (s) | peak RSS (MiB) | output (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        (
            f"| {p['customers']:,} customers / {p['terminals']:,} terminals / {p['days']} days "
            f"| {m['n_transactions']:,} | {m['simulate_s']:.2f} | {m['write_s']:.2f} | {m['total_s']:.2f} "
            f"| {m['peak_rss_mib']:.0f} | {m['output_mib']:.1f} |"
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--terminals", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=183)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the results JSON")
    args = parser.parse_args()

    params = {"customers": args.customers, "terminals": args.terminals, "days": args.days, "seed": args.seed}
    runs = []
    for i in range(args.repetitions):
        run = run_once(params)
        runs.append(run)
        print(f"run {i + 1}/{args.repetitions}: {run['total_s']:.2f} s, {run['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    median["n_transactions"] = int(median["n_transactions"])
    import numpy
    import pandas
    import pyarrow

    report = {
        "benchmark": "simulate",
        "description": "fraud.simulator.simulate + write_dataset, fresh child process per run",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": params,
        "repetitions": args.repetitions,
        "median": median,
        "runs": runs,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "pandas": pandas.__version__,
            "pyarrow": pyarrow.__version__,
        },
    }
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}", file=sys.stderr)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
