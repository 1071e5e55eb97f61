"""The predictor's batched Redis reads (fraud/online_readers.py) with the hiredis reply parser or
redis-py's pure-Python one: one process per measurement (run it alternately for A/B), median of 25
calls for 1 / 100 / 1,000 (customer, terminal) pairs of the dataset's last day, one JSON line.

    FRAUD_REDIS_URL=... .venv/bin/python benchmarks/bench_redis_parser.py DATA_DIR hiredis|python
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    data_dir, mode = Path(sys.argv[1]), sys.argv[2]
    os.environ["FRAUD_DATA_DIR"] = str(data_dir)
    from bench_scoring import sample_transactions
    from redis._parsers import _HiredisParser, _RESP2Parser

    from fraud.feature_store import online_client

    transactions = sample_transactions(data_dir, 1000)
    client = online_client("redis")
    client.views()
    reader = client._reader
    if reader is None:
        raise SystemExit("the redis store has no batched reader")
    redis_client = reader._store._get_client(reader._config.online_store)
    parser_class = _HiredisParser if mode == "hiredis" else _RESP2Parser
    redis_client.connection_pool.connection_kwargs["parser_class"] = parser_class
    redis_client.connection_pool.disconnect()
    medians = {}
    for batch in (1, 100, 1000):
        customers = [t["customer_id"] for t in transactions[:batch]]
        terminals = [t["terminal_id"] for t in transactions[:batch]]
        client.arrays(customers, terminals)
        samples = []
        for _ in range(25):
            begin = time.perf_counter()
            client.arrays(customers, terminals)
            samples.append(time.perf_counter() - begin)
        medians[str(batch)] = statistics.median(samples) * 1e3
    parser = type(redis_client.connection_pool.get_connection()._parser).__name__
    print(json.dumps({"mode": mode, "parser": parser, "load_average_1m": os.getloadavg()[0], "lookup_ms": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
