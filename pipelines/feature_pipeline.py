"""The daily feature pipeline: ingest the raw transactions -> rebuild the offline feature tables
(stored in the object store) -> `feast apply` -> materialise incrementally into the online store
(Redis), from where the previous materialisation ended. Scheduled daily by
`fraud pipeline schedule`; the training pipeline is scheduled weekly."""

from kfp import compiler, dsl

from components.training import engineer_features, ingest
from pipelines.platform import configure_task

PIPELINE_NAME = "fraud-features"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate raw transactions, rebuild the Feast offline feature tables and materialise the new "
    "snapshots incrementally into the online store.",
)
def feature_pipeline(data_uri: str, feature_tables_uri: str, max_timestamp: str = ""):
    ingest_task = ingest(data_uri=data_uri, max_timestamp=max_timestamp)
    ingest_task.set_display_name("ingest: validate raw transactions")
    configure_task(ingest_task, "ingest")

    features_task = engineer_features(
        valid_transactions=ingest_task.outputs["valid_transactions"],
        feature_tables_uri=feature_tables_uri,
        incremental=True,
    )
    features_task.set_display_name("engineer_features: offline tables, feast apply, incremental materialisation")
    configure_task(features_task, "engineer-features")


def compile_feature_pipeline(package_path: str) -> str:
    """Compile to KFP IR YAML at `package_path`."""
    compiler.Compiler().compile(pipeline_func=feature_pipeline, package_path=package_path)
    return package_path
