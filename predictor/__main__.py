"""`python -m predictor`: the fraud detector's KServe model server.

KServe's own arguments (`--model_name`, `--http_port`, `--grpc_port`, `--workers`, ...) come from
`kserve.model_server.parser`; this module adds the predictor's own. A bundle that cannot be loaded
is reported on one log line and the process exits with status 1 before opening any port, so the
InferenceService never becomes ready (no traceback loop).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import model_server
from kserve.logging import KSERVE_TRACE_LOGGER_NAME, logger

from fraud.settings import Settings, SettingsError
from predictor.auth import Authorizer, TokenFileError
from predictor.compiled import COMPILED_AUTO, COMPILED_POLICIES, DEFAULT_CACHE_DIR
from predictor.edge import DEFAULT_MAX_BODY_BYTES, RequestGate
from predictor.explain import ExplainRoutes
from predictor.fast_rest import FastScoringRoutes
from predictor.features import OnlineFeatureSource
from predictor.idempotency import DEFAULT_KEY_PREFIX, DEFAULT_TTL_S
from predictor.model import (
    DEFAULT_AUDIT_SPOOL_MAX_RECORDS,
    DEFAULT_AUDIT_SPOOL_SYNC,
    DEFAULT_MAX_BATCH_SIZE,
    IDEMPOTENCY_MODES,
    MODEL_VARIANTS,
    FraudModel,
    ModelLoadError,
    PredictorSettings,
)
from predictor.scoring import REASON_CODE_POLICIES
from predictor.server import LOOPBACK, EdgeModelServer, ReadinessDataPlane

EXIT_LOAD_FAILED = 1


#: GIL switch interval of the server process (CPython's default: 5 ms)
GIL_SWITCH_INTERVAL_S = 0.001


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """The options; their defaults come from the platform settings (`settings`, else the process
    environment's), so each setting keeps its one environment variable name."""
    settings = settings or Settings.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m predictor",
        description="Serve the fraud detector with KServe (V1 REST, V2 REST and V2 gRPC).",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default=LOOPBACK,
        help="address the HTTP and gRPC servers bind (loopback by default; in a pod: 0.0.0.0)",
    )
    parser.add_argument(
        "--token-file",
        dest="token_file",
        default=None,
        help="bearer tokens with their scopes, one `<token> <scope>[,<scope>...]` per line (scopes: score, "
        "explain, debug); scoring then needs `Authorization: Bearer <token>` (401/403 otherwise)",
    )
    parser.add_argument(
        "--trust-scope-header",
        dest="trust_scope_header",
        action="store_true",
        help="take the caller's scopes from the x-fraud-scopes header set by the mesh from the validated JWT; "
        "only where nothing but the mesh can reach the server",
    )
    parser.add_argument(
        "--max-body-bytes",
        dest="max_body_bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body (HTTP 413 above) and gRPC message accepted",
    )
    parser.add_argument(
        "--bundle",
        default=str(settings.bundle),
        help=(
            "serving bundle: a local directory, KServe's /mnt/models, "
            "or an MLflow URI (models:/fraud-detector@champion)"
        ),
    )
    parser.add_argument(
        "--online-store",
        dest="online_store",
        choices=["sqlite", "redis"],
        default=settings.feast_online,
        help="Feast online store kind (default: the feature repository's configuration)",
    )
    parser.add_argument(
        "--fail-closed",
        dest="fail_closed",
        action="store_true",
        help="answer HTTP 503 while the online store is unreachable (default: fail-open, score with defaults)",
    )
    parser.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    parser.add_argument(
        "--micro-batch-rows",
        dest="micro_batch_rows",
        type=int,
        default=1024,
        help="most transactions scored together when concurrent requests are coalesced (1 disables coalescing)",
    )
    parser.add_argument("--nthread", type=int, default=1, help="XGBoost threads per server process")
    parser.add_argument(
        "--compiled-model",
        dest="compiled_model",
        choices=list(COMPILED_POLICIES),
        default=COMPILED_AUTO,
        help="auto: probabilities from the model compiled to native code at load (checked equal to XGBoost's; "
        "XGBoost if it cannot be built); off: XGBoost",
    )
    parser.add_argument(
        "--compiled-model-cache",
        dest="compiled_model_cache",
        default=str(DEFAULT_CACHE_DIR),
        help="private directory the compiled model is cached in ('' builds it at every load)",
    )
    parser.add_argument(
        "--store-retry-after",
        dest="store_retry_after",
        type=float,
        default=5.0,
        help="seconds an unreachable online store is treated as down before it is tried again",
    )
    parser.add_argument(
        "--store-timeout",
        dest="store_timeout",
        type=float,
        default=1.0,
        help="longest wait (seconds) for one online-store lookup before the degraded mode applies",
    )
    parser.add_argument(
        "--audit-spool",
        dest="audit_spool",
        default=_text(settings.audit_spool),
        help="audit spool file: every decision is appended to it before the response (503 if it cannot be); "
        "default FRAUD_AUDIT_SPOOL, else auditing is off",
    )
    parser.add_argument(
        "--audit-db-url",
        dest="audit_db_url",
        default=settings.audit_db_url,
        help="audit database drained by a writer thread in this process (default FRAUD_AUDIT_DB_URL; "
        "without it a sidecar `fraud audit writer` must drain the spool)",
    )
    parser.add_argument(
        "--thresholds-dir",
        dest="thresholds_dir",
        default=_text(settings.thresholds_dir),
        help="folder with `review` and `decline` files (a mounted ConfigMap) overriding the bundle's decision "
        "thresholds; ignored when it does not exist (default: FRAUD_THRESHOLDS_DIR)",
    )
    parser.add_argument(
        "--audit-spool-max-records",
        dest="audit_spool_max_records",
        type=int,
        default=DEFAULT_AUDIT_SPOOL_MAX_RECORDS,
        help="decisions the spool holds at most; beyond, requests are refused with 503",
    )
    parser.add_argument(
        "--stable-version-file",
        dest="stable_version_file",
        default=_text(settings.stable_version_file),
        help="file naming the stable model version (a mounted ConfigMap): decisions of other versions are "
        "recorded as canary (default FRAUD_STABLE_VERSION_FILE)",
    )
    parser.add_argument(
        "--bundle-public-key",
        dest="bundle_public_key",
        default=_text(settings.bundle_public_key),
        help="Ed25519 public key (PEM) the bundle's bundle.sig must verify with (default FRAUD_BUNDLE_PUBLIC_KEY)",
    )
    parser.add_argument(
        "--model-variant",
        dest="model_variant",
        choices=list(MODEL_VARIANTS),
        default=settings.model_variant,
        help="deployment variant recorded on every audited decision (default FRAUD_MODEL_VARIANT, else stable)",
    )
    parser.add_argument(
        "--reason-codes",
        dest="reason_codes",
        choices=list(REASON_CODE_POLICIES),
        default=settings.reason_codes,
        help="which transactions get SHAP reason codes: flagged (review/decline; exact TreeSHAP costs ~40x a "
        "prediction) or all (default FRAUD_REASON_CODES, else flagged)",
    )
    parser.add_argument(
        "--idempotency",
        choices=list(IDEMPOTENCY_MODES),
        default="auto",
        help="one answer per transaction id: a replay gets the recorded answer, other content 409. auto: Redis "
        "(shared by replicas) with --online-store redis, else in-process",
    )
    parser.add_argument(
        "--idempotency-ttl",
        dest="idempotency_ttl",
        type=float,
        default=DEFAULT_TTL_S,
        help="seconds a transaction id stays in the idempotency ledger",
    )
    parser.add_argument(
        "--idempotency-prefix",
        dest="idempotency_prefix",
        default=DEFAULT_KEY_PREFIX,
        help="Redis key prefix of the idempotency ledger",
    )
    parser.add_argument(
        "--rest-fast-path",
        dest="rest_fast_path",
        type=_boolean,
        default=True,
        help="answer V1 predict / V2 infer JSON requests without FastAPI's request models (predictor/fast_rest.py); "
        "false: every request through KServe's FastAPI handlers",
    )
    parser.add_argument(
        "--access-log",
        dest="access_log",
        type=_boolean,
        default=False,
        help="uvicorn's one line per request (off by default: at thousands of requests per second it costs ~10%% of "
        "the CPU; the audit trail records every decision and the mesh/ingress logs access)",
    )
    parser.add_argument(
        "--publish-transactions",
        dest="publish_transactions",
        type=_boolean,
        default=settings.stream_publish,
        help="XADD every scored transaction to the velocity stream (FRAUD_STREAM_* settings) that the aggregator "
        "consumes (default FRAUD_STREAM_PUBLISH, else false)",
    )
    # KServe logs one INFO line per request with its stage latencies by default; at hundreds of
    # requests per second that logging costs ~10% of the server's CPU (benchmarks/bench_scoring.py,
    # docs/performance.md). The same latencies are in the Prometheus histograms; opt back in with
    # --enable_latency_logging true.
    parser.set_defaults(enable_latency_logging=False)
    # settings without an option of their own, carried to settings_from_args
    parser.set_defaults(audit_spool_sync=settings.audit_spool_sync or DEFAULT_AUDIT_SPOOL_SYNC)
    return parser


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def quiet_request_path_logging(latency_logging: bool, access_log: bool) -> None:
    """KServe's timing middleware logs two INFO lines per request on `kserve.trace` whatever
    --enable_latency_logging says, and uvicorn one access line: silence them unless asked for (call
    after KServe configured logging)."""
    if not latency_logging:
        logging.getLogger(KSERVE_TRACE_LOGGER_NAME).setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


async def malformed_request_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """V2 bodies that are not valid JSON or not an inference request: HTTP 400 (as the Open Inference
    Protocol asks for a bad request) rather than FastAPI's default 422."""
    problems = []
    for error in exc.errors()[:5]:  # the first few: an answer never grows with the request
        where = ".".join(str(part) for part in error.get("loc", ()))
        detail = (error.get("ctx") or {}).get("error")
        problems.append(f"{where}: {error.get('msg', 'invalid')}" + (f" ({detail})" if detail else ""))
    return JSONResponse(status_code=400, content={"error": "malformed request: " + "; ".join(problems)[:500]})


#: The readiness probe of the manifests: answered by the one readiness decision behind every
#: readiness surface (`predictor.server.ReadinessDataPlane`: loaded, the online store usable, the
#: audit spool draining), as are `/v2/health/ready`, `/v2/models/<name>/ready`, `/v1/models/<name>`
#: and gRPC ServerReady / ModelReady
READINESS_PATH = "/ready"


def readiness_endpoint(dataplane: ReadinessDataPlane) -> Callable[[], Awaitable[JSONResponse]]:
    """GET /ready: 200 `{"ready": true}` while the pod may take traffic, 503 `{"ready": false}`
    (the reason logged by the data plane, not returned) when it should leave rotation."""

    async def ready() -> JSONResponse:
        if await dataplane.ready():
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=503)

    return ready


def settings_from_args(args: argparse.Namespace) -> PredictorSettings:
    """The model's settings from parsed options (ValueError for an invalid combination)."""
    return PredictorSettings(
        bundle=args.bundle,
        online_store=args.online_store,
        fail_closed=args.fail_closed,
        max_batch_size=args.max_batch_size,
        nthread=args.nthread,
        micro_batch_rows=args.micro_batch_rows,
        store_retry_after_s=args.store_retry_after,
        store_timeout_s=args.store_timeout,
        audit_spool=args.audit_spool,
        audit_db_url=args.audit_db_url,
        model_variant=args.model_variant,
        audit_spool_sync=args.audit_spool_sync,
        audit_spool_max_records=args.audit_spool_max_records,
        thresholds_dir=args.thresholds_dir,
        reason_codes=args.reason_codes,
        bundle_public_key=args.bundle_public_key,
        stable_version_file=args.stable_version_file,
        idempotency=args.idempotency,
        idempotency_ttl_s=args.idempotency_ttl,
        idempotency_prefix=args.idempotency_prefix,
        publish_transactions=args.publish_transactions,
        compiled_model=args.compiled_model,
        compiled_model_cache=args.compiled_model_cache or None,
    )


def main(
    argv: list[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    feature_source_factory: Callable[[argparse.Namespace], OnlineFeatureSource] | None = None,
) -> int:
    """Run the predictor server. `parser` may extend `build_parser()`; `feature_source_factory` builds
    a feature source from the parsed options in place of the Feast online store (the benchmarks
    serve the model alone with an in-memory source)."""
    try:
        platform = Settings.from_env()  # the one read of the environment
    except SettingsError as exc:
        print(f"python -m predictor: {exc}", file=sys.stderr)
        return 2
    args = (parser or build_parser(platform)).parse_args(argv)
    feature_source = feature_source_factory(args) if feature_source_factory else None
    if args.audit_db_url and not args.audit_spool:
        if any(arg.startswith("--audit-db-url") for arg in (sys.argv[1:] if argv is None else argv)):
            print("python -m predictor: --audit-db-url needs --audit-spool (or FRAUD_AUDIT_SPOOL)", file=sys.stderr)
            return 2
        args.audit_db_url = None  # FRAUD_AUDIT_DB_URL alone (e.g. meant for a sidecar) does not enable auditing
    if args.workers != 1:
        # KServe's multi-process REST server spawns workers that re-import and unpickle the model and
        # kills any that does not answer its liveness ping within 5 s; this model's imports (Feast,
        # XGBoost, pandas) exceed that on small nodes, so workers are killed in a loop. Scale out
        # with replicas instead (one process per pod, --nthread 1).
        print("python -m predictor: --workers must be 1; scale with replicas instead", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        authorizer = Authorizer.from_options(args.token_file, args.trust_scope_header)
    except (ValueError, TokenFileError) as exc:
        print(f"python -m predictor: {exc}", file=sys.stderr)
        return 2
    if args.max_body_bytes < 1024:
        print(f"python -m predictor: --max-body-bytes must be >= 1024, got {args.max_body_bytes}", file=sys.stderr)
        return 2
    server = EdgeModelServer(
        host=args.host,
        max_body_bytes=args.max_body_bytes,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
    )
    model = FraudModel(args.model_name, settings, feature_source=feature_source, authorizer=authorizer)
    try:
        model.load()
    except ModelLoadError as exc:
        logger.error("predictor not ready: %s", exc)
        return EXIT_LOAD_FAILED
    model_server.app.add_exception_handler(RequestValidationError, malformed_request_handler)
    model_server.app.add_api_route(READINESS_PATH, readiness_endpoint(server.dataplane), methods=["GET"])
    if args.rest_fast_path:
        model_server.app.add_middleware(FastScoringRoutes, model=model)
    # V1 :explain and V2 /explain (predictor.explain), behind the gate that checks the explain scope
    model_server.app.add_middleware(ExplainRoutes, model=model)
    # outermost of this module's middlewares: credentials and the body cap before any other work
    model_server.app.add_middleware(RequestGate, authorizer=authorizer, max_body_bytes=args.max_body_bytes)
    logger.info(
        "authentication: %s; listening on %s; body cap %d bytes", authorizer.describe(), args.host, args.max_body_bytes
    )
    quiet_request_path_logging(args.enable_latency_logging, args.access_log)
    # Everything loaded so far (KServe, Feast, XGBoost, pandas, the model) lives as long as the
    # process: keep it out of the cyclic garbage collector, whose full collections over those
    # ~270,000 objects took ~140 ms each - the predictor's p99 spikes under load (docs/performance.md).
    gc.freeze()
    # Background threads (audit writer, drift tests) run Python for several ms at a time; with the
    # default 5 ms GIL switch interval a request arriving meanwhile waits that long for the event
    # loop. 1 ms bounds that wait (docs/performance.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
