"""`fraud simulate`: generate the Fraud Detection Handbook's transaction dataset (chapter 3.2)."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from fraud.errors import UserError

_DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_start_date(text: str) -> date:
    """Parse a YYYY-MM-DD date or raise UserError naming the option."""
    value = text.strip()
    if not _DATE_PATTERN.match(value):
        raise UserError(f"--start-date must be a date in YYYY-MM-DD format, got {text!r}")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise UserError(f"--start-date {text!r} is not a valid date: {exc}") from None


def simulate_command(
    customers: Annotated[int, typer.Option("--customers", help="Number of simulated customers (cards); > 0.")] = 5_000,
    terminals: Annotated[
        int, typer.Option("--terminals", help="Number of simulated terminals (merchants); > 0.")
    ] = 10_000,
    days: Annotated[int, typer.Option("--days", help="Number of simulated days; > 0.")] = 183,
    start_date: Annotated[str, typer.Option("--start-date", help="First simulated day, YYYY-MM-DD.")] = "2018-04-01",
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed (>= 0); the same seed gives byte-identical files.")
    ] = 0,
    radius: Annotated[
        float, typer.Option("--radius", help="A customer uses only terminals closer than this (grid is 100 x 100).")
    ] = 5.0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output folder (the 'raw' dataset root). Default: the raw folder of FRAUD_DATA_DIR.",
            show_default=False,
        ),
    ] = None,
    card_testing_per_day: Annotated[
        int,
        typer.Option(
            "--card-testing-per-day",
            help="Stolen cards per day used in a card-testing burst (small purchases minutes apart, then a large "
            "one; fraud scenario 4). 0 (default): the Handbook's three scenarios only.",
        ),
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing dataset at the output folder.")
    ] = False,
) -> None:
    """Simulate card transactions with the Fraud Detection Handbook's process and write them as Parquet."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from fraud.config import DataLayout
    from fraud.simulator import SimulationConfig, check_output_dir, simulate_to

    config = SimulationConfig(
        n_customers=customers,
        n_terminals=terminals,
        n_days=days,
        start_date=parse_start_date(start_date),
        radius=radius,
        seed=seed,
        card_testing_per_day=card_testing_per_day,
    )
    out_dir = check_output_dir(out if out is not None else DataLayout.current().raw, overwrite)

    console = Console(stderr=True)
    labels = {"transactions": "Simulating days", "write": "Writing days (frauds labelled)"}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def report(stage: str, completed: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(labels.get(stage, stage), total=total)
            progress.update(tasks[stage], completed=completed)

        summary = simulate_to(config, out_dir, overwrite=overwrite, progress=report)

    by_scenario = summary["fraud_by_scenario"]
    console.print(
        f"wrote {summary['n_transactions']:,} transactions "
        f"({summary['n_fraud']:,} fraud = {summary['fraud_rate']:.3%}; "
        f"scenario 1: {by_scenario['1']:,}, 2: {by_scenario['2']:,}, 3: {by_scenario['3']:,}), "
        f"{summary['n_customers']:,} customers, {summary['n_terminals']:,} terminals "
        f"over {config.n_days} days from {config.start_date.isoformat()} to {out_dir}"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command(name="simulate")(simulate_command)
