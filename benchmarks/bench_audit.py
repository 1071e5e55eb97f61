"""Cost of the audit trail on the request path, and how fast the writer drains.

* `AuditSpool.append` per request: one decision, and a batch of 100 decisions, for both fsync
  policies (synchronous=FULL: survives power loss; NORMAL: survives process crashes) -> median,
  p90 and p99 microseconds per call.
* `AuditWriter.drain_all` throughput (decisions per second) into SQLite and, when reachable,
  PostgreSQL on 127.0.0.1:5432 (a throw-away database, dropped afterwards).
* The predictor's spool payloads of one scored request of 1,000 transactions: one
  `DecisionRecord` per decision + `to_payload` against the column-wise `decision_payloads`
  (what the predictor uses), alternated in the same run -> median microseconds per decision.

Writes benchmarks/results/audit.json (audit_<label>.json with --label). Run:
.venv/bin/python benchmarks/bench_audit.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from fraud.audit.records import DecisionRecord, ScoredColumns, decision_payloads, decision_records
from fraud.audit.spool import AuditSpool
from fraud.audit.store import create_audit_engine, upgrade_database
from fraud.audit.writer import AuditWriter, WriterSettings
from fraud.features.definitions import MODEL_FEATURES

RESULTS = Path(__file__).resolve().parent / "results" / "audit.json"


def decision(index: int) -> DecisionRecord:
    """A decision shaped like the predictor's: the full model feature vector and 3 reason codes."""
    rng = np.random.default_rng(index)
    return DecisionRecord(
        transaction_id=f"TX{index:010d}",
        received_at=datetime(2026, 11, 1) + timedelta(milliseconds=index),
        model_name="fraud-detector",
        model_version="12",
        variant="stable",
        features={
            name: float(value) for name, value in zip(MODEL_FEATURES, rng.random(len(MODEL_FEATURES)), strict=True)
        },
        score=float(rng.random()),
        decision="approve",
        reason_codes=[{"feature": MODEL_FEATURES[i], "contribution": 0.1 * i, "text": "reason"} for i in range(3)],
        customer_id=f"C{index % 5000:07d}",
        terminal_id=f"T{index % 10000:07d}",
        latency_ms=4.2,
    )


def _stats(samples_s: list[float], per: int = 1) -> dict[str, float]:
    micro = sorted(s * 1e6 for s in samples_s)
    return {
        "calls": len(micro),
        "median_us": round(statistics.median(micro), 1),
        "p90_us": round(micro[int(0.9 * (len(micro) - 1))], 1),
        "p99_us": round(micro[int(0.99 * (len(micro) - 1))], 1),
        "median_us_per_decision": round(statistics.median(micro) / per, 1),
    }


def bench_append(directory: Path, synchronous: str, single_calls: int, batch_calls: int) -> dict:
    records = [decision(i) for i in range(single_calls + batch_calls * 100)]
    with AuditSpool(directory / f"spool-{synchronous}.db", synchronous=synchronous, max_records=10_000_000) as spool:
        spool.append(records[:10])  # warm-up: file and WAL exist
        singles = []
        for record in records[:single_calls]:
            started = time.perf_counter()
            spool.append([record])
            singles.append(time.perf_counter() - started)
        batches = []
        for start in range(single_calls, single_calls + batch_calls * 100, 100):
            chunk = records[start : start + 100]
            started = time.perf_counter()
            spool.append(chunk)
            batches.append(time.perf_counter() - started)
    return {"single": _stats(singles), "batch_100": _stats(batches, per=100)}


def bench_drain(directory: Path, url: str, n: int) -> dict:
    engine = create_audit_engine(url)
    upgrade_database(engine)
    spool_path = directory / f"drain-{uuid.uuid4().hex[:6]}.db"
    with AuditSpool(spool_path, synchronous="NORMAL", max_records=10_000_000) as spool:
        for start in range(0, n, 1000):
            spool.append([decision(i) for i in range(start, min(n, start + 1000))])
    writer = AuditWriter(spool_path, engine=engine, settings=WriterSettings(batch_size=500))
    started = time.perf_counter()
    moved = writer.drain_all()
    elapsed = time.perf_counter() - started
    writer.close()
    engine.dispose()
    return {
        "decisions": moved,
        "batch_size": 500,
        "seconds": round(elapsed, 3),
        "decisions_per_s": round(moved / elapsed),
    }


def bench_payloads(rows: int = 1000, repeats: int = 15) -> dict:
    """Spool payloads of one scored request (shaped like the predictor's: 1 % flagged with 3 reason
    codes), through per-decision records and column-wise, alternating."""
    rng = np.random.default_rng(0)
    flagged = rng.random(rows) < 0.01
    batch = {
        "transaction_ids": [f"TX{i:010d}" for i in range(rows)],
        "customer_ids": [f"C{i % 5000:07d}" for i in range(rows)],
        "terminal_ids": [f"T{i % 10000:07d}" for i in range(rows)],
        "feature_names": MODEL_FEATURES,
        "feature_matrix": rng.random((rows, len(MODEL_FEATURES))),
        "scores": rng.random(rows),
        "decisions": ["review" if f else "approve" for f in flagged],
        "reason_codes": [
            [{"feature": MODEL_FEATURES[i], "contribution": 0.1 * i, "text": "reason"} for i in range(3)] if f else []
            for f in flagged
        ],
        "features_missing": np.zeros(rows, dtype=bool),
        "features_stale": np.zeros(rows, dtype=bool),
        "fail_open": False,
        "model_name": "fraud-detector",
        "model_version": "12",
        "variant": "stable",
        "received_at": datetime(2026, 11, 1, tzinfo=UTC),
        "latency_ms": 4.2,
    }
    timings: dict[str, list[float]] = {"records_then_to_payload": [], "decision_payloads": []}
    for _ in range(repeats):
        started = time.perf_counter()
        expected = [record.to_payload() for record in decision_records(ScoredColumns(**batch))]
        timings["records_then_to_payload"].append(time.perf_counter() - started)
        started = time.perf_counter()
        payloads = decision_payloads(ScoredColumns(**batch))
        timings["decision_payloads"].append(time.perf_counter() - started)
        if payloads != expected:
            raise SystemExit("decision_payloads disagrees with records_then_to_payload")
    return {
        name: {"median_us_per_decision": round(statistics.median(t) * 1e6 / rows, 2)} for name, t in timings.items()
    }


def _postgres_drain(directory: Path, n: int) -> dict | None:
    import psycopg2

    name = f"fraud_audit_bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=5)
    except psycopg2.OperationalError:
        return None
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        return bench_drain(directory, f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}", n)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single-calls", type=int, default=300)
    parser.add_argument("--batch-calls", type=int, default=40)
    parser.add_argument("--drain", type=int, default=10_000, help="decisions drained per database")
    parser.add_argument("--dir", type=Path, default=None, help="where the spool files go (default: a temp dir)")
    parser.add_argument("--label", help="suffix of the result file (audit_<label>.json)")
    parser.add_argument("--output", type=Path, help="write the JSON here instead of benchmarks/results/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir=args.dir) as tmp:
        directory = Path(tmp)
        append = {
            mode: bench_append(directory, mode, args.single_calls, args.batch_calls) for mode in ("FULL", "NORMAL")
        }
        drain = {"sqlite": bench_drain(directory, f"sqlite:///{directory / 'audit.db'}", args.drain)}
        postgres = _postgres_drain(directory, args.drain)
        if postgres is not None:
            drain["postgresql"] = postgres
        fsync = []
        probe = directory / "fsync.probe"
        with probe.open("wb") as handle:
            for _ in range(50):
                handle.write(b"x" * 4096)
                handle.flush()
                started = time.perf_counter()
                import os

                os.fsync(handle.fileno())
                fsync.append(time.perf_counter() - started)
    result = {
        "benchmark": "audit",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
            "note": "shared 2-core VM under load from other jobs; ext4 on a virtual disk",
        },
        "raw_fsync_median_us": round(statistics.median(fsync) * 1e6, 1),
        "append": append,
        "drain": drain,
        "request_payloads_1000": bench_payloads(),
    }
    path = args.output or (RESULTS.with_name(f"audit_{args.label}.json") if args.label else RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
