"""Evaluation on the test window, comparison with the champion, and the promotion gate."""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fraud.bundle import DecisionThresholds
from fraud.features.definitions import MODEL_FEATURES
from fraud.quality_metrics import confusion_at_threshold, quality_report
from fraud.schema import TX_FRAUD

#: Points kept of the ROC curve for the KFP ClassificationMetrics artifact.
ROC_POINTS = 200


def score_booster(booster, frame: pd.DataFrame) -> np.ndarray:
    features = frame[list(MODEL_FEATURES)].astype("float64").to_numpy()
    return np.asarray(booster.inplace_predict(features), dtype="float64")


@dataclass
class RocCurve:
    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]


def roc_curve_points(labels: np.ndarray, scores: np.ndarray, max_points: int = ROC_POINTS) -> RocCurve:
    """The ROC curve thinned to at most `max_points` points (first and last kept); thresholds are
    clipped to [0, 1] (scikit-learn's first threshold is +inf)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores)
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return RocCurve(
        [float(x) for x in fpr], [float(x) for x in tpr], [float(min(1.0, max(0.0, t))) for t in thresholds]
    )


@dataclass
class Evaluation:
    """The challenger on the test window, and the champion on the same rows if there is one."""

    metrics: dict[str, float]
    confusion_decline: list[list[int]]
    confusion_review: list[list[int]]
    decisions: dict[str, int]
    roc: RocCurve
    champion_version: str | None = None
    champion_metrics: dict[str, float] = field(default_factory=dict)
    window: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Evaluation:
        data = dict(data)
        data["roc"] = RocCurve(**data["roc"])
        return cls(**data)


def evaluate(booster, thresholds: DecisionThresholds, test: pd.DataFrame, window: dict | None = None) -> Evaluation:
    scores = score_booster(booster, test)
    scored = test.assign(score=scores)
    labels = test[TX_FRAUD].astype(int).to_numpy()
    report = quality_report(scored)
    decisions = pd.Series([thresholds.decide(float(p)) for p in scores]).value_counts()
    return Evaluation(
        metrics={f"test_{k}": v for k, v in report.as_dict().items()},
        confusion_decline=confusion_at_threshold(labels, scores, thresholds.decline).as_matrix(),
        confusion_review=confusion_at_threshold(labels, scores, thresholds.review).as_matrix(),
        decisions={name: int(decisions.get(name, 0)) for name in ("approve", "review", "decline")},
        roc=roc_curve_points(labels, scores),
        window=window or {},
    )


def score_champion(test: pd.DataFrame, tracking_uri: str | None = None) -> tuple[str | None, dict[str, float]]:
    """(champion version, its metrics on `test`) or (None, {}) when no champion is registered."""
    import xgboost as xgb

    from fraud import registry
    from fraud.bundle import MODEL_FILE, read_manifest
    from fraud.config import MODEL_NAME

    version = registry.get_version_by_alias(registry.CHAMPION_ALIAS, uri=tracking_uri)
    if version is None:
        return None, {}
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        bundle = registry.download_bundle(f"models:/{MODEL_NAME}/{version}", Path(tmp) / "bundle", uri=tracking_uri)
        manifest = read_manifest(bundle)
        booster = xgb.Booster()
        booster.load_model(str(bundle / MODEL_FILE))
    if list(manifest.feature_names) != list(MODEL_FEATURES):
        # a champion trained on another feature vector cannot score these rows: report it, don't guess
        return version, {"test_average_precision": float("nan"), "feature_mismatch": 1.0}
    scored = test.assign(score=score_booster(booster, test))
    report = quality_report(scored)
    return version, {f"test_{k}": v for k, v in report.as_dict().items()}


# --- the gate -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateConfig:
    """A challenger is promoted to deployment only if all three hold."""

    #: test average precision must reach this
    min_average_precision: float = 0.5
    #: test AP may be at most this much below the champion's on the same rows
    max_drop_vs_champion: float = 0.02
    #: median single-row prediction cost (µs) must not exceed this
    max_prediction_cost_us: float = 2000.0


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]
    challenger_ap: float
    champion_ap: float | None
    prediction_cost_us: float

    @property
    def summary(self) -> str:
        verdict = "passed" if self.passed else "failed"
        return f"{verdict}: " + "; ".join(self.reasons)


def gate(
    config: GateConfig, challenger_ap: float, champion_ap: float | None, prediction_cost_us: float
) -> GateDecision:
    """Apply the gate; every check contributes a human-readable reason, failing ones first."""
    failures: list[str] = []
    passes: list[str] = []
    if math.isnan(challenger_ap) or challenger_ap < config.min_average_precision:
        failures.append(f"test AP {challenger_ap:.4f} below the floor {config.min_average_precision:.4f}")
    else:
        passes.append(f"test AP {challenger_ap:.4f} >= floor {config.min_average_precision:.4f}")
    if champion_ap is None or math.isnan(champion_ap):
        passes.append("no comparable champion")
    elif challenger_ap < champion_ap - config.max_drop_vs_champion:
        failures.append(
            f"test AP {challenger_ap:.4f} is more than {config.max_drop_vs_champion:.4f} "
            f"below the champion's {champion_ap:.4f}"
        )
    else:
        passes.append(f"within {config.max_drop_vs_champion:.4f} of the champion's AP {champion_ap:.4f}")
    if prediction_cost_us > config.max_prediction_cost_us:
        failures.append(
            f"prediction cost {prediction_cost_us:.1f} µs exceeds the budget {config.max_prediction_cost_us:.1f} µs"
        )
    else:
        passes.append(f"prediction cost {prediction_cost_us:.1f} µs within {config.max_prediction_cost_us:.1f} µs")
    return GateDecision(
        passed=not failures,
        reasons=failures + passes,
        challenger_ap=float(challenger_ap),
        champion_ap=None if champion_ap is None else float(champion_ap),
        prediction_cost_us=float(prediction_cost_us),
    )


def markdown_report(evaluation: Evaluation, trained_summary: dict, decision: GateDecision | None = None) -> str:
    """A short human-readable evaluation report (KFP Markdown artifact and MLflow artifact)."""
    m = evaluation.metrics
    lines = [
        "# Fraud model evaluation",
        "",
        f"Test window: {evaluation.window.get('test', {})}; training window: {evaluation.window.get('train', {})}.",
        "",
        "| metric | challenger | champion |",
        "|---|---|---|",
    ]
    for key, label in (
        ("test_average_precision", "average precision"),
        ("test_roc_auc", "ROC AUC"),
        ("test_card_precision_at_k", "card precision@100"),
        ("test_recall_at_budget", "recall at alert budget"),
    ):
        champion = evaluation.champion_metrics.get(key)
        champion_text = "—" if champion is None else f"{champion:.4f}"
        lines.append(f"| {label} | {m.get(key, float('nan')):.4f} | {champion_text} |")
    lines += [
        "",
        f"Champion: {evaluation.champion_version or 'none registered'}.",
        f"Test rows: {int(m.get('test_n_transactions', 0))}, frauds: {int(m.get('test_n_frauds', 0))}.",
        f"Decisions on the test window: {evaluation.decisions}.",
        "Confusion matrix at the decline threshold (rows actual genuine/fraud, columns predicted): "
        f"{evaluation.confusion_decline}.",
        "",
        (
            f"Model: {trained_summary.get('spec')}; thresholds: {trained_summary.get('thresholds')}; "
            f"prediction cost {trained_summary.get('prediction_cost_us', float('nan')):.1f} µs per transaction."
        ),
    ]
    if decision is not None:
        lines += ["", f"**Gate {decision.summary}**"]
    return "\n".join(lines) + "\n"
