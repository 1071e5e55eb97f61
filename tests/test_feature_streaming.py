"""The velocity stream: window rules, event decoding, and the aggregator on the real Redis with a
real Feast store (SQLite online store): bad events, dead letters, idempotent replays, recovery of
pending entries after a crash, and the skew test (a simulated day replayed through the stream,
every online value equal to the offline one to 1e-9)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import redis
from prometheus_client import CollectorRegistry
from test_features_offline import random_transactions, write_raw_transactions

from fraud.config import DataLayout
from fraud.feature_store import apply_repo, get_feature_store, teardown
from fraud.features.definitions import NS_PER_SECOND, VELOCITY_FEATURES
from fraud.features.offline import build_offline_features
from fraud.features.velocity_offline import velocity_frame
from fraud.simulator import SimulationConfig, simulate
from fraud.streaming.aggregator import Aggregator, AggregatorSettings
from fraud.streaming.events import CARD, TERMINAL, BadEvent, StreamSettings, TransactionPublisher, decode, encode
from fraud.streaming.state import WindowStateStore, read_velocity
from fraud.streaming.windows import APPLIED, DUPLICATE, HORIZON_NS, LATE, OUT_OF_ORDER, RecentEvents

REDIS_URL = "redis://127.0.0.1:6379/0"
T = 1_700_000_000 * NS_PER_SECOND


# --- window rules ---------------------------------------------------------------------------------


def test_window_apply_rules() -> None:
    state = RecentEvents()
    assert state.apply("a", T, 1.0, "T1") == APPLIED
    assert state.apply("b", T + 10, 2.0, "T2") == APPLIED
    assert state.apply("a", T, 1.0, "T1") == DUPLICATE  # replay: nothing changes
    assert state.apply("c", T + 5, 3.0, "T3") == OUT_OF_ORDER  # sorted in at its place
    assert state.ts_ns == [T, T + 5, T + 10] and state.amounts == [1.0, 3.0, 2.0]
    assert state.terminals == ["T1", "T3", "T2"] and state.transaction_ids == ["a", "c", "b"]
    assert state.apply("old", T + 10 - HORIZON_NS, 9.0, "T9") == LATE
    assert state.transaction_ids == ["a", "c", "b"]
    assert state.apply("d", T + HORIZON_NS + 5, 4.0, "T4") == APPLIED  # evicts a and c (<= newest - horizon)
    assert state.transaction_ids == ["b", "d"] and state.amounts == [2.0, 4.0]


def test_decode_names_the_bad_field() -> None:
    good = encode("TX1", "C1", "T1", 12.5, T, CARD, T)
    assert decode(good).amount == 12.5 and decode({k.encode(): v.encode() for k, v in good.items()}).ts_ns == T
    cases = [
        ({k: v for k, v in good.items() if k != "customer_id"}, "missing_field", "customer_id"),
        (good | {"customer_id": " "}, "unknown_entity", "customer_id"),
        (good | {"tx_amount": "abc"}, "invalid_field", "unparsable"),
        (good | {"tx_amount": "-1"}, "invalid_field", "tx_amount"),
        (good | {"ts_ns": "0"}, "invalid_field", "ts_ns"),
        (good | {"kind": "merchant"}, "invalid_field", "kind"),
    ]
    for fields, reason, text in cases:
        with pytest.raises(BadEvent, match=text) as info:
            decode(fields)
        assert info.value.reason == reason


# --- the aggregator on Redis + Feast ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail("the Redis server on 127.0.0.1:6379 is not reachable (run `make services`)")
    return client


@pytest.fixture(scope="module")
def feast_store(tmp_path_factory) -> Iterator[WindowStateStore]:
    """An applied SQLite Feast store (own project) over a small random dataset."""
    path = tmp_path_factory.mktemp("velocity-stream") / "data"
    path.mkdir()
    project = f"fraud_stream_{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FRAUD_DATA_DIR", str(path))
        for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
            patch.delenv(name, raising=False)
        layout = DataLayout.current()
        write_raw_transactions(layout, random_transactions(seed=5, n_customers=5, n_terminals=5, n_days=3))
        build_offline_features(layout)
        apply_repo("sqlite", project=project)
        try:
            yield WindowStateStore(get_feature_store("sqlite", project=project))
        finally:
            teardown("sqlite", project=project)


@pytest.fixture(scope="module")
def redis_feast_store(tmp_path_factory, redis_client: redis.Redis) -> Iterator[WindowStateStore]:
    """An applied Feast store on the Redis online store (own project) over a small random dataset."""
    path = tmp_path_factory.mktemp("velocity-stream-redis") / "data"
    path.mkdir()
    project = f"fraud_stream_r_{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FRAUD_DATA_DIR", str(path))
        for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
            patch.delenv(name, raising=False)
        layout = DataLayout.current()
        write_raw_transactions(layout, random_transactions(seed=5, n_customers=5, n_terminals=5, n_days=3))
        build_offline_features(layout)
        apply_repo("redis", project=project)
        try:
            yield WindowStateStore(get_feature_store("redis", project=project))
        finally:
            teardown("redis", project=project)


@pytest.fixture
def stream(redis_client: redis.Redis) -> Iterator[StreamSettings]:
    settings = StreamSettings(redis_url=REDIS_URL, prefix=f"test:velocity:{uuid.uuid4().hex[:12]}", partitions=3)
    yield settings
    keys = list(redis_client.scan_iter(match=f"{settings.prefix}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


def make_aggregator(
    stream: StreamSettings, store: WindowStateStore, consumer: str = "agg-a", lease_ms: int = 10_000
) -> Aggregator:
    settings = AggregatorSettings(consumer=consumer, metrics_port=None, lease_ms=lease_ms, tick_s=0.05, block_ms=5)
    return Aggregator(stream, store, settings, registry=CollectorRegistry())


def drain(aggregator: Aggregator, max_steps: int = 500) -> None:
    """Step until every partition is held and its group has nothing undelivered or pending."""
    for _ in range(max_steps):
        handled = aggregator.step()
        if handled == 0 and len(aggregator.owned) == aggregator.stream.partitions and not aggregator._recover:
            aggregator.update_lag()
            lag = [aggregator.metrics.lag.labels(str(p))._value.get() for p in range(aggregator.stream.partitions)]
            if not any(lag):
                return
    raise AssertionError("the aggregator did not drain the stream")


def counter(aggregator: Aggregator, kind: str, outcome: str) -> float:
    return aggregator.metrics.events.labels(kind, outcome)._value.get()


def test_bad_duplicate_late_and_out_of_order_events(
    stream: StreamSettings, feast_store: WindowStateStore, redis_client: redis.Redis
) -> None:
    publisher = TransactionPublisher(stream, redis_client)
    card, terminal = f"C-{uuid.uuid4().hex[:8]}", f"T-{uuid.uuid4().hex[:8]}"
    publisher.publish([("TX1", card, terminal, 10.0, T), ("TX2", card, terminal, 20.0, T + 60 * NS_PER_SECOND)])
    publisher.publish([("TX1", card, terminal, 10.0, T)])  # replay
    publisher.publish([("TX0", card, terminal, 5.0, T + 30 * NS_PER_SECOND)])  # out of order, within the horizon
    publisher.publish([("TXL", card, terminal, 7.0, T - HORIZON_NS)])  # late: older than newest - horizon
    partition = stream.stream(stream.partition_of(card))
    redis_client.xadd(partition, {"kind": "card", "transaction_id": "TXB"})  # missing fields
    redis_client.xadd(partition, encode("TXU", "", terminal, 1.0, T, CARD, T))  # no card id
    aggregator = make_aggregator(stream, feast_store)
    drain(aggregator)

    state = feast_store.read(CARD, [card])[card]
    assert state.transaction_ids == ["TX1", "TX0", "TX2"] and state.amounts == [10.0, 5.0, 20.0]
    assert feast_store.read(TERMINAL, [terminal])[terminal].transaction_ids == ["TX1", "TX0", "TX2"]
    assert counter(aggregator, CARD, "applied") == 2 and counter(aggregator, CARD, "out_of_order") == 1
    assert counter(aggregator, CARD, "duplicate") == 1 and counter(aggregator, TERMINAL, "duplicate") == 1
    assert counter(aggregator, CARD, "late") == 1 and counter(aggregator, TERMINAL, "late") == 1
    assert (
        counter(aggregator, "unknown", "missing_field") == 1 and counter(aggregator, "unknown", "unknown_entity") == 1
    )
    dead = redis_client.xrange(stream.dead_letter)
    reasons = sorted(fields[b"dead_reason"].decode() for _, fields in dead)
    assert reasons == ["late", "late", "missing_field", "unknown_entity"]
    assert aggregator.metrics.dead_letters._value.get() == 4
    assert aggregator.metrics.freshness._sum.get() > 0  # applied events observed
    # features at T + 61 s: TX1, TX0, TX2 in the 10-minute window
    features = read_velocity(feast_store, [T + 61 * NS_PER_SECOND], [card], [terminal])[0]
    assert features[VELOCITY_FEATURES.index("customer_nb_tx_10m")] == 3
    assert features[VELOCITY_FEATURES.index("customer_sum_amount_10m")] == 35.0
    assert features[VELOCITY_FEATURES.index("customer_seconds_since_last_tx")] == 1.0


def test_pending_entries_of_a_crashed_consumer_are_reclaimed_once(
    stream: StreamSettings, feast_store: WindowStateStore, redis_client: redis.Redis
) -> None:
    card, terminal = f"C-{uuid.uuid4().hex[:8]}", f"T-{uuid.uuid4().hex[:8]}"
    crashed = make_aggregator(stream, feast_store, consumer="agg-crashed", lease_ms=200)
    crashed.rebalance()  # takes every partition
    assert crashed.owned == {0, 1, 2}
    TransactionPublisher(stream, redis_client).publish(
        [(f"TX{i}", card, terminal, float(i + 1), T + i * NS_PER_SECOND) for i in range(5)]
    )
    # it reads the entries and dies before writing or acknowledging them
    read = redis_client.xreadgroup(stream.group, "agg-crashed", {s: ">" for s in stream.streams}, count=100)
    assert sum(len(entries) for _, entries in read) == 10
    successor = make_aggregator(stream, feast_store, consumer="agg-b")
    successor.rebalance()
    assert successor.owned == set()  # the leases are still held
    time.sleep(0.3)  # the crashed consumer's leases expire
    drain(successor)
    state = feast_store.read(CARD, [card])[card]
    assert state.transaction_ids == [f"TX{i}" for i in range(5)]
    assert sum(int(g["pending"]) for s in stream.streams for g in redis_client.xinfo_groups(s)) == 0
    # a replay of everything after the restart changes nothing
    TransactionPublisher(stream, redis_client).publish(
        [(f"TX{i}", card, terminal, float(i + 1), T + i * NS_PER_SECOND) for i in range(5)]
    )
    drain(successor)
    assert feast_store.read(CARD, [card])[card].transaction_ids == [f"TX{i}" for i in range(5)]
    assert counter(successor, CARD, "duplicate") == 5


def test_two_consumers_share_the_partitions(
    stream: StreamSettings, feast_store: WindowStateStore, redis_client: redis.Redis
) -> None:
    first = make_aggregator(stream, feast_store, consumer="agg-1")
    second = make_aggregator(stream, feast_store, consumer="agg-2")
    first.rebalance()
    assert first.owned == {0, 1, 2}
    second.rebalance()  # joins: the first releases down to its share on its next tick
    first.rebalance()
    second.rebalance()
    assert first.owned.isdisjoint(second.owned)
    assert first.owned | second.owned == {0, 1, 2} and len(first.owned) == 2 and len(second.owned) == 1


def simulated_day(n_customers: int) -> pd.DataFrame:
    """One simulated day, plus a card-testing burst (many small purchases at several terminals
    within minutes), a transaction at the same second as another of its card, and events exactly
    one window apart."""
    data = simulate(SimulationConfig(n_customers=n_customers, n_terminals=200, n_days=2, seed=11))
    tx = data.transactions
    day = tx[tx["tx_datetime"] >= tx["tx_datetime"].min().normalize() + pd.Timedelta(days=1)]
    frame = day[["transaction_id", "customer_id", "terminal_id", "tx_amount", "tx_datetime"]].copy()
    # ids of their own: the module's store keeps the states other tests (and parameters) wrote
    tag = uuid.uuid4().hex[:6]
    for column in ("transaction_id", "customer_id", "terminal_id"):
        frame[column] = f"{tag}-" + frame[column].astype(str)
    card, start = frame["customer_id"].iloc[0], frame["tx_datetime"].iloc[len(frame) // 2]
    burst = pd.DataFrame(
        {
            "transaction_id": [f"{tag}-BURST{i:03d}" for i in range(14)],
            "customer_id": card,
            "terminal_id": [frame["terminal_id"].iloc[i % 4] for i in range(14)],
            "tx_amount": [1.5 + 0.25 * i for i in range(13)] + [950.0],
            "tx_datetime": [
                start + pd.Timedelta(seconds=s)
                for s in (0, 0, 45, 100, 600, 601, 900, 1200, 1500, 1800, 2400, 3000, 3600, 4200)
            ],
        }
    )
    return pd.concat([frame, burst]).sort_values(["tx_datetime", "transaction_id"]).reset_index(drop=True)


@pytest.mark.parametrize("n_customers", [30, pytest.param(150, marks=pytest.mark.slow)])
def test_skew_replayed_day_online_equals_offline(
    n_customers: int, stream: StreamSettings, feast_store: WindowStateStore, redis_client: redis.Redis
) -> None:
    """Each transaction is scored from the online store (as the predictor does) before it is
    published and applied; every value must equal the offline computation."""
    day = simulated_day(n_customers)
    offline = velocity_frame(day)[list(VELOCITY_FEATURES)].to_numpy()
    publisher = TransactionPublisher(stream, redis_client)
    aggregator = make_aggregator(stream, feast_store)
    ts = day["tx_datetime"].astype("datetime64[ns]").to_numpy().view("int64")
    rows = list(day.itertuples(index=False))
    online = np.empty_like(offline)
    i = 0
    while i < len(rows):
        # transactions at the same instant are scored together (none counts the others)
        j = i
        while j < len(rows) and ts[j] == ts[i]:
            j += 1
        batch = rows[i:j]
        online[i:j] = read_velocity(
            feast_store, ts[i:j], [r.customer_id for r in batch], [r.terminal_id for r in batch]
        )
        publisher.publish(
            [
                (r.transaction_id, r.customer_id, r.terminal_id, r.tx_amount, int(t))
                for r, t in zip(batch, ts[i:j], strict=True)
            ]
        )
        if i % 7 == 0:  # some replays
            publisher.publish(
                [
                    (r.transaction_id, r.customer_id, r.terminal_id, r.tx_amount, int(t))
                    for r, t in zip(batch, ts[i:j], strict=True)
                ]
            )
        drain(aggregator)
        i = j
    np.testing.assert_allclose(online, offline, rtol=0, atol=1e-9)
    # the day exercises the short windows, distinct terminals and the burst
    assert offline[:, VELOCITY_FEATURES.index("customer_nb_tx_10m")].max() >= 3
    assert offline[:, VELOCITY_FEATURES.index("customer_nb_terminals_1h")].max() >= 3
    assert counter(aggregator, CARD, "duplicate") > 0


def test_direct_write_stores_what_the_push_api_stores(feast_store: WindowStateStore) -> None:
    card = RecentEvents()
    for i in range(4):
        card.apply(f"W{i}", T + i * NS_PER_SECOND, 1.25 * (i + 1), f"T{i % 2}")
    terminal = RecentEvents([T, T + 7], ["W0", "W1"])
    ids = (f"C-push-{uuid.uuid4().hex[:6]}", f"C-direct-{uuid.uuid4().hex[:6]}")
    feast_store.write(CARD, {ids[0]: RecentEvents(**vars(card))}, via="push")
    feast_store.write(CARD, {ids[1]: RecentEvents(**vars(card))})
    pushed, direct = (feast_store.read(CARD, [i])[i] for i in ids)
    assert (
        (pushed.ts_ns, pushed.amounts, pushed.terminals, pushed.transaction_ids)
        == (
            direct.ts_ns,
            direct.amounts,
            direct.terminals,
            direct.transaction_ids,
        )
        == (card.ts_ns, card.amounts, card.terminals, card.transaction_ids)
    )
    feast_store.write(TERMINAL, {"T-push": RecentEvents(**vars(terminal))}, via="push")
    feast_store.write(TERMINAL, {"T-direct": RecentEvents(**vars(terminal))})
    read = feast_store.read(TERMINAL, ["T-push", "T-direct"])
    assert read["T-push"].ts_ns == read["T-direct"].ts_ns == terminal.ts_ns
    assert read["T-push"].transaction_ids == read["T-direct"].transaction_ids == ["W0", "W1"]


def _as_tuple(state: RecentEvents) -> tuple:
    return (state.ts_ns, state.amounts, state.terminals, state.transaction_ids)


def test_redis_direct_path_writes_and_reads_what_feast_reads_and_writes(redis_feast_store: WindowStateStore) -> None:
    """On Redis the states bypass Feast's write (one pipeline, no timestamp read-back): Feast's own
    `online_read` must read back exactly what the direct path wrote (values and event time), and the
    direct read must read what Feast's push API and `online_write_batch` wrote."""
    store = redis_feast_store
    assert store._redis is not None  # the direct path is the one under test
    card = RecentEvents()
    for i in range(5):
        card.apply(f"R{i}", T + i * NS_PER_SECOND + 123, 0.1 + 1.37 * i, f"T-\u00e9{i % 2}")
    terminal = RecentEvents([T, T + 7, T + 9], ["R0", "R1", "R2"])
    tag = uuid.uuid4().hex[:6]
    ways = ("default", "push", "online_write_batch")
    cards = {way: f"C-{way}-{tag}" for way in ways}
    terminals = {way: f"T-{way}-{tag}" for way in ways}
    written = {}
    for way in ways:
        state = RecentEvents(**vars(card))
        store.write(CARD, {cards[way]: state}, via=way)
        store.write(TERMINAL, {terminals[way]: RecentEvents(**vars(terminal))}, via=way)
        written[way] = state.written_ns
    for way in ways:
        by_feast = store.read_via_feast(CARD, [cards[way]])[cards[way]]
        direct = store.read(CARD, [cards[way]])[cards[way]]
        assert _as_tuple(by_feast) == _as_tuple(direct) == _as_tuple(card), way
        assert by_feast.written_ns == direct.written_ns == written[way], way
        by_feast_t = store.read_via_feast(TERMINAL, [terminals[way]])[terminals[way]]
        direct_t = store.read(TERMINAL, [terminals[way]])[terminals[way]]
        assert by_feast_t.ts_ns == direct_t.ts_ns == terminal.ts_ns, way
        assert by_feast_t.transaction_ids == direct_t.transaction_ids == terminal.transaction_ids, way
    # both kinds in one call, unknown ids empty; a later write replaces the state (newer timestamp)
    unknown = f"C-unknown-{tag}"
    both = store.read_many({CARD: [cards["default"], unknown], TERMINAL: [terminals["push"]]})
    assert _as_tuple(both[CARD][cards["default"]]) == _as_tuple(card)
    assert both[CARD][unknown].ts_ns == [] and both[CARD][unknown].written_ns == 0
    assert both[TERMINAL][terminals["push"]].transaction_ids == terminal.transaction_ids
    later = both[CARD][cards["default"]]
    later.apply("R9", T + 60 * NS_PER_SECOND, 9.5, "T9")
    store.write_many({CARD: {cards["default"]: later}, TERMINAL: {}})
    again = store.read_via_feast(CARD, [cards["default"]])[cards["default"]]
    assert again.transaction_ids == [*card.transaction_ids, "R9"] and again.written_ns == later.written_ns
    with pytest.raises(ValueError, match="write path"):
        store.write(CARD, {cards["default"]: later}, via="sideways")


def test_sqlite_store_has_no_direct_path(feast_store: WindowStateStore) -> None:
    assert feast_store._redis is None


def test_aggregator_on_redis_writes_states_feast_reads(
    stream: StreamSettings, redis_feast_store: WindowStateStore, redis_client: redis.Redis
) -> None:
    """The aggregator's one-pipeline writes on the Redis store: Feast's online_read sees every
    event of the card and the terminal, the replayed one once."""
    tag = uuid.uuid4().hex[:6]
    card_id, terminal_id = f"C-agg-{tag}", f"T-agg-{tag}"
    events = [(f"{tag}-{i}", card_id, terminal_id, 2.0 + i, T + i * NS_PER_SECOND) for i in range(6)]
    publisher = TransactionPublisher(stream, redis_client)
    publisher.publish(events)
    publisher.publish(events[:2])  # a replay
    aggregator = make_aggregator(stream, redis_feast_store)
    drain(aggregator)
    card = redis_feast_store.read_via_feast(CARD, [card_id])[card_id]
    terminal = redis_feast_store.read_via_feast(TERMINAL, [terminal_id])[terminal_id]
    assert card.transaction_ids == terminal.transaction_ids == [e[0] for e in events]
    assert card.amounts == [e[3] for e in events]
    assert counter(aggregator, CARD, "duplicate") == 2
