"""A real Prometheus server (Debian package `prometheus`) on a loopback port for tests: scrapes
static targets, optionally loads rule files, answers PromQL over its HTTP API.

Prometheus cannot listen on port 0, so a free port is picked and the start retried if another
process took it in between.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require

#: metric type (Prometheus metadata API) -> series names a family exports once it has a child
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


#: our series and recording-rule names (`fraud_...`, `fraud:...`) as they appear in a query
OUR_NAMES = re.compile(r"(?<![\w:-])fraud[_:][A-Za-z0-9_:]*")


class PrometheusError(AssertionError):
    pass


def names_read(expr: str) -> set[str]:
    """Our series names in a query (the project's metrics all start with `fraud_`, its recording
    rules with `fraud:`); whether the query is valid PromQL is Prometheus's or promtool's call."""
    return set(OUR_NAMES.findall(expr))


def exposition_names(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition offers, the way `LocalPrometheus.series_names`
    counts them: sample names, plus what a declared family exports once it has a child."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        names.update(f"{family.name}{suffix}" for suffix in SUFFIXES.get(family.type, ()))
    return names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPrometheus:
    def __init__(
        self,
        workdir: Path,
        targets: Mapping[str, str],
        target_labels: Mapping[str, str],
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
    ) -> None:
        """`targets`: scrape job name -> "host:port" (path /metrics); every target gets `target_labels`."""
        self.workdir = workdir
        self.config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [address], "labels": dict(target_labels)}]}
                for job, address in targets.items()
            ],
        }
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._client = httpx.Client(timeout=30)

    def start(self, timeout: float = 120.0) -> Self:
        binary = shutil.which("prometheus")
        require(binary, "prometheus (Debian package prometheus; `make services` installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        log = self.workdir / "prometheus.log"
        for _attempt in range(3):
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            with log.open("w") as output:
                self.process = subprocess.Popen(
                    [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                    stdout=output, stderr=subprocess.STDOUT,
                )  # fmt: skip
            if self._wait_ready(timeout):
                return self
            if "address already in use" not in log.read_text():
                break
        raise PrometheusError(f"prometheus did not become ready: {log.read_text()[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self._client.get(f"{self.url}/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
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

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result samples (a vector) or the single scalar as a one-item list."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float = 90.0) -> list[dict]:
        """Poll until `expr` returns a non-empty result (e.g. once targets were scraped twice)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr!r} stayed empty for {timeout:.0f}s")
            time.sleep(0.5)

    def series_names(self) -> set[str]:
        """Every series name the targets export: names with samples, plus those a declared family
        (metadata from `# TYPE`) exports once it has a child (a labelled counter with no child yet)."""
        names = set(self.api("label/__name__/values"))
        for family, entries in self.api("metadata").items():
            names.add(family)
            for entry in entries:
                names.update(f"{family}{suffix}" for suffix in SUFFIXES.get(entry["type"], ()))
        return names
