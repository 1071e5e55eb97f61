"""XGBoost modes (boosting, random-forest mode, boosted forests, regularisation) judged on the
Handbook's four prequential validation weeks, with the TreeSHAP cost of the best points.

Two steps, so that every configuration is a cheap refit on saved frames:

    fraud simulate --seed 0 --out /tmp/quality-data/raw
    .venv/bin/python benchmarks/bench_xgboost_modes.py sets /tmp/quality-data --sets /tmp/quality-sets
    .venv/bin/python benchmarks/bench_xgboost_modes.py run --sets /tmp/quality-sets [--config NAME ...]

`sets` builds the offline features of the data directory's `raw/` simulation, the Feast
point-in-time sets of the quality bench (`fraud bench quality`: train 2018-07-25..31, 7-day delay,
test 2018-08-08..14, four earlier validation folds) and saves them as Parquet.

`run` fits each configuration (one thread) on the four validation folds and records the per-fold
and mean validation AP and the fit time. Selection reads the mean validation AP only. For the
served point and the `--cost-top` best configurations it also fits the training week and records
the cost of `pred_contribs` (exact TreeSHAP, a batch of 1,000 test rows, median of 3, per row),
of `inplace_predict` (same batch, per row, and single-row) and, for information only, the
test-week AP and CP@100. Results accumulate in
benchmarks/results/xgboost_modes_validation_<date>.json (a configuration already in that file is
not refitted unless `--refit`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: the served grid point (the best of candidate_grid("xgboost")): the reference of the TreeSHAP cost
SERVED = "boost d3 n300 lr0.05 bin4096"
SQRT_FEATURES = round(math.sqrt(26)) / 26  # sklearn's max_features="sqrt" on the 26 model features


def _rf(
    depth: int,
    mcw: float = 0.0,
    trees: int = 100,
    subsample: float = 0.63,
    colsample: float = SQRT_FEATURES,
    lr: float = 0.01,
    **extra,
):
    """Random-forest mode: one round of `trees` parallel trees (XGBoost averages them). A leaf's
    value is a Newton step from the base margin, about (fraud share - p0) / (p0 (1 - p0)), i.e. up
    to ~1/p0 ~ 100 at a fraud rate of 1 %: with learning_rate 1 the probabilities of the riskiest
    rows saturate to 1.0 in float32 and tie, which ruins AP (0.44). In one round the learning rate
    only scales the margin, so 0.01 keeps the ranking and avoids the ties."""
    return {
        "n_estimators": 1,
        "num_parallel_tree": trees,
        "learning_rate": lr,
        "subsample": subsample,
        "colsample_bynode": colsample,
        "max_depth": depth,
        "min_child_weight": mcw,
        "reg_lambda": 1e-5,
        "scale_pos_weight": "1",
        **extra,
    }


def _boost(depth: int, n: int, lr: float, **extra):
    return {"max_depth": depth, "n_estimators": n, "learning_rate": lr, "scale_pos_weight": "1", **extra}


CONFIGS: dict[str, dict] = {
    # the served grid point with XGBoost's default 256 bins, and its neighbour
    "boost d3 n300 lr0.05": _boost(3, 300, 0.05),
    "boost d6 n300 lr0.05": _boost(6, 300, 0.05),
    # random-forest mode: one round of 100 parallel trees, lr 1, row subsample 0.63, sqrt(26) features per node
    "rf d20 mcw0 lr1 (saturates)": _rf(20, lr=1.0),
    "rf d10 mcw0": _rf(10),
    "rf d15 mcw0": _rf(15),
    "rf d20 mcw0": _rf(20),
    "rf d20 mcw1": _rf(20, mcw=1.0),
    "rf d20 mcw0.1": _rf(20, mcw=0.1),
    "rf d20 mcw0 col0.5": _rf(20, colsample=0.5),
    "rf d20 mcw0 sub0.8": _rf(20, subsample=0.8),
    "rf d20 mcw0 300 trees": _rf(20, trees=300),
    "rf d15 mcw0.1 lambda1": _rf(15, mcw=0.1, reg_lambda=1.0),
    # boosted forests: a few parallel trees per round, fewer rounds
    "bforest d6 n50x4 lr0.1": _boost(6, 50, 0.1, num_parallel_tree=4, subsample=0.63, colsample_bynode=0.5),
    "bforest d8 n30x10 lr0.3": _boost(
        8, 30, 0.3, num_parallel_tree=10, subsample=0.63, colsample_bynode=SQRT_FEATURES, min_child_weight=0.1
    ),
    "bforest d10 n20x10 lr0.3": _boost(
        10, 20, 0.3, num_parallel_tree=10, subsample=0.63, colsample_bynode=SQRT_FEATURES, min_child_weight=0.1
    ),
    # regularisation on the served depths
    "boost d3 n300 lr0.05 mcw0.1": _boost(3, 300, 0.05, min_child_weight=0.1),
    "boost d6 n300 lr0.05 mcw0.1": _boost(6, 300, 0.05, min_child_weight=0.1),
    "boost d6 n300 lr0.05 mcw5": _boost(6, 300, 0.05, min_child_weight=5),
    "boost d6 n300 lr0.05 mds1": _boost(6, 300, 0.05, max_delta_step=1),
    "boost d6 n300 lr0.05 gamma1": _boost(6, 300, 0.05, gamma=1.0),
    "boost d3 n300 lr0.05 spw3": {**_boost(3, 300, 0.05), "scale_pos_weight": "3"},
    "boost d6 n300 lr0.05 spw3": {**_boost(6, 300, 0.05), "scale_pos_weight": "3"},
    "boost d6 n300 lr0.05 sub0.63 col0.5": _boost(6, 300, 0.05, subsample=0.63, colsample_bynode=0.5),
    # histogram and growth policy
    "boost d3 n300 lr0.05 bin64": _boost(3, 300, 0.05, max_bin=64),
    "boost d3 n300 lr0.05 bin1024": _boost(3, 300, 0.05, max_bin=1024),
    "boost d3 n300 lr0.05 bin512": _boost(3, 300, 0.05, max_bin=512),
    "boost d3 n300 lr0.05 bin2048": _boost(3, 300, 0.05, max_bin=2048),
    "boost d3 n300 lr0.05 bin4096": _boost(3, 300, 0.05, max_bin=4096),
    # the served grid (candidate_grid) with 1,024 bins
    "boost d3 n100 lr0.1 bin1024": _boost(3, 100, 0.1, max_bin=1024),
    "boost d3 n100 lr0.1 spw sqrt bin1024": {**_boost(3, 100, 0.1, max_bin=1024), "scale_pos_weight": "sqrt"},
    "boost d3 n300 lr0.05 spw sqrt bin1024": {**_boost(3, 300, 0.05, max_bin=1024), "scale_pos_weight": "sqrt"},
    "boost d6 n100 lr0.1 bin1024": _boost(6, 100, 0.1, max_bin=1024),
    "boost d6 n100 lr0.1 spw sqrt bin1024": {**_boost(6, 100, 0.1, max_bin=1024), "scale_pos_weight": "sqrt"},
    "boost d6 n300 lr0.05 bin1024": _boost(6, 300, 0.05, max_bin=1024),
    "boost d6 n300 lr0.05 spw sqrt bin1024": {**_boost(6, 300, 0.05, max_bin=1024), "scale_pos_weight": "sqrt"},
    "boost d6 n300 lr0.05 mcw5 bin1024": _boost(6, 300, 0.05, min_child_weight=5, max_bin=1024),
    "boost d3 n300 lr0.05 bin16384": _boost(3, 300, 0.05, max_bin=16384),
    # the served grid (candidate_grid) with XGBoost's default 256 bins and with 4,096
    **{
        f"boost d{d} n{n} lr{lr}{' spw sqrt' if w == 'sqrt' else ''}{suffix}": {
            **_boost(d, n, lr, **extra),
            "scale_pos_weight": w,
        }
        for suffix, extra in (("", {}), (" bin4096", {"max_bin": 4096}))
        for d in (3, 6)
        for n, lr in ((100, 0.1), (300, 0.05))
        for w in ("1", "sqrt")
    },
    "boost d6 n300 lr0.05 mcw5 bin4096": _boost(6, 300, 0.05, min_child_weight=5, max_bin=4096),
    # around the served point, 4,096 bins
    "boost d3 n600 lr0.025 bin4096": _boost(3, 600, 0.025, max_bin=4096),
    "boost d3 n500 lr0.05 bin4096": _boost(3, 500, 0.05, max_bin=4096),
    "boost d4 n300 lr0.05 bin4096": _boost(4, 300, 0.05, max_bin=4096),
    "boost d3 n300 lr0.05 mcw5 bin4096": _boost(3, 300, 0.05, min_child_weight=5, max_bin=4096),
    "boost d4 n300 lr0.05 mcw5 bin4096": _boost(4, 300, 0.05, min_child_weight=5, max_bin=4096),
    "boost d3 n300 lr0.05 sub0.8 col0.8 bin4096": _boost(
        3, 300, 0.05, subsample=0.8, colsample_bynode=0.8, max_bin=4096
    ),
    "bforest d3 n300x4 lr0.05 bin4096": _boost(
        3, 300, 0.05, num_parallel_tree=4, subsample=0.63, colsample_bynode=0.5, max_bin=4096
    ),
    "rf d20 mcw0 bin1024": _rf(20, max_bin=1024),
    "rf d20 mcw0 bin4096": _rf(20, max_bin=4096),
    "boost lossguide l32 n300 lr0.05": _boost(0, 300, 0.05, grow_policy="lossguide", max_leaves=32),
    "boost lossguide l64 n200 lr0.05 mcw0.1": _boost(
        0, 200, 0.05, grow_policy="lossguide", max_leaves=64, min_child_weight=0.1
    ),
}
#: scikit-learn's random forest, the quality bench's best validation point (a reference; not servable)
SKLEARN_RF = "sklearn rf d20 n100 (reference)"


def spec_of(name: str):
    from fraud.training.models import ModelSpec

    if name == SKLEARN_RF:
        return ModelSpec("random_forest", {"max_depth": 20, "n_estimators": 100, "min_samples_leaf": 1})
    return ModelSpec("xgboost", CONFIGS[name])


def build_sets(data_dir: Path, sets_dir: Path) -> None:
    from fraud import feature_store
    from fraud.config import DataLayout
    from fraud.features.offline import build_offline_features, labelled_transactions
    from fraud.settings import activated, current
    from fraud.training.dataset import SplitPlan, build_training_sets
    from fraud.training.quality_bench import BOOK_TRAIN_START
    from fraud.training.steps import IngestedLayout

    with activated(current().with_data_dir(data_dir.resolve())):
        base = DataLayout.current()
        started = time.perf_counter()
        layout = IngestedLayout(root=base.root, ingested_transactions=base.raw / "transactions")
        build_offline_features(layout)
        feature_store.apply_repo()
        print(f"features {time.perf_counter() - started:.0f} s", flush=True)
        plan = SplitPlan.create(BOOK_TRAIN_START, n_validation_folds=4)
        labelled = labelled_transactions(plan.span.start, plan.span.end, layout=layout)
        sets = build_training_sets(plan, labelled=labelled)
        sets.save(sets_dir / "train.parquet", sets_dir / "folds", sets_dir / "test.parquet")
        print(json.dumps(sets.summary(), indent=1, default=str))
        print(f"saved in {time.perf_counter() - started:.0f} s under {sets_dir}")


def _per_row_us(call, repeats: int = 3, rows: int = 1000) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return float(sorted(timings)[len(timings) // 2]) / rows * 1e6


def cost_and_test(name: str, sets) -> dict:
    import numpy as np
    import xgboost as xgb

    from fraud.features.definitions import MODEL_FEATURES
    from fraud.quality_metrics import quality_report
    from fraud.training.models import fit, prediction_cost_us

    started = time.perf_counter()
    model = fit(spec_of(name), sets.train)
    fit_s = time.perf_counter() - started
    quality = quality_report(sets.test.assign(score=model.predict(sets.test)))
    booster = model.booster
    booster.set_param({"nthread": 1})
    batch = np.ascontiguousarray(sets.test[list(MODEL_FEATURES)].to_numpy(dtype="float64")[:1000])
    matrix = xgb.DMatrix(batch, nthread=1)
    dump = booster.get_dump()
    leaves = sum(tree.count("leaf=") for tree in dump)
    return {
        "train_fit_s": fit_s,
        "trees": len(dump),
        "leaves": leaves,
        "pred_contribs_us_per_row": _per_row_us(
            lambda: booster.predict(matrix, pred_contribs=True, validate_features=False)
        ),
        "pred_contribs_approx_us_per_row": _per_row_us(
            lambda: booster.predict(matrix, pred_contribs=True, approx_contribs=True, validate_features=False)
        ),
        "inplace_predict_batch_us_per_row": _per_row_us(lambda: booster.inplace_predict(batch)),
        "inplace_predict_single_row_us": prediction_cost_us(booster, batch[0], repeats=100),
        "test_auc": quality.roc_auc,
        "test_ap": quality.average_precision,
        "test_cp100": quality.card_precision_at_k,
    }


def run(args: argparse.Namespace) -> None:
    os.environ["FRAUD_TRAIN_THREADS"] = "1"  # one XGBoost thread: the machine is shared
    import numpy as np

    from fraud.quality_metrics import average_precision
    from fraud.schema import TX_FRAUD
    from fraud.training.dataset import TrainingSets
    from fraud.training.models import fit

    sets = TrainingSets.load(args.sets / "train.parquet", args.sets / "folds", args.sets / "test.parquet")
    target = args.out or RESULTS / f"xgboost_modes_validation_{datetime.now(UTC).date().isoformat()}.json"
    result = json.loads(target.read_text()) if target.exists() else {"configs": {}}
    result.update(
        {
            "benchmark": "xgboost_modes_validation",
            "protocol": "Handbook: selection on the mean AP of 4 prequential validation weeks (07-04..07-31); "
            "train 2018-07-25..31, delay 7 days, test 2018-08-08..14 (information only)",
            "sets": sets.summary(),
            "seed": 0,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": 1},
        }
    )
    names = args.config or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS and n != SKLEARN_RF]
    if unknown:
        raise SystemExit(f"unknown --config {unknown}; known: {[*CONFIGS, SKLEARN_RF]}")

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=float))

    for name in names:
        if name in result["configs"] and not args.refit:
            continue
        spec = spec_of(name)
        fold_ap, fold_fit = [], []
        for fold_train, fold_valid in sets.folds:
            model = fit(spec, fold_train)
            fold_fit.append(model.fit_seconds)
            fold_ap.append(average_precision(fold_valid[TX_FRAUD].to_numpy(), model.predict(fold_valid)))
        result["configs"][name] = {
            "family": spec.family,
            "params": spec.params,
            "fold_ap": fold_ap,
            "mean_validation_ap": float(np.mean(fold_ap)),
            "fit_s_mean": float(np.mean(fold_fit)),
            "load_at_end": os.getloadavg()[0],
        }
        folds = " ".join(f"{v:.3f}" for v in fold_ap)
        print(f"{name:42s} val AP {np.mean(fold_ap):.4f}  folds {folds}  fit {np.mean(fold_fit):.1f} s", flush=True)
        save()

    ranked = sorted(result["configs"], key=lambda n: -result["configs"][n]["mean_validation_ap"])
    xgb_ranked = [n for n in ranked if n not in (SERVED, SKLEARN_RF)]
    costed = [SERVED, *xgb_ranked[: args.cost_top], *(args.cost or [])]
    for name in dict.fromkeys(costed):
        entry = result["configs"].get(name)
        if entry is None or ("pred_contribs_us_per_row" in entry and not args.refit):
            continue
        entry.update(cost_and_test(name, sets))
        print(
            f"{name:42s} TreeSHAP {entry['pred_contribs_us_per_row']:.1f} us/row  "
            f"predict {entry['inplace_predict_single_row_us']:.1f} us  test AP {entry['test_ap']:.3f} (information)",
            flush=True,
        )
        save()
    print_table(result)
    print(f"wrote {target}")


def print_table(result: dict) -> None:
    served = result["configs"].get(SERVED, {}).get("pred_contribs_us_per_row")
    rows = sorted(result["configs"].items(), key=lambda kv: -kv[1]["mean_validation_ap"])
    print("| config | validation AP | folds | fit s | TreeSHAP µs/row (x served) | predict µs | test AP | CP@100 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, e in rows:
        shap = e.get("pred_contribs_us_per_row")
        shap_text = f"{shap:.1f} ({shap / served:.1f}x)" if shap and served else "-"
        pred = f"{e['inplace_predict_single_row_us']:.1f}" if "inplace_predict_single_row_us" in e else "-"
        test = f"{e['test_ap']:.3f} | {e['test_cp100']:.3f}" if "test_ap" in e else "- | -"
        folds = " / ".join(f"{v:.3f}" for v in e["fold_ap"])
        cells = [name, f"{e['mean_validation_ap']:.3f}", folds, f"{e['fit_s_mean']:.1f}", shap_text, pred, test]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sets_cmd = sub.add_parser("sets", help="build and save the point-in-time sets of a data directory")
    sets_cmd.add_argument("data_dir", type=Path, help="data directory with the seed-0 simulation in raw/")
    sets_cmd.add_argument("--sets", type=Path, default=Path("/tmp/quality-sets"))
    run_cmd = sub.add_parser("run", help="fit configurations on the saved validation folds")
    run_cmd.add_argument("--sets", type=Path, default=Path("/tmp/quality-sets"))
    run_cmd.add_argument("--config", action="append", help="a configuration name (repeat); default: all")
    run_cmd.add_argument("--cost-top", type=int, default=4, help="TreeSHAP cost and test week of the N best")
    run_cmd.add_argument("--cost", action="append", help="also cost this configuration")
    run_cmd.add_argument("--refit", action="store_true")
    run_cmd.add_argument("--out", type=Path)
    table_cmd = sub.add_parser("table", help="print the table of a result file")
    table_cmd.add_argument("result", type=Path)
    args = parser.parse_args()
    if args.command == "sets":
        build_sets(args.data_dir, args.sets)
    elif args.command == "run":
        run(args)
    else:
        print_table(json.loads(args.result.read_text()))


if __name__ == "__main__":
    main()
