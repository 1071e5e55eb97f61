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

    def _view(self, kind: str) -> Any:
        if kind not in self._views:
            self._views[kind] = self.store.get_feature_view(STATE_VIEWS[kind][0])
        return self._views[kind]

    def read(self, kind: str, ids: Sequence[str]) -> dict[str, RecentEvents]:
        """The stored state of each id (an empty state for an unknown one)."""
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
            if kind == CARD:
                ts, amounts, terminals, tx_ids = columns
                states[entity] = RecentEvents(
                    [int(v) for v in ts],
                    [str(v) for v in tx_ids],
                    [float(v) for v in amounts],
                    [str(v) for v in terminals],
                    written,
                )
            else:
                ts, tx_ids = columns
                states[entity] = RecentEvents([int(v) for v in ts], [str(v) for v in tx_ids], written_ns=written)
        return states

    def write(self, kind: str, states: Mapping[str, RecentEvents], via_push: bool = False) -> None:
        """Write the states in one online-store call; sets each state's `written_ns`.

        Default: the online store's `online_write_batch` (the write Feast's push API ends in) with
        the value protos built directly from the lists - the push API's DataFrame -> Arrow -> proto
        conversion costs ~10x more per batch (docs/features.md). `via_push=True` goes through
        `FeatureStore.push`; tests/test_feature_streaming.py checks both store the same rows."""
        if not states:
            return
        view, join_key, fields = STATE_VIEWS[kind]
        now = time.time_ns()
        stamps = []
        for state in states.values():
            # microseconds: Feast keeps the event time at that precision
            state.written_ns = max(now, state.written_ns + 1_000) // 1_000 * 1_000
            stamps.append(state.written_ns)
        if not via_push:
            self._write_batch(kind, states, stamps)
            return
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
            columns: tuple[Sequence[Any], ...] = (
                (state.ts_ns, state.amounts, state.terminals, state.transaction_ids)
                if kind == CARD
                else (state.ts_ns, state.transaction_ids)
            )
            values = {name: _list_value(k, list(c)) for name, k, c in zip(fields, kinds, columns, strict=True)}
            when = datetime.fromtimestamp(stamp // 1_000 / 1e6, tz=UTC).replace(
                microsecond=(stamp // 1_000) % 1_000_000
            )
            rows.append((self._key(join_key, entity), values, when, None))
        self._online_store.online_write_batch(self.store.config, self._view(kind), rows, None)


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
    """`velocity_matrix` on the states read from the store (two online reads)."""
    cards = state_store.read(CARD, customer_ids)
    terminals = state_store.read(TERMINAL, terminal_ids)
    return velocity_matrix(request_ns, customer_ids, terminal_ids, cards, terminals)
