"""Where things live: the layout part of the settings. Every path is derived from one data
directory so that a demo, a test and a pipeline run can each use their own without editing files.

The data directory is the setting `data_dir` (FRAUD_DATA_DIR, default `<project>/data`) of
fraud.settings.Settings; `DataLayout.of(settings)` is its layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FEATURE_REPO_DIR = PROJECT_ROOT / "feature_repo"
DRIFT_TRANSFORMER_DIR = PROJECT_ROOT / "drift_transformer"

#: Name under which the model is registered in MLflow and served by KServe.
MODEL_NAME = "fraud-detector"


def data_dir() -> Path:
    """The data directory of the process's settings (fraud.settings.Settings.data_dir)."""
    return DataLayout.current().root


@dataclass(frozen=True)
class DataLayout:
    """The folders and files below one data directory."""

    root: Path

    @classmethod
    def current(cls) -> DataLayout:
        """The layout of the settings in the process environment. Entry points read the settings
        once and pass `settings.layout` down; this is for library callers that were passed none."""
        # imported here: fraud.settings builds on this module (PROJECT_ROOT, DataLayout)
        from fraud.settings import current

        return current().layout

    @property
    def raw(self) -> Path:
        """Simulator output: transactions/ (Parquet partitioned by day), customers.parquet, terminals.parquet."""
        return self.root / "raw"

    @property
    def transactions(self) -> Path:
        return self.raw / "transactions"

    @property
    def customers(self) -> Path:
        return self.raw / "customers.parquet"

    @property
    def terminals(self) -> Path:
        return self.raw / "terminals.parquet"

    @property
    def features(self) -> Path:
        """Offline feature tables the feature store reads."""
        return self.root / "features"

    @property
    def feast(self) -> Path:
        """Feast registry and embedded online store."""
        return self.root / "feast"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def pipeline_root(self) -> Path:
        return self.root / "pipeline_root"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"
