"""The KServe side of a rollout: create or patch the InferenceService, wait for the new
generation, shift traffic (Serverless mode, `spec.predictor.canaryTrafficPercent`).

KServe Serverless canary semantics (what every method relies on):

* patching the predictor's pod template (here: the `STORAGE_URI` env of the custom container,
  the version label and env) creates a new Knative revision; with `canaryTrafficPercent: p` the
  new revision gets p% and the previously rolled-out revision keeps 100 - p%;
* promote: remove `canaryTrafficPercent` -> the latest ready revision takes 100%;
* roll back: `canaryTrafficPercent: 0` -> the previously rolled-out revision takes 100% again.
  The spec is also put back to the stable model (STORAGE_URI, labels), so the spec always
  describes what serves and the next rollout starts from the stable model.

The predictor is a custom container; KServe's storage initializer downloads the container's
`STORAGE_URI` env value into `/mnt/models` before the container starts (that is how a custom
container gets a storageUri; the CRD has no `spec.predictor.storageUri`). Its pod also runs the
audit writer (`fraud audit writer`, second container) draining the predictor's decision spool on a
shared emptyDir, as `manifests/inferenceservice.yaml` does; patches keep every container.

Objects are plain dicts sent through `kubernetes.client.CustomObjectsApi` (the object the kserve
SDK's `KServeClient` wraps); readiness uses `KServeClient.is_isvc_ready(expected_generation=...)`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from typing import Any

from fraud.config import MODEL_NAME
from fraud.deploy.state import ROLLOUT_ANNOTATION, VERSION_LABEL, RolloutError, RolloutRecord

GROUP = "serving.kserve.io"
API_VERSION = "v1beta1"
PLURAL = "inferenceservices"
PREDICTOR_CONTAINER = "kserve-container"
TRANSFORMER_CONTAINER = "kserve-container"
STORAGE_URI_ENV = "STORAGE_URI"
MODEL_VERSION_ENV = "FRAUD_MODEL_VERSION"
#: the predictor's `--model-variant`: the audit trail records decisions as stable or canary
MODEL_VARIANT_ENV = "FRAUD_MODEL_VARIANT"
MODEL_DIR = "/mnt/models"
AUDIT_WRITER_CONTAINER = "audit-writer"
#: where manifests/inferenceservice.yaml mounts the audit spool the predictor and writer share
AUDIT_SPOOL = "/var/lib/fraud-audit/spool.db"


#: Environment variable naming the project's core image (pipeline components, predictor, audit writer).
CORE_IMAGE_ENV = "FRAUD_CORE_IMAGE"
#: the core image a created InferenceService runs; the pipeline's components compile against the same
DEFAULT_CORE_IMAGE = "ghcr.io/fraud-platform/fraud-core:0.1.0"


def _env(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    """Set env `name` of `container` in place (kept at its index, so overlay patches by index still
    apply), appended when absent."""
    env = container.setdefault("env", [])
    for item in env:
        if item.get("name") == name:
            item.pop("valueFrom", None)
            item["value"] = value
            return
    env.append(_env(name, value))


def _named_container(containers: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((c for c in containers if c.get("name") == name), containers[0] if len(containers) == 1 else None)


def build_inference_service(
    overlay: dict[str, Any], namespace: str, version: str, storage_uri: str, *, record: RolloutRecord | None = None
) -> dict[str, Any]:
    """The overlay's InferenceService (`fraud.deploy.overlay`) serving `version` from `storage_uri`.

    Only rollout fields are added: the namespace, the version label (object and predictor), the
    rollout annotation, and the predictor's STORAGE_URI / FRAUD_MODEL_VERSION / FRAUD_MODEL_VARIANT
    env and the transformer's STORAGE_URI (its drift reference comes from the same bundle).
    Everything else (images, args, secrets, probes, resources, timeouts) is the overlay's."""
    isvc = copy.deepcopy(overlay)
    metadata = isvc.setdefault("metadata", {})
    metadata["namespace"] = namespace
    metadata.setdefault("labels", {})[VERSION_LABEL] = version
    if record is not None:
        metadata.setdefault("annotations", {})[ROLLOUT_ANNOTATION] = record.to_json()
    predictor = isvc["spec"]["predictor"]
    predictor.setdefault("labels", {})[VERSION_LABEL] = version
    predictor["containers"] = _with_model(predictor.get("containers") or [], version, storage_uri, "stable")
    transformer = isvc["spec"].get("transformer")
    if transformer:
        container = _named_container(transformer.get("containers") or [], TRANSFORMER_CONTAINER)
        if container is not None:
            _set_env(container, STORAGE_URI_ENV, storage_uri)
    return isvc


def predictor_container(isvc: dict[str, Any]) -> dict[str, Any]:
    containers = isvc.get("spec", {}).get("predictor", {}).get("containers") or []
    for container in containers:
        if container.get("name") == PREDICTOR_CONTAINER:
            return container
    if len(containers) == 1:
        return containers[0]
    raise RolloutError(
        f"InferenceService {isvc['metadata']['name']} has no predictor container named {PREDICTOR_CONTAINER}"
    )


def _env_value(container: dict[str, Any], name: str) -> str:
    for item in container.get("env") or []:
        if item.get("name") == name:
            return str(item.get("value", ""))
    return ""


def serving_model(isvc: dict[str, Any]) -> tuple[str, str]:
    """(model version, storage URI) the InferenceService's spec describes."""
    container = predictor_container(isvc)
    version = (isvc["metadata"].get("labels") or {}).get(VERSION_LABEL) or _env_value(container, MODEL_VERSION_ENV)
    return version, _env_value(container, STORAGE_URI_ENV)


def _with_model(
    containers: list[dict[str, Any]], version: str, storage_uri: str, variant: str = "stable"
) -> list[dict[str, Any]]:
    """The containers list (merge patches replace lists whole) with the model env of the predictor set."""
    updated = copy.deepcopy(containers)
    target = _named_container(updated, PREDICTOR_CONTAINER)
    if target is None:
        raise RolloutError(f"no predictor container named {PREDICTOR_CONTAINER}")
    _set_env(target, STORAGE_URI_ENV, storage_uri)
    _set_env(target, MODEL_VERSION_ENV, version)
    _set_env(target, MODEL_VARIANT_ENV, variant)
    return updated


def model_patch(
    isvc: dict[str, Any],
    version: str,
    storage_uri: str,
    canary_percent: int | None,
    record: RolloutRecord,
    variant: str = "stable",
) -> dict[str, Any]:
    """Merge patch putting `version` into the predictor as `variant` (stable|canary);
    `canary_percent` None removes the canary split."""
    predictor = isvc["spec"]["predictor"]
    labels = {**(predictor.get("labels") or {}), VERSION_LABEL: version}
    return {
        "metadata": {"labels": {VERSION_LABEL: version}, "annotations": {ROLLOUT_ANNOTATION: record.to_json()}},
        "spec": {
            "predictor": {
                "canaryTrafficPercent": canary_percent,
                "labels": labels,
                "containers": _with_model(predictor["containers"], version, storage_uri, variant),
            }
        },
    }


class ReadinessTimeout(RolloutError):
    """The expected generation did not become ready in time (or its revision failed)."""


class KServeRollout:
    """One InferenceService in one namespace, driven through the Kubernetes API."""

    def __init__(
        self,
        namespace: str,
        name: str = MODEL_NAME,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        poll_seconds: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from kserve import KServeClient

        self.namespace = namespace
        self.name = name
        self.poll_seconds = poll_seconds
        self._sleep = sleep
        try:
            self.kserve = KServeClient(config_file=kubeconfig, context=context)
        except Exception as exc:  # noqa: BLE001 - ConfigException, missing file, bad YAML: all mean "cannot configure"
            raise RolloutError(f"cannot configure the Kubernetes client: {exc}") from None
        self.api = self.kserve.api_instance

    # -- API calls ---------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        from kubernetes.client.rest import ApiException

        try:
            return fn(GROUP, API_VERSION, self.namespace, PLURAL, *args)
        except ApiException as exc:
            detail = exc.body if isinstance(exc.body, str) else ""
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("message", detail)
            raise RolloutError(
                f"{what} InferenceService {self.namespace}/{self.name} failed: HTTP {exc.status} {detail}"
            ) from None
        except OSError as exc:
            raise RolloutError(
                f"{what} InferenceService {self.namespace}/{self.name}: API server unreachable: {exc}"
            ) from None

    def get(self) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, API_VERSION, self.namespace, PLURAL, self.name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise RolloutError(
                f"reading InferenceService {self.namespace}/{self.name} failed: HTTP {exc.status}"
            ) from None
        except OSError as exc:
            raise RolloutError(
                f"reading InferenceService {self.namespace}/{self.name}: API server unreachable: {exc}"
            ) from None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("creating", self.api.create_namespaced_custom_object, body)

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("patching", self.api.patch_namespaced_custom_object, self.name, body)

    def delete(self) -> None:
        self._call("deleting", self.api.delete_namespaced_custom_object, self.name)

    # -- rollout record ----------------------------------------------------------------------

    def load_record(self, isvc: dict[str, Any] | None = None) -> RolloutRecord | None:
        isvc = isvc if isvc is not None else self.get()
        if isvc is None:
            return None
        text = (isvc["metadata"].get("annotations") or {}).get(ROLLOUT_ANNOTATION)
        return RolloutRecord.from_json(text) if text else None

    def save_record(self, record: RolloutRecord) -> None:
        self.patch({"metadata": {"annotations": {ROLLOUT_ANNOTATION: record.to_json()}}})

    # -- traffic -----------------------------------------------------------------------------

    def put_canary(self, record: RolloutRecord, overlay: dict[str, Any]) -> int:
        """Create the InferenceService serving the record's version from `overlay` (the overlay's
        rendered InferenceService), or patch it in as a canary.
        Returns the metadata.generation to wait for. Safe to repeat (same spec -> same generation)."""
        isvc = self.get()
        if isvc is None:
            body = build_inference_service(
                overlay, self.namespace, record.model_version, record.storage_uri, record=record
            )
            return int(self.create(body)["metadata"]["generation"])
        variant = "canary" if record.previous_version else "stable"
        patch = model_patch(
            isvc, record.model_version, record.storage_uri, record.canary_traffic_percent, record, variant
        )
        return int(self.patch(patch)["metadata"]["generation"])

    def set_traffic(self, record: RolloutRecord, percent: int) -> int:
        """The canary revision's share: a traffic-only change (no new revision)."""
        patch = {
            "metadata": {"annotations": {ROLLOUT_ANNOTATION: record.to_json()}},
            "spec": {"predictor": {"canaryTrafficPercent": int(percent)}},
        }
        return int(self.patch(patch)["metadata"]["generation"])

    def promote(self, record: RolloutRecord) -> int:
        """All traffic to the promoted version: canaryTrafficPercent removed and the predictor's
        variant set to `stable` (a new revision of the same model, which takes all traffic once
        ready; the canary revision serves until then)."""
        isvc = self.get()
        if isvc is None:
            raise RolloutError(f"InferenceService {self.namespace}/{self.name} is gone: cannot promote")
        patch = model_patch(isvc, record.model_version, record.storage_uri, None, record, "stable")
        return int(self.patch(patch)["metadata"]["generation"])

    def roll_back(self, record: RolloutRecord, *, after_promotion: bool = False) -> int:
        """All traffic back to the previously rolled-out revision and the spec back to the stable model.

        During a canary, `canaryTrafficPercent: 0` sends everything to the previously rolled-out
        (stable) revision at once. After a promotion the canary *is* the rolled-out revision, so the
        stable model is redeployed as the latest revision and takes all traffic when ready.
        A first deployment (nothing served before) is deleted: it has nothing to fall back to."""
        isvc = self.get()
        if isvc is None:
            return 0
        if not record.previous_version or not record.previous_storage_uri:
            self.delete()
            return 0
        percent = None if after_promotion else 0
        patch = model_patch(isvc, record.previous_version, record.previous_storage_uri, percent, record)
        return int(self.patch(patch)["metadata"]["generation"])

    def is_ready(self, generation: int) -> bool:
        try:
            return bool(self.kserve.is_isvc_ready(self.name, namespace=self.namespace, expected_generation=generation))
        except RuntimeError as exc:
            raise RolloutError(f"reading InferenceService {self.namespace}/{self.name} failed: {exc}") from None

    def wait_ready(self, generation: int, timeout_seconds: float) -> dict[str, Any]:
        """Poll until status.observedGeneration >= generation and Ready is True; raise ReadinessTimeout
        after `timeout_seconds` or as soon as the predictor reports the revision failed."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            if self.is_ready(generation):
                return self.get() or {}
            isvc = self.get() or {}
            failure = revision_failure(isvc, generation)
            if failure:
                raise ReadinessTimeout(f"generation {generation} failed: {failure}")
            if time.monotonic() >= deadline:
                raise ReadinessTimeout(
                    f"generation {generation} not ready after {timeout_seconds:.0f}s: {ready_message(isvc)}"
                )
            self._sleep(self.poll_seconds)

    def traffic(self) -> list[dict[str, Any]]:
        isvc = self.get() or {}
        return list(isvc.get("status", {}).get("components", {}).get("predictor", {}).get("traffic") or [])


def _conditions(isvc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(isvc.get("status", {}).get("conditions") or [])


def ready_message(isvc: dict[str, Any]) -> str:
    for condition in _conditions(isvc):
        if condition.get("type") == "Ready":
            return (
                f"Ready={condition.get('status')} {condition.get('reason', '')} {condition.get('message', '')}".strip()
            )
    return "no Ready condition yet"


def revision_failure(isvc: dict[str, Any], generation: int) -> str:
    """The failure message when the predictor's latest revision for `generation` has failed, else ''."""
    status = isvc.get("status", {})
    if int(status.get("observedGeneration", 0)) < generation:
        return ""
    for condition in _conditions(isvc):
        if (
            condition.get("type") == "PredictorReady"
            and condition.get("status") == "False"
            and condition.get("reason") == "RevisionFailed"
        ):
            return condition.get("message", "revision failed")
    return ""
