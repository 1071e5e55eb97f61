"""Target `local`: the rollout on this machine, with the same state machine and analysis as on
Kubernetes.

Two model versions live as two predictor processes (`python -m predictor --bundle ...`, each on
its own loopback port), behind the local canary router (`python -m fraud.deploy.router`) that
sends `canary_percent`% of requests to the canary. The analysis scrapes both predictors'
`/metrics` at the start and the end of the window (`fraud.deploy.canary.ScrapeSource`).

The processes are detached (own session) so they outlive the `fraud deploy` step that started
them - the pipeline's deploy and analyse steps are separate processes. What runs where is kept
in `<data>/serving/local-canary/stack.json`; the router's table in `routes.json` next to it.
Send traffic to the router's URL (`fraud deploy status --target local` prints it).

A predictor counts as serving once it is up (its model loaded: the server opens its port only
then), as `fraud serve` counts it: on this machine nothing routes by readiness, and a predictor
whose online store is lost still answers in degraded mode. When it is up but not ready (store
lost or empty, audit backlog), the deploy says so in one warning line; the analysis then judges
it by its metrics, as any canary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from fraud import atomic, processes
from fraud.config import PROJECT_ROOT, DataLayout
from fraud.deploy.canary import PrometheusSource, ScrapeSource
from fraud.deploy.kserve_rollout import ReadinessTimeout
from fraud.deploy.state import RolloutError, RolloutRecord, RolloutState, StateStore, one_line
from fraud.net import LOOPBACK, free_port
from fraud.processes import process_alive

logger = logging.getLogger(__name__)


def local_dir() -> Path:
    return DataLayout.current().root / "serving" / "local-canary"


def stop_process(pid: int, timeout_seconds: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads (it was started in its own session), SIGKILL after a grace."""
    processes.stop_process(pid, timeout_seconds, group=True)


@dataclass(frozen=True)
class Served:
    """One running predictor process."""

    version: str
    port: int
    pid: int
    bundle: str
    log: str

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@dataclass(frozen=True)
class StackState:
    router_pid: int = 0
    router_port: int = 0
    stable: Served | None = None
    canary: Served | None = None
    canary_percent: int = 0

    @property
    def router_url(self) -> str:
        return f"http://{LOOPBACK}:{self.router_port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackState:
        def served(item: Any) -> Served | None:
            return Served(**item) if item else None

        return cls(
            int(data.get("router_pid", 0)),
            int(data.get("router_port", 0)),
            served(data.get("stable")),
            served(data.get("canary")),
            int(data.get("canary_percent", 0)),
        )


class LocalStack:
    """The processes of the local canary stack and their bookkeeping files."""

    def __init__(
        self, root: Path, model_name: str, *, router_port: int = 0, startup_timeout_seconds: float = 180.0
    ) -> None:
        self.root = Path(root)
        self.model_name = model_name
        self.requested_router_port = router_port
        self.startup_timeout_seconds = startup_timeout_seconds

    @property
    def stack_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def routes_file(self) -> Path:
        return self.root / "routes.json"

    @property
    def prometheus_targets_file(self) -> Path:
        """The predictors being served, in Prometheus's file-based discovery format (`file_sd_configs`):
        a Prometheus on loopback that watches it scrapes every version the router serves."""
        return self.root / "prometheus-targets.json"

    def load(self) -> StackState:
        if not self.stack_file.is_file():
            return StackState()
        try:
            return StackState.from_dict(json.loads(self.stack_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise RolloutError(f"local stack file {self.stack_file} is unreadable: {exc}") from None

    def save(self, state: StackState) -> StackState:
        """Persist the stack and publish the router's table (routes first: the router acts on it)."""
        routes = {
            "stable": {"version": state.stable.version, "url": state.stable.url} if state.stable else None,
            "canary": {"version": state.canary.version, "url": state.canary.url} if state.canary else None,
            "canary_percent": state.canary_percent if state.canary else 0,
        }
        atomic.write_json(self.routes_file, routes, indent=2)
        targets = [
            {"targets": [httpx.URL(served.url).netloc.decode()], "labels": {"variant": variant}}
            for variant, served in (("stable", state.stable), ("canary", state.canary))
            if served is not None
        ]
        atomic.write_json(self.prometheus_targets_file, targets, indent=2)
        atomic.write_json(self.stack_file, state.to_dict(), indent=2)
        return state

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> tuple[int, Path]:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        # one OpenMP thread per predictor unless OMP_NUM_THREADS says otherwise (as the manifests set it)
        env = processes.child_env({"OMP_NUM_THREADS": "1", **os.environ})
        process = processes.spawn(command, cwd=PROJECT_ROOT, log_path=log, env=env, detached=True)
        return process.pid, log

    def ensure_router(self, state: StackState) -> StackState:
        if state.router_pid and process_alive(state.router_pid) and self._router_up(state.router_port):
            return state
        port = self.requested_router_port or state.router_port or free_port()
        if not self.routes_file.exists():
            self.save(state)
        pid, log = self._spawn(
            "router",
            [sys.executable, "-m", "fraud.deploy.router", "--routes", str(self.routes_file), "--port", str(port)],
        )
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if not process_alive(pid):
                raise RolloutError(f"the local router exited while starting (log {log}): {log.read_text()[-1500:]}")
            if self._router_up(port):
                return replace(state, router_pid=pid, router_port=port)
            time.sleep(0.1)
        stop_process(pid)
        raise RolloutError(f"the local router did not answer on port {port} within 30s (log {log})")

    @staticmethod
    def _router_up(port: int) -> bool:
        return _answers_200(f"http://{LOOPBACK}:{port}/-/routes", timeout=1.0)

    def start_predictor(self, version: str, bundle: Path) -> Served:
        """Start `python -m predictor` for `bundle` and wait until it is up (module docstring);
        ReadinessTimeout otherwise."""
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "predictor",
            "--bundle",
            str(bundle),
            "--model_name",
            self.model_name,
            "--http_port",
            str(port),
            "--enable_grpc",
            "false",
        ]
        pid, log = self._spawn(f"predictor-v{version}", command)
        served = Served(version, port, pid, str(bundle), str(log))
        deadline = time.monotonic() + self.startup_timeout_seconds
        while time.monotonic() < deadline:
            if not process_alive(pid):
                raise ReadinessTimeout(f"predictor for version {version} exited while starting: {_last_line(log)}")
            if _answers_200(f"{served.url}/v2/health/live"):
                if not _answers_200(f"{served.url}/v2/models/{self.model_name}/ready"):
                    logger.warning(
                        "predictor for version %s is up but not ready, serving in degraded mode (its reason is in %s)",
                        version,
                        log,
                    )
                return served
            time.sleep(0.25)
        stop_process(pid)
        raise ReadinessTimeout(
            f"predictor for version {version} not ready after {self.startup_timeout_seconds:.0f}s: {_last_line(log)}"
        )

    def healthy(self, served: Served | None) -> bool:
        """The predictor process runs and its server answers (module docstring: up, not ready)."""
        return served is not None and process_alive(served.pid) and _answers_200(f"{served.url}/v2/health/live")

    def stop_all(self) -> None:
        state = self.load()
        for served in (state.canary, state.stable):
            if served is not None:
                stop_process(served.pid)
        if state.router_pid:
            stop_process(state.router_pid)
        self.save(StackState())


def _answers_200(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 (False when it cannot be reached)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _last_line(log: Path) -> str:
    """The predictor's last log line (its one-line reason, or a traceback's exception line) and
    where the whole log is: the rollout record keeps one line, the log keeps the traceback."""
    try:
        text = log.read_text(errors="replace")[-20000:]
    except OSError:
        return f"(no log at {log})"
    return f"{one_line(text.splitlines()[-1] if text.strip() else '(empty log)', 300)} (log {log})"


class LocalBackend:
    """The rollout `Backend` for the local stack (see fraud.deploy.rollout)."""

    def __init__(
        self,
        model_name: str,
        namespace: str,
        store: StateStore,
        tracking_uri: str | None,
        connection: Any,
        *,
        root: Path | None = None,
        router_port: int = 0,
    ) -> None:
        self.model_name = model_name
        self.namespace = namespace
        self.store = store
        self.tracking_uri = tracking_uri
        self.stack = LocalStack(
            root or local_dir(),
            model_name,
            router_port=router_port,
            startup_timeout_seconds=getattr(connection, "ready_timeout_seconds", 180.0),
        )

    def load_record(self) -> RolloutRecord | None:
        return self.store.load("local", self.namespace, self.model_name)

    def save_record(self, record: RolloutRecord) -> None:
        self.store.save(record)

    def serving(self) -> tuple[str, str]:
        stable = self.stack.load().stable
        if stable is not None and self.stack.healthy(stable):
            return stable.version, stable.bundle
        return "", ""

    def stable_health(self) -> tuple[str, str, bool, str]:
        """(version, bundle, healthy, detail) of the stable predictor; ("", "", False, ...) when none."""
        state = self.stack.load()
        if state.stable is None:
            return "", "", False, "no local stable predictor"
        if self.stack.healthy(state.stable):
            return state.stable.version, state.stable.bundle, True, "ready"
        alive = process_alive(state.stable.pid)
        detail = "not ready" if alive else f"process {state.stable.pid} is not running"
        return state.stable.version, state.stable.bundle, False, f"{detail} ({state.stable.url})"

    def set_traffic(self, record: RolloutRecord, percent: int) -> None:
        state = self.stack.load()
        if state.canary is None or state.canary.version != record.model_version:
            raise RolloutError(f"version {record.model_version} is not the local canary: cannot give it {percent}%")
        self.stack.save(replace(state, canary_percent=percent))

    def _bundle(self, version: str) -> Path:
        from fraud import registry
        from fraud.errors import UserError

        target = DataLayout.current().bundles / "local-canary" / f"v{version}"
        try:
            return registry.download_bundle(f"models:/{self.model_name}/{version}", target, uri=self.tracking_uri)
        except UserError as exc:
            raise RolloutError(f"cannot fetch the bundle of version {version}: {exc}") from None

    def deploy(self, record: RolloutRecord) -> RolloutRecord:
        state = self.stack.ensure_router(self.stack.load())
        self.stack.save(state)
        running = state.canary if record.previous_version else state.stable
        if running is not None and running.version == record.model_version and self.stack.healthy(running):
            served = running  # a resumed rollout: the process is already up
        else:
            served = self.stack.start_predictor(record.model_version, self._bundle(record.model_version))
        leftovers: list[Served] = []
        if record.previous_version:
            if state.stable is None or state.stable.version != record.previous_version:
                stop_process(served.pid)
                raise RolloutError(
                    f"the local stable version changed under the rollout (expected {record.previous_version})"
                )
            state = replace(state, canary=served, canary_percent=record.canary_traffic_percent)
            share = record.canary_traffic_percent
        else:
            leftovers = [s for s in (state.stable, state.canary) if s is not None and s.pid != served.pid]
            state = replace(state, stable=served, canary=None, canary_percent=0)
            share = 100
        self.stack.save(state)
        for stale in leftovers:  # processes of a stack that was no longer healthy
            stop_process(stale.pid)
        return record.advance(
            RolloutState.DEPLOYED, f"local predictor pid {served.pid} on port {served.port} taking {share}%"
        )

    def promote(self, record: RolloutRecord) -> None:
        state = self.stack.load()
        if state.canary is not None and state.canary.version == record.model_version:
            old = state.stable
            self.stack.save(replace(state, stable=state.canary, canary=None, canary_percent=0))
            if old is not None:
                stop_process(old.pid)
        elif state.stable is None or state.stable.version != record.model_version:
            raise RolloutError(f"version {record.model_version} is not running locally: cannot promote it")

    def roll_back(self, record: RolloutRecord) -> None:
        state = self.stack.load()
        if state.canary is not None and state.canary.version == record.model_version:
            self.stack.save(replace(state, canary=None, canary_percent=0))
            stop_process(state.canary.pid)
            return
        if state.stable is not None and state.stable.version == record.model_version:
            current = state.stable
            if not record.previous_version:
                # a failed first (or forced) deployment: nothing to fall back to. `fraud deploy
                # rollback` refuses this case before it gets here (rollout.manual_rollback).
                self.stack.save(replace(state, stable=None, canary=None, canary_percent=0))
                stop_process(current.pid)
                return
            try:
                previous = self.stack.start_predictor(record.previous_version, self._bundle(record.previous_version))
            except ReadinessTimeout as exc:
                raise RolloutError(
                    f"previous version {record.previous_version} did not start ({exc}); "
                    f"version {record.model_version} keeps serving"
                ) from None
            self.stack.save(replace(state, stable=previous, canary=None, canary_percent=0))
            stop_process(current.pid)

    def metrics_source(self, prometheus_url: str, record: RolloutRecord) -> PrometheusSource | ScrapeSource:
        """The analysis reads a Prometheus that scrapes `prometheus_targets_file` when given its URL,
        else it scrapes the predictors' /metrics itself at the start and at each look."""
        if prometheus_url:
            return PrometheusSource(prometheus_url, drift=False)  # no drift transformer in the local canary
        state = self.stack.load()
        urls = {}
        for served in (state.canary, state.stable):
            if served is not None:
                urls[served.version] = f"{served.url}/metrics"
        if record.model_version not in urls:
            raise RolloutError(f"version {record.model_version} is not running locally")
        return ScrapeSource(urls)

    def describe(self) -> dict[str, Any]:
        state = self.stack.load()
        return {
            "target": "local",
            "router": state.router_url if state.router_port else None,
            "router_running": bool(state.router_pid and process_alive(state.router_pid)),
            "stable": {**asdict(state.stable), "healthy": self.stack.healthy(state.stable)} if state.stable else None,
            "canary": {**asdict(state.canary), "healthy": self.stack.healthy(state.canary)} if state.canary else None,
            "canary_percent": state.canary_percent,
        }
