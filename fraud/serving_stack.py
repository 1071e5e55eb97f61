"""The local serving stack: the predictor and the drift transformer as two processes on loopback
ports, wired like an InferenceService (client -> transformer -> predictor).

* predictor: `<core venv>/python -m predictor` (kserve 0.21, core environment), HTTP only;
* transformer: `drift_transformer/.venv/bin/python -m drift_transformer` (kserve 0.20 +
  Alibi Detect, its own environment), HTTP on `port` and V2 gRPC on `grpc_port`, forwarding to the
  predictor with the V2 REST protocol (V1 requests are forwarded as V1).

Auditing is on by default (`StackConfig.audit`): before the children start, the audit database
(FRAUD_AUDIT_DB_URL, else SQLite `<data dir>/audit/audit.db`) is migrated, the predictor appends
every decision to the spool `<data dir>/audit/spool.db` (FRAUD_AUDIT_SPOOL overrides it) and a third
child, the sidecar `fraud audit writer`, drains it into that database - as a writer container
beside the predictor in a pod would, and with no writer work in the predictor's process (its
batches held the GIL long enough to show in the request latency tail, docs/performance.md). On stop
the writer goes last and flushes what the predictor spooled (docs/audit.md).

Predictor and transformer read the same local bundle directory. `ServingStack.start()` checks that
every port is free, starts the children and waits until the predictor is up (its model loaded; a
predictor that is up but not ready - online store lost, audit backlog - is reported in a status
line: locally nothing routes by readiness) and the transformer is ready; any failure stops
what was started and raises `UserError` with the end of the failing process's log. `stop()`
terminates every child (SIGTERM, then SIGKILL after a grace period). Each child also asks the kernel
to SIGTERM it if this process dies (PR_SET_PDEATHSIG), so a killed supervisor leaves no orphan
(fraud.processes). `fraud serve stop` ends a detached supervisor through its pid file (`stop_detached`).

The bundle comes from fraud.serving_bundle; `fraud score` is the client in fraud.scoring_client.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from fraud.audit import audit_db_url, default_spool_path
from fraud.audit.store import migrate_audit_database, redacted_url
from fraud.config import DRIFT_TRANSFORMER_DIR, MODEL_NAME, PROJECT_ROOT, DataLayout
from fraud.errors import UserError
from fraud.monitoring.local_prometheus import LocalPrometheus, stack_prometheus
from fraud.net import free_port
from fraud.processes import child_env, port_in_use, process_alive, read_pid_file, spawn, stop_process
from fraud.settings import Settings, current

DEFAULT_PORT = 8080
DEFAULT_GRPC_PORT = 8081
DEFAULT_PREDICTOR_PORT = 8082
DRIFT_PYTHON = DRIFT_TRANSFORMER_DIR / ".venv" / "bin" / "python"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class StackConfig:
    """Where and how the stack runs."""

    bundle: Path
    port: int = DEFAULT_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    predictor_port: int = DEFAULT_PREDICTOR_PORT
    online_store: str | None = None
    #: longest wait (s) of the predictor for one online-store lookup before it scores with defaults
    #: (None: the predictor's default)
    store_timeout_s: float | None = None
    log_dir: Path = field(default_factory=lambda: DataLayout.current().root / "serve")
    model_name: str = MODEL_NAME
    #: vectors per drift window of the transformer's batch detector
    drift_window_size: int = 500
    #: extra arguments for `python -m drift_transformer` (e.g. online-detector options)
    transformer_args: tuple[str, ...] = ()
    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 20.0
    #: a child that exits more often than this within restart_window_s is not restarted again
    max_restarts: int = 3
    restart_window_s: float = 300.0
    #: record every decision in the audit trail (predictor's spool + the `fraud audit writer` sidecar)
    audit: bool = True
    #: audit spool file (None: FRAUD_AUDIT_SPOOL, else <data dir>/audit/spool.db)
    audit_spool: Path | None = None
    #: velocity features: the predictor publishes what it scores and a `fraud features aggregate`
    #: child keeps the window states (stream prefix: FRAUD_STREAM_PREFIX, else one per data dir)
    velocity: bool = True
    #: audit database (None: FRAUD_AUDIT_DB_URL, else SQLite <data dir>/audit/audit.db)
    audit_db_url: str | None = None
    #: address the transformer (what clients call) binds; the predictor always binds loopback
    host: str = LOOPBACK
    #: the predictor's V2 gRPC port: the transformer then calls it over gRPC for V2 requests
    #: (`--protocol grpc-v2`; V1 requests and explanations over REST); None: V2 REST
    predictor_grpc_port: int | None = None
    #: bearer tokens with scopes the transformer requires (`<token> <scope>[,<scope>...]` per line);
    #: None: no authentication (loopback use), and no caller gets the feature vectors
    token_file: Path | None = None
    #: port of a local Prometheus that scrapes the stack with the alert rules loaded (None: none)
    prometheus_port: int | None = None
    #: the platform settings the children get (in their environment) and the stack's defaults come from
    settings: Settings = field(default_factory=current)

    def __post_init__(self) -> None:
        ports = {"--port": self.port, "--grpc-port": self.grpc_port, "--predictor-port": self.predictor_port}
        if self.predictor_grpc_port is not None:
            ports["--predictor-grpc-port"] = self.predictor_grpc_port
        if self.prometheus_port is not None:
            ports["--prometheus-port"] = self.prometheus_port
        for option, port in ports.items():
            if not (1 <= port <= 65535):
                raise UserError(f"{option} must be a TCP port in 1..65535, got {port}")
        if len(set(ports.values())) != len(ports):
            raise UserError(f"{', '.join(ports)} must differ, got {ports}")
        if self.store_timeout_s is not None and self.store_timeout_s <= 0:
            raise UserError(f"--store-timeout must be > 0, got {self.store_timeout_s}")
        if self.online_store not in (None, "sqlite", "redis"):
            raise UserError(f"--online-store must be sqlite or redis, got {self.online_store!r}")
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise UserError(f"--token-file {self.token_file} does not exist")

    @property
    def url(self) -> str:
        """What clients call: the transformer's HTTP endpoint."""
        host = LOOPBACK if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104 - compares against the wildcard to map it to loopback, binds nothing
        return f"http://{host}:{self.port}"

    @property
    def credentials_dir(self) -> Path:
        """Private folder (0700) of the predictor's token file and the transformer's token for it."""
        return self.log_dir / "credentials"

    @property
    def prometheus_url(self) -> str | None:
        return None if self.prometheus_port is None else f"http://{LOOPBACK}:{self.prometheus_port}"

    @property
    def predictor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.predictor_port}"

    def resolved_audit_spool(self) -> Path:
        return Path(self.audit_spool or default_spool_path(settings=self.settings)).resolve()

    def resolved_audit_db_url(self) -> str:
        return audit_db_url(self.audit_db_url, self.settings)


AUDIT_ENV = ("FRAUD_AUDIT_SPOOL", "FRAUD_AUDIT_DB_URL")
#: Files of StackConfig.credentials_dir: the predictor's token file, the transformer's token for it.
PREDICTOR_TOKENS = "predictor-tokens"
TRANSFORMER_TOKEN = "transformer-token"  # noqa: S105 - a file name, not a password


def write_internal_credentials(config: StackConfig) -> None:
    """A fresh random token for the transformer -> predictor hop (scopes score and debug: the drift
    monitor needs the feature vectors), written 0600 in a 0700 folder. The predictor's token file
    also lists the user's tokens (--token-file), so they may call the predictor directly too; without
    a token file nobody but the transformer can score on the predictor's port."""
    folder = config.credentials_dir
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    token = secrets.token_hex(32)
    user_tokens = Path(config.token_file).read_text() if config.token_file else ""
    for name, text in (
        (TRANSFORMER_TOKEN, f"{token}\n"),
        (PREDICTOR_TOKENS, f"{user_tokens}\n{token} score,debug,explain\n"),
    ):
        path = folder / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        path.chmod(0o600)


def _without_audit_settings(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in AUDIT_ENV}


def _settings_env(settings: Settings) -> dict[str, str]:
    """A child's environment: this process's, with the stack's settings (they may differ from the
    environment's, e.g. another data directory) and without the audit settings."""
    return _without_audit_settings({**os.environ, **settings.env()})


def check_ports_free(config: StackConfig) -> None:
    ports = [("--port", config.port), ("--grpc-port", config.grpc_port), ("--predictor-port", config.predictor_port)]
    if config.predictor_grpc_port is not None:
        ports.append(("--predictor-grpc-port", config.predictor_grpc_port))
    if config.prometheus_port is not None:
        ports.append(("--prometheus-port", config.prometheus_port))
    for option, port in ports:
        if port_in_use(port):
            raise UserError(
                f"port {port} ({option}) is already in use: stop what listens there "
                f"(e.g. `ss -ltnp 'sport = :{port}'`) or choose another with {option}"
            )


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 2500) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout_s: float) -> None:
        stop_process(self.process, timeout_s)


class ServingStack:
    """The two processes of the local stack. Use as a context manager or call start()/stop()."""

    def __init__(self, config: StackConfig, on_status: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_status = on_status or (lambda message: None)
        self.predictor: ChildProcess | None = None
        self.transformer: ChildProcess | None = None
        self.audit_writer: ChildProcess | None = None
        self.aggregator: ChildProcess | None = None
        self.prometheus: LocalPrometheus | None = None
        #: /metrics ports of the sidecars, for the local Prometheus (0: the aggregator picks one)
        self.sidecar_metrics_ports = {"aggregator": 0, "audit-writer": 0}
        self._lock = threading.Lock()

    # --- commands ----------------------------------------------------------------------------
    def predictor_command(self) -> list[str]:
        command = [
            sys.executable, "-m", "predictor",
            "--bundle", str(self.config.bundle),
            "--model_name", self.config.model_name,
            "--http_port", str(self.config.predictor_port),
            "--host", LOOPBACK,
            "--token-file", str(self.config.credentials_dir / PREDICTOR_TOKENS),
        ]  # fmt: skip
        if self.config.predictor_grpc_port is None:
            command += ["--enable_grpc", "false"]
        else:
            command += ["--enable_grpc", "true", "--grpc_port", str(self.config.predictor_grpc_port)]
        if self.config.online_store:
            command += ["--online-store", self.config.online_store]
        if self.config.store_timeout_s is not None:
            command += ["--store-timeout", f"{self.config.store_timeout_s:g}"]
        if self.config.audit:
            # the database URL travels in the environment (predictor_env), not on a visible command line
            command += ["--audit-spool", str(self.config.resolved_audit_spool())]
        return command

    def predictor_env(self) -> dict[str, str]:
        """Environment of the predictor: no audit settings (its spool is on the command line; the
        sidecar writer, not the predictor, talks to the audit database); the velocity stream's; one
        OpenMP thread unless OMP_NUM_THREADS says otherwise (as the manifests set it)."""
        env = {"OMP_NUM_THREADS": "1", **_settings_env(self.config.settings)}
        return {**env, **self.stream_env(), "FRAUD_STREAM_PUBLISH": "true"} if self.config.velocity else env

    def stream_env(self) -> dict[str, str]:
        """The stream both the predictor and the aggregator use: FRAUD_STREAM_PREFIX, else one per
        data directory (stacks on other data dirs sharing a Redis do not consume each other's)."""
        settings = self.config.settings
        digest = hashlib.sha256(str(settings.layout.root).encode()).hexdigest()[:12]
        return {"FRAUD_STREAM_PREFIX": settings.stream_prefix or f"fraud:{digest}:transactions"}

    def aggregator_command(self) -> list[str]:
        port = self.sidecar_metrics_ports["aggregator"]
        command = [sys.executable, "-m", "fraud.cli", "features", "aggregate", "--metrics-port", str(port)]
        return command + (["--online", self.config.online_store] if self.config.online_store else [])

    def _spawn_aggregator(self, append: bool = False) -> ChildProcess:
        env = {**_settings_env(self.config.settings), **self.stream_env()}
        return self._spawn("aggregator", self.aggregator_command(), PROJECT_ROOT, append=append, env=env)

    def audit_writer_command(self) -> list[str]:
        return [
            sys.executable, "-m", "fraud.cli", "audit", "writer",
            "--spool", str(self.config.resolved_audit_spool()),
            *(["--metrics-port", str(port)] if (port := self.sidecar_metrics_ports["audit-writer"]) else []),
        ]  # fmt: skip

    def audit_writer_env(self) -> dict[str, str]:
        """The database URL travels in the environment, not on a visible command line."""
        return {**_settings_env(self.config.settings), "FRAUD_AUDIT_DB_URL": self.config.resolved_audit_db_url()}

    def transformer_command(self) -> list[str]:
        auth = ["--token-file", str(Path(self.config.token_file).resolve())] if self.config.token_file else []
        rest_host = f"{LOOPBACK}:{self.config.predictor_port}"
        if self.config.predictor_grpc_port is None:
            upstream = ["--predictor_host", rest_host, "--protocol", "v2"]
        else:
            upstream = [
                "--predictor_host", f"{LOOPBACK}:{self.config.predictor_grpc_port}",
                "--protocol", "grpc-v2",
                "--predictor-rest-host", rest_host,
            ]  # fmt: skip
        return [
            str(DRIFT_PYTHON), "-m", "drift_transformer",
            "--host", self.config.host,
            "--predictor-token-file", str(self.config.credentials_dir / TRANSFORMER_TOKEN),
            *auth,
            "--model_name", self.config.model_name,
            *upstream,
            "--http_port", str(self.config.port),
            "--grpc_port", str(self.config.grpc_port),
            "--bundle", str(self.config.bundle),
            "--drift-window-size", str(self.config.drift_window_size),
            *self.config.transformer_args,
        ]  # fmt: skip

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if not DRIFT_PYTHON.is_file():
            raise UserError(f"the drift transformer environment is missing ({DRIFT_PYTHON}): run `make setup`")
        check_ports_free(self.config)
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        write_internal_credentials(self.config)
        if self.config.prometheus_port is not None:
            self.sidecar_metrics_ports = {"aggregator": free_port(), "audit-writer": free_port()}
        if self.config.audit:
            url = self.config.resolved_audit_db_url()
            self.on_status(f"migrating the audit database {redacted_url(url)}")
            migrate_audit_database(url)
        try:
            # both start at once (each spends most of its start-up importing its libraries); the
            # transformer does not need the predictor until the first request
            self.on_status(
                f"starting predictor on {self.config.predictor_url} and drift transformer on {self.config.url}"
            )
            if self.config.velocity:
                self.aggregator = self._spawn_aggregator()
            self.predictor = self._spawn("predictor", self.predictor_command(), PROJECT_ROOT, env=self.predictor_env())
            self.transformer = self._spawn("transformer", self.transformer_command(), DRIFT_TRANSFORMER_DIR)
            # the predictor opens its port once its model is loaded: up, though perhaps not ready
            # (out of rotation: online store lost, audit backlog that the writer below drains)
            self._wait_ready(self.predictor, self.config.predictor_url, "/v2/health/live")
            if self.config.audit:  # the predictor has created the spool by now
                self.audit_writer = self._spawn_audit_writer()
            self._wait_ready(self.transformer, self.config.url, f"/v2/models/{self.config.model_name}/ready")
            self._report_predictor_readiness()
            if self.config.prometheus_port is not None:
                self.on_status(f"starting Prometheus on {self.config.prometheus_url}")
                self.prometheus = stack_prometheus(self).start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the transformer, then the predictor, then the audit writer (which first flushes
        what the predictor spooled); idempotent and safe from a signal handler."""
        with self._lock:
            if self.prometheus is not None:
                self.prometheus.stop()
            for child in (self.transformer, self.predictor, self.aggregator, self.audit_writer):
                if child is not None:
                    child.terminate(self.config.stop_timeout_s)

    def children(self) -> list[ChildProcess]:
        children = (self.predictor, self.transformer, self.audit_writer, self.aggregator)
        return [child for child in children if child is not None]

    def supervise(self, poll_s: float = 0.5) -> None:
        """Run until interrupted, restarting a child that exits (as a pod's container would be).

        While the predictor restarts, the transformer answers 503. A child that exits more than
        `max_restarts` times within `restart_window_s` is given up on: raises UserError with its log.
        """
        exits: dict[str, list[float]] = {"predictor": [], "transformer": [], "audit-writer": [], "aggregator": []}
        while True:
            for child in self.children():
                if child.alive():
                    continue
                now = time.monotonic()
                recent = [t for t in exits[child.name] if now - t < self.config.restart_window_s] + [now]
                exits[child.name] = recent
                if len(recent) > self.config.max_restarts:
                    raise UserError(
                        f"the {child.name} exited {len(recent)} times within {self.config.restart_window_s:.0f}s "
                        f"(last status {child.process.returncode}, log {child.log_path}):\n{child.log_tail()}"
                    )
                self.on_status(f"the {child.name} exited with status {child.process.returncode}; restarting it")
                self._restart(child)
            time.sleep(poll_s)

    def _restart(self, child: ChildProcess) -> None:
        with self._lock:
            if child is self.predictor:
                self.predictor = self._spawn(
                    "predictor", self.predictor_command(), PROJECT_ROOT, append=True, env=self.predictor_env()
                )
            elif child is self.transformer:
                self.transformer = self._spawn(
                    "transformer", self.transformer_command(), DRIFT_TRANSFORMER_DIR, append=True
                )
            elif child is self.audit_writer:
                self.audit_writer = self._spawn_audit_writer(append=True)
            elif child is self.aggregator:
                self.aggregator = self._spawn_aggregator(append=True)

    def _spawn_audit_writer(self, append: bool = False) -> ChildProcess:
        return self._spawn(
            "audit-writer", self.audit_writer_command(), PROJECT_ROOT, append=append, env=self.audit_writer_env()
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- internals ---------------------------------------------------------------------------
    def _spawn(
        self, name: str, command: list[str], cwd: Path, append: bool = False, env: dict[str, str] | None = None
    ) -> ChildProcess:
        log_path = self.config.log_dir / f"{name}.log"
        base = _settings_env(self.config.settings) if env is None else env
        process = spawn(command, cwd=cwd, log_path=log_path, env=child_env(base))
        return ChildProcess(name, process, log_path)

    def _report_predictor_readiness(self) -> None:
        """A status line when the started predictor is not ready (its `/ready` answers 503): it
        scores what reaches it, on defaults if its online store is lost, and turns ready by itself."""
        try:
            ready = httpx.get(f"{self.config.predictor_url}/ready", timeout=10.0).status_code == 200
        except httpx.HTTPError:
            return
        if ready or self.predictor is None:
            return
        reasons = [line for line in self.predictor.log_tail().splitlines() if "not ready" in line]
        self.on_status(
            "warning: the predictor is up but not ready"
            + (f" ({reasons[-1].strip()[-300:]})" if reasons else f" (log: {self.predictor.log_path})")
        )

    def _wait_ready(self, child: ChildProcess, base_url: str, path: str) -> None:
        url = base_url + path
        deadline = time.monotonic() + self.config.startup_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not child.alive():
                    raise UserError(
                        f"the {child.name} exited with status {child.process.returncode} while starting "
                        f"(log: {child.log_path}):\n{child.log_tail()}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        raise UserError(
            f"the {child.name} was not ready after {self.config.startup_timeout_s:.0f}s (log: {child.log_path}):\n"
            f"{child.log_tail()}"
        )


def stop_detached(pid_file: Path, timeout_s: float = 60.0) -> int:
    """SIGTERM the supervisor named in `pid_file` and wait for it (it stops its children). Returns the pid."""
    pid = read_pid_file(pid_file)
    if not process_alive(pid):
        pid_file.unlink(missing_ok=True)
        raise UserError(f"no running stack: process {pid} from {pid_file} is gone (stale pid file removed)")
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"serve" not in cmdline.read_bytes():
        raise UserError(f"process {pid} from {pid_file} is not a `fraud serve` supervisor; not stopping it")
    # no SIGKILL: the supervisor must stop its children itself (the audit writer flushes the spool)
    if not stop_process(pid, timeout_s, kill=False):
        raise UserError(f"the stack supervisor {pid} did not stop within {timeout_s:.0f}s")
    pid_file.unlink(missing_ok=True)
    return pid
