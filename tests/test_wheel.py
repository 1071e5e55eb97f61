"""The wheel holds the product only: the packages of `[tool.hatch.build.targets.wheel]` (the
library, the KFP components and pipelines, the predictor) and nothing the tests, their stand-ins
or the benchmarks use. Built with the project's own build backend (hatchling), offline."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from fraud.config import PROJECT_ROOT

PRODUCT_PACKAGES = {"fraud", "components", "pipelines", "predictor"}
#: names that only tests, test doubles and benchmarks have
TEST_ONLY = ("tests/", "conftest", "/testing.py", "prometheus_stub", "kube_api", "kserve_crd", "kfp_api", "factories")


def build_wheel(out: Path) -> Path:
    script = "import sys; from hatchling.build import build_wheel; print(build_wheel(sys.argv[1]))"
    built = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return out / built.stdout.strip().splitlines()[-1]


def test_the_wheel_contains_the_product_packages_and_nothing_else(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    metadata = {name for name in top if name.endswith(".dist-info")}
    assert len(metadata) == 1
    assert top - metadata == PRODUCT_PACKAGES
    assert [name for name in names if any(marker in name for marker in TEST_ONLY)] == []
    assert not any(name.startswith(("benchmarks/", "drift_transformer/")) for name in names)
    # the product is all there: every module of the product packages in the repository
    for package in PRODUCT_PACKAGES:
        modules = {
            str(path.relative_to(PROJECT_ROOT))
            for path in (PROJECT_ROOT / package).rglob("*.py")
            if "__pycache__" not in path.parts
        }
        assert modules <= set(names), sorted(modules - set(names))
    # the console script the README documents
    (entry_points,) = [name for name in names if name.endswith("entry_points.txt")]
    assert "fraud = fraud.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_check_sees_a_test_double_in_a_wheel(tmp_path):
    planted = tmp_path / "planted.whl"
    with zipfile.ZipFile(planted, "w") as archive:
        archive.writestr("fraud/deploy/testing.py", "")
    assert [n for n in zipfile.ZipFile(planted).namelist() if any(m in n for m in TEST_ONLY)]
