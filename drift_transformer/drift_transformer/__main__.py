"""`python -m drift_transformer`: the fraud detector's KServe transformer with drift monitoring.

KServe's own arguments (`--model_name`, `--predictor_host`, `--protocol`/`--predictor_protocol`,
`--http_port`, `--grpc_port`, `--predictor_request_timeout_seconds`, ...) come from
`kserve.model_server.parser`; this module adds the bundle and the drift-monitor options. A bundle
that cannot be read is reported on one line and the process exits with status 1 before opening
any port.

Request-path logging is off by default: KServe's per-request `kserve.trace` lines (stage latencies
and the timing middleware's wall/CPU times) come back with `--enable_latency_logging true`, uvicorn's
access-log line with `--access-log true`. The same latencies are in the Prometheus metrics.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import warnings
from pathlib import Path

from kserve import PredictorConfig, model_server
from kserve.logging import KSERVE_TRACE_LOGGER_NAME, configure_logging, logger
from kserve.utils.utils import strtobool

from drift_transformer.auth import Authorizer, TokenFileError
from drift_transformer.drift import (
    DEFAULT_ONLINE_FEATURES,
    DriftConfigError,
    DriftMonitor,
    DriftReference,
    MonitorConfig,
)
from drift_transformer.edge import DEFAULT_MAX_BODY_BYTES, RequestGate
from drift_transformer.passthrough import PassThroughRoutes
from drift_transformer.server import LOOPBACK, EdgeModelServer
from drift_transformer.settings import SettingsError, TransformerSettings
from drift_transformer.transformer import (
    PROTOCOL_GRPC_V2,
    DriftTransformer,
    ModelReadyDataPlane,
    NotReadyAnswerFilter,
    install_exception_handlers,
)

EXIT_CONFIG_INVALID = 1


#: GIL switch interval of the server process (CPython's default: 5 ms)
GIL_SWITCH_INTERVAL_S = 0.001


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser(settings: TransformerSettings | None = None) -> argparse.ArgumentParser:
    """The options; defaults of the platform settings come from `settings` (else the environment's)."""
    settings = settings or TransformerSettings.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m drift_transformer",
        description="KServe transformer forwarding to the fraud predictor and detecting feature drift (Alibi Detect).",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # a scoring call that takes this long is broken; KServe's default (600 s) would hold clients far too long
    parser.set_defaults(predictor_request_timeout_seconds=30)
    # KServe writes per-request INFO lines (stage latencies; wall and CPU time of every route) by
    # default: at hundreds of requests per second that is real CPU on the request path. The same
    # latencies are in the Prometheus histograms; opt back in with --enable_latency_logging true.
    parser.set_defaults(enable_latency_logging=False)
    parser.add_argument(
        "--access-log",
        type=strtobool,
        default=False,
        help="log one uvicorn access line per HTTP request (INFO)",
    )
    parser.add_argument(
        "--host",
        default=LOOPBACK,
        help="address the HTTP and gRPC servers bind (loopback by default; in a pod: 0.0.0.0)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="bearer tokens with their scopes, one `<token> <scope>[,<scope>...]` per line (scopes: score, "
        "explain, debug); scoring then needs `Authorization: Bearer <token>` (401/403 otherwise)",
    )
    parser.add_argument(
        "--trust-scope-header",
        action="store_true",
        help="take the caller's scopes from the x-fraud-scopes header set by the mesh from the validated JWT; "
        "only where nothing but the mesh can reach the server",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body (HTTP 413 above) and gRPC message accepted",
    )
    parser.add_argument(
        "--predictor-token-file",
        default=None,
        help="file holding the bearer token the transformer sends to the predictor (a token the predictor's "
        "--token-file grants `score,debug`); the client's own Authorization is never forwarded",
    )
    defaults = MonitorConfig()
    parser.add_argument(
        "--bundle",
        default=str(settings.bundle),
        help="serving bundle directory (bundle.json + reference_features.npy)",
    )
    parser.add_argument(
        "--predictor-rest-host",
        default=None,
        help="HOST:PORT of the predictor's REST server, for V1 requests and explanations when V2 requests go "
        "to it over gRPC (--protocol grpc-v2: --predictor_host is then its gRPC port); default: --predictor_host",
    )
    parser.add_argument(
        "--predictor-connect-timeout-seconds",
        type=float,
        default=2.0,
        help="time-out for opening a connection to the predictor",
    )
    parser.add_argument(
        "--drift-window-size", type=int, default=defaults.window_size, help="vectors per batch-test window"
    )
    parser.add_argument("--drift-p-val", type=float, default=defaults.p_val, help="per-feature test significance level")
    parser.add_argument(
        "--drift-correction",
        choices=["bonferroni", "fdr"],
        default=defaults.correction,
        help="multiple-testing correction",
    )
    parser.add_argument(
        "--online-features",
        type=_names,
        default=DEFAULT_ONLINE_FEATURES,
        help="comma-separated numeric features watched by the online CVM detector",
    )
    parser.add_argument(
        "--online-ert",
        type=float,
        default=defaults.online_ert,
        help="expected run time (vectors) between false alarms of the online detector; 0 disables it",
    )
    parser.add_argument(
        "--online-window-sizes", type=_sizes, default=defaults.online_window_sizes, help="comma-separated window sizes"
    )
    parser.add_argument(
        "--online-bootstraps",
        type=int,
        default=None,
        help="simulations to configure the online thresholds (default: 10%% above the minimum for ert/windows)",
    )
    parser.add_argument(
        "--drift-queue-capacity",
        type=int,
        default=defaults.queue_capacity,
        help="batches held between the request path and the drift worker before new ones are dropped",
    )
    parser.add_argument(
        "--online-max-vectors-per-second",
        type=float,
        default=defaults.online_max_vectors_per_second,
        help="most vectors per second fed to the online detector (each costs 0.3-1.2 ms of CPU, docs/performance.md); "
        "the rest are skipped and counted in fraud_drift_online_vectors_skipped_total (the batch detector sees all). "
        "0: no limit",
    )
    parser.add_argument(
        "--drift-window-max-vectors-per-second",
        type=float,
        default=defaults.window_max_vectors_per_second,
        help="most vectors per second put into the batch detector's windows (a window test costs ~7-15 ms); above "
        "it the windows hold an even sample of the traffic, the rest is counted in "
        "fraud_drift_window_vectors_skipped_total. 0: no limit",
    )
    parser.add_argument(
        "--rest-fast-path",
        type=strtobool,
        default=True,
        help="forward V1 predict / V2 infer JSON requests to the predictor as bytes and return its answer unchanged "
        "(drift_transformer/passthrough.py); false: every request through KServe's handlers",
    )
    return parser


def read_predictor_token(path: str | None) -> str | None:
    """The token in `--predictor-token-file` (its first non-empty line); TokenFileError if unusable."""
    if not path:
        return None
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"--predictor-token-file {path}: cannot read it ({exc})") from None
    if not lines or " " in lines[0]:
        raise TokenFileError(f"--predictor-token-file {path}: expected one token on its first line")
    return lines[0]


def predictor_protocol(args: argparse.Namespace, argv: list[str]) -> str:
    """`--predictor_protocol` when given, else the older `--protocol` (both are KServe's)."""
    if any(arg == "--predictor_protocol" or arg.startswith("--predictor_protocol=") for arg in argv):
        return args.predictor_protocol
    return args.protocol


def setup_logging(args: argparse.Namespace) -> None:
    """KServe's logging configuration, set up before the drift worker starts, and shared by this package."""
    if args.configure_logging and not logger.handlers:
        configure_logging(args.log_config_file)  # what ModelServer would do later; it then leaves it alone
    package_logger = logging.getLogger("drift_transformer")
    if logger.handlers and not package_logger.handlers:
        for handler in logger.handlers:
            package_logger.addHandler(handler)
        package_logger.setLevel(logger.level or logging.INFO)
        package_logger.propagate = False
    logger.addFilter(NotReadyAnswerFilter())


def quiet_request_path_logging(latency_logging: bool, access_log: bool) -> None:
    """Silence the per-request log lines unless asked for (call after KServe configured logging)."""
    if not latency_logging:
        # KServe's timing middleware logs two INFO lines per request on this logger, whatever
        # --enable_latency_logging says; the model's own latency line goes there too
        logging.getLogger(KSERVE_TRACE_LOGGER_NAME).setLevel(logging.WARNING)
    if not access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # KServe 0.20's routes use FastAPI's deprecated ORJSONResponse; the warning is printed per request
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = TransformerSettings.from_env()  # the one read of the environment
    except SettingsError as exc:
        print(f"python -m drift_transformer: {exc}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    setup_logging(args)
    if args.workers != 1:
        print(
            "python -m drift_transformer: --workers must be 1 (the drift windows live in one process)", file=sys.stderr
        )
        return 2
    if not args.predictor_host:
        print("python -m drift_transformer: --predictor_host HOST:PORT is required", file=sys.stderr)
        return 2
    try:
        authorizer = Authorizer.from_options(args.token_file, args.trust_scope_header)
        predictor_token = read_predictor_token(args.predictor_token_file)
    except TokenFileError as exc:
        print(f"python -m drift_transformer: {exc}", file=sys.stderr)
        return 2
    if args.max_body_bytes < 1024:
        print(
            f"python -m drift_transformer: --max-body-bytes must be >= 1024, got {args.max_body_bytes}", file=sys.stderr
        )
        return 2
    try:
        config = MonitorConfig(
            window_size=args.drift_window_size,
            p_val=args.drift_p_val,
            correction=args.drift_correction,
            online_features=tuple(args.online_features),
            online_ert=args.online_ert,
            online_window_sizes=tuple(args.online_window_sizes),
            online_bootstraps=args.online_bootstraps,
            queue_capacity=args.drift_queue_capacity,
            online_max_vectors_per_second=args.online_max_vectors_per_second,
            window_max_vectors_per_second=args.drift_window_max_vectors_per_second,
        )
        reference = DriftReference.from_bundle(args.bundle)
        monitor = DriftMonitor(reference, config)
    except DriftConfigError as exc:
        logger.error("drift transformer not ready: %s", exc)
        return EXIT_CONFIG_INVALID
    protocol = predictor_protocol(args, argv)
    predictor_config = PredictorConfig(
        predictor_host=args.predictor_host,
        predictor_protocol=protocol,
        predictor_use_ssl=args.predictor_use_ssl,
        predictor_request_timeout_seconds=args.predictor_request_timeout_seconds,
        predictor_request_retries=0,
        predictor_health_check=args.enable_predictor_health_check,
    )
    predictor_rest_url = predictor_config.predictor_base_url
    if args.predictor_rest_host:
        scheme = "https" if args.predictor_use_ssl else "http"
        predictor_rest_url = f"{scheme}://{args.predictor_rest_host}"
    transformer = DriftTransformer(
        args.model_name,
        monitor,
        predictor_protocol=protocol,
        connect_timeout=args.predictor_connect_timeout_seconds,
        request_timeout=float(args.predictor_request_timeout_seconds),
        authorizer=authorizer,
        predictor_token=predictor_token,
        predictor_rest_url=predictor_rest_url,
    )
    transformer.load()
    logger.info(
        "drift transformer for %s version %s: predictor %s (%s), %d features, window %d",
        reference.model_name,
        reference.model_version,
        args.predictor_host,
        protocol,
        reference.n_features,
        config.window_size,
    )
    install_exception_handlers(model_server.app)
    model_server.app.add_middleware(
        PassThroughRoutes,
        transformer=transformer,
        predictor_base_url=predictor_rest_url,
        connect_timeout=args.predictor_connect_timeout_seconds,
        request_timeout=float(args.predictor_request_timeout_seconds),
        forward_v2=protocol != PROTOCOL_GRPC_V2,
        forward_scoring=bool(args.rest_fast_path),
    )
    # outermost of this module's middlewares: credentials and the body cap before any other work
    model_server.app.add_middleware(RequestGate, authorizer=authorizer, max_body_bytes=args.max_body_bytes)
    logger.info(
        "authentication: %s; listening on %s; body cap %d bytes", authorizer.describe(), args.host, args.max_body_bytes
    )
    server = EdgeModelServer(
        host=args.host,
        max_body_bytes=args.max_body_bytes,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,  # one process: the drift monitor's windows live in this process
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        predictor_config=predictor_config,
    )
    # server readiness (/v2/health/ready) follows the model's: ready once the drift monitor is configured
    server.dataplane = ModelReadyDataPlane(model_registry=server.registered_models)
    quiet_request_path_logging(args.enable_latency_logging, args.access_log)
    # Long-lived start-up objects (KServe, alibi-detect, scipy, the reference data) out of the cyclic
    # garbage collector: its full collections over them stall the event loop (docs/performance.md).
    gc.freeze()
    # Background threads (audit writer, drift tests) run Python for several ms at a time; with the
    # default 5 ms GIL switch interval a request arriving meanwhile waits that long for the event
    # loop. 1 ms bounds that wait (docs/performance.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server.start([transformer])
    return 0


if __name__ == "__main__":
    sys.exit(main())
