"""Shared fixtures. Each test gets its own data directory through FRAUD_DATA_DIR."""

from __future__ import annotations

import pytest


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty data directory that fraud.config.DataLayout.current() resolves to."""
    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("FRAUD_DATA_DIR", str(path))
    return path
