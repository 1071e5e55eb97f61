"""Shared fixtures, and what a missing tool or service does to a test.

Outside CI a test whose tool (kubectl, promtool, prometheus), service (PostgreSQL, Redis) or input
(../shared CRD schemas, an image's entry point) is missing skips with a reason naming it. With the
environment variable CI set such a skip FAILS the test instead: CI must never pass a suite that did
not run. Tests call `require(...)`; skips raised any other way (`pytest.skip`, `skipif` markers,
module-level skips) are turned into failures by the report hooks below, except the reasons in
`OPTIONAL_IN_CI`. Tests marked `redis` or `postgres` check their server before they run, so both
services behave alike.
"""

from __future__ import annotations

import os
import re
import socket
from functools import cache

import pytest

IN_CI = bool(os.environ.get("CI"))

#: skip reasons that stay skips in CI, each with why
OPTIONAL_IN_CI = (
    # the message test needs gcsfs to be absent; with it installed there is nothing to show
    re.compile(r"gcsfs is installed"),
    # load-generator and MLServer comparisons are benchmark tools, not part of the product's CI
    re.compile(r"^wrk not installed"),
    re.compile(r"^benchmarks/mlserver/\.venv missing"),
)

SERVICES = {
    "redis": ("Redis", "127.0.0.1", 6379),
    "postgres": ("PostgreSQL", "127.0.0.1", 5432),
}


def require(available: object, what: str) -> None:
    """Skip the calling test when `available` is falsy - or fail it when CI is set.

    `what` names the missing tool or service and how to get it, e.g.
    `require(shutil.which("promtool"), "promtool (Debian package prometheus; make services installs it)")`.
    """
    if available:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {what}", pytrace=False)
    pytest.skip(f"missing: {what}")


@cache
def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (name, host, port) in SERVICES.items():
        if item.get_closest_marker(marker) is not None:
            require(reachable(host, port), f"{name} on {host}:{port} (`make services` starts it)")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not IN_CI or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(pattern.search(reason) for pattern in OPTIONAL_IN_CI):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI (CI is set), which counts as a failure: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    _fail_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    _fail_skip_in_ci(report)
    return report


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty data directory that fraud.config.DataLayout.current() resolves to."""
    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("FRAUD_DATA_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def _mlflow_exported_uris(monkeypatch):
    """`mlflow.set_tracking_uri` / `set_registry_uri` export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI
    into the process environment (for MLflow's subprocesses); undo that after each test, so a later
    test reading its settings from the environment does not inherit an earlier test's store."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
