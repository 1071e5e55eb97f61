"""In-process stand-ins for a cluster, for tests and offline rehearsals of a rollout.

* `FakeKServeAPI` - a real HTTP server on loopback speaking the Kubernetes REST paths of the
  InferenceService resource (`/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]`:
  GET, POST, PUT, PATCH with merge-patch or json-patch bodies, DELETE), so the real `kubernetes`
  and `kserve` clients talk to it through an ordinary kubeconfig. Every object it receives is
  validated strictly against the KServe CRD schema (`fraud.deploy.crd`) and rejected with a 422
  Status like the API server's. It simulates the controller: metadata.generation (bumped only
  when the spec changes), status.observedGeneration, Knative revisions, the Ready conditions,
  and the predictor's traffic split under `canaryTrafficPercent`. Storage URIs listed in
  `never_ready` produce revisions that never become ready.
* `FakePrometheus` - a real HTTP server answering `/api/v1/query` for the query shapes
  `fraud.deploy.canary.promql_for` produces, evaluated over scripted per-series increases.
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
from urllib.parse import parse_qs, urlparse

from fraud.deploy.crd import CRDValidator
from fraud.deploy.kserve_rollout import GROUP, PLURAL, STORAGE_URI_ENV, predictor_container

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


class _LoopbackServer(ABC):
    """An HTTP server on a free loopback port, served from a daemon thread while used as a context
    manager. Subclasses provide `_handler()` (the request handler class)."""

    def _start_server(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @abstractmethod
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class serving this fake."""

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
            body["details"] = {"group": GROUP, "kind": PLURAL, "causes": causes}
        return code, body

    def _invalid(self, name: str, obj: Any) -> tuple[int, dict] | None:
        issues = self.validator.issues(obj)
        if not issues:
            return None
        causes = [{"reason": "FieldValueInvalid", "field": i.path, "message": i.message} for i in issues]
        text = "; ".join(str(i) for i in issues)
        return self._status(422, "Invalid", f'InferenceService.{GROUP} "{name}" is invalid: {text}', causes)

    def handle(self, method: str, path: str, content_type: str, body: Any) -> tuple[int, Any]:
        match = _ISVC_PATH.match(urlparse(path).path)
        if not match:
            return self._status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace, name = match["ns"], match["name"]
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
                try:
                    if method == "PUT":
                        updated = copy.deepcopy(body)
                    elif "json-patch" in content_type:
                        updated = json_patch(stored.obj, body)
                    elif "merge-patch" in content_type or "strategic-merge-patch" in content_type:
                        updated = merge_patch(stored.obj, body)
                    else:
                        return self._status(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
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
                    code, payload = api._status(400, "BadRequest", "body is not JSON")
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


def _template(obj: dict[str, Any]) -> Any:
    """The part of the predictor spec that makes a new Knative revision (everything but traffic)."""
    predictor = dict(obj["spec"]["predictor"])
    predictor.pop("canaryTrafficPercent", None)
    return predictor


# --------------------------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class Series:
    """One time series' increase over the analysis window."""

    metric: str
    labels: dict[str, str]
    increase: float


_QUERY = re.compile(
    r"^sum(?: by \((?P<by>\w+)\))? ?"
    r"\(increase\((?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<matchers>[^}]*)\}\[(?P<window>\d+[smh])\]\)\)$"
)
_MATCHER = re.compile(r'(?P<label>[a-zA-Z_]\w*)(?P<op>=~|!=|=)"(?P<value>(?:[^"\\]|\\.)*)"')


class FakePrometheus(_LoopbackServer):
    """A Prometheus HTTP API on loopback evaluating `sum [by (le)] (increase(m{...}[w]))` over `series`."""

    def __init__(self, series: Iterable[Series] = ()) -> None:
        self.series: list[Series] = list(series)
        self.queries: list[str] = []
        self.down = False
        self._start_server()

    def evaluate(self, query: str) -> tuple[int, dict[str, Any]]:
        match = _QUERY.match(query.strip())
        if not match:
            return 400, {"status": "error", "errorType": "bad_data", "error": f"unsupported query {query!r}"}
        matchers = [(m["label"], m["op"], m["value"].replace('\\"', '"')) for m in _MATCHER.finditer(match["matchers"])]

        def selected(s: Series) -> bool:
            if s.metric != match["metric"]:
                return False
            for label, op, value in matchers:
                actual = s.labels.get(label, "")
                if op == "=" and actual != value:
                    return False
                if op == "!=" and actual == value:
                    return False
                if op == "=~" and not re.fullmatch(value, actual):
                    return False
            return True

        chosen = [s for s in self.series if selected(s)]
        if match["by"]:
            groups: dict[str, float] = {}
            for s in chosen:
                key = s.labels.get(match["by"], "")
                groups[key] = groups.get(key, 0.0) + s.increase
            result = [{"metric": {match["by"]: k}, "value": [0, repr(v)]} for k, v in sorted(groups.items())]
        else:
            result = [{"metric": {}, "value": [0, repr(sum(s.increase for s in chosen))]}] if chosen else []
        return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        prometheus = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                if prometheus.down:
                    code, payload = 503, {"status": "error", "errorType": "unavailable", "error": "scripted outage"}
                elif parsed.path != "/api/v1/query":
                    code, payload = 404, {"status": "error", "errorType": "not_found", "error": parsed.path}
                else:
                    query = parse_qs(parsed.query).get("query", [""])[0]
                    prometheus.queries.append(query)
                    code, payload = prometheus.evaluate(query)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def predictor_series(
    version: str,
    *,
    requests: int,
    server_errors: int = 0,
    latency_seconds: float = 0.01,
    score_mean: float = 0.1,
    extra_labels: dict[str, str] | None = None,
) -> list[Series]:
    """The series a predictor serving `version` would produce over a window: `requests` scoring
    requests (`server_errors` of them failing), all `latency_seconds` long, with fraud scores
    spread around `score_mean`. Bucket bounds are the predictor's own (`predictor/metrics.py`)."""
    from fraud.deploy.canary import LATENCY_METRIC, REQUESTS_METRIC, SCORE_METRIC

    latency_bounds = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf"))
    score_bounds = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, float("inf"))
    base = {"model_version": version, **(extra_labels or {})}
    ok = requests - server_errors
    out = [
        Series(REQUESTS_METRIC, {**base, "protocol": "v2", "outcome": "ok"}, float(ok)),
        Series(REQUESTS_METRIC, {**base, "protocol": "v2", "outcome": "error"}, float(server_errors)),
    ]
    for le in latency_bounds:
        label = "+Inf" if le == float("inf") else repr(le)
        out.append(
            Series(
                f"{LATENCY_METRIC}_bucket",
                {**base, "protocol": "v2", "outcome": "ok", "le": label},
                float(ok if latency_seconds <= le else 0),
            )
        )
    # scores: a triangular spread of width 0.2 around score_mean, as cumulative counts
    for le in score_bounds:
        label = "+Inf" if le == float("inf") else repr(le)
        low, high = max(0.0, score_mean - 0.1), min(1.0, score_mean + 0.1)
        fraction = 1.0 if le >= high else 0.0 if le <= low else (le - low) / (high - low)
        out.append(Series(f"{SCORE_METRIC}_bucket", {**base, "le": label}, float(round(ok * fraction))))
    return out
