"""KFP components of the daily feature build on the Kubeflow Spark Operator.

`build_features_spark` submits the feature build as a `SparkApplication` (`fraud.deploy.spark`:
driver and executors in `namespace`, running `fraud features build --engine spark` from the core
image), waits for it and fails with the driver's reason (`status.applicationState.errorMessage`).
Its pod does no feature work: it needs 100 m CPU whatever the history. `materialize_features`
then fetches the tables from `feature_tables_uri`, runs `feast apply` and materialises into the
online store, as `engineer_features` does after its in-pod build.

The submitting pod talks to the Kubernetes API as ServiceAccount `fraud-spark-submitter`
(token mounted from Secret `fraud-spark-submitter-token` at `submitter_token_dir`; Role: create,
get, list, watch, delete SparkApplications in its namespace, nothing else).
"""

from kfp import dsl
from kfp.dsl import Metrics, Output

from components.base import CORE_IMAGE


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def build_features_spark(
    namespace: str,
    feature_tables_uri: str,
    report: Output[Metrics],
    executor_instances: int = 4,
    executor_cores: int = 2,
    executor_memory: str = "8g",
    driver_memory: str = "4g",
    data_claim: str = "fraud-feature-data",
    timeout_seconds: int = 14_400,
    submitter_token_dir: str = "",
    core_image: str = "",
) -> str:
    """Run the offline feature build as a SparkApplication; return its name once COMPLETED."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    import time
    import uuid

    from components.base import CORE_IMAGE, deployer_kubeconfig
    from fraud.deploy.spark import SparkApplicationError, SparkApplicationRunner, SparkFeatureJob

    started = time.perf_counter()
    name = f"fraud-features-{uuid.uuid4().hex[:10]}"
    try:
        job = SparkFeatureJob(
            name=name,
            namespace=namespace,
            image=core_image or CORE_IMAGE,
            feature_tables_uri=feature_tables_uri,
            executor_instances=executor_instances,
            executor_cores=executor_cores,
            executor_memory=executor_memory,
            driver_memory=driver_memory,
            data_claim=data_claim,
        )
        runner = SparkApplicationRunner(namespace, kubeconfig=deployer_kubeconfig(submitter_token_dir))
        runner.run(job, timeout_seconds)
    except SparkApplicationError as exc:  # one line in the step's log: the driver's reason
        raise SystemExit(f"error: {exc}") from None
    report.log_metric("seconds", round(time.perf_counter() - started, 3))
    report.log_metric("executors", executor_instances)
    report.metadata.update({"spark_application": name, "namespace": namespace})
    return name


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def materialize_features(feature_tables_uri: str, spark_application: str, report: Output[Metrics]) -> str:
    """Fetch the tables the SparkApplication `spark_application` built, `feast apply`, materialise
    incrementally; return the last feature day."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from fraud.training.steps import materialize_feature_tables, task_layout

    result = materialize_feature_tables(feature_tables_uri, task_layout(), incremental=True)
    report.log_metric("customer_snapshot_rows", result.customer_rows)
    report.log_metric("terminal_snapshot_rows", result.terminal_rows)
    report.log_metric("seconds", round(result.seconds, 3))
    report.metadata.update({"spark_application": spark_application, "last_day": result.last_day})
    return result.last_day
