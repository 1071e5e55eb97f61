"""Scoring benchmarks: the model's in-process limit, our predictor against Seldon MLServer on the same
XGBoost model, and the full serving path (transformer -> predictor -> Feast online store).

    .venv/bin/python benchmarks/bench_scoring.py model    [--bundle DIR]
    .venv/bin/python benchmarks/bench_scoring.py serving  [--bundle DIR] [--rounds 3] [--duration 10]
    .venv/bin/python benchmarks/bench_scoring.py fullpath --data-dir /tmp/perf/data [--stores sqlite redis]
    .venv/bin/python benchmarks/bench_scoring.py lookup   --data-dir /tmp/perf/data [--stores sqlite redis]
    add --smoke for a seconds-long run that only checks the benchmark works (with --no-save: JSON to stdout)

`model`    XGBoost on one core: `inplace_predict`, `pred_contribs` (exact TreeSHAP and approximate),
           and the predictor's `BundleScorer.score` (probability + reason codes + decision), for one
           row and batches of 100 / 1,000 -> results/scoring_model.json.
`serving`  `benchmarks/serve_predictor_memory.py` (the predictor with an in-memory feature source,
           no Feast) and MLServer 1.7 (`mlserver_xgboost.XGBoostModel` on the bundle's model.ubj,
           from the benchmarks/mlserver environment), both on loopback, one request = one
           transaction. Same clients for both: wrk closed loop at saturation, and the open-loop
           generator of loadgen.py at fixed rates; systems alternate within every round, medians
           over rounds -> results/scoring_serving[_LABEL].json.
`fullpath` the local serving stack (`fraud.serving_stack`, the real transformer and predictor
           processes) on a materialised feature store, per online store: single-transaction
           saturation and fixed rates, and batched requests of 100 / 1,000 transactions, with the
           CPU time per transaction of each process -> results/scoring_fullpath[_LABEL].json.
`lookup`   in-process batch-feature lookups of 1 / 100 / 1,000 pairs per online store: the
           predictor's batched reader against Feast's `online_read` -> results/scoring_lookup.json.

Each writes its Markdown table between markers in docs/performance.md. The generator's own CPU
share (cores) is in every result: on 2 cores it competes with the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline_scale import save_json, write_docs_section
from loadgen import LoadGenError, machine_load, run_open_loop, run_wrk

from fraud.net import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MLSERVER_ENV = Path(__file__).resolve().parent / "mlserver" / ".venv"
CORE_PYTHON = sys.executable
MODEL_NAME = "fraud-detector"
MLSERVER_MODEL = "fraud-xgboost"
#: the predictor's own --max-batch-size default
DEFAULT_PREDICTOR_MAX_BATCH = 512
#: request timestamp of the serving benchmark: on serve_predictor_memory.SNAPSHOT_DAY (fresh features)
SERVING_TX_EPOCH = int(datetime(2018, 9, 30, 12, 0, tzinfo=UTC).timestamp())


class BenchError(RuntimeError):
    pass


# --- helpers ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def resolve_bundle(path: Path | None, work: Path) -> Path:
    """The given bundle, or a synthetic one (tests.factories) built under `work`."""
    if path is not None:
        from fraud.bundle import validate_bundle

        validate_bundle(path)
        return path
    from tests.factories import make_synthetic_bundle

    target = work / "synthetic-bundle"
    make_synthetic_bundle(target)
    return target


@dataclass(frozen=True)
class CodeTree:
    """The code a system runs: this checkout (`ref` None) or a commit exported to a directory."""

    name: str  # system name in the results: "predictor" or "predictor@<sha>"
    root: Path
    ref: str | None = None


def short_sha(ref: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=7", "--verify", f"{ref}^{{commit}}"],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"--baseline {ref}: not a commit of this repository ({exc.stderr.strip()})") from None


def export_commit(ref: str, work: Path) -> Path:
    """The files of commit `ref` under `work` (`git archive`: no worktree, no repository state
    touched), sharing this checkout's transformer environment. The core environment is this one's
    (the commit's code comes first on the path)."""
    sha = short_sha(ref)
    target = work / f"tree-{sha}"
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", sha],  # noqa: S607 - git from PATH
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)  # noqa: S607 - fixed tar arguments
    drift_env = ROOT / "drift_transformer" / ".venv"
    if drift_env.exists():
        (target / "drift_transformer" / ".venv").symlink_to(drift_env)
    return target


@contextmanager
def code_trees(refs: Sequence[str], work: Path, base: str) -> Iterator[list[CodeTree]]:
    """This checkout as `base`, then one exported tree per baseline commit (`base@<sha>`)."""
    trees = [CodeTree(base, ROOT)]
    for ref in refs:
        sha = short_sha(ref)
        trees.append(CodeTree(f"{base}@{sha}", export_commit(sha, work), sha))
    yield trees


def tree_bundle(tree: CodeTree, work: Path) -> Path:
    """A synthetic bundle made by the tree's own test factories (its own feature set)."""
    target = work / f"synthetic-bundle-{tree.ref or 'head'}"
    code = (
        "import sys; from pathlib import Path; from tests.factories import make_synthetic_bundle; "
        "make_synthetic_bundle(Path(sys.argv[1]))"
    )
    subprocess.run(
        [CORE_PYTHON, "-c", code, str(target)],
        cwd=tree.root,
        env={**os.environ, "PYTHONPATH": str(tree.root)},
        check=True,
    )
    return target


def machine_snapshot() -> dict[str, float]:
    """1-minute load average now (recorded beside every measurement of a shared machine)."""
    return {"load_average_1m": os.getloadavg()[0]}


def bundle_facts(bundle: Path) -> dict[str, Any]:
    import xgboost as xgb

    from fraud.bundle import validate_bundle

    manifest = validate_bundle(bundle)
    booster = xgb.Booster(model_file=str(bundle / "model.ubj"))
    return {
        "path": str(bundle),
        "model_version": manifest.model_version,
        "trees": booster.num_boosted_rounds(),
        "features": booster.num_features(),
        "xgboost": xgb.__version__,
    }


def reference_matrix(bundle: Path, rows: int) -> np.ndarray:
    """Realistic model inputs: the bundle's reference feature sample, tiled to `rows`."""
    reference = np.load(bundle / "reference_features.npy").astype(np.float64)
    reps = int(np.ceil(rows / len(reference)))
    return np.tile(reference, (reps, 1))[:rows]


def header(name: str, command: str) -> dict[str, Any]:
    return {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": {**machine_load(), "python": sys.version.split()[0]},
    }


def finish(
    report: dict[str, Any], stem: str, label: str | None, markdown: str, no_save: bool, output: Path | None = None
) -> None:
    suffix = f"_{label}" if label else ""
    if output is not None:  # this file only: no results/ file, no docs section
        save_json(report, output)
        print(markdown)
        return
    if no_save:
        print(json.dumps(report, indent=2))
        return
    save_json(report, RESULTS_DIR / f"{stem}{suffix}.json")
    section = stem.replace("_", "-") + suffix.replace("_", "-")
    write_docs_section(markdown, (f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"))
    print(markdown)


# --- 1. model limit -----------------------------------------------------------------------------
def time_per_call(fn: Callable[[], Any], min_seconds: float, repeats: int) -> float:
    """Median over `repeats` of the mean seconds per call in a loop of at least `min_seconds`."""
    fn()
    loops = 1
    while True:
        started = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds / 4 or loops >= 1 << 20:
            break
        loops *= 2
    loops = max(1, int(loops * (min_seconds / 4) / max(elapsed, 1e-9)))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - started) / loops)
    return median(samples)


def bench_model(args: argparse.Namespace) -> int:
    started = header("scoring_model", "python benchmarks/bench_scoring.py model" + (" --smoke" if args.smoke else ""))
    import pandas as pd
    import xgboost as xgb

    from fraud.features.definitions import MODEL_FEATURES
    from predictor.scoring import BundleScorer

    with tempfile.TemporaryDirectory(prefix="fraud-bench-model-") as tmp:
        bundle = resolve_bundle(args.bundle, Path(tmp))
        facts = bundle_facts(bundle)
        min_seconds, repeats = (0.05, 3) if args.smoke else (args.min_seconds, args.repeats)
        batches = (1, 100) if args.smoke else (1, 100, 1000)
        booster = xgb.Booster(model_file=str(bundle / "model.ubj"))
        booster.set_param({"nthread": 1})
        scorer = BundleScorer(bundle, nthread=1)
        fast_scorer = BundleScorer(bundle, nthread=1, compiled="auto")
        if fast_scorer.compiled is None:
            raise BenchError("the compiled model could not be built (see the log line above)")
        native = fast_scorer.compiled
        compiled_difference: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        flagged_share: dict[str, float] = {}
        for batch in batches:
            matrix = reference_matrix(bundle, batch)
            frame = pd.DataFrame(matrix, columns=list(MODEL_FEATURES))
            cases: dict[str, Callable[[], Any]] = {
                "inplace_predict (numpy)": lambda m=matrix: booster.inplace_predict(m, validate_features=False),
                "inplace_predict (pandas)": lambda f=frame: booster.inplace_predict(f, validate_features=False),
                "pred_contribs exact TreeSHAP (DMatrix)": lambda m=matrix: booster.predict(
                    xgb.DMatrix(m, nthread=1), pred_contribs=True, validate_features=False
                ),
                "pred_contribs approx (DMatrix)": lambda m=matrix: booster.predict(
                    xgb.DMatrix(m, nthread=1), pred_contribs=True, approx_contribs=True, validate_features=False
                ),
                "compiled model predict (predictor.compiled)": lambda m=matrix: native.predict(m),
                "BundleScorer.score, XGBoost, reason codes of flagged rows": lambda m=matrix: scorer.score(m),
                "BundleScorer.score, compiled model, reason codes of flagged rows (predictor default)": (
                    lambda m=matrix: fast_scorer.score(m)
                ),
                "BundleScorer.score, reason codes of every row (--reason-codes all)": lambda m=matrix: scorer.score(
                    m, reason_codes="all"
                ),
            }
            compiled_difference[str(batch)] = float(
                np.max(np.abs(native.predict(matrix) - booster.inplace_predict(matrix, validate_features=False)))
            )
            flagged = sum(decision != "approve" for decision in scorer.score(matrix).decisions)
            print(f"batch {batch}: {flagged} of {batch} reference rows flagged (review/decline)", file=sys.stderr)
            flagged_share[str(batch)] = flagged / batch
            for name, fn in cases.items():
                seconds = time_per_call(fn, min_seconds, repeats)
                rows.append(
                    {
                        "case": name,
                        "batch": batch,
                        "us_per_call": seconds * 1e6,
                        "us_per_transaction": seconds * 1e6 / batch,
                        "transactions_per_s_one_core": batch / seconds,
                    }
                )
                print(
                    f"{name:<70} batch {batch:>5}: {seconds * 1e6:10.1f} us/call {seconds * 1e6 / batch:8.2f} us/tx",
                    file=sys.stderr,
                )
    report = started
    report.update(
        {
            "bundle": facts,
            "threads": 1,
            "smoke": args.smoke,
            "results": rows,
            "flagged_share_of_reference_rows": flagged_share,
            "compiled_max_abs_difference_to_xgboost": compiled_difference,
        }
    )
    lines = [
        f"Measured {report['date']}, one XGBoost thread, bundle `{facts['model_version']}` "
        f"({facts['trees']} trees, {facts['features']} features, XGBoost {facts['xgboost']}); 1-min load average "
        f"{report['machine']['load_average_1m']:.1f} on {report['machine']['cpus']} cores. "
        f"Command: `{report['command']}`. "
        f"Share of the bundle's reference rows the model flags (review/decline): "
        + ", ".join(f"{share:.1%} of {int(b):,}" for b, share in flagged_share.items())
        + ". Largest difference between the compiled model's probabilities and XGBoost's on these rows: "
        + ", ".join(f"{d:.1e}" for d in compiled_difference.values())
        + ".",
        "",
        "| case | batch | µs / call | µs / transaction | transactions/s on one core |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['batch']:,} | {r['us_per_call']:,.1f} | {r['us_per_transaction']:,.2f} "
        f"| {r['transactions_per_s_one_core']:,.0f} |"
        for r in rows
    ]
    finish(report, "scoring_model", args.label, "\n".join(lines), args.no_save, args.output)
    return 0


# --- servers --------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str  # inference URL
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def start_server(
    name: str,
    command: list[str],
    ready_url: str,
    infer_url: str,
    log: Path,
    env: dict[str, str],
    cwd: Path,
    timeout_s: float = 180.0,
) -> Server:
    sink = log.open("wb")
    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    server = Server(name, infer_url, process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{name} exited with {process.returncode}:\n{log.read_text(errors='replace')[-2500:]}")
        try:
            if httpx.get(ready_url, timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise BenchError(f"{name} not ready within {timeout_s:.0f}s:\n{log.read_text(errors='replace')[-2500:]}")


def predictor_body(index: int, customer: str, terminal: str, amount: float, epoch: int, batch: int = 1) -> dict:
    ids = [f"bench-{index}-{i}" for i in range(batch)]
    return {
        "inputs": [
            {"name": "transaction_id", "datatype": "BYTES", "shape": [batch], "data": ids},
            {"name": "customer_id", "datatype": "BYTES", "shape": [batch], "data": [customer] * batch},
            {"name": "terminal_id", "datatype": "BYTES", "shape": [batch], "data": [terminal] * batch},
            {"name": "tx_amount", "datatype": "FP64", "shape": [batch], "data": [amount] * batch},
            {"name": "tx_datetime", "datatype": "INT64", "shape": [batch], "data": [epoch] * batch},
        ]
    }


def serving_bodies(bundle: Path, count: int, entities: int) -> tuple[list[bytes], list[bytes]]:
    """`count` equivalent single-transaction bodies: ours (raw transaction) and MLServer's (the
    16-feature vector, from the bundle's reference sample)."""
    from serve_predictor_memory import customer_mean_amounts

    rng = np.random.default_rng(1)
    matrix = reference_matrix(bundle, count)
    means = customer_mean_amounts(entities)
    ours, theirs = [], []
    for i in range(count):
        c = int(rng.integers(entities))
        customer, terminal = f"C{c}", f"T{rng.integers(entities)}"
        # the simulator's spending: normal around the card's mean, sd mean/2, positive
        amount = round(max(0.01, float(rng.normal(means[c], means[c] / 2))), 2)
        epoch = SERVING_TX_EPOCH + int(rng.integers(0, 36_000))
        ours.append(json.dumps(predictor_body(i, customer, terminal, amount, epoch)).encode())
        theirs.append(
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "features",
                            "datatype": "FP32",
                            "shape": [1, matrix.shape[1]],
                            "data": [float(x) for x in matrix[i]],
                        }
                    ]
                }
            ).encode()
        )
    return ours, theirs


def start_predictor_memory(bundle: Path, work: Path, extra: Sequence[str], tree: CodeTree | None = None) -> Server:
    """serve_predictor_memory.py of `tree` (default: this checkout) on a free port."""
    tree = tree or CodeTree("predictor", ROOT)
    port = free_port()
    command = [
        CORE_PYTHON,
        str(tree.root / "benchmarks" / "serve_predictor_memory.py"),
        "--bundle",
        str(bundle),
        "--model_name",
        MODEL_NAME,
        "--http_port",
        str(port),
        "--grpc_port",
        str(free_port()),
        "--enable_grpc",
        "false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree.root)}
    return start_server(
        tree.name,
        command,
        f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/ready",
        f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer",
        work / f"{tree.name.replace('@', '-')}.log",
        env,
        tree.root,
    )


def start_mlserver(bundle: Path, work: Path) -> Server:
    mlserver = MLSERVER_ENV / "bin" / "mlserver"
    if not mlserver.exists():
        raise BenchError(
            f"{mlserver} is missing: run `cd benchmarks/mlserver && uv sync --frozen` (see benchmarks/README.md)"
        )
    model_dir = work / "mlserver" / MLSERVER_MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundle / "model.ubj", model_dir / "model.ubj")
    shutil.copy(Path(__file__).resolve().parent / "mlserver" / "model-settings.json", model_dir / "model-settings.json")
    port = free_port()
    settings = json.loads((Path(__file__).resolve().parent / "mlserver" / "settings.json").read_text())
    settings.update({"http_port": port, "grpc_port": free_port(), "metrics_port": free_port()})
    (work / "mlserver" / "settings.json").write_text(json.dumps(settings, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return start_server(
        "mlserver",
        [str(mlserver), "start", str(work / "mlserver")],
        f"http://127.0.0.1:{port}/v2/models/{MLSERVER_MODEL}/ready",
        f"http://127.0.0.1:{port}/v2/models/{MLSERVER_MODEL}/infer",
        work / "mlserver.log",
        env,
        work,
    )


def check_answer(server: Server, body: bytes, expect: str) -> None:
    response = httpx.post(server.url, content=body, headers={"content-type": "application/json"}, timeout=10)
    if response.status_code != 200 or expect not in response.text:
        raise BenchError(f"{server.name} answered {response.status_code}: {response.text[:500]}")


def wait_idle(url: str, body: bytes, limit_s: float = 90.0, fast_ms: float = 250.0) -> float:
    """Wait until the server has worked off the backlog of an overload run (a probe answered in
    under `fast_ms`), so one measurement does not spill into the next. Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        sent = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=limit_s)
        if (time.perf_counter() - sent) * 1000 < fast_ms:
            break
        time.sleep(0.5)
    return time.perf_counter() - started


def wait_online_detector(infer_url: str, limit_s: float) -> float | None:
    """The transformer configures its online drift detector (alibi-detect CVM bootstrap) in a
    background thread after it reports ready; that takes CPU for a while. Wait until its
    `fraud_drift_online_ready` gauge is 1 (at most `limit_s`) so the measurements see the steady
    state. Returns the seconds waited, or None when it was not ready in time."""
    metrics_url = infer_url.split("/v2/")[0] + "/metrics"
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        try:
            text = httpx.get(metrics_url, timeout=5).text
        except httpx.HTTPError:
            text = ""
        line = next((ln for ln in text.splitlines() if ln.startswith("fraud_drift_online_ready")), None)
        if line is None or float(line.split()[-1]) >= 1.0:  # no online detector configured, or ready
            return time.perf_counter() - started
        time.sleep(2.0)
    print(f"warning: the transformer's online drift detector was not ready after {limit_s:.0f}s", file=sys.stderr)
    return None


def summarise_wrk(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rounds": len(runs),
        "median_requests_per_s": median([r["requests_per_s"] for r in runs]),
        "median_p50_ms": median([r["p50_ms"] for r in runs]),
        "median_p99_ms": median([r["p99_ms"] for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "median_client_cpu_cores": median([r["client_cpu_cores"] for r in runs]),
        "runs": runs,
    }


def summarise_open(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "rounds": len(runs),
        "median_p50_ms": median([r["p50_ms"] for r in runs]),
        "median_p99_ms": median([r["p99_ms"] for r in runs]),
        "median_achieved_rate": median([r["achieved_rate"] for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "median_client_cpu_cores": median([r["client_cpu_cores"] for r in runs]),
        "runs": runs,
    }


def alternate(systems: list[str], round_index: int) -> list[str]:
    return systems if round_index % 2 == 0 else list(reversed(systems))


# --- 2. predictor vs MLServer ---------------------------------------------------------------------
def serving_batch_bodies(bundle: Path, batch: int, entities: int) -> tuple[bytes, bytes]:
    """One request of `batch` transactions for our predictor and the equivalent [batch, k] feature
    tensor for MLServer (the serving_bodies rows, concatenated)."""
    ours, theirs = serving_bodies(bundle, batch, entities)
    inputs = [json.loads(body)["inputs"] for body in ours]
    merged = {
        "inputs": [
            {**first, "shape": [batch], "data": [value for request in inputs for value in request[i]["data"]]}
            for i, first in enumerate(inputs[0])
        ]
    }
    rows = [json.loads(body)["inputs"][0]["data"] for body in theirs]
    tensor = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [batch, len(rows[0])],
                "data": [x for row in rows for x in row],
            }
        ]
    }
    return json.dumps(merged).encode(), json.dumps(tensor).encode()


def bench_serving(args: argparse.Namespace) -> int:
    started = header("scoring_serving", "python benchmarks/bench_scoring.py serving " + " ".join(args.argv))
    rounds, duration, rates = (1, 1.0, [50.0]) if args.smoke else (args.rounds, args.duration, args.rates)
    batches = [10] if args.smoke else list(args.batches)
    with_mlserver = not args.no_mlserver
    with tempfile.TemporaryDirectory(prefix="fraud-bench-serving-") as tmp:
        work = Path(tmp)
        bundle = resolve_bundle(args.bundle, work)
        facts = bundle_facts(bundle)
        ours, theirs = serving_bodies(bundle, 1000, args.entities)
        batch_bodies = {b: serving_batch_bodies(bundle, b, args.entities) for b in batches}
        servers: dict[str, Server] = {}
        bundles: dict[str, str] = {}
        skipped: dict[str, list[str]] = {}
        max_batch = ["--max-batch-size", str(max([*batches, DEFAULT_PREDICTOR_MAX_BATCH]))]
        with code_trees(args.baseline, work, "predictor") as trees:
            try:
                for tree in trees:
                    own = tree.ref is not None and (args.bundle is None or args.baseline_bundle == "own")
                    tree_bundle_dir = tree_bundle(tree, work) if own else bundle
                    bundles[tree.name] = str(tree_bundle_dir)
                    # options a baseline's predictor does not have are left out for it (recorded below)
                    known = [a for a in args.predictor_args if tree.ref is None or _has_option(tree, a.split("=")[0])]
                    skipped[tree.name] = [a for a in args.predictor_args if a not in known]
                    extra = ["--entities", str(args.entities), *max_batch, *known]
                    servers[tree.name] = start_predictor_memory(tree_bundle_dir, work, extra, tree)
                    check_answer(servers[tree.name], ours[0], "fraud_probability")
                if with_mlserver:
                    servers["mlserver"] = start_mlserver(bundle, work)
                    check_answer(servers["mlserver"], theirs[0], '"outputs"')
                bodies = {name: theirs if name == "mlserver" else ours for name in servers}
                batched_body = {
                    name: {b: pair[1] if name == "mlserver" else pair[0] for b, pair in batch_bodies.items()}
                    for name in servers
                }
                # warm-up (JIT-free, but connection pools, caches, lazy imports)
                for name in servers:
                    run_open_loop(servers[name].url, bodies[name], rate=50.0, duration_s=1.0)
                saturation: dict[str, list[dict]] = {name: [] for name in servers}
                fixed: dict[str, dict[str, list[dict]]] = {name: {str(r): [] for r in rates} for name in servers}
                batched: dict[str, dict[str, list[dict]]] = {name: {str(b): [] for b in batches} for name in servers}
                for round_index in range(rounds):
                    for name in alternate(list(servers), round_index):
                        load = machine_snapshot()
                        result = run_wrk(
                            servers[name].url, bodies[name][0], connections=args.connections, duration_s=duration
                        )
                        saturation[name].append(
                            {**result.to_dict(), **load, "drain_s": wait_idle(servers[name].url, bodies[name][0])}
                        )
                        print(
                            f"round {round_index} {name} saturation: {result.requests_per_s:,.0f} req/s "
                            f"p99 {result.p99_ms:.1f} ms (wrk {result.client_cpu_cores:.2f} cores, "
                            f"load {load['load_average_1m']:.1f})",
                            file=sys.stderr,
                        )
                    for batch in batches:
                        for name in alternate(list(servers), round_index):
                            load = machine_snapshot()
                            result = run_wrk(
                                servers[name].url,
                                batched_body[name][batch],
                                connections=args.batch_connections,
                                duration_s=duration,
                            )
                            row = {**result.to_dict(), **load, "transactions_per_s": result.requests_per_s * batch}
                            row["drain_s"] = wait_idle(servers[name].url, bodies[name][0])
                            batched[name][str(batch)].append(row)
                            print(
                                f"round {round_index} {name} batch {batch}: {row['transactions_per_s']:,.0f} tx/s "
                                f"p99 {result.p99_ms:.1f} ms errors {result.errors}",
                                file=sys.stderr,
                            )
                    for rate in rates:
                        for name in alternate(list(servers), round_index):
                            load = machine_snapshot()
                            result = run_open_loop(servers[name].url, bodies[name], rate=rate, duration_s=duration)
                            fixed[name][str(rate)].append(
                                {**result.to_dict(), **load, "drain_s": wait_idle(servers[name].url, bodies[name][0])}
                            )
                            print(
                                f"round {round_index} {name} @ {rate:g}/s: "
                                f"p50 {result.p50_ms:.2f} p99 {result.p99_ms:.2f} ms "
                                f"errors {result.errors} (client {result.client_cpu_cores:.2f} cores)",
                                file=sys.stderr,
                            )
            finally:
                for server in servers.values():
                    server.stop()
    summary = {
        name: {
            "bundle": bundles.get(name, str(bundle)),
            "saturation": summarise_wrk(saturation[name]),
            "fixed_rate": {rate: summarise_open(runs) for rate, runs in fixed[name].items()},
            "batched": {
                b: {**summarise_wrk(runs), "median_transactions_per_s": median([r["transactions_per_s"] for r in runs])}
                for b, runs in batched[name].items()
            },
        }
        for name in saturation
    }
    ratios = {
        f"{name}_over_mlserver": summary[name]["saturation"]["median_requests_per_s"]
        / summary["mlserver"]["saturation"]["median_requests_per_s"]
        for name in summary
        if with_mlserver and name != "mlserver"
    }
    baselines = {
        name: {
            "saturation_ratio": summary["predictor"]["saturation"]["median_requests_per_s"]
            / summary[name]["saturation"]["median_requests_per_s"],
            **{
                f"batch_{b}_ratio": summary["predictor"]["batched"][str(b)]["median_transactions_per_s"]
                / summary[name]["batched"][str(b)]["median_transactions_per_s"]
                for b in batches
            },
            **{
                f"p99_at_{r:g}_ratio": summary["predictor"]["fixed_rate"][str(r)]["median_p99_ms"]
                / summary[name]["fixed_rate"][str(r)]["median_p99_ms"]
                for r in rates
            },
        }
        for name in summary
        if name.startswith("predictor@")
    }
    report = started
    report.update(
        {
            "bundle": facts,
            "smoke": args.smoke,
            "rounds": rounds,
            "duration_s": duration,
            "connections": args.connections,
            "batch_connections": args.batch_connections,
            "batches": batches,
            "predictor_args": list(args.predictor_args),
            "baselines": {tree: summary[tree]["bundle"] for tree in baselines},
            "predictor_args_not_known_to": {name: args for name, args in skipped.items() if args},
            "offered_rates": rates,
            "load_generators": {
                "saturation": "wrk (closed loop, 1 thread)",
                "batched": f"wrk (closed loop, 1 thread, {args.batch_connections} connections)",
                "fixed_rate": "benchmarks/loadgen.py open loop (asyncio, latency from scheduled send time)",
            },
            "load_average_1m_end": os.getloadavg()[0],
            "systems": summary,
            "throughput_ratios": ratios,
            "throughput_ratio_predictor_over_mlserver": ratios.get("predictor_over_mlserver"),
            "this_checkout_over_baseline": baselines,
        }
    )
    loads = [r["load_average_1m"] for data in saturation.values() for r in data]
    lines = [
        f"Measured {report['date']}; {rounds} rounds x {duration:g} s per measurement, systems alternated every round, "
        f"medians shown; 1-min load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f} on "
        f"{report['machine']['cpus']} cores. Bundle `{facts['model_version']}` ({facts['trees']} trees). "
        f"Predictor options: `{' '.join(args.predictor_args) or '(defaults)'}`. Command: `{report['command']}`.",
        "",
        f"| system | saturation req/s (wrk, {args.connections} conns) | p50 / p99 at saturation (ms) | "
        + " | ".join(f"p50 / p99 @ {r:g}/s (ms)" for r in rates)
        + " | "
        + " | ".join(f"batch {b:,}: tx/s" for b in batches)
        + " | client CPU (cores) | errors |",
        "|---|---:|---:|" + "---:|" * len(rates) + "---:|" * len(batches) + "---:|---:|",
    ]
    for name, data in summary.items():
        sat = data["saturation"]
        cells = [
            f"{data['fixed_rate'][str(r)]['median_p50_ms']:.2f} / {data['fixed_rate'][str(r)]['median_p99_ms']:.2f}"
            for r in rates
        ]
        batch_cells = [f"{data['batched'][str(b)]['median_transactions_per_s']:,.0f}" for b in batches]
        errors = (
            sat["errors"]
            + sum(data["fixed_rate"][str(r)]["errors"] for r in rates)
            + sum(data["batched"][str(b)]["errors"] for b in batches)
        )
        client = max(
            [sat["median_client_cpu_cores"]] + [data["fixed_rate"][str(r)]["median_client_cpu_cores"] for r in rates]
        )
        lines.append(
            f"| {name} | {sat['median_requests_per_s']:,.0f} "
            f"| {sat['median_p50_ms']:.2f} / {sat['median_p99_ms']:.2f} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(batch_cells)
            + f" | ≤ {client:.2f} | {errors} |"
        )
    if ratios:
        lines += [
            "",
            "Saturation throughput over MLServer's: "
            + ", ".join(f"{k.removesuffix('_over_mlserver')} **{v:.2f}x**" for k, v in ratios.items())
            + ".",
        ]
    for name, ratio in baselines.items():
        lines += [
            "",
            f"This checkout over `{name}` (>1 = faster; p99 ratio <1 = lower latency): "
            + ", ".join(f"{k.removesuffix('_ratio').replace('_', ' ')} {v:.2f}" for k, v in ratio.items())
            + ".",
        ]
    finish(report, "scoring_serving", args.label, "\n".join(lines), args.no_save, args.output)
    return 0


# --- 3. full path -----------------------------------------------------------------------------------
def sample_transactions(data_dir: Path, count: int) -> list[dict[str, Any]]:
    """`count` transactions of the dataset's last day (their entities are in the online store)."""
    import pyarrow.parquet as pq

    days = sorted((data_dir / "raw" / "transactions").glob("day=*"))
    if not days:
        raise BenchError(f"no raw transactions under {data_dir / 'raw' / 'transactions'}")
    table = pq.read_table(days[-1]).to_pandas()
    table = table.sample(n=min(count, len(table)), random_state=0, replace=len(table) < count)
    return [
        {
            "transaction_id": str(row.transaction_id),
            "customer_id": str(row.customer_id),
            "terminal_id": str(row.terminal_id),
            "tx_amount": float(row.tx_amount),
            "tx_datetime": int(row.tx_datetime.timestamp()),
        }
        for row in table.itertuples()
    ]


def v2_body(transactions: Sequence[dict[str, Any]]) -> bytes:
    n = len(transactions)
    spec = (
        ("transaction_id", "BYTES"),
        ("customer_id", "BYTES"),
        ("terminal_id", "BYTES"),
        ("tx_amount", "FP64"),
        ("tx_datetime", "INT64"),
    )
    return json.dumps(
        {
            "inputs": [
                {"name": name, "datatype": dtype, "shape": [n], "data": [t[name] for t in transactions]}
                for name, dtype in spec
            ]
        }
    ).encode()


#: Runs one tree's `fraud.serving_stack` (imported from that tree: the code under test) in its own
#: process, prints READY when it serves, stops it on SIGTERM. Only StackConfig/ServingStack API
#: common to every measured commit is used.
_STACK_DRIVER = """
import json, signal, sys, threading
from pathlib import Path
from fraud.serving_stack import ServingStack, StackConfig
spec = json.loads(sys.argv[1])
class BenchStack(ServingStack):
    def predictor_command(self):
        return [*super().predictor_command(), *spec["predictor_args"]]
config = StackConfig(
    bundle=Path(spec["bundle"]), port=spec["port"], grpc_port=spec["grpc_port"],
    predictor_port=spec["predictor_port"], online_store=spec["store"], log_dir=Path(spec["log_dir"]),
    audit_spool=Path(spec["audit_spool"]), audit_db_url=spec["audit_db_url"],
    startup_timeout_s=spec["startup_timeout_s"],
)
stack = BenchStack(config)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
stack.start()
print("READY", flush=True)
try:
    done.wait()
finally:
    stack.stop()
"""


@dataclass
class StackHandle:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def start_stack(
    tree: CodeTree,
    bundle: Path,
    data_dir: Path,
    online_store: str,
    work: Path,
    max_batch: int,
    predictor_args: Sequence[str],
    timeout_s: float = 900.0,
) -> StackHandle:
    """The tree's local stack on free ports, with its own audit spool and database, velocity stream
    and idempotency prefix (stacks of several trees run side by side on one data dir)."""
    slug = f"{tree.ref or 'head'}-{online_store}"
    ports = [free_port() for _ in range(3)]
    spec = {
        "bundle": str(bundle),
        "port": ports[0],
        "grpc_port": ports[1],
        "predictor_port": ports[2],
        "store": online_store,
        "log_dir": str(work / f"serve-{slug}"),
        "audit_spool": str(work / f"audit-{slug}" / "spool.db"),
        "audit_db_url": f"sqlite:///{work / f'audit-{slug}' / 'audit.db'}",
        "startup_timeout_s": timeout_s,
        "predictor_args": [
            "--max-batch-size",
            str(max_batch),
            "--idempotency-prefix",
            f"bench:{slug}:",
            *predictor_args,
        ]
        if tree.ref is None or _has_option(tree, "--idempotency-prefix")
        else ["--max-batch-size", str(max_batch), *predictor_args],
    }
    (work / f"audit-{slug}").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "FRAUD_DATA_DIR": str(data_dir),
        "PYTHONPATH": str(tree.root),
        "FRAUD_STREAM_PREFIX": f"bench:{slug}:transactions",
        "OMP_NUM_THREADS": "1",
    }
    log = work / f"stack-{slug}.log"
    sink = log.open("wb")
    process = subprocess.Popen(
        [CORE_PYTHON, "-c", _STACK_DRIVER, json.dumps(spec)],
        cwd=tree.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=sink,
        start_new_session=True,
    )
    handle = StackHandle(tree.name, f"http://127.0.0.1:{ports[0]}/v2/models/{MODEL_NAME}/infer", process, log)
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None  # noqa: S101 - narrows the type: stdout=PIPE
    line = process.stdout.readline().decode(errors="replace").strip()
    if line != "READY" or time.monotonic() > deadline:
        handle.stop()
        raise BenchError(
            f"stack of {tree.name} ({online_store}) did not start:\n{log.read_text(errors='replace')[-2500:]}"
        )
    return handle


def _has_option(tree: CodeTree, option: str) -> bool:
    return option in (tree.root / "predictor" / "__main__.py").read_text()


#: the stack's processes by what they run (command-line fragments), for the CPU accounting
_STACK_ROLES = (
    ("predictor", "-m predictor"),
    ("transformer", "drift_transformer"),
    ("audit writer", "audit writer"),
    ("aggregator", "features aggregate"),
)


def stack_processes(store: str, root_pid: int | None = None) -> dict[str, Any]:
    """The serving stack's processes (children of `root_pid`, default this one) and, for the Redis
    store, the Redis server, by role: where the CPU of a batched run goes."""
    import psutil

    found: dict[str, Any] = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        for role, fragment in _STACK_ROLES:
            if fragment in command and role not in found:
                found[role] = child
    if store == "redis":
        servers = [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("redis-server")]
        if servers:
            found["redis server"] = servers[0]
    return found


def cpu_seconds(processes: dict[str, Any]) -> dict[str, float]:
    """User + system CPU seconds of each process so far (processes that ended are left out)."""
    import psutil

    seconds = {}
    for role, process in processes.items():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seconds[role] = times.user + times.system
    return seconds


def measure_stack(
    handle: StackHandle,
    store: str,
    round_index: int,
    args: argparse.Namespace,
    singles: list[bytes],
    transactions: list[dict[str, Any]],
    batches: Sequence[int],
    rates: Sequence[float],
    duration: float,
    out: dict[str, Any],
) -> None:
    """One round on one stack: saturation, batched (with CPU per process), then fixed rates from low to
    high (so the backlog of an overloaded rate cannot spill into the cheaper measurements)."""
    url = handle.url
    load = machine_snapshot()
    result = run_wrk(url, singles[round_index], connections=args.connections, duration_s=duration)
    out["saturation"].append({**result.to_dict(), **load, "drain_s": wait_idle(url, singles[0])})
    print(
        f"{handle.name} {store} round {round_index} saturation {result.requests_per_s:,.0f} req/s "
        f"p99 {result.p99_ms:.1f} ms errors {result.errors} load {load['load_average_1m']:.1f}",
        file=sys.stderr,
    )
    for batch in batches:
        body = v2_body(transactions[:batch])
        processes = stack_processes(store, handle.process.pid)
        cpu_before = cpu_seconds(processes)
        load = machine_snapshot()
        result = run_wrk(url, body, connections=args.batch_connections, duration_s=duration)
        cpu_after = cpu_seconds(processes)
        row = {**result.to_dict(), **load}
        row["transactions_per_s"] = result.requests_per_s * batch
        scored = max(1, result.requests * batch)
        row["cpu_us_per_transaction"] = {
            name: (cpu_after[name] - cpu_before[name]) * 1e6 / scored for name in cpu_after if name in cpu_before
        }
        row["drain_s"] = wait_idle(url, singles[0])
        out["batched"][str(batch)].append(row)
        print(
            f"{handle.name} {store} round {round_index} batch {batch}: {row['transactions_per_s']:,.0f} tx/s "
            f"p99 {result.p99_ms:.1f} ms errors {result.errors} cpu "
            f"{sum(row['cpu_us_per_transaction'].values()):.0f} us/tx",
            file=sys.stderr,
        )
    for rate in sorted(rates):
        load = machine_snapshot()
        open_result = run_open_loop(url, singles, rate=rate, duration_s=duration)
        out["fixed"][str(rate)].append({**open_result.to_dict(), **load, "drain_s": wait_idle(url, singles[0])})
        print(
            f"{handle.name} {store} round {round_index} @ {rate:g}/s p50 {open_result.p50_ms:.2f} p99 "
            f"{open_result.p99_ms:.2f} ms errors {open_result.errors}",
            file=sys.stderr,
        )


def bench_fullpath(args: argparse.Namespace) -> int:
    started = header("scoring_fullpath", "python benchmarks/bench_scoring.py fullpath " + " ".join(args.argv))
    if args.data_dir is None:
        raise BenchError("fullpath needs --data-dir: a data directory with raw/ and a materialised feature store")
    rounds, duration, rates = (1, 1.0, [20.0]) if args.smoke else (args.rounds, args.duration, args.rates)
    batches = (10,) if args.smoke else tuple(args.batches)
    transactions = sample_transactions(args.data_dir, max(2000, max(batches)))
    singles = [v2_body([t]) for t in transactions[:2000]]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fraud-bench-fullpath-") as tmp:
        work = Path(tmp)
        bundle = resolve_bundle(args.bundle, work)
        facts = bundle_facts(bundle)
        with code_trees(args.baseline, work, "stack") as trees:
            for store in args.stores:
                handles: list[StackHandle] = []
                try:
                    for tree in trees:
                        handle = start_stack(
                            tree, bundle, args.data_dir, store, work, max(max(batches), 512), args.predictor_args
                        )
                        handles.append(handle)
                        response = httpx.post(
                            handle.url, content=singles[0], headers={"content-type": "application/json"}, timeout=30
                        )
                        if response.status_code != 200 or "fraud_probability" not in response.text:
                            raise BenchError(
                                f"{tree.name} ({store}) answered {response.status_code}: {response.text[:500]}"
                            )
                        wait_online_detector(handle.url, args.detector_wait)
                        run_open_loop(handle.url, singles, rate=20.0, duration_s=1.0)  # warm-up
                    collected = {
                        h.name: {
                            "saturation": [],
                            "fixed": {str(r): [] for r in rates},
                            "batched": {str(b): [] for b in batches},
                        }
                        for h in handles
                    }
                    for round_index in range(rounds):
                        order = handles if round_index % 2 == 0 else list(reversed(handles))
                        for handle in order:
                            measure_stack(
                                handle,
                                store,
                                round_index,
                                args,
                                singles,
                                transactions,
                                batches,
                                rates,
                                duration,
                                collected[handle.name],
                            )
                finally:
                    for handle in handles:
                        handle.stop()
                for name, data in collected.items():
                    results.setdefault(name, {})[store] = {
                        "saturation": summarise_wrk(data["saturation"]),
                        "fixed_rate": {rate: summarise_open(runs) for rate, runs in data["fixed"].items()},
                        "batched": {
                            b: {
                                **summarise_wrk(runs),
                                "median_transactions_per_s": median([r["transactions_per_s"] for r in runs]),
                                "median_cpu_us_per_transaction": {
                                    role: median([r["cpu_us_per_transaction"].get(role, 0.0) for r in runs])
                                    for role in runs[0]["cpu_us_per_transaction"]
                                },
                            }
                            for b, runs in data["batched"].items()
                        },
                    }
    report = started
    comparisons = {}
    for name in results:
        if name == "stack":
            continue
        comparisons[name] = {
            store: {
                "saturation_ratio": results["stack"][store]["saturation"]["median_requests_per_s"]
                / results[name][store]["saturation"]["median_requests_per_s"],
                **{
                    f"batch_{b}_ratio": results["stack"][store]["batched"][str(b)]["median_transactions_per_s"]
                    / results[name][store]["batched"][str(b)]["median_transactions_per_s"]
                    for b in batches
                },
                **{
                    f"p99_at_{r:g}_ratio": results["stack"][store]["fixed_rate"][str(r)]["median_p99_ms"]
                    / results[name][store]["fixed_rate"][str(r)]["median_p99_ms"]
                    for r in rates
                },
            }
            for store in results[name]
        }
    report.update(
        {
            "bundle": facts,
            "data_dir": str(args.data_dir),
            "smoke": args.smoke,
            "rounds": rounds,
            "duration_s": duration,
            "connections": args.connections,
            "batch_connections": args.batch_connections,
            "predictor_args": list(args.predictor_args),
            "offered_rates": rates,
            "load_average_1m_end": os.getloadavg()[0],
            "systems": results,
            "stores": results["stack"],
            "this_checkout_over_baseline": comparisons,
        }
    )
    loads = [
        r["load_average_1m"]
        for system in results.values()
        for data in system.values()
        for r in data["saturation"]["runs"]
    ]
    lines = [
        f"Measured {report['date']}; transformer -> predictor -> Feast online store, {rounds} rounds x {duration:g} s, "
        f"stacks alternated every round, medians; 1-min load average {min(loads):.1f} to {max(loads):.1f} "
        f"on {report['machine']['cpus']} cores. "
        f"Predictor options: `{' '.join(args.predictor_args) or '(defaults)'}`. Command: `{report['command']}`.",
        "",
        f"| stack | online store | saturation req/s ({args.connections} conns) | p50 / p99 at saturation (ms) | "
        + " | ".join(f"p50 / p99 @ {r:g}/s (ms)" for r in rates)
        + " | "
        + " | ".join(f"batch {b:,}: tx/s (p99 ms)" for b in batches)
        + " | errors | client CPU (cores) |",
        "|---|---|---:|---:|" + "---:|" * len(rates) + "---:|" * len(batches) + "---:|---:|",
    ]
    for name, stores in results.items():
        for store, data in stores.items():
            sat = data["saturation"]
            errors = (
                sat["errors"]
                + sum(d["errors"] for d in data["fixed_rate"].values())
                + sum(d["errors"] for d in data["batched"].values())
            )
            client = max(
                [sat["median_client_cpu_cores"]] + [d["median_client_cpu_cores"] for d in data["fixed_rate"].values()]
            )
            lines.append(
                f"| {name} | {store} | {sat['median_requests_per_s']:,.0f} "
                f"| {sat['median_p50_ms']:.1f} / {sat['median_p99_ms']:.1f} | "
                + " | ".join(
                    f"{data['fixed_rate'][str(r)]['median_p50_ms']:.1f} / "
                    f"{data['fixed_rate'][str(r)]['median_p99_ms']:.1f}"
                    for r in rates
                )
                + " | "
                + " | ".join(
                    f"{data['batched'][str(b)]['median_transactions_per_s']:,.0f} "
                    f"({data['batched'][str(b)]['median_p99_ms']:.0f})"
                    for b in batches
                )
                + f" | {errors} | ≤ {client:.2f} |"
            )
    roles = [role for role, _ in _STACK_ROLES] + ["redis server"]
    lines += [
        "",
        (
            "CPU time per transaction of each process during the batched runs (µs, medians; user + system "
            "time from /proc; the load generator's is in the client CPU column):"
        ),
        "",
        "| stack | online store | batch | " + " | ".join(roles) + " | total |",
        "|---|---|---:|" + "---:|" * (len(roles) + 1),
    ]
    for name, stores in results.items():
        for store, data in stores.items():
            for b in batches:
                cpu = data["batched"][str(b)]["median_cpu_us_per_transaction"]
                lines.append(
                    f"| {name} | {store} | {b:,} | "
                    + " | ".join(f"{cpu[r]:.1f}" if r in cpu else "-" for r in roles)
                    + f" | {sum(cpu.values()):.1f} |"
                )
    for name, per_store in comparisons.items():
        for store, ratio in per_store.items():
            lines += [
                "",
                f"This checkout over `{name}` ({store}; >1 = faster; p99 ratio <1 = lower latency): "
                + ", ".join(f"{k.removesuffix('_ratio').replace('_', ' ')} {v:.2f}" for k, v in ratio.items())
                + ".",
            ]
    finish(report, "scoring_fullpath", args.label, "\n".join(lines), args.no_save, args.output)
    return 0


# --- 4. online lookups ----------------------------------------------------------------------------
def bench_lookup(args: argparse.Namespace) -> int:
    """Batch features of n (customer, terminal) pairs from each online store, in-process: the
    predictor's batched reader (`fraud.online_readers`) against Feast's own `online_read` per view
    (the reader's fall-back, and what round 2 used), alternating, medians over repeats."""
    started = header("scoring_lookup", "python benchmarks/bench_scoring.py lookup " + " ".join(args.argv))
    if args.data_dir is None:
        raise BenchError("lookup needs --data-dir: a data directory with raw/ and a materialised feature store")
    os.environ["FRAUD_DATA_DIR"] = str(args.data_dir)
    from fraud.feature_store import online_client

    batches = (1, 10) if args.smoke else tuple(args.batches)
    repeats = 3 if args.smoke else args.repeats
    transactions = sample_transactions(args.data_dir, max(batches))
    rows: list[dict[str, Any]] = []
    for store in args.stores:
        client = online_client(store)
        client.views()
        reader = client._reader
        if reader is None:
            raise BenchError(f"the {store} store has no batched reader (Feast's key layout changed?)")
        for batch in batches:
            customers = [t["customer_id"] for t in transactions[:batch]]
            terminals = [t["terminal_id"] for t in transactions[:batch]]
            timings: dict[str, list[float]] = {"batched reader": [], "online_read per view": []}
            for _ in range(repeats):
                for name, chosen in (("batched reader", reader), ("online_read per view", None)):
                    client._reader = chosen
                    begin = time.perf_counter()
                    arrays = client.arrays(customers, terminals)
                    timings[name].append(time.perf_counter() - begin)
                    if np.isnan(arrays.values).all(axis=1).any():
                        raise BenchError(f"{store}: some benchmark pairs are unknown to the store (not materialised?)")
            client._reader = reader
            for name, samples in timings.items():
                rows.append(
                    {
                        "store": store,
                        "pairs": batch,
                        "path": name,
                        "median_ms": median(samples) * 1e3,
                        "us_per_pair": median(samples) * 1e6 / batch,
                    }
                )
            print(
                f"{store} {batch:>5} pairs: " + ", ".join(f"{r['path']} {r['median_ms']:.2f} ms" for r in rows[-2:]),
                file=sys.stderr,
            )
    report = started
    report.update({"data_dir": str(args.data_dir), "smoke": args.smoke, "repeats": repeats, "results": rows})
    lines = [
        f"Measured {report['date']}, in-process, {repeats} repeats alternating, medians; 1-min load average at start "
        f"{report['machine']['load_average_1m']:.1f} on {report['machine']['cpus']} cores. "
        f"Command: `{report['command']}`.",
        "",
        "| online store | pairs per call | batched reader (ms) | Feast `online_read` per view (ms) | speed-up "
        "| batched µs / pair |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for store in args.stores:
        for batch in batches:
            fast, slow = (
                next(r for r in rows if r["store"] == store and r["pairs"] == batch and r["path"] == path)
                for path in ("batched reader", "online_read per view")
            )
            lines.append(
                f"| {store} | {batch:,} | {fast['median_ms']:.2f} | {slow['median_ms']:.2f} | "
                f"{slow['median_ms'] / fast['median_ms']:.1f}x | {fast['us_per_pair']:.1f} |"
            )
    finish(report, "scoring_lookup", args.label, "\n".join(lines), args.no_save, args.output)
    return 0


# --- CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Scoring benchmarks (see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("model", "serving", "fullpath", "lookup"):
        p = sub.add_parser(name)
        p.add_argument("--bundle", type=Path, help="serving bundle directory (default: a synthetic 20-tree bundle)")
        p.add_argument("--smoke", action="store_true", help="seconds-long run that only checks the benchmark works")
        p.add_argument("--no-save", action="store_true", help="print the JSON instead of writing results/docs")
        p.add_argument("--label", help="suffix of the result file and docs section (e.g. before, after)")
        p.add_argument("--output", type=Path, help="write the JSON to this file only (no results/ file, no docs)")
        if name == "model":
            p.add_argument("--min-seconds", type=float, default=1.0)
            p.add_argument("--repeats", type=int, default=5)
            continue
        if name == "lookup":
            p.add_argument("--data-dir", type=Path, help="data dir with raw/ and a materialised feature store")
            p.add_argument("--stores", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
            p.add_argument("--batches", type=int, nargs="+", default=[1, 100, 1000])
            p.add_argument("--repeats", type=int, default=15)
            continue
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
        p.add_argument("--rates", type=float, nargs="+", default=[250.0, 500.0, 1000.0], help="open-loop offered req/s")
        p.add_argument("--connections", type=int, default=16, help="wrk connections for saturation")
        p.add_argument(
            "--predictor-arg",
            dest="predictor_args",
            action="append",
            default=[],
            help="extra option for the predictor process (repeatable, e.g. --predictor-arg=--workers=2)",
        )
        p.add_argument(
            "--baseline",
            action="append",
            default=[],
            metavar="COMMIT",
            help="also measure this commit's code, alternating with this checkout (repeatable)",
        )
        if name == "serving":
            p.add_argument("--entities", type=int, default=1000)
            p.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
            p.add_argument("--batch-connections", type=int, default=4)
            p.add_argument("--no-mlserver", action="store_true", help="our predictor only (no MLServer environment)")
            p.add_argument(
                "--baseline-bundle",
                choices=["same", "own"],
                default="same",
                help="with --bundle: baselines load it too (same) or a synthetic bundle of their own factories (own)",
            )
        else:
            p.add_argument("--data-dir", type=Path, help="data dir with raw/ and a materialised feature store")
            p.add_argument("--stores", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
            p.add_argument("--batches", type=int, nargs="+", default=[100, 1000])
            p.add_argument("--batch-connections", type=int, default=4)
            p.add_argument(
                "--detector-wait",
                type=float,
                default=300.0,
                help="longest wait (s) for the transformer's online drift detector before measuring",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    # SIGTERM (e.g. a timeout) unwinds like Ctrl-C, so the servers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        commands = {"model": bench_model, "serving": bench_serving, "fullpath": bench_fullpath, "lookup": bench_lookup}
        return commands[args.command](args)
    except (BenchError, LoadGenError) as exc:
        print(f"bench_scoring: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
