"""The velocity aggregator: consumes the transaction stream and keeps the window states current.

Per loop iteration:

1. every `tick_s`: heartbeat in the members set and renew its partition leases (one pipeline),
   release those above its fair share (ceil(partitions / live members)) and take free ones up to
   it; a partition it takes is *recovered* first: XAUTOCLAIM of every pending entry of the group
   on it (entries a crashed or restarted consumer read but never acknowledged). Lag gauges from
   XINFO GROUPS.
2. XREADGROUP on the partitions it holds (COUNT batch_size, BLOCK block_ms): everything that
   arrived since the last batch, or the first entry within block_ms;
3. each entry: decode (bad: counted, logged, dead-lettered), apply to the entity's state (read
   from the online store on a cache miss, cards and terminals in one pipeline; duplicates
   ignored, late events dead-lettered);
4. write the changed states of cards and terminals to the online store in one pipeline
   (`WindowStateStore.write_many`: on Redis the hashes Feast's store keeps, one round trip), then
   XACK the entries. A failed write acknowledges nothing and forgets the cached states, so the
   entries are re-claimed and re-applied onto the stored states; a crash between write and XACK
   re-delivers entries whose transaction ids are already in the states (duplicates: no double
   count).

A partition has one lease holder, so each state has a single writer. Metrics (Prometheus, own
registry) and the probes are served on `metrics_port` (/metrics, /healthz, /readyz).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.typing import KeyT, StreamIdT

from fraud.streaming.events import CARD, KINDS, BadEvent, StreamSettings, TransactionEvent, decode, encode
from fraud.streaming.state import WindowStateStore
from fraud.streaming.windows import APPLIED, DUPLICATE, LATE, OUT_OF_ORDER, RecentEvents

logger = logging.getLogger("fraud.streaming.aggregator")

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
FRESHNESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class AggregatorSettings:
    consumer: str = field(default_factory=default_consumer_name)
    batch_size: int = 500
    block_ms: int = 20
    lease_ms: int = 10_000
    tick_s: float = 1.0
    #: port of /metrics, /healthz and /readyz (0: any free port; None: no server)
    metrics_port: int | None = 9102
    metrics_host: str = "0.0.0.0"  # noqa: S104 - metrics endpoint of a pod, scraped by Prometheus from outside
    #: /healthz fails when the loop has not completed an iteration for this long
    stall_s: float = 30.0
    #: window states kept in memory per kind (beyond: cleared, re-read from the store on a miss)
    cache_entries: int = 200_000


class AggregatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "fraud_stream_events", "Stream entries by outcome.", ["kind", "outcome"], registry=registry
        )
        self.dead_letters = Counter(
            "fraud_stream_dead_letters", "Entries sent to the dead-letter stream.", registry=registry
        )
        self.lag = Gauge(
            "fraud_stream_lag_entries",
            "Entries of a partition not yet acknowledged by the group (undelivered + pending).",
            ["partition"],
            registry=registry,
        )
        self.owned = Gauge("fraud_stream_partitions_owned", "Partitions this consumer holds.", registry=registry)
        self.freshness = Histogram(
            "fraud_stream_freshness_seconds",
            "Publish to online-store write of an applied event.",
            buckets=FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.batch = Histogram(
            "fraud_stream_batch_seconds",
            "Processing time of one batch of entries.",
            buckets=FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.write_failures = Counter(
            "fraud_stream_write_failures", "Failed pushes of window states.", registry=registry
        )


class Aggregator:
    def __init__(
        self,
        stream: StreamSettings,
        states: WindowStateStore,
        settings: AggregatorSettings | None = None,
        client: redis.Redis | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.stream = stream
        self.states = states
        self.settings = settings or AggregatorSettings()
        self.client = client or stream.client()
        self.metrics = AggregatorMetrics(registry or CollectorRegistry())
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self.owned: set[int] = set()
        self._recover: set[int] = set()
        self._cache: dict[str, dict[str, RecentEvents]] = {kind: {} for kind in KINDS}
        self._groups_ready = False
        self._last_tick = 0.0
        self.last_loop = time.monotonic()
        self.ready = False
        self._server: ThreadingHTTPServer | None = None

    # --- partitions ------------------------------------------------------------------------------

    def _lease_key(self, partition: int) -> str:
        return f"{self.stream.prefix}:lease:{partition}"

    @property
    def _members_key(self) -> str:
        return f"{self.stream.prefix}:members"

    def ensure_groups(self) -> None:
        for name in self.stream.streams:
            try:
                self.client.xgroup_create(name, self.stream.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    def rebalance(self) -> None:
        """Heartbeat, renew / release / acquire leases, refresh the lag gauges."""
        if not self._groups_ready:
            self.ensure_groups()
        me, lease_ms = self.settings.consumer, self.settings.lease_ms
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self._members_key, {me: now_ms + lease_ms})
        pipe.zremrangebyscore(self._members_key, "-inf", now_ms)
        pipe.zcard(self._members_key)
        held = sorted(self.owned)
        for partition in held:
            self._renew(keys=[self._lease_key(partition)], args=[me, lease_ms], client=pipe)
        replies = pipe.execute()
        members = max(1, int(replies[2]))
        target = math.ceil(self.stream.partitions / members)
        for partition, renewed in zip(held, replies[3:], strict=True):
            if not renewed:
                logger.warning("lost the lease of partition %d", partition)
                self._drop(partition)
        for partition in sorted(self.owned, reverse=True)[: max(0, len(self.owned) - target)]:
            self._release(keys=[self._lease_key(partition)], args=[me])
            self._drop(partition)
        for partition in range(self.stream.partitions):
            if len(self.owned) >= target:
                break
            if partition not in self.owned and self.client.set(self._lease_key(partition), me, nx=True, px=lease_ms):
                logger.info("took partition %d", partition)
                self.owned.add(partition)
                self._recover.add(partition)
        self.metrics.owned.set(len(self.owned))
        self.update_lag()
        self.ready = True

    def _drop(self, partition: int) -> None:
        self.owned.discard(partition)
        self._recover.discard(partition)
        for cache in self._cache.values():
            for entity in [e for e in cache if self.stream.partition_of(e) == partition]:
                del cache[entity]

    def update_lag(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name in self.stream.streams:
            pipe.xinfo_groups(name)
        for partition, groups in enumerate(pipe.execute(raise_on_error=False)):
            if isinstance(groups, Exception):
                continue
            for group in groups:
                name = group.get("name")
                if (name.decode() if isinstance(name, bytes) else name) == self.stream.group:
                    lag = group.get("lag") or 0
                    self.metrics.lag.labels(str(partition)).set(int(lag) + int(group.get("pending") or 0))

    def release_all(self) -> None:
        for partition in sorted(self.owned):
            self._release(keys=[self._lease_key(partition)], args=[self.settings.consumer])
            self._drop(partition)
        self.client.zrem(self._members_key, self.settings.consumer)
        self.metrics.owned.set(0)

    # --- consuming -------------------------------------------------------------------------------

    def step(self) -> int:
        """One batch: recover a newly taken partition, else read new entries. Returns entries handled."""
        if time.monotonic() - self._last_tick >= self.settings.tick_s:
            self.rebalance()
            self._last_tick = time.monotonic()
        if self._recover:
            partition = min(self._recover)
            name = self.stream.stream(partition)
            claimed: Any = self.client.xautoclaim(
                name,
                self.stream.group,
                self.settings.consumer,
                min_idle_time=0,
                start_id="0-0",
                count=self.settings.batch_size,
            )
            _, entries, _ = claimed
            if len(entries) < self.settings.batch_size:
                self._recover.discard(partition)
            if entries:
                logger.info("re-claimed %d pending entries of partition %d", len(entries), partition)
                return self.process({name: entries})
            return 0
        if not self.owned:
            time.sleep(self.settings.block_ms / 1000)
            return 0
        streams: dict[KeyT, StreamIdT] = {self.stream.stream(p): ">" for p in sorted(self.owned)}
        reply: Any = self.client.xreadgroup(
            self.stream.group,
            self.settings.consumer,
            streams,
            count=self.settings.batch_size,
            block=self.settings.block_ms,
        )
        if not reply:
            return 0
        return self.process({(name.decode() if isinstance(name, bytes) else name): entries for name, entries in reply})

    def process(self, batches: dict[str, list[tuple[Any, dict]]]) -> int:
        started = time.perf_counter()
        events: list[tuple[TransactionEvent, str, Any]] = []
        dead: list[tuple[str, Any, dict, str, str]] = []
        acks: dict[str, list[Any]] = defaultdict(list)
        for name, entries in batches.items():
            for entry_id, fields in entries:
                acks[name].append(entry_id)
                if fields is None:  # trimmed away (MAXLEN) while pending: nothing left to apply
                    continue
                try:
                    events.append((decode(fields), name, entry_id))
                except BadEvent as exc:
                    logger.warning("bad event %s on %s: %s", entry_id, name, exc)
                    self.metrics.events.labels("unknown", exc.reason).inc()
                    dead.append((name, entry_id, fields, exc.reason, str(exc)))
        changed: dict[str, dict[str, RecentEvents]] = {kind: {} for kind in KINDS}
        missing: dict[str, list[str]] = {}
        for kind in KINDS:
            cache = self._cache[kind]
            if len(cache) > self.settings.cache_entries:  # the store keeps them; reloaded on a miss
                cache.clear()
            absent = [e.entity_id for e, _, _ in events if e.kind == kind and e.entity_id not in cache]
            if absent:
                missing[kind] = absent
        if missing:
            for kind, states in self.states.read_many(missing).items():
                self._cache[kind].update(states)
        applied: list[TransactionEvent] = []
        for event, name, entry_id in events:
            state = self._cache[event.kind][event.entity_id]
            if event.kind == CARD:
                outcome = state.apply(event.transaction_id, event.ts_ns, event.amount, event.terminal_id)
            else:
                outcome = state.apply(event.transaction_id, event.ts_ns)
            self.metrics.events.labels(event.kind, outcome).inc()
            if outcome in (APPLIED, OUT_OF_ORDER):
                changed[event.kind][event.entity_id] = state
                applied.append(event)
                if outcome == OUT_OF_ORDER:
                    logger.info(
                        "out-of-order event %s (%s %s) sorted into its window", entry_id, event.kind, event.entity_id
                    )
            elif outcome == DUPLICATE:
                logger.info("duplicate event %s (transaction %s) ignored", entry_id, event.transaction_id)
            elif outcome == LATE:
                logger.warning(
                    "late event %s (%s %s) older than the largest window", entry_id, event.kind, event.entity_id
                )
                dead.append((name, entry_id, _fields(event), LATE, "older than the largest window"))
        try:
            self.states.write_many(changed)
        except Exception:
            self.metrics.write_failures.inc()
            logger.exception("pushing window states failed; the entries stay pending and are re-claimed")
            for kind in KINDS:
                for entity in changed[kind]:
                    self._cache[kind].pop(entity, None)
            self._recover.update(self.owned)
            raise
        written = time.time_ns()
        for event in applied:
            self.metrics.freshness.observe(max(0, written - event.published_ns) / 1e9)
        pipe = self.client.pipeline(transaction=False)
        for name, entry_id, fields, reason, message in dead:
            pipe.xadd(
                self.stream.dead_letter,
                {
                    **{_str(k): _str(v) for k, v in fields.items()},
                    "dead_reason": reason,
                    "dead_message": message,
                    "source_stream": name,
                    "source_id": _str(entry_id),
                },
                maxlen=self.stream.maxlen,
                approximate=True,
            )
        for name, ids in acks.items():
            pipe.xack(name, self.stream.group, *ids)
        pipe.execute()
        self.metrics.dead_letters.inc(len(dead))
        self.metrics.batch.observe(time.perf_counter() - started)
        return sum(len(ids) for ids in acks.values())

    # --- running ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; Redis or store outages are logged and retried."""
        backoff = 0.1
        while not stop.is_set():
            try:
                self.step()
                backoff = 0.1
            except (redis.RedisError, OSError) as exc:
                logger.warning("stream unavailable (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self.ready = False
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                logger.exception("batch failed; retrying")
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            self.last_loop = time.monotonic()
        with contextlib.suppress(redis.RedisError):
            self.release_all()

    def serve_http(self) -> int | None:
        """Start /metrics, /healthz, /readyz in a thread; returns the bound port."""
        if self.settings.metrics_port is None:
            return None
        aggregator = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, status, kind = generate_latest(aggregator.metrics.registry), 200, CONTENT_TYPE_LATEST
                elif self.path == "/healthz":
                    alive = time.monotonic() - aggregator.last_loop < aggregator.settings.stall_s
                    body, status, kind = (b"ok" if alive else b"stalled"), (200 if alive else 503), "text/plain"
                elif self.path == "/readyz":
                    body, status, kind = (
                        (b"ready", 200, "text/plain") if aggregator.ready else (b"not ready", 503, "text/plain")
                    )
                else:
                    body, status, kind = b"not found", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((self.settings.metrics_host, self.settings.metrics_port), Handler)
        threading.Thread(target=self._server.serve_forever, name="aggregator-http", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(event: TransactionEvent) -> dict[str, str]:
    return encode(
        event.transaction_id,
        event.customer_id,
        event.terminal_id,
        event.amount,
        event.ts_ns,
        event.kind,
        event.published_ns,
    )
