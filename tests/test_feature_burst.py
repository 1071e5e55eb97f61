"""A card-testing burst through `fraud serve`: ten transactions of one card, each scored after the
previous one was published by the predictor and applied by the stack's aggregator. Every
response's velocity features must count exactly the earlier transactions of the burst."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import numpy as np
import pytest
import redis

from fraud.config import MODEL_NAME
from fraud.feature_store import get_feature_store
from fraud.serving_stack import ServingStack, StackConfig
from fraud.streaming.events import CARD, TERMINAL
from fraud.streaming.state import WindowStateStore
from tests.factories import make_synthetic_bundle
from tests.test_serving_stack import (  # noqa: F401 - module fixtures of the serving-stack suite
    CUSTOMERS,
    SCORING_DAY,
    STARTUP_TIMEOUT_S,
    TERMINALS,
    Stack,
    bundle,
    data_root,
)

pytestmark = pytest.mark.slow


def wait_applied(states: WindowStateStore, card: str, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(states.read(CARD, [card])[card].transaction_ids) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the aggregator did not apply transaction {count} of the burst within {timeout}s")


def test_burst_of_one_card_counts_every_earlier_transaction(data_root, bundle, tmp_path):  # noqa: F811
    stack = Stack(data_root, bundle, tmp_path, velocity=True)
    tokens = tmp_path / "tokens"  # feature vectors are answered only to a caller with the debug scope
    tokens.write_text("burst-test-token score,debug\n")
    tokens.chmod(0o600)
    started = stack.fraud(
        "serve",
        "--detach",
        "--pid-file",
        str(stack.pid_file),
        *stack.serve_args(),
        "--token-file",
        str(tokens),
        timeout=STARTUP_TIMEOUT_S + 60,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    states = WindowStateStore(get_feature_store("sqlite"))
    card = CUSTOMERS[3]
    start = SCORING_DAY + timedelta(hours=10)
    amounts = [1.0 + i for i in range(9)] + [480.0]  # small purchases, then a large one
    try:
        for i, amount in enumerate(amounts):
            when = start + timedelta(seconds=45 * i)
            transaction = {
                "transaction_id": f"BURST{i:02d}",
                "customer_id": card,
                "terminal_id": TERMINALS[i % 3],
                "tx_amount": amount,
                "tx_datetime": when.isoformat(),
            }
            response = httpx.post(
                f"{stack.url}/v1/models/{MODEL_NAME}:predict",
                json={"instances": [transaction]},
                headers={"Authorization": "Bearer burst-test-token"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            features = response.json()["predictions"][0]["features"]
            assert features["customer_nb_tx_10m"] == i, (i, features)
            assert features["customer_nb_tx_1h"] == i and features["customer_nb_tx_24h"] == i
            assert features["customer_sum_amount_10m"] == pytest.approx(sum(amounts[:i]), abs=1e-9)
            assert features["customer_nb_terminals_1h"] == min(i, 3)
            assert features["customer_seconds_since_last_tx"] == (45.0 if i else 86_400.0)
            assert features["terminal_nb_tx_10m"] == len(range(i % 3, i, 3))  # earlier ones at this terminal
            wait_applied(states, card, i + 1)
        stored = states.read(CARD, [card])[card]
        assert stored.transaction_ids == [f"BURST{i:02d}" for i in range(10)]
        assert np.allclose(stored.amounts, amounts)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the terminal events are on other partitions
            applied = sum(len(states.read(TERMINAL, [t])[t].transaction_ids) for t in TERMINALS[:3])
            if applied == 10:
                break
            time.sleep(0.05)
        assert applied == 10
    finally:
        stopped = stack.fraud("serve", "stop", "--pid-file", str(stack.pid_file))
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        prefix = ServingStack(StackConfig(bundle=bundle)).stream_env()["FRAUD_STREAM_PREFIX"]
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_fraud_score_card_testing_burst_shows_velocity_reason_codes(data_root, tmp_path):  # noqa: F811
    """The demo's scoring step (`fraud score --card-testing`, scripts/demo.sh) through `fraud serve`
    with velocity: the burst's transactions after the first ones are explained by the card's recent
    transactions, the sampled ones (no burst before them) are not."""
    velocity_bundle = make_synthetic_bundle(tmp_path / "bundle" / "fraud-detector", version="9", velocity=True)
    stack = Stack(data_root, velocity_bundle, tmp_path, velocity=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("demo-scoring-token-0123 score\n")
    tokens.chmod(0o600)
    started = stack.fraud(
        "serve", "--detach", "--pid-file", str(stack.pid_file), *stack.serve_args(), "--token-file", str(tokens),
        timeout=STARTUP_TIMEOUT_S + 60,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        scored = stack.fraud(
            "score", "--url", stack.url, "--token", "demo-scoring-token-0123", "--sample", "3", "--seed", "2",
            "--card-testing", "6", "--burst-gap", "1.0",
            timeout=300,
        )  # fmt: skip
    finally:
        stopped = stack.fraud("serve", "stop", "--pid-file", str(stack.pid_file))
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        prefix = ServingStack(StackConfig(bundle=velocity_bundle)).stream_env()["FRAUD_STREAM_PREFIX"]
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    lines = [line for line in scored.stdout.splitlines() if "│" in line and ("CT" in line or "TX" in line)]
    burst = [line for line in lines if "CT" in line.split("│")[1]]
    sampled = [line for line in lines if line not in burst]
    assert len(burst) == 7 and len(sampled) == 3, scored.stdout
    assert not any("customer_nb_tx_10m" in line for line in sampled), scored.stdout
    # from the third burst transaction on, two or more earlier ones fall in the card's 10 minutes
    assert all("customer_nb_tx_10m" in line for line in burst[2:]), scored.stdout
