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


def register_variant(reg: Registry, root: Path, kind: str) -> str:
    """Register a bad candidate the way real incidents make them, from the first version's model:

    * `decline-everything` - the same model with thresholds that decline every transaction;
    * `two-outputs`        - a model that loads but returns two probabilities per row.
    Returns the new version."""
    import json
    import shutil

    import mlflow
    import xgboost as xgb

    from fraud.bundle import MANIFEST_FILE
    from tests.factories import restamp_bundle_digests, synthetic_feature_matrix

    target = root / f"bundle-{kind}"
    shutil.copytree(reg.bundles[reg.versions[0]], target)
    if kind == "decline-everything":
        manifest = json.loads((target / MANIFEST_FILE).read_text())
        manifest["thresholds"] = {"review": 0.0, "decline": 0.0}
        (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    elif kind == "two-outputs":
        features, label = synthetic_feature_matrix(500, 0)
        dtrain = xgb.DMatrix(features, label=label, feature_names=list(features.columns))
        params = {"objective": "multi:softprob", "num_class": 2, "max_depth": 2, "nthread": 1}
        xgb.train(params, dtrain, num_boost_round=3).save_model(target / "model.ubj")
        restamp_bundle_digests(target)
    else:
        raise ValueError(f"unknown variant {kind!r}")
    experiment = registry.client(reg.uri).get_experiment_by_name(registry.EXPERIMENT_NAME)
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_param("purpose", f"deploy-test {kind}")
    return registry.register_bundle(target, run.info.run_id, uri=reg.uri)
