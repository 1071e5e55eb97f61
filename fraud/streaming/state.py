"""The velocity window states in the Feast online store, and the request-time features from them.

`WindowStateStore` reads states with the online store's `online_read` (one call per view, no
registry access per call) and writes them with Feast's push API (`FeatureStore.push` to the
views' push sources, online only). A state row's event timestamp is its write time, strictly
increasing per entity, because Feast's Redis store ignores a write that is not newer than the
stored row.

`velocity_matrix` evaluates `fraud.features.definitions.velocity_features` for each scored
transaction from the states of its card and terminal: the predictor's path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fraud.features.definitions import (
    CARD_RECENT_FIELDS,
    CARD_RECENT_VIEW,
    STATE_TIMESTAMP,
    TERMINAL_RECENT_FIELDS,
    TERMINAL_RECENT_VIEW,
    VELOCITY_FEATURES,
    push_source_name,
    velocity_features,
)
from fraud.schema import CUSTOMER_ID, TERMINAL_ID
from fraud.streaming.events import CARD, TERMINAL
from fraud.streaming.windows import RecentEvents

if TYPE_CHECKING:
    from feast import FeatureStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

#: (view, join key, fields) of each kind of state
STATE_VIEWS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    CARD: (CARD_RECENT_VIEW, CUSTOMER_ID, CARD_RECENT_FIELDS),
    TERMINAL: (TERMINAL_RECENT_VIEW, TERMINAL_ID, TERMINAL_RECENT_FIELDS),
}
_EMPTY_TS = np.empty(0, dtype=np.int64)
_EMPTY_AMOUNTS = np.empty(0, dtype=np.float64)


def _list_values(value: Any) -> list:
    if value is None:
        return []
    kind = value.WhichOneof("val")
    return list(getattr(value, kind).val) if kind is not None else []


class WindowStateStore:
    """Read and write the window states of cards and terminals in a Feast store."""

    def __init__(self, store: FeatureStore) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self.store = store
        store.refresh_registry()
        self._online_store = store._get_provider().online_store
        self._key = lambda join_key, value: EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
        self._views: dict[str, Any] = {}
        self._redis_states: _RedisStates | None = None
        self._redis_checked = False

    @property
    def _redis(self) -> _RedisStates | None:
        """The direct Redis path (None: not Feast's redis-py Redis store); built on first use,
        when the views are applied."""
        if not self._redis_checked:
            self._redis_states = _RedisStates.create(self._online_store, self.store.config, self._view)
            self._redis_checked = True
        return self._redis_states

    def _view(self, kind: str) -> Any:
        if kind not in self._views:
            self._views[kind] = self.store.get_feature_view(STATE_VIEWS[kind][0])
        return self._views[kind]

    def read_many(self, ids: Mapping[str, Sequence[str]]) -> dict[str, dict[str, RecentEvents]]:
        """`read` of several kinds ({kind: ids}); on Redis in one pipeline (one round trip)."""
        if self._redis is not None:
            return self._redis.read(ids)
        return {kind: self.read(kind, entity_ids) for kind, entity_ids in ids.items()}

    def read(self, kind: str, ids: Sequence[str]) -> dict[str, RecentEvents]:
        """The stored state of each id (an empty state for an unknown one)."""
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        if self._redis is not None:
            return self._redis.read({kind: unique})[kind]
        return self.read_via_feast(kind, unique)

    def read_via_feast(self, kind: str, ids: Sequence[str]) -> dict[str, RecentEvents]:
        """`read` through Feast's `online_read` (what `read` is tested equal to on Redis)."""
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        _, join_key, fields = STATE_VIEWS[kind]
        rows = self._online_store.online_read(
            self.store.config, self._view(kind), [self._key(join_key, i) for i in unique], list(fields)
        )
        states: dict[str, RecentEvents] = {}
        for entity, (event_ts, row) in zip(unique, rows, strict=True):
            if not row:
                states[entity] = RecentEvents()
                continue
            columns = [_list_values(row.get(name)) for name in fields]
            written = int(pd.Timestamp(event_ts).value) if event_ts is not None else 0
            states[entity] = _state_of(kind, columns, written)
        return states

    def write_many(self, changed: Mapping[str, Mapping[str, RecentEvents]]) -> None:
        """`write` of several kinds ({kind: {id: state}}); on Redis in one pipeline (one round trip)."""
        if self._redis is None:
            for kind, states in changed.items():
                self.write(kind, states)
            return
        stamped = {kind: (states, _stamp(states)) for kind, states in changed.items() if states}
        if stamped:
            self._redis.write(stamped)

    def write(self, kind: str, states: Mapping[str, RecentEvents], via: str = "default") -> None:
        """Write the states; sets each state's `written_ns`.

        `via`: "default" - on Redis the hashes Feast's Redis store keeps (same keys, hash fields and
        value / timestamp protos, `_RedisStates`) in one pipeline, on other stores the online
        store's `online_write_batch` (the write Feast's push API ends in) with the value protos
        built directly from the lists; "online_write_batch" - always the latter; "push" -
        `FeatureStore.push`. The push API's DataFrame -> Arrow -> proto conversion costs ~10x more
        per batch, and Feast's Redis `online_write_batch` reads every row's stored timestamp before
        writing (a second round trip; each state has one writer whose timestamps only increase,
        so there is nothing to compare). tests/test_feature_streaming.py checks all three store
        rows Feast reads back the same (docs/features.md)."""
        if not states:
            return
        stamps = _stamp(states)
        if via == "default" and self._redis is not None:
            self._redis.write({kind: (states, stamps)})
            return
        if via in ("default", "online_write_batch"):
            self._write_batch(kind, states, stamps)
            return
        if via != "push":
            raise ValueError(f"unknown write path {via!r}")
        view, join_key, fields = STATE_VIEWS[kind]
        frame = pd.DataFrame(
            {
                join_key: list(states),
                STATE_TIMESTAMP: pd.to_datetime(stamps, unit="ns", utc=True),
            }
        )
        columns: tuple[list[Any], ...]
        if kind == CARD:
            columns = (
                [s.ts_ns for s in states.values()],
                [s.amounts for s in states.values()],
                [s.terminals for s in states.values()],
                [s.transaction_ids for s in states.values()],
            )
        else:
            columns = ([s.ts_ns for s in states.values()], [s.transaction_ids for s in states.values()])
        for name, values in zip(fields, columns, strict=True):
            frame[name] = values
        from feast.data_source import PushMode

        self.store.push(push_source_name(view), frame, to=PushMode.ONLINE)

    def _write_batch(self, kind: str, states: Mapping[str, RecentEvents], stamps: list[int]) -> None:
        _, join_key, fields = STATE_VIEWS[kind]
        kinds = _field_kinds(kind)
        rows: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]] = []
        for (entity, state), stamp in zip(states.items(), stamps, strict=True):
            values = {
                name: _list_value(k, list(c)) for name, k, c in zip(fields, kinds, _columns(kind, state), strict=True)
            }
            when = datetime.fromtimestamp(stamp // 1_000 / 1e6, tz=UTC).replace(
                microsecond=(stamp // 1_000) % 1_000_000
            )
            rows.append((self._key(join_key, entity), values, when, None))
        self._online_store.online_write_batch(self.store.config, self._view(kind), rows, None)


def _stamp(states: Mapping[str, RecentEvents]) -> list[int]:
    """Give each state its new write time (ns, whole microseconds: Feast keeps the event time at
    that precision), strictly after its previous one; returns them in `states` order."""
    now = time.time_ns()
    stamps = []
    for state in states.values():
        state.written_ns = max(now, state.written_ns + 1_000) // 1_000 * 1_000
        stamps.append(state.written_ns)
    return stamps


def _columns(kind: str, state: RecentEvents) -> tuple[Sequence[Any], ...]:
    if kind == CARD:
        return (state.ts_ns, state.amounts, state.terminals, state.transaction_ids)
    return (state.ts_ns, state.transaction_ids)


def _state_of(kind: str, columns: Sequence[list], written_ns: int) -> RecentEvents:
    if kind == CARD:
        ts, amounts, terminals, tx_ids = columns
        return RecentEvents(
            [int(v) for v in ts],
            [str(v) for v in tx_ids],
            [float(v) for v in amounts],
            [str(v) for v in terminals],
            written_ns,
        )
    ts, tx_ids = columns
    return RecentEvents([int(v) for v in ts], [str(v) for v in tx_ids], written_ns=written_ns)


class _RedisStates:
    """The window states in Feast's Redis online store, read and written with one pipeline per
    call: the hashes Feast's `RedisOnlineStore` keeps (entity key = Feast's serialised key +
    project, built as `fraud.online_readers` builds it and checked against Feast's at construction;
    hash fields from the store's `_generate_hset_keys_for_features`, feature-view versioning
    included; values are serialised `ValueProto`s, the timestamp field a serialised protobuf
    `Timestamp`), so Feast's `online_read` reads what this writes and the other way round."""

    def __init__(self, online_store: Any, config: Any, view_of: Any) -> None:
        from feast.infra.online_stores.redis import _versioned_fv_name

        from fraud.online_readers import _EntityKeys

        self._store, self._config = online_store, config
        self._layout: dict[str, tuple[Any, list, bytes | str]] = {}
        for kind, (_, join_key, fields) in STATE_VIEWS.items():
            view = view_of(kind)
            _, hash_fields = online_store._generate_hset_keys_for_features(
                view, list(fields), fv_name_override=_versioned_fv_name(view, config)
            )
            keys = _EntityKeys(join_key, config.entity_key_serialization_version, config.project.encode("utf-8"))
            keys.check(lambda proto: online_store._generate_redis_keys_for_entities(config, [proto])[0])
            # hash fields: one per state field, then the view's timestamp field
            self._layout[kind] = (keys, list(hash_fields[: len(fields)]), hash_fields[len(fields)])
        self._ttl = getattr(config.online_store, "key_ttl_seconds", None)

    @classmethod
    def create(cls, online_store: Any, config: Any, view_of: Any) -> _RedisStates | None:
        """The direct path for Feast's redis-py Redis store; None for any other store."""
        from feast.infra.online_stores.redis import RedisOnlineStore

        from fraud.online_readers import OnlineLayoutMismatch

        client = getattr(config.online_store, "client", "redis")
        if not isinstance(online_store, RedisOnlineStore) or str(getattr(client, "value", client)) != "redis":
            return None
        try:
            return cls(online_store, config, view_of)
        except OnlineLayoutMismatch:
            return None

    def _client(self) -> Any:
        return self._store._get_client(self._config.online_store)

    def read(self, ids: Mapping[str, Sequence[str]]) -> dict[str, dict[str, RecentEvents]]:
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        plan = {kind: list(dict.fromkeys(entity_ids)) for kind, entity_ids in ids.items()}
        if not any(plan.values()):
            return {kind: {} for kind in plan}
        with self._client().pipeline(transaction=False) as pipe:
            for kind, unique in plan.items():
                keys, fields, ts_field = self._layout[kind]
                for entity in unique:
                    pipe.hmget(keys(entity), [*fields, ts_field])
            replies = iter(pipe.execute())
        out: dict[str, dict[str, RecentEvents]] = {}
        for kind, unique in plan.items():
            width = len(self._layout[kind][1])
            states: dict[str, RecentEvents] = {}
            for entity in unique:
                reply = next(replies)
                if not any(reply[:width]):
                    states[entity] = RecentEvents()
                    continue
                written = 0
                if reply[width]:
                    stamp = Timestamp.FromString(reply[width])
                    written = stamp.seconds * 1_000_000_000 + stamp.nanos
                states[entity] = _state_of(
                    kind, [_list_values(Value.FromString(v)) if v else [] for v in reply[:width]], written
                )
            out[kind] = states
        return out

    def write(self, changed: Mapping[str, tuple[Mapping[str, RecentEvents], list[int]]]) -> None:
        from google.protobuf.timestamp_pb2 import Timestamp

        with self._client().pipeline(transaction=False) as pipe:
            for kind, (states, stamps) in changed.items():
                keys, fields, ts_field = self._layout[kind]
                kinds = _field_kinds(kind)
                for (entity, state), stamp in zip(states.items(), stamps, strict=True):
                    key = keys(entity)
                    when = Timestamp(seconds=stamp // 1_000_000_000, nanos=stamp % 1_000_000_000)
                    mapping: dict[Any, bytes] = {ts_field: when.SerializeToString()}
                    for field_key, field_kind, column in zip(fields, kinds, _columns(kind, state), strict=True):
                        mapping[field_key] = _list_value(field_kind, list(column)).SerializeToString()
                    pipe.hset(key, mapping=mapping)
                    if self._ttl:
                        pipe.expire(name=key, time=self._ttl)
            pipe.execute()


def _list_value(kind: str, values: list) -> Any:
    from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List, StringList, Value

    if kind == "int64":
        return Value(int64_list_val=Int64List(val=values))
    if kind == "double":
        return Value(double_list_val=DoubleList(val=values))
    return Value(string_list_val=StringList(val=values))


def _field_kinds(kind: str) -> tuple[str, ...]:
    return ("int64", "double", "string", "string") if kind == CARD else ("int64", "string")


def velocity_matrix(
    request_ns: Sequence[int] | np.ndarray,
    customer_ids: Sequence[str],
    terminal_ids: Sequence[str],
    cards: Mapping[str, RecentEvents],
    terminals: Mapping[str, RecentEvents],
) -> np.ndarray:
    """[n, len(VELOCITY_FEATURES)] float64: the velocity features of transaction i (at
    request_ns[i]) from the state of customer_ids[i] and terminal_ids[i] (unknown: empty)."""
    empty = RecentEvents()
    out = np.empty((len(customer_ids), len(VELOCITY_FEATURES)), dtype=np.float64)
    for i, (t, card, terminal) in enumerate(zip(request_ns, customer_ids, terminal_ids, strict=True)):
        c = cards.get(card, empty)
        m = terminals.get(terminal, empty)
        out[i] = velocity_features(
            int(t),
            np.asarray(c.ts_ns, dtype=np.int64) if c.ts_ns else _EMPTY_TS,
            np.asarray(c.amounts, dtype=np.float64) if c.amounts else _EMPTY_AMOUNTS,
            c.terminals,
            np.asarray(m.ts_ns, dtype=np.int64) if m.ts_ns else _EMPTY_TS,
        )
    return out


def read_velocity(
    state_store: WindowStateStore,
    request_ns: Sequence[int] | np.ndarray,
    customer_ids: Sequence[str],
    terminal_ids: Sequence[str],
) -> np.ndarray:
    """`velocity_matrix` on the states read from the store (one pipelined read on Redis)."""
    states = state_store.read_many({CARD: customer_ids, TERMINAL: terminal_ids})
    return velocity_matrix(request_ns, customer_ids, terminal_ids, states[CARD], states[TERMINAL])
