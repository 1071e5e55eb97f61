"""A Prometheus server on a loopback port (Debian package `prometheus`): scrapes static
`/metrics` targets, loads the alert and recording rules of the project's PrometheusRule
(`manifests/prometheusrule.yaml`), answers PromQL over its HTTP API and serves its web UI.

`fraud serve --prometheus` runs one next to the local serving stack; the tests run one against
the live endpoints. Prometheus cannot listen on port 0: with `port=0` a free port is picked and
the start retried if another process took it in between.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx
import yaml

from fraud import atomic
from fraud.config import PROJECT_ROOT
from fraud.errors import UserError
from fraud.net import LOOPBACK, free_port

if TYPE_CHECKING:
    from fraud.serving_stack import ServingStack

#: the alert and recording rules the cluster's Prometheus Operator loads
PROMETHEUS_RULE = PROJECT_ROOT / "manifests" / "prometheusrule.yaml"
#: label every local target carries (the dashboard's $namespace, the rules' `by (namespace)`)
LOCAL_NAMESPACE = "local"
#: scrape and rule-evaluation interval of the Prometheus next to `fraud serve`
STACK_INTERVAL = "5s"
#: how the binary is installed (scripts/ensure-services.sh does it)
INSTALL_HINT = "Debian package prometheus (`make services` installs it)"


class PrometheusError(UserError):
    """Prometheus did not start, or answered a query with an error (the message is Prometheus's)."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def rule_groups(manifest: Path = PROMETHEUS_RULE) -> list[dict[str, Any]]:
    """The rule groups (`spec.groups`) of a PrometheusRule manifest."""
    try:
        document = yaml.safe_load(Path(manifest).read_text())
    except OSError as exc:
        raise UserError(f"cannot read the alert rules {manifest}: {exc.strerror}") from None
    groups = (document or {}).get("spec", {}).get("groups")
    if not isinstance(groups, list) or not groups:
        raise UserError(f"{manifest} has no spec.groups: not a PrometheusRule")
    return groups


def write_rule_file(path: Path, manifest: Path = PROMETHEUS_RULE) -> Path:
    """A Prometheus rule file with the PrometheusRule's groups (what the Operator hands Prometheus)."""
    atomic.write_text(path, yaml.safe_dump({"groups": rule_groups(manifest)}, sort_keys=False))
    return path


class LocalPrometheus:
    """One Prometheus process; `start()` returns once `/-/ready` answers, `stop()` ends it."""

    def __init__(
        self,
        workdir: Path,
        targets: Mapping[str, str],
        target_labels: Mapping[str, str],
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
        port: int = 0,
        file_sd: Mapping[str, Path] | None = None,
    ) -> None:
        """`targets`: scrape job name -> "host:port" (path /metrics); every target gets `target_labels`.
        `file_sd`: scrape job name -> a targets file Prometheus watches (`file_sd_configs`, e.g. the
        local canary's `LocalStack.prometheus_targets_file`), its targets also get `target_labels`."""
        self.workdir = Path(workdir)
        self.port = port
        self.config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [address], "labels": dict(target_labels)}]}
                for job, address in targets.items()
            ]
            + [
                {
                    "job_name": job,
                    "file_sd_configs": [{"files": [str(path)], "refresh_interval": interval}],
                    "relabel_configs": [
                        {"target_label": name, "replacement": value} for name, value in target_labels.items()
                    ],
                }
                for job, path in (file_sd or {}).items()
            ],
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = self.workdir / "prometheus.log"
        self._client = httpx.Client(timeout=30)

    def command(self, config: Path, port: int) -> list[str]:
        binary = prometheus_binary()
        if binary is None:
            raise UserError(f"prometheus is not installed: {INSTALL_HINT}")
        return [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address={LOOPBACK}:{port}",
            "--log.level=warn",
        ]

    def start(self, timeout: float = 120.0) -> Self:
        config = self.workdir / "prometheus.yml"
        atomic.write_text(config, yaml.safe_dump(self.config, sort_keys=False))
        for _attempt in range(3 if self.port == 0 else 1):
            port = self.port or free_port()
            command = self.command(config, port)
            self.url = f"http://{LOOPBACK}:{port}"
            with self.log_path.open("wb") as output:
                self.process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
                )
            if self._wait_ready(timeout):
                return self
            if "address already in use" not in self.log_path.read_text(errors="replace"):
                break
        raise PrometheusError(
            f"prometheus did not become ready (log {self.log_path}): "
            f"{self.log_path.read_text(errors='replace')[-2000:]}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        process = self.process
        if process is None:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if self._client.get(f"{self.url}/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self._terminate()
        return False

    def _terminate(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        self._terminate()
        self._client.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, **params: Any) -> Any:
        """`data` of a successful API answer; PrometheusError with Prometheus's message otherwise."""
        response = self._client.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        if body.get("warnings"):
            raise PrometheusError(f"{path} {params}: warnings {body['warnings']}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result samples (a vector) or the single scalar as a one-item list."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 90.0) -> list[dict[str, Any]]:
        """Poll until `expr` returns a non-empty result (e.g. once targets were scraped twice)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr!r} stayed empty for {timeout:.0f}s")
            time.sleep(0.5)


def stack_prometheus(stack: ServingStack) -> LocalPrometheus:
    """The Prometheus of `fraud serve --prometheus`: scrapes the transformer (drift), the predictor
    (scoring), the audit writer and the feature aggregator (freshness), with the alert rules loaded;
    its data and log live in `<log dir>/prometheus`."""
    config = stack.config
    if config.prometheus_port is None:
        raise UserError("the serving stack has no --prometheus-port")
    targets = {
        "transformer": f"{LOOPBACK}:{config.port}",
        "predictor": f"{LOOPBACK}:{config.predictor_port}",
    }
    for job, port in stack.sidecar_metrics_ports.items():
        if port and (job != "audit-writer" or config.audit) and (job != "aggregator" or config.velocity):
            targets[job] = f"{LOOPBACK}:{port}"
    workdir = config.log_dir / "prometheus"
    rules = write_rule_file(workdir / "rules.yaml")
    return LocalPrometheus(
        workdir,
        targets,
        {"namespace": LOCAL_NAMESPACE},
        rule_files=[rules],
        interval=STACK_INTERVAL,
        port=config.prometheus_port,
    )
