"""`fraud audit migrate|show|export` through the real console script."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest

from fraud.audit.store import create_audit_engine, head_revision, insert_decisions
from tests.test_audit_support import FRAUD_CLI, make_decision


def fraud(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(FRAUD_CLI), *args], check=False, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def audit_env(tmp_path_factory):
    """Environment of a user with the embedded default database, migrated and holding 6 decisions
    (shared by the tests of this module, which only read it)."""
    data_dir = tmp_path_factory.mktemp("audit-cli") / "data"
    env = {k: v for k, v in os.environ.items() if k != "FRAUD_AUDIT_DB_URL"}
    env["FRAUD_DATA_DIR"] = str(data_dir)
    env["COLUMNS"] = "200"
    result = fraud("audit", "migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert head_revision() in result.stdout
    assert (data_dir / "audit" / "audit.db").is_file()
    engine = create_audit_engine(f"sqlite:///{data_dir / 'audit' / 'audit.db'}")
    records = [make_decision(i) for i in range(5)] + [make_decision(2, model_version="8", variant="canary")]
    with engine.begin() as connection:
        insert_decisions(connection, [r.to_row() for r in records])
    engine.dispose()
    return env


def test_show_prints_every_version_of_a_transaction(audit_env):
    result = fraud("audit", "show", "--transaction", "TX0000000002", "--json", env=audit_env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert [(d["model_version"], d["variant"]) for d in shown] == [("7", "stable"), ("8", "canary")]
    assert shown[0]["reason_codes"][0]["feature"] == "tx_amount"
    table = fraud("audit", "show", "-t", "TX0000000002", env=audit_env)
    assert table.returncode == 0 and "canary" in table.stdout and "tx_amount" in table.stdout


def test_show_of_an_unknown_transaction_exits_2(audit_env):
    result = fraud("audit", "show", "--transaction", "TX-nope", env=audit_env)
    assert result.returncode == 2
    assert "no decision recorded for transaction 'TX-nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_on_an_unmigrated_database_say_so(tmp_path, audit_env):
    env = {**audit_env, "FRAUD_AUDIT_DB_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    result = fraud("audit", "show", "--transaction", "TX0000000002", env=env)
    assert result.returncode == 2 and "fraud audit migrate" in result.stderr


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_the_half_open_range_atomically(audit_env, tmp_path, fmt):
    out = tmp_path / f"decisions.{fmt}"
    result = fraud(
        "audit",
        "export",
        "--from",
        "2026-11-01T12:00:01",
        "--to",
        "2026-11-01T12:00:04",
        "--format",
        fmt,
        "--out",
        str(out),
        env=audit_env,
    )
    assert result.returncode == 0, result.stderr
    assert "exported 4 decisions" in result.stdout
    if fmt == "csv":
        with out.open() as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = pq.read_table(out).to_pylist()
    assert [(r["transaction_id"], r["model_version"]) for r in rows] == [
        ("TX0000000001", "7"),
        ("TX0000000002", "7"),
        ("TX0000000002", "8"),
        ("TX0000000003", "7"),
    ]
    assert json.loads(rows[0]["features"])["terminal_risk_7d"] is None
    assert rows[0]["customer_id"] == "C0000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_export_rejects_bad_options_without_writing(audit_env, tmp_path):
    out = tmp_path / "out.csv"
    cases = [
        (["--from", "yesterday", "--to", "2027-01-01", "--format", "csv"], "--from"),
        (["--from", "2027-01-01", "--to", "2026-01-01", "--format", "csv"], "must be before --to"),
        (["--from", "2026-01-01", "--to", "2027-01-01", "--format", "xml"], "--format must be one of csv, parquet"),
    ]
    for args, message in cases:
        result = fraud("audit", "export", *args, "--out", str(out), env=audit_env)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
    missing_dir = fraud(
        "audit",
        "export",
        "--from",
        "2026-01-01",
        "--to",
        "2027-01-01",
        "--format",
        "csv",
        "--out",
        str(tmp_path / "no" / "such" / "dir.csv"),
        env=audit_env,
    )
    assert missing_dir.returncode == 2 and "does not exist" in missing_dir.stderr
    assert list(tmp_path.glob("*.csv")) == []
