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

from fraud.features.definitions import MODEL_FEATURES

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
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    start = completed.stdout.index("{")
    return json.loads(completed.stdout[start:])


def run_json_line(script: str, args: list[str]) -> dict:
    """A benchmark that prints one JSON line per measurement, run without the FRAUD_* settings of
    this process (it makes its own data directory and stores): that one line, parsed."""
    completed = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    return json.loads(line)


def test_model_benchmark_smoke(tmp_path: Path) -> None:
    from tests.factories import make_synthetic_bundle

    bundle = make_synthetic_bundle(tmp_path / "bundle")
    report = run_json(["benchmarks/bench_scoring.py", "model", "--smoke", "--no-save", "--bundle", str(bundle)])
    assert report["benchmark"] == "scoring_model" and report["smoke"] is True
    assert report["bundle"]["features"] == len(MODEL_FEATURES)
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


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_serving_benchmark_smoke_predictor_only(tmp_path: Path) -> None:
    """The serving benchmark as CI runs it: our predictor (this checkout, and HEAD's code exported as
    a same-run baseline) without MLServer; wrk comes from scripts/ensure-services.sh."""
    from tests.conftest import require
    from tests.factories import make_synthetic_bundle

    require(shutil.which("wrk"), "wrk (Debian package wrk; scripts/ensure-services.sh installs it)")
    require((ROOT / ".git").exists(), "a git checkout (the baseline is exported with git archive)")
    bundle = make_synthetic_bundle(tmp_path / "bundle")
    output = tmp_path / "scoring_serving_smoke.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "benchmarks/bench_scoring.py",
            "serving",
            "--smoke",
            "--no-mlserver",
            "--baseline",
            "HEAD",
            "--bundle",
            str(bundle),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the benchmark stops the servers it started
        stdout, stderr = process.communicate(timeout=120)
        pytest.fail(f"the serving smoke run did not finish within 1500 s:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(output.read_text())
    head = next(name for name in report["systems"] if name.startswith("predictor@"))
    assert set(report["systems"]) == {"predictor", head}
    assert report["machine"]["load_average_1m"] >= 0 and report["load_average_1m_end"] >= 0
    for system in report["systems"].values():
        saturation = system["saturation"]
        assert saturation["median_requests_per_s"] > 0 and saturation["median_p99_ms"] > 0
        assert saturation["errors"] == 0 and saturation["runs"][0]["requests"] > 0
        assert "load_average_1m" in saturation["runs"][0]
        (fixed,) = system["fixed_rate"].values()
        assert fixed["median_p50_ms"] > 0 and fixed["runs"][0]["sent"] > 0 and fixed["errors"] == 0
        (batched,) = system["batched"].values()
        assert batched["median_transactions_per_s"] > 0 and batched["errors"] == 0
    ratios = report["this_checkout_over_baseline"][head]
    assert ratios["saturation_ratio"] > 0 and ratios["batch_10_ratio"] > 0
    assert report["throughput_ratio_predictor_over_mlserver"] is None
    assert "predictor" in stdout and "| system |" in stdout


def test_audit_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    report = run_json(
        [
            "benchmarks/bench_audit.py",
            "--single-calls",
            "5",
            "--batch-calls",
            "2",
            "--drain",
            "300",
            "--output",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    assert report["drain"]["sqlite"]["decisions"] == 300 and report["drain"]["sqlite"]["decisions_per_s"] > 0
    payloads = report["request_payloads_1000"]
    assert payloads["decision_payloads"]["median_us_per_decision"] > 0
    assert payloads["records_then_to_payload"]["median_us_per_decision"] > 0


def test_fullpath_cpu_accounting_finds_the_stack_processes() -> None:
    """The full-path benchmark books CPU per role by the children's command lines."""
    from bench_scoring import cpu_seconds, stack_processes

    # Each child burns 0.3 s of CPU, then sleeps. The kernel books CPU time in clock ticks (10 ms)
    # separately for user and system time, so the accounting may read up to two ticks low.
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    children = [
        subprocess.Popen([sys.executable, "-c", burn, *role]) for role in (["-m", "predictor"], ["audit", "writer"])
    ]
    try:
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = stack_processes("sqlite")
            seconds = cpu_seconds(found)
            if set(found) == {"predictor", "audit writer"} and min(seconds.values()) >= 0.25:
                break
            time.sleep(0.1)
        assert set(found) == {"predictor", "audit writer"}
        assert {role: process.pid for role, process in found.items()} == {
            "predictor": children[0].pid,
            "audit writer": children[1].pid,
        }
        assert min(seconds.values()) >= 0.25
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_lookup_benchmark_smoke(tmp_path: Path) -> None:
    from datetime import datetime

    from tests.factories import hand_made_raw_transactions, materialised_sqlite_store

    root = tmp_path / "data"
    raw = hand_made_raw_transactions(
        [f"C{i:07d}" for i in range(12)],
        [f"T{i:07d}" for i in range(6)],
        datetime(2024, 3, 1),
        8,
        seed=5,
        amount_step=10,
    )
    patch = materialised_sqlite_store(root, raw)
    try:
        report = run_json(
            [
                "benchmarks/bench_scoring.py",
                "lookup",
                "--smoke",
                "--no-save",
                "--stores",
                "sqlite",
                "--data-dir",
                str(root),
            ],
            env={"FRAUD_DATA_DIR": str(root)},
        )
    finally:
        patch.undo()
    assert report["benchmark"] == "scoring_lookup" and report["smoke"] is True
    assert {(r["pairs"], r["path"]) for r in report["results"]} == {
        (n, path) for n in (1, 10) for path in ("batched reader", "online_read per view")
    }
    assert all(r["median_ms"] > 0 and r["store"] == "sqlite" for r in report["results"])


@pytest.mark.slow
def test_online_health_benchmark_smoke() -> None:
    """bench_online_health.py on a tiny SQLite store (apply + materialise + rebuild: ~60 s of CPU)."""
    args = ["--customers", "8", "--days", "4", "--repeat", "3", "--stores", "sqlite", "--no-save"]
    result = run_json_line("benchmarks/bench_online_health.py", args)
    assert result["online"] == "sqlite" and result["repeat"] == 3
    assert all(result[key] > 0 for key in ("check_ms", "lookup_ms", "rebuild_s", "materialise_s"))


def test_feature_engines_benchmark_smoke() -> None:
    report = run_json(["benchmarks/bench_feature_engines.py", "--smoke", "--no-save", "--engines", "duckdb"])
    assert report["benchmark"] == "feature_engines" and report["smoke"] is True
    (run,) = report["runs"]
    assert run["engine"] == "duckdb" and run["exit_code"] == 0, run["error"]
    assert run["transactions"] > 0 and run["wall_s"] > 0 and run["peak_rss_mib"] > 0
    assert run["memory_setting"] == "6GB" and run["load_average_at_start"] >= 0


@pytest.mark.slow
def test_freshness_benchmark_smoke() -> None:
    """bench_freshness.py for 2 s at 100 tx/s against Redis: every probe's effect is read back."""
    args = ["--rates", "100", "--seconds", "2", "--baseline-ref", "", "--no-save"]
    result = run_json_line("benchmarks/bench_freshness.py", args)
    assert result["aggregator"] == "current" and result["rate_tx_s"] == 100
    assert result["probe_timeouts"] == 0 and result["freshness"]["n"] > 0
    assert 0 < result["freshness"]["p50_ms"] <= result["freshness"]["p99_ms"]
    assert result["velocity_lookup"]["n"] == result["freshness"]["n"]


def test_candidate_features_use_only_labels_known_at_the_transaction_day() -> None:
    """The candidate-feature benchmark's history features, on a hand-made history (delay 7 days)."""
    import pandas as pd
    from bench_candidate_features import CAP_DAYS, DailyHistory, candidate_columns

    day0 = pd.Timestamp("2018-04-01")

    def tx(customer: str, terminal: str, day: int, fraud: int) -> dict:
        return {
            "customer_id": customer,
            "terminal_id": terminal,
            "tx_datetime": day0 + pd.Timedelta(days=day, hours=10),
            "tx_fraud": fraud,
        }

    history = pd.DataFrame(
        [
            tx("C1", "T1", 0, 0),
            tx("C1", "T1", 10, 1),  # T1's episode starts on day 10
            tx("C2", "T1", 15, 1),  # same episode (5 days later)
            tx("C2", "T1", 30, 1),  # 15 days later: a new episode
            tx("C1", "T2", 8, 0),
            tx("C1", "T2", 20, 0),
            tx("C3", "T2", 40, 0),
        ]
    )
    frame = pd.DataFrame([tx("C1", "T1", 18, 0), tx("C1", "T1", 23, 0), tx("C2", "T1", 40, 0), tx("C3", "T2", 40, 0)])
    columns = candidate_columns(frame, DailyHistory(history, "customer_id"), DailyHistory(history, "terminal_id"), 7)
    # day 18: labels known up to day 10 -> T1's fraud of day 10 (8 days ago), episode started then
    # day 23: known up to day 15 -> last fraud day 15 (8 days ago), episode start day 10 (13 days)
    # day 40: known up to day 32 -> last fraud day 30 (10 days ago), a new episode started then
    assert list(columns["terminal_days_since_known_fraud"]) == [8, 8, 10, CAP_DAYS]
    assert list(columns["terminal_days_since_fraud_episode_start"]) == [8, 13, 10, CAP_DAYS]
    # the 7-day windows: days 4..10 (C1: day 8 genuine, day 10 fraud), 9..15 (C1: day 10), 26..32
    # (C2: day 30); C1's fraud of day 10 is not known before day 18
    assert list(columns["customer_nb_known_fraud_7d"]) == [1, 1, 1, 0]
    assert list(columns["customer_known_fraud_share_7d"]) == [0.5, 1.0, 1.0, 0.0]
    assert list(columns["customer_nb_known_fraud_30d"]) == [1, 1, 2, 0]
    early = candidate_columns(
        frame.assign(tx_datetime=frame["tx_datetime"] - pd.Timedelta(days=1)).iloc[:1],
        DailyHistory(history, "customer_id"),
        DailyHistory(history, "terminal_id"),
        7,
    )
    assert early["customer_nb_known_fraud_30d"][0] == 0 and early["terminal_days_since_known_fraud"][0] == CAP_DAYS
    assert list(columns["customer_days_since_known_fraud"]) == [8, 13, 10, CAP_DAYS]
