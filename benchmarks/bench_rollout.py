"""Time-to-rollback and requests affected by a bad canary, on the local target.

Real processes throughout: `fraud deploy --target local` (the CLI an operator runs), predictor
processes behind the local canary router, an MLflow SQLite registry, and a load generator sending
single-transaction scoring requests through the router from a few threads. Two incidents:

* **killed canary** - the canary predictor is SIGKILLed mid-window. Measured: time from the kill
  to the last request the router sent to it (router health checks and connection-refused retries),
  time from the kill to the rollout's roll back (the rollout record final, the canary gone from the
  routing table), requests answered with an error after the kill.
* **decline everything** - the same model with thresholds that decline every transaction (the
  score distribution does not move). Measured: time from the canary's first answer to the roll
  back, and the requests the canary answered (all declined) before it.

Both windows are 120 s with a look every `--interval` seconds (early abort); without early abort
the canary would serve its share for the whole window.

    .venv/bin/python benchmarks/bench_rollout.py             # ~2-3 min; JSON + table in docs/deployment.md
    .venv/bin/python benchmarks/bench_rollout.py --no-save   # print the JSON only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline_scale import save_json, write_docs_section

from fraud.config import MODEL_NAME, PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
DOCS = PROJECT_ROOT / "docs" / "deployment.md"
MARKS = ("<!-- bench_rollout:start -->", "<!-- bench_rollout:end -->")
WINDOW_SECONDS = 120


@dataclass
class Answer:
    at: float
    status: int
    version: str
    decision: str


@dataclass
class Load:
    """Closed-loop scoring requests through the router from `threads` threads."""

    url: str
    threads: int = 3
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = offset
            while not self._stop.is_set():
                body = {
                    "instances": [
                        {
                            "transaction_id": f"b{i}",
                            "customer_id": f"c{i % 50}",
                            "terminal_id": f"k{i % 30}",
                            "tx_amount": 10.0 + i % 200,
                            "tx_datetime": "2026-11-01T12:00:00",
                        }
                    ]
                }
                try:
                    reply = client.post(f"{self.url}/v1/models/{MODEL_NAME}:predict", json=body)
                    decision = ""
                    if reply.status_code == 200:
                        decision = str(reply.json()["predictions"][0].get("decision", ""))
                    self.answers.append(
                        Answer(
                            time.monotonic(),
                            reply.status_code,
                            reply.headers.get("x-fraud-model-version", ""),
                            decision,
                        )
                    )
                except (httpx.HTTPError, ValueError, KeyError, IndexError):
                    self.answers.append(Answer(time.monotonic(), 0, "", ""))
                i += self.threads

    def __enter__(self) -> Self:
        for offset in range(self.threads):
            worker = threading.Thread(target=self._run, args=(offset,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(15)


def _fraud(env: dict[str, str], *args: str) -> subprocess.Popen:
    fraud = Path(sys.executable).parent / "fraud"
    return subprocess.Popen([str(fraud), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _routes(router: str) -> dict[str, Any]:
    return httpx.get(f"{router}/-/routes", timeout=5).json()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _policy_file(work: Path, interval: float) -> Path:
    path = work / "bench-policy.yaml"
    path.write_text(
        "apiVersion: fraud.platform/v1\nkind: RolloutPolicy\n"
        f"steps:\n  - {{percent: 20, windowSeconds: {WINDOW_SECONDS}}}\n"
        f"evaluationIntervalSeconds: {interval}\n"
        "checks: {minSuccessfulScorings: 30, minDecisionCount: 30, maxP99Seconds: 2.0}\n"
    )
    return path


def _deploy_args(version: str, uri: str, *extra: str) -> list[str]:
    return [
        "deploy",
        "--target",
        "local",
        "--namespace",
        "bench",
        "--version",
        version,
        "--mlflow-tracking-uri",
        uri,
        *extra,
    ]


def _stack(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "serving" / "local-canary" / "stack.json").read_text())


def killed_canary(env, data_dir, uri, version, policy, router) -> dict[str, Any]:
    with Load(router) as load:
        rollout = _fraud(env, *_deploy_args(version, uri, "--policy", str(policy)))
        _wait(lambda: sum(a.version == version for a in load.answers) >= 50, 300, "the canary to serve")
        pid = int(_stack(data_dir)["canary"]["pid"])
        killed_at = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        _wait(lambda: _routes(router)["canary"] is None, 120, "the canary to leave the routing table")
        routed_out = time.monotonic()
        output, _ = rollout.communicate(timeout=120)
        finished = time.monotonic()
        time.sleep(1.0)
    after = [a for a in load.answers if a.at >= killed_at]
    to_canary = [a for a in after if a.version == version]
    return {
        "scenario": "killed canary",
        "exit_code": rollout.returncode,
        "seconds_kill_to_last_canary_answer": round(max((a.at for a in to_canary), default=killed_at) - killed_at, 3),
        "seconds_kill_to_routing_table_without_canary": round(routed_out - killed_at, 3),
        "seconds_kill_to_rollout_finished": round(finished - killed_at, 3),
        "requests_after_kill": len(after),
        "requests_failed_after_kill": sum(a.status != 200 for a in after),
        "requests_502_after_kill": sum(a.status == 502 for a in after),
        "rollout_output_tail": output.strip().splitlines()[-12:],
    }


def decline_everything(env, uri, version, policy, router) -> dict[str, Any]:
    with Load(router) as load:
        rollout = _fraud(env, *_deploy_args(version, uri, "--policy", str(policy)))
        _wait(lambda: any(a.version == version for a in load.answers), 300, "the canary to serve")
        first = min(a.at for a in load.answers if a.version == version)
        _wait(lambda: _routes(router)["canary"] is None, WINDOW_SECONDS + 60, "the roll back")
        routed_out = time.monotonic()
        output, _ = rollout.communicate(timeout=120)
        time.sleep(1.0)
    canary = [a for a in load.answers if a.version == version]
    total = [a for a in load.answers if a.at >= first and a.at <= routed_out]
    return {
        "scenario": "decline everything",
        "exit_code": rollout.returncode,
        "seconds_first_canary_answer_to_routing_table_without_canary": round(routed_out - first, 3),
        "requests_answered_by_canary": len(canary),
        "canary_declines": sum(a.decision == "decline" for a in canary),
        "requests_during_canary": len(total),
        "requests_per_second": round(len(total) / max(routed_out - first, 1e-9), 1),
        "rollout_output_tail": output.strip().splitlines()[-12:],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.test_deploy_support import build_registry, register_variant

    work = Path(tempfile.mkdtemp(prefix="fraud-bench-rollout-"))
    data_dir = work / "data"
    data_dir.mkdir()
    env = {**os.environ, "FRAUD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    try:
        reg = build_registry(work / "mlflow", 2, same_model=True)
        declining = register_variant(reg, work / "mlflow", "decline-everything")
        v1, v2 = reg.versions
        policy = _policy_file(work, args.interval)
        first = _fraud(env, *_deploy_args(v1, reg.uri, "--first-deploy", "--no-analyse"))
        output, _ = first.communicate(timeout=600)
        if first.returncode != 0:
            raise RuntimeError(f"first deployment failed:\n{output}")
        router = f"http://127.0.0.1:{_stack(data_dir)['router_port']}"
        with Load(router):  # the first version's own window needs traffic to pass
            analysed = _fraud(env, *_deploy_args(v1, reg.uri, "--window", "5"))
            output, _ = analysed.communicate(timeout=600)
        if analysed.returncode != 0:
            raise RuntimeError(f"first deployment was not promoted:\n{output}")
        results = [
            killed_canary(env, data_dir, reg.uri, v2, policy, router),
            decline_everything(env, reg.uri, declining, policy, router),
        ]
        return {
            "benchmark": "rollout",
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
            "window_seconds": WINDOW_SECONDS,
            "evaluation_interval_seconds": args.interval,
            "canary_percent": 20,
            "router_health_interval_seconds": 0.5,
            "load_threads": 3,
            "results": results,
        }
    finally:
        stop = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "from fraud.deploy.local import LocalStack, local_dir; "
                    "from fraud.config import MODEL_NAME; LocalStack(local_dir(), MODEL_NAME).stop_all()"
                ),
            ],
            env=env,
            cwd=PROJECT_ROOT,
            check=False,
            capture_output=True,
        )
        if stop.returncode != 0:
            print(stop.stderr.decode(errors="replace"), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def table(report: dict[str, Any]) -> str:
    killed, declining = report["results"]
    machine = report["machine"]
    return "\n".join(
        [
            (
                f"Measured {report['date']} on {machine['cpus']} cores under a 1-minute load average of "
                f"{machine['load_1m']:.1f} (other work on the machine), canary {report['canary_percent']} %, window "
                f"{report['window_seconds']} s, a look every {report['evaluation_interval_seconds']} s, router "
                f"health probe every {report['router_health_interval_seconds']} s, {report['load_threads']} client "
                "threads; `benchmarks/bench_rollout.py`, `benchmarks/results/rollout_<date>.json`."
            ),
            "",
            "| incident | canary out of the routing table | rollout finished (exit 3) | requests affected |",
            "|---|---|---|---|",
            (
                f"| canary process killed mid-window | {killed['seconds_kill_to_routing_table_without_canary']:.2f} s "
                f"after the kill | {killed['seconds_kill_to_rollout_finished']:.2f} s after the kill "
                f"| {killed['requests_failed_after_kill']} of {killed['requests_after_kill']} requests after the "
                "kill failed (502: in flight when the process died); the others went to stable |"
            ),
            (
                f"| canary declines everything | "
                f"{declining['seconds_first_canary_answer_to_routing_table_without_canary']:.2f} s after its first "
                f"answer | - | {declining['requests_answered_by_canary']} requests answered by the canary "
                f"({declining['canary_declines']} declined) of {declining['requests_during_canary']} "
                f"({declining['requests_per_second']} requests/s) |"
            ),
            "",
            f"Without early abort the canary keeps its share for the whole {report['window_seconds']} s window.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between looks of the analysis")
    parser.add_argument("--no-save", action="store_true", help="print the JSON; write no results or docs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--table-from", type=Path, help="only re-render the docs table from a saved result")
    args = parser.parse_args(argv)
    if args.table_from:
        write_docs_section(table(json.loads(args.table_from.read_text())), MARKS, DOCS)
        return 0
    report = run(args)
    if args.no_save:
        print(json.dumps(report, indent=2))
        return 0
    path = RESULTS / f"rollout_{report['date']}.json"
    save_json(report, path)
    write_docs_section(table(report), MARKS, DOCS)
    print(f"wrote {path} and the table in {DOCS}")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
