"""The rollout: deploy a model version as a canary, analyse it, promote or roll back.

One flow for every target; a `Backend` does the target-specific part:

* `record`      - no serving stack: the decision is recorded in MLflow and the rollout record only;
* `kubernetes`  - the KServe InferenceService (`fraud.deploy.kserve_rollout`), metrics from Prometheus;
* `local`       - local predictor processes behind the local canary router (`fraud.deploy.local`),
                  metrics scraped from the predictors' /metrics.

Every step persists the record before and after touching anything, so re-running `deploy` or
`analyse` after a crash continues from the persisted state: a pending rollout is re-applied (an
identical patch does not create a new generation), a decided-but-unapplied verdict is applied
without a second analysis, a finished rollout is returned unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fraud.config import MODEL_NAME, DataLayout
from fraud.deploy.canary import (
    PROMOTE,
    ROLL_BACK,
    CanaryCriteria,
    PrometheusSource,
    ScrapeSource,
    Verdict,
)
from fraud.deploy.canary import (
    analyse as run_analysis,
)
from fraud.deploy.state import TARGETS, RolloutError, RolloutRecord, RolloutState, StateStore

CHAMPION_ALIAS = "champion"
DEFAULT_READY_TIMEOUT_SECONDS = 600.0
#: Label the Prometheus scrape config puts the pod's namespace in ("" = do not filter by namespace).
PROMETHEUS_NAMESPACE_LABEL = os.environ.get("FRAUD_PROMETHEUS_NAMESPACE_LABEL", "namespace")


def state_dir() -> Path:
    """Where rollout records are mirrored as files (FRAUD_ROLLOUT_STATE_DIR or <data>/rollouts)."""
    configured = os.environ.get("FRAUD_ROLLOUT_STATE_DIR", "").strip()
    return Path(configured) if configured else DataLayout.current().root / "rollouts"


@dataclass(frozen=True)
class Connection:
    """How to reach the serving stack (Kubernetes credentials; ignored by the other targets)."""

    kubeconfig: str | None = None
    kube_context: str | None = None
    poll_seconds: float = 5.0
    ready_timeout_seconds: float = DEFAULT_READY_TIMEOUT_SECONDS


@dataclass(frozen=True)
class DeployRequest:
    model_name: str
    model_version: str
    target: str
    namespace: str
    canary_traffic_percent: int
    mlflow_tracking_uri: str = ""
    #: storage URI of the version's bundle; "" = ask the MLflow registry
    storage_uri: str = ""
    connection: Connection = field(default_factory=Connection)

    def __post_init__(self) -> None:
        _check_common(self.model_name, self.model_version, self.target)
        if not 1 <= self.canary_traffic_percent <= 100:
            raise RolloutError(f"canary_traffic_percent must be within 1..100, got {self.canary_traffic_percent}")


@dataclass(frozen=True)
class AnalyseRequest:
    model_name: str
    model_version: str
    target: str
    namespace: str
    prometheus_url: str
    window_seconds: int
    mlflow_tracking_uri: str = ""
    criteria: CanaryCriteria = field(default_factory=CanaryCriteria)
    connection: Connection = field(default_factory=Connection)
    #: sleep through the window before reading metrics (False: the window has already elapsed)
    wait: bool = True

    def __post_init__(self) -> None:
        _check_common(self.model_name, self.model_version, self.target)
        if self.window_seconds < 1:
            raise RolloutError(f"window_seconds must be >= 1, got {self.window_seconds}")
        if self.target == "kubernetes" and not self.prometheus_url.startswith(("http://", "https://")):
            raise RolloutError(
                f"prometheus_url must be the http(s) URL of Prometheus for target kubernetes, "
                f"got {self.prometheus_url!r}"
            )


def _check_common(model_name: str, model_version: str, target: str) -> None:
    if target not in TARGETS:
        raise RolloutError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if not model_name:
        raise RolloutError("model_name must not be empty")
    if not str(model_version).strip():
        raise RolloutError("model_version must not be empty")


class Backend(Protocol):
    def load_record(self) -> RolloutRecord | None: ...
    def save_record(self, record: RolloutRecord) -> None: ...
    def serving(self) -> tuple[str, str]: ...
    def deploy(self, record: RolloutRecord) -> RolloutRecord: ...
    def promote(self, record: RolloutRecord) -> None: ...
    def roll_back(self, record: RolloutRecord) -> None: ...
    def metrics_source(self, prometheus_url: str, record: RolloutRecord) -> PrometheusSource | ScrapeSource | None: ...
    def describe(self) -> dict[str, Any]: ...


class RecordBackend:
    """Target `record`: nothing serves; the rollout record lives in the state directory."""

    def __init__(self, model_name: str, namespace: str, store: StateStore, tracking_uri: str | None) -> None:
        self.model_name, self.namespace, self.store, self.tracking_uri = model_name, namespace, store, tracking_uri

    def load_record(self) -> RolloutRecord | None:
        return self.store.load("record", self.namespace, self.model_name)

    def save_record(self, record: RolloutRecord) -> None:
        self.store.save(record)

    def serving(self) -> tuple[str, str]:
        from fraud import registry

        version = registry.get_version_by_alias(CHAMPION_ALIAS, name=self.model_name, uri=self.tracking_uri) or ""
        if not version:
            return "", ""
        return version, registry.model_version_source(version, name=self.model_name, uri=self.tracking_uri)

    def deploy(self, record: RolloutRecord) -> RolloutRecord:
        return record.advance(RolloutState.DEPLOYED, "record target: decision recorded, no serving stack touched")

    def promote(self, record: RolloutRecord) -> None:
        return None  # nothing serves: promotion is the alias move done by the caller

    def roll_back(self, record: RolloutRecord) -> None:
        return None

    def metrics_source(self, prometheus_url: str, record: RolloutRecord) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"target": "record"}


class KubernetesBackend:
    """Target `kubernetes`: the record is an annotation on the InferenceService (mirrored to a file)."""

    def __init__(self, model_name: str, namespace: str, store: StateStore, connection: Connection) -> None:
        from fraud.deploy.kserve_rollout import KServeRollout

        self.store = store
        self.connection = connection
        self.rollout = KServeRollout(
            namespace,
            model_name,
            kubeconfig=connection.kubeconfig,
            context=connection.kube_context,
            poll_seconds=connection.poll_seconds,
        )

    def load_record(self) -> RolloutRecord | None:
        isvc = self.rollout.get()
        if isvc is not None:
            return self.rollout.load_record(isvc)
        return self.store.load("kubernetes", self.rollout.namespace, self.rollout.name)

    def save_record(self, record: RolloutRecord) -> None:
        self.store.save(record)
        if self.rollout.get() is not None:
            self.rollout.save_record(record)

    def serving(self) -> tuple[str, str]:
        from fraud.deploy.kserve_rollout import serving_model

        isvc = self.rollout.get()
        return serving_model(isvc) if isvc is not None else ("", "")

    def deploy(self, record: RolloutRecord) -> RolloutRecord:
        from fraud.deploy.kserve_rollout import ServingSpec

        spec = ServingSpec(core_image=_core_image(), drift_image=_drift_image())
        generation = self.rollout.put_canary(record, spec)
        record = replace(record, generation=generation)
        self.save_record(record)
        self.rollout.wait_ready(generation, self.connection.ready_timeout_seconds)
        share = record.canary_traffic_percent if record.previous_version else 100
        return record.advance(RolloutState.DEPLOYED, f"generation {generation} ready, taking {share}% of traffic")

    def promote(self, record: RolloutRecord) -> None:
        generation = self.rollout.promote(record)
        self.rollout.wait_ready(generation, self.connection.ready_timeout_seconds)

    def roll_back(self, record: RolloutRecord) -> None:
        self.rollout.roll_back(record, after_promotion=record.state is RolloutState.PROMOTED)

    def metrics_source(self, prometheus_url: str, record: RolloutRecord) -> PrometheusSource:
        labels = {PROMETHEUS_NAMESPACE_LABEL: self.rollout.namespace} if PROMETHEUS_NAMESPACE_LABEL else {}
        return PrometheusSource(prometheus_url, extra_labels=labels)

    def describe(self) -> dict[str, Any]:
        from fraud.deploy.kserve_rollout import ready_message

        isvc = self.rollout.get()
        if isvc is None:
            return {"target": "kubernetes", "inferenceservice": None}
        return {
            "target": "kubernetes",
            "inferenceservice": f"{self.rollout.namespace}/{self.rollout.name}",
            "generation": isvc["metadata"].get("generation"),
            "observedGeneration": isvc.get("status", {}).get("observedGeneration"),
            "ready": ready_message(isvc),
            "canaryTrafficPercent": isvc["spec"]["predictor"].get("canaryTrafficPercent"),
            "traffic": isvc.get("status", {}).get("components", {}).get("predictor", {}).get("traffic", []),
        }


def _core_image() -> str:
    from components.base import CORE_IMAGE

    return CORE_IMAGE


def _drift_image() -> str:
    return os.environ.get("FRAUD_DRIFT_IMAGE", "ghcr.io/fraud-platform/fraud-drift-transformer:0.1.0")


def make_backend(
    target: str, model_name: str, namespace: str, tracking_uri: str | None, connection: Connection
) -> Backend:
    store = StateStore(state_dir())
    if target == "record":
        return RecordBackend(model_name, namespace, store, tracking_uri)
    if target == "kubernetes":
        return KubernetesBackend(model_name, namespace, store, connection)
    from fraud.deploy.local import LocalBackend

    router_port = os.environ.get("FRAUD_LOCAL_ROUTER_PORT", "").strip()
    if router_port and not router_port.isdigit():
        raise RolloutError(f"FRAUD_LOCAL_ROUTER_PORT must be a port number, got {router_port!r}")
    return LocalBackend(model_name, namespace, store, tracking_uri, connection, router_port=int(router_port or 0))


def _registry_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from fraud.errors import UserError

    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        raise RolloutError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - MLflow REST/SQL errors, re-raised with context
        raise RolloutError(f"{what}: {type(exc).__name__}: {exc}") from None


def _record_decision(record: RolloutRecord, key: str, value: str, tracking_uri: str | None) -> None:
    from fraud import registry

    _registry_call(
        f"recording {key} on version {record.model_version}",
        registry.record_decision,
        record.model_version,
        key,
        value,
        name=record.model_name,
        uri=tracking_uri,
    )


def deploy(request: DeployRequest, backend: Backend | None = None) -> RolloutRecord:
    """Put `request.model_version` live as a canary (state `deployed`), or roll it back (state
    `rolled_back`) if it never becomes ready. Idempotent: see the module docstring."""
    from fraud import registry

    tracking_uri = request.mlflow_tracking_uri or None
    backend = backend or make_backend(
        request.target, request.model_name, request.namespace, tracking_uri, request.connection
    )
    existing = backend.load_record()
    if existing is not None and existing.model_version == str(request.model_version):
        if existing.state is not RolloutState.PENDING:
            return existing  # already deployed, analysing or decided: nothing to redo
        record = existing
    else:
        if existing is not None and not existing.state.final:
            raise RolloutError(
                f"the rollout of version {existing.model_version} is still {existing.state.value}: "
                "analyse it or roll it back (`fraud deploy rollback`) before deploying another version"
            )
        storage_uri = request.storage_uri or _registry_call(
            f"looking up version {request.model_version} of {request.model_name}",
            registry.model_version_source,
            str(request.model_version),
            name=request.model_name,
            uri=tracking_uri,
        )
        previous_version, previous_uri = backend.serving()
        if previous_version == str(request.model_version):
            raise RolloutError(
                f"version {request.model_version} is already serving in {request.target}/{request.namespace}"
            )
        record = RolloutRecord.start(
            model_name=request.model_name,
            model_version=str(request.model_version),
            target=request.target,
            namespace=request.namespace,
            canary_traffic_percent=request.canary_traffic_percent if previous_version else 100,
            previous_version=previous_version,
            storage_uri=storage_uri,
            previous_storage_uri=previous_uri,
        )
        backend.save_record(record)
    from fraud.deploy.kserve_rollout import ReadinessTimeout

    try:
        record = backend.deploy(record)
    except ReadinessTimeout as exc:
        reason = f"canary never became ready: {exc}"
        record = replace(record, decision=ROLL_BACK, reason=reason)
        backend.save_record(record)
        return _apply(backend, record, tracking_uri)
    backend.save_record(record)
    _record_decision(
        record,
        "deploy",
        f"{record.state.value} target={record.target} namespace={record.namespace} "
        f"canary={record.canary_traffic_percent}%",
        tracking_uri,
    )
    return record


def analyse(
    request: AnalyseRequest, deployed: RolloutRecord | None = None, backend: Backend | None = None
) -> RolloutRecord:
    """Analyse the deployed canary over the window and promote or roll it back (final state)."""
    tracking_uri = request.mlflow_tracking_uri or None
    backend = backend or make_backend(
        request.target, request.model_name, request.namespace, tracking_uri, request.connection
    )
    record = backend.load_record() or deployed
    if record is None:
        raise RolloutError(f"no rollout of {request.model_name} in {request.target}/{request.namespace}: deploy first")
    if record.model_version != str(request.model_version):
        raise RolloutError(
            f"the current rollout is of version {record.model_version} ({record.state.value}), "
            f"not {request.model_version}"
        )
    if record.state.final:
        return record
    if record.state is RolloutState.PENDING:
        raise RolloutError(f"version {record.model_version} is not deployed yet (pending): re-run the deploy step")
    if record.state is RolloutState.DEPLOYED:
        record = record.advance(RolloutState.ANALYSING, f"analysis window {request.window_seconds}s")
        backend.save_record(record)
    if not record.decision:
        verdict = _verdict(backend, request, record)
        record = replace(record, decision=verdict.decision, reason=verdict.reason, analysis=verdict.numbers)
        backend.save_record(record)
    return _apply(backend, record, tracking_uri)


def _verdict(backend: Backend, request: AnalyseRequest, record: RolloutRecord) -> Verdict:
    source = backend.metrics_source(request.prometheus_url, record)
    if source is None:
        return Verdict(PROMOTE, ("record target: no live traffic to analyse; promotion recorded",), {})
    return run_analysis(
        source,
        record.model_version,
        record.previous_version or None,
        request.window_seconds,
        request.criteria,
        wait=request.wait,
    )


def _apply(backend: Backend, record: RolloutRecord, tracking_uri: str | None) -> RolloutRecord:
    """Carry out a recorded verdict (idempotent steps), then mark the rollout final."""
    from fraud import registry

    if record.decision == PROMOTE:
        backend.promote(record)
        _registry_call(
            f"moving alias {CHAMPION_ALIAS} to version {record.model_version}",
            registry.set_alias,
            CHAMPION_ALIAS,
            record.model_version,
            name=record.model_name,
            uri=tracking_uri,
        )
        final = RolloutState.PROMOTED
    elif record.decision == ROLL_BACK:
        backend.roll_back(record)
        final = RolloutState.ROLLED_BACK
    else:
        raise RolloutError(f"rollout record carries an unknown decision {record.decision!r}")
    _record_decision(record, "canary", final.value, tracking_uri)
    _record_decision(record, "canary.reason", record.reason or "-", tracking_uri)
    record = record.advance(final, record.reason)
    backend.save_record(record)
    return record


def manual_rollback(
    target: str,
    model_name: str,
    namespace: str,
    reason: str,
    *,
    mlflow_tracking_uri: str = "",
    connection: Connection | None = None,
    backend: Backend | None = None,
) -> RolloutRecord:
    """Roll the current rollout back by hand. After a promotion this also moves `champion` back
    to the previous version."""
    from fraud import registry

    tracking_uri = mlflow_tracking_uri or None
    backend = backend or make_backend(target, model_name, namespace, tracking_uri, connection or Connection())
    record = backend.load_record()
    if record is None:
        raise RolloutError(f"no rollout of {model_name} in {target}/{namespace} to roll back")
    if record.state is RolloutState.ROLLED_BACK:
        return record
    note = f"rolled back by hand: {reason}"
    was_promoted = record.state is RolloutState.PROMOTED
    record = replace(record, decision=ROLL_BACK, reason=note)
    backend.roll_back(record)
    if was_promoted and record.previous_version:
        _registry_call(
            f"moving alias {CHAMPION_ALIAS} back to version {record.previous_version}",
            registry.set_alias,
            CHAMPION_ALIAS,
            record.previous_version,
            name=record.model_name,
            uri=tracking_uri,
        )
    _record_decision(record, "rollback", note, tracking_uri)
    record = record.advance(RolloutState.ROLLED_BACK, note)
    backend.save_record(record)
    return record


def status(
    target: str, model_name: str, namespace: str, *, connection: Connection | None = None, mlflow_tracking_uri: str = ""
) -> dict[str, Any]:
    """The current rollout record and what the serving stack reports."""
    backend = make_backend(target, model_name, namespace, mlflow_tracking_uri or None, connection or Connection())
    record = backend.load_record()
    return {"record": record.to_dict() if record else None, "serving": backend.describe()}


__all__ = [
    "MODEL_NAME",
    "AnalyseRequest",
    "Backend",
    "Connection",
    "DeployRequest",
    "KubernetesBackend",
    "RecordBackend",
    "analyse",
    "deploy",
    "make_backend",
    "manual_rollback",
    "state_dir",
    "status",
]
