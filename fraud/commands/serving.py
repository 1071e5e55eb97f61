"""`fraud serve` (the local serving stack: predictor + drift transformer) and `fraud score`
(send transactions through it and show the decisions).

Typical use (also what scripts/demo.sh does):

    fraud serve --detach --pid-file data/serve.pid   # returns once both servers are ready
    fraud score --sample 5
    fraud serve stop --pid-file data/serve.pid
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fraud.errors import UserError

DEFAULT_URL = "http://127.0.0.1:8080"

serve_app = typer.Typer(
    help="Serve the fraud model locally: predictor + drift transformer on loopback ports (Ctrl-C stops both).",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _default_pid_file() -> Path:
    from fraud.config import DataLayout

    return DataLayout.current().root / "serve.pid"


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@serve_app.callback()
def serve_command(
    ctx: typer.Context,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="Serve this local bundle directory instead of the registry's champion."),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="HTTP port of the transformer (what clients call).")] = 8080,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="V2 gRPC port of the transformer.")] = 8081,
    predictor_port: Annotated[int, typer.Option("--predictor-port", help="HTTP port of the predictor.")] = 8082,
    predictor_grpc_port: Annotated[
        int | None,
        typer.Option(
            "--predictor-grpc-port",
            help="Serve V2 gRPC on the predictor at this loopback port and have the transformer call it over gRPC "
            "for V2 requests (KServe's --protocol grpc-v2); V1 requests and explanations still use its HTTP port. "
            "Default: V2 REST.",
        ),
    ] = None,
    online_store: Annotated[
        str | None,
        typer.Option("--online-store", help="Feast online store of the predictor: sqlite or redis (default: repo's)."),
    ] = None,
    store_timeout: Annotated[
        float | None,
        typer.Option(
            "--store-timeout",
            help="Longest wait (s) of the predictor for one online-store lookup before "
            "it scores with cold-start defaults. Default: the predictor's (1 s).",
        ),
    ] = None,
    drift_window: Annotated[
        int, typer.Option("--drift-window", help="Feature vectors per drift-test window of the transformer.")
    ] = 500,
    drift_online_ert: Annotated[
        float | None,
        typer.Option(
            "--drift-online-ert",
            help="Expected run time (vectors) between false alarms of the online "
            "drift detector; 0 disables it. Default: the transformer's (1000).",
        ),
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Run the stack in the background; return once it is ready.")
    ] = False,
    pid_file: Annotated[
        Path | None,
        typer.Option(
            "--pid-file",
            help="Supervisor pid file (written when ready). Default with --detach: <data dir>/serve.pid.",
        ),
    ] = None,
    log_dir: Annotated[
        Path | None, typer.Option("--log-dir", help="Folder of the server logs. Default: <data dir>/serve.")
    ] = None,
    audit: Annotated[
        bool,
        typer.Option(
            "--audit/--no-audit",
            help="Record every decision in the audit trail: spool <data dir>/audit/spool.db (or FRAUD_AUDIT_SPOOL) "
            "drained into FRAUD_AUDIT_DB_URL, else SQLite <data dir>/audit/audit.db (migrated at start).",
        ),
    ] = True,
    velocity: Annotated[
        bool,
        typer.Option(
            "--velocity/--no-velocity",
            help="Keep the velocity features live: the predictor publishes every scored transaction to "
            "the transaction stream and an aggregator child updates the card and terminal windows. "
            "--no-velocity scores them from whatever window state the online store already holds.",
        ),
    ] = True,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address the transformer binds (clients call it); the predictor stays on loopback."
        ),
    ] = "127.0.0.1",
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="Bearer tokens with scopes, one `<token> <scope>[,<scope>...]` per line (scopes: score, explain, "
            "debug); scoring then needs `Authorization: Bearer <token>` (401/403 otherwise). docs/serving.md.",
        ),
    ] = None,
    prometheus: Annotated[
        bool,
        typer.Option(
            "--prometheus/--no-prometheus",
            help="Also run a local Prometheus (Debian package prometheus) that scrapes the stack's metrics with "
            "the alert rules of manifests/prometheusrule.yaml loaded; its web UI graphs them.",
        ),
    ] = False,
    prometheus_port: Annotated[
        int, typer.Option("--prometheus-port", help="Loopback port of the local Prometheus (with --prometheus).")
    ] = 9090,
) -> None:
    """Serve the fraud model locally: predictor + drift transformer on loopback ports (Ctrl-C stops both)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    from fraud.config import DataLayout
    from fraud.processes import process_alive, read_pid_file
    from fraud.serving_bundle import resolve_bundle
    from fraud.serving_stack import StackConfig

    console = Console()
    if online_store is not None and online_store not in ("sqlite", "redis"):
        raise UserError(f"--online-store must be sqlite or redis, got {online_store!r}")
    if prometheus:
        from fraud.monitoring.local_prometheus import INSTALL_HINT, prometheus_binary

        if prometheus_binary() is None:
            raise UserError(f"--prometheus needs the prometheus binary: {INSTALL_HINT}")
    if drift_window < 2:
        raise UserError(f"--drift-window must be >= 2, got {drift_window}")
    if drift_online_ert is not None and drift_online_ert < 0:
        raise UserError(f"--drift-online-ert must be >= 0, got {drift_online_ert}")
    if detach and pid_file is None:
        pid_file = _default_pid_file()
    if pid_file is not None and pid_file.exists():
        try:
            running = read_pid_file(pid_file)
        except UserError:
            running = None
        if running is not None and process_alive(running):
            raise UserError(
                f"a serving stack is already running (pid {running}, {pid_file}); stop it with "
                f"`fraud serve stop --pid-file {pid_file}`"
            )
        pid_file.unlink()
    logs = (log_dir or DataLayout.current().root / "serve").resolve()
    config = StackConfig(
        host=host,
        token_file=token_file.resolve() if token_file else None,
        bundle=resolve_bundle(bundle),
        port=port,
        grpc_port=grpc_port,
        predictor_port=predictor_port,
        predictor_grpc_port=predictor_grpc_port,
        online_store=online_store,
        store_timeout_s=store_timeout,
        log_dir=logs,
        drift_window_size=drift_window,
        transformer_args=() if drift_online_ert is None else ("--online-ert", f"{drift_online_ert:g}"),
        audit=audit,
        velocity=velocity,
        prometheus_port=prometheus_port if prometheus else None,
    )
    if detach:
        _start_detached(config, (pid_file or _default_pid_file()).resolve(), console)
    else:
        _run_foreground(config, pid_file.resolve() if pid_file else None, console)


@serve_app.command("stop")
def stop_command(
    pid_file: Annotated[
        Path | None,
        typer.Option("--pid-file", help="Pid file of the detached stack. Default: <data dir>/serve.pid."),
    ] = None,
) -> None:
    """Stop the detached serving stack named by --pid-file (its audit writer flushes the spool first)."""
    from rich.console import Console

    from fraud.serving_stack import stop_detached

    pid = stop_detached(pid_file or _default_pid_file())
    Console().print(f"stopped the serving stack (supervisor pid {pid})")


def _run_foreground(config, pid_file: Path | None, console) -> None:
    from fraud.processes import write_pid_file
    from fraud.serving_stack import ServingStack, check_ports_free

    check_ports_free(config)
    stack = ServingStack(config, on_status=lambda message: console.print(f"[dim]{message}[/dim]"))
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        try:
            stack.start()
            if pid_file is not None:
                write_pid_file(pid_file, os.getpid())
            _print_endpoints(config, console)
            stack.supervise()
        except KeyboardInterrupt:
            console.print("stopping the serving stack ...")
    finally:
        # a second Ctrl-C while stopping must not leave children behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print("serving stack stopped")


def _start_detached(config, pid_file: Path, console) -> None:
    """Start a supervisor (`fraud serve` in the foreground, in its own session) and wait until it is ready."""
    from fraud.processes import read_pid_file, spawn, stop_process
    from fraud.serving_stack import check_ports_free

    check_ports_free(config)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = config.log_dir / "serve.log"
    command = [
        sys.executable, "-m", "fraud.cli", "serve",
        "--bundle", str(config.bundle),
        "--port", str(config.port),
        "--grpc-port", str(config.grpc_port),
        "--predictor-port", str(config.predictor_port),
        "--drift-window", str(config.drift_window_size),
        *_online_ert_option(config.transformer_args),
        "--pid-file", str(pid_file),
        "--log-dir", str(config.log_dir),
        "--host", config.host,
    ]  # fmt: skip
    if config.token_file:
        command += ["--token-file", str(config.token_file)]
    if config.predictor_grpc_port is not None:
        command += ["--predictor-grpc-port", str(config.predictor_grpc_port)]
    if config.online_store:
        command += ["--online-store", config.online_store]
    if config.store_timeout_s is not None:
        command += ["--store-timeout", f"{config.store_timeout_s:g}"]
    if not config.audit:
        command.append("--no-audit")
    if not config.velocity:
        command.append("--no-velocity")
    if config.prometheus_port is not None:
        command += ["--prometheus", "--prometheus-port", str(config.prometheus_port)]
    # the supervisor runs where this command runs, with its environment (it spawns the children)
    supervisor = spawn(
        command, cwd=Path.cwd(), log_path=log_path, env={**os.environ, **config.settings.env()}, detached=True
    )
    console.print(
        f"[dim]starting the serving stack in the background (supervisor pid {supervisor.pid}, log {log_path})[/dim]"
    )
    deadline = time.monotonic() + config.startup_timeout_s + 60
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise UserError(
                f"the serving stack failed to start (status {supervisor.returncode}, log {log_path}):\n"
                f"{log_path.read_text(errors='replace')[-2500:]}"
            )
        if pid_file.exists():
            try:
                if read_pid_file(pid_file) == supervisor.pid:
                    _print_endpoints(config, console)
                    console.print(f"stop it with: fraud serve stop --pid-file {pid_file}")
                    return
            except UserError:
                pass
        time.sleep(0.3)
    stop_process(supervisor, 30.0)
    raise UserError(f"the serving stack was not ready in time (log {log_path})")


def _online_ert_option(transformer_args: tuple[str, ...]) -> list[str]:
    if "--online-ert" in transformer_args:
        return ["--drift-online-ert", transformer_args[transformer_args.index("--online-ert") + 1]]
    return []


def _print_endpoints(config, console) -> None:
    from rich.table import Table

    table = Table(title="fraud serving stack", show_header=True)
    table.add_column("endpoint")
    table.add_column("address")
    table.add_row("V1 REST", f"{config.url}/v1/models/{config.model_name}:predict")
    table.add_row("V2 REST", f"{config.url}/v2/models/{config.model_name}/infer")
    table.add_row("V2 gRPC", f"{config.host}:{config.grpc_port}")
    table.add_row("authentication", f"bearer tokens of {config.token_file}" if config.token_file else "off")
    table.add_row("metrics (drift)", f"{config.url}/metrics")
    table.add_row("predictor (internal)", config.predictor_url)
    if config.prometheus_url:
        table.add_row("Prometheus (web UI)", config.prometheus_url)
    table.add_row("bundle", str(config.bundle))
    table.add_row("logs", str(config.log_dir))
    if config.audit:
        from fraud.audit.store import redacted_url

        table.add_row("audit spool", str(config.resolved_audit_spool()))
        table.add_row("audit database", redacted_url(config.resolved_audit_db_url()))
    else:
        table.add_row("audit", "off (--no-audit)")
    console.print(table)


def score_command(
    url: Annotated[str, typer.Option("--url", help="Base URL of the serving stack (the transformer).")] = DEFAULT_URL,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Transactions to score: .jsonl (one per line) or .json (list or {instances})."),
    ] = None,
    sample: Annotated[
        int, typer.Option("--sample", help="Without --file: draw this many transactions from the simulated raw data.")
    ] = 5,
    protocol: Annotated[str, typer.Option("--protocol", help="Inference protocol: v1 or v2 (REST).")] = "v1",
    seed: Annotated[int, typer.Option("--seed", help="Random seed of --sample.")] = 0,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the answer.")] = 30.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Transactions per request (the predictor's limit is 512).")
    ] = 256,
    summary: Annotated[
        bool, typer.Option("--summary", help="Print counts by decision (and label) instead of one row per transaction.")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Bearer token for a stack started with --token-file (score). Default: FRAUD_API_TOKEN."
        ),
    ] = None,
    card_testing: Annotated[
        int,
        typer.Option(
            "--card-testing",
            min=0,
            help="Then score a card-testing burst of one sampled card: this many small purchases minutes apart, "
            "then a large one, one request each (the stack's velocity features count the earlier ones).",
        ),
    ] = 0,
    burst_gap: Annotated[
        float,
        typer.Option(
            "--burst-gap", min=0.0, help="Seconds between the burst's requests (the stream applies each one)."
        ),
    ] = 0.5,
) -> None:
    """Send transactions through the serving stack and print the decisions."""
    import time

    from rich.console import Console
    from rich.table import Table

    from fraud.config import DataLayout
    from fraud.scoring_client import (
        card_testing_burst,
        load_transactions_file,
        sample_raw_transactions,
        score_transactions,
    )
    from fraud.settings import current

    token = token or current().api_token
    if protocol not in ("v1", "v2"):
        raise UserError(f"--protocol must be v1 or v2, got {protocol!r}")
    if timeout <= 0:
        raise UserError(f"--timeout must be > 0, got {timeout}")
    transactions = (
        load_transactions_file(file)
        if file is not None
        else sample_raw_transactions(DataLayout.current(), sample, seed)
    )
    batches = [transactions[start : start + batch_size] for start in range(0, len(transactions), batch_size)]
    scored = [
        row
        for batch in batches
        for row in score_transactions(url, batch, protocol=protocol, timeout_s=timeout, token=token)
    ]
    if card_testing:
        burst = card_testing_burst(DataLayout.current(), seed, card_testing)
        for i, transaction in enumerate(burst):
            if i:
                time.sleep(burst_gap)  # published by the predictor, applied by the aggregator meanwhile
            scored += score_transactions(url, [transaction], protocol=protocol, timeout_s=timeout, token=token)
        transactions = [*transactions, *burst]
    labels = {tx["transaction_id"]: tx.get("tx_fraud") for tx in transactions}
    if summary:
        _print_decision_summary(scored, labels, url, protocol)
        return
    by_id = {tx["transaction_id"]: tx for tx in transactions}
    table = Table(title=f"decisions from {url} ({protocol})")
    essential = {"transaction", "P(fraud)", "decision", "label"}  # never wrapped or cut
    columns = ["transaction", "customer", "amount", "time (UTC)", "P(fraud)", "decision"]
    with_labels = any(label is not None for label in labels.values())
    if with_labels:
        columns.append("label")
    columns += ["reasons", "model"]
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in ("amount", "P(fraud)") else "left",
            no_wrap=column in essential,
            min_width=len("decline") if column == "decision" else None,
            overflow="fold",
        )
    colours = {"approve": "green", "review": "yellow", "decline": "red"}
    for row in scored:
        tx = by_id.get(row.transaction_id, {})
        flags = (" (defaults)" if row.features_missing else "") + (" (stale)" if row.features_stale else "")
        cells = [
            row.transaction_id,
            str(tx.get("customer_id", "")),
            f"{tx.get('tx_amount', float('nan')):.2f}",
            str(tx.get("tx_datetime", "")).replace("T", " ")[:19],
            f"{row.fraud_probability:.4f}",
            f"[{colours.get(row.decision, 'white')}]{row.decision}[/]",
        ]
        if with_labels:
            label = labels.get(row.transaction_id)
            cells.append("-" if label is None else ("fraud" if label else "genuine"))
        cells += [", ".join(row.reasons) or "-", row.model_version + flags]
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect, keep rows on one line
        console = Console(width=160)
    console.print(table)


def _print_decision_summary(scored: list, labels: dict, url: str, protocol: str) -> None:
    """Counts of decisions, split by the simulated label when the transactions carry one."""
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    with_labels = any(label is not None for label in labels.values())
    counts = Counter((row.decision, labels.get(row.transaction_id)) for row in scored)
    table = Table(title=f"{len(scored)} decisions from {url} ({protocol})")
    table.add_column("decision")
    for header in ("genuine", "fraud") if with_labels else ("transactions",):
        table.add_column(header, justify="right")
    for decision in ("approve", "review", "decline"):
        if with_labels:
            table.add_row(decision, str(counts[(decision, 0)]), str(counts[(decision, 1)]))
        else:
            table.add_row(decision, str(sum(n for (d, _), n in counts.items() if d == decision)))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(serve_app, name="serve")
    app.command("score")(score_command)
