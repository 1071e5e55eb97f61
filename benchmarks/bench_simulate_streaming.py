"""Memory and time of the streaming simulator (`fraud simulate`, day by day) against the in-memory
one (`simulate()` + `write_dataset()`), each a child process measured by its rusage (wall, CPU,
peak RSS).

    # both writers on the default dataset, one after the other (the in-memory baseline of the same run)
    .venv/bin/python benchmarks/bench_simulate_streaming.py --run 1.76M=5000,10000,183
    # record large runs made by hand under GNU time (same rusage figures), e.g. the 100 M history:
    #   /usr/bin/time -v nice -n 15 fraud simulate --customers 282000 --terminals 114000 --out D/raw 2> log
    .venv/bin/python benchmarks/bench_simulate_streaming.py --time-log 100M=log:D/raw

Writes benchmarks/results/simulate_streaming_<date>.json (`--merge` keeps earlier entries).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
IN_MEMORY = (
    "import sys\n"
    "from fraud.simulator import SimulationConfig, simulate, write_dataset\n"
    "c = SimulationConfig(n_customers=int(sys.argv[1]), n_terminals=int(sys.argv[2]), n_days=int(sys.argv[3]))\n"
    "write_dataset(simulate(c), sys.argv[4])\n"
)


def _measure(command: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    exit_code = os.waitstatus_to_exitcode(status)
    return {
        "exit_code": exit_code,
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "error": stderr.strip().splitlines()[-1] if exit_code and stderr.strip() else "",
    }


def run_both(label: str, customers: int, terminals: int, days: int) -> list[dict[str, Any]]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as scratch:
        for writer in ("streaming", "in-memory"):
            out = Path(scratch) / writer / "raw"
            if writer == "streaming":
                command = [sys.executable, "-m", "fraud.cli", "simulate", "--customers", str(customers)]
                command += ["--terminals", str(terminals), "--days", str(days), "--out", str(out)]
            else:
                command = [sys.executable, "-c", IN_MEMORY, str(customers), str(terminals), str(days), str(out)]
            measured = _measure(command)
            manifest = json.loads((out / "_SUCCESS.json").read_text()) if (out / "_SUCCESS.json").is_file() else {}
            runs.append(
                {
                    "dataset": label,
                    "writer": writer,
                    "customers": customers,
                    "terminals": terminals,
                    "days": days,
                    "transactions": manifest.get("n_transactions"),
                    "source": "measured by this script (os.wait4)",
                    **measured,
                }
            )
            shutil.rmtree(out.parent, ignore_errors=True)
    return runs


def from_time_log(label: str, log: Path, raw_dir: Path) -> dict[str, Any]:
    """A run recorded by GNU `time -v` (its rusage: the same figures as os.wait4)."""
    text = log.read_text(errors="replace")

    def field(name: str) -> str:
        match = re.search(rf"^\s*{re.escape(name)}: (.*)$", text, re.MULTILINE)
        if match is None:
            raise SystemExit(f"{log}: no '{name}' line (not a `time -v` log?)")
        return match.group(1).strip()

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    command = field("Command being timed").strip('"')
    manifest = json.loads((raw_dir / "_SUCCESS.json").read_text())
    params = manifest["parameters"]
    return {
        "dataset": label,
        "writer": "streaming",
        "customers": params["n_customers"],
        "terminals": params["n_terminals"],
        "days": params["n_days"],
        "transactions": manifest["n_transactions"],
        "source": f"GNU time -v of `{command}`",
        "exit_code": int(field("Exit status")),
        "wall_s": round(wall, 2),
        "cpu_s": round(float(field("User time (seconds)")) + float(field("System time (seconds)")), 2),
        "peak_rss_mib": round(int(field("Maximum resident set size (kbytes)")) / 1024, 1),
        "error": "",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], help="LABEL=CUSTOMERS,TERMINALS,DAYS (both writers)")
    parser.add_argument("--time-log", action="append", default=[], help="LABEL=TIME_LOG:RAW_DIR")
    parser.add_argument("--merge", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    if args.merge and args.merge.is_file():
        runs = json.loads(args.merge.read_text())["runs"]
    fresh: list[dict[str, Any]] = []
    for item in args.run:
        label, _, sizes = item.partition("=")
        customers, terminals, days = (int(v) for v in sizes.split(","))
        fresh += run_both(label, customers, terminals, days)
    for item in args.time_log:
        label, _, paths = item.partition("=")
        log, _, raw = paths.partition(":")
        fresh.append(from_time_log(label, Path(log), Path(raw)))
    keys = {(r["dataset"], r["writer"]) for r in fresh}
    runs = [r for r in runs if (r["dataset"], r["writer"]) not in keys] + fresh
    date = datetime.now(UTC).date().isoformat()
    out = args.out or RESULTS_DIR / f"simulate_streaming_{date}.json"
    result = {"benchmark": "simulate_streaming", "date": date, "machine_cpus": os.cpu_count(), "runs": runs}
    print(json.dumps(result, indent=2))
    if not args.no_save:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
