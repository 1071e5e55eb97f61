"""`FraudModel`: the fraud detector as a KServe custom model.

Lifecycle (what KServe's ModelServer calls):

* `load()` - resolve and validate the serving bundle (local dir, /mnt/models, or MLflow URI), load
  the XGBoost booster with one thread, connect the online feature source. Raises `ModelLoadError`
  with a one-line reason; the entry point logs it and exits without ever becoming ready.
* `preprocess()` - V1 `instances` or a V2 `InferRequest` -> validated transactions (`ParsedRequest`);
  bad input -> `InvalidInput` (HTTP 400 / gRPC INVALID_ARGUMENT) naming field, row and reason.
* `predict()` - one batched online-store lookup for the whole request, `model_feature_matrix`,
  XGBoost `inplace_predict` and `pred_contribs` reason codes for the transactions that are not
  approved (`--reason-codes all`: every transaction) (`ScoredBatch`).
* `postprocess()` - V1 `predictions` or a V2 `InferResponse` in the request's protocol.

Audit trail (optional, `PredictorSettings.audit_spool`): every decision of a request is appended to
the local audit spool (`fraud.audit.AuditSpool`) in the scoring thread, once per scored batch,
*before* the response is returned. A batch that cannot be spooled in full (spool file unwritable,
spool full) fails with `AuditUnavailable` (HTTP 503 / gRPC UNAVAILABLE): a decision that cannot be
audited is never acknowledged. With `audit_db_url` an in-process `AuditWriter` thread drains the
spool into the audit database; without it a sidecar (`fraud audit writer`) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput, ServerNotReady
from kserve.model import InferenceVerb
from kserve.protocol.infer_type import InferRequest

from fraud.bundle import BundleError, load_public_key, read_threshold_overrides, verify_bundle
from fraud.features.definitions import MODEL_FEATURES, model_feature_matrix
from fraud.schema import TransactionRequest
from predictor import prometheus
from predictor.auth import SCOPE_DEBUG, SCOPE_SCORE, Authorizer
from predictor.codec import (
    PROTOCOL_V1,
    Explanation,
    ParsedRequest,
    ScoredBatch,
    encode_v1,
    encode_v2,
    input_metadata,
    output_metadata,
    parse_v1,
    parse_v2,
    request_protocol,
)
from predictor.compiled import COMPILED_POLICIES
from predictor.edge import REQUEST_SCOPES
from predictor.features import (
    FeastFeatureSource,
    FeatureLookup,
    FeatureSourceUnavailable,
    OnlineFeatureSource,
    VelocitySource,
)
from predictor.idempotency import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL_S,
    LedgerUnavailable,
    MemoryLedger,
    RedisLedger,
    TransactionConflict,
    check_request,
    merged_batch,
    recorded_rows,
    replayed_batch,
)
from predictor.scoring import (
    KSERVE_MODEL_DIR,
    REASON_CODE_POLICIES,
    REASON_CODES_ALL,
    REASON_CODES_FLAGGED,
    BundleScorer,
    resolve_bundle_dir,
)

if TYPE_CHECKING:
    from fraud.audit import AuditSpool, AuditWriter

logger = logging.getLogger("kserve.fraud_predictor")

DEFAULT_MAX_BATCH_SIZE = 512
MODEL_VARIANTS = ("stable", "canary")
IDEMPOTENCY_MODES = ("auto", "redis", "memory", "off")
#: The predictor's spool fsync policy unless FRAUD_AUDIT_SPOOL_SYNC says otherwise: NORMAL survives a
#: crash of the predictor process without one fsync per request (docs/audit.md, "Guarantees").
DEFAULT_AUDIT_SPOOL_SYNC = "NORMAL"
AUDIT_SPOOL_SYNC_ENV = "FRAUD_AUDIT_SPOOL_SYNC"
DEFAULT_AUDIT_SPOOL_MAX_RECORDS = 200_000
#: how often the stable-version file is re-read (a ConfigMap volume itself updates within ~1 min)
STABLE_VERSION_REFRESH_S = 5.0

#: (UTC wall clock, perf_counter) of the request being handled, set when it reaches the model
_REQUEST_ARRIVAL: contextvars.ContextVar[tuple[datetime, float] | None] = contextvars.ContextVar(
    "fraud_request_arrival", default=None
)


class ModelLoadError(RuntimeError):
    """The model cannot be made ready (bad bundle, unusable feature store configuration)."""


class AuditUnavailable(ServerNotReady):
    """The request's decisions cannot be written to the audit spool: HTTP 503 / gRPC UNAVAILABLE,
    so that no unaudited decision is acknowledged."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.reason = str(self)


class OnlineStoreUnavailable(ServerNotReady):
    """Fail-closed refusal: HTTP 503 (KServe's ServerNotReady handler) / gRPC UNAVAILABLE.

    KServe's gRPC interceptor reads `reason` from the exception, which ServerNotReady lacks."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.reason = str(self)


@dataclass(frozen=True)
class PredictorSettings:
    #: local bundle directory, KServe's /mnt/models, or an MLflow URI (models:/name@alias)
    bundle: str = str(KSERVE_MODEL_DIR)
    #: online store kind passed to fraud.feature_store.get_feature_store (None: the repo's default)
    online_store: str | None = None
    #: refuse to score (HTTP 503) while the online store is down, instead of scoring with defaults
    fail_closed: bool = False
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    #: XGBoost threads per server process (one per worker avoids oversubscribing the cores)
    nthread: int = 1
    #: after a failed online-store lookup, treat the store as down for this long (no retries per request)
    store_retry_after_s: float = 5.0
    #: longest wait for one online-store lookup before the request is served in the degraded mode
    store_timeout_s: float = 1.0
    #: most transactions scored together when concurrent requests are coalesced (1: no coalescing)
    micro_batch_rows: int = 1024
    #: audit spool file; None disables the audit trail
    audit_spool: str | None = None
    #: audit database drained by an in-process AuditWriter thread; None: a sidecar drains the spool
    audit_db_url: str | None = None
    #: recorded on every audited decision (unless stable_version_file says which version is stable)
    model_variant: str = "stable"
    #: file holding the model version currently promoted to stable (a ConfigMap key the rollout
    #: updates, mounted as a volume: it changes under running pods); decisions of this version are
    #: recorded as `stable`, of any other as `canary`. Unset, empty or unreadable: model_variant.
    stable_version_file: str | None = None
    #: spool fsync policy (NORMAL or FULL); None: FRAUD_AUDIT_SPOOL_SYNC, else NORMAL
    audit_spool_sync: str | None = None
    #: most decisions the spool holds before requests are refused with 503
    audit_spool_max_records: int = DEFAULT_AUDIT_SPOOL_MAX_RECORDS
    #: folder with `review` and `decline` files (a mounted ConfigMap) overriding the bundle's thresholds
    thresholds_dir: str | None = None
    #: which transactions get SHAP reason codes: "flagged" (review/decline) or "all"
    reason_codes: str = REASON_CODES_FLAGGED
    #: Ed25519 public key (PEM file) the bundle's bundle.sig must verify with; None: digests only
    bundle_public_key: str | None = None
    #: readiness turns false (the pod leaves rotation before the spool refuses requests) when the
    #: spool holds this fraction of audit_spool_max_records, or its oldest decision waits longer
    #: than audit_stall_seconds (the writer stalled or the database is down)
    audit_high_water: float = 0.5
    audit_stall_seconds: float = 300.0
    #: one answer per transaction id (predictor.idempotency): "auto" (Redis with the Redis online
    #: store, else in-process), "redis", "memory" or "off" (`python -m predictor` defaults to auto)
    idempotency: str = "off"
    idempotency_ttl_s: float = DEFAULT_TTL_S
    idempotency_prefix: str = DEFAULT_KEY_PREFIX
    #: publish every scored transaction to the velocity stream (fraud.streaming)
    publish_transactions: bool = False
    #: probabilities from the model compiled to native code ("auto", predictor.compiled; XGBoost
    #: when it cannot be built) or from XGBoost ("off"); `python -m predictor` defaults to auto
    compiled_model: str = "off"
    #: private directory the compiled library is cached in (None: built at every load)
    compiled_model_cache: str | None = None

    @property
    def audit_enabled(self) -> bool:
        return bool(self.audit_spool)

    def resolved_audit_spool_sync(self) -> str:
        sync = self.audit_spool_sync or DEFAULT_AUDIT_SPOOL_SYNC
        return sync.strip().upper()

    def __post_init__(self) -> None:
        if self.model_variant not in MODEL_VARIANTS:
            raise ValueError(f"model_variant must be one of {MODEL_VARIANTS}, got {self.model_variant!r}")
        if self.audit_spool_max_records < 1:
            raise ValueError(f"audit_spool_max_records must be >= 1, got {self.audit_spool_max_records}")
        if self.audit_spool_sync is not None and self.audit_spool_sync.strip().upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"audit_spool_sync must be NORMAL or FULL, got {self.audit_spool_sync!r}")
        if self.audit_db_url and not self.audit_spool:
            raise ValueError("audit_db_url needs an audit spool (--audit-spool / FRAUD_AUDIT_SPOOL)")
        if self.idempotency not in IDEMPOTENCY_MODES:
            raise ValueError(f"idempotency must be one of {IDEMPOTENCY_MODES}, got {self.idempotency!r}")
        if self.idempotency_ttl_s <= 0:
            raise ValueError(f"idempotency_ttl_s must be > 0, got {self.idempotency_ttl_s}")
        if self.reason_codes not in REASON_CODE_POLICIES:
            raise ValueError(f"reason_codes must be one of {REASON_CODE_POLICIES}, got {self.reason_codes!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not (0.0 < self.audit_high_water <= 1.0) or self.audit_stall_seconds <= 0:
            raise ValueError("audit_high_water must be in (0, 1] and audit_stall_seconds > 0")
        if self.compiled_model not in COMPILED_POLICIES:
            raise ValueError(f"compiled_model must be one of {COMPILED_POLICIES}, got {self.compiled_model!r}")
        if self.nthread < 1:
            raise ValueError(f"nthread must be >= 1, got {self.nthread}")
        if self.micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be >= 1, got {self.micro_batch_rows}")
        if self.store_timeout_s <= 0:
            raise ValueError(f"store_timeout_s must be > 0, got {self.store_timeout_s}")
        if self.store_retry_after_s < 0:
            raise ValueError(f"store_retry_after_s must be >= 0, got {self.store_retry_after_s}")


def request_arrays(transactions: list[TransactionRequest]) -> tuple[np.ndarray, np.ndarray]:
    """The request fields the features are computed from: amounts [n] float64 and transaction
    times [n] as int64 UTC nanoseconds since the epoch (`tx_datetime` is tz-naive UTC)."""
    amount = np.fromiter((tx.tx_amount for tx in transactions), dtype=np.float64, count=len(transactions))
    when = np.array([tx.tx_datetime for tx in transactions], dtype="datetime64[ns]")
    return amount, when.view("int64")


@dataclass
class _PendingRequest:
    request: ParsedRequest
    future: asyncio.Future


class MicroBatcher:
    """Coalesces concurrent requests into one `score` call (natural batching).

    One scoring task takes the first waiting request and, without waiting any longer, every other
    request already queued (up to `max_rows` transactions), scores them together in a worker
    thread (one feature-store lookup, one XGBoost call for the lot) and hands each request its own
    rows. An idle server therefore adds no delay; under load the per-call overhead (lookup round
    trip, DataFrame assembly, XGBoost call) is shared by all requests that arrived meanwhile, and
    a single scoring thread avoids GIL contention between executor threads.
    """

    def __init__(
        self,
        score: Callable[[ParsedRequest], ScoredBatch],
        max_rows: int,
        on_scored: Callable[[list[ScoredBatch]], None] | None = None,
    ) -> None:
        """`on_scored` runs in the scoring thread after each batch, before any request is answered
        (the audit trail); if it raises, every request of the batch gets the error."""
        self._score = score
        self._max_rows = max_rows
        self._on_scored = on_scored
        self._queue: asyncio.Queue[_PendingRequest] | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        return self._queue

    async def submit(self, request: ParsedRequest) -> ScoredBatch:
        queue = self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        await queue.put(_PendingRequest(request, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None  # noqa: S101 - narrows the type: _ensure_started() set the queue
        queue = self._queue
        loop = asyncio.get_running_loop()
        carry: _PendingRequest | None = None
        while True:
            first = carry or await queue.get()
            carry = None
            pending = [first]
            rows = len(first.request.transactions)
            while not queue.empty():
                item = queue.get_nowait()
                if rows + len(item.request.transactions) > self._max_rows:
                    carry = item
                    break
                pending.append(item)
                rows += len(item.request.transactions)
            live = [item for item in pending if not item.future.done()]  # drop requests whose client left
            if not live:
                continue
            self.batches += 1
            try:
                results = await loop.run_in_executor(None, self._score_together, [item.request for item in live])
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the same error
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    def _score_together(self, requests: list[ParsedRequest]) -> list[ScoredBatch]:
        results = self._split_scores(requests)
        if self._on_scored is not None:
            self._on_scored(results)
        return results

    def _split_scores(self, requests: list[ParsedRequest]) -> list[ScoredBatch]:
        if len(requests) == 1:
            return [self._score(requests[0])]
        combined = ParsedRequest(requests[0].protocol, [tx for r in requests for tx in r.transactions])
        scored = self._score(combined)
        out: list[ScoredBatch] = []
        start = 0
        for request in requests:
            end = start + len(request.transactions)
            out.append(
                ScoredBatch(
                    request=request,
                    model_version=scored.model_version,
                    probabilities=scored.probabilities[start:end],
                    decisions=scored.decisions[start:end],
                    reason_codes=scored.reason_codes[start:end],
                    features_missing=scored.features_missing[start:end],
                    features_stale=scored.features_stale[start:end],
                    feature_matrix=scored.feature_matrix[start:end],
                    fail_open=scored.fail_open,
                )
            )
            start = end
        return out


class FraudModel(Model):
    def __init__(
        self,
        name: str,
        settings: PredictorSettings,
        feature_source: OnlineFeatureSource | None = None,
        authorizer: Authorizer | None = None,
    ):
        super().__init__(name)
        self.settings = settings
        #: who may score and who sees feature vectors (gRPC here; REST in predictor.edge.RequestGate)
        self.authorizer = authorizer or Authorizer()
        #: one answer per transaction id (None: off)
        self.ledger: MemoryLedger | RedisLedger | None = None
        self.feature_source = feature_source
        #: window states and stream of the velocity features (only with the Feast feature source)
        self.velocity: VelocitySource | None = None
        self.scorer: BundleScorer | None = None
        self.audit_spool: AuditSpool | None = None
        self.audit_writer: AuditWriter | None = None
        # serialises the room check and the append of one batch (executor threads when not coalescing)
        self._audit_lock = threading.Lock()
        # (monotonic time read, content) of stable_version_file, re-read at most every few seconds
        self._stable_version: tuple[float, str | None] = (-1e9, None)
        self.batcher = MicroBatcher(
            self.score_request, settings.micro_batch_rows, on_scored=self.audit if settings.audit_enabled else None
        )

    # --- lifecycle ---------------------------------------------------------------------------
    def load(self) -> bool:
        try:
            bundle_dir = resolve_bundle_dir(self.settings.bundle)
            key = self.settings.bundle_public_key
            verify_bundle(bundle_dir, load_public_key(Path(key)) if key else None)
            self.scorer = BundleScorer(
                bundle_dir,
                nthread=self.settings.nthread,
                compiled=self.settings.compiled_model,
                compiled_cache=Path(self.settings.compiled_model_cache) if self.settings.compiled_model_cache else None,
            )
        except BundleError as exc:
            raise ModelLoadError(f"cannot load model bundle from {self.settings.bundle}: {exc}") from None
        if self.settings.thresholds_dir:
            try:
                overrides = read_threshold_overrides(Path(self.settings.thresholds_dir))
            except BundleError as exc:
                raise ModelLoadError(f"cannot apply decision thresholds: {exc}") from None
            if overrides is not None:
                logger.info(
                    "decision thresholds from %s: %s (bundle: %s)",
                    self.settings.thresholds_dir,
                    overrides,
                    self.scorer.manifest.thresholds,
                )
                self.scorer.manifest = replace(self.scorer.manifest, thresholds=overrides)
        if self.feature_source is None:
            try:
                self.feature_source = FeastFeatureSource.connect(
                    self.settings.online_store, self.settings.store_retry_after_s, self.settings.store_timeout_s
                )
            except Exception as exc:  # a broken repo/config is fatal at start, unlike an outage later
                raise ModelLoadError(f"cannot open the Feast feature store: {type(exc).__name__}: {exc}") from exc
            try:
                self.velocity = VelocitySource.connect(
                    self.settings.online_store, self.settings.publish_transactions, self.settings.store_retry_after_s
                )
            except Exception as exc:
                raise ModelLoadError(f"cannot open the velocity window states: {type(exc).__name__}: {exc}") from exc
        self.warm_up()
        problem = self.online_store_problem()
        if problem:
            logger.error("online feature store not usable, not ready until it is repaired: %s", problem)
        self.open_ledger()
        self.open_audit_trail()
        self.ready = True
        logger.info(
            "loaded %s version %s (%s) from %s (feature source %s, %s, max batch %d, audit %s)",
            self.scorer.manifest.model_name,
            self.model_version,
            self.settings.model_variant,
            bundle_dir,
            self.feature_source.name,
            "fail-closed" if self.settings.fail_closed else "fail-open",
            self.settings.max_batch_size,
            self.audit_description(),
        )
        return self.ready

    def open_ledger(self) -> None:
        """The idempotency ledger the settings ask for (predictor.idempotency)."""
        mode = self.settings.idempotency
        if mode == "auto":
            mode = "redis" if self.settings.online_store == "redis" else "memory"
        if mode == "memory":
            self.ledger = MemoryLedger(self.settings.idempotency_ttl_s)
        elif mode == "redis":
            from fraud.feature_store import redis_connection_string

            self.ledger = RedisLedger.from_connection_string(
                redis_connection_string(),
                self.settings.idempotency_ttl_s,
                self.settings.idempotency_prefix,
                self.settings.store_timeout_s,
            )
        logger.info("idempotency ledger: %s", self.ledger.describe() if self.ledger else "off")

    def open_audit_trail(self) -> None:
        """Open the audit spool and, with an audit database URL, start the writer thread draining it."""
        if not self.settings.audit_enabled:
            return
        from fraud.audit import AuditSpool, AuditWriter
        from fraud.errors import UserError

        assert self.settings.audit_spool is not None  # noqa: S101 - narrows the type: audit_enabled implies a spool path
        try:
            self.audit_spool = AuditSpool(
                self.settings.audit_spool,
                max_records=self.settings.audit_spool_max_records,
                synchronous=self.settings.resolved_audit_spool_sync(),
            )
        except (sqlite3.Error, OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot open the audit spool {self.settings.audit_spool}: {exc}") from None
        if self.settings.audit_db_url:
            try:
                self.audit_writer = AuditWriter(self.audit_spool.path, db_url=self.settings.audit_db_url)
            except UserError as exc:
                self.close_audit_trail()
                raise ModelLoadError(f"cannot use the audit database: {exc}") from None
            self.audit_writer.start()

    def not_ready_reason(self) -> str | None:
        """Why the pod should be out of rotation, or None: the answer of every readiness surface
        (`/ready`, `/v2/health/ready`, `/v2/models/<name>/ready`, `/v1/models/<name>`, gRPC
        ServerReady / ModelReady; `predictor.server.ReadinessDataPlane`). Not KServe's `healthy()`:
        KServe checks that on every request and reloads the model when it is false, while a lost
        store or a growing audit backlog must only stop new traffic from arriving."""
        if not self.ready:
            return "model not loaded"
        return self.online_store_problem() or self.audit_backlog_problem()

    def online_store_problem(self) -> str | None:
        """Why the online store cannot serve the batch features (lost, emptied, never materialised),
        or None; sources without a health check (in-memory) have none."""
        check = getattr(self.feature_source, "problem", None)
        return check() if callable(check) else None

    def audit_backlog_problem(self) -> str | None:
        """Why the pod should leave rotation because of the audit spool, or None."""
        spool = self.audit_spool
        if spool is None:
            return None
        try:
            depth, oldest = spool.backlog()
        except sqlite3.Error as exc:
            return f"cannot read the audit spool {spool.path}: {exc}"
        high_water = self.settings.audit_high_water * spool.max_records
        if depth >= high_water:
            return f"audit spool holds {depth} decisions, above its high-water mark {high_water:.0f}"
        if oldest is not None and time.time() - oldest > self.settings.audit_stall_seconds:
            return (
                f"the oldest spooled decision waits {time.time() - oldest:.0f} s for the audit writer "
                f"(limit {self.settings.audit_stall_seconds:.0f} s)"
            )
        return None

    def audit_description(self) -> str:
        if self.audit_spool is None:
            return "off"
        drain = "writer thread" if self.audit_writer is not None else "sidecar writer"
        return f"spool {self.audit_spool.path} ({self.settings.resolved_audit_spool_sync()}, {drain})"

    def close_audit_trail(self) -> None:
        """Stop the writer (it flushes what the database accepts) and close the spool; idempotent."""
        writer, self.audit_writer = self.audit_writer, None
        if writer is not None:
            writer.stop()
            writer.close()
        spool, self.audit_spool = self.audit_spool, None
        if spool is not None:
            spool.close()

    def stop(self) -> None:
        self.close_audit_trail()
        super().stop()

    def warm_up(self) -> None:
        """One lookup and one scoring before the first request, so that it does not pay for lazy
        imports and connection set-up. An unreachable store is only logged (it may come back)."""
        assert self.scorer is not None and self.feature_source is not None  # noqa: S101 - narrows the type: called after load()
        try:
            self.feature_source.lookup(["__warm_up__"], ["__warm_up__"])
        except FeatureSourceUnavailable as exc:
            logger.warning("online feature store not reachable at start (serving degraded until it is): %s", exc)
        empty = FeatureLookup.empty(1)
        probe = model_feature_matrix(np.array([1.0]), np.array([0], dtype=np.int64), empty.values)
        self.scorer.score(probe, reason_codes=REASON_CODES_ALL)

    @property
    def model_version(self) -> str:
        return self.scorer.model_version if self.scorer is not None else "unloaded"

    def get_input_types(self) -> list[dict[str, Any]]:
        return input_metadata()

    def get_output_types(self) -> list[dict[str, Any]]:
        return output_metadata()

    # --- request handling --------------------------------------------------------------------
    async def __call__(
        self, body: Any, headers: dict[str, str] | None = None, verb: InferenceVerb = InferenceVerb.PREDICT
    ):
        """KServe's request path (V1/V2 REST through FastAPI, V2 gRPC)."""
        if REQUEST_SCOPES.get() is None:  # gRPC (REST requests were admitted by predictor.edge)
            REQUEST_SCOPES.set(self.authorizer.authorize(headers or {}, SCOPE_SCORE))
        _REQUEST_ARRIVAL.set((datetime.now(UTC), time.perf_counter()))
        with self.observe_request(request_protocol(body)):
            return await super().__call__(body, headers, verb)

    async def infer_parsed(self, protocol: str, parse: Callable[[], ParsedRequest]) -> ScoredBatch:
        """The fast REST path (`predictor.fast_rest`): validate with `parse` (InvalidInput -> 400) and
        score, with the same metrics, micro-batching and audit trail as `__call__`."""
        received_at, arrival = datetime.now(UTC), time.perf_counter()
        with self.observe_request(protocol):
            parsed = replace(parse(), received_at=received_at, arrival=arrival)
            return await self.predict(parsed)

    @contextlib.contextmanager
    def observe_request(self, protocol: str) -> Iterator[None]:
        """Request count, latency and error metrics by outcome around one request."""
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        except InvalidInput:
            outcome = "invalid_input"
            prometheus.ERRORS.labels("invalid_input").inc()
            raise
        except TransactionConflict:
            outcome = "conflict"
            prometheus.ERRORS.labels("conflict").inc()
            raise
        except ServerNotReady:
            outcome = "unavailable"
            raise
        except Exception:
            prometheus.ERRORS.labels("internal").inc()
            raise
        finally:
            prometheus.record_request(protocol, self.model_version, outcome, time.perf_counter() - started)

    def validate(self, payload: Any) -> Any:
        if isinstance(payload, ParsedRequest):
            return payload
        return super().validate(payload)

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> ParsedRequest:
        if isinstance(payload, InferRequest):
            parsed = parse_v2(payload, self.settings.max_batch_size)
        else:
            parsed = parse_v1(payload, self.settings.max_batch_size)
        received_at, arrival = _REQUEST_ARRIVAL.get() or (datetime.now(UTC), time.perf_counter())
        return replace(parsed, received_at=received_at, arrival=arrival)

    async def predict(
        self, payload: ParsedRequest, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> ScoredBatch:
        """Score `payload`; with a ledger, transactions answered before get their recorded answer and
        one with different content makes the request a 409 (predictor.idempotency)."""
        ledger = self.ledger
        if ledger is None:
            return await self.score_parsed(payload)
        ids = [tx.transaction_id for tx in payload.transactions]
        loop = asyncio.get_running_loop()
        try:
            recorded = await loop.run_in_executor(None, ledger.recall, ids) if ledger.blocking else ledger.recall(ids)
        except LedgerUnavailable as exc:
            self._ledger_down(exc)
            return await self.score_parsed(payload)
        hashes = check_request(payload.transactions, recorded)  # TransactionConflict: 409
        new = [i for i, row in enumerate(recorded) if row is None]
        if not new:
            prometheus.REPLAYED.inc(len(ids))
            return replayed_batch(payload, recorded)  # type: ignore[arg-type]
        fresh = (
            payload if len(new) == len(ids) else replace(payload, transactions=[payload.transactions[i] for i in new])
        )
        scored = await self.score_parsed(fresh)
        rows = recorded_rows(scored, [hashes[i] for i in new])
        new_ids = [ids[i] for i in new]
        try:
            if ledger.blocking:
                await loop.run_in_executor(None, ledger.record, new_ids, rows)
            else:
                ledger.record(new_ids, rows)
        except LedgerUnavailable as exc:
            self._ledger_down(exc)
        if len(new) == len(ids):
            return scored
        prometheus.REPLAYED.inc(len(ids) - len(new))
        return merged_batch(payload, recorded, scored)

    def _ledger_down(self, exc: LedgerUnavailable) -> None:
        prometheus.ERRORS.labels("idempotency_unavailable").inc()
        if self.settings.fail_closed:
            logger.error("idempotency ledger unavailable, refusing to score (fail-closed): %s", exc)
            raise OnlineStoreUnavailable("the idempotency ledger is unavailable and the predictor is fail-closed")
        logger.warning("idempotency ledger unavailable, scoring without the replay check: %s", exc)

    async def score_parsed(self, payload: ParsedRequest) -> ScoredBatch:
        # Feature lookup and scoring block (network I/O, XGBoost): off the event loop, in one
        # scoring thread that coalesces concurrent requests (MicroBatcher).
        if self.settings.micro_batch_rows <= 1:
            return await asyncio.get_running_loop().run_in_executor(None, self.score_and_audit, payload)
        return await self.batcher.submit(payload)

    def score_and_audit(self, request: ParsedRequest) -> ScoredBatch:
        """Score one request and, when auditing, spool its decisions (blocking: a worker thread)."""
        result = self.score_request(request)
        if self.settings.audit_enabled:
            self.audit([result])
        return result

    async def postprocess(self, result: ScoredBatch, headers: dict[str, str] | None = None, response_headers=None):
        include_features = SCOPE_DEBUG in (REQUEST_SCOPES.get() or ())
        if result.request.protocol == PROTOCOL_V1:
            return encode_v1(result, include_features)
        return encode_v2(result, self.name, include_features)

    # --- scoring -----------------------------------------------------------------------------
    def lookup_features(self, customer_ids: list[str], terminal_ids: list[str]) -> FeatureLookup:
        """One batched lookup for every row; the configured degraded mode on an outage."""
        source = self.feature_source
        assert source is not None, "load() first"  # noqa: S101 - narrows the type: set by load()
        started = time.perf_counter()
        try:
            lookup = source.lookup(customer_ids, terminal_ids)
        except FeatureSourceUnavailable as exc:
            prometheus.FEATURE_LOOKUP_LATENCY.labels(source.name, "unavailable").observe(time.perf_counter() - started)
            prometheus.ERRORS.labels("feature_store_unavailable").inc()
            if self.settings.fail_closed:
                prometheus.DEGRADED.labels("fail_closed").inc()
                logger.log(
                    logging.ERROR if exc.fresh else logging.DEBUG,
                    "online feature store unavailable, refusing to score (fail-closed): %s",
                    exc,
                )
                raise OnlineStoreUnavailable(
                    "online feature store unavailable and the predictor is fail-closed"
                ) from None
            prometheus.DEGRADED.labels("fail_open").inc()
            # one warning per failed attempt, not one per request while the store is marked down
            logger.log(
                logging.WARNING if exc.fresh else logging.DEBUG,
                "online feature store unavailable, scoring with cold-start defaults (fail-open): %s",
                exc,
            )
            return replace(FeatureLookup.empty(len(customer_ids)), fail_open=True)
        prometheus.FEATURE_LOOKUP_LATENCY.labels(source.name, "ok").observe(time.perf_counter() - started)
        return lookup

    def request_features(
        self, transactions: list[TransactionRequest]
    ) -> tuple[np.ndarray, np.ndarray, FeatureLookup, np.ndarray, np.ndarray]:
        """(amounts, transaction times in epoch ns, the online lookup with the views' TTL applied,
        [n] bool: rows whose snapshot expired, the model's feature matrix) of `transactions`: what
        scoring and explanations both compute."""
        amount, tx_epoch_ns = request_arrays(transactions)
        customer_ids, terminal_ids = [tx.customer_id for tx in transactions], [tx.terminal_id for tx in transactions]
        lookup, expired = self.lookup_features(customer_ids, terminal_ids).expire(tx_epoch_ns)
        velocity = self.velocity.features(tx_epoch_ns, customer_ids, terminal_ids) if self.velocity else None
        return amount, tx_epoch_ns, lookup, expired, model_feature_matrix(amount, tx_epoch_ns, lookup.values, velocity)

    def score_request(self, request: ParsedRequest) -> ScoredBatch:
        scorer = self.scorer
        assert scorer is not None, "load() first"  # noqa: S101 - narrows the type: set by load()
        transactions = request.transactions
        amount, tx_epoch_ns, lookup, expired, features = self.request_features(transactions)
        prometheus.record_snapshots(scorer.model_version, lookup.newest_snapshots(), int(expired.sum()))
        missing = lookup.missing
        stale = lookup.stale(tx_epoch_ns)
        result = scorer.score(features, reason_codes=self.settings.reason_codes)
        prometheus.record_scores(
            scorer.model_version,
            result.probabilities,
            result.decisions,
            int(missing.sum()),
            int(stale.sum()),
            [codes[0].feature for codes in result.reason_codes if codes],
        )
        if self.velocity is not None:
            self.velocity.publish(
                [
                    (tx.transaction_id, tx.customer_id, tx.terminal_id, float(a), int(t))
                    for tx, a, t in zip(transactions, amount, tx_epoch_ns, strict=True)
                ]
            )
        return ScoredBatch(
            request=request,
            model_version=scorer.model_version,
            probabilities=result.probabilities,
            decisions=result.decisions,
            reason_codes=result.reason_codes,
            features_missing=missing,
            features_stale=stale,
            feature_matrix=features,
            fail_open=lookup.fail_open,
        )

    # --- explanations ------------------------------------------------------------------------
    async def explain_parsed(self, protocol: str, parse: Callable[[], ParsedRequest]) -> Explanation:
        """`:explain` / `/explain` (predictor.explain): validate with `parse` (InvalidInput -> 400),
        compute the features as scoring does and explain every transaction; nothing is published to
        the velocity stream nor recorded in the idempotency ledger (an explanation is not a decision)."""
        if not self.ready:
            raise ServerNotReady("the model is not loaded")
        received_at, arrival = datetime.now(UTC), time.perf_counter()
        with self.observe_request(f"{protocol}-explain"):
            parsed = replace(parse(), received_at=received_at, arrival=arrival)
            return await asyncio.get_running_loop().run_in_executor(None, self.explain_request, parsed)

    def explain_request(self, request: ParsedRequest) -> Explanation:
        """Full TreeSHAP contributions (and bias) of every transaction of `request` (blocking)."""
        scorer = self.scorer
        assert scorer is not None, "load() first"  # noqa: S101 - narrows the type: set by load()
        _, tx_epoch_ns, lookup, _, features = self.request_features(request.transactions)
        result = scorer.score(features, reason_codes=REASON_CODES_FLAGGED)
        explanation = Explanation(
            batch=ScoredBatch(
                request=request,
                model_version=scorer.model_version,
                probabilities=result.probabilities,
                decisions=result.decisions,
                reason_codes=result.reason_codes,
                features_missing=lookup.missing,
                features_stale=lookup.stale(tx_epoch_ns),
                feature_matrix=features,
                fail_open=lookup.fail_open,
            ),
            contributions=scorer.contributions_with_bias(features),
            descriptions=[scorer.descriptions[name] for name in MODEL_FEATURES],
        )
        if self.settings.audit_enabled:
            self.audit_explanation(explanation)
        return explanation

    # --- audit trail -------------------------------------------------------------------------
    def audit(self, results: list[ScoredBatch]) -> None:
        """Spool every decision of `results` in one transaction, before any of them is answered.

        All or nothing: when the spool has no room for the whole batch nothing is appended and
        `AuditUnavailable` (503) is raised, as it is when the spool cannot be written.
        """
        spool = self.audit_spool
        if spool is None:
            raise AuditUnavailable("the audit trail is enabled but its spool is not open (model stopped?)")
        from fraud.audit import ScoredColumns, decision_payloads

        assert self.scorer is not None, "load() first"  # noqa: S101 - narrows the type: set by load()
        model_name = self.scorer.manifest.model_name
        now = time.perf_counter()
        payloads: list[str] = []
        for result in results:
            request = result.request
            received_at = request.received_at or datetime.now(UTC)
            latency_ms = (now - request.arrival) * 1000.0 if request.arrival is not None else 0.0
            columns = ScoredColumns(
                transaction_ids=[tx.transaction_id for tx in request.transactions],
                customer_ids=[tx.customer_id for tx in request.transactions],
                terminal_ids=[tx.terminal_id for tx in request.transactions],
                feature_names=MODEL_FEATURES,
                feature_matrix=result.feature_matrix,
                scores=result.probabilities,
                decisions=result.decisions,
                reason_codes=result.reason_codes,
                features_missing=result.features_missing,
                features_stale=result.features_stale,
                fail_open=result.fail_open,
                model_name=model_name,
                model_version=result.model_version,
                variant=self.variant_of(result.model_version),  # type: ignore[arg-type]
                received_at=received_at,
                latency_ms=latency_ms,
                thresholds=self.scorer.manifest.thresholds,
            )
            payloads += decision_payloads(columns)
        with self._audit_lock:
            try:
                room = spool.max_records - spool.depth()
                if len(payloads) > room:
                    self._refuse_audit(
                        f"the audit spool is full ({spool.max_records} decisions waiting for the writer)"
                    )
                appended = spool.append_payloads(payloads)
            except sqlite3.Error as exc:
                self._refuse_audit(f"cannot write the audit spool {spool.path}: {type(exc).__name__}: {exc}")
        if appended.dropped:
            # only possible when another process appends to the same spool concurrently
            logger.error(
                "audit spool %s refused %d of %d decisions of an unanswered batch; the %d accepted stay spooled",
                spool.path,
                appended.dropped,
                len(payloads),
                appended.accepted,
            )
            self._refuse_audit(f"the audit spool is full ({spool.max_records} decisions waiting for the writer)")

    def audit_explanation(self, explanation: Explanation) -> None:
        """Spool one explanation record per explained transaction (an explanation, not a decision),
        before the explanation is answered; AuditUnavailable (503) when the spool cannot take them."""
        spool = self.audit_spool
        if spool is None:
            raise AuditUnavailable("the audit trail is enabled but its spool is not open (model stopped?)")
        from fraud.audit import explanation_payloads

        assert self.scorer is not None, "load() first"  # noqa: S101 - narrows the type: set by load()
        batch = explanation.batch
        transactions = batch.request.transactions
        payloads = explanation_payloads(
            transaction_ids=[tx.transaction_id for tx in transactions],
            customer_ids=[tx.customer_id for tx in transactions],
            terminal_ids=[tx.terminal_id for tx in transactions],
            feature_names=MODEL_FEATURES,
            contributions=explanation.contributions,
            scores=batch.probabilities,
            decisions=batch.decisions,
            features_missing=batch.features_missing,
            features_stale=batch.features_stale,
            fail_open=batch.fail_open,
            model_name=self.scorer.manifest.model_name,
            model_version=batch.model_version,
            variant=self.variant_of(batch.model_version),  # type: ignore[arg-type]
            received_at=batch.request.received_at or datetime.now(UTC),
        )
        with self._audit_lock:
            try:
                if len(payloads) > spool.max_records - spool.depth():
                    self._refuse_audit(f"the audit spool is full ({spool.max_records} records waiting for the writer)")
                appended = spool.append_payloads(payloads)
            except sqlite3.Error as exc:
                self._refuse_audit(f"cannot write the audit spool {spool.path}: {type(exc).__name__}: {exc}")
        if appended.dropped:
            self._refuse_audit(f"the audit spool is full ({spool.max_records} records waiting for the writer)")

    def variant_of(self, model_version: str) -> str:
        """`stable` or `canary` for decisions of `model_version` (see PredictorSettings.stable_version_file)."""
        path = self.settings.stable_version_file
        if not path:
            return self.settings.model_variant
        read_at, stable = self._stable_version
        now = time.monotonic()
        if now - read_at > STABLE_VERSION_REFRESH_S:
            try:
                stable = Path(path).read_text().strip() or None
            except OSError:
                stable = None
            self._stable_version = (now, stable)
        if stable is None:
            return self.settings.model_variant
        return "stable" if model_version == stable else "canary"

    def _refuse_audit(self, detail: str) -> None:
        """Log `detail`; the answer (503) says only whether the spool is full or unwritable."""
        prometheus.ERRORS.labels("audit_unavailable").inc()
        logger.error("refusing to answer: %s", detail)
        public = "the audit spool is full" if "spool is full" in detail else "the audit spool cannot be written"
        raise AuditUnavailable(f"decisions not answered because they cannot be audited: {public}")
