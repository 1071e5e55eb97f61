"""Each benchmark in its tiny --smoke mode, so the scripts do not rot: they must run, and their JSON
must have the documented shape with positive numbers. No timing is asserted (figures come from the
benchmarks themselves, see docs/performance.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from loadgen import WRK_MISSING, LoadGenError, run_open_loop, run_wrk  # noqa: E402

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")
needs_mlserver = pytest.mark.skipif(
    not (BENCH / "mlserver" / ".venv" / "bin" / "mlserver").exists(),
    reason="benchmarks/mlserver/.venv missing (cd benchmarks/mlserver && uv sync --frozen)",
)


def run_json(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> dict:
    completed = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    start = completed.stdout.index("{")
    return json.loads(completed.stdout[start:])


def test_model_benchmark_smoke(tmp_path: Path) -> None:
    from tests.factories import make_synthetic_bundle

    bundle = make_synthetic_bundle(tmp_path / "bundle")
    report = run_json(["benchmarks/bench_scoring.py", "model", "--smoke", "--no-save", "--bundle", str(bundle)])
    assert report["benchmark"] == "scoring_model" and report["smoke"] is True
    assert report["bundle"]["features"] == 16
    cases = {row["case"] for row in report["results"]}
    assert any(case.startswith("pred_contribs exact") for case in cases)
    assert any(case.startswith("BundleScorer.score") for case in cases)
    assert {row["batch"] for row in report["results"]} == {1, 100}
    for row in report["results"]:
        assert row["us_per_call"] > 0 and row["transactions_per_s_one_core"] > 0
        assert row["us_per_transaction"] == pytest.approx(row["us_per_call"] / row["batch"])


def test_pipeline_scale_benchmark_smoke(tmp_path: Path) -> None:
    report = run_json(
        ["benchmarks/bench_pipeline_scale.py", "--smoke", "--skip-feast", "--no-save", "--work-dir", str(tmp_path)]
    )
    (run,) = report["runs"]
    assert run["completed"] is True and run["transactions"] > 0
    assert set(run["phases"]) == {"simulate", "features_build"}
    for phase in run["phases"].values():
        assert phase["exit_code"] == 0 and phase["wall_s"] > 0 and phase["peak_rss_mib"] > 0
    assert run["features_rows_per_s"] > 0 and run["within_memory_limit"] is True
    assert not (tmp_path / "scale-1x-10d").exists()  # cleaned up without --keep


def test_wrk_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LoadGenError) as raised:
        run_wrk("http://127.0.0.1:9/", b"{}", connections=1, duration_s=1)
    assert str(raised.value) == WRK_MISSING and "apt-get install -y wrk" in WRK_MISSING


def test_load_generators_refuse_non_loopback_targets() -> None:
    with pytest.raises(LoadGenError, match="only loopback"):
        run_open_loop("http://192.0.2.1:80/x", [b"{}"], rate=1, duration_s=0.1)


@pytest.mark.slow
@needs_wrk
@needs_mlserver
def test_serving_benchmark_smoke(tmp_path: Path) -> None:
    from tests.factories import make_synthetic_bundle

    bundle = make_synthetic_bundle(tmp_path / "bundle")
    report = run_json(["benchmarks/bench_scoring.py", "serving", "--smoke", "--no-save", "--bundle", str(bundle)])
    assert set(report["systems"]) == {"predictor", "mlserver"}
    for system in report["systems"].values():
        saturation = system["saturation"]
        assert saturation["median_requests_per_s"] > 0 and saturation["median_p99_ms"] > 0
        assert saturation["median_client_cpu_cores"] >= 0
        (fixed,) = system["fixed_rate"].values()
        assert fixed["median_p50_ms"] > 0 and fixed["runs"][0]["sent"] > 0
    assert report["throughput_ratio_predictor_over_mlserver"] > 0
