"""The rollout state machine and its persisted record.

    pending -> deployed -> analysing -> promoted
                 |            |     \\-> rolled_back
                 \\-> rolled_back (the canary never became ready)

`pending` is written *before* the serving stack is touched, `deployed` once the new revision is
ready and taking its canary share, `analysing` when the first analysis window opens (a rollout
with several traffic steps stays `analysing` through them, `step_index` says which one runs);
`promoted` and `rolled_back` are final. Finished rollouts are appended to a history file
(`fraud deploy history`). The record is persisted (a JSON state file, written atomically, and —
for Kubernetes — an annotation on the InferenceService) so a re-run after a crash resumes where
the previous run stopped instead of patching twice or deciding twice.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from fraud import atomic

#: Annotation on the InferenceService that carries the rollout record (JSON).
ROLLOUT_ANNOTATION = "fraud.platform/rollout"
#: Label on the InferenceService / predictor pods naming the served model version.
VERSION_LABEL = "fraud.platform/model-version"

TARGETS = ("record", "kubernetes", "local")


class RolloutError(Exception):
    """A rollout step could not be carried out (API error, illegal transition, missing model)."""


class RolloutState(str, Enum):  # noqa: UP042 - StrEnum would change str() and f-string output of members
    PENDING = "pending"
    DEPLOYED = "deployed"
    ANALYSING = "analysing"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"

    @property
    def final(self) -> bool:
        return self in (RolloutState.PROMOTED, RolloutState.ROLLED_BACK)


ALLOWED_TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    RolloutState.PENDING: frozenset({RolloutState.DEPLOYED, RolloutState.ROLLED_BACK}),
    RolloutState.DEPLOYED: frozenset({RolloutState.ANALYSING, RolloutState.PROMOTED, RolloutState.ROLLED_BACK}),
    RolloutState.ANALYSING: frozenset({RolloutState.PROMOTED, RolloutState.ROLLED_BACK}),
    RolloutState.PROMOTED: frozenset({RolloutState.ROLLED_BACK}),  # only by hand: `fraud deploy rollback`
    RolloutState.ROLLED_BACK: frozenset(),
}


def one_line(text: str, limit: int = 400) -> str:
    """A failure reason as one line: whitespace collapsed, a traceback reduced to its last line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [line for line in lines if not line.startswith(("Traceback", "File ", "^", "~"))][-1:]
    flat = " ".join(" ".join(lines).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Transition:
    state: str
    at: str
    note: str = ""


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout of `model_version` (the canary) against `previous_version` (the stable one)."""

    model_name: str
    model_version: str
    target: str
    namespace: str
    state: RolloutState
    canary_traffic_percent: int
    previous_version: str = ""
    storage_uri: str = ""
    previous_storage_uri: str = ""
    #: "promoted" | "rolled_back" | "" while undecided
    decision: str = ""
    reason: str = ""
    #: the analysis numbers (error rates, p99s, score shift) the decision was taken on
    analysis: dict[str, Any] = field(default_factory=dict)
    #: metadata.generation the canary patch produced (Kubernetes)
    generation: int = 0
    history: tuple[Transition, ...] = ()
    #: identifies this rollout in the history (a retry of the same version is a new rollout)
    rollout_id: str = ""
    #: the rollout policy (`fraud.deploy.policy.RolloutPolicy.to_dict`) the rollout runs under
    policy: dict[str, Any] = field(default_factory=dict)
    #: index into the policy's steps of the step being analysed
    step_index: int = 0
    #: one entry per finished step: percent, window, decision, reason, early, checks
    step_results: tuple[dict[str, Any], ...] = ()
    #: the checks of the last evaluation: name, verdict, value, limit, detail
    checks: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise RolloutError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 0 <= self.canary_traffic_percent <= 100:
            raise RolloutError(f"canary_traffic_percent must be within 0..100, got {self.canary_traffic_percent}")

    @classmethod
    def start(cls, **fields: Any) -> RolloutRecord:
        fields.setdefault("rollout_id", uuid.uuid4().hex[:12])
        record = cls(state=RolloutState.PENDING, **fields)
        return replace(record, history=(Transition(RolloutState.PENDING.value, utc_now(), "rollout requested"),))

    def note(self, text: str, **changes: Any) -> RolloutRecord:
        """The record with a history entry in the current state (a traffic step, say)."""
        return replace(self, history=(*self.history, Transition(self.state.value, utc_now(), text)), **changes)

    @property
    def started_at(self) -> str:
        return self.history[0].at if self.history else ""

    @property
    def finished_at(self) -> str:
        return self.history[-1].at if self.history and self.state.final else ""

    def advance(self, state: RolloutState, note: str = "", **changes: Any) -> RolloutRecord:
        """The record in `state`; raises RolloutError for a transition the state machine forbids."""
        if state not in ALLOWED_TRANSITIONS[self.state]:
            raise RolloutError(
                f"rollout of version {self.model_version} cannot go from {self.state.value} to {state.value}"
            )
        return replace(self, state=state, history=(*self.history, Transition(state.value, utc_now(), note)), **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["history"] = [asdict(t) for t in self.history]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutRecord:
        try:
            data = dict(data)
            data["state"] = RolloutState(data["state"])
            data["history"] = tuple(Transition(**t) for t in data.get("history", ()))
            data["step_results"] = tuple(data.get("step_results", ()))
            data["checks"] = tuple(data.get("checks", ()))
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"rollout record is invalid: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> RolloutRecord:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise RolloutError(f"rollout record is not JSON: {exc}") from None

    def summary(self) -> dict[str, Any]:
        """Flat metadata for a KFP artifact / MLflow tags."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "previous_version": self.previous_version,
            "target": self.target,
            "namespace": self.namespace,
            "state": self.state.value,
            "canary_traffic_percent": self.canary_traffic_percent,
            "decision": self.decision,
            "reason": self.reason,
            "rollout_id": self.rollout_id,
            "step_index": self.step_index,
        }


class StateStore:
    """Rollout records as JSON files, one per (target, namespace, model): the latest rollout wins."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, target: str, namespace: str, model_name: str) -> Path:
        return self.directory / f"{target}--{namespace or 'default'}--{model_name}.json"

    def load(self, target: str, namespace: str, model_name: str) -> RolloutRecord | None:
        path = self.path(target, namespace, model_name)
        if not path.is_file():
            return None
        return RolloutRecord.from_json(path.read_text())

    def save(self, record: RolloutRecord) -> Path:
        path = self.path(record.target, record.namespace, record.model_name)
        atomic.write_text(path, record.to_json())
        if record.state.final:
            self.archive(record)
        return path

    def history_path(self, target: str, namespace: str, model_name: str) -> Path:
        return self.directory / f"{target}--{namespace or 'default'}--{model_name}.history.jsonl"

    def archive(self, record: RolloutRecord) -> None:
        """Append a finished rollout to the history (one JSON line; the latest line of an id wins)."""
        path = self.history_path(record.target, record.namespace, record.model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def history(self, target: str, namespace: str, model_name: str) -> list[RolloutRecord]:
        """Finished rollouts, oldest first (a rollout rolled back by hand after its promotion once)."""
        path = self.history_path(target, namespace, model_name)
        if not path.is_file():
            return []
        latest: dict[str, RolloutRecord] = {}
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = RolloutRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, RolloutError):
                continue  # a line cut by a crash mid-write: the other entries still count
            latest.pop(record.rollout_id or line, None)
            latest[record.rollout_id or line] = record
        return list(latest.values())
