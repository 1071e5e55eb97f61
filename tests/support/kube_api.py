"""A stand-in for the Kubernetes API of KServe InferenceServices, for the rollout tests.

* `FakeKServeAPI` - a real HTTP server on loopback speaking the Kubernetes REST paths of the
  InferenceService resource (`/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]`:
  GET, POST, PUT, PATCH with merge-patch or json-patch bodies, DELETE), so the real `kubernetes`
  and `kserve` clients talk to it through an ordinary kubeconfig. Every object it receives is
  validated strictly against the KServe CRD schema (`tests.support.kserve_crd`) and rejected with a 422
  Status like the API server's. It simulates the controller: metadata.generation (bumped only
  when the spec changes), status.observedGeneration, Knative revisions, the Ready conditions,
  and the predictor's traffic split under `canaryTrafficPercent`. Storage URIs listed in
  `never_ready` produce revisions that never become ready.

It refuses what the API server refuses: a path of an API version the CRD does not serve (404), a
strategic-merge patch on a custom resource (415), an update with a stale `resourceVersion` (409),
a body whose name or namespace differs from the URL (400), an invalid object (422).

`FakeSparkOperatorAPI` - the same for the Kubeflow Spark Operator's SparkApplications
(`/apis/sparkoperator.k8s.io/v1beta2/namespaces/{ns}/sparkapplications[/{name}]`: GET, POST,
DELETE), validated against the operator's published schema; it simulates the operator's
state machine (SUBMITTED -> RUNNING -> COMPLETED, or FAILED with the driver's errorMessage).

The Prometheus stand-in is `tests.support.prometheus_stub`.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fraud.deploy.kserve_rollout import API_VERSION, GROUP, PLURAL, STORAGE_URI_ENV, predictor_container
from fraud.deploy.spark import GROUP as SPARK_GROUP
from fraud.deploy.spark import PLURAL as SPARK_PLURAL
from tests.support.kserve_crd import CRDValidator

_ISVC_PATH = re.compile(
    rf"^/apis/{re.escape(GROUP)}/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/{PLURAL}(?:/(?P<name>[^/]+))?/?$"
)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(target: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, test)."""
    doc = copy.deepcopy(target)
    for op in operations:
        parts = _pointer(op["path"])
        if not parts:
            raise ValueError("patching the document root is not supported")
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent[last]
            if current != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise ValueError(f"replace of missing path {op['path']}")
                parent[last] = op["value"]
        else:
            raise ValueError(f"unsupported JSON patch op {kind!r}")
    return doc


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def kube_status(
    code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None, *, group: str = "", kind: str = ""
) -> tuple[int, dict]:
    """(code, body) of the API server's `Status` answer to a refused request."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if causes:
        body["details"] = {"group": group, "kind": kind, "causes": causes}
    return code, body


class _LoopbackServer(ABC):
    """An HTTP server on a free loopback port, served from a daemon thread while used as a context
    manager. Subclasses answer requests in `handle(method, path, content_type, body)`; JSON in and out."""

    def _start_server(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @abstractmethod
    def handle(self, method: str, path: str, content_type: str, body: Any) -> tuple[int, Any]:
        """(HTTP status, JSON body) of one request."""

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": "fake",
        }
        Path(path).write_text(json.dumps(config))
        return Path(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    code, payload = kube_status(400, "BadRequest", "body is not JSON")
                else:
                    code, payload = api.handle(self.command, self.path, self.headers.get("Content-Type", ""), body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        return Handler

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class _Revision:
    name: str
    storage_uri: str


@dataclass
class _Stored:
    obj: dict[str, Any]
    revisions: list[_Revision] = field(default_factory=list)
    rolled_out: str = ""
    previous_rolled_out: str = ""
    #: the pod template the latest revision was made from (a traffic-only change makes none)
    template: Any = None


class FakeKServeAPI(_LoopbackServer):
    """See the module docstring. Use as a context manager; `kubeconfig(path)` writes a kubeconfig."""

    def __init__(self, validator: CRDValidator, *, never_ready: Iterable[str] = ()) -> None:
        self.validator = validator
        self.never_ready: set[str] = set(never_ready)
        self.objects: dict[tuple[str, str], _Stored] = {}
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._resource_version = 0
        self._start_server()

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            stored = self.objects.get((namespace, name))
            return copy.deepcopy(stored.obj) if stored else None

    def spec_changes(self) -> int:
        """How many requests changed an object's spec (creations included)."""
        return sum(1 for r in self.requests if r.get("spec_changed"))

    # -- controller simulation ---------------------------------------------------------------

    def _next_rv(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _new_revision(self, stored: _Stored) -> None:
        name = stored.obj["metadata"]["name"]
        uri = ""
        try:
            container = predictor_container(stored.obj)
            uri = next((e.get("value", "") for e in container.get("env") or [] if e.get("name") == STORAGE_URI_ENV), "")
        except Exception:  # noqa: BLE001 - a spec without a custom container still gets a revision
            uri = stored.obj["spec"]["predictor"].get("model", {}).get("storageUri", "")
        revision = _Revision(f"{name}-predictor-{len(stored.revisions) + 1:05d}", uri)
        stored.revisions.append(revision)
        stored.template = _template(stored.obj)

    def revision_ready(self, revision: _Revision) -> bool:
        """A revision is ready once its model is not (or no longer) listed in `never_ready`."""
        return revision.storage_uri not in self.never_ready

    def _reconcile(self, stored: _Stored) -> None:
        obj = stored.obj
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        latest = stored.revisions[-1]
        latest_ready = self.revision_ready(latest)
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        traffic: list[dict[str, Any]] = []
        if latest_ready and (canary is None or not stored.rolled_out or stored.rolled_out == latest.name):
            if stored.rolled_out != latest.name:
                stored.previous_rolled_out, stored.rolled_out = stored.rolled_out, latest.name
            traffic.append({"revisionName": latest.name, "percent": 100, "latestRevision": True, "tag": "latest"})
        elif stored.rolled_out:
            share = int(canary) if latest_ready and canary is not None else 0
            if share:
                traffic.append({"revisionName": latest.name, "percent": share, "latestRevision": True, "tag": "latest"})
            traffic.append(
                {"revisionName": stored.rolled_out, "percent": 100 - share, "latestRevision": False, "tag": "prev"}
            )
        ready = latest_ready
        reason = {} if ready else {"reason": "RevisionMissing", "message": f"Revision {latest.name} is not ready"}
        conditions = [
            {"type": "IngressReady", "status": "True", "lastTransitionTime": _now()},
            {
                "type": "PredictorReady",
                "status": "True" if ready else "Unknown",
                "lastTransitionTime": _now(),
                **reason,
            },
            {"type": "Ready", "status": "True" if ready else "Unknown", "lastTransitionTime": _now(), **reason},
        ]
        ready_revisions = [r.name for r in stored.revisions if self.revision_ready(r)]
        predictor_status: dict[str, Any] = {
            "latestCreatedRevision": latest.name,
            "latestRolledoutRevision": stored.rolled_out,
            "traffic": traffic,
            "url": f"http://{name}-predictor.{namespace}.example.com",
        }
        if ready_revisions:
            predictor_status["latestReadyRevision"] = ready_revisions[-1]
        if stored.previous_rolled_out:
            predictor_status["previousRolledoutRevision"] = stored.previous_rolled_out
        obj["status"] = {
            "observedGeneration": meta["generation"],
            "url": f"http://{name}.{namespace}.example.com",
            "address": {"url": f"http://{name}.{namespace}.svc.cluster.local"},
            "conditions": conditions,
            "deploymentMode": "Serverless",
            "components": {"predictor": predictor_status},
        }

    # -- HTTP --------------------------------------------------------------------------------

    def _status(
        self, code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None
    ) -> tuple[int, dict]:
        return kube_status(code, reason, message, causes, group=GROUP, kind=PLURAL)

    def _invalid(self, name: str, obj: Any) -> tuple[int, dict] | None:
        issues = self.validator.issues(obj)
        if not issues:
            return None
        causes = [{"reason": "FieldValueInvalid", "field": i.path, "message": i.message} for i in issues]
        text = "; ".join(str(i) for i in issues)
        return self._status(422, "Invalid", f'InferenceService.{GROUP} "{name}" is invalid: {text}', causes)

    def handle(self, method: str, path: str, content_type: str, body: Any) -> tuple[int, Any]:
        match = _ISVC_PATH.match(urlparse(path).path)
        if not match or match["version"] not in SERVED_VERSIONS:
            # the API server serves only the CRD's versions: any other path is 404 (no such resource)
            return self._status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace, name = match["ns"], match["name"]
        if method in ("POST", "PUT") and isinstance(body, dict):
            mismatch = _identity_mismatch(body, namespace, name)
            if mismatch:
                return self._status(400, "BadRequest", mismatch)
        log: dict[str, Any] = {"method": method, "path": path, "content_type": content_type, "body": body}
        with self._lock:
            self.requests.append(log)
            key = (namespace, name or "")
            if method == "GET" and not name:
                items = [copy.deepcopy(s.obj) for (ns, _), s in self.objects.items() if ns == namespace]
                return 200, {
                    "apiVersion": f"{GROUP}/v1beta1",
                    "kind": "InferenceServiceList",
                    "items": items,
                    "metadata": {"resourceVersion": str(self._resource_version)},
                }
            if method == "POST" and not name:
                if not isinstance(body, dict):
                    return self._status(400, "BadRequest", "body must be an object")
                obj_name = body.get("metadata", {}).get("name", "")
                body = copy.deepcopy(body)
                body.setdefault("metadata", {})["namespace"] = namespace
                invalid = self._invalid(obj_name, body)
                if invalid:
                    return invalid
                if (namespace, obj_name) in self.objects:
                    return self._status(409, "AlreadyExists", f'inferenceservices.{GROUP} "{obj_name}" already exists')
                body.pop("status", None)
                body["metadata"].update(
                    uid=str(uuid.uuid4()), generation=1, resourceVersion=self._next_rv(), creationTimestamp=_now()
                )
                stored = _Stored(body)
                self._new_revision(stored)
                self._reconcile(stored)
                self.objects[(namespace, obj_name)] = stored
                log["spec_changed"] = True
                return 201, copy.deepcopy(stored.obj)
            stored = self.objects.get(key)
            if stored is None:
                return self._status(404, "NotFound", f'inferenceservices.{GROUP} "{name}" not found')
            if method == "GET":
                self._reconcile(stored)  # the controller keeps reconciling between requests
                return 200, copy.deepcopy(stored.obj)
            if method == "DELETE":
                del self.objects[key]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}
            if method in ("PATCH", "PUT"):
                media = content_type.split(";")[0].strip().lower()
                if method == "PUT" and isinstance(body, dict):
                    sent = str(body.get("metadata", {}).get("resourceVersion", ""))
                    current = stored.obj["metadata"]["resourceVersion"]
                    if sent and sent != current:
                        return self._status(
                            409,
                            "Conflict",
                            f'Operation cannot be fulfilled on inferenceservices.{GROUP} "{name}": the object has '
                            "been modified; please apply your changes to the latest version and try again",
                        )
                try:
                    if method == "PUT":
                        updated = copy.deepcopy(body)
                    elif media == "application/json-patch+json":
                        updated = json_patch(stored.obj, body)
                    elif media == "application/merge-patch+json":
                        updated = merge_patch(stored.obj, body)
                    elif media == "application/apply-patch+yaml":
                        return self._status(415, "UnsupportedMediaType", "server-side apply is not simulated")
                    else:
                        # custom resources have no Go struct to drive a strategic merge: the API server
                        # answers 415 for application/strategic-merge-patch+json
                        return self._status(
                            415,
                            "UnsupportedMediaType",
                            f"the body of the request was in an unknown format - accepted media types include: "
                            f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                            f" (got {media!r})",
                        )
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    return self._status(422, "Invalid", f"patch cannot be applied: {exc}")
                if not isinstance(updated, dict):
                    return self._status(400, "BadRequest", f"a {content_type} body must produce an object")
                meta = updated.setdefault("metadata", {})
                for fixed in ("uid", "creationTimestamp", "generation", "namespace", "name"):
                    if fixed in stored.obj["metadata"]:
                        meta[fixed] = stored.obj["metadata"][fixed]
                invalid = self._invalid(name, updated)
                if invalid:
                    return invalid
                spec_changed = updated.get("spec") != stored.obj.get("spec")
                updated["status"] = stored.obj.get("status", {})
                meta["resourceVersion"] = self._next_rv()
                stored.obj = updated
                if spec_changed:
                    meta["generation"] = int(meta["generation"]) + 1
                    template_changed = _template(updated) != stored.template
                    if template_changed:
                        self._new_revision(stored)
                    log["spec_changed"] = True
                self._reconcile(stored)
                return 200, copy.deepcopy(stored.obj)
        return self._status(405, "MethodNotAllowed", f"{method} is not supported on {path}")


#: the versions the KServe CRD serves (a PATCH to any other version is a 404, as on a real cluster)
SERVED_VERSIONS = (API_VERSION,)


def _identity_mismatch(body: dict[str, Any], namespace: str, name: str | None) -> str:
    """The API server's 400 for a body naming another object than the URL (create and update)."""
    meta = body.get("metadata") or {}
    body_ns = meta.get("namespace")
    if body_ns and body_ns != namespace:
        return "the namespace of the provided object does not match the namespace sent on the request"
    if name is not None and meta.get("name") and meta["name"] != name:
        return f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
    return ""


def _template(obj: dict[str, Any]) -> Any:
    """The part of the predictor spec that makes a new Knative revision (everything but traffic)."""
    predictor = dict(obj["spec"]["predictor"])
    predictor.pop("canaryTrafficPercent", None)
    return predictor


# -- Spark Operator ------------------------------------------------------------------------------

_SPARK_PATH = re.compile(
    rf"^/apis/{re.escape(SPARK_GROUP)}/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/{SPARK_PLURAL}"
    r"(?:/(?P<name>[^/]+))?/?$"
)


class FakeSparkOperatorAPI(_LoopbackServer):
    """The SparkApplication API of a cluster running the Kubeflow Spark Operator (module docstring).

    `outcomes` maps an application name to its final (state, errorMessage); by default an
    application COMPLETES. Every GET of an application moves the simulated operator one state on
    (SUBMITTED, RUNNING, then the outcome). `namespaces`: where the caller may create applications
    (its Role); any other namespace is 403 Forbidden, as RBAC answers."""

    def __init__(
        self,
        validator: CRDValidator,
        *,
        namespaces: Iterable[str] = ("default",),
        outcomes: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self.validator = validator
        self.namespaces = set(namespaces)
        self.outcomes = dict(outcomes or {})
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._resource_version = 0
        self._start_server()

    def _advance(self, obj: dict[str, Any]) -> None:
        state = (obj.get("status") or {}).get("applicationState", {}).get("state", "")
        name = obj["metadata"]["name"]
        final, message = self.outcomes.get(name, ("COMPLETED", ""))
        following = {"": "SUBMITTED", "SUBMITTED": "RUNNING", "RUNNING": final}.get(state, state)
        if following == "SUBMISSION_FAILED" and state == "":
            following = final
        application_state: dict[str, Any] = {"state": following}
        if following in ("FAILED", "SUBMISSION_FAILED") and message:
            application_state["errorMessage"] = message
        status: dict[str, Any] = {
            "applicationState": application_state,
            "driverInfo": {"podName": f"{name}-driver"},
            "submissionAttempts": 1,
            "lastSubmissionAttemptTime": _now(),
        }
        if following in ("COMPLETED", "FAILED"):
            status["terminationTime"] = _now()
            status["executionAttempts"] = 1
        obj["status"] = status
        self.validator.validate(obj)  # the operator only ever writes a valid status

    def handle(self, method: str, path: str, content_type: str, body: Any) -> tuple[int, Any]:
        match = _SPARK_PATH.match(urlparse(path).path)
        if not match or match["version"] not in self.validator.versions:
            return kube_status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace, name = match["ns"], match["name"]
        self.requests.append({"method": method, "path": path, "body": body})
        if namespace not in self.namespaces:
            return kube_status(
                403,
                "Forbidden",
                f'sparkapplications.{SPARK_GROUP} is forbidden: User "fake" cannot {method.lower()} resource '
                f'"sparkapplications" in API group "{SPARK_GROUP}" in the namespace "{namespace}"',
            )
        with self._lock:
            if method == "POST" and not name:
                if not isinstance(body, dict):
                    return kube_status(400, "BadRequest", "body must be an object")
                mismatch = _identity_mismatch(body, namespace, None)
                if mismatch:
                    return kube_status(400, "BadRequest", mismatch)
                body = copy.deepcopy(body)
                body.setdefault("metadata", {})["namespace"] = namespace
                obj_name = str(body["metadata"].get("name", ""))
                issues = self.validator.issues(body)
                if issues:
                    causes = [{"reason": "FieldValueInvalid", "field": i.path, "message": i.message} for i in issues]
                    text = "; ".join(str(i) for i in issues)
                    return kube_status(
                        422,
                        "Invalid",
                        f'SparkApplication.{SPARK_GROUP} "{obj_name}" is invalid: {text}',
                        causes,
                        group=SPARK_GROUP,
                        kind=SPARK_PLURAL,
                    )
                if (namespace, obj_name) in self.objects:
                    return kube_status(
                        409, "AlreadyExists", f'sparkapplications.{SPARK_GROUP} "{obj_name}" already exists'
                    )
                body.pop("status", None)
                self._resource_version += 1
                body["metadata"].update(
                    uid=str(uuid.uuid4()),
                    generation=1,
                    resourceVersion=str(self._resource_version),
                    creationTimestamp=_now(),
                )
                self.objects[(namespace, obj_name)] = body
                return 201, copy.deepcopy(body)
            stored = self.objects.get((namespace, name or ""))
            if method == "GET" and name:
                if stored is None:
                    return kube_status(404, "NotFound", f'sparkapplications.{SPARK_GROUP} "{name}" not found')
                self._advance(stored)
                return 200, copy.deepcopy(stored)
            if method == "DELETE" and name:
                if stored is None:
                    return kube_status(404, "NotFound", f'sparkapplications.{SPARK_GROUP} "{name}" not found')
                del self.objects[(namespace, name)]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}
        return kube_status(405, "MethodNotAllowed", f"{method} {path} is not simulated by this stand-in")
