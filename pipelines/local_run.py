"""Running the training pipeline with `kfp.local` (SubprocessRunner, no venv: the components run
as subprocesses of the current interpreter, where the project package is installed).

Two modes:

* embedded (default): every task inherits this process's environment and shares its data
  directory, as `make demo` does;
* isolated (`Isolation`): every task runs as on a cluster, where each task is its own pod: a new
  empty working directory, HOME, TMPDIR and data directory (FRAUD_DATA_DIR), deleted when the task
  ends, and an environment holding nothing but PATH, the locale and the declared service settings
  (`Isolation.service_env`: what the cluster's secrets provide). A task can only use its input
  artifacts, its parameters and the services.

kfp.local writes every task's outputs below `<pipeline_root>/<pipeline-name>-<timestamp>/<task>/`
(artifacts as files / directories named after the output, parameters in the task's
`executor_output.json`). `LocalRunResult` reads the gate verdict, the registered version and the
artifact locations from there.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kfp.local import subprocess_task_handler

from pipelines.training_pipeline import PIPELINE_NAME

#: Task names in the compiled pipeline, in execution order.
TASKS: tuple[str, ...] = (
    "ingest",
    "engineer-features",
    "build-training-set",
    "train",
    "evaluate",
    "gate",
    "register",
    "deploy-model",
    "analyse-canary",
)


@dataclass
class LocalRunResult:
    run_dir: Path
    seconds: float
    tasks_run: list[str] = field(default_factory=list)
    gate_verdict: str = ""
    gate_reason: str = ""
    model_version: str = ""
    rollout_state: str = ""

    def task_dir(self, task: str) -> Path:
        return self.run_dir / task

    def as_dict(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "seconds": round(self.seconds, 1),
            "tasks_run": self.tasks_run,
            "gate_verdict": self.gate_verdict,
            "gate_reason": self.gate_reason,
            "model_version": self.model_version,
            "rollout_state": self.rollout_state,
        }


def _parameter_outputs(task_dir: Path) -> dict:
    """Output parameters of a finished task, from its executor_output.json."""
    path = task_dir / "executor_output.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return dict(data.get("parameterValues", {}))


def _artifact_metadata(task_dir: Path, name: str) -> dict:
    """Metadata of an output artifact of a finished task, from its executor_output.json."""
    path = task_dir / "executor_output.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    for artifact in data.get("artifacts", {}).get(name, {}).get("artifacts", []):
        return dict(artifact.get("metadata", {}))
    return {}


def collect_result(run_dir: Path, seconds: float) -> LocalRunResult:
    result = LocalRunResult(run_dir=run_dir, seconds=seconds)
    result.tasks_run = [task for task in TASKS if (run_dir / task).is_dir()]
    result.gate_verdict = str(_parameter_outputs(run_dir / "gate").get("Output", ""))
    decision = _artifact_metadata(run_dir / "gate", "decision")
    result.gate_reason = str(decision.get("reason", ""))
    result.model_version = str(_parameter_outputs(run_dir / "register").get("Output", ""))
    result.rollout_state = str(_parameter_outputs(run_dir / "analyse-canary").get("Output", ""))
    return result


@dataclass(frozen=True)
class Isolation:
    """Run each task in its own sandbox below `sandbox_root`, seeing only `service_env`."""

    sandbox_root: Path
    #: the service settings a task gets (object store, Feast registry / online store, MLflow)
    service_env: Mapping[str, str] = field(default_factory=dict)
    #: keep each task's sandbox after it ends (for debugging); by default it is deleted
    keep_sandboxes: bool = False

    def task_env(self, sandbox: Path) -> dict[str, str]:
        base = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ}
        return {
            **base,
            **dict(self.service_env),
            "HOME": str(sandbox / "home"),
            "TMPDIR": str(sandbox / "tmp"),
            "FRAUD_DATA_DIR": str(sandbox / "data"),
        }


def _task_name(full_command: list[str]) -> str:
    """The task's name: the folder of its executor output file (`<run>/<task>/executor_output.json`)."""
    if "--executor_input" in full_command:
        executor_input = json.loads(full_command[full_command.index("--executor_input") + 1])
        output_file = executor_input.get("outputs", {}).get("outputFile", "")
        if output_file:
            return Path(output_file).parent.name
    return "task"


def isolated_subprocess(isolation: Isolation):
    """A replacement of kfp.local's subprocess launcher that runs each task in a fresh sandbox."""
    counter = itertools.count(1)

    def run(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        sandbox = Path(isolation.sandbox_root) / f"{next(counter):02d}-{_task_name(full_command)}"
        if sandbox.exists():
            shutil.rmtree(sandbox)
        for name in ("work", "home", "tmp", "data"):
            (sandbox / name).mkdir(parents=True)
        env = {**isolation.task_env(sandbox), **(env_vars or {})}
        try:
            return _run_task(full_command, env, cwd=sandbox / "work")
        finally:
            if not isolation.keep_sandboxes:
                shutil.rmtree(sandbox, ignore_errors=True)

    return run


def _run_task(full_command: list[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
    """Run one task's command as kfp.local's subprocess runner does (its output streamed to ours);
    its exit status."""
    with subprocess.Popen(  # noqa: S603 - the pipeline's own component command, an argument list, no shell
        full_command,
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        assert process.stdout is not None  # noqa: S101 - narrows the type: stdout=PIPE always sets it
        for line in iter(process.stdout.readline, ""):
            print(line, end="")
        print("\n")
    return process.wait()


def embedded_subprocess(task_env: Mapping[str, str]):
    """kfp.local's subprocess launcher with `task_env` as the environment of every task (embedded
    mode: the caller's environment plus its settings, e.g. the data directory of `--data-dir`)."""

    def run(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        return _run_task(full_command, {**task_env, **(env_vars or {})})

    return run


@contextlib.contextmanager
def isolated_tasks(isolation: Isolation | None, task_env: Mapping[str, str] | None = None) -> Iterator[None]:
    """kfp.local launches every task through `subprocess_task_handler.run_local_subprocess`;
    isolation swaps in `isolated_subprocess` for the duration of the run, a `task_env` (embedded
    mode) `embedded_subprocess`."""
    if isolation is None and task_env is None:
        yield
        return
    original = subprocess_task_handler.run_local_subprocess
    subprocess_task_handler.run_local_subprocess = (
        isolated_subprocess(isolation) if isolation is not None else embedded_subprocess(task_env or {})
    )
    try:
        yield
    finally:
        subprocess_task_handler.run_local_subprocess = original


def run_local(
    arguments: dict,
    pipeline_root: Path,
    isolation: Isolation | None = None,
    task_env: Mapping[str, str] | None = None,
) -> LocalRunResult:
    """Run the whole pipeline locally (isolated per task when `isolation` is given, else with
    `task_env` as every task's environment, default this process's); raises RuntimeError if a
    task fails."""
    from kfp import local

    from pipelines.training_pipeline import training_pipeline

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in pipeline_root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.perf_counter()
    with isolated_tasks(isolation, task_env):
        training_pipeline(**arguments)
    seconds = time.perf_counter() - started
    new_runs = sorted(
        (
            p
            for p in pipeline_root.iterdir()
            if p.is_dir() and p.name not in before and p.name.startswith(PIPELINE_NAME)
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not new_runs:
        raise RuntimeError(f"the local run left no output directory under {pipeline_root}")
    return collect_result(new_runs[-1], seconds)
