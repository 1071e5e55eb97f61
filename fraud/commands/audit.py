"""`fraud audit` commands: migrate the audit database, show and export decisions, run the writer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fraud.errors import UserError

DB_URL_HELP = "Audit database URL (default: FRAUD_AUDIT_DB_URL, else <data dir>/audit/audit.db)"

audit_app = typer.Typer(
    help="The decision audit trail: migrate, grant, show, export, verify, and the spool writer.", no_args_is_help=True
)


def parse_time_option(value: str | None, option: str):
    """An ISO date/datetime (UTC when no offset) from a CLI option, or None."""
    if value is None:
        return None
    from fraud.schema import parse_timestamp

    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def open_audit_database(db_url: str | None, *, require_migrated: bool = True):
    """An engine on the audit database, checked reachable (and migrated); UserError otherwise."""
    from sqlalchemy.exc import OperationalError

    from fraud.audit.store import create_audit_engine, require_schema

    engine = create_audit_engine(db_url)
    try:
        if require_migrated:
            require_schema(engine)
        else:
            with engine.connect():
                pass
    except OperationalError as exc:
        where = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise UserError(f"cannot open the audit database {where}: {reason}") from None
    return engine


@audit_app.command("migrate")
def migrate(
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
    writer_role: Annotated[
        str | None, typer.Option("--writer-role", help="Then grant this role INSERT on decisions (PostgreSQL)")
    ] = None,
    reader_role: Annotated[
        str | None, typer.Option("--reader-role", help="Then grant this role reads and label upkeep (PostgreSQL)")
    ] = None,
) -> None:
    """Create or upgrade the audit tables (decisions, labels, live_quality, checkpoints) to the latest
    migration; with --writer-role and --reader-role, grant them afterwards (`fraud audit grant`)."""
    from fraud.audit.store import upgrade_database

    if (writer_role is None) != (reader_role is None):
        raise UserError("--writer-role and --reader-role go together")
    engine = open_audit_database(db_url, require_migrated=False)
    revision = upgrade_database(engine)
    typer.echo(f"audit database {engine.url.render_as_string(hide_password=True)} is at migration {revision}")
    if writer_role is not None and reader_role is not None:
        from fraud.audit.roles import grant_roles

        grant_roles(engine, writer_role, reader_role)
        typer.echo(f"granted: {writer_role} may INSERT decisions, {reader_role} may read them and maintain labels")


@audit_app.command("show")
def show(
    transaction: Annotated[str, typer.Option("--transaction", "-t", help="Transaction id")],
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Every recorded decision of one transaction: inputs, score, decision, reasons, degraded flags."""
    import json

    from fraud.audit.store import find_decisions

    engine = open_audit_database(db_url)
    decisions = find_decisions(engine, transaction)
    if not decisions:
        raise UserError(f"no decision recorded for transaction {transaction!r}")
    if as_json:
        typer.echo(json.dumps(decisions, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for decision in decisions:
        table = Table(
            title=f"{decision['transaction_id']} - {decision['model_name']} v{decision['model_version']}",
            show_header=False,
        )
        table.add_column("field", style="bold")
        table.add_column("value")
        for name, value in decision.items():
            if name in ("features", "reason_codes"):
                value = json.dumps(value, indent=1, default=str)
            table.add_row(name, str(value))
        console.print(table)


@audit_app.command("export")
def export(
    start: Annotated[str, typer.Option("--from", help="Start (inclusive), ISO date or datetime, UTC")],
    end: Annotated[str, typer.Option("--to", help="End (exclusive), ISO date or datetime, UTC")],
    out: Annotated[Path, typer.Option("--out", help="Output file (written atomically)")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet")] = "parquet",
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
) -> None:
    """Export the decisions received in [--from, --to) to a CSV or Parquet file."""
    from fraud.audit.export import export_decisions

    lower = parse_time_option(start, "--from")
    upper = parse_time_option(end, "--to")
    if lower >= upper:
        raise UserError(f"--from ({lower.isoformat()}) must be before --to ({upper.isoformat()})")
    engine = open_audit_database(db_url)
    count = export_decisions(engine, lower, upper, fmt, out)
    typer.echo(f"exported {count} decisions received in [{lower.isoformat()}, {upper.isoformat()}) to {out}")


@audit_app.command("writer")
def writer(
    spool: Annotated[
        Path | None,
        typer.Option("--spool", help="Spool file (default: FRAUD_AUDIT_SPOOL or <data dir>/audit/spool.db)"),
    ] = None,
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=5000, help="decisions per database transaction")
    ] = 500,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.001, help="Idle wait, seconds")] = 0.2,
    backoff_max: Annotated[float, typer.Option("--backoff-max", min=0.01, help="Longest retry wait, seconds")] = 5.0,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics on this port")
    ] = None,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Upgrade the schema before draining")
    ] = False,
) -> None:
    """Drain the spool into the audit database until SIGTERM/SIGINT (sidecar mode)."""
    import logging
    import signal

    from fraud.audit.chain import chain_key_from_env
    from fraud.audit.spool import default_spool_path
    from fraud.audit.store import create_audit_engine, upgrade_database
    from fraud.audit.writer import AuditWriter, WriterSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if migrate_first:
        engine = open_audit_database(db_url, require_migrated=False)
        upgrade_database(engine)
    else:
        engine = create_audit_engine(db_url)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    spool_path = spool or default_spool_path()
    settings = WriterSettings(
        batch_size=batch_size,
        poll_interval=poll_interval,
        backoff_max=backoff_max,
        backoff_initial=min(0.1, backoff_max),
        chain_key=chain_key_from_env(),
    )
    audit_writer = AuditWriter(spool_path, engine=engine, settings=settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: audit_writer.request_stop())
    logging.getLogger("fraud.audit").info(
        "audit writer draining %s into %s", spool_path, engine.url.render_as_string(hide_password=True)
    )
    audit_writer.run()


@audit_app.command("verify")
def verify(db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None) -> None:
    """Check the decisions' hash chains: exit 1 naming every changed, inserted or deleted row.

    Uses the chain key in FRAUD_AUDIT_CHAIN_KEY (the writers' key) when set."""
    from fraud.audit.chain import chain_key_from_env, verify_decisions

    engine = open_audit_database(db_url)
    report = verify_decisions(engine, chain_key_from_env())
    where = engine.url.render_as_string(hide_password=True)
    if report.ok:
        typer.echo(f"audit trail intact: {report.rows} decisions in {report.chains} chains ({where})")
        return
    for problem in report.problems:
        typer.echo(problem, err=True)
    typer.echo(f"audit trail of {where} FAILED verification: {len(report.problems)} problems", err=True)
    raise typer.Exit(1)


@audit_app.command("grant")
def grant(
    writer_role: Annotated[str, typer.Option("--writer-role", help="Role of the audit writers (INSERT only)")],
    reader_role: Annotated[
        str, typer.Option("--reader-role", help="Role of exports, label ingestion and live quality")
    ],
    db_url: Annotated[str | None, typer.Option("--db-url", help=DB_URL_HELP)] = None,
) -> None:
    """Grant the audit tables to the writer and reader roles (PostgreSQL; run as the migration role)."""
    from fraud.audit.roles import grant_roles

    engine = open_audit_database(db_url)
    grant_roles(engine, writer_role, reader_role)
    typer.echo(f"granted: {writer_role} may INSERT decisions, {reader_role} may read them and maintain labels")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(audit_app, name="audit")
