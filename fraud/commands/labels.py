"""`fraud labels` commands: ingest delayed fraud labels, emit them for a simulated period, show
and export the live model quality they yield."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fraud.commands.audit import DB_URL_HELP, open_audit_database, parse_time_option
from fraud.errors import UserError

labels_app = typer.Typer(help="Delayed fraud labels and live model quality.", no_args_is_help=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_quality(rows, title: str) -> None:
    """One row per model version and day; fits 80 columns (no borders, the model name in the title
    when all rows share it)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    models = sorted({row.model_name for row in rows})
    one_model = len(models) == 1
    table = Table(
        title=f"{title}: {models[0]}" if one_model else title,
        caption="scored = decisions, alerts = review or decline, AP = average precision, CP@100 = card precision@100",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0),
    )
    columns = ["version", "day", "scored", "labelled", "frauds", "alerts", "precision", "recall", "AP", "CP@100"]
    for column in ([] if one_model else ["model"]) + columns:
        table.add_column(column, justify="left" if column in ("model", "version", "day") else "right")
    for row in rows:
        table.add_row(
            *([] if one_model else [row.model_name]),
            row.model_version,
            row.day.isoformat(),
            str(row.n_decisions),
            str(row.n_labelled),
            str(row.n_fraud),
            str(row.n_flagged),
            _fmt(row.precision),
            _fmt(row.recall),
            _fmt(row.average_precision),
            _fmt(row.card_precision_at_100),
        )
    Console().print(table)


@labels_app.command("ingest")
def ingest(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet with transaction_id, label (0/1), reported_at")],
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
) -> None:
    """Load confirmed fraud / chargeback labels (idempotent) and recompute live quality of the days they touch."""
    from fraud.labels import ingest_labels, read_label_file

    labels = read_label_file(file)  # validated before the database is touched
    engine = open_audit_database(db_url)
    report = ingest_labels(engine, labels, source=str(file.resolve()))
    typer.echo(
        f"{report.labels_in_file} labels in {file}: {report.labels_changed} new or updated; "
        f"{len(report.matched_decision_days)} decision day(s) re-evaluated"
    )
    if report.quality:
        _print_quality(report.quality, "live quality (labelled decisions)")


@labels_app.command("quality")
def quality(
    model_version: Annotated[str | None, typer.Option("--model-version", help="Only this version")] = None,
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
) -> None:
    """Show the stored live quality per model version and day."""
    from fraud.labels import read_live_quality

    rows = read_live_quality(open_audit_database(db_url), model_version)
    if not rows:
        raise UserError("no live quality stored yet; ingest labels with `fraud labels ingest FILE`")
    _print_quality(rows, "live quality")


@labels_app.command("emit")
def emit(
    start: Annotated[str, typer.Option("--from", help="First transaction time (inclusive), ISO date/datetime")],
    end: Annotated[str, typer.Option("--to", help="Last transaction time (exclusive), ISO date/datetime")],
    out: Annotated[Path, typer.Option("--out", help="Label file to write (.csv or .parquet, atomic)")],
    raw: Annotated[
        Path | None, typer.Option("--raw", help="Simulated raw data folder (default <data dir>/raw)")
    ] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="Only labels reported by then (default: all)")] = None,
    frauds_only: Annotated[
        bool, typer.Option("--frauds-only", help="Emit only fraud reports (chargeback feed)")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the reporting delays")] = 0,
) -> None:
    """Write the label feed of a simulated period: frauds reported after a realistic delay,
    genuine transactions confirmed after the label delay."""
    from fraud.config import DataLayout
    from fraud.labels import simulated_labels, write_label_file
    from fraud.simulator import read_transactions

    lower = parse_time_option(start, "--from")
    upper = parse_time_option(end, "--to")
    if lower >= upper:
        raise UserError(f"--from ({lower.isoformat()}) must be before --to ({upper.isoformat()})")
    cutoff = parse_time_option(as_of, "--as-of")
    transactions = read_transactions(raw or DataLayout.current().raw, lower, upper)
    if transactions.empty:
        raise UserError(f"no simulated transactions in [{lower.isoformat()}, {upper.isoformat()})")
    labels = simulated_labels(transactions, seed=seed, as_of=cutoff, include_genuine=not frauds_only)
    write_label_file(labels, out)
    typer.echo(
        f"wrote {len(labels)} labels ({int(labels['label'].sum())} frauds) "
        f"for {len(transactions)} transactions to {out}"
    )


@labels_app.command("exporter")
def exporter(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Serve /metrics here")] = 9108,
    interval: Annotated[float, typer.Option("--interval", min=1.0, help="Seconds between refreshes")] = 60.0,
    min_coverage: Annotated[
        float, typer.Option("--min-coverage", min=0.0, max=1.0, help="Label coverage a day needs")
    ] = 0.9,
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
) -> None:
    """Serve the live-quality gauges (fraud_live_quality*) for Prometheus until interrupted."""
    import logging
    import time

    from prometheus_client import start_http_server
    from sqlalchemy.exc import OperationalError

    from fraud.labels import export_live_quality_gauges

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("fraud.labels")
    engine = open_audit_database(db_url)
    start_http_server(port)
    log.info("serving live-quality gauges on :%d/metrics", port)
    while True:
        try:
            published = export_live_quality_gauges(engine, min_coverage)
            log.info("published live quality of %d model version(s)", len(published))
        except OperationalError as exc:
            log.warning("audit database unavailable, gauges keep their last values: %s", str(exc.orig).strip())
        time.sleep(interval)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(labels_app, name="labels")
