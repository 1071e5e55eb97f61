"""The predictor's micro-batcher: concurrent requests are scored together, each gets exactly its own
rows back, errors reach every request of the batch, and coalescing can be switched off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraud.features.definitions import CUSTOMER_SPENDING_FEATURES, TERMINAL_RISK_FEATURES
from predictor.codec import parse_v1
from predictor.features import FeatureSourceUnavailable, InMemoryFeatureSource
from predictor.model import FraudModel, OnlineStoreUnavailable, PredictorSettings
from tests.factories import make_synthetic_bundle

DAY = pd.Timestamp("2026-03-09")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "fraud-detector", version="3")


def source() -> InMemoryFeatureSource:
    ids = [f"C{i}" for i in range(5)]
    customers = pd.DataFrame(
        {
            "customer_id": ids,
            "snapshot_ts": DAY,
            **{name: np.arange(5, dtype=float) * (j + 1) for j, name in enumerate(CUSTOMER_SPENDING_FEATURES)},
        }
    )
    terminals = pd.DataFrame(
        {
            "terminal_id": [f"T{i}" for i in range(5)],
            "snapshot_ts": DAY,
            **{name: np.linspace(0.0, 0.4, 5) for name in TERMINAL_RISK_FEATURES},
        }
    )
    return InMemoryFeatureSource(customers, terminals)


def request(i: int, rows: int = 1):
    instances = [
        {
            "transaction_id": f"R{i}-{k}",
            "customer_id": f"C{(i + k) % 5}",
            "terminal_id": f"T{(i * 3 + k) % 5}",
            "tx_amount": 10.0 + 7.5 * i + k,
            "tx_datetime": "2026-03-10T02:30:00Z",
        }
        for k in range(rows)
    ]
    return parse_v1({"instances": instances}, 64)


def make_model(bundle_dir: Path, feature_source, micro_batch_rows: int = 1024, fail_closed: bool = False) -> FraudModel:
    model = FraudModel(
        "fraud-detector",
        PredictorSettings(
            bundle=str(bundle_dir), max_batch_size=64, micro_batch_rows=micro_batch_rows, fail_closed=fail_closed
        ),
        feature_source,
    )
    assert model.load()
    return model


def test_concurrent_requests_are_coalesced_and_each_gets_its_own_rows(bundle_dir):
    model = make_model(bundle_dir, source())
    requests = [request(i, rows=1 + i % 3) for i in range(24)]
    expected = [model.score_request(r) for r in requests]  # one at a time, no batcher

    async def concurrently():
        return await asyncio.gather(*(model.predict(r) for r in requests))

    results = asyncio.run(concurrently())
    assert model.batcher.batches < len(requests)  # some requests were scored together
    for req, got, want in zip(requests, results, expected, strict=True):
        assert got.request is req
        assert [tx.transaction_id for tx in got.request.transactions] == [tx.transaction_id for tx in req.transactions]
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-6)
        np.testing.assert_allclose(got.feature_matrix, want.feature_matrix)
        assert got.decisions == want.decisions
        assert [[c.feature for c in codes] for codes in got.reason_codes] == [
            [c.feature for c in codes] for codes in want.reason_codes
        ]
        assert len(got.features_missing) == len(req.transactions) == len(got.features_stale)


def test_a_batch_is_capped_at_micro_batch_rows(bundle_dir):
    model = make_model(bundle_dir, source(), micro_batch_rows=4)
    requests = [request(i, rows=2) for i in range(8)]  # 16 rows, at most 4 per call -> >= 4 batches

    async def concurrently():
        return await asyncio.gather(*(model.predict(r) for r in requests))

    results = asyncio.run(concurrently())
    assert model.batcher.batches >= 4
    assert [len(r.probabilities) for r in results] == [2] * 8


class DownSource:
    name = "down"

    def lookup(self, customer_ids, terminal_ids):
        raise FeatureSourceUnavailable("connection refused")


def test_fail_closed_error_reaches_every_request_of_the_batch(bundle_dir):
    model = make_model(bundle_dir, source(), fail_closed=True)
    model.feature_source = DownSource()

    async def concurrently():
        return await asyncio.gather(*(model.predict(request(i)) for i in range(5)), return_exceptions=True)

    outcomes = asyncio.run(concurrently())
    assert all(isinstance(o, OnlineStoreUnavailable) for o in outcomes)


def test_coalescing_can_be_switched_off(bundle_dir):
    model = make_model(bundle_dir, source(), micro_batch_rows=1)

    async def concurrently():
        return await asyncio.gather(*(model.predict(request(i)) for i in range(6)))

    results = asyncio.run(concurrently())
    assert model.batcher.batches == 0 and len(results) == 6


def test_micro_batch_rows_must_be_positive(bundle_dir):
    with pytest.raises(ValueError, match="micro_batch_rows"):
        PredictorSettings(bundle=str(bundle_dir), micro_batch_rows=0)
