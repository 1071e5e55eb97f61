"""`fraud bench` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(help="Benchmarks that write JSON results.", no_args_is_help=True)


@bench_app.command("quality")
def quality_command(
    out: Annotated[Path, typer.Option("--out", help="Output directory (metrics.json, predictions.parquet, work/).")],
    seed: Annotated[int, typer.Option("--seed", help="Simulation seed.")] = 0,
    raw: Annotated[
        Path | None,
        typer.Option("--raw", help="Reuse this raw simulation (must be the default sizes with the same seed)."),
    ] = None,
    folds: Annotated[int, typer.Option("--folds", help="Prequential validation folds (earlier weeks).")] = 4,
    family: Annotated[
        list[str] | None,
        typer.Option("--family", help="Model family; repeat. Default: logistic_regression, random_forest, xgboost."),
    ] = None,
    ablation: Annotated[
        bool,
        typer.Option(
            "--ablation/--no-ablation", help="Also each family on the daily-snapshot features only (no velocity)."
        ),
    ] = True,
    legit_per_day: Annotated[
        list[int] | None,
        typer.Option(
            "--legit-per-day",
            help="Also refit XGBoost on training weeks keeping at most N legitimate transactions per day "
            "(weighted back, and unweighted); repeat for several N.",
        ),
    ] = None,
) -> None:
    """Model quality with the Handbook's protocol on the full default dataset (LR, RF, XGBoost), with
    and without the real-time velocity features."""
    import time

    from rich.console import Console

    from fraud.errors import UserError
    from fraud.training.quality_bench import BenchConfig, run_quality_bench, summary_table

    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if folds < 1:
        raise UserError(f"--folds must be >= 1, got {folds}")
    console = Console(stderr=True)
    started = time.perf_counter()

    def report(step: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f} s[/dim]  {step}")

    known = ("logistic_regression", "random_forest", "xgboost")
    families = tuple(family or known)
    unknown = [f for f in families if f not in known]
    if unknown:
        raise UserError(f"--family must be one of {known}, got {unknown}")
    caps = tuple(legit_per_day or ())
    if any(cap < 1 for cap in caps):
        raise UserError(f"--legit-per-day must be >= 1, got {list(caps)}")
    if caps and "xgboost" not in families:
        raise UserError("--legit-per-day refits XGBoost: include --family xgboost")
    config = BenchConfig(
        seed=seed,
        out_dir=out,
        raw_dir=raw,
        n_validation_folds=folds,
        families=families,
        ablation=ablation,
        legit_per_day=caps,
    )
    result = run_quality_bench(config, report)
    console.print(summary_table(result).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if result["downsampling"]:
        import pandas as pd

        console.print(pd.DataFrame(result["downsampling"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    console.print(
        f"wrote {out / 'metrics.json'} and {out / 'predictions.parquet'} in {result['timings']['total_s']:.0f} s"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(bench_app, name="bench")
