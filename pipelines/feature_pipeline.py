"""The daily feature pipeline: ingest the raw transactions -> rebuild the offline feature tables
(stored in the object store) -> `feast apply` -> materialise incrementally into the online store
(Redis), from where the previous materialisation ended. Scheduled daily by
`fraud pipeline schedule`; the training pipeline is scheduled weekly.

`spark_feature_pipeline` is the same daily build for histories beyond one pod: the tables are
built by a Kubeflow Spark Operator SparkApplication (`components.spark`) reading the data volume,
then fetched, applied and materialised. `fraud pipeline upload` uploads both; `fraud pipeline
schedule --feature-engine duckdb|spark` chooses which one the daily recurring run uses."""

from kfp import compiler, dsl

from components.spark import build_features_spark, materialize_features
from components.training import engineer_features, ingest
from pipelines.platform import SPARK_SUBMITTER_TOKEN_DIR, configure_task

PIPELINE_NAME = "fraud-features"
SPARK_PIPELINE_NAME = "fraud-features-spark"


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


@dsl.pipeline(
    name=SPARK_PIPELINE_NAME,
    description="Rebuild the Feast offline feature tables with a Spark Operator SparkApplication, then apply and "
    "materialise the new snapshots incrementally into the online store.",
)
def spark_feature_pipeline(
    namespace: str,
    feature_tables_uri: str,
    executor_instances: int = 4,
    executor_memory: str = "8g",
    timeout_seconds: int = 14_400,
):
    build_task = build_features_spark(
        namespace=namespace,
        feature_tables_uri=feature_tables_uri,
        executor_instances=executor_instances,
        executor_memory=executor_memory,
        timeout_seconds=timeout_seconds,
        submitter_token_dir=SPARK_SUBMITTER_TOKEN_DIR,
    )
    build_task.set_display_name("build features: SparkApplication (Spark Operator)")
    configure_task(build_task, "build-features-spark")

    materialize_task = materialize_features(
        feature_tables_uri=feature_tables_uri, spark_application=build_task.outputs["Output"]
    )
    materialize_task.set_display_name("materialise: fetch tables, feast apply, incremental materialisation")
    configure_task(materialize_task, "materialize-features")


def compile_spark_feature_pipeline(package_path: str) -> str:
    """Compile the Spark Operator variant to KFP IR YAML at `package_path`."""
    compiler.Compiler().compile(pipeline_func=spark_feature_pipeline, package_path=package_path)
    return package_path
