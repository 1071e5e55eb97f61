"""Running the training pipeline with `kfp.local` (SubprocessRunner, no venv: the components run
as subprocesses of the current interpreter, where the project package is installed).

kfp.local writes every task's outputs below `<pipeline_root>/<pipeline-name>-<timestamp>/<task>/`
(artifacts as files / directories named after the output, parameters in the task's
`executor_output.json`). `LocalRunResult` reads the gate verdict, the registered version and the
artifact locations from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def run_local(arguments: dict, pipeline_root: Path) -> LocalRunResult:
    """Run the whole pipeline locally; raises RuntimeError if a task fails."""
    from kfp import local

    from pipelines.training_pipeline import training_pipeline

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in pipeline_root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.perf_counter()
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
