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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fraud.features.definitions import CUSTOMER_SPENDING_FEATURES, SNAPSHOT_TIMESTAMP, TERMINAL_RISK_FEATURES  # noqa: E402
from fraud.schema import CUSTOMER_ID, TERMINAL_ID  # noqa: E402
from predictor.__main__ import build_parser  # noqa: E402
from predictor.__main__ import main as predictor_main  # noqa: E402
from predictor.features import InMemoryFeatureSource  # noqa: E402

#: Snapshot date of the in-memory features: the day of the benchmark's requests (nothing stale).
SNAPSHOT_DAY = pd.Timestamp("2018-09-30")


def synthetic_feature_source(entities: int, seed: int = 0) -> InMemoryFeatureSource:
    rng = np.random.default_rng(seed)
    customers = pd.DataFrame({CUSTOMER_ID: [f"C{i}" for i in range(entities)], SNAPSHOT_TIMESTAMP: SNAPSHOT_DAY})
    for name in CUSTOMER_SPENDING_FEATURES:
        customers[name] = rng.gamma(2.0, 20.0, entities) if "amount" in name else rng.poisson(3.0, entities).astype(float)
    terminals = pd.DataFrame({TERMINAL_ID: [f"T{i}" for i in range(entities)], SNAPSHOT_TIMESTAMP: SNAPSHOT_DAY})
    for name in TERMINAL_RISK_FEATURES:
        terminals[name] = rng.beta(1.0, 30.0, entities) if "risk" in name else rng.poisson(5.0, entities).astype(float)
    return InMemoryFeatureSource(customers, terminals)


def main(argv: list[str] | None = None) -> int:
    """The real predictor entry point, with an in-memory feature source instead of Feast."""
    parser = build_parser()
    parser.add_argument("--entities", type=int, default=1000, help="customers and terminals in the in-memory source")
    return predictor_main(argv, parser, feature_source_factory=lambda args: synthetic_feature_source(args.entities))


if __name__ == "__main__":
    sys.exit(main())
