"""Main file of the feature-build SparkApplication (`fraud.deploy.spark`): the driver runs
`fraud features build --engine spark` on the master spark-submit gave it, then copies the tables
to the object store.

    spark_job.py --data-dir /data [--feature-tables-uri s3://bucket/features] [other build options]

The Spark Operator starts this file with spark-submit in cluster mode; the master
(`k8s://https://...`), the executors and their resources come from the SparkApplication and reach
this process as the Spark configuration of its JVM, which the build's session picks up. Run by
hand (no JVM configuration), it builds on `--spark-master` or the build's default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fraud.config import DataLayout
from fraud.errors import UserError


def submitted_master() -> str | None:
    """The master spark-submit passed to this driver (`spark.master` of its JVM), None outside spark-submit."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        return None
    from pyspark import SparkConf

    return SparkConf().get("spark.master", None)


def build_arguments(argv: list[str], master: str | None) -> tuple[list[str], str]:
    """(arguments of `fraud`, feature tables URI) for the job's command line."""
    parser = argparse.ArgumentParser(prog="spark_job.py", add_help=True)
    parser.add_argument("--feature-tables-uri", default="")
    known, rest = parser.parse_known_args(argv)
    command = ["features", "build", "--engine", "spark"]
    if master and "--spark-master" not in rest:
        command += ["--spark-master", master]
    return command + rest, known.feature_tables_uri


def _layout_of(command: list[str]) -> DataLayout:
    """The data directory the build wrote to: its `--data-dir`, else the settings' default."""
    from fraud.settings import Settings

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-dir", default=None)
    known, _ = parser.parse_known_args(command)
    return DataLayout(Path(known.data_dir).resolve()) if known.data_dir else Settings.from_env().layout


def main(argv: list[str] | None = None) -> None:
    from fraud import cli

    command, feature_tables_uri = build_arguments(sys.argv[1:] if argv is None else argv, submitted_master())
    try:
        cli.main(command)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    if feature_tables_uri:
        from fraud import storage

        layout = _layout_of(command)
        try:
            storage.put_folder(layout.features, feature_tables_uri)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
