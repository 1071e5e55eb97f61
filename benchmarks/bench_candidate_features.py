"""Candidate features judged on the quality bench's four validation weeks (label-delayed history).

Each candidate group is added to the model features and the served grid point (depth 3, 300
trees, learning rate 0.05, `scale_pos_weight` 1, 4,096 histogram bins) is refitted on the four
prequential validation folds; a candidate would enter the feature definitions only if it raised
the mean validation AP clearly. The training week and the test week (AP, CP@100) are recorded for
information; they choose nothing.

    fraud simulate --seed 0 --out /tmp/quality-data/raw
    .venv/bin/python benchmarks/bench_xgboost_modes.py sets /tmp/quality-data --sets /tmp/quality-sets
    .venv/bin/python benchmarks/bench_candidate_features.py /tmp/quality-data --sets /tmp/quality-sets --seed 0

The candidates use only labels known at the transaction's day D (fraud days <= D - delay - 1, the
terminal-risk features' rule):

* customer known frauds: the card's frauds with known labels over 7 / 14 / 30 days, their share of
  its transactions, and the days since its last known fraud;
* terminal fraud episode: the days since the terminal's last known fraud and since the start of
  its current episode of known frauds (fraud days no more than 7 days apart).

Results: benchmarks/results/candidate_features-seed<N>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
#: days-since features of an entity without a known fraud, and their cap
CAP_DAYS = 60.0
#: fraud days at most this far apart belong to one episode
EPISODE_GAP_DAYS = 7
CUSTOMER_WINDOWS = (7, 14, 30)
SERVED_PARAMS = {"max_depth": 3, "n_estimators": 300, "learning_rate": 0.05, "scale_pos_weight": 1.0, "max_bin": 4096}


class DailyHistory:
    """Per entity and day: transactions, frauds, the last fraud day and the current episode's start."""

    def __init__(self, history: pd.DataFrame, entity: str) -> None:
        days = pd.to_datetime(history["tx_datetime"]).dt.floor("D")
        self.origin = days.min()
        day = (days - self.origin).dt.days.to_numpy()
        self.entities = pd.Index(sorted(history[entity].unique()))
        row = self.entities.get_indexer(history[entity])
        n_days = int(day.max()) + 1
        frauds = np.zeros((len(self.entities), n_days))
        txs = np.zeros((len(self.entities), n_days))
        np.add.at(frauds, (row, day), history["tx_fraud"].to_numpy())
        np.add.at(txs, (row, day), 1)
        # cumulative counts: [:, k] = days < k
        self.fraud_before = np.concatenate([np.zeros((len(self.entities), 1)), frauds.cumsum(1)], axis=1)
        self.tx_before = np.concatenate([np.zeros((len(self.entities), 1)), txs.cumsum(1)], axis=1)
        never = -1e9
        self.last = np.full(frauds.shape, never)
        self.episode_start = np.full(frauds.shape, never)
        last = np.full(len(self.entities), never)
        start = np.full(len(self.entities), never)
        for k in range(n_days):
            has = frauds[:, k] > 0
            start = np.where(has & (k - last > EPISODE_GAP_DAYS), k, start)
            last = np.where(has, k, last)
            self.last[:, k], self.episode_start[:, k] = last, start
        self.entity = entity

    def _index(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        rows = self.entities.get_indexer(frame[self.entity])
        if (rows < 0).any():
            raise ValueError(f"{int((rows < 0).sum())} rows of an {self.entity} absent from the history")
        day = (pd.to_datetime(frame["tx_datetime"]).dt.floor("D") - self.origin).dt.days.to_numpy()
        return rows, day

    def known_counts(self, frame: pd.DataFrame, window: int, delay: int) -> tuple[np.ndarray, np.ndarray]:
        """(frauds, transactions) on days D-delay-window .. D-delay-1 of each row's entity."""
        rows, day = self._index(frame)
        high = np.clip(day - delay, 0, self.fraud_before.shape[1] - 1)
        low = np.clip(day - delay - window, 0, self.fraud_before.shape[1] - 1)
        return (
            self.fraud_before[rows, high] - self.fraud_before[rows, low],
            self.tx_before[rows, high] - self.tx_before[rows, low],
        )

    def days_since(self, frame: pd.DataFrame, delay: int) -> tuple[np.ndarray, np.ndarray]:
        """(days since the last known fraud, days since its episode's start), capped at CAP_DAYS."""
        rows, day = self._index(frame)
        known = day - delay - 1
        ok = known >= 0
        column = np.clip(known, 0, None)
        since_last = np.where(ok, day - self.last[rows, column], np.inf)
        since_start = np.where(ok, day - self.episode_start[rows, column], np.inf)
        since_start = np.where(since_last <= CAP_DAYS, since_start, np.inf)
        return np.minimum(since_last, CAP_DAYS), np.minimum(since_start, CAP_DAYS)


def candidate_columns(frame: pd.DataFrame, customers: DailyHistory, terminals: DailyHistory, delay: int) -> dict:
    columns: dict[str, np.ndarray] = {}
    for window in CUSTOMER_WINDOWS:
        frauds, txs = customers.known_counts(frame, window, delay)
        columns[f"customer_nb_known_fraud_{window}d"] = frauds
        columns[f"customer_known_fraud_share_{window}d"] = np.where(txs > 0, frauds / np.maximum(txs, 1), 0.0)
    columns["customer_days_since_known_fraud"] = customers.days_since(frame, delay)[0]
    since_last, since_start = terminals.days_since(frame, delay)
    columns["terminal_days_since_known_fraud"] = since_last
    columns["terminal_days_since_fraud_episode_start"] = since_start
    return columns


CANDIDATES: dict[str, tuple[str, ...]] = {
    "the model features": (),
    "+ customer known frauds 7/14/30 d": tuple(f"customer_nb_known_fraud_{w}d" for w in CUSTOMER_WINDOWS),
    "+ customer known fraud share 7/14/30 d": tuple(f"customer_known_fraud_share_{w}d" for w in CUSTOMER_WINDOWS),
    "+ customer days since known fraud": ("customer_days_since_known_fraud",),
    "+ terminal days since known fraud": ("terminal_days_since_known_fraud",),
    "+ terminal days since fraud episode start": ("terminal_days_since_fraud_episode_start",),
    "+ both terminal episode features": ("terminal_days_since_known_fraud", "terminal_days_since_fraud_episode_start"),
}


def evaluate(sets, extra: tuple[str, ...], threads: int) -> dict:
    from xgboost import XGBClassifier

    from fraud.features.definitions import MODEL_FEATURES
    from fraud.quality_metrics import average_precision, quality_report

    columns = [*MODEL_FEATURES, *extra]

    def fit(frame: pd.DataFrame) -> XGBClassifier:
        model = XGBClassifier(
            objective="binary:logistic", tree_method="hist", n_jobs=threads, random_state=0, eval_metric="aucpr",
            **SERVED_PARAMS,
        )  # fmt: skip
        model.fit(frame[columns].astype("float64"), frame["tx_fraud"])
        return model

    def scores(model, frame: pd.DataFrame) -> np.ndarray:
        return model.predict_proba(frame[columns].astype("float64"))[:, 1]

    fold_ap = [float(average_precision(v["tx_fraud"].to_numpy(), scores(fit(t), v))) for t, v in sets.folds]
    test = quality_report(sets.test.assign(score=scores(fit(sets.train), sets.test)))
    return {
        "columns_added": list(extra),
        "fold_ap": fold_ap,
        "mean_validation_ap": float(np.mean(fold_ap)),
        "test_ap": test.average_precision,
        "test_cp100": test.card_precision_at_k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="data directory with the simulation in raw/")
    parser.add_argument("--sets", type=Path, required=True, help="the sets saved by bench_xgboost_modes.py sets")
    parser.add_argument("--seed", type=int, required=True, help="the simulation's seed (recorded)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from fraud.features.definitions import LABEL_DELAY_DAYS
    from fraud.training.dataset import TrainingSets

    started = time.perf_counter()
    history = pd.read_parquet(
        args.data_dir / "raw" / "transactions", columns=["customer_id", "terminal_id", "tx_datetime", "tx_fraud"]
    )
    customers, terminals = DailyHistory(history, "customer_id"), DailyHistory(history, "terminal_id")
    sets = TrainingSets.load(args.sets / "train.parquet", args.sets / "folds", args.sets / "test.parquet")

    def add(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.assign(**candidate_columns(frame, customers, terminals, LABEL_DELAY_DAYS))

    sets = replace(sets, train=add(sets.train), test=add(sets.test), folds=[(add(a), add(b)) for a, b in sets.folds])
    results = {}
    for name, extra in CANDIDATES.items():
        results[name] = evaluate(sets, extra, args.threads)
        r = results[name]
        print(
            f"{name:45s} validation AP {r['mean_validation_ap']:.4f} "
            f"(folds {' '.join(f'{a:.3f}' for a in r['fold_ap'])})  "
            f"test AP {r['test_ap']:.4f} CP@100 {r['test_cp100']:.3f}",
            flush=True,
        )
    date = datetime.now(UTC).date().isoformat()
    target = args.out or RESULTS / f"candidate_features-seed{args.seed}_{date}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(
            {
                "benchmark": "candidate_features",
                "seed": args.seed,
                "protocol": "served grid point refitted on the 4 prequential validation weeks (selection); "
                "train 2018-07-25..31, delay 7 days, test 2018-08-08..14 (information only)",
                "label_delay_days": LABEL_DELAY_DAYS,
                "episode_gap_days": EPISODE_GAP_DAYS,
                "params": SERVED_PARAMS,
                "candidates": results,
                "seconds": time.perf_counter() - started,
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": args.threads},
            },
            indent=2,
        )
    )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
