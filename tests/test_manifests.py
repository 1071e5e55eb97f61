"""The Kubernetes manifests and kustomize environments: every overlay builds; every
InferenceService passes the real KServe CRD schema strictly (unknown field = error, like
`kubectl --validate=strict`); every core object passes kubernetes_validate for a fixed
Kubernetes version; environments differ the way they must; no credential is in the repo; alerts
and the Grafana dashboard use metrics the predictor and drift transformer really export."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from functools import cache

import pytest
import yaml

from fraud.config import PROJECT_ROOT

KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ("dev", "staging", "prod")
SHARED = PROJECT_ROOT.parent / "shared"
CRD = SHARED / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
#: kinds kubernetes_validate knows (core API); the others are CRDs checked separately
CORE_KINDS = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "NetworkPolicy",
    "Deployment",
    "Service",
    "CronJob",
    "PersistentVolumeClaim",
}
CUSTOM_KINDS = {"InferenceService", "PrometheusRule"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
needs_crd = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"{SHARED} is absent: no KServe CRD schema to validate against"
)


@cache
def build(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        ["kubectl", "kustomize", str(PROJECT_ROOT / "kustomize" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(overlay: str, kind: str) -> list[dict]:
    return [doc for doc in build(overlay) if doc["kind"] == kind]


def isvc(overlay: str) -> dict:
    (found,) = of_kind(overlay, "InferenceService")
    return found


def configmap(overlay: str, name: str) -> dict[str, str]:
    (found,) = [c for c in of_kind(overlay, "ConfigMap") if c["metadata"]["name"] == name]
    return found["data"]


@pytest.fixture(scope="module")
def crd_validator():
    from fraud.deploy.crd import load_validator

    return load_validator(CRD)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_every_kind_known(overlay):
    kinds = {doc["kind"] for doc in build(overlay)}
    assert {
        "InferenceService",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "ConfigMap",
        "PrometheusRule",
        "Namespace",
    } <= kinds
    assert kinds <= CORE_KINDS | CUSTOM_KINDS, f"unvalidated kinds {kinds - CORE_KINDS - CUSTOM_KINDS}"
    namespace = of_kind(overlay, "Namespace")[0]["metadata"]["name"]
    assert all(doc["metadata"].get("namespace") == namespace for doc in build(overlay) if doc["kind"] != "Namespace")


@needs_kubectl
@needs_crd
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_service_is_valid_against_the_kserve_crd(overlay, crd_validator):
    assert crd_validator.issues(isvc(overlay)) == []


@needs_kubectl
@needs_crd
@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda o: o["spec"]["predictor"].__setitem__("canaryTraficPercent", 10), "canaryTraficPercent"),
        (lambda o: o["spec"]["predictor"].__setitem__("storageUri", "s3://m/1"), "storageUri"),
        (
            lambda o: o["spec"]["predictor"]["containers"][0].__setitem__("imagePullPolicyy", "Always"),
            "imagePullPolicyy",
        ),
        (lambda o: o["spec"]["predictor"].__setitem__("scaleMetric", "latency"), "scaleMetric"),
        (lambda o: o["spec"]["predictor"].__setitem__("minReplicas", "3"), "minReplicas"),
        (lambda o: o["spec"].__setitem__("transformers", {}), "transformers"),
        (lambda o: o["metadata"].__setitem__("name", "Fraud_Detector"), "name"),
    ],
    ids=[
        "misspelt-canary",
        "misplaced-storageUri",
        "unknown-container-field",
        "bad-enum",
        "wrong-type",
        "unknown-component",
        "bad-name",
    ],
)
def test_strict_validation_rejects_mistakes(crd_validator, mutate, where):
    broken = copy.deepcopy(isvc("staging"))
    mutate(broken)
    issues = crd_validator.issues(broken)
    assert issues, f"{where} was accepted"
    assert any(where in str(issue) for issue in issues), issues
    with pytest.raises(ValueError, match="InferenceService is invalid"):
        crd_validator.validate(broken)


@needs_crd
def test_python_built_inference_service_is_valid(crd_validator):
    from fraud.deploy.kserve_rollout import ServingSpec, build_inference_service

    built = build_inference_service(
        "fraud-detector",
        "fraud-dev",
        "7",
        "s3://bucket/7/bundle",
        ServingSpec(core_image="r/core:1", drift_image="r/drift:1"),
    )
    assert crd_validator.issues(built) == []


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_are_valid_kubernetes(overlay):
    import kubernetes_validate

    checked = 0
    for doc in build(overlay):
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
    assert checked >= 8


def test_kubernetes_validate_catches_a_broken_object():
    import kubernetes_validate

    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    for broken in ({"podSelectr": {}}, {"podSelector": "all"}):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate({**policy, "spec": broken}, KUBERNETES_VERSION, strict=True)


@needs_kubectl
def test_environments_differ_as_they_must():
    namespaces = {o: of_kind(o, "Namespace")[0]["metadata"]["name"] for o in OVERLAYS}
    assert len(set(namespaces.values())) == len(OVERLAYS)
    replicas = {o: isvc(o)["spec"]["predictor"]["minReplicas"] for o in OVERLAYS}
    assert replicas["prod"] > replicas["staging"] >= replicas["dev"] >= 1
    for overlay in OVERLAYS:
        predictor = isvc(overlay)["spec"]["predictor"]
        assert predictor["maxReplicas"] >= predictor["minReplicas"]
        assert predictor["scaleMetric"] in ("concurrency", "rps") and predictor["scaleTarget"] > 0
    canary = {o: int(configmap(o, "fraud-rollout-settings")["CANARY_TRAFFIC_PERCENT"]) for o in OVERLAYS}
    assert 0 < canary["prod"] <= canary["staging"] <= canary["dev"] <= 100
    windows = {o: int(configmap(o, "fraud-rollout-settings")["CANARY_WINDOW_SECONDS"]) for o in OVERLAYS}
    assert windows["prod"] >= windows["staging"] >= windows["dev"]
    redis = {o: configmap(o, "fraud-serving-config")["FRAUD_REDIS_HOST"] for o in OVERLAYS}
    assert len(set(redis.values())) == len(OVERLAYS)
    uris = {o: _env(isvc(o)["spec"]["predictor"]["containers"][0], "STORAGE_URI") for o in OVERLAYS}
    assert all(o in uri for o, uri in uris.items())
    prod_core = isvc("prod")["spec"]["predictor"]["containers"][0]["image"]
    assert re.fullmatch(r"ghcr\.io/fraud-platform/fraud-core:\d+\.\d+\.\d+", prod_core), prod_core
    assert isvc("dev")["spec"]["predictor"]["containers"][0]["image"].endswith("-dev")


def _env(container: dict, name: str) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == name)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_are_hardened_and_probed(overlay):
    spec = isvc(overlay)["spec"]
    for component in ("predictor", "transformer"):
        (container,) = spec[component]["containers"]
        assert container["name"] == "kserve-container"
        security = container["securityContext"]
        assert (
            security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        )
        assert {"readinessProbe", "livenessProbe", "resources"} <= set(container)
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
        assert _env(container, "TMPDIR") == "/tmp" and _env(container, "HOME") == "/tmp"
        assert _env(container, "STORAGE_URI").startswith("s3://")
    predictor = spec["predictor"]["containers"][0]
    assert predictor["command"] == ["python", "-m", "predictor"] and "/mnt/models" in predictor["args"]
    transformer = spec["transformer"]["containers"][0]
    assert transformer["command"] == ["python", "-m", "drift_transformer"]
    assert {"--predictor_host", "--protocol"} <= set(transformer["args"])
    annotations = isvc(overlay)["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"


PASSWORDISH = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_only_come_from_secrets(overlay):
    assert not of_kind(overlay, "Secret"), "Secrets must be created out of band, never committed"
    secret_refs = set()
    for container in [c for comp in ("predictor", "transformer") for c in isvc(overlay)["spec"][comp]["containers"]]:
        for env in container.get("env", []):
            if PASSWORDISH.search(env["name"]):
                assert "value" not in env, f"{env['name']} carries a literal value"
                secret_refs.add(env["valueFrom"]["secretKeyRef"]["name"])
    assert secret_refs == {"fraud-redis", "fraud-mlflow", "fraud-postgres"}
    for cm in of_kind(overlay, "ConfigMap"):
        for key, value in cm["data"].items():
            assert not PASSWORDISH.search(key), f"ConfigMap {cm['metadata']['name']} has a credential-like key {key}"
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", value), f"{key} embeds credentials in a URL"


def test_no_plaintext_credentials_in_deployment_files():
    pattern = re.compile(
        r"(?i)(password|passwd|secret|token|api[_-]?key)\s*[:=]\s*['\"]?(?!\$\(|\{\{)[A-Za-z0-9+/_\-]{6,}"
    )
    offenders = []
    for folder in ("manifests", "kustomize", "docker"):
        for path in (PROJECT_ROOT / folder).rglob("*"):
            if path.is_file():
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    if pattern.search(line) and "secretKeyRef" not in line:
                        offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    assert pattern.search('password: "hunter2hunter2"')  # the scan itself works


@needs_kubectl
def test_deployer_role_is_least_privilege():
    (role,) = of_kind("prod", "Role")
    verbs = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert ("serving.kserve.io", "inferenceservices", "patch") in verbs
    assert ("serving.kserve.io", "inferenceservices", "create") in verbs
    assert ("serving.kserve.io", "inferenceservices", "get") in verbs
    assert not any(v == "*" or r == "*" or g == "*" for g, r, v in verbs)
    assert not any(r in ("secrets", "roles", "rolebindings") for _, r, _ in verbs)
    assert not any(v in ("update", "deletecollection", "escalate", "bind", "impersonate") for _, _, v in verbs)
    (binding,) = of_kind("prod", "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fraud-deployer", "namespace": "fraud-prod"}]
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind("prod", "ServiceAccount")}
    assert accounts["fraud-predictor"]["automountServiceAccountToken"] is False


@needs_kubectl
def test_network_policies_isolate_the_predictor():
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind("prod", "NetworkPolicy")}
    predictor = policies["fraud-predictor"]
    assert predictor["podSelector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": "fraud-detector",
        "component": "predictor",
    }
    assert set(predictor["policyTypes"]) == {"Ingress", "Egress"}
    sources = [peer for rule in predictor["ingress"] for peer in rule["from"]]
    assert {"serving.kserve.io/inferenceservice": "fraud-detector", "component": "transformer"} in [
        p.get("podSelector", {}).get("matchLabels") for p in sources
    ]
    egress_ports = {port["port"] for rule in predictor["egress"] for port in rule.get("ports", [])}
    assert egress_ports == {53, 6379, 5000, 443}


# ----------------------------------------------------------------------- metrics alignment


def _predictor_metric_names() -> set[str]:
    """Sample names the predictor exports, from its real prometheus_client registry."""
    import prometheus_client

    import predictor.metrics  # noqa: F401  (registers the metrics)

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("fraud_predictor_"):
            base = family.name
            if family.type == "counter":
                names.add(f"{base}_total")
            elif family.type == "histogram":
                names.update({f"{base}_bucket", f"{base}_count", f"{base}_sum"})
            else:
                names.add(base)
    return names


def _drift_metric_names() -> set[str]:
    """Names the drift transformer declares (it runs in another environment: read its source)."""
    source = "\n".join(p.read_text() for p in (PROJECT_ROOT / "drift_transformer" / "drift_transformer").glob("*.py"))
    suffixes = {"Gauge": ("",), "Counter": ("_total",), "Histogram": ("_bucket", "_count", "_sum")}
    return {
        f"{name}{suffix}"
        for kind, name in re.findall(r'(Gauge|Counter|Histogram)\(\s*"(fraud_[a-z_]+)"', source)
        for suffix in suffixes[kind]
    }


def _referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(fraud_(?:predictor|drift|transformer)_[a-z_]+)\b", text))


def test_alerts_and_dashboard_use_exported_metrics():
    known = _predictor_metric_names() | _drift_metric_names()
    assert "fraud_predictor_requests_total" in known and "fraud_drift_detected" in known
    rules = yaml.safe_load((PROJECT_ROOT / "manifests" / "prometheusrule.yaml").read_text())
    exprs = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for group in rules["spec"]["groups"] for rule in group["rules"] if "alert" in rule}
    assert {
        "FraudPredictorHighErrorRate",
        "FraudPredictorLatencySLO",
        "FraudFeatureDriftDetected",
        "FraudDeclineRateAnomaly",
    } <= alerts
    used = _referenced_metrics("\n".join(exprs))
    dashboard = json.loads((PROJECT_ROOT / "manifests" / "fraud-detector-dashboard.json").read_text())
    used_by_dashboard = _referenced_metrics(json.dumps(dashboard))
    assert used and used_by_dashboard
    assert (used | used_by_dashboard) - known == set()


def test_canary_analysis_queries_use_exported_metrics():
    from fraud.deploy.canary import promql_for

    queries = "\n".join(promql_for("3", 600, {"namespace": "fraud-prod"}).values())
    assert _referenced_metrics(queries) - _predictor_metric_names() == set()


def test_grafana_dashboard_is_valid():
    dashboard = json.loads((PROJECT_ROOT / "manifests" / "fraud-detector-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("requests / s", "p99", "errors", "decisions", "score distribution", "canary vs stable", "drift"):
        assert topic in titles, topic
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["expr"].strip() and t["refId"] for t in panel["targets"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables


@needs_kubectl
def test_dashboard_configmap_carries_the_dashboard_file():
    (cm,) = [c for c in of_kind("prod", "ConfigMap") if c["metadata"]["name"] == "fraud-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["fraud-detector-dashboard.json"])["uid"] == "fraud-detector"
