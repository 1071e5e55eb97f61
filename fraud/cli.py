"""The `fraud` command line. Each command group lives in its own module under fraud/commands/
and registers itself here; heavy libraries are imported inside the commands so `--help` is fast."""

from __future__ import annotations

import sys

import typer

from fraud.commands import audit, bench, deploy, features, labels, pipeline, serving, simulate
from fraud.errors import UserError

app = typer.Typer(
    name="fraud",
    help="Real-time card-fraud detection: simulate data, build features, train, serve, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (simulate, features, pipeline, serving, deploy, bench, audit, labels):
    module.register(app)


def main() -> None:
    """Console entry point: user errors become a message and exit code, never a traceback."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
