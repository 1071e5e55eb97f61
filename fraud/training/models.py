"""Model families, prequential model selection, decision thresholds and prediction cost.

* XGBoost (the served model): `tree_method="hist"` with `XGBOOST_MAX_BIN` (4,096) histogram bins,
  bounded threads, class imbalance through `scale_pos_weight` (a grid value: 1, or
  sqrt(genuine / fraud) of the training set).
* Baselines: logistic regression on standardised features, random forest.

Selection: every grid point is fitted on each validation fold's training window and scored on
its assessment window (`fraud.training.dataset`); the grid point with the highest mean average
precision wins (ties: the earlier, simpler grid point). The test window is never looked at.

Decision thresholds (chosen on the pooled fold-assessment predictions of the selected grid
point, i.e. on validation data only):

* decline: the lowest score whose "score >= t" alerts reach `decline_precision` (default 0.9)
  on at least `min_decline_alerts` validation alerts — the most frauds declined at that precision;
  1.0 (never auto-decline) when no threshold reaches it;
* review: the score above which, on average, `review_alerts_per_day` transactions per day fall
  (the investigators' daily capacity, default 100), capped at the decline threshold.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import pandas as pd

from fraud.bundle import DecisionThresholds
from fraud.features.definitions import MODEL_FEATURES
from fraud.quality_metrics import average_precision, card_precision_top_k, roc_auc
from fraud.schema import TX_DATETIME, TX_FRAUD
from fraud.settings import Settings, current
from fraud.training.dataset import TrainingSets
from fraud.training.sampling import SAMPLE_WEIGHT

if TYPE_CHECKING:
    from xgboost import XGBClassifier

FAMILIES: tuple[str, ...] = ("logistic_regression", "random_forest", "xgboost")
SERVED_FAMILY = "xgboost"


def training_threads(settings: Settings | None = None) -> int:
    """Threads a model may use: the setting `train_threads` (FRAUD_TRAIN_THREADS), default min(2, CPUs)."""
    configured = (settings or current()).train_threads
    return configured or max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class ModelSpec:
    family: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.family}({inner})"


#: Histogram bins per feature of the XGBoost grid (XGBoost's default is 256). Its `hist` cut points
#: are quantiles, so 256 bins put a cut every 0.4 % of the rows: a rule in the last few per mille
#: of a feature (the Handbook's "amount > 220" is its top 0.2 %) falls inside the top bin and no
#: split can isolate it. 4,096 bins (a cut every 0.025 %) raise every grid point's mean validation
#: AP by 0.018-0.029 on the Handbook protocol and leave the trees, hence prediction and TreeSHAP
#: cost, as they are (docs/model-quality.md, "XGBoost modes judged on the validation weeks").
XGBOOST_MAX_BIN = 4096


def candidate_grid(family: str, small: bool = False) -> list[ModelSpec]:
    """The hyper-parameter grid of a family (`small`: one point each, for smoke runs)."""
    if family == "xgboost":
        grid = [
            {"max_depth": d, "n_estimators": n, "learning_rate": lr, "scale_pos_weight": w, "max_bin": XGBOOST_MAX_BIN}
            for d in (3, 6)
            for n, lr in ((100, 0.1), (300, 0.05))
            for w in ("1", "sqrt")
        ]
    elif family == "random_forest":
        grid = [{"max_depth": d, "n_estimators": 100, "min_samples_leaf": 1} for d in (10, 20)]
    elif family == "logistic_regression":
        grid = [{"C": c} for c in (0.1, 1.0)]
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if small:
        grid = grid[:1]
    return [ModelSpec(family, params) for params in grid]


class Classifier(Protocol):
    """What the model families share (scikit-learn's estimator API; they have no common base type)."""

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray: ...


@dataclass
class FittedModel:
    spec: ModelSpec
    estimator: Classifier
    fit_seconds: float

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        features = frame[list(MODEL_FEATURES)].astype("float64")
        return np.asarray(self.estimator.predict_proba(features)[:, 1], dtype="float64")

    @property
    def booster(self):
        """The xgboost.Booster of an XGBoost model (feature names = MODEL_FEATURES)."""
        if self.spec.family != "xgboost":
            raise TypeError(f"{self.spec.family} has no XGBoost booster")
        booster = cast("XGBClassifier", self.estimator).get_booster()
        booster.feature_names = list(MODEL_FEATURES)
        return booster


def _scale_pos_weight(value: str, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The grid value, or "sqrt": sqrt(genuine / fraud) of the (weighted) training set."""
    if value == "sqrt":
        w = np.ones(len(labels)) if weights is None else weights
        positives = max(1.0, float(w[labels == 1].sum()))
        return float(math.sqrt(max(1.0, float(w[labels == 0].sum())) / positives))
    return float(value)


def fit(spec: ModelSpec, train: pd.DataFrame, seed: int = 0) -> FittedModel:
    """Fit one grid point on a training frame (MODEL_FEATURES + tx_fraud)."""
    features = train[list(MODEL_FEATURES)].astype("float64")
    labels = train[TX_FRAUD].astype(int).to_numpy()
    if labels.min() == labels.max():
        raise ValueError("the training set needs both genuine and fraudulent transactions")
    threads = training_threads()
    if spec.family == "xgboost":
        from xgboost import XGBClassifier

        params = dict(spec.params)
        weights = train[SAMPLE_WEIGHT].to_numpy(dtype="float64") if SAMPLE_WEIGHT in train.columns else None
        params["scale_pos_weight"] = _scale_pos_weight(str(params.get("scale_pos_weight", "1")), labels, weights)
        estimator = XGBClassifier(
            objective="binary:logistic",
            tree_method="hist",
            n_jobs=threads,
            random_state=seed,
            eval_metric="aucpr",
            **params,
        )
    elif spec.family == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        estimator = RandomForestClassifier(random_state=seed, n_jobs=threads, **spec.params)
    elif spec.family == "logistic_regression":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed, **spec.params))
    else:
        raise ValueError(f"unknown model family {spec.family!r}")
    started = time.perf_counter()
    if SAMPLE_WEIGHT in train.columns:  # a downsampled training set, weighted back (fraud.training.sampling)
        weights = train[SAMPLE_WEIGHT].to_numpy(dtype="float64")
        if spec.family == "logistic_regression":
            estimator.fit(features, labels, logisticregression__sample_weight=weights)
        else:
            estimator.fit(features, labels, sample_weight=weights)
    else:
        estimator.fit(features, labels)
    return FittedModel(spec=spec, estimator=estimator, fit_seconds=time.perf_counter() - started)


@dataclass
class CandidateResult:
    spec: ModelSpec
    fold_ap: list[float]
    fold_auc: list[float]
    fold_cp100: list[float]

    @property
    def mean_ap(self) -> float:
        values = [v for v in self.fold_ap if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def as_dict(self) -> dict:
        return {
            "model": self.spec.label,
            "mean_ap": self.mean_ap,
            "mean_auc": float(np.nanmean(self.fold_auc)),
            "mean_cp100": float(np.nanmean(self.fold_cp100)),
            "fold_ap": self.fold_ap,
        }


@dataclass
class Selection:
    """Outcome of prequential selection for one family."""

    family: str
    best: ModelSpec
    candidates: list[CandidateResult]
    #: the selected grid point's predictions on every fold's assessment rows (validation only)
    validation_predictions: pd.DataFrame

    @property
    def best_result(self) -> CandidateResult:
        return next(c for c in self.candidates if c.spec == self.best)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([c.as_dict() for c in self.candidates]).sort_values("mean_ap", ascending=False)


def prequential_select(
    sets: TrainingSets, family: str, grid: Sequence[ModelSpec] | None = None, seed: int = 0
) -> Selection:
    """Pick the grid point of `family` with the best mean validation AP over the folds."""
    grid = list(grid or candidate_grid(family))
    if not sets.folds:
        raise ValueError("prequential selection needs at least one validation fold")
    results: list[CandidateResult] = []
    predictions: dict[int, list[pd.DataFrame]] = {}
    for index, spec in enumerate(grid):
        result = CandidateResult(spec, [], [], [])
        predictions[index] = []
        for fold_index, (fold_train, fold_valid) in enumerate(sets.folds):
            model = fit(spec, fold_train, seed=seed)
            scores = model.predict(fold_valid)
            labels = fold_valid[TX_FRAUD].to_numpy()
            result.fold_ap.append(average_precision(labels, scores))
            result.fold_auc.append(roc_auc(labels, scores))
            scored = fold_valid.assign(score=scores, fold=fold_index)
            result.fold_cp100.append(card_precision_top_k(scored, 100).mean)
            predictions[index].append(scored)
        results.append(result)
    best_index = max(
        range(len(results)), key=lambda i: (-math.inf if math.isnan(results[i].mean_ap) else results[i].mean_ap, -i)
    )
    return Selection(
        family=family,
        best=results[best_index].spec,
        candidates=results,
        validation_predictions=pd.concat(predictions[best_index], ignore_index=True),
    )


@dataclass(frozen=True)
class ThresholdChoice:
    thresholds: DecisionThresholds
    decline_precision_target: float
    decline_precision: float
    decline_recall: float
    review_alerts_per_day: int
    review_recall: float
    rule: str

    def as_dict(self) -> dict:
        out = asdict(self)
        out["thresholds"] = asdict(self.thresholds)
        return out


def choose_thresholds(
    labels: np.ndarray,
    scores: np.ndarray,
    n_days: int,
    *,
    decline_precision: float = 0.9,
    review_alerts_per_day: int = 100,
    min_decline_alerts: int = 5,
) -> ThresholdChoice:
    """Review/decline thresholds from validation predictions (rule in the module docstring)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype="float64")
    if labels.size == 0 or labels.size != scores.size:
        raise ValueError("thresholds need as many labels as scores, and at least one")
    if not 0 < decline_precision <= 1:
        raise ValueError(f"decline_precision must be in (0, 1], got {decline_precision}")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # candidate cut points: the last index of each run of equal scores ("score >= t" alerts)
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    alerts = np.arange(1, labels.size + 1)[last_of_run]
    hits = np.cumsum(sorted_labels)[last_of_run]
    cuts = sorted_scores[last_of_run]
    precision = hits / alerts
    total_frauds = max(1, int(labels.sum()))
    eligible = np.flatnonzero((precision >= decline_precision) & (alerts >= min_decline_alerts))
    if eligible.size:
        i = eligible[-1]  # the lowest score that still reaches the precision target
        decline = float(cuts[i])
        decline_prec, decline_rec = float(precision[i]), float(hits[i] / total_frauds)
    else:
        decline, decline_prec, decline_rec = 1.0, float("nan"), 0.0
    budget = max(1, int(review_alerts_per_day) * max(1, int(n_days)))
    review = float(sorted_scores[min(budget, labels.size) - 1])
    review = min(review, decline)
    review_recall = float(labels[scores >= review].sum() / total_frauds)
    rule = (
        f"decline: lowest validation score with precision >= {decline_precision:.2f} "
        f"over >= {min_decline_alerts} alerts "
        f"(1.0 if none); review: top {review_alerts_per_day} validation transactions per day, capped at decline"
    )
    return ThresholdChoice(
        thresholds=DecisionThresholds(
            review=float(np.clip(review, 0.0, 1.0)), decline=float(np.clip(decline, 0.0, 1.0))
        ),
        decline_precision_target=decline_precision,
        decline_precision=decline_prec,
        decline_recall=decline_rec,
        review_alerts_per_day=int(review_alerts_per_day),
        review_recall=review_recall,
        rule=rule,
    )


def validation_days(frame: pd.DataFrame) -> int:
    """Distinct (fold, day) pairs in pooled validation predictions: the alert budget's days."""
    days = pd.to_datetime(frame[TX_DATETIME]).dt.floor("D")
    if "fold" in frame.columns:
        return int(pd.DataFrame({"fold": frame["fold"], "day": days}).drop_duplicates().shape[0])
    return int(days.nunique())


def prediction_cost_us(booster, row: np.ndarray, repeats: int = 300) -> float:
    """Median wall time (µs) of one single-row `inplace_predict` on one thread."""
    row = np.ascontiguousarray(np.asarray(row, dtype="float32").reshape(1, -1))
    booster.set_param({"nthread": 1})
    for _ in range(20):  # warm-up
        booster.inplace_predict(row)
    timings = np.empty(repeats)
    for i in range(repeats):
        started = time.perf_counter_ns()
        booster.inplace_predict(row)
        timings[i] = (time.perf_counter_ns() - started) / 1000.0
    return float(np.median(timings))
