"""Freshness of the velocity features: the time from a transaction being accepted (published to
the stream, as the predictor does after scoring it) to its effect being readable by the next
scoring request for the same card (its transaction id in the card's window state in the online
store), at a steady publishing rate, on loopback; and what the velocity lookup adds to a
scoring request.

Setup: a temporary data directory with a small random dataset, `fraud features build` + `apply`
on the Redis online store (own Feast project) and a stream with its own prefix; the aggregator
runs as `fraud features aggregate` in a child process (as in `fraud serve` and the Deployment).

Load: a publisher thread XADDs transactions of `--cards` random cards at `--rate` tx/s (every
10 ms the due batch, one pipeline). Probes: `--probe-rate` transactions/s of dedicated cards,
each published alone and then read back (the predictor's read: `WindowStateStore.read`) every
millisecond until its id is there; freshness = first successful read - publish time. Scoring
cost: `read_velocity` (the window states of card and terminal + the features) of one
transaction, timed between probes.

Baseline in the same run: `--baseline-ref` (a git commit; default the aggregator before the
one-pipeline reads and writes) is extracted with `git archive` into a temporary directory and its
`fraud features aggregate` runs on the same store and load (own stream prefix), alternating with
the working tree's aggregator for each rate. The lookup cost is timed for the predictor's read
(`read_velocity`: one pipelined read on Redis) and for Feast's `online_read` of the two states.

    .venv/bin/python benchmarks/bench_freshness.py                      # 500 and 2,000 tx/s, 20 s each
    .venv/bin/python benchmarks/bench_freshness.py --rates 500 --seconds 10 --no-save --baseline-ref ''

Writes benchmarks/results/freshness-<UTC date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    array = np.asarray(values) * 1000.0
    return {
        "n": len(values),
        "p50_ms": float(np.percentile(array, 50)),
        "p90_ms": float(np.percentile(array, 90)),
        "p99_ms": float(np.percentile(array, 99)),
        "max_ms": float(array.max()),
    }


def prepare(data_dir: Path, project: str) -> None:
    """Raw data, offline tables and the applied Redis store (in this process)."""
    os.environ["FRAUD_DATA_DIR"] = str(data_dir)
    os.environ["FRAUD_FEAST_PROJECT"] = project
    from test_features_offline import random_transactions, write_raw_transactions

    from fraud.config import DataLayout
    from fraud.feature_store import apply_repo
    from fraud.features.offline import build_offline_features

    layout = DataLayout.current()
    write_raw_transactions(layout, random_transactions(seed=1, n_customers=20, n_terminals=20, n_days=3))
    build_offline_features(layout)
    apply_repo("redis", project=project)


BASELINE_REF = "c1e8d8c"


def run_rate(rate: int, seconds: float, cards: int, probe_rate: float, stream, states) -> dict:
    from fraud.features.definitions import NS_PER_SECOND
    from fraud.streaming.events import CARD, TERMINAL, TransactionPublisher
    from fraud.streaming.state import read_velocity, velocity_matrix

    load = TransactionPublisher(stream)
    probe = TransactionPublisher(stream)
    stop = threading.Event()
    published = [0]
    rng = np.random.default_rng(rate)
    run_id = uuid.uuid4().hex[:6]

    def publisher() -> None:
        started = time.perf_counter()
        sent = 0
        while not stop.is_set():
            due = int((time.perf_counter() - started) * rate)
            if due > sent:
                now_ns = time.time_ns()
                batch = [
                    (
                        f"L{run_id}{sent + i}",
                        f"LC{int(rng.integers(cards))}",
                        f"LT{int(rng.integers(500))}",
                        10.0,
                        now_ns,
                    )
                    for i in range(due - sent)
                ]
                load.publish(batch)
                sent = due
                published[0] = sent
            time.sleep(0.01)

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    time.sleep(1.0)  # reach the steady state
    freshness, lookup, feast_lookup, timeouts = [], [], [], 0
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        card, tx_id = f"PC{run_id}{i % 50}", f"P{run_id}{i}"
        now_ns = time.time_ns()
        accepted = time.perf_counter()
        probe.publish([(tx_id, card, "PT0", 1.0, now_ns)])
        while True:
            if tx_id in states.read(CARD, [card])[card].transaction_ids:
                freshness.append(time.perf_counter() - accepted)
                break
            if time.perf_counter() - accepted > 5.0:
                timeouts += 1
                break
            time.sleep(0.001)
        t0 = time.perf_counter()
        read_velocity(states, [now_ns + NS_PER_SECOND], [card], ["PT0"])
        lookup.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        velocity_matrix(
            [now_ns + NS_PER_SECOND],
            [card],
            ["PT0"],
            states.read_via_feast(CARD, [card]),
            states.read_via_feast(TERMINAL, ["PT0"]),
        )
        feast_lookup.append(time.perf_counter() - t0)
        i += 1
        time.sleep(max(0.0, 1.0 / probe_rate - (time.perf_counter() - accepted)))
    stop.set()
    thread.join()
    achieved = published[0] / (seconds + 1.0)
    return {
        "rate_tx_s": rate,
        "achieved_tx_s": round(achieved, 1),
        "seconds": seconds,
        "freshness": percentiles(freshness),
        "probe_timeouts": timeouts,
        "velocity_lookup": percentiles(lookup),
        "velocity_lookup_feast_online_read": percentiles(feast_lookup),
    }


def baseline_tree(ref: str, work: Path) -> Path:
    """The repository at `ref` (git archive), to run its aggregator with this environment."""
    target = work / f"baseline-{ref}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout  # noqa: S607 - git from PATH with a fixed argument list
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)  # noqa: S607 - tar from PATH with a fixed argument list
    return target


def start_aggregator(tree: Path, prefix: str, log_path: Path) -> tuple[subprocess.Popen, object]:
    """`fraud features aggregate` of the code in `tree` on stream `prefix`; waits for its leases."""
    from fraud.settings import Settings
    from fraud.streaming.events import StreamSettings

    env = {**os.environ, "FRAUD_STREAM_PREFIX": prefix, "PYTHONPATH": str(tree)}
    stream = StreamSettings.from_settings(Settings.from_env(env))
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fraud.cli", "features", "aggregate", "--online", "redis", "--metrics-port", "0"],
        cwd=tree,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis.from_url(stream.redis_url)
    deadline = time.monotonic() + 180
    while not all(client.exists(f"{prefix}:lease:{p}") for p in range(stream.partitions)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the aggregator did not take the partitions; log: {log_path}")
        time.sleep(0.2)
    return process, stream


def stop_aggregator(process: subprocess.Popen, stream) -> None:
    process.terminate()
    process.wait(30)
    client = redis.Redis.from_url(stream.redis_url)
    keys = list(client.scan_iter(match=f"{stream.prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cards", type=int, default=5000)
    parser.add_argument("--probe-rate", type=float, default=20.0)
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the baseline ('' for none)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    project = f"bench_fresh_{uuid.uuid4().hex[:8]}"
    prepare(work / "data", project)
    from fraud.feature_store import get_feature_store, teardown
    from fraud.streaming.state import WindowStateStore

    trees = {"current": ROOT}
    if args.baseline_ref:
        trees[f"baseline {args.baseline_ref}"] = baseline_tree(args.baseline_ref, work)
    states = WindowStateStore(get_feature_store("redis", project=project))
    results = []
    try:
        for rate in args.rates:
            for variant, tree in trees.items():
                prefix = f"bench:freshness:{uuid.uuid4().hex[:8]}"
                log_path = work / f"aggregator-{variant.split()[0]}-{rate}.log"
                process, stream = start_aggregator(tree, prefix, log_path)
                try:
                    result = {
                        "aggregator": variant,
                        **run_rate(rate, args.seconds, args.cards, args.probe_rate, stream, states),
                    }
                finally:
                    stop_aggregator(process, stream)
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        teardown("redis", project=project)
    report = {
        "benchmark": "freshness",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "python": platform.python_version()},
        "setup": {
            "online_store": "redis (loopback)",
            "stream": "redis streams (loopback), 4 partitions, one aggregator process",
            "cards": args.cards,
            "probe_rate_per_s": args.probe_rate,
            "baseline_ref": args.baseline_ref or None,
        },
        "results": results,
    }
    if not args.no_save:
        path = RESULTS_DIR / f"freshness-{report['date']}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
