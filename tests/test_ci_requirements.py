"""The CI rule of tests/conftest.py: with CI set, a skip for a missing tool or service fails the
run; without it the same test skips. Checked on a throw-away test module run by a real pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from fraud.config import PROJECT_ROOT
from tests import conftest

SAMPLE = """
import shutil

import pytest

from tests.conftest import require


@pytest.mark.skipif(True, reason="kubectl (with kustomize) is not installed")
def test_skipif_marker():
    pass


def test_skip_call():
    pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432: refused")


def test_require():
    require(shutil.which("no-such-tool-here"), "no-such-tool-here")


def test_optional():
    pytest.skip("gcsfs is installed; the missing-package message cannot be shown")


@pytest.mark.xfail(reason="expected")
def test_xfail():
    raise AssertionError


def test_passes():
    require(True, "always there")
"""

MODULE_SKIP = """
import pytest

pytest.skip("../shared is absent: no CRD schema", allow_module_level=True)


def test_never_collected():
    pass
"""


def run_sample(tmp_path, ci: bool) -> dict[str, str]:
    """Test name -> outcome (passed, failed, skipped, xfailed, error) of the sample modules. A module-level
    skip fails collection in CI, which stops a plain run; the sample run continues past it to see the rest."""
    folder = tmp_path / ("ci" if ci else "local")
    folder.mkdir()
    (folder / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (folder / "test_sample.py").write_text(textwrap.dedent(SAMPLE))
    (folder / "test_module_skip.py").write_text(textwrap.dedent(MODULE_SKIP))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    report = folder / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={report}",
         "--continue-on-collection-errors",
         "--rootdir", str(folder), str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):  # noqa: S314 - the report our own pytest run just wrote
        name = case.get("name") or ""
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        if not kinds:
            outcomes[name] = "passed"
        elif kinds[0] == "skipped" and (case.find("skipped").get("type") == "pytest.xfail"):
            outcomes[name] = "xfailed"
        else:
            outcomes[name] = {"failure": "failed", "error": "error", "skipped": "skipped"}[kinds[0]]
    return outcomes


def test_missing_tools_skip_outside_ci(tmp_path):
    outcomes = run_sample(tmp_path, ci=False)
    assert outcomes == {
        "test_skipif_marker": "skipped",
        "test_skip_call": "skipped",
        "test_require": "skipped",
        "test_optional": "skipped",
        "test_xfail": "xfailed",
        "test_passes": "passed",
        "test_module_skip": "skipped",
    }


def test_missing_tools_fail_in_ci(tmp_path):
    outcomes = run_sample(tmp_path, ci=True)
    assert outcomes == {
        "test_skipif_marker": "error",  # skipif acts in the setup phase: a failed setup is an error
        "test_skip_call": "failed",
        "test_require": "failed",
        "test_optional": "skipped",
        "test_xfail": "xfailed",
        "test_passes": "passed",
        "test_module_skip": "error",
    }


def test_require_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="missing: promtool"):
        conftest.require(None, "promtool")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="required in CI: promtool"):
        conftest.require(None, "promtool")
    conftest.require("/usr/bin/promtool", "promtool")  # present: no exception


def test_redis_and_postgres_markers_check_their_server(monkeypatch):
    """Both services are checked the same way before a marked test runs."""
    monkeypatch.setattr(
        conftest, "SERVICES", {"redis": ("Redis", "127.0.0.1", 1), "postgres": ("PostgreSQL", "127.0.0.1", 1)}
    )
    conftest.reachable.cache_clear()
    monkeypatch.setattr(conftest, "IN_CI", True)
    for marker, name in (("redis", "Redis"), ("postgres", "PostgreSQL")):

        class Item:
            def get_closest_marker(self, wanted, marker=marker):
                return object() if wanted == marker else None

        with pytest.raises(pytest.fail.Exception, match=f"required in CI: {name} on 127.0.0.1:1"):
            conftest.pytest_runtest_setup(Item())
    conftest.reachable.cache_clear()
