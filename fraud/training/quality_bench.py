"""The quality benchmark: the Fraud Detection Handbook's protocol on the full default dataset.

simulate (5,000 customers, 10,000 terminals, 183 days from 2018-04-01, seed N) -> offline features
-> Feast point-in-time sets -> per model family: prequential selection on earlier weeks, fit on
2018-07-25 .. 07-31, 7-day gap, score 2018-08-08 .. 08-14 -> AUC, AP, CP@100.

Writes `metrics.json` and `predictions.parquet` (one row per test transaction, a score column per
model) into the output directory.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fraud import atomic
from fraud.errors import UserError
from fraud.quality_metrics import quality_report
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID, TX_DATETIME, TX_FRAUD, TX_FRAUD_SCENARIO
from fraud.training.models import Selection

BOOK_TRAIN_START = "2018-07-25"
#: The Handbook's chapter-5 "test performance" is prequential too: four blocks whose training
#: starts 2018-08-15, 08-08, 08-01, 07-25 (test weeks 08-29 .. 08-08). With our fold construction
#: that is the folds of a plan whose training would start 2018-08-29.
BOOK_TEST_FOLDS_ANCHOR = "2018-08-29"
DEFAULT_SIMULATION = {"n_customers": 5000, "n_terminals": 10000, "n_days": 183, "start_date": "2018-04-01"}


@dataclass(frozen=True)
class BenchConfig:
    seed: int
    out_dir: Path
    raw_dir: Path | None = None
    train_start: str = BOOK_TRAIN_START
    n_validation_folds: int = 4
    book_test_folds: bool = True
    families: tuple[str, ...] = ("logistic_regression", "random_forest", "xgboost")
    #: also select, fit and score each family on the daily-snapshot features only (velocity at its
    #: no-history constant, which no tree splits on and a standardised linear model ignores)
    ablation: bool = True
    #: also refit XGBoost (its selected parameters) on training weeks that keep at most this many
    #: legitimate transactions per day, weighted back and unweighted (fraud.training.sampling)
    legit_per_day: tuple[int, ...] = ()


def without_velocity(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every velocity feature at its no-history value: the "snapshots only" model."""
    from fraud.features.definitions import VELOCITY_DEFAULTS

    return frame.assign(**VELOCITY_DEFAULTS)


def _select_fit_score(sets, family: str, test: pd.DataFrame) -> tuple[dict, np.ndarray, Selection]:
    from fraud.training.models import candidate_grid, fit, prequential_select

    selection = prequential_select(sets, family, candidate_grid(family))
    model = fit(selection.best, sets.train)
    scores = model.predict(test)
    quality = quality_report(test.assign(score=scores))
    summary = {
        "auc": quality.roc_auc,
        "average_precision": quality.average_precision,
        "card_precision_at_100": quality.card_precision_at_k,
        "selected_params": selection.best.params,
        "validation_average_precision": selection.best_result.mean_ap,
        "selection": [c.as_dict() for c in selection.candidates],
    }
    return summary, scores, selection


#: The Handbook's compromised-terminal scenario (fraud.simulator): its frauds change nothing but
#: the label, so a model sees them only through the terminal's known labels (the risk features).
COMPROMISED_TERMINAL_SCENARIO = 2


def information_ceiling(test: pd.DataFrame, transactions: pd.DataFrame, seed: int = 0) -> dict | None:
    """The best AP and CP@100 a model of the served features could reach on the test week.

    A compromised-terminal fraud (scenario 2) on day D carries no signature of its own: the model
    sees it only when an earlier fraud at its terminal has a known label inside the terminal-risk
    windows (fraud days D-delay-30 .. D-delay-1). The ceiling ranks every other fraud first and
    those frauds without known evidence among the genuine transactions (random order, `seed`);
    the oracle ranks every fraud first (AP 1, CP@100 bounded by the compromised cards per day).
    `transactions` holds the raw history with the simulator's `tx_fraud_scenario`; None without it.
    """
    from fraud.features.definitions import LABEL_DELAY_DAYS, TERMINAL_WINDOWS_DAYS

    if TX_FRAUD_SCENARIO not in transactions.columns:
        return None
    frame = test.merge(transactions[[TRANSACTION_ID, TX_FRAUD_SCENARIO]], on=TRANSACTION_ID, how="left")
    frame["_day"] = pd.to_datetime(frame[TX_DATETIME]).dt.floor("D")
    suspects = frame.loc[(frame[TX_FRAUD] == 1) & (frame[TX_FRAUD_SCENARIO] == COMPROMISED_TERMINAL_SCENARIO)]
    frauds = transactions.loc[transactions[TX_FRAUD] == 1, [TERMINAL_ID, TX_DATETIME]]
    fraud_days = frauds.assign(_fraud_day=pd.to_datetime(frauds[TX_DATETIME]).dt.floor("D"))[
        [TERMINAL_ID, "_fraud_day"]
    ].drop_duplicates()
    pairs = suspects[[TRANSACTION_ID, TERMINAL_ID, "_day"]].merge(fraud_days, on=TERMINAL_ID)
    age = (pairs["_day"] - pairs["_fraud_day"]).dt.days
    known = pairs.loc[(age > LABEL_DELAY_DAYS) & (age <= LABEL_DELAY_DAYS + max(TERMINAL_WINDOWS_DAYS)), TRANSACTION_ID]
    hidden = frame[TRANSACTION_ID].isin(set(suspects[TRANSACTION_ID]) - set(known))
    visible_fraud = (frame[TX_FRAUD] == 1) & ~hidden
    noise = np.random.default_rng(seed).uniform(0.0, 0.5, len(frame))
    ceiling = quality_report(frame.assign(score=np.where(visible_fraud, 1.0, noise)))
    oracle = quality_report(frame.assign(score=frame[TX_FRAUD].astype("float64")))
    return {
        "definition": (
            "every fraud ranked first except compromised-terminal frauds with no known fraud label at their "
            f"terminal in days D-{LABEL_DELAY_DAYS + max(TERMINAL_WINDOWS_DAYS)}..D-{LABEL_DELAY_DAYS + 1}, "
            "which rank among the genuine transactions"
        ),
        "frauds": int(frame[TX_FRAUD].sum()),
        "frauds_without_known_evidence": int(hidden.sum()),
        "average_precision": ceiling.average_precision,
        "card_precision_at_100": ceiling.card_precision_at_k,
        "oracle_card_precision_at_100": oracle.card_precision_at_k,
    }


def downsampling_study(sets, book_sets, spec, caps: tuple[int, ...], seed: int) -> list[dict]:
    """XGBoost with the parameters `spec` refitted on each training week downsampled to at most
    `cap` legitimate transactions per day (0 = everything), with the weights 1/p and without them;
    test-week and Handbook-protocol metrics on the full (never downsampled) assessment weeks."""
    from fraud.training.models import fit
    from fraud.training.sampling import SAMPLE_WEIGHT, downsample_legit

    rows = []
    for cap in (0, *caps):
        for weighted in (True, False) if cap else (True,):

            def sample(frame: pd.DataFrame, cap: int = cap, weighted: bool = weighted) -> pd.DataFrame:
                kept = downsample_legit(frame, cap or None, seed)
                return kept if weighted else kept.drop(columns=[SAMPLE_WEIGHT])

            train = sample(sets.train)
            started = time.perf_counter()
            model = fit(spec, train)
            fit_seconds = time.perf_counter() - started
            quality = quality_report(sets.test.assign(score=model.predict(sets.test)))
            book_ap = []
            if book_sets is not None:
                for block_train, block_test in book_sets.folds:
                    block_model = fit(spec, sample(block_train))
                    book_ap.append(
                        quality_report(block_test.assign(score=block_model.predict(block_test))).average_precision
                    )
            rows.append(
                {
                    "legit_per_day": cap,
                    "weighted": weighted,
                    "train_rows": len(train),
                    "train_frauds": int(train[TX_FRAUD].sum()),
                    "auc": quality.roc_auc,
                    "average_precision": quality.average_precision,
                    "card_precision_at_100": quality.card_precision_at_k,
                    "book_protocol_average_precision_mean": float(np.mean(book_ap)) if book_ap else float("nan"),
                    "fit_seconds": fit_seconds,
                }
            )
    return rows


def raw_matches(raw_dir: Path, seed: int) -> bool:
    """True when `raw_dir` holds a complete simulation with the default sizes and this seed."""
    manifest = Path(raw_dir) / "_SUCCESS.json"
    if not manifest.is_file():
        return False
    params = json.loads(manifest.read_text()).get("parameters", {})
    wanted = {**DEFAULT_SIMULATION, "seed": seed}
    return all(str(params.get(k)) == str(v) for k, v in wanted.items())


def run_quality_bench(config: BenchConfig, report: Callable[[str], None] = lambda step: None) -> dict:
    """Simulate (or reuse), build features and training sets below `<out_dir>/work` (this run's
    data directory, passed down as its settings) and fit, select and score each model family."""
    from fraud.settings import activated, current

    work = Path(config.out_dir).resolve() / "work"
    with activated(current().with_data_dir(work)):
        return _run_quality_bench(config, report)


def _run_quality_bench(config: BenchConfig, report: Callable[[str], None]) -> dict:
    import os

    from fraud import feature_store
    from fraud.config import DataLayout
    from fraud.features.offline import build_offline_features, labelled_transactions
    from fraud.training.dataset import SplitPlan, build_training_sets
    from fraud.training.models import fit
    from fraud.training.steps import IngestedLayout

    out_dir = Path(config.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = DataLayout.current()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if config.raw_dir is not None:
        if not raw_matches(config.raw_dir, config.seed):
            raise UserError(
                f"{config.raw_dir} is not the default simulation with seed {config.seed}; omit --raw to simulate"
            )
        raw = Path(config.raw_dir)
        report(f"reusing the simulation in {raw}")
    else:
        from fraud.simulator import SimulationConfig, simulate, write_dataset

        report("simulating the default dataset")
        raw = base.raw
        if not raw_matches(raw, config.seed):
            data = simulate(SimulationConfig(seed=config.seed))
            write_dataset(data, raw, overwrite=True)
    timings["simulate_s"] = time.perf_counter() - started

    step = time.perf_counter()
    report("building offline features")
    layout = IngestedLayout(root=base.root, ingested_transactions=raw / "transactions")
    build_offline_features(layout)
    feature_store.apply_repo()
    timings["features_s"] = time.perf_counter() - step

    step = time.perf_counter()
    report("point-in-time training sets")
    plan = SplitPlan.create(config.train_start, n_validation_folds=config.n_validation_folds)
    labelled = labelled_transactions(plan.span.start, plan.span.end, layout=layout)
    sets = build_training_sets(plan, labelled=labelled)
    timings["training_sets_s"] = time.perf_counter() - step

    book_sets = None
    if config.book_test_folds:
        step = time.perf_counter()
        report("the Handbook's four prequential test blocks (comparison only)")
        book_plan = SplitPlan.create(BOOK_TEST_FOLDS_ANCHOR, n_validation_folds=4)
        book_labelled = labelled_transactions(book_plan.span.start, book_plan.span.end, layout=layout)
        book_sets = build_training_sets(book_plan, labelled=book_labelled)
        timings["book_test_sets_s"] = time.perf_counter() - step

    predictions = sets.test[[TRANSACTION_ID, CUSTOMER_ID, TX_DATETIME, TX_FRAUD]].copy()
    models: dict[str, dict] = {}
    selections: dict[str, Selection] = {}
    for family in config.families:
        step = time.perf_counter()
        report(
            f"{family}: prequential selection over {config.n_validation_folds} folds, "
            "fit on the training week, score the test week"
        )
        summary, scores, selection = _select_fit_score(sets, family, sets.test)
        selections[family] = selection
        predictions[f"score_{family}"] = scores
        models[family] = {**summary, "seconds": time.perf_counter() - step}
        if book_sets is not None:
            block_metrics = []
            for block_train, block_test in book_sets.folds:
                block_model = fit(selection.best, block_train)
                block_metrics.append(quality_report(block_test.assign(score=block_model.predict(block_test))))
            models[family]["book_protocol_test"] = {
                "auc_mean": float(np.mean([m.roc_auc for m in block_metrics])),
                "average_precision_mean": float(np.mean([m.average_precision for m in block_metrics])),
                "average_precision_std": float(np.std([m.average_precision for m in block_metrics])),
                "card_precision_at_100_mean": float(np.mean([m.card_precision_at_k for m in block_metrics])),
                "test_weeks": [b.assess.as_dict() for b in book_sets.plan.folds],
            }
        timings[f"{family}_s"] = models[family]["seconds"]
    ablation: dict[str, dict] = {}
    if config.ablation:
        snapshot_sets = replace(
            sets,
            train=without_velocity(sets.train),
            test=without_velocity(sets.test),
            folds=[(without_velocity(a), without_velocity(b)) for a, b in sets.folds],
        )
        for family in config.families:
            step = time.perf_counter()
            report(f"{family}, daily snapshots only: selection, fit, test week")
            summary, scores, _ = _select_fit_score(snapshot_sets, family, snapshot_sets.test)
            predictions[f"score_{family}_snapshots_only"] = scores
            ablation[family] = {**summary, "seconds": time.perf_counter() - step}
            timings[f"{family}_snapshots_only_s"] = ablation[family]["seconds"]
    downsampling: list[dict] = []
    if config.legit_per_day and "xgboost" in selections:
        step = time.perf_counter()
        report(f"xgboost on downsampled training weeks: at most {list(config.legit_per_day)} legitimate per day")
        downsampling = downsampling_study(
            sets, book_sets, selections["xgboost"].best, config.legit_per_day, config.seed
        )
        timings["downsampling_s"] = time.perf_counter() - step
    step = time.perf_counter()
    report("the information ceiling of the test week")
    history = pd.read_parquet(
        raw / "transactions", columns=[TRANSACTION_ID, TERMINAL_ID, TX_DATETIME, TX_FRAUD, TX_FRAUD_SCENARIO]
    )
    ceiling = information_ceiling(sets.test, history, config.seed)
    timings["ceiling_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - started
    result = {
        "seed": config.seed,
        "protocol": (
            "Fraud Detection Handbook: train 7 days, delay 7 days, test 7 days; prequential selection on earlier weeks"
        ),
        "windows": plan.describe(),
        "sets": sets.summary(),
        "models": models,
        "snapshots_only": ablation,
        "information_ceiling": ceiling,
        "downsampling": downsampling,
        "timings": timings,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    atomic.write_json(out_dir / "metrics.json", result, indent=2, default=float)
    with atomic.replacing(out_dir / "predictions.parquet") as tmp_pred:
        predictions.to_parquet(tmp_pred, index=False)
    return result


def summary_table(result: dict) -> pd.DataFrame:
    rows = [
        {
            "model": f"{family} (snapshots only)",
            "AUC": m["auc"],
            "AP": m["average_precision"],
            "CP@100": m["card_precision_at_100"],
            "validation AP": m["validation_average_precision"],
            "book-protocol AP (4 weeks)": float("nan"),
        }
        for family, m in result.get("snapshots_only", {}).items()
    ] + [
        {
            "model": family,
            "AUC": m["auc"],
            "AP": m["average_precision"],
            "CP@100": m["card_precision_at_100"],
            "validation AP": m["validation_average_precision"],
            "book-protocol AP (4 weeks)": m.get("book_protocol_test", {}).get("average_precision_mean", float("nan")),
        }
        for family, m in result["models"].items()
    ]
    ceiling = result.get("information_ceiling")
    if ceiling:
        rows.append(
            {
                "model": "information ceiling",
                "AUC": float("nan"),
                "AP": ceiling["average_precision"],
                "CP@100": ceiling["card_precision_at_100"],
                "validation AP": float("nan"),
                "book-protocol AP (4 weeks)": float("nan"),
            }
        )
    return pd.DataFrame(rows)
