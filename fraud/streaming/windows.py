"""One entity's recent events (the window state of the velocity features) and how an event is
applied to it.

The state holds the events within VELOCITY_HORIZON_S of its newest event, sorted by (time,
transaction id). Applying an event:

* its transaction id is already in the state: `duplicate`, nothing changes (a replay never
  double-counts);
* it is older than newest - horizon: `late`, nothing changes (the caller dead-letters it);
* it is older than the newest event but within the horizon: `out_of_order`, inserted at its
  place (the windows stay exact);
* else `applied`; events that fell out of the horizon are evicted.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from fraud.features.definitions import NS_PER_SECOND, VELOCITY_HORIZON_S

HORIZON_NS = VELOCITY_HORIZON_S * NS_PER_SECOND
APPLIED = "applied"
OUT_OF_ORDER = "out_of_order"
DUPLICATE = "duplicate"
LATE = "late"


@dataclass
class RecentEvents:
    """Parallel lists sorted by (ts_ns, transaction id). `terminals` / `amounts` are empty lists
    for a terminal's state (it only needs times and ids)."""

    ts_ns: list[int] = field(default_factory=list)
    transaction_ids: list[str] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)
    terminals: list[str] = field(default_factory=list)
    #: event time of the stored state row (ns), 0 for a new state
    written_ns: int = 0

    @property
    def newest_ns(self) -> int | None:
        return self.ts_ns[-1] if self.ts_ns else None

    def apply(
        self, transaction_id: str, ts_ns: int, amount: float | None = None, terminal_id: str | None = None
    ) -> str:
        """Apply one event (amount / terminal_id only for a card); returns the outcome."""
        if transaction_id in self.transaction_ids:
            return DUPLICATE
        newest = self.newest_ns
        if newest is not None and ts_ns <= newest - HORIZON_NS:
            return LATE
        outcome = OUT_OF_ORDER if newest is not None and ts_ns < newest else APPLIED
        keys = list(zip(self.ts_ns, self.transaction_ids, strict=True))
        at = bisect.bisect_right(keys, (ts_ns, transaction_id))
        self.ts_ns.insert(at, ts_ns)
        self.transaction_ids.insert(at, transaction_id)
        if amount is not None:
            self.amounts.insert(at, float(amount))
            self.terminals.insert(at, str(terminal_id))
        self._evict()
        return outcome

    def _evict(self) -> None:
        cutoff = self.ts_ns[-1] - HORIZON_NS
        keep = bisect.bisect_right(self.ts_ns, cutoff)
        if keep:
            del self.ts_ns[:keep], self.transaction_ids[:keep]
            if self.amounts:
                del self.amounts[:keep], self.terminals[:keep]
