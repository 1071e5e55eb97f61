"""`FraudModel`: the fraud detector as a KServe custom model.

Lifecycle (what KServe's ModelServer calls):

* `load()` - resolve and validate the serving bundle (local dir, /mnt/models, or MLflow URI), load
  the XGBoost booster with one thread, connect the online feature source. Raises `ModelLoadError`
  with a one-line reason; the entry point logs it and exits without ever becoming ready.
* `preprocess()` - V1 `instances` or a V2 `InferRequest` -> validated transactions (`ParsedRequest`);
  bad input -> `InvalidInput` (HTTP 400 / gRPC INVALID_ARGUMENT) naming field, row and reason.
* `predict()` - one batched online-store lookup for the whole request, `model_feature_frame`,
  XGBoost `inplace_predict` and `pred_contribs` reason codes (`ScoredBatch`).
* `postprocess()` - V1 `predictions` or a V2 `InferResponse` in the request's protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from kserve import Model
from kserve.errors import InvalidInput, ServerNotReady
from kserve.model import InferenceVerb
from kserve.protocol.infer_type import InferRequest

from fraud.bundle import BundleError
from fraud.features.definitions import model_feature_frame
from fraud.schema import CUSTOMER_ID, REQUEST_FIELDS, TERMINAL_ID, TX_AMOUNT, TX_DATETIME, TransactionRequest
from predictor import metrics
from predictor.codec import (
    PROTOCOL_V1,
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
from predictor.features import (
    BATCH_FEATURES,
    CUSTOMER_SNAPSHOT_COLUMN,
    TERMINAL_SNAPSHOT_COLUMN,
    FeastFeatureSource,
    FeatureLookup,
    FeatureSourceUnavailable,
    OnlineFeatureSource,
)
from predictor.scoring import KSERVE_MODEL_DIR, BundleScorer, resolve_bundle_dir

logger = logging.getLogger("kserve.fraud_predictor")

DEFAULT_MAX_BATCH_SIZE = 512


class ModelLoadError(RuntimeError):
    """The model cannot be made ready (bad bundle, unusable feature store configuration)."""


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

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.nthread < 1:
            raise ValueError(f"nthread must be >= 1, got {self.nthread}")
        if self.micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be >= 1, got {self.micro_batch_rows}")
        if self.store_timeout_s <= 0:
            raise ValueError(f"store_timeout_s must be > 0, got {self.store_timeout_s}")
        if self.store_retry_after_s < 0:
            raise ValueError(f"store_retry_after_s must be >= 0, got {self.store_retry_after_s}")


def transactions_frame(transactions: list[TransactionRequest]) -> pd.DataFrame:
    frame = pd.DataFrame([tx.model_dump() for tx in transactions], columns=list(REQUEST_FIELDS))
    frame[TX_AMOUNT] = frame[TX_AMOUNT].astype("float64")
    frame[TX_DATETIME] = pd.to_datetime(frame[TX_DATETIME]).astype("datetime64[ns]")
    return frame


def stale_mask(lookup: pd.DataFrame, tx_datetime: pd.Series) -> np.ndarray:
    """True where a known entity's snapshot is older than the transaction's (UTC) day."""
    tx_day = pd.to_datetime(tx_datetime).dt.normalize().reset_index(drop=True)
    stale = np.zeros(len(lookup), dtype=bool)
    for column in (CUSTOMER_SNAPSHOT_COLUMN, TERMINAL_SNAPSHOT_COLUMN):
        snapshot = lookup[column].reset_index(drop=True)
        stale |= (snapshot.notna() & (snapshot < tx_day)).to_numpy()
    return stale


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

    def __init__(self, score: "Callable[[ParsedRequest], ScoredBatch]", max_rows: int) -> None:
        self._score = score
        self._max_rows = max_rows
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
        assert self._queue is not None
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
            except Exception as exc:  # every request of the batch gets the same error
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(live, results):
                if not item.future.done():
                    item.future.set_result(result)

    def _score_together(self, requests: list[ParsedRequest]) -> list[ScoredBatch]:
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
                )
            )
            start = end
        return out


class FraudModel(Model):
    def __init__(self, name: str, settings: PredictorSettings, feature_source: OnlineFeatureSource | None = None):
        super().__init__(name)
        self.settings = settings
        self.feature_source = feature_source
        self.scorer: BundleScorer | None = None
        self.batcher = MicroBatcher(self.score_request, settings.micro_batch_rows)

    # --- lifecycle ---------------------------------------------------------------------------
    def load(self) -> bool:
        try:
            bundle_dir = resolve_bundle_dir(self.settings.bundle)
            self.scorer = BundleScorer(bundle_dir, nthread=self.settings.nthread)
        except BundleError as exc:
            raise ModelLoadError(f"cannot load model bundle from {self.settings.bundle}: {exc}") from None
        if self.feature_source is None:
            try:
                self.feature_source = FeastFeatureSource.connect(
                    self.settings.online_store, self.settings.store_retry_after_s, self.settings.store_timeout_s
                )
            except Exception as exc:  # a broken repo/config is fatal at start, unlike an outage later
                raise ModelLoadError(f"cannot open the Feast feature store: {type(exc).__name__}: {exc}") from exc
        self.warm_up()
        self.ready = True
        logger.info(
            "loaded %s version %s from %s (feature source %s, %s, max batch %d)",
            self.scorer.manifest.model_name,
            self.model_version,
            bundle_dir,
            self.feature_source.name,
            "fail-closed" if self.settings.fail_closed else "fail-open",
            self.settings.max_batch_size,
        )
        return self.ready

    def warm_up(self) -> None:
        """One lookup and one scoring before the first request, so that it does not pay for lazy
        imports and connection set-up. An unreachable store is only logged (it may come back)."""
        assert self.scorer is not None and self.feature_source is not None
        try:
            self.feature_source.lookup(["__warm_up__"], ["__warm_up__"])
        except FeatureSourceUnavailable as exc:
            logger.warning("online feature store not reachable at start (serving degraded until it is): %s", exc)
        probe = model_feature_frame(pd.DataFrame({TX_AMOUNT: [1.0], TX_DATETIME: [pd.Timestamp("2026-01-01")]}))
        self.scorer.score(probe)

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
        protocol = request_protocol(body)
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await super().__call__(body, headers, verb)
            outcome = "ok"
            return result
        except InvalidInput:
            outcome = "invalid_input"
            metrics.ERRORS.labels("invalid_input").inc()
            raise
        except ServerNotReady:
            outcome = "unavailable"
            raise
        except Exception:
            metrics.ERRORS.labels("internal").inc()
            raise
        finally:
            metrics.record_request(protocol, self.model_version, outcome, time.perf_counter() - started)

    def validate(self, payload: Any) -> Any:
        if isinstance(payload, ParsedRequest):
            return payload
        return super().validate(payload)

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> ParsedRequest:
        if isinstance(payload, InferRequest):
            return parse_v2(payload, self.settings.max_batch_size)
        return parse_v1(payload, self.settings.max_batch_size)

    async def predict(
        self, payload: ParsedRequest, headers: dict[str, str] | None = None, response_headers: dict | None = None
    ) -> ScoredBatch:
        # Feature lookup and scoring block (network I/O, XGBoost): off the event loop, in one
        # scoring thread that coalesces concurrent requests (MicroBatcher).
        if self.settings.micro_batch_rows <= 1:
            return await asyncio.get_running_loop().run_in_executor(None, self.score_request, payload)
        return await self.batcher.submit(payload)

    async def postprocess(self, result: ScoredBatch, headers: dict[str, str] | None = None, response_headers=None):
        if result.request.protocol == PROTOCOL_V1:
            return encode_v1(result)
        return encode_v2(result, self.name)

    # --- scoring -----------------------------------------------------------------------------
    def lookup_features(self, frame: pd.DataFrame) -> FeatureLookup:
        """One batched lookup for every row; the configured degraded mode on an outage."""
        source = self.feature_source
        assert source is not None, "load() first"
        started = time.perf_counter()
        try:
            lookup = source.lookup(frame[CUSTOMER_ID].tolist(), frame[TERMINAL_ID].tolist())
        except FeatureSourceUnavailable as exc:
            metrics.FEATURE_LOOKUP_LATENCY.labels(source.name, "unavailable").observe(time.perf_counter() - started)
            metrics.ERRORS.labels("feature_store_unavailable").inc()
            if self.settings.fail_closed:
                metrics.DEGRADED.labels("fail_closed").inc()
                logger.log(
                    logging.ERROR if exc.fresh else logging.DEBUG,
                    "online feature store unavailable, refusing to score (fail-closed): %s",
                    exc,
                )
                raise OnlineStoreUnavailable(
                    f"online feature store unavailable and the predictor is fail-closed: {exc}"
                ) from None
            metrics.DEGRADED.labels("fail_open").inc()
            # one warning per failed attempt, not one per request while the store is marked down
            logger.log(
                logging.WARNING if exc.fresh else logging.DEBUG,
                "online feature store unavailable, scoring with cold-start defaults (fail-open): %s",
                exc,
            )
            return FeatureLookup.empty(len(frame))
        metrics.FEATURE_LOOKUP_LATENCY.labels(source.name, "ok").observe(time.perf_counter() - started)
        return lookup

    def score_request(self, request: ParsedRequest) -> ScoredBatch:
        scorer = self.scorer
        assert scorer is not None, "load() first"
        frame = transactions_frame(request.transactions)
        lookup = self.lookup_features(frame).frame
        batch = lookup[list(BATCH_FEATURES)]
        missing = batch.isna().any(axis=1).to_numpy()
        stale = stale_mask(lookup, frame[TX_DATETIME])
        features = model_feature_frame(pd.concat([frame[[TX_AMOUNT, TX_DATETIME]], batch], axis=1))
        result = scorer.score(features)

        version = scorer.model_version
        metrics.TRANSACTIONS.labels(version).inc(len(frame))
        metrics.FEATURES_MISSING.labels(version).inc(int(missing.sum()))
        metrics.FEATURES_STALE.labels(version).inc(int(stale.sum()))
        for probability, decision in zip(result.probabilities, result.decisions):
            metrics.SCORES.labels(version).observe(float(probability))
            metrics.DECISIONS.labels(version, decision).inc()
        return ScoredBatch(
            request=request,
            model_version=version,
            probabilities=result.probabilities,
            decisions=result.decisions,
            reason_codes=result.reason_codes,
            features_missing=missing,
            features_stale=stale,
            feature_matrix=features.to_numpy(dtype=np.float64),
        )
