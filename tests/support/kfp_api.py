"""A loopback stand-in for the Kubeflow Pipelines v2beta1 REST API, for the CLI's client tests.

It serves the calls `kfp.Client` makes to run, upload and schedule pipelines, and refuses what the
real API server refuses:

* every JSON body is checked against the `kfp_server_api` model of its endpoint: unknown fields,
  wrong types and missing required fields are HTTP 400;
* a run's or recurring run's pipeline spec must parse as a `PipelineSpec`, and its runtime
  parameters must be inputs the pipeline declares (400 otherwise); referenced experiments,
  pipelines and versions must exist (404); a cron must have six fields; max_concurrency 1..10;
* with `token` set, a request without `Authorization: Bearer <token>` is 401;
* any other path or method is 404.

Everything accepted is kept (`experiments`, `pipelines`, `versions`, `runs`, `recurring_runs`)
and every request is logged in `requests`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kfp_server_api
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

PREFIX = "/apis/v2beta1"


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: gRPC codes the real server puts in its error bodies
_GRPC_CODE = {400: 3, 401: 16, 404: 5, 409: 6}


def _check_model(data: object, model: str, where: str = "body") -> object:
    """Validate `data` against the kfp_server_api model `model` (recursively): unknown fields and
    values of the wrong type are refused. Returns the deserialised model."""
    klass = getattr(kfp_server_api, model)
    if not isinstance(data, dict):
        raise Refused(400, f"{where}: expected a JSON object for {model}")
    allowed = {json_name: name for name, json_name in klass.attribute_map.items()}
    for key, value in data.items():
        if key not in allowed:
            raise Refused(400, f'{where}: unknown field "{key}" in {model}')
        kind = klass.openapi_types[allowed[key]]
        _check_value(value, kind, f"{where}.{key}")
    try:
        return kfp_server_api.ApiClient()._ApiClient__deserialize(data, model)
    except (ValueError, TypeError) as exc:
        raise Refused(400, f"{where}: invalid {model}: {exc}") from None


def _check_value(value: object, kind: str, where: str) -> None:
    if value is None:
        return
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise Refused(400, f"{where}: expected a list")
        for i, item in enumerate(value):
            _check_value(item, kind[5:-1], f"{where}[{i}]")
    elif kind.startswith("dict("):
        if not isinstance(value, dict):
            raise Refused(400, f"{where}: expected an object")
    elif kind == "str":
        # int64 fields are typed str in the models; grpc-gateway takes them as JSON numbers too
        if not isinstance(value, str) and (isinstance(value, bool) or not isinstance(value, int)):
            raise Refused(400, f"{where}: expected a string")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).lstrip("-").isdigit():
            raise Refused(400, f"{where}: expected an integer")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise Refused(400, f"{where}: expected a boolean")
    elif kind == "datetime":
        if not isinstance(value, str):
            raise Refused(400, f"{where}: expected a timestamp")
    elif kind == "object":
        return
    elif hasattr(kfp_server_api, kind):
        klass = getattr(kfp_server_api, kind)
        if hasattr(klass, "allowable_values"):  # enums
            if value not in klass.allowable_values:
                raise Refused(400, f"{where}: {value!r} is not one of {klass.allowable_values}")
        else:
            _check_model(value, kind, where)


def _pipeline_inputs(spec: dict, where: str) -> set[str]:
    """Parse a pipeline spec (as the API does) and return its root input parameters. With a
    Kubernetes platform config the client sends {"pipeline_spec": ..., "platform_spec": ...}."""
    if "pipeline_spec" in spec:
        extra = set(spec) - {"pipeline_spec", "platform_spec"}
        if extra:
            raise Refused(400, f"{where}: unknown field(s) {sorted(extra)} next to pipeline_spec")
        _check_platform(spec.get("platform_spec") or {}, where)
        spec = spec["pipeline_spec"]
    try:
        parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    except json_format.ParseError as exc:
        raise Refused(400, f"{where}: not a valid PipelineSpec: {exc}") from None
    if not parsed.pipeline_info.name or not parsed.root.dag.tasks:
        raise Refused(400, f"{where}: the pipeline spec has no name or no tasks")
    return set(parsed.root.input_definitions.parameters)


def _check_platform(platform: dict, where: str) -> None:
    try:
        json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except json_format.ParseError as exc:
        raise Refused(400, f"{where}: not a valid PlatformSpec: {exc}") from None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class KfpApiState:
    token: str | None = None
    experiments: dict[str, dict] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    #: version id -> version (with its pipeline spec)
    versions: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _filter_name(query: dict[str, list[str]]) -> str | None:
    raw = query.get("filter", [""])[0]
    if not raw:
        return None
    try:
        predicates = json.loads(raw)["predicates"]
    except (ValueError, KeyError, TypeError):
        raise Refused(400, "filter: not a valid filter") from None
    for predicate in predicates:
        if predicate.get("key") in ("display_name", "name") and predicate.get("operation") in ("EQUALS", 1):
            return predicate.get("stringValue") or predicate.get("string_value")
        raise Refused(400, f"filter: unsupported predicate {predicate}")
    return None


class _Handler(BaseHTTPRequestHandler):
    state: KfpApiState

    def log_message(self, *args) -> None:  # quiet
        return

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self) -> object:
        try:
            return json.loads(self._body() or b"null")
        except ValueError:
            raise Refused(400, "body: not JSON") from None

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        self.state.requests.append((method, url.path))
        try:
            if self.state.token is not None and self.headers.get("Authorization") != f"Bearer {self.state.token}":
                raise Refused(401, "Unauthenticated: missing or wrong bearer token")
            if not url.path.startswith(PREFIX):
                raise Refused(404, f"Not Found: {url.path}")
            status, body = self._route(method, url.path[len(PREFIX) :].rstrip("/"), parse_qs(url.query))
            self._send(status, body)
        except Refused as refusal:
            code = _GRPC_CODE.get(refusal.status, 2)
            self._send(refusal.status, {"error": refusal.message, "message": refusal.message, "code": code})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    # -- routes --------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict) -> tuple[int, dict]:
        state = self.state
        parts = path.split("/")[1:]
        with state.lock:
            if method == "GET" and parts == ["healthz"]:
                return 200, {"multi_user": False}
            if parts == ["experiments"] and method == "GET":
                name = _filter_name(query)
                found = [e for e in state.experiments.values() if name is None or e["display_name"] == name]
                return 200, {"experiments": found, "total_size": len(found)} if found else {}
            if parts == ["experiments"] and method == "POST":
                body = self._json()
                _check_model(body, "V2beta1Experiment")
                if not body.get("display_name"):
                    raise Refused(400, "experiment: display_name is required")
                if any(e["display_name"] == body["display_name"] for e in state.experiments.values()):
                    raise Refused(409, f"experiment {body['display_name']} already exists")
                experiment = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now()}
                state.experiments[experiment["experiment_id"]] = experiment
                return 200, experiment
            if len(parts) == 2 and parts[0] == "experiments" and method == "GET":
                if parts[1] not in state.experiments:
                    raise Refused(404, f"experiment {parts[1]} not found")
                return 200, state.experiments[parts[1]]
            if parts == ["pipelines"] and method == "GET":
                name = _filter_name(query)
                found = [p for p in state.pipelines.values() if name is None or p["display_name"] == name]
                return 200, {"pipelines": found, "total_size": len(found)} if found else {}
            if parts == ["pipelines", "upload"] and method == "POST":
                return 200, self._upload(query, pipeline_id=None)
            if parts == ["pipelines", "upload_version"] and method == "POST":
                pipeline_id = (query.get("pipelineid") or query.get("pipeline_id") or [""])[0]
                if pipeline_id not in state.pipelines:
                    raise Refused(404, f"pipeline {pipeline_id!r} not found")
                return 200, self._upload(query, pipeline_id=pipeline_id)
            if len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions" and method == "GET":
                if parts[1] not in state.pipelines:
                    raise Refused(404, f"pipeline {parts[1]} not found")
                versions = [
                    {k: v for k, v in version.items() if k != "pipeline_spec"}
                    for version in state.versions.values()
                    if version["pipeline_id"] == parts[1]
                ]
                versions.sort(key=lambda v: v["created_at"], reverse="desc" in query.get("sort_by", [""])[0])
                size = int(query.get("page_size", ["0"])[0] or 0)
                versions = versions[:size] if size else versions
                return 200, {"pipeline_versions": versions, "total_size": len(versions)} if versions else {}
            if parts == ["runs"] and method == "POST":
                body = self._json()
                _check_model(body, "V2beta1Run")
                self._check_runnable(body, "run")
                run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
                state.runs[run["run_id"]] = run
                return 200, run
            if parts == ["recurringruns"] and method == "POST":
                body = self._json()
                _check_model(body, "V2beta1RecurringRun")
                self._check_runnable(body, "recurring run")
                cron = (body.get("trigger") or {}).get("cron_schedule", {}).get("cron", "")
                if not cron or len(cron.split()) != 6:
                    raise Refused(400, f"recurring run: trigger.cron_schedule.cron {cron!r} must have six fields")
                if body.get("mode") not in ("ENABLE", "DISABLE"):
                    raise Refused(400, "recurring run: mode must be ENABLE or DISABLE")
                if not 1 <= int(body.get("max_concurrency") or 0) <= 10:
                    raise Refused(400, "recurring run: max_concurrency must be between 1 and 10")
                recurring = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED", "created_at": _now()}
                state.recurring_runs[recurring["recurring_run_id"]] = recurring
                return 200, recurring
        raise Refused(404, f"Not Found: {method} {PREFIX}{path}")

    def _upload(self, query: dict, pipeline_id: str | None) -> dict:
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise Refused(400, "upload: expected multipart/form-data")
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + self._body())
        files = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        if "uploadfile" not in files:
            raise Refused(400, "upload: the form has no uploadfile")
        try:
            documents = list(yaml.safe_load_all(files["uploadfile"].get_payload(decode=True)))
        except yaml.YAMLError as exc:
            raise Refused(400, f"upload: not YAML: {exc}") from None
        spec = documents[0] if documents else None
        if not isinstance(spec, dict):
            raise Refused(400, "upload: empty pipeline file")
        _pipeline_inputs(spec, "upload")
        for platform in documents[1:]:
            _check_platform(platform or {}, "upload")
        name = (query.get("name") or query.get("display_name") or [""])[0]
        state = self.state
        if pipeline_id is None:
            if not name:
                raise Refused(400, "upload: a pipeline name is required")
            if any(p["display_name"] == name for p in state.pipelines.values()):
                raise Refused(409, f"pipeline {name} already exists")
            pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name, "created_at": _now()}
            if query.get("description"):
                pipeline["description"] = query["description"][0]
            state.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], name, spec)
            return pipeline
        if not name:
            raise Refused(400, "upload_version: a version name is required")
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in state.versions.values()):
            raise Refused(409, f"version {name} already exists")
        return {k: v for k, v in self._add_version(pipeline_id, name, spec).items() if k != "pipeline_spec"}

    def _add_version(self, pipeline_id: str, name: str, spec: dict) -> dict:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "display_name": name,
            "created_at": _now(),
            "pipeline_spec": spec,
        }
        self.state.versions[version["pipeline_version_id"]] = version
        return version

    def _check_runnable(self, body: dict, what: str) -> None:
        state = self.state
        if not body.get("display_name"):
            raise Refused(400, f"{what}: display_name is required")
        experiment_id = body.get("experiment_id")
        if experiment_id and experiment_id not in state.experiments:
            raise Refused(404, f"{what}: experiment {experiment_id} not found")
        reference = body.get("pipeline_version_reference")
        if body.get("pipeline_spec") and reference:
            raise Refused(400, f"{what}: give either pipeline_spec or pipeline_version_reference")
        if body.get("pipeline_spec"):
            inputs = _pipeline_inputs(body["pipeline_spec"], f"{what}.pipeline_spec")
        elif reference:
            version = state.versions.get(reference.get("pipeline_version_id", ""))
            if version is None or version["pipeline_id"] != reference.get("pipeline_id"):
                raise Refused(404, f"{what}: pipeline version {reference} not found")
            inputs = _pipeline_inputs(version["pipeline_spec"], f"{what}.pipeline_version")
        else:
            raise Refused(400, f"{what}: pipeline_spec or pipeline_version_reference is required")
        parameters = set((body.get("runtime_config") or {}).get("parameters") or {})
        unknown = parameters - inputs
        if unknown:
            raise Refused(400, f"{what}: the pipeline has no input parameter(s) {sorted(unknown)}")


@contextlib.contextmanager
def kfp_api(token: str | None = None) -> Iterator[tuple[str, KfpApiState]]:
    """Serve the stand-in on a free loopback port; yields (base URL, state)."""
    state = KfpApiState(token=token)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
