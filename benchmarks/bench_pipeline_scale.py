"""Feature pipeline at scale: simulation -> offline feature computation (DuckDB) -> feast apply ->
materialisation into the SQLite online store, on the default dataset (5,000 customers / 10,000
terminals / 183 days, ~1.76 M transactions) and on a 10x dataset (50,000 / 100,000, ~17.6 M).

Each phase is the project's own CLI (`fraud simulate`, `fraud features build|apply|materialize`)
run as a child process; its wall time includes the interpreter start and imports (a few seconds),
its peak memory is the child's ru_maxrss (os.wait4). Scales run one after the other, never in
parallel, each in its own data directory under --work-dir (deleted afterwards unless --keep).

    .venv/bin/python benchmarks/bench_pipeline_scale.py                      # 1x and 10x
    .venv/bin/python benchmarks/bench_pipeline_scale.py --scales 1           # default only
    .venv/bin/python benchmarks/bench_pipeline_scale.py --smoke --no-save    # seconds, tiny dataset

Writes benchmarks/results/pipeline_scale.json and the table between the pipeline-scale markers of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_scale.json"
DOCS = ROOT / "docs" / "performance.md"
MARKS = ("<!-- bench:pipeline-scale:start -->", "<!-- bench:pipeline-scale:end -->")
PIPELINE_RUN_RESULTS = RESULTS.with_name("pipeline_run.json")
PIPELINE_RUN_MARKS = ("<!-- bench:pipeline-run:start -->", "<!-- bench:pipeline-run:end -->")
FRAUD = [sys.executable, "-m", "fraud.cli"]
BASE_CUSTOMERS, BASE_TERMINALS, BASE_DAYS = 5_000, 10_000, 183
MEMORY_LIMIT_GIB = 24.0


@dataclass(frozen=True)
class Phase:
    name: str
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    exit_code: int
    log_tail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_phase(name: str, command: list[str], env: dict[str, str], log: Path) -> Phase:
    """Run one CLI phase as a child; wall time, CPU time and peak RSS from its rusage."""
    started = time.perf_counter()
    with log.open("ab") as sink:
        sink.write(f"\n$ {' '.join(command)}\n".encode())
        sink.flush()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    exit_code = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace")[-1500:] if exit_code else ""
    return Phase(name, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, exit_code, tail)


def count_rows(raw_dir: Path) -> int:
    files = sorted((raw_dir / "transactions").rglob("*.parquet")) if (raw_dir / "transactions").exists() else []
    if not files:
        files = sorted(raw_dir.rglob("*.parquet"))
        files = [f for f in files if "transaction" in str(f)]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def run_scale(
    factor: int, days: int, work_dir: Path, keep: bool, skip_feast: bool = False, pipeline_run: bool = False
) -> dict[str, Any]:
    customers, terminals = BASE_CUSTOMERS * factor, BASE_TERMINALS * factor
    data_dir = work_dir / f"scale-{factor}x-{days}d"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    log = data_dir / "phases.log"
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir), "FRAUD_FEAST_ONLINE": "sqlite"}
    env.pop("FRAUD_FEAST_REGISTRY", None)
    phases: list[Phase] = []
    steps = [
        (
            "simulate",
            [
                *FRAUD,
                "simulate",
                "--customers",
                str(customers),
                "--terminals",
                str(terminals),
                "--days",
                str(days),
                "--seed",
                "0",
                "--out",
                str(data_dir / "raw"),
            ],
        ),
        ("features_build", [*FRAUD, "features", "build", "--data-dir", str(data_dir)]),
        ("feast_apply", [*FRAUD, "features", "apply", "--data-dir", str(data_dir), "--online", "sqlite"]),
        ("materialize", [*FRAUD, "features", "materialize", "--data-dir", str(data_dir), "--online", "sqlite"]),
    ]
    if skip_feast:
        steps = steps[:2]
    elif pipeline_run:  # the whole training pipeline (kfp.local) on this dataset, after the feature store
        steps.append(("pipeline_run", [*FRAUD, "pipeline", "run", "--local"]))
    transactions = 0
    for name, command in steps:
        print(f"[{factor}x] {name} ...", file=sys.stderr, flush=True)
        phase = run_phase(name, command, env, log)
        phases.append(phase)
        print(
            f"[{factor}x] {name}: {phase.wall_s:.1f} s, peak {phase.peak_rss_mib:.0f} MiB, exit {phase.exit_code}",
            file=sys.stderr,
            flush=True,
        )
        if name == "simulate" and phase.exit_code == 0:
            transactions = count_rows(data_dir / "raw")
        if phase.exit_code != 0:
            break
    disk_mib = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) / 2**20
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    by_name = {p.name: p for p in phases}
    completed = len(phases) == len(steps) and all(p.exit_code == 0 for p in phases)
    peak = max((p.peak_rss_mib for p in phases), default=0.0)

    def rate(name: str) -> float | None:
        phase = by_name.get(name)
        return transactions / phase.wall_s if phase and phase.exit_code == 0 and transactions else None

    return {
        "scale": factor,
        "customers": customers,
        "terminals": terminals,
        "days": days,
        "transactions": transactions,
        "completed": completed,
        "phases": {p.name: p.to_dict() for p in phases},
        "total_wall_s": sum(p.wall_s for p in phases),
        "peak_rss_mib": peak,
        "within_memory_limit": peak / 1024 <= MEMORY_LIMIT_GIB,
        "simulate_rows_per_s": rate("simulate"),
        "features_rows_per_s": rate("features_build"),
        "materialize_entities_per_s": (customers + terminals) / by_name["materialize"].wall_s
        if "materialize" in by_name and by_name["materialize"].exit_code == 0
        else None,
        "disk_mib": disk_mib,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']['cpus']} cores "
        f"(1-min load average at start {report['machine']['load_average_1m']:.1f}); "
        f"command: `{report['command']}`. Wall times include the CLI's interpreter start and imports.",
        "",
        (
            "| dataset | transactions | simulate | features build | feast apply | materialize "
            "| pipeline run --local | total "
            "| features rows/s | peak RSS | completed |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["runs"]:
        p = run["phases"]

        def cell(name: str, p: dict = p) -> str:
            phase = p.get(name)
            if phase is None:
                return "not run"
            return f"{phase['wall_s']:.1f} s" + ("" if phase["exit_code"] == 0 else " (failed)")

        rows_s = run["features_rows_per_s"]
        lines.append(
            f"| {run['scale']}x ({run['customers']:,} cust / {run['terminals']:,} term / {run['days']} d) "
            f"| {run['transactions']:,} | {cell('simulate')} | {cell('features_build')} | {cell('feast_apply')} "
            f"| {cell('materialize')} | {cell('pipeline_run')} | {run['total_wall_s']:.1f} s "
            f"| {f'{rows_s:,.0f}' if rows_s else '-'} "
            f"| {run['peak_rss_mib'] / 1024:.2f} GiB | {'yes' if run['completed'] else 'NO'} |"
        )
    return "\n".join(lines)


def write_docs_section(text: str, marks: tuple[str, str], path: Path = DOCS) -> None:
    """Replace the text between the markers of `path` (appending a marked section if absent)."""
    start, end = marks
    content = path.read_text() if path.exists() else "# Performance\n"
    block = f"{start}\n{text}\n{end}"
    if start in content and end in content:
        head, rest = content.split(start, 1)
        _, tail = rest.split(end, 1)
        content = head + block + tail
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content)
    tmp.replace(path)


def save_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scales", type=int, nargs="+", default=[1, 10], help="dataset multiples of 5,000 customers / 10,000 terminals"
    )
    parser.add_argument("--days", type=int, default=BASE_DAYS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fraud-bench-scale"))
    parser.add_argument("--keep", action="store_true", help="keep each scale's data directory")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run (scale 1 of 50 customers / 100 terminals, 10 days) to check the benchmark works",
    )
    parser.add_argument(
        "--skip-feast", action="store_true", help="only simulate and build features (no feast apply/materialize)"
    )
    parser.add_argument(
        "--pipeline-run",
        action="store_true",
        help="also time `fraud pipeline run --local` on each dataset (results/pipeline_run.json, own docs section)",
    )
    parser.add_argument("--no-save", action="store_true", help="print the JSON instead of writing results and docs")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="result file (default results/pipeline_scale.json, or results/pipeline_run.json with --pipeline-run)",
    )
    args = parser.parse_args(argv)
    global BASE_CUSTOMERS, BASE_TERMINALS
    if args.smoke:
        BASE_CUSTOMERS, BASE_TERMINALS = 50, 100
        args.scales, args.days = [1], 10
    one, five, _ = os.getloadavg()
    report: dict[str, Any] = {
        "benchmark": "pipeline_scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_pipeline_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_1m": one,
            "load_average_5m": five,
            "python": sys.version.split()[0],
        },
        "smoke": args.smoke,
        "runs": [],
    }
    for factor in args.scales:
        report["runs"].append(
            run_scale(factor, args.days, args.work_dir, args.keep, args.skip_feast, args.pipeline_run)
        )
    if args.no_save:
        print(json.dumps(report, indent=2))
    else:
        save_json(report, args.output or (PIPELINE_RUN_RESULTS if args.pipeline_run else RESULTS))
        write_docs_section(markdown(report), PIPELINE_RUN_MARKS if args.pipeline_run else MARKS)
        print(markdown(report))
    return 0 if all(run["completed"] for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
