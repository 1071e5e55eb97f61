"""The `fraud` command line. Each command group lives in its own module under fraud/commands/
and registers itself here; heavy libraries are imported inside the commands so `--help` is fast."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import typer

from fraud.commands import (
    audit,
    bench,
    deploy,
    features,
    labels,
    monitor,
    pipeline,
    registry,
    serving,
    simulate,
    spark,
)
from fraud.errors import UserError
from fraud.settings import Settings, activated

app = typer.Typer(
    name="fraud",
    help="Real-time card-fraud detection: simulate data, build features, train, serve, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Real-time card-fraud detection: simulate data, build features, train, serve, deploy."""
    # An explicit callback keeps `fraud` a command group even while only one command is
    # registered; typer would otherwise run a lone command as the root and reject its name.


for module in (simulate, features, pipeline, serving, deploy, registry, bench, audit, labels, monitor, spark):
    module.register(app)


def _click_exception_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(ClickException types, Abort types): typer >= 0.26 raises its vendored copy of click's."""
    import click

    errors: list[type[BaseException]] = [click.exceptions.ClickException]
    aborts: list[type[BaseException]] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        errors.append(vendored.ClickException)
    return tuple(errors), tuple(aborts)


#: (category, message regex, package) of library warnings that say nothing to a user of the command
#: line. Feast resets the warning filters when it is imported (`warnings.simplefilter("once", ...)`),
#: so these are dropped where warnings are shown rather than by a filter.
KNOWN_LIBRARY_WARNINGS = (
    # Feast marks on-demand feature views experimental on every use; ours are tested end to end
    (RuntimeWarning, r"^On demand feature view is an experimental feature", "feast"),
    # ibis (Feast's offline engine) calls DuckDB APIs that DuckDB deprecated
    (DeprecationWarning, r"", "ibis"),
    (FutureWarning, r"", "ibis"),
)
_show_warning = warnings.showwarning


def is_known_library_warning(message: Warning | str, category: type[Warning], filename: str) -> bool:
    parts = Path(filename).parts
    return any(
        issubclass(category, known) and re.search(pattern, str(message)) and package in parts
        for known, pattern, package in KNOWN_LIBRARY_WARNINGS
    )


def _show_unknown_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    if not is_known_library_warning(message, category, filename):
        _show_warning(message, category, filename, lineno, file, line)


def filter_known_library_warnings() -> None:
    warnings.showwarning = _show_unknown_warnings


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become a message and exit code, never a traceback.
    `argv` (default: the process's arguments) lets another entry point run one command in-process."""
    filter_known_library_warnings()
    try:
        # Without standalone mode click *returns* the code of a typer.Exit / click.exceptions.Exit
        # instead of exiting; commands themselves return None.
        # the one read of the environment; commands take their settings from here (fraud.settings)
        with activated(Settings.from_env()):
            exit_code = app(args=argv, standalone_mode=False)
        if isinstance(exit_code, int) and exit_code != 0:
            sys.exit(exit_code)
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and aborts
        click_error, abort = _click_exception_types()
        if isinstance(exc, click_error):
            exc.show()  # type: ignore[attr-defined]  # a ClickException: typer's vendored copy or click's
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if isinstance(exc, abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
