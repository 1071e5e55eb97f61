"""`fraud labels ingest|quality|exporter` through the real console script, on the scenario of
tests/test_labels.py (whose hand-computed values it checks end to end)."""

from __future__ import annotations

import os
import subprocess

import pytest

from fraud.audit.store import create_audit_engine, upgrade_database
from fraud.net import free_port
from tests.test_audit_support import FRAUD_CLI, scrape
from tests.test_labels import _label_frame, _seed_decisions


def test_cli_ingest_reports_and_bad_files_exit_2(tmp_path):
    db = tmp_path / "audit.db"
    engine = create_audit_engine(f"sqlite:///{db}")
    upgrade_database(engine)
    _seed_decisions(engine)
    engine.dispose()
    env = {
        **os.environ,
        "FRAUD_AUDIT_DB_URL": f"sqlite:///{db}",
        "FRAUD_DATA_DIR": str(tmp_path / "data"),
        "COLUMNS": "200",
    }
    good = tmp_path / "labels.csv"
    _label_frame().to_csv(good, index=False)
    result = subprocess.run(
        [str(FRAUD_CLI), "labels", "ingest", str(good)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "9 labels" in result.stdout and "9 new or updated" in result.stdout
    assert "0.6667" in result.stdout  # precision of version 1 on day 1
    bad = tmp_path / "bad.csv"
    bad.write_text("transaction_id,label,reported_at\nTX0000000001,7,2026-11-20\n")
    result = subprocess.run(
        [str(FRAUD_CLI), "labels", "ingest", str(bad)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "column label must be 0 or 1 (lines 2: '7')" in result.stderr and "Traceback" not in result.stderr

    shown = subprocess.run(
        [str(FRAUD_CLI), "labels", "quality", "--model-version", "2"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "2026-11-02" in shown.stdout and "0.5000" in shown.stdout and "2026-11-01" not in shown.stdout

    port = free_port()  # the standalone exporter serves the gauges from the stored table
    exporter = subprocess.Popen(
        [str(FRAUD_CLI), "labels", "exporter", "--port", str(port), "--interval", "1", "--min-coverage", "0.8"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        labels = 'model_name="fraud-detector",model_version="1"'
        assert scrape(port, f'fraud_live_quality{{metric="precision",{labels}}}') == pytest.approx(2 / 3)
    finally:
        exporter.terminate()
        exporter.wait(10)
