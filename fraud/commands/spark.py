"""`fraud spark submit`: run the offline feature build as a Kubeflow Spark Operator SparkApplication
(`fraud.deploy.spark`) and wait for it; a failure prints the driver's reason on one line.

    fraud spark submit --namespace fraud-prod --feature-tables-uri s3://fraud-feature-tables-prod/offline \\
                       --executors 8 --executor-memory 8g
"""

from __future__ import annotations

import uuid
from typing import Annotated

import typer

from fraud.errors import UserError

spark_app = typer.Typer(help="The feature build on the Kubeflow Spark Operator.", no_args_is_help=True)


class SparkJobFailed(UserError):
    """The SparkApplication failed or could not be run (exit code 1, not a usage error)."""

    exit_code = 1


@spark_app.command("submit")
def submit_command(
    namespace: Annotated[str, typer.Option("--namespace", help="Namespace of the SparkApplication.")],
    feature_tables_uri: Annotated[
        str, typer.Option("--feature-tables-uri", help="Where the driver copies the tables (s3://... or a folder).")
    ] = "",
    image: Annotated[str, typer.Option("--image", help="Core image. Default: $FRAUD_CORE_IMAGE or the release.")] = "",
    executors: Annotated[int, typer.Option("--executors", help="Executor pods.")] = 4,
    executor_cores: Annotated[int, typer.Option("--executor-cores", help="Cores per executor.")] = 2,
    executor_memory: Annotated[str, typer.Option("--executor-memory", help="Heap per executor, e.g. 8g.")] = "8g",
    driver_memory: Annotated[str, typer.Option("--driver-memory", help="Driver heap, e.g. 4g.")] = "4g",
    data_claim: Annotated[
        str, typer.Option("--data-claim", help="ReadWriteMany claim with the data directory.")
    ] = "fraud-feature-data",
    materialize: Annotated[
        bool,
        typer.Option(
            "--materialize",
            help="After the copy, the driver runs feast apply and materialises incrementally into the online "
            "store (needs --feature-tables-uri).",
        ),
    ] = False,
    name: Annotated[str, typer.Option("--name", help="Application name. Default: fraud-features-<random>.")] = "",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for completion.")] = 14_400.0,
    kubeconfig: Annotated[
        str | None, typer.Option("--kubeconfig", help="kubeconfig file (default ~/.kube/config)")
    ] = None,
    kube_context: Annotated[str | None, typer.Option("--kube-context", help="kubeconfig context")] = None,
    poll: Annotated[float, typer.Option("--poll", help="Seconds between status reads.")] = 10.0,
) -> None:
    """Create the feature-build SparkApplication, wait until it COMPLETES; exit 1 with its error otherwise."""

    from fraud.deploy.spark import SparkApplicationError, SparkApplicationRunner, SparkFeatureJob
    from fraud.settings import current

    try:
        job = SparkFeatureJob(
            name=name or f"fraud-features-{uuid.uuid4().hex[:10]}",
            namespace=namespace,
            image=image or current().core_image,
            feature_tables_uri=feature_tables_uri,
            executor_instances=executors,
            executor_cores=executor_cores,
            executor_memory=executor_memory,
            driver_memory=driver_memory,
            data_claim=data_claim,
            materialize=materialize,
        )
    except SparkApplicationError as exc:
        raise UserError(str(exc)) from None
    try:
        runner = SparkApplicationRunner(namespace, kubeconfig=kubeconfig, context=kube_context, poll_seconds=poll)
        runner.run(job, timeout)
    except SparkApplicationError as exc:
        raise SparkJobFailed(str(exc)) from None
    typer.echo(f"SparkApplication {namespace}/{job.name} COMPLETED")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(spark_app, name="spark")
