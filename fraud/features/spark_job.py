"""Main file of the feature-build SparkApplication (`fraud.deploy.spark`): the driver runs
`fraud features build --engine spark` on the master spark-submit gave it, then copies the tables
to the object store and, with `--materialize`, registers the feature repository (`fraud features
apply`) and loads the new snapshots into the online store (`fraud features materialize
--incremental`), as the daily feature pipeline's materialise step does.

    spark_job.py --data-dir /data [--feature-tables-uri s3://bucket/features] [--materialize] [other build options]

The Spark Operator starts this file with spark-submit in cluster mode; the master
(`k8s://https://...`), the executors and their resources come from the SparkApplication and reach
this process as the Spark configuration of its JVM, which the build's session picks up. Run by
hand (no JVM configuration), it builds on `--spark-master` or the build's default.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fraud.config import DataLayout
from fraud.errors import UserError


def submitted_master() -> str | None:
    """The master spark-submit passed to this driver (`spark.master` of its JVM), None outside spark-submit."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        return None
    from pyspark import SparkConf

    return SparkConf().get("spark.master", None)


@dataclass(frozen=True)
class JobArguments:
    """What the job's command line asks for."""

    #: arguments of `fraud` for the build
    build: list[str]
    #: the build's `--data-dir` (None: the settings' default)
    data_dir: str | None
    #: where the tables are copied ('' = not copied)
    feature_tables_uri: str
    #: arguments of `fraud` run after the copy: apply, then incremental materialisation ([] = none)
    then: list[list[str]]


def build_arguments(argv: list[str], master: str | None) -> JobArguments:
    """The `fraud` commands the job's command line stands for."""
    parser = argparse.ArgumentParser(prog="spark_job.py", add_help=True)
    parser.add_argument("--feature-tables-uri", default="")
    parser.add_argument("--materialize", action="store_true")
    parser.add_argument("--data-dir", default=None)
    known, rest = parser.parse_known_args(argv)
    data_dir = ["--data-dir", known.data_dir] if known.data_dir else []
    command = ["features", "build", "--engine", "spark"]
    if master and "--spark-master" not in rest:
        command += ["--spark-master", master]
    then: list[list[str]] = []
    if known.materialize:
        then = [["features", "apply", *data_dir], ["features", "materialize", "--incremental", *data_dir]]
    return JobArguments(command + data_dir + rest, known.data_dir, known.feature_tables_uri, then)


def _layout_of(job: JobArguments) -> DataLayout:
    """The data directory the build wrote to: its `--data-dir`, else the settings' default."""
    from fraud.settings import Settings

    return DataLayout(Path(job.data_dir).resolve()) if job.data_dir else Settings.from_env().layout


def _run(command: list[str]) -> None:
    """One `fraud` command in this process; a failure ends the job with its exit code."""
    from fraud import cli

    try:
        cli.main(command)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def main(argv: list[str] | None = None) -> None:
    job = build_arguments(sys.argv[1:] if argv is None else argv, submitted_master())
    _run(job.build)
    if job.feature_tables_uri:
        from fraud import storage

        layout = _layout_of(job)
        try:
            storage.put_folder(layout.features, job.feature_tables_uri)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
    for command in job.then:  # the tables are stored before the online store is touched
        _run(command)


if __name__ == "__main__":
    main()
