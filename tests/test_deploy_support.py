"""Shared builders for the deploy test modules (no tests here): a real MLflow SQLite registry
holding a few versions of the model, each a real serving bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fraud import registry
from fraud.config import MODEL_NAME
from tests.factories import make_synthetic_bundle


@dataclass(frozen=True)
class Registry:
    uri: str
    versions: tuple[str, ...]
    bundles: dict[str, Path]

    def champion(self) -> str | None:
        return registry.get_version_by_alias("champion", uri=self.uri)

    def decisions(self, version: str) -> dict[str, str]:
        return registry.get_decisions(version, uri=self.uri)

    def reset(self, champion: str) -> None:
        """Champion back to `champion`, decision tags of every version cleared."""
        client = registry.client(self.uri)
        registry.set_alias("champion", champion, uri=self.uri)
        for version in self.versions:
            for key in list(client.get_model_version(MODEL_NAME, version).tags):
                if key.startswith(registry.DECISION_TAG_PREFIX):
                    client.delete_model_version_tag(MODEL_NAME, version, key)


def build_registry(root: Path, count: int, *, same_model: bool = False) -> Registry:
    """A SQLite registry below `root` with `count` registered versions; champion = the first.
    `same_model`: every version is trained on the same synthetic data (a retrain that changed
    nothing), so their score distributions agree."""
    import mlflow

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = registry.client(uri)
    experiment_id = client.create_experiment(registry.EXPERIMENT_NAME, artifact_location=str(root / "artifacts"))
    versions, bundles = [], {}
    for index in range(count):
        bundle = make_synthetic_bundle(
            root / f"bundle-{index}", version=str(index + 1), seed=0 if same_model else index
        )
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_param("purpose", "deploy-test")
        version = registry.register_bundle(bundle, run.info.run_id, uri=uri)
        versions.append(version)
        bundles[version] = bundle
    registry.set_alias("champion", versions[0], uri=uri)
    return Registry(uri, tuple(versions), bundles)
