"""The predictor (`predictor.model.FraudModel` in KServe's ModelServer, exactly as `python -m
predictor` runs it) with an in-memory feature source instead of Feast: the "model only" server of
the scoring benchmark. Batch features of `--entities` customers `C0..` and terminals `T0..` are
drawn once from a fixed seed, with the snapshot date of the day of the request timestamps the
benchmark sends (so nothing is stale or missing).

    .venv/bin/python benchmarks/serve_predictor_memory.py --bundle PATH --http_port N [kserve options]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd

from fraud.features.definitions import CUSTOMER_SPENDING_FEATURES, SNAPSHOT_TIMESTAMP, TERMINAL_RISK_FEATURES
from fraud.schema import CUSTOMER_ID, TERMINAL_ID
from predictor.__main__ import build_parser
from predictor.__main__ import main as predictor_main
from predictor.features import InMemoryFeatureSource

#: Snapshot date of the in-memory features: the day of the benchmark's requests (nothing stale).
SNAPSHOT_DAY = pd.Timestamp("2018-09-30")


def customer_mean_amounts(entities: int, seed: int = 0) -> np.ndarray:
    """Mean amount of card `C{i}`: uniform on [5, 100] as in the simulator (Handbook ch. 3.2)."""
    return np.random.default_rng(seed).uniform(5.0, 100.0, entities)


def synthetic_feature_source(entities: int, seed: int = 0) -> InMemoryFeatureSource:
    """Consistent windows like the simulator's: each card spends around its mean amount
    (`customer_mean_amounts`, which the benchmark's requests use too, so a request looks like
    ordinary spending and the model flags a realistic few per cent, not most); counts grow with the
    window; terminals carry rare frauds."""
    rng = np.random.default_rng(seed + 1)
    customers = pd.DataFrame({CUSTOMER_ID: [f"C{i}" for i in range(entities)], SNAPSHOT_TIMESTAMP: SNAPSHOT_DAY})
    mean_amount = customer_mean_amounts(entities, seed)
    for window, daily in ((1, 2.0), (7, 2.0), (30, 2.0)):
        count = rng.poisson(daily * window, entities).astype(float)
        customers[f"customer_nb_tx_{window}d"] = count
        customers[f"customer_sum_amount_{window}d"] = count * mean_amount * rng.uniform(0.8, 1.2, entities)
    terminals = pd.DataFrame({TERMINAL_ID: [f"T{i}" for i in range(entities)], SNAPSHOT_TIMESTAMP: SNAPSHOT_DAY})
    for window in (1, 7, 30):
        count = rng.poisson(1.0 * window, entities).astype(float)
        frauds = rng.binomial(count.astype(int), 0.003).astype(float)
        terminals[f"terminal_nb_tx_{window}d"] = count
        terminals[f"terminal_nb_fraud_{window}d"] = frauds
        terminals[f"terminal_risk_{window}d"] = np.divide(frauds, count, out=np.zeros(entities), where=count > 0)
    missing = [
        name
        for name in (*CUSTOMER_SPENDING_FEATURES, *TERMINAL_RISK_FEATURES)
        if name not in customers.columns and name not in terminals.columns
    ]
    if missing:
        raise SystemExit(f"synthetic features lack {missing}")
    return InMemoryFeatureSource(customers, terminals)


def main(argv: list[str] | None = None) -> int:
    """The real predictor entry point, with an in-memory feature source instead of Feast."""
    parser = build_parser()
    parser.add_argument("--entities", type=int, default=1000, help="customers and terminals in the in-memory source")
    return predictor_main(argv, parser, feature_source_factory=lambda args: synthetic_feature_source(args.entities))


if __name__ == "__main__":
    sys.exit(main())
