"""Offline feature build (`fraud features build`) on DuckDB and on Spark local[2], on simulated
histories of growing size: wall time, CPU time, peak memory (sum of the RSS of the process tree:
the CLI, and for Spark its JVM), rows/s, and the error when a size does not fit.

Each (dataset, engine) is one run of the project's CLI as a child process, after one another,
never in parallel, on the data directory given (its `raw/` is the simulated history; the build
writes `features/` there). DuckDB runs with `--memory-limit` (default 6GB) and 2 threads; Spark
with `--spark-master local[2] --spark-driver-memory 4g` (local mode: one JVM; `--spark-driver-memory`
sets another heap). Each run records the machine's load average when it started: on a busy
machine the wall time grows, the CPU seconds hardly.

    .venv/bin/python benchmarks/bench_feature_engines.py \\
        --dataset 1.76M=/work/data-scale/x1 --dataset 17.6M=/work/data-scale/x10 \\
        --dataset 100M=/work/data-scale/x57 --engines duckdb spark
    .venv/bin/python benchmarks/bench_feature_engines.py --smoke --no-save   # tiny dataset, seconds

Writes benchmarks/results/feature_engines_<date>.json and the table between the
feature-engines markers of docs/scaling.md (`--merge` keeps the runs of an earlier result file
for the (dataset, engine) pairs not run this time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS = ROOT / "docs" / "scaling.md"
MARKS = ("<!-- bench:feature-engines:start -->", "<!-- bench:feature-engines:end -->")
FRAUD = [sys.executable, "-m", "fraud.cli"]
#: the Spark driver's heap by default (local mode: driver and executors are one JVM)
SPARK_DRIVER_MEMORY = "4g"


def count_rows(raw_dir: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((raw_dir / "transactions").rglob("*.parquet")))


class TreeSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for proc in procs:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak_bytes = max(self.peak_bytes, total)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _has_engine_option() -> bool:
    shown = subprocess.run(
        [*FRAUD, "features", "build", "--help"], capture_output=True, text=True, check=False, cwd=ROOT, timeout=300
    )
    return "--engine" in shown.stdout


def engine_command(
    engine: str, data_dir: Path, memory_limit: str, driver_memory: str = SPARK_DRIVER_MEMORY
) -> list[str]:
    command = [*FRAUD, "features", "build", "--data-dir", str(data_dir)]
    if engine == "duckdb":
        # DuckDB is the default engine (and the only one of a build without --engine)
        chosen = ["--engine", "duckdb"] if _has_engine_option() else []
        return [*command, *chosen, "--memory-limit", memory_limit, "--threads", "2"]
    return [*command, "--engine", "spark", "--spark-master", "local[2]", "--spark-driver-memory", driver_memory]


def run_build(engine: str, data_dir: Path, memory_limit: str, driver_memory: str, log: Path) -> dict[str, Any]:
    command = engine_command(engine, data_dir, memory_limit, driver_memory)
    load_average = os.getloadavg()[0]
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir)}
    started = time.perf_counter()
    with log.open("ab") as sink:
        sink.write(f"\n$ {' '.join(command)}\n".encode())
        sink.flush()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        with TreeSampler(process.pid) as sampler:
            _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    exit_code = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    error = ""
    if exit_code:
        lines = [line for line in text.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("error")), lines[-1] if lines else "")
    return {
        "engine": engine,
        "build_command": " ".join(command[2:]),
        "exit_code": exit_code,
        "wall_s": round(wall, 2),
        # children's CPU: the CLI and everything it waited for (the JVM of a Spark run)
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(sampler.peak_bytes / 2**20, 1),
        "error": error[-500:],
        "memory_setting": memory_limit if engine == "duckdb" else driver_memory,
        "load_average_at_start": round(load_average, 2),
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "| dataset | transactions | engine (memory setting) | load average at start | wall | CPU "
        "| peak memory (process tree) | rows/s | rows per CPU-second |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        rows = run["transactions"]
        setting = run.get("memory_setting")
        engine = f"{run['engine']} ({setting})" if setting else run["engine"]
        load = f"{run['load_average_at_start']:.1f}" if "load_average_at_start" in run else "—"
        if run["exit_code"]:
            ended = "stopped after" if run["exit_code"] < 0 else "failed after"  # < 0: killed by a signal
            lines.append(
                f"| {run['dataset']} | {rows:,} | {engine} | {load} | {ended} {run['wall_s']:,.0f} s | "
                f"{run['cpu_s']:,.0f} s | {run['peak_rss_mib'] / 1024:.1f} GiB | — | — |"
            )
            continue
        lines.append(
            f"| {run['dataset']} | {rows:,} | {engine} | {load} | {run['wall_s']:,.0f} s | {run['cpu_s']:,.0f} s | "
            f"{run['peak_rss_mib'] / 1024:.1f} GiB | {rows / run['wall_s']:,.0f} | "
            f"{rows / max(run['cpu_s'], 1e-9):,.0f} |"
        )
    failed = [r for r in result["runs"] if r["exit_code"]]
    for run in failed:
        lines.append("")
        lines.append(f"{run['dataset']} on {run['engine']} did not complete: `{run['error']}`")
    lines.append("")
    lines.append(
        f"Measured {result['date']} on the 2-core / 24 GiB machine (the CPU column is the build's own "
        f"time, whatever else ran), DuckDB with 2 threads, Spark local[2]; `{result['command']}`; "
        "`benchmarks/results/" + result["file"] + "`."
    )
    return "\n".join(lines)


def write_docs(table: str) -> None:
    text = DOCS.read_text()
    start, end = MARKS
    if start not in text:
        raise SystemExit(f"{DOCS} has no {start} marker")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def smoke_dataset(root: Path) -> Path:
    subprocess.run(
        [*FRAUD, "simulate", "--customers", "50", "--terminals", "100", "--days", "20", "--out", str(root / "raw")],
        check=True,
        capture_output=True,
        env={**os.environ, "FRAUD_DATA_DIR": str(root)},
        cwd=ROOT,
    )
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", default=[], help="LABEL=DATA_DIR (its raw/ is the history)")
    parser.add_argument("--engines", nargs="+", default=["duckdb", "spark"], choices=["duckdb", "spark"])
    parser.add_argument("--memory-limit", default="6GB", help="DuckDB memory_limit")
    parser.add_argument("--spark-driver-memory", default=SPARK_DRIVER_MEMORY, help="Spark driver heap (local mode)")
    parser.add_argument("--smoke", action="store_true", help="a tiny simulated dataset only")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--merge", type=Path, help="an earlier result file whose other runs are kept")
    parser.add_argument("--out", type=Path, help="result file (default: results/feature_engines_<date>.json)")
    args = parser.parse_args(argv)

    datasets: list[tuple[str, Path]] = []
    scratch = tempfile.TemporaryDirectory(prefix="bench-engines-") if args.smoke else None
    if scratch is not None:
        datasets.append(("smoke", smoke_dataset(Path(scratch.name))))
    for item in args.dataset:
        label, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "raw" / "transactions").is_dir():
            raise SystemExit(f"--dataset {item!r}: expected LABEL=DATA_DIR with DATA_DIR/raw/transactions")
        datasets.append((label, Path(folder).resolve()))
    if not datasets:
        raise SystemExit("nothing to run: give --dataset LABEL=DATA_DIR or --smoke")

    date = datetime.now(UTC).date().isoformat()
    out = args.out or RESULTS_DIR / f"feature_engines_{date}.json"
    runs: list[dict[str, Any]] = []
    if args.merge and args.merge.is_file():
        runs = json.loads(args.merge.read_text())["runs"]
    log = Path(tempfile.gettempdir()) / f"bench-feature-engines-{os.getpid()}.log"
    command = "benchmarks/bench_feature_engines.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def result_of(done: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "benchmark": "feature_engines",
            "date": date,
            "file": out.name,
            "smoke": bool(args.smoke),
            "command": command,
            "duckdb_memory_limit": args.memory_limit,
            "spark_driver_memory": args.spark_driver_memory,
            "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
            "runs": done,
        }

    for label, folder in datasets:
        rows = count_rows(folder / "raw")
        for engine in args.engines:
            print(f"{label} ({rows:,} transactions) on {engine} ...", file=sys.stderr, flush=True)
            run = {
                "dataset": label,
                "transactions": rows,
                **run_build(engine, folder, args.memory_limit, args.spark_driver_memory, log),
            }
            run["command"] = command
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs = [r for r in runs if (r["dataset"], r["engine"]) != (label, engine)] + [run]
            if not args.no_save:  # after every run: a long series stopped half-way keeps what it measured
                out.write_text(json.dumps(result_of(runs), indent=2) + "\n")
                write_docs(render(result_of(runs)))
    result = result_of(runs)
    print(render(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    if scratch is not None:
        scratch.cleanup()
    if not args.no_save:
        print(f"wrote {out} and {DOCS}", file=sys.stderr)


if __name__ == "__main__":
    main()
