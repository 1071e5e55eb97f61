"""The rollout: deploy a model version as a canary, analyse it, promote or roll back.

One flow for every target; a `Backend` does the target-specific part:

* `record`      - no serving stack: the decision is recorded in MLflow and the rollout record only;
* `kubernetes`  - the KServe InferenceService (`fraud.deploy.kserve_rollout`), metrics from Prometheus;
* `local`       - local predictor processes behind the local canary router (`fraud.deploy.local`),
                  metrics scraped from the predictors' /metrics.

Every step persists the record before and after touching anything, so re-running `deploy` or
`analyse` after a crash continues from the persisted state: a pending rollout is re-applied (an
identical patch does not create a new generation), an interrupted traffic step is analysed again
from the start of its window, a decided-but-unapplied verdict is applied without a second
analysis, a finished rollout is returned unchanged.

Guards: a canary starts only against a healthy stable version (`first_deploy` / `force` say
otherwise); a version rolled back before is rolled out again only with `retry`; a rollback never
leaves nothing serving.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fraud.config import MODEL_NAME
from fraud.deploy.canary import (
    PROMOTE,
    ROLL_BACK,
    CanaryCriteria,
    PrometheusSource,
    ScrapeSource,
    Verdict,
    watch,
)
from fraud.deploy.kserve_rollout import ReadinessTimeout, ready_message, serving_model
from fraud.deploy.policy import RolloutPolicy, Step
from fraud.deploy.state import TARGETS, RolloutError, RolloutRecord, RolloutState, StateStore, one_line
from fraud.settings import Settings, current

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
DEFAULT_READY_TIMEOUT_SECONDS = 600.0


def state_dir(settings: Settings | None = None) -> Path:
    """Where rollout records are mirrored as files (FRAUD_ROLLOUT_STATE_DIR or <data>/rollouts)."""
    settings = settings or current()
    return Path(settings.rollout_state_dir) if settings.rollout_state_dir else settings.layout.root / "rollouts"


@dataclass(frozen=True)
class Connection:
    """How to reach the serving stack (Kubernetes credentials; ignored by the other targets)."""

    kubeconfig: str | None = None
    kube_context: str | None = None
    #: the kustomize overlay a created InferenceService comes from (`fraud.deploy.overlay`):
    #: dev | staging | prod (packaged), a kustomization directory or a rendered YAML file;
    #: "" = the packaged overlay whose namespace is the rollout's
    overlay: str = ""
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
    #: the rollout policy (steps and checks); None = one step at canary_traffic_percent
    policy: RolloutPolicy | None = None
    #: nothing serves yet and that is intended: deploy straight to 100 %
    first_deploy: bool = False
    #: replace an unhealthy (or absent) stable version without a comparison
    force: bool = False
    #: roll out a version whose earlier rollout was rolled back
    retry: bool = False

    def __post_init__(self) -> None:
        _check_common(self.model_name, self.model_version, self.target)
        if not 1 <= self.canary_traffic_percent <= 100:
            raise RolloutError(f"canary_traffic_percent must be within 1..100, got {self.canary_traffic_percent}")

    @property
    def first_percent(self) -> int:
        return self.policy.steps[0].percent if self.policy is not None else self.canary_traffic_percent


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
    #: watch through each window (False: the windows have already elapsed, decide at once)
    wait: bool = True
    #: the rollout policy; None = the one the deploy step recorded, else one step of window_seconds
    policy: RolloutPolicy | None = None

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
    def stable_health(self) -> tuple[str, str, bool, str]: ...
    def set_traffic(self, record: RolloutRecord, percent: int) -> None: ...
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

    def stable_health(self) -> tuple[str, str, bool, str]:
        version, uri = self.serving()
        return version, uri, bool(version), "champion alias" if version else "no champion alias"

    def set_traffic(self, record: RolloutRecord, percent: int) -> None:
        return None

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
        isvc = self.rollout.get()
        return serving_model(isvc) if isvc is not None else ("", "")

    def stable_health(self) -> tuple[str, str, bool, str]:
        isvc = self.rollout.get()
        if isvc is None:
            return "", "", False, f"no InferenceService {self.rollout.namespace}/{self.rollout.name}"
        version, uri = serving_model(isvc)
        message = ready_message(isvc)
        return version, uri, message.startswith("Ready=True"), message

    def overlay(self) -> dict[str, Any]:
        """The overlay's rendered InferenceService, the one definition a created object starts from."""
        from fraud.deploy.overlay import load_inference_service, overlay_for_namespace

        name = self.connection.overlay or overlay_for_namespace(self.rollout.namespace)
        return load_inference_service(name, self.rollout.name)

    def set_traffic(self, record: RolloutRecord, percent: int) -> None:
        generation = self.rollout.set_traffic(record, percent)
        self.rollout.wait_ready(generation, self.connection.ready_timeout_seconds)

    def deploy(self, record: RolloutRecord) -> RolloutRecord:
        generation = self.rollout.put_canary(record, self.overlay())
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
        # the label the Prometheus scrape config puts the pod's namespace in
        label = current().prometheus_namespace_label
        labels = {label: self.rollout.namespace} if label else {}
        return PrometheusSource(prometheus_url, extra_labels=labels)

    def describe(self) -> dict[str, Any]:
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


def make_backend(
    target: str, model_name: str, namespace: str, tracking_uri: str | None, connection: Connection
) -> Backend:
    store = StateStore(state_dir())
    if target == "record":
        return RecordBackend(model_name, namespace, store, tracking_uri)
    if target == "kubernetes":
        return KubernetesBackend(model_name, namespace, store, connection)
    from fraud.deploy.local import LocalBackend

    router_port = current().local_router_port or 0
    return LocalBackend(model_name, namespace, store, tracking_uri, connection, router_port=router_port)


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


class AlreadyRolledBack(RolloutError):
    """The version's last rollout in this target was rolled back; `retry` starts a new one."""

    def __init__(self, record: RolloutRecord) -> None:
        self.record = record
        super().__init__(
            f"version {record.model_version} was rolled back on {record.finished_at or record.started_at} "
            f"(this is a past result): {record.reason or '-'}; pass --retry to roll it out again"
        )


def _guard_stable(request: DeployRequest, backend: Backend) -> tuple[str, str]:
    """(previous version, its storage URI) to canary against; RolloutError when the stable
    version is absent or unhealthy and the request does not say `first_deploy` / `force`."""
    version, uri, healthy, detail = backend.stable_health()
    where = f"{request.target}/{request.namespace}"
    if request.target == "record":  # a test target: nothing serves, there is nothing to guard
        if version == str(request.model_version):
            raise RolloutError(f"version {request.model_version} is already the champion ({where})")
        return version, uri
    if version and healthy:
        if version == str(request.model_version):
            raise RolloutError(f"version {request.model_version} is already serving in {where}")
        return version, uri
    if not version:
        if request.first_deploy or request.force:
            return "", ""
        raise RolloutError(
            f"nothing serves {request.model_name} in {where} ({detail}): a canary needs a stable version "
            f"to compare with; pass --first-deploy to deploy version {request.model_version} straight to 100 %"
        )
    if request.force:
        log.warning(
            "stable version %s in %s is unhealthy (%s): replaced without a canary (--force)", version, where, detail
        )
        return "", ""
    raise RolloutError(
        f"stable version {version} in {where} is unhealthy ({detail}): a canary would be compared with "
        f"nothing; bring it back (fraud deploy rollback / restart) or pass --force to replace it at 100 %"
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
    if (
        existing is not None
        and existing.model_version == str(request.model_version)
        and not (existing.state is RolloutState.ROLLED_BACK and request.retry)
    ):
        if existing.state is RolloutState.ROLLED_BACK:
            raise AlreadyRolledBack(existing)
        if existing.state is not RolloutState.PENDING:
            return existing  # already deployed, analysing or promoted: nothing to redo
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
        previous_version, previous_uri = _guard_stable(request, backend)
        record = RolloutRecord.start(
            model_name=request.model_name,
            model_version=str(request.model_version),
            target=request.target,
            namespace=request.namespace,
            canary_traffic_percent=request.first_percent if previous_version else 100,
            previous_version=previous_version,
            storage_uri=storage_uri,
            previous_storage_uri=previous_uri,
            policy=request.policy.to_dict() if request.policy is not None else {},
        )
        backend.save_record(record)
    try:
        record = backend.deploy(record)
    except ReadinessTimeout as exc:
        log.warning("version %s never became ready: %s", record.model_version, exc)
        record = replace(record, decision=ROLL_BACK, reason=one_line(f"readiness: canary never became ready: {exc}"))
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


def _policy_for(request: AnalyseRequest, record: RolloutRecord) -> RolloutPolicy:
    if request.policy is not None:
        return request.policy
    if record.policy:
        return RolloutPolicy.from_dict(record.policy, f"policy of the rollout of version {record.model_version}")
    percent = min(99, max(1, record.canary_traffic_percent))
    return RolloutPolicy(steps=(Step(percent, request.window_seconds),), criteria=request.criteria)


def analyse(
    request: AnalyseRequest, deployed: RolloutRecord | None = None, backend: Backend | None = None
) -> RolloutRecord:
    """Watch the deployed canary through the policy's traffic steps and promote or roll it back
    (final state). Each step: set the canary's share, watch its window (early abort), decide."""
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
    policy = _policy_for(request, record)
    if record.state is RolloutState.DEPLOYED:
        plan = " -> ".join(f"{s.percent}% for {s.window_seconds}s" for s in policy.steps)
        record = record.advance(
            RolloutState.ANALYSING,
            f"analysis: {plan} -> 100%"
            if record.previous_version
            else f"analysis window {policy.steps[0].window_seconds}s (first deployment)",
        )
        backend.save_record(record)
    while not record.decision:
        record = _run_step(backend, request, record, policy)
        backend.save_record(record)
    return _apply(backend, record, tracking_uri)


def _run_step(backend: Backend, request: AnalyseRequest, record: RolloutRecord, policy: RolloutPolicy) -> RolloutRecord:
    """One traffic step: its share set, its window watched, its verdict recorded."""
    index = min(record.step_index, len(policy.steps) - 1)
    step = policy.steps[index]
    first_deploy = not record.previous_version
    if not first_deploy and record.canary_traffic_percent != step.percent:
        record = record.note(
            f"step {index + 1}/{len(policy.steps)}: canary at {step.percent}%", canary_traffic_percent=step.percent
        )
        backend.save_record(record)  # persisted before the change: a crash re-applies the same share
        try:
            backend.set_traffic(record, step.percent)
        except ReadinessTimeout as exc:
            return replace(record, decision=ROLL_BACK, reason=one_line(f"traffic step {step.percent}%: {exc}"))
    verdict = _verdict(backend, request, record, step, policy)
    result = {
        "step": index + 1,
        "percent": 100 if first_deploy else step.percent,
        "window_seconds": step.window_seconds,
        "decision": verdict.decision,
        "reason": verdict.reason,
        "early": verdict.early,
        "checks": [c.to_dict() for c in verdict.checks],
    }
    record = replace(
        record,
        step_results=(*record.step_results, result),
        checks=tuple(_json_safe(c.to_dict()) for c in verdict.checks),
        analysis=verdict.numbers,
    )
    last = first_deploy or index == len(policy.steps) - 1
    if verdict.decision == ROLL_BACK:
        where = "" if first_deploy else f"step {index + 1} ({step.percent}%), "
        early = "aborted early, " if verdict.early else ""
        return replace(record, decision=ROLL_BACK, reason=one_line(f"{where}{early}{verdict.reason}"))
    if last:
        return replace(record, decision=PROMOTE, reason=f"{len(record.step_results)} step(s) passed: {verdict.reason}")
    return record.note(f"step {index + 1} passed at {step.percent}%", step_index=index + 1)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _verdict(
    backend: Backend, request: AnalyseRequest, record: RolloutRecord, step: Step, policy: RolloutPolicy
) -> Verdict:
    source = backend.metrics_source(request.prometheus_url, record)
    if source is None:
        return Verdict(PROMOTE, ("record target: no live traffic to analyse; promotion recorded",), {})
    return watch(
        source,
        record.model_version,
        record.previous_version or None,
        step.window_seconds,
        policy.criteria,
        rules=policy.abort,
        interval_seconds=policy.evaluation_interval_seconds,
        wait=request.wait,
    )


def _record_checks(record: RolloutRecord, tracking_uri: str | None) -> None:
    """Each check's verdict and value as a tag `decision.canary.check.<name>` on the version."""
    for check in record.checks:
        value = check.get("value")
        shown = "-" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
        limit = check.get("limit")
        text = f"{check['verdict']} value={shown} limit={'-' if limit is None else f'{limit:.6g}'}"
        _record_decision(record, f"canary.check.{check['name']}", text, tracking_uri)


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
    record = replace(record, canary_traffic_percent=100 if final is RolloutState.PROMOTED else 0)
    _record_decision(record, "canary", final.value, tracking_uri)
    _record_decision(record, "canary.reason", one_line(record.reason or "-"), tracking_uri)
    _record_checks(record, tracking_uri)
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
    to the previous version. Refused when there is no previous version (it would leave nothing
    serving)."""
    from fraud import registry

    tracking_uri = mlflow_tracking_uri or None
    backend = backend or make_backend(target, model_name, namespace, tracking_uri, connection or Connection())
    record = backend.load_record()
    if record is None:
        raise RolloutError(f"no rollout of {model_name} in {target}/{namespace} to roll back")
    if record.state is RolloutState.ROLLED_BACK:
        return record
    if not record.previous_version:
        raise RolloutError(
            f"version {record.model_version} was deployed to {target}/{namespace} with nothing before it: "
            "rolling it back would leave nothing serving; deploy another version instead"
        )
    note = one_line(f"rolled back by hand: {reason}")
    was_promoted = record.state is RolloutState.PROMOTED
    record = replace(record, decision=ROLL_BACK, reason=note)
    backend.roll_back(record)
    if was_promoted:
        _registry_call(
            f"moving alias {CHAMPION_ALIAS} back to version {record.previous_version}",
            registry.set_alias,
            CHAMPION_ALIAS,
            record.previous_version,
            name=record.model_name,
            uri=tracking_uri,
        )
    _record_decision(record, "rollback", note, tracking_uri)
    _record_decision(record, "canary", RolloutState.ROLLED_BACK.value, tracking_uri)
    record = record.advance(RolloutState.ROLLED_BACK, note, canary_traffic_percent=0)
    backend.save_record(record)
    return record


def history(target: str, model_name: str, namespace: str) -> list[RolloutRecord]:
    """Finished rollouts of `model_name` in target/namespace, oldest first, plus one still open."""
    store = StateStore(state_dir())
    records = store.history(target, namespace, model_name)
    current = store.load(target, namespace, model_name)
    if current is not None and not current.state.final:
        records.append(current)
    return records


def status(
    target: str, model_name: str, namespace: str, *, connection: Connection | None = None, mlflow_tracking_uri: str = ""
) -> dict[str, Any]:
    """The current rollout record and what the serving stack reports."""
    backend = make_backend(target, model_name, namespace, mlflow_tracking_uri or None, connection or Connection())
    record = backend.load_record()
    return {"record": record.to_dict() if record else None, "serving": backend.describe()}


__all__ = [
    "MODEL_NAME",
    "AlreadyRolledBack",
    "AnalyseRequest",
    "Backend",
    "Connection",
    "DeployRequest",
    "KubernetesBackend",
    "RecordBackend",
    "analyse",
    "deploy",
    "history",
    "make_backend",
    "manual_rollback",
    "state_dir",
    "status",
]
