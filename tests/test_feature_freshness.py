"""Operating the online store: a copied data directory never touches the original's store, the
online TTL, detection and rebuild of a lost online store, and the plain Feast CLI without any
exported variable. Real Feast stores (SQLite files, Redis on 127.0.0.1:6379), no mocks."""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from test_features_offline import random_transactions, write_raw_transactions

from fraud.config import DataLayout


def _fraud(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the `fraud` CLI in-process; (exit code, stdout, stderr)."""
    from fraud.cli import main

    monkeypatch.setattr(sys, "argv", ["fraud", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as exited:
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT", "FRAUD_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FRAUD_DATA_DIR", "/nonexistent-restored-by-monkeypatch")  # the CLI sets it; undone after


def _raw_data_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    raw = random_transactions(seed=11, n_customers=12, n_terminals=10, n_days=12)
    write_raw_transactions(DataLayout(root), raw)
    return root


def test_a_copied_data_directory_never_touches_the_original_store(tmp_path, monkeypatch, capsys, clean_env) -> None:
    a = _raw_data_dir(tmp_path / "A")
    code, out, err = _fraud(monkeypatch, capsys, "features", "all", "--data-dir", str(a), "--samples", "1")
    assert code == 0, err
    online_a = a / "feast" / "online_store.db"
    before = _tables(online_a)
    assert any("customer_spending" in t for t in before), before
    c = tmp_path / "C"
    shutil.copytree(a, c)
    code, out, err = _fraud(monkeypatch, capsys, "features", "all", "--data-dir", str(c), "--samples", "1")
    assert code == 0, err
    assert _tables(online_a) == before, "building the copy changed the original's online store"
    code, out, err = _fraud(monkeypatch, capsys, "features", "all", "--data-dir", str(a), "--samples", "1")
    assert code == 0, err
    assert "Traceback" not in out + err
    assert _tables(online_a) == before
