"""Quality metrics against hand-computed values."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fraud import quality_metrics


def _frame(rows):
    return pd.DataFrame(rows, columns=["customer_id", "tx_datetime", "tx_fraud", "score"]).assign(
        tx_datetime=lambda f: pd.to_datetime(f["tx_datetime"])
    )


def test_auc_and_average_precision_by_hand():
    # scores sorted: 0.9(1) 0.8(0) 0.7(1) 0.1(0)
    # AUC: positive pairs (0.9>0.8, 0.9>0.1, 0.7<0.8, 0.7>0.1) -> 3/4
    # AP: precision at each positive: 1/1, 2/3 -> (1 + 2/3)/2
    y, s = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]
    assert quality_metrics.roc_auc(y, s) == pytest.approx(0.75)
    assert quality_metrics.average_precision(y, s) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(quality_metrics.roc_auc([0, 0], [0.1, 0.2]))
    assert math.isnan(quality_metrics.average_precision([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="length"):
        quality_metrics.roc_auc([1, 0], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        quality_metrics.average_precision([2, 0], [0.5, 0.1])


def test_card_precision_top_k_by_hand():
    frame = _frame(
        [
            # day 1: card A max 0.9 (fraud), B 0.8 (genuine), C 0.3 (fraud on its 2nd tx)
            ("A", "2018-08-08 10:00", 1, 0.9),
            ("A", "2018-08-08 11:00", 0, 0.2),
            ("B", "2018-08-08 12:00", 0, 0.8),
            ("C", "2018-08-08 13:00", 0, 0.3),
            ("C", "2018-08-08 14:00", 1, 0.1),
            # day 2: A again (detected on day 1 -> removed), D 0.7 fraud, E 0.6 genuine, C 0.5 fraud
            ("A", "2018-08-09 09:00", 1, 0.99),
            ("D", "2018-08-09 10:00", 1, 0.7),
            ("E", "2018-08-09 11:00", 0, 0.6),
            ("C", "2018-08-09 12:00", 1, 0.5),
        ]
    )
    result = quality_metrics.card_precision_top_k(frame, k=2)
    # day 1 top-2 cards: A (fraud), B (genuine) -> 1/2; detected: A
    # day 2 without A: D 0.7 (fraud), E 0.6 (genuine) -> 1/2
    assert result.per_day == [0.5, 0.5]
    assert result.mean == pytest.approx(0.5)
    assert result.days == ["2018-08-08", "2018-08-09"]
    assert result.compromised_cards_per_day == [2, 2]  # day 1: A, C; day 2 (A removed): D, C
    assert result.detected_cards == ["A", "D"]

    # without removal, A (0.99, fraud) and D top day 2 -> 2/2
    kept = quality_metrics.card_precision_top_k(frame, k=2, remove_detected_cards=False)
    assert kept.per_day == [0.5, 1.0]
    # k larger than the number of cards still divides by k: day 1 has 3 cards, 2 compromised -> 2/4
    assert quality_metrics.card_precision_top_k(frame, k=4).per_day[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        quality_metrics.card_precision_top_k(frame, k=0)
    with pytest.raises(ValueError, match="missing columns"):
        quality_metrics.card_precision_top_k(frame.drop(columns=["score"]), k=1)


def test_recall_at_budget_and_confusion_matrix():
    y = [1, 0, 1, 0, 1]
    s = [0.9, 0.8, 0.7, 0.2, 0.1]
    assert quality_metrics.recall_at_alert_budget(y, s, 1) == pytest.approx(1 / 3)
    assert quality_metrics.recall_at_alert_budget(y, s, 3) == pytest.approx(2 / 3)
    assert quality_metrics.recall_at_alert_budget(y, s, 10) == pytest.approx(1.0)
    cm = quality_metrics.confusion_at_threshold(y, s, 0.7)
    assert (cm.true_positives, cm.false_positives, cm.false_negatives, cm.true_negatives) == (2, 1, 1, 1)
    assert cm.precision == pytest.approx(2 / 3)
    assert cm.recall == pytest.approx(2 / 3)
    assert cm.as_matrix() == [[1, 1], [1, 2]]


def test_quality_report_combines_the_metrics():
    frame = _frame(
        [
            ("A", "2018-08-08 10:00", 1, 0.9),
            ("B", "2018-08-08 11:00", 0, 0.4),
            ("C", "2018-08-09 10:00", 0, 0.6),
            ("D", "2018-08-09 11:00", 1, 0.5),
        ]
    )
    report = quality_metrics.quality_report(frame, k=1)
    assert report.roc_auc == pytest.approx(0.75)
    # ranking 0.9(1) 0.6(0) 0.5(1) 0.4(0): AP = (1 + 2/3)/2
    assert report.average_precision == pytest.approx((1 + 2 / 3) / 2)
    assert report.card_precision_at_k == pytest.approx(0.5)  # day 1: A hit; day 2: C miss
    assert report.alert_budget == 2 and report.recall_at_budget == pytest.approx(0.5)
    assert report.as_dict()["n_frauds"] == 2.0
