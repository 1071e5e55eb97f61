"""Strict validation of custom resources against a CustomResourceDefinition's openAPIV3Schema
(or a published JSON Schema of one kind, `json_schema_validator`: Istio, Spark Operator).

The API server *prunes* unknown fields of a structural CRD schema silently; `kubectl
--validate=strict` (server-side field validation "Strict") turns them into errors instead. This
module does the same offline: it walks the CRD schema, closes every object schema that declares
`properties` (unknown field = error) unless it carries `x-kubernetes-preserve-unknown-fields`,
maps `x-kubernetes-int-or-string` and `nullable` to JSON-Schema equivalents, and validates with
`jsonschema`. So a misspelt `canaryTraficPercent` or a `storageUri` put where the schema has no
such field fails, exactly as the strict API server would reject it.

The KServe CRD itself is not vendored (see docs/deployment.md, "CRD schema provenance"); its
path defaults to `<project>/../shared/schemas/kserve/serving.kserve.io_inferenceservices.yaml`
and is overridable by argument or FRAUD_KSERVE_CRD.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fraud.config import PROJECT_ROOT

DEFAULT_CRD_PATH = PROJECT_ROOT.parent / "shared" / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
CRD_PATH_ENV = "FRAUD_KSERVE_CRD"

#: metadata is `type: object` in every CRD; the API server checks ObjectMeta itself. These are the
#: ObjectMeta fields a client may send (status-like ones included, as a GET returns them).
_OBJECT_META_FIELDS = {
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "finalizers",
    "ownerReferences",
    "managedFields",
    "selfLink",
}
_DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class CRDError(Exception):
    """The CRD file is missing or is not a CustomResourceDefinition."""


@dataclass(frozen=True)
class ValidationIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def default_crd_path() -> Path:
    return Path(os.environ.get(CRD_PATH_ENV, DEFAULT_CRD_PATH))


def _strict(schema: Any) -> Any:
    """A JSON-Schema (draft 7) copy of an OpenAPI v3 structural schema with unknown fields forbidden."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "description", "example"):
            continue
        else:
            out[key] = _strict(value)
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in schema and "additionalProperties" not in schema and not preserve:
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-embedded-resource") and "properties" in out:
        out["properties"].setdefault("apiVersion", {"type": "string"})
        out["properties"].setdefault("kind", {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    return out


def _load_yaml(path: Path) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, "rb") as handle:
        return yaml.load(handle, Loader=loader)  # noqa: S506 - loader is a (C)SafeLoader


class CRDValidator:
    """Validates objects of one CRD (every served version) strictly."""

    def __init__(self, crd: dict[str, Any]) -> None:
        import jsonschema

        if crd.get("kind") != "CustomResourceDefinition":
            raise CRDError("not a CustomResourceDefinition")
        spec = crd["spec"]
        self.group: str = spec["group"]
        self.kind: str = spec["names"]["kind"]
        self.plural: str = spec["names"]["plural"]
        self._validators: dict[str, Any] = {}
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            meta = schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
            meta.update(
                {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        **{name: {} for name in _OBJECT_META_FIELDS},
                        "name": {"type": "string", "maxLength": 253, "pattern": _DNS_1123_SUBDOMAIN},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                }
            )
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            jsonschema.Draft7Validator.check_schema(schema)
            self._validators[version["name"]] = jsonschema.Draft7Validator(schema)

    @property
    def versions(self) -> list[str]:
        return list(self._validators)

    def issues(self, obj: Any) -> list[ValidationIssue]:
        """Every reason `obj` would be rejected (empty list: valid)."""
        if not isinstance(obj, dict):
            return [ValidationIssue("$", "object must be a mapping")]
        api_version = str(obj.get("apiVersion", ""))
        group, _, version = api_version.partition("/")
        if group != self.group or version not in self._validators:
            return [
                ValidationIssue(
                    "apiVersion", f"must be {self.group}/<one of {', '.join(self.versions)}>, got {api_version!r}"
                )
            ]
        if obj.get("kind") != self.kind:
            return [ValidationIssue("kind", f"must be {self.kind}, got {obj.get('kind')!r}")]
        found = []
        for error in sorted(self._validators[version].iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path) or "$"
            path = path.replace(".[", "[")
            if error.validator == "additionalProperties" and error.validator_value is False:
                unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
                message = f"unknown field(s) {', '.join(repr(u) for u in unknown)}"
            else:
                message = error.message
            found.append(ValidationIssue(path, message))
        return found

    def validate(self, obj: Any) -> None:
        """Raise ValueError listing every issue when `obj` is invalid."""
        problems = self.issues(obj)
        if problems:
            raise ValueError(f"{self.kind} is invalid: " + "; ".join(str(p) for p in problems))


@lru_cache(maxsize=4)
def _load(path: str) -> CRDValidator:
    file = Path(path)
    if not file.is_file():
        raise CRDError(f"CRD schema file {file} does not exist (set {CRD_PATH_ENV} or pass a path)")
    documents = _load_yaml(file)
    return CRDValidator(documents)


def load_validator(path: Path | str | None = None) -> CRDValidator:
    """The strict validator for the CRD at `path` (default: FRAUD_KSERVE_CRD or ../shared/...). Cached."""
    return _load(str(Path(path) if path is not None else default_crd_path()))


def json_schema_validator(path: Path | str, *, group: str, version: str, kind: str, plural: str) -> CRDValidator:
    """The strict validator of one kind from its published JSON Schema of a whole object (the
    datreeio CRDs-catalog files under ../shared/schemas/: Istio, Spark Operator, Prometheus
    Operator), by wrapping it in a one-version CRD."""
    import json

    file = Path(path)
    if not file.is_file():
        raise CRDError(f"schema file {file} does not exist")
    schema = json.loads(file.read_text())
    schema.setdefault("properties", {}).update(apiVersion={"type": "string"}, kind={"type": "string"})
    crd = {
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural},
            "versions": [{"name": version, "served": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }
    return CRDValidator(crd)
