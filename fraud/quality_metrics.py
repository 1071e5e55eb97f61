"""Quality metrics: the one definition used by training, evaluation, benchmarks and monitoring.

* ROC AUC and average precision: scikit-learn.
* Card Precision@k (the Fraud Detection Handbook, section 4.2, `card_precision_top_k`): for each
  day, every card is scored by its highest-risk transaction (and counts as compromised if any of
  its transactions that day is a fraud); the k highest-scored cards are the day's alerts and the
  daily CP@k is the share of them that are truly compromised (divided by k, even when fewer than k
  cards transacted). Cards *detected* as compromised (alerted and fraudulent) on an earlier day of
  the assessed period are removed from later days, as investigators block them. The result is
  the mean over days.
* Recall at a fixed alert budget, and the confusion matrix at a threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fraud.schema import CUSTOMER_ID, TX_DATETIME, TX_FRAUD

#: The Handbook's default number of daily alerts for CP@k.
DEFAULT_TOP_K = 100
SCORE = "score"


def _as_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true).astype(int).ravel()
    scores = np.asarray(y_score, dtype="float64").ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} != {scores.size}")
    if labels.size == 0:
        raise ValueError("cannot compute a metric on an empty set")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return labels, scores


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels, scores = _as_arrays(y_true, y_score)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def average_precision(y_true, y_score) -> float:
    """Average precision (area under the precision-recall curve, step-wise); NaN without frauds."""
    from sklearn.metrics import average_precision_score

    labels, scores = _as_arrays(y_true, y_score)
    if labels.max() == 0:
        return float("nan")
    return float(average_precision_score(labels, scores))


@dataclass(frozen=True)
class CardPrecisionTopK:
    """CP@k of a period: the mean, and the daily values and counts it comes from."""

    k: int
    mean: float
    days: list[str]
    per_day: list[float]
    compromised_cards_per_day: list[int]
    detected_cards: list[str]


def card_precision_top_k(
    frame: pd.DataFrame,
    k: int = DEFAULT_TOP_K,
    *,
    score_column: str = SCORE,
    label_column: str = TX_FRAUD,
    card_column: str = CUSTOMER_ID,
    time_column: str = TX_DATETIME,
    remove_detected_cards: bool = True,
) -> CardPrecisionTopK:
    """Card Precision@k as the Handbook computes it (see the module docstring).

    `frame` holds one row per transaction with a card id, a timestamp (days are UTC calendar days),
    the 0/1 label and the model score.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    missing = [c for c in (score_column, label_column, card_column, time_column) if c not in frame.columns]
    if missing:
        raise ValueError(f"missing columns for card precision: {missing}")
    if frame.empty:
        raise ValueError("cannot compute card precision on an empty set")
    data = pd.DataFrame(
        {
            "day": pd.to_datetime(frame[time_column]).dt.floor("D").to_numpy(),
            "card": frame[card_column].to_numpy(),
            "label": frame[label_column].astype(int).to_numpy(),
            "score": frame[score_column].astype("float64").to_numpy(),
        }
    )
    detected: list[str] = []
    detected_set: set = set()
    days: list[str] = []
    per_day: list[float] = []
    compromised: list[int] = []
    for day, day_frame in data.groupby("day", sort=True):
        day_frame = day_frame[~day_frame["card"].isin(detected_set)]
        per_card = day_frame.groupby("card", sort=True).agg(score=("score", "max"), label=("label", "max"))
        compromised.append(int(per_card["label"].sum()))
        # stable order: highest score first, ties broken by card id (sorted by the groupby)
        top = per_card.sort_values("score", ascending=False, kind="mergesort").head(k)
        hits = [card for card, label in zip(top.index, top["label"], strict=True) if label == 1]
        per_day.append(len(hits) / k)
        days.append(pd.Timestamp(day).date().isoformat())
        if remove_detected_cards:
            detected.extend(hits)
            detected_set.update(hits)
    return CardPrecisionTopK(
        k=k,
        mean=float(np.mean(per_day)),
        days=days,
        per_day=per_day,
        compromised_cards_per_day=compromised,
        detected_cards=[str(c) for c in detected],
    )


def recall_at_alert_budget(y_true, y_score, budget: int) -> float:
    """Share of all frauds found among the `budget` highest-scored transactions (NaN without frauds)."""
    labels, scores = _as_arrays(y_true, y_score)
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    total = labels.sum()
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")[:budget]
    return float(labels[order].sum() / total)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts at a threshold: predicted fraud means score >= threshold."""

    threshold: float
    true_negatives: int
    false_positives: int
    false_negatives: int
    true_positives: int

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else float("nan")

    @property
    def recall(self) -> float:
        frauds = self.true_positives + self.false_negatives
        return self.true_positives / frauds if frauds else float("nan")

    def as_matrix(self) -> list[list[int]]:
        """Rows = actual (genuine, fraud), columns = predicted (genuine, fraud)."""
        return [[self.true_negatives, self.false_positives], [self.false_negatives, self.true_positives]]


def confusion_at_threshold(y_true, y_score, threshold: float) -> ConfusionMatrix:
    labels, scores = _as_arrays(y_true, y_score)
    predicted = scores >= threshold
    actual = labels == 1
    return ConfusionMatrix(
        threshold=float(threshold),
        true_negatives=int((~predicted & ~actual).sum()),
        false_positives=int((predicted & ~actual).sum()),
        false_negatives=int((~predicted & actual).sum()),
        true_positives=int((predicted & actual).sum()),
    )


@dataclass(frozen=True)
class QualityReport:
    """The headline metrics of one scored period."""

    roc_auc: float
    average_precision: float
    card_precision_at_k: float
    k: int
    recall_at_budget: float
    alert_budget: int
    n_transactions: int
    n_frauds: int

    def as_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def quality_report(
    frame: pd.DataFrame,
    *,
    k: int = DEFAULT_TOP_K,
    alert_budget: int | None = None,
    score_column: str = SCORE,
    label_column: str = TX_FRAUD,
    card_column: str = CUSTOMER_ID,
    time_column: str = TX_DATETIME,
) -> QualityReport:
    """AUC, AP, CP@k and recall at an alert budget (default: k alerts per day of the period)."""
    labels = frame[label_column].to_numpy()
    scores = frame[score_column].to_numpy()
    n_days = max(1, pd.to_datetime(frame[time_column]).dt.floor("D").nunique())
    budget = alert_budget if alert_budget is not None else k * n_days
    return QualityReport(
        roc_auc=roc_auc(labels, scores),
        average_precision=average_precision(labels, scores),
        card_precision_at_k=card_precision_top_k(
            frame,
            k,
            score_column=score_column,
            label_column=label_column,
            card_column=card_column,
            time_column=time_column,
        ).mean,
        k=k,
        recall_at_budget=recall_at_alert_budget(labels, scores, budget),
        alert_budget=int(budget),
        n_transactions=len(frame),
        n_frauds=int(np.asarray(labels).astype(int).sum()),
    )
