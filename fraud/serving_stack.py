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
every port is free, starts the children and waits until both servers are ready; any failure stops
what was started and raises `UserError` with the end of the failing process's log. `stop()`
terminates every child (SIGTERM, then SIGKILL after a grace period). Each child also asks the kernel to SIGTERM it
if this process dies (PR_SET_PDEATHSIG), so a killed supervisor leaves no orphan.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from fraud.config import DRIFT_TRANSFORMER_DIR, MODEL_NAME, PROJECT_ROOT, DataLayout
from fraud.errors import UserError

CHAMPION_URI = f"models:/{MODEL_NAME}@champion"
DEFAULT_PORT = 8080
DEFAULT_GRPC_PORT = 8081
DEFAULT_PREDICTOR_PORT = 8082
DRIFT_PYTHON = DRIFT_TRANSFORMER_DIR / ".venv" / "bin" / "python"
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


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

    def __post_init__(self) -> None:
        ports = {"--port": self.port, "--grpc-port": self.grpc_port, "--predictor-port": self.predictor_port}
        if self.predictor_grpc_port is not None:
            ports["--predictor-grpc-port"] = self.predictor_grpc_port
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
    def predictor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.predictor_port}"

    def resolved_audit_spool(self) -> Path:
        from fraud.audit import default_spool_path

        return Path(self.audit_spool or default_spool_path()).resolve()

    def resolved_audit_db_url(self) -> str:
        from fraud.audit import audit_db_url

        return audit_db_url(self.audit_db_url)


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


def redacted_url(url: str) -> str:
    """A database URL fit for messages (password hidden)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid URL>"


def migrate_audit_database(url: str) -> str | None:
    """Create / upgrade the audit tables (Alembic) at `url`; returns the revision. UserError if impossible."""
    from sqlalchemy.exc import SQLAlchemyError

    from fraud.audit import create_audit_engine, upgrade_database

    engine = create_audit_engine(url, pooled=False)  # UserError for a malformed / unsupported URL
    try:
        return upgrade_database(engine)
    except SQLAlchemyError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot migrate the audit database {redacted_url(url)}: {detail}; fix it or start with --no-audit"
        ) from None
    finally:
        engine.dispose()


def port_in_use(port: int) -> bool:
    """True if something listens on `port` (KServe servers bind every interface, so test that)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn and grpc do: connections in TIME_WAIT do not make a port "in use", a listener does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def check_ports_free(config: StackConfig) -> None:
    ports = [("--port", config.port), ("--grpc-port", config.grpc_port), ("--predictor-port", config.predictor_port)]
    if config.predictor_grpc_port is not None:
        ports.append(("--predictor-grpc-port", config.predictor_grpc_port))
    for option, port in ports:
        if port_in_use(port):
            raise UserError(
                f"port {port} ({option}) is already in use: stop what listens there "
                f"(e.g. `ss -ltnp 'sport = :{port}'`) or choose another with {option}"
            )


def resolve_bundle(bundle: Path | None, download_dir: Path | None = None) -> Path:
    """A local, validated bundle: `bundle` itself, or the registry's champion downloaded."""
    from fraud.bundle import BundleError, validate_bundle

    if bundle is not None:
        try:
            validate_bundle(bundle)
        except BundleError as exc:
            raise UserError(f"--bundle {bundle}: {exc}") from None
        return Path(bundle).resolve()
    from fraud import registry

    try:
        version = registry.get_version_by_alias("champion")
    except Exception as exc:  # noqa: BLE001 - any failure to read the registry (DB, file store, network) is reported
        raise UserError(
            f"cannot read the model registry at {registry.tracking_uri()}: {type(exc).__name__}: {exc}; "
            "pass --bundle PATH to serve a local bundle"
        ) from None
    if version is None:
        raise UserError(
            f"no model is registered as {MODEL_NAME}@champion in the registry at {registry.tracking_uri()}: "
            "run the training pipeline (it promotes a champion) or pass --bundle PATH"
        )
    target = (download_dir or DataLayout.current().bundles / "serving") / f"champion-v{version}"
    return registry.download_bundle(CHAMPION_URI, target).resolve()


#: Held back while a child is forked: a Ctrl-C arriving inside the fork's at-fork hooks (logging
#: releases its locks there) would be printed as "Exception ignored" and lost, the stack left starting.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _die_with_parent() -> None:
    """preexec_fn of the children: the kernel sends SIGTERM to the child when its parent dies; the
    stop signals the parent held back during the fork are the child's again."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


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
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class ServingStack:
    """The two processes of the local stack. Use as a context manager or call start()/stop()."""

    def __init__(self, config: StackConfig, on_status: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.on_status = on_status or (lambda message: None)
        self.predictor: ChildProcess | None = None
        self.transformer: ChildProcess | None = None
        self.audit_writer: ChildProcess | None = None
        self.aggregator: ChildProcess | None = None
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
        sidecar writer, not the predictor, talks to the audit database); the velocity stream's."""
        env = _without_audit_settings(os.environ)
        return {**env, **self.stream_env(), "FRAUD_STREAM_PUBLISH": "true"} if self.config.velocity else env

    def stream_env(self) -> dict[str, str]:
        """The stream both the predictor and the aggregator use: FRAUD_STREAM_PREFIX, else one per
        data directory (stacks on other data dirs sharing a Redis do not consume each other's)."""
        digest = hashlib.sha256(str(DataLayout.current().root.resolve()).encode()).hexdigest()[:12]
        return {"FRAUD_STREAM_PREFIX": os.environ.get("FRAUD_STREAM_PREFIX") or f"fraud:{digest}:transactions"}

    def aggregator_command(self) -> list[str]:
        command = [sys.executable, "-m", "fraud.cli", "features", "aggregate", "--metrics-port", "0"]
        return command + (["--online", self.config.online_store] if self.config.online_store else [])

    def _spawn_aggregator(self, append: bool = False) -> ChildProcess:
        env = {**_without_audit_settings(os.environ), **self.stream_env()}
        return self._spawn("aggregator", self.aggregator_command(), PROJECT_ROOT, append=append, env=env)

    def audit_writer_command(self) -> list[str]:
        return [
            sys.executable, "-m", "fraud.cli", "audit", "writer",
            "--spool", str(self.config.resolved_audit_spool()),
        ]  # fmt: skip

    def audit_writer_env(self) -> dict[str, str]:
        """The database URL travels in the environment, not on a visible command line."""
        return {**_without_audit_settings(os.environ), "FRAUD_AUDIT_DB_URL": self.config.resolved_audit_db_url()}

    def transformer_command(self) -> list[str]:
        auth = ["--token_file", str(Path(self.config.token_file).resolve())] if self.config.token_file else []
        rest_host = f"{LOOPBACK}:{self.config.predictor_port}"
        if self.config.predictor_grpc_port is None:
            upstream = ["--predictor_host", rest_host, "--protocol", "v2"]
        else:
            upstream = [
                "--predictor_host", f"{LOOPBACK}:{self.config.predictor_grpc_port}",
                "--protocol", "grpc-v2",
                "--predictor_rest_host", rest_host,
            ]  # fmt: skip
        return [
            str(DRIFT_PYTHON), "-m", "drift_transformer",
            "--host", self.config.host,
            "--predictor_token_file", str(self.config.credentials_dir / TRANSFORMER_TOKEN),
            *auth,
            "--model_name", self.config.model_name,
            *upstream,
            "--http_port", str(self.config.port),
            "--grpc_port", str(self.config.grpc_port),
            "--bundle", str(self.config.bundle),
            "--drift_window_size", str(self.config.drift_window_size),
            *self.config.transformer_args,
        ]  # fmt: skip

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if not DRIFT_PYTHON.is_file():
            raise UserError(f"the drift transformer environment is missing ({DRIFT_PYTHON}): run `make setup`")
        check_ports_free(self.config)
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        write_internal_credentials(self.config)
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
            self._wait_ready(self.predictor, self.config.predictor_url)
            if self.config.audit:  # the predictor has created the spool by now
                self.audit_writer = self._spawn_audit_writer()
            self._wait_ready(self.transformer, self.config.url)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the transformer, then the predictor, then the audit writer (which first flushes
        what the predictor spooled); idempotent and safe from a signal handler."""
        with self._lock:
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
        env = dict(os.environ if env is None else env)
        env.pop("PYTHONPATH", None)  # each side runs in its own environment
        with log_path.open("ab" if append else "wb") as log:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                process = subprocess.Popen(
                    command,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - a signal mask and a prctl flag; spawned from the main thread
                )
            finally:  # a stop signal that came meanwhile is raised here, in plain code (the child dies with us)
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return ChildProcess(name, process, log_path)

    def _wait_ready(self, child: ChildProcess, base_url: str) -> None:
        url = f"{base_url}/v2/models/{self.config.model_name}/ready"
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


# --- pid file of a detached stack ---------------------------------------------------------------
def write_pid_file(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{pid}\n")
    os.replace(tmp, path)


def read_pid_file(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise UserError(f"no running stack: pid file {path} does not exist") from None
    if not text.isdigit():
        raise UserError(f"pid file {path} does not hold a process id (got {text[:40]!r})")
    return int(text)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_detached(pid_file: Path, timeout_s: float = 60.0) -> int:
    """SIGTERM the supervisor named in `pid_file` and wait for it (it stops its children). Returns the pid."""
    pid = read_pid_file(pid_file)
    if not process_alive(pid):
        pid_file.unlink(missing_ok=True)
        raise UserError(f"no running stack: process {pid} from {pid_file} is gone (stale pid file removed)")
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"serve" not in cmdline.read_bytes():
        raise UserError(f"process {pid} from {pid_file} is not a `fraud serve` supervisor; not stopping it")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid) or _is_zombie(pid):
            pid_file.unlink(missing_ok=True)
            return pid
        time.sleep(0.2)
    raise UserError(f"the stack supervisor {pid} did not stop within {timeout_s:.0f}s")


def _is_zombie(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" in status


# --- scoring client (`fraud score`) -------------------------------------------------------------
@dataclass(frozen=True)
class ScoredTransaction:
    """One decision as the stack returned it."""

    transaction_id: str
    fraud_probability: float
    decision: str
    reasons: list[str]
    model_version: str
    features_missing: bool
    features_stale: bool


def load_transactions_file(path: Path) -> list[dict]:
    """Transactions from a .jsonl file (one object a line) or a .json file (a list, or {"instances": [...]}).

    Each is validated with `TransactionRequest`; a bad one raises UserError naming the line/index and field.
    """
    import json

    from pydantic import ValidationError

    from fraud.schema import TransactionRequest

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--file {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--file {path}: cannot read: {exc}") from None
    records: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"--file {path}: line {number} is not JSON: {exc.msg}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--file {path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if isinstance(data, dict) and "instances" in data:
            data = data["instances"]
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise UserError(f'--file {path}: expected a list of transactions or {{"instances": [...]}}')
        records = [(f"item {index}", item) for index, item in enumerate(data)]
    else:
        raise UserError(f"--file {path}: the file must end in .jsonl or .json")
    if not records:
        raise UserError(f"--file {path}: holds no transactions")
    transactions = []
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"--file {path}: {where} must be a JSON object with the transaction fields")
        try:
            tx = TransactionRequest.model_validate(record)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'transaction'}: {error['msg']}" for error in exc.errors()
            )
            raise UserError(f"--file {path}: {where}: {problems}") from None
        transactions.append(request_fields(tx.model_dump()))
    return transactions


def request_fields(record: dict) -> dict:
    """The wire fields of a transaction (ISO-8601 timestamp, UTC)."""
    from datetime import datetime

    from fraud.schema import REQUEST_FIELDS, TX_AMOUNT, TX_DATETIME

    out = {name: record[name] for name in REQUEST_FIELDS}
    when = out[TX_DATETIME]
    out[TX_DATETIME] = when.isoformat() if isinstance(when, datetime) else str(when)
    out[TX_AMOUNT] = float(out[TX_AMOUNT])
    return out


#: `fraud score --sample` draws from this many most recent days of the raw data.
SAMPLE_RECENT_DAYS = 7


def sample_raw_transactions(layout: DataLayout, n: int, seed: int = 0) -> list[dict]:
    """`n` transactions drawn at random from the last `SAMPLE_RECENT_DAYS` days of the simulated raw
    data (the period the online store's snapshots describe); each also carries its `tx_fraud` label."""
    import duckdb

    if n < 1:
        raise UserError(f"--sample must be >= 1, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    # one folder per day (day=YYYY-MM-DD), so the lexical order is the date order
    files = (
        sorted(layout.transactions.glob("**/*.parquet"))[-SAMPLE_RECENT_DAYS:] if layout.transactions.is_dir() else []
    )
    if not files:
        raise UserError(
            f"no simulated transactions under {layout.transactions}: run `fraud simulate` first or pass --file"
        )
    connection = duckdb.connect()
    try:
        frame = connection.execute(
            "SELECT transaction_id, customer_id, terminal_id, tx_amount, tx_datetime, tx_fraud "  # noqa: S608 - only int() sample size and seed formatted in; the file list is bound
            f"FROM read_parquet(?, hive_partitioning = false) USING SAMPLE reservoir({int(n)} ROWS) "
            f"REPEATABLE ({int(seed)})",
            [[str(f) for f in files]],
        ).fetch_df()
    finally:
        connection.close()
    frame = frame.sort_values("tx_datetime", kind="stable")
    rows = []
    for record in frame.to_dict("records"):
        row = request_fields({**record, "tx_datetime": record["tx_datetime"].to_pydatetime()})
        row["tx_fraud"] = int(record["tx_fraud"])
        rows.append(row)
    return rows


def v1_request(transactions: list[dict]) -> dict:
    from fraud.schema import REQUEST_FIELDS

    return {"instances": [{name: tx[name] for name in REQUEST_FIELDS} for tx in transactions]}


def v2_request(transactions: list[dict]) -> dict:
    from fraud.schema import REQUEST_FIELDS, TX_AMOUNT

    n = len(transactions)
    return {
        "inputs": [
            {
                "name": name,
                "datatype": "FP64" if name == TX_AMOUNT else "BYTES",
                "shape": [n],
                "data": [tx[name] for tx in transactions],
            }
            for name in REQUEST_FIELDS
        ]
    }


def _reason_names(codes: list) -> list[str]:
    return [str(code.get("feature", code)) if isinstance(code, dict) else str(code) for code in codes]


def parse_v1_response(body: dict) -> list[ScoredTransaction]:
    return [
        ScoredTransaction(
            transaction_id=str(p["transaction_id"]),
            fraud_probability=float(p["fraud_probability"]),
            decision=str(p["decision"]),
            reasons=_reason_names(p.get("reason_codes", [])),
            model_version=str(p.get("model_version", "")),
            features_missing=bool(p.get("features_missing", False)),
            features_stale=bool(p.get("features_stale", False)),
        )
        for p in body["predictions"]
    ]


def parse_v2_response(body: dict) -> list[ScoredTransaction]:
    import json

    outputs = {o["name"]: o["data"] for o in body["outputs"]}
    n = len(outputs["transaction_id"])

    def column(name, default):
        return outputs.get(name, [default] * n)

    return [
        ScoredTransaction(
            transaction_id=str(outputs["transaction_id"][i]),
            fraud_probability=float(outputs["fraud_probability"][i]),
            decision=str(outputs["decision"][i]),
            reasons=_reason_names(json.loads(column("reason_codes", "[]")[i])),
            model_version=str(column("model_version", "")[i]),
            features_missing=bool(column("features_missing", False)[i]),
            features_stale=bool(column("features_stale", False)[i]),
        )
        for i in range(n)
    ]


def score_transactions(
    url: str,
    transactions: list[dict],
    protocol: str = "v1",
    model_name: str = MODEL_NAME,
    timeout_s: float = 30.0,
    token: str | None = None,
) -> list[ScoredTransaction]:
    """Send transactions through the stack (the transformer) and return the decisions; UserError on failure."""
    if protocol not in ("v1", "v2"):
        raise UserError(f"--protocol must be v1 or v2, got {protocol!r}")
    base = url.rstrip("/")
    if protocol == "v1":
        endpoint, body = f"{base}/v1/models/{model_name}:predict", v1_request(transactions)
    else:
        endpoint, body = f"{base}/v2/models/{model_name}/infer", v2_request(transactions)
    try:
        headers = {"authorization": f"Bearer {token}"} if token else None
        response = httpx.post(endpoint, json=body, timeout=timeout_s, headers=headers)
    except httpx.InvalidURL as exc:
        raise UserError(f"--url {url!r} is not a valid URL: {exc}") from None
    except httpx.TimeoutException:
        raise UserError(f"the scoring service at {url} did not answer within {timeout_s:g}s") from None
    except httpx.TransportError as exc:
        raise UserError(
            f"cannot reach the scoring service at {url} ({type(exc).__name__}): "
            "is it running? start it with `fraud serve`"
        ) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        raise UserError(f"the scoring service answered {response.status_code}: {str(detail)[:500]}")
    try:
        payload = response.json()
        return parse_v1_response(payload) if protocol == "v1" else parse_v2_response(payload)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"the service at {url} returned an unexpected answer ({type(exc).__name__}: {exc})") from None
