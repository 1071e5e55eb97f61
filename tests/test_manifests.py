"""The Kubernetes manifests and kustomize environments: every overlay builds; every
InferenceService passes the real KServe CRD schema strictly (unknown field = error, like
`kubectl --validate=strict`) and the pod-spec rules Knative Serving adds on top; every core object
passes kubernetes_validate for a fixed Kubernetes version; environments differ the way they must;
no credential is in the repo; the predictor pod audits every decision (spool on a volume shared
with the `fraud audit writer` container, database from a Secret, schema migrated by one Job,
scraped, reachable through the NetworkPolicies); alerts and the Grafana dashboard use metrics the
predictor, the drift transformer and the audit trail really export."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import PurePosixPath

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
    "Job",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
}
ISTIO_KINDS = {"RequestAuthentication", "AuthorizationPolicy", "PeerAuthentication"}
#: ScheduledSparkApplication: validated against the Spark Operator schema in tests/test_spark_application.py
CUSTOM_KINDS = {"InferenceService", "PrometheusRule", "PodMonitor", "ScheduledSparkApplication", *ISTIO_KINDS}

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
    from tests.support.kserve_crd import load_validator

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
        "Job",
        "PodMonitor",
        "PodDisruptionBudget",
        *ISTIO_KINDS,
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
    from fraud.deploy.kserve_rollout import build_inference_service
    from fraud.deploy.overlay import load_inference_service

    built = build_inference_service(load_inference_service("dev"), "fraud-dev", "7", "s3://bucket/7/bundle")
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


def named_container(component: dict, name: str) -> dict:
    (found,) = [c for c in component.get("containers", []) if c.get("name") == name]
    return found


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_are_hardened_and_probed(overlay):
    spec = isvc(overlay)["spec"]
    # overlays and the rollout address the serving container as containers/0
    assert spec["predictor"]["containers"][0]["name"] == "kserve-container"
    assert [c["name"] for c in spec["transformer"]["containers"]] == ["kserve-container"]
    for component in ("predictor", "transformer"):
        container = named_container(spec[component], "kserve-container")
        security = container["securityContext"]
        assert (
            security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        )
        assert {"readinessProbe", "livenessProbe", "resources"} <= set(container)
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
        assert _env(container, "TMPDIR") == "/tmp" and _env(container, "HOME") == "/tmp"
        assert _env(container, "STORAGE_URI").startswith("s3://")
    predictor = named_container(spec["predictor"], "kserve-container")
    assert predictor["command"] == ["python", "-m", "predictor"] and "/mnt/models" in predictor["args"]
    transformer = named_container(spec["transformer"], "kserve-container")
    assert transformer["command"] == ["python", "-m", "drift_transformer"]
    assert {"--predictor_host", "--protocol"} <= set(transformer["args"])
    annotations = isvc(overlay)["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"


PASSWORDISH = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential|_key$)", re.IGNORECASE)


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
    assert secret_refs == {"fraud-redis", "fraud-audit-writer", "fraud-audit-chain"}
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
    (role,) = [r for r in of_kind("prod", "Role") if r["metadata"]["name"] == "fraud-deployer"]
    verbs = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert ("serving.kserve.io", "inferenceservices", "patch") in verbs
    assert ("serving.kserve.io", "inferenceservices", "create") in verbs
    assert ("serving.kserve.io", "inferenceservices", "get") in verbs
    assert not any(v == "*" or r == "*" or g == "*" for g, r, v in verbs)
    assert not any(r in ("secrets", "roles", "rolebindings") for _, r, _ in verbs)
    assert not any(v in ("update", "deletecollection", "escalate", "bind", "impersonate") for _, _, v in verbs)
    (binding,) = [b for b in of_kind("prod", "RoleBinding") if b["roleRef"]["name"] == "fraud-deployer"]
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
    assert egress_ports == {6379, 5432, 15012}  # Redis, PostgreSQL, istiod; DNS and HTTPS: own policies
    (postgres,) = [rule for rule in predictor["egress"] if any(p["port"] == 5432 for p in rule.get("ports", []))]
    assert [peer["podSelector"]["matchLabels"] for peer in postgres["to"]] == [{"app.kubernetes.io/name": "postgresql"}]
    assert all("namespaceSelector" not in peer for peer in postgres["to"])  # the namespace's own `postgres`


# ----------------------------------------------------------------------- metrics alignment


def _predictor_metric_names() -> set[str]:
    """Sample names the predictor exports, from its real prometheus_client registry."""
    import predictor.prometheus  # noqa: F401  (registers the metrics)

    return _registered_names("fraud_predictor_")


def _audit_metric_names() -> set[str]:
    """Sample names of the audit trail (spool side in the predictor, drain side in the writer)."""
    import fraud.audit.prometheus  # noqa: F401  (registers the metrics)

    return _registered_names("fraud_audit_")


def _registered_names(prefix: str) -> set[str]:
    import prometheus_client

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith(prefix):
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
    return set(re.findall(r"\b(fraud_(?:predictor|drift|transformer|audit)_[a-z_]+)\b", text))


def test_alerts_and_dashboard_use_exported_metrics():
    known = _predictor_metric_names() | _drift_metric_names() | _audit_metric_names()
    assert "fraud_predictor_requests_total" in known and "fraud_drift_detected" in known
    assert {"fraud_audit_spool_backlog", "fraud_audit_written_total", "fraud_audit_dead_letters_total"} <= known
    rules = yaml.safe_load((PROJECT_ROOT / "manifests" / "prometheusrule.yaml").read_text())
    exprs = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for group in rules["spec"]["groups"] for rule in group["rules"] if "alert" in rule}
    assert {
        "FraudPredictorHighErrorRate",
        "FraudPredictorLatencySLO",
        "FraudFeatureDriftDetected",
        "FraudDeclineRateAnomaly",
        "FraudAuditBacklogGrowing",
        "FraudAuditDecisionsDropped",
        "FraudAuditWriterStalled",
        "FraudAuditDeadLetters",
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


def test_audit_backlog_is_not_added_up_across_the_two_processes_of_a_pod():
    """Predictor and writer both export fraud_audit_spool_backlog for the same spool: every query
    must take the larger per pod (max by pod), never sum the two."""
    rules = yaml.safe_load((PROJECT_ROOT / "manifests" / "prometheusrule.yaml").read_text())
    exprs = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    dashboard = json.loads((PROJECT_ROOT / "manifests" / "fraud-detector-dashboard.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    per_pod = re.compile(r"max by \([^)]*\bpod\b[^)]*\) \((?:deriv\()?fraud_audit_spool_backlog\b")
    reading = [e for e in exprs if "fraud_audit_spool_backlog" in e]
    assert len(reading) >= 2  # the backlog alert and the dashboard panel
    for expr in reading:
        assert len(per_pod.findall(expr)) == expr.count("fraud_audit_spool_backlog"), expr
    assert not per_pod.search("sum by (namespace) (fraud_audit_spool_backlog) > 1000")  # the check bites


# ------------------------------------------------------------------------- audit trail wiring

AUDIT_WRITER = "audit-writer"
AUDIT_DB_CA_FILE = "/etc/fraud/postgres-ca/ca.crt"
#: Knative's queue-proxy answers the preStop hook (/wait-for-drain) that Knative gives every user
#: container only after 30 s without a request (knative/serving cmd/queue drainSleepDuration)
KNATIVE_DRAIN_SECONDS = 30
#: Knative's default revision timeout (config-defaults revision-timeout-seconds) when none is set
KNATIVE_DEFAULT_TIMEOUT_SECONDS = 300
#: container fields Knative Serving accepts (pkg/apis/serving/fieldmask.go ContainerMask); anything
#: else (restartPolicy, lifecycle, startupProbe, ...) is rejected by its webhook
KNATIVE_CONTAINER_FIELDS = {
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy", "livenessProbe",
    "ports", "readinessProbe", "resources", "securityContext", "terminationMessagePath",
    "terminationMessagePolicy", "volumeMounts",
}  # fmt: skip
#: measured: 2.05 kB of spool file per decision (16 features, 3 reason codes, full-precision floats)
SPOOL_BYTES_PER_DECISION = 2_560
#: room for the WAL (the spool caps it at 64 MiB after checkpoints) and the dead letters
SPOOL_OVERHEAD_BYTES = 128 * 2**20
_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(value: str) -> int:
    match = _QUANTITY.match(str(value))
    assert match, f"unsupported quantity {value!r}"
    return int(match.group(1)) * _UNITS[match.group(2)]


def env_entry(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def arg_value(container: dict, option: str) -> str | None:
    args = container.get("args", [])
    return args[args.index(option) + 1] if option in args else None


def mount_holding(container: dict, path: str) -> dict | None:
    """The volume mount a file path lives on (the deepest mount containing it)."""
    candidates = [m for m in container.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])]
    return max(candidates, key=lambda m: len(m["mountPath"]), default=None)


def knative_problems(component: dict) -> list[str]:
    """What Knative Serving's webhook (Serverless mode) would reject in a component's pod spec,
    although the KServe CRD schema accepts it."""
    problems = []
    if component.get("initContainers"):
        problems.append(
            "initContainers: off by default in Knative (kubernetes.podspec-init-containers), and Knative "
            "accepts no restartPolicy (native sidecar) nor probes on them"
        )
    if "terminationGracePeriodSeconds" in component:
        problems.append("terminationGracePeriodSeconds is rejected by Knative: the grace period is the timeout")
    containers = component.get("containers", [])
    if len(containers) > 1 and sum(len(c.get("ports", [])) for c in containers) != 1:
        problems.append("Knative allows exactly one port across all containers (the serving container's)")
    for container in containers:
        extra = set(container) - KNATIVE_CONTAINER_FIELDS
        if extra:
            problems.append(f"container {container.get('name')}: fields Knative rejects: {sorted(extra)}")
        if len(containers) > 1 and not container.get("ports"):
            probes = sorted({"livenessProbe", "readinessProbe"} & set(container))
            if probes:
                problems.append(
                    f"container {container.get('name')}: Knative rejects probes {probes} on a non-serving container"
                )
    return problems


def audit_database_problems(container: dict, role_secret: str, what: str, volumes: list[dict]) -> list[str]:
    """The audit database of a container: host, name and TLS from the fraud-audit-db ConfigMap
    (verify-full, CA mounted from the fraud-postgres-ca Secret), user and password from the Secret
    of its own role, no URL with a password in it."""
    problems = []
    if env_entry(container, "FRAUD_AUDIT_DB_URL") is not None:
        url = env_entry(container, "FRAUD_AUDIT_DB_URL").get("value", "")
        kind = "SQLite, not PostgreSQL" if url.startswith("sqlite") else "a URL whose password breaks on @ or /"
        problems.append(f"{what} has FRAUD_AUDIT_DB_URL: {kind}; use the fraud-audit-db settings")
    if {"configMapRef": {"name": "fraud-audit-db"}} not in container.get("envFrom", []):
        problems.append(f"{what} does not read the fraud-audit-db ConfigMap")
    for name, key in (("FRAUD_AUDIT_DB_USER", "username"), ("FRAUD_AUDIT_DB_PASSWORD", "password")):
        ref = (env_entry(container, name) or {}).get("valueFrom", {}).get("secretKeyRef")
        if ref != {"name": role_secret, "key": key}:
            problems.append(f"{what}: {name} does not come from the {role_secret} Secret (the role's password)")
    mount = mount_holding(container, AUDIT_DB_CA_FILE)
    source = next((v for v in volumes if mount and v["name"] == mount["name"]), {})
    if source.get("secret", {}).get("secretName") != "fraud-postgres-ca":
        problems.append(f"{what} has no fraud-postgres-ca CA certificate at {AUDIT_DB_CA_FILE} (verify-full)")
    return problems


def audit_wiring_problems(isvc_doc: dict) -> list[str]:
    """Everything that would stop the predictor pod from auditing every decision durably and safely."""
    component = isvc_doc["spec"]["predictor"]
    containers = component.get("containers", [])
    problems = knative_problems(component)
    if [c.get("name") for c in containers[:1]] != ["kserve-container"]:
        problems.append("containers/0 is not kserve-container (overlays and the rollout patch containers/0)")
    writers = [c for c in containers if c.get("name") == AUDIT_WRITER]
    if len(writers) != 1:
        return [*problems, f"no {AUDIT_WRITER} container next to the predictor"]
    predictor, writer = named_container(component, "kserve-container"), writers[0]
    volumes = {v["name"]: v for v in component.get("volumes", [])}

    # the predictor spools, and does not drain in-process
    spool_env = env_entry(predictor, "FRAUD_AUDIT_SPOOL")
    spool = (spool_env or {}).get("value") or arg_value(predictor, "--audit-spool")
    if not spool:
        return [*problems, "predictor has no FRAUD_AUDIT_SPOOL: auditing is off"]
    if env_entry(predictor, "FRAUD_AUDIT_DB_URL") or arg_value(predictor, "--audit-db-url"):
        problems.append("predictor gets an audit database: it would drain the spool in-process (GIL) too")
    predictor_mount = mount_holding(predictor, spool)
    if predictor_mount is None:
        return [*problems, f"predictor spool {spool} is on the container's root filesystem"]

    # the writer drains the same file on the same volume
    if writer.get("command") != ["fraud", "audit", "writer"]:
        problems.append(f"{AUDIT_WRITER} command is {writer.get('command')}, not fraud audit writer")
    writer_env_spool = (env_entry(writer, "FRAUD_AUDIT_SPOOL") or {}).get("value")
    writer_spool = arg_value(writer, "--spool") or writer_env_spool
    if writer_spool != spool or writer_env_spool not in (None, spool):
        problems.append(f"{AUDIT_WRITER} drains spool {writer_spool}, the predictor writes {spool}")
    writer_mount = mount_holding(writer, writer_spool or spool)
    if writer_mount is None:
        problems.append(f"{AUDIT_WRITER} has no volume at its spool path (read-only root filesystem)")
    elif writer_mount["name"] != predictor_mount["name"]:
        problems.append(f"{AUDIT_WRITER} mounts a different volume at the spool path than the predictor")
    elif writer_mount["mountPath"] != predictor_mount["mountPath"]:
        problems.append(f"{AUDIT_WRITER} mounts the spool volume at another path")
    if predictor_mount.get("readOnly") or (writer_mount or {}).get("readOnly"):
        problems.append("the spool volume is mounted read-only")
    volume = volumes.get(predictor_mount["name"], {})
    if "emptyDir" not in volume or "sizeLimit" not in volume["emptyDir"]:
        problems.append(f"spool volume {predictor_mount['name']} is not an emptyDir with a sizeLimit")
    else:
        max_records = int(arg_value(predictor, "--audit-spool-max-records") or 200_000)
        needed = max_records * SPOOL_BYTES_PER_DECISION + SPOOL_OVERHEAD_BYTES
        if quantity_bytes(volume["emptyDir"]["sizeLimit"]) < needed:
            problems.append(
                f"spool sizeLimit {volume['emptyDir']['sizeLimit']} < {needed / 2**20:.0f} MiB for {max_records} "
                "decisions: the kubelet evicts the pod, spool included"
            )

    # the writer: same image, database from a Secret, no migration race, metrics, hardening
    if writer.get("image") != predictor.get("image"):
        problems.append(f"{AUDIT_WRITER} image {writer.get('image')} differs from the predictor's")
    if "--migrate" in writer.get("args", []):
        problems.append("--migrate in the writer: replicas would migrate concurrently (the Job migrates)")
    if "--db-url" in writer.get("args", []):
        problems.append("--db-url on the writer's command line: the URL carries the password")
    problems += audit_database_problems(writer, "fraud-audit-writer", AUDIT_WRITER, component.get("volumes", []))
    if arg_value(writer, "--metrics-port") is None:
        problems.append(f"{AUDIT_WRITER} serves no /metrics (--metrics-port)")
    security = writer.get("securityContext", {})
    if not (
        security.get("runAsNonRoot") is True
        and security.get("readOnlyRootFilesystem") is True
        and security.get("allowPrivilegeEscalation") is False
        and "ALL" in security.get("capabilities", {}).get("drop", [])
    ):
        problems.append(f"{AUDIT_WRITER} is not hardened like the other containers: {security}")
    resources = writer.get("resources", {})
    if not all({"cpu", "memory"} <= set(resources.get(kind, {})) for kind in ("requests", "limits")):
        problems.append(f"{AUDIT_WRITER} has no cpu/memory requests and limits")
    tmp = mount_holding(writer, "/tmp/x")
    if tmp is None or tmp["mountPath"] != "/tmp" or (env_entry(writer, "TMPDIR") or {}).get("value") != "/tmp":
        problems.append(f"{AUDIT_WRITER} has no writable /tmp (read-only root filesystem)")

    # shutdown: the grace period (= Knative revision timeout) covers the drain and the final flush
    from fraud.audit.writer import WriterSettings

    grace = component.get("timeout", KNATIVE_DEFAULT_TIMEOUT_SECONDS)
    if grace < KNATIVE_DRAIN_SECONDS + WriterSettings().flush_timeout + 5:
        problems.append(
            f"predictor timeout {grace}s (= the pod's grace period) is shorter than the queue-proxy drain "
            f"({KNATIVE_DRAIN_SECONDS}s) + the writer's flush ({WriterSettings().flush_timeout:.0f}s)"
        )
    return problems


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_predictor_pod_audits_every_decision(overlay):
    assert audit_wiring_problems(isvc(overlay)) == []


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_pass_knative_rules(overlay):
    spec = isvc(overlay)["spec"]
    assert knative_problems(spec["predictor"]) == [] and knative_problems(spec["transformer"]) == []


def _writer(doc: dict) -> dict:
    return named_container(doc["spec"]["predictor"], AUDIT_WRITER)


def _predictor(doc: dict) -> dict:
    return named_container(doc["spec"]["predictor"], "kserve-container")


def _other_volume(doc: dict) -> None:
    doc["spec"]["predictor"]["volumes"].append({"name": "other-spool", "emptyDir": {"sizeLimit": "1Gi"}})
    (mount,) = [m for m in _writer(doc)["volumeMounts"] if m["name"] == "audit-spool"]
    mount["name"] = "other-spool"


def _set_arg(container: dict, option: str, value: str) -> None:
    args = container["args"]
    args[args.index(option) + 1] = value


def _native_sidecar(doc: dict) -> None:
    component = doc["spec"]["predictor"]
    writer = _writer(doc)
    component["containers"].remove(writer)
    component["initContainers"] = [{**writer, "restartPolicy": "Always"}]


def _swap(doc: dict) -> None:
    component = doc["spec"]["predictor"]
    component["containers"].reverse()


MISTAKES = {
    "writer-mounts-another-volume": (_other_volume, "different volume"),
    "writer-mounts-elsewhere": (
        lambda d: next(m for m in _writer(d)["volumeMounts"] if m["name"] == "audit-spool").update(
            mountPath="/var/lib/other"
        ),
        "no volume at its spool path",
    ),
    "writer-drains-another-file": (
        lambda d: _set_arg(_writer(d), "--spool", "/var/lib/fraud-audit/other.db"),
        "drains spool",
    ),
    "auditing-off": (lambda d: _predictor(d)["env"].remove(env_entry(_predictor(d), "FRAUD_AUDIT_SPOOL")), "off"),
    "spool-on-root-fs": (
        lambda d: env_entry(_predictor(d), "FRAUD_AUDIT_SPOOL").update(value="/data/spool.db"),
        "root filesystem",
    ),
    "literal-password": (
        lambda d: _writer(d)["env"].append({"name": "FRAUD_AUDIT_DB_URL", "value": "postgresql://f:hunter2@pg/f"}),
        "password",
    ),
    "sqlite-audit-db": (
        lambda d: _writer(d)["env"].append({"name": "FRAUD_AUDIT_DB_URL", "value": "sqlite:////tmp/audit.db"}),
        "not PostgreSQL",
    ),
    "writer-as-the-migration-role": (
        lambda d: env_entry(_writer(d), "FRAUD_AUDIT_DB_PASSWORD")["valueFrom"]["secretKeyRef"].update(
            name="fraud-audit-migrator"
        ),
        "fraud-audit-writer Secret",
    ),
    "no-database-ca": (
        lambda d: _writer(d)["volumeMounts"].remove(
            next(m for m in _writer(d)["volumeMounts"] if m["name"] == "postgres-ca")
        ),
        "fraud-postgres-ca",
    ),
    "writers-migrate": (lambda d: _writer(d)["args"].append("--migrate"), "--migrate"),
    "predictor-drains-in-process": (
        lambda d: _predictor(d)["env"].append({"name": "FRAUD_AUDIT_DB_URL", "value": "postgresql://x@y/z"}),
        "in-process",
    ),
    "writer-writable-root": (
        lambda d: _writer(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "not hardened",
    ),
    "writer-other-image": (lambda d: _writer(d).update(image="ghcr.io/fraud-platform/fraud-core:0.0.9"), "image"),
    "native-sidecar": (_native_sidecar, "initContainers"),
    "writer-declares-its-port": (lambda d: _writer(d).update(ports=[{"containerPort": 9109}]), "one port"),
    "writer-probed": (
        lambda d: _writer(d).update(livenessProbe={"tcpSocket": {"port": 9109}}),
        "probes",
    ),
    "grace-shorter-than-drain": (lambda d: d["spec"]["predictor"].update(timeout=10), "grace period"),
    "spool-volume-too-small": (
        lambda d: next(v for v in d["spec"]["predictor"]["volumes"] if v["name"] == "audit-spool")["emptyDir"].update(
            sizeLimit="256Mi"
        ),
        "sizeLimit",
    ),
    "writer-first": (_swap, "containers/0"),
}


@needs_kubectl
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_audit_wiring_check_catches_mistakes(mistake):
    mutate, expected = MISTAKES[mistake]
    broken = copy.deepcopy(isvc("staging"))
    mutate(broken)
    problems = audit_wiring_problems(broken)
    assert any(expected in problem for problem in problems), problems


@needs_kubectl
@needs_crd
def test_a_native_sidecar_passes_the_kserve_crd_but_not_knative(crd_validator):
    """Why the writer is a regular container: the CRD (KServe's PodSpec) accepts an init container
    with restartPolicy: Always, the Serverless backend (Knative) does not."""
    native = copy.deepcopy(isvc("prod"))
    _native_sidecar(native)
    assert crd_validator.issues(native) == []
    assert any("initContainers" in p for p in knative_problems(native["spec"]["predictor"]))


@needs_crd
def test_python_built_inference_service_audits_like_the_manifests(crd_validator):
    """`fraud deploy` creates the InferenceService from Python when it is absent: the same audit
    wiring as manifests/inferenceservice.yaml, or a first deployment would not audit."""
    from fraud.deploy.kserve_rollout import build_inference_service
    from fraud.deploy.overlay import load_inference_service

    built = build_inference_service(load_inference_service("dev"), "fraud-dev", "7", "s3://bucket/7/bundle")
    assert crd_validator.issues(built) == []
    assert audit_wiring_problems(built) == []
    manifest = yaml.safe_load((PROJECT_ROOT / "manifests" / "inferenceservice.yaml").read_text())

    def without_image(c):
        return {k: v for k, v in c.items() if k != "image"}

    assert without_image(_writer(built)) == without_image(_writer(manifest))
    assert _writer(built)["image"] == _predictor(built)["image"]

    def audit_env(c):
        return [e for e in c["env"] if e["name"].startswith("FRAUD_AUDIT")]

    assert audit_env(_predictor(built)) == audit_env(_predictor(manifest)) != []

    def audit_volumes(d):
        return [v for v in d["spec"]["predictor"]["volumes"] if v["name"].startswith("audit")]

    assert audit_volumes(built) == audit_volumes(manifest) != []
    assert arg_value(_predictor(built), "--audit-spool-max-records") == arg_value(
        _predictor(manifest), "--audit-spool-max-records"
    )


def _job_container(doc: dict) -> dict:
    template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else doc["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return container


def _job_volumes(doc: dict) -> list[dict]:
    template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else doc["spec"]["template"]
    return template["spec"].get("volumes", [])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_audit_database_each_workload_with_its_own_role(overlay):
    (cronjob,) = of_kind(overlay, "CronJob")
    (job,) = of_kind(overlay, "Job")
    problems = [
        *audit_database_problems(_job_container(job), "fraud-audit-migrator", "migration", _job_volumes(job)),
        *audit_database_problems(_job_container(cronjob), "fraud-audit-reader", "retraining", _job_volumes(cronjob)),
        *audit_database_problems(
            _writer(isvc(overlay)), "fraud-audit-writer", "writer", isvc(overlay)["spec"]["predictor"]["volumes"]
        ),
    ]
    assert problems == []
    settings = configmap(overlay, "fraud-audit-db")
    assert settings["FRAUD_AUDIT_DB_SSLMODE"] == "verify-full"
    assert settings["FRAUD_AUDIT_DB_SSLROOTCERT"] == AUDIT_DB_CA_FILE
    assert settings["FRAUD_AUDIT_DB_HOST"] == f"postgres.fraud-{overlay}.svc.cluster.local"
    # the Job grants exactly the roles whose Secrets the writer and the retraining check log in with
    migrate = _job_container(job)
    writer_role = env_entry(migrate, "FRAUD_AUDIT_WRITER_ROLE")["valueFrom"]["secretKeyRef"]
    reader_role = env_entry(migrate, "FRAUD_AUDIT_READER_ROLE")["valueFrom"]["secretKeyRef"]
    assert (writer_role, reader_role) == (
        {"name": "fraud-audit-writer", "key": "username"},
        {"name": "fraud-audit-reader", "key": "username"},
    )
    assert arg_value(migrate, "--writer-role") == "$(FRAUD_AUDIT_WRITER_ROLE)"
    assert arg_value(migrate, "--reader-role") == "$(FRAUD_AUDIT_READER_ROLE)"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_schema_is_migrated_by_exactly_one_job(overlay):
    (job,) = of_kind(overlay, "Job")
    spec = job["spec"]
    assert spec["parallelism"] == 1 and spec["completions"] == 1  # one migrator at a time
    assert spec["ttlSecondsAfterFinished"] > 0  # re-created by the next apply (templates are immutable)
    assert spec["backoffLimit"] >= 3  # PostgreSQL may come up after the Job
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(overlay, "ServiceAccount")}
    assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False
    bound = [s["name"] for d in of_kind(overlay, "RoleBinding") for s in d["subjects"]]
    assert pod["serviceAccountName"] not in bound
    container = _job_container(job)
    assert container["command"] == ["fraud", "audit", "migrate"]
    assert container["image"] == _predictor(isvc(overlay))["image"]  # same migrations as the writers
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    # nobody else migrates
    assert all("--migrate" not in c.get("args", []) for c in isvc(overlay)["spec"]["predictor"]["containers"])


@needs_kubectl
def test_network_policies_let_the_audit_writer_work():
    policy = next(p["spec"] for p in of_kind("prod", "NetworkPolicy") if p["metadata"]["name"] == "fraud-predictor")
    writer = _writer(isvc("prod"))
    db_port = int(configmap("prod", "fraud-audit-db")["FRAUD_AUDIT_DB_PORT"])
    egress = [port["port"] for rule in policy["egress"] for port in rule.get("ports", []) if rule.get("to")]
    assert db_port in egress
    metrics_port = int(arg_value(writer, "--metrics-port"))
    monitoring = [
        port["port"]
        for rule in policy["ingress"]
        if {"kubernetes.io/metadata.name": "monitoring"}
        in [p.get("namespaceSelector", {}).get("matchLabels") for p in rule["from"]]
        for port in rule["ports"]
    ]
    assert metrics_port in monitoring


#: PodMonitor fields used here, as the prometheus-operator CRD (monitoring.coreos.com/v1) defines them
PODMONITOR_SPEC_FIELDS = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels"}
PODMONITOR_ENDPOINT_FIELDS = {"path", "port", "portNumber", "interval", "scrapeTimeout", "scheme", "relabelings"}
RELABEL_FIELDS = {"action", "sourceLabels", "regex", "targetLabel", "replacement", "separator", "modulus"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_audit_writer(overlay):
    (monitor,) = of_kind(overlay, "PodMonitor")
    spec = monitor["spec"]
    assert set(spec) <= PODMONITOR_SPEC_FIELDS
    policy = next(p["spec"] for p in of_kind(overlay, "NetworkPolicy") if p["metadata"]["name"] == "fraud-predictor")
    assert spec["selector"]["matchLabels"] == policy["podSelector"]["matchLabels"]  # the predictor pods
    assert "namespaceSelector" not in spec  # its own namespace
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= PODMONITOR_ENDPOINT_FIELDS and endpoint["path"] == "/metrics"
    assert not {"port", "portNumber"} & set(endpoint)  # the writer's port is undeclared (Knative: one port)
    relabel = endpoint["relabelings"]
    assert all(set(r) <= RELABEL_FIELDS for r in relabel)
    keep, address = relabel
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__meta_kubernetes_pod_container_name"]
    assert re.fullmatch(keep["regex"], AUDIT_WRITER) and not re.fullmatch(keep["regex"], "kserve-container")
    assert address["sourceLabels"] == ["__meta_kubernetes_pod_ip"] and address["targetLabel"] == "__address__"
    port = int(arg_value(_writer(isvc(overlay)), "--metrics-port"))
    assert re.sub(address["regex"], address["replacement"].replace("$1", r"\1"), "10.1.2.3") == f"10.1.2.3:{port}"


# ------------------------------------------------------------------------------ security

ISTIO_SCHEMAS = SHARED / "schemas" / "istio"
ISTIO_SCHEMA_FILES = {
    "RequestAuthentication": ("requestauthentication_v1.json", "requestauthentications"),
    "AuthorizationPolicy": ("authorizationpolicy_v1.json", "authorizationpolicies"),
    "PeerAuthentication": ("peerauthentication_v1.json", "peerauthentications"),
}
needs_istio_schemas = pytest.mark.skipif(
    not ISTIO_SCHEMAS.is_dir(), reason=f"{ISTIO_SCHEMAS} is absent: no Istio schema to validate against"
)
SCORING_PATHS = {"/v1/models/fraud-detector:predict", "/v2/models/fraud-detector/infer"}
#: what the transformer GETs from the predictor: its readiness (--enable_predictor_health_check), its metadata
TRANSFORMER_READS = {"/v2", "/v2/models/fraud-detector", "/v2/health/ready", "/v2/models/fraud-detector/ready"}


@cache
def istio_validator(kind: str):
    """Strict validator of one Istio kind from its published v1 schema (unknown field = error)."""
    from tests.support.kserve_crd import json_schema_validator

    file, plural = ISTIO_SCHEMA_FILES[kind]
    return json_schema_validator(
        ISTIO_SCHEMAS / file, group="security.istio.io", version="v1", kind=kind, plural=plural
    )


def named_doc(overlay: str, kind: str, name: str) -> dict:
    (found,) = [d for d in of_kind(overlay, kind) if d["metadata"]["name"] == name]
    return found


@needs_kubectl
@needs_istio_schemas
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_istio_objects_are_valid_against_their_schemas(overlay):
    checked = 0
    for kind in ISTIO_KINDS:
        for doc in of_kind(overlay, kind):
            assert istio_validator(kind).issues(doc) == [], doc["metadata"]["name"]
            checked += 1
    assert checked == 5


@needs_kubectl
@needs_istio_schemas
@pytest.mark.parametrize(
    ("kind", "name", "mutate", "where"),
    [
        (
            "RequestAuthentication",
            "fraud-jwt",
            lambda d: d["spec"]["jwtRules"][0].__setitem__("jwks_url", "x"),
            "jwks_url",
        ),
        (
            "RequestAuthentication",
            "fraud-jwt",
            lambda d: d["spec"]["jwtRules"][0]["outputClaimToHeaders"][0].__setitem__("header", "x fraud scopes"),
            "outputClaimToHeaders",
        ),
        ("AuthorizationPolicy", "fraud-scoring", lambda d: d["spec"].__setitem__("action", "PERMIT"), "action"),
        (
            "AuthorizationPolicy",
            "fraud-scoring",
            lambda d: d["spec"]["rules"][0]["from"][0]["source"].__setitem__("requestPrincipal", ["x"]),
            "requestPrincipal",
        ),
        ("PeerAuthentication", "default", lambda d: d["spec"]["mtls"].__setitem__("mode", "STRICTEST"), "mode"),
    ],
    ids=["misspelt-jwks", "bad-header-name", "bad-action", "misspelt-principal", "bad-mtls-mode"],
)
def test_istio_schema_validation_rejects_mistakes(kind, name, mutate, where):
    broken = copy.deepcopy(named_doc("prod", kind, name))
    mutate(broken)
    issues = istio_validator(kind).issues(broken)
    assert any(where in str(issue) for issue in issues), issues


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_mesh_authenticates_and_authorises_every_request(overlay):
    namespace = f"fraud-{overlay}"
    serving = {"serving.kserve.io/inferenceservice": "fraud-detector"}
    (peer,) = of_kind(overlay, "PeerAuthentication")
    assert peer["spec"] == {"mtls": {"mode": "STRICT"}}  # namespace-wide, no port exceptions
    (jwt,) = of_kind(overlay, "RequestAuthentication")
    assert jwt["spec"]["selector"]["matchLabels"] == serving
    (rule,) = jwt["spec"]["jwtRules"]
    assert rule["issuer"].startswith("https://") and "invalid" not in rule["issuer"]
    assert rule["jwksUri"].startswith(rule["issuer"]) and rule["audiences"]
    assert {"header": "x-fraud-scopes", "claim": "scope"} in rule["outputClaimToHeaders"]
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(overlay, "AuthorizationPolicy")}
    assert policies["fraud-deny-all"] == {"action": "ALLOW"}  # no rule: matches nothing, denies all
    scoring = policies["fraud-scoring"]
    assert scoring["selector"]["matchLabels"] == serving and scoring["action"] == "ALLOW"
    for allowed in scoring["rules"]:
        (source,) = [peer["source"] for peer in allowed["from"]]
        operations = [op["operation"] for op in allowed["to"]]
        paths = {p for op in operations for p in op["paths"]}
        assert all(op.get("methods") for op in operations), "every rule names its methods"
        assert not any("*" in p for p in paths), paths
        if paths & SCORING_PATHS:
            posts = [op for op in operations if op["methods"] == ["POST"]]
            assert {p for op in posts for p in op["paths"]} == SCORING_PATHS
            reads = [op for op in operations if op not in posts]
            assert bool(reads) == ("principals" in source), "the transformer, and only it, reads readiness"
            if reads:  # the transformer reads the predictor's readiness and metadata, nothing else
                assert "principals" in source and all(op["methods"] == ["GET"] for op in reads)
                assert {p for op in reads for p in op["paths"]} <= TRANSFORMER_READS
            named = source.get("requestPrincipals") or source.get("principals")
            assert named and not any("*" in n for n in named), named  # named callers only
            assert set(source) <= {"requestPrincipals", "principals"}
            if "requestPrincipals" in source:
                assert all(n.startswith(rule["issuer"] + "/") for n in named)
            else:
                assert named == [f"cluster.local/ns/{namespace}/sa/fraud-predictor"]
        elif source == {"namespaces": ["monitoring"]}:
            assert operations == [{"methods": ["GET"], "paths": ["/metrics"]}]  # /metrics and nothing else
        else:
            assert source == {"namespaces": ["knative-serving"]}
            assert all(op["methods"] == ["GET"] for op in operations)
    forged = policies["fraud-no-forged-scopes"]
    assert forged["action"] == "DENY" and forged["selector"]["matchLabels"] == serving
    keys = [c["key"] for r in forged["rules"] for c in r["when"]]
    assert keys.count("request.headers[x-fraud-scopes]") == len(forged["rules"]) == 2
    assert forged["rules"][0]["from"][0]["source"]["notRequestPrincipals"] == ["*"]
    assert forged["rules"][0]["from"][0]["source"]["notPrincipals"] == [
        f"cluster.local/ns/{namespace}/sa/fraud-predictor"
    ]


@needs_kubectl
def test_environments_trust_their_own_issuers_and_callers():
    issuers = {o: of_kind(o, "RequestAuthentication")[0]["spec"]["jwtRules"][0]["issuer"] for o in OVERLAYS}
    assert len(set(issuers.values())) == len(OVERLAYS)
    callers = {
        o: tuple(
            named_doc(o, "AuthorizationPolicy", "fraud-scoring")["spec"]["rules"][0]["from"][0]["source"][
                "requestPrincipals"
            ]
        )
        for o in OVERLAYS
    }
    assert len(set(callers.values())) == len(OVERLAYS)


def _pod_specs(overlay: str) -> list[tuple[str, dict]]:
    """(what, pod spec) of every workload of an overlay, the InferenceService's components included."""
    pods = [(f"isvc/{c}", isvc(overlay)["spec"][c]) for c in ("predictor", "transformer")]
    for doc in of_kind(overlay, "Job"):
        pods.append((f"job/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    for doc in of_kind(overlay, "CronJob"):
        pods.append((f"cronjob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return pods


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_under_the_runtime_default_seccomp_profile(overlay):
    """Pod Security Standard `restricted` (the namespaces enforce it): every container, the
    InferenceService's included, is RuntimeDefault (set per container: Knative accepts it there)."""
    unconfined = []
    for what, pod in _pod_specs(overlay):
        pod_profile = pod.get("securityContext", {}).get("seccompProfile", {}).get("type")
        for container in pod["containers"] + pod.get("initContainers", []):
            profile = container.get("securityContext", {}).get("seccompProfile", {}).get("type", pod_profile)
            if profile != "RuntimeDefault":
                unconfined.append(f"{what}/{container['name']}")
    assert unconfined == []
    (namespace,) = of_kind(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _peers(policy: dict) -> list[dict]:
    rules = policy["spec"].get("ingress", []) + policy["spec"].get("egress", [])
    return [peer for rule in rules for peer in rule.get("from", []) + rule.get("to", [])]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_name_every_peer(overlay):
    policies = {p["metadata"]["name"]: p for p in of_kind(overlay, "NetworkPolicy")}
    deny = policies["fraud-default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, policy in policies.items():
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule without destinations allows every address"
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without sources allows every peer"
        for peer in _peers(policy):
            if "namespaceSelector" in peer:
                labels = peer["namespaceSelector"].get("matchLabels", {})
                assert list(labels) == ["kubernetes.io/metadata.name"], f"{name}: namespace not named: {peer}"
            if "ipBlock" in peer:
                network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                assert network.prefixlen >= 8 and not network.is_global, f"{name}: {network} is not a named range"
                assert network != ipaddress.ip_network("192.0.2.0/24"), f"{name}: the placeholder CIDR"
    # every workload is covered by a policy of its own (plus the DNS one)
    selected = [p["spec"]["podSelector"].get("matchLabels", {}) for p in policies.values()]
    for labels in (
        {"serving.kserve.io/inferenceservice": "fraud-detector", "component": "predictor"},
        {"serving.kserve.io/inferenceservice": "fraud-detector", "component": "transformer"},
        {"app.kubernetes.io/name": "fraud-audit-migrate"},
        {"app.kubernetes.io/name": "fraud-monitor"},
    ):
        assert labels in selected, labels


@needs_kubectl
def test_egress_ranges_and_redis_namespace_are_overlay_parameters():
    def cidrs(overlay: str) -> tuple[str, ...]:
        policy = named_doc(overlay, "NetworkPolicy", "fraud-object-store-egress")
        return tuple(peer["ipBlock"]["cidr"] for peer in policy["spec"]["egress"][0]["to"])

    assert len({cidrs(o) for o in OVERLAYS}) == len(OVERLAYS)
    for overlay in OVERLAYS:
        predictor = named_doc(overlay, "NetworkPolicy", "fraud-predictor")
        (redis,) = [r for r in predictor["spec"]["egress"] if any(p["port"] == 6379 for p in r["ports"])]
        namespace = redis["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        host = configmap(overlay, "fraud-serving-config")["FRAUD_REDIS_HOST"]
        assert host.split(".")[1] == namespace  # the policy lets the predictor reach the Redis it is configured with


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_pods_survive_drains_and_node_loss(overlay):
    budgets = {p["metadata"]["name"]: p["spec"] for p in of_kind(overlay, "PodDisruptionBudget")}
    for component in ("predictor", "transformer"):
        labels = {"serving.kserve.io/inferenceservice": "fraud-detector", "component": component}
        budget = budgets[f"fraud-{component}"]
        assert budget["selector"]["matchLabels"] == labels and budget["maxUnavailable"] == 1
        spread = isvc(overlay)["spec"][component]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(c["labelSelector"]["matchLabels"] == labels and c["maxSkew"] == 1 for c in spread)
    assert "kubernetes.podspec-topologyspreadconstraints" in (PROJECT_ROOT / "docs" / "security.md").read_text()


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_deploy_step_may_create_or_patch_inference_services(overlay):
    writers = set()
    for role in of_kind(overlay, "Role"):
        for rule in role["rules"]:
            if "inferenceservices" in rule["resources"] and {"create", "patch", "update", "*"} & set(rule["verbs"]):
                writers.add(role["metadata"]["name"])
    assert writers == {"fraud-deployer"}
    subjects = [s for b in of_kind(overlay, "RoleBinding") if b["roleRef"]["name"] in writers for s in b["subjects"]]
    assert [(s["kind"], s["name"]) for s in subjects] == [("ServiceAccount", "fraud-deployer")]
    assert not of_kind(overlay, "ClusterRoleBinding") and not of_kind(overlay, "ClusterRole")
    serving = {isvc(overlay)["spec"][c]["serviceAccountName"] for c in ("predictor", "transformer")}
    assert "fraud-deployer" not in serving


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_reach_only_the_containers_that_use_them(overlay):
    def secrets(container: dict) -> set[str]:
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        return refs | {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}

    spec = isvc(overlay)["spec"]
    assert secrets(_predictor(isvc(overlay))) == {"fraud-redis"}  # no PostgreSQL, no MLflow password
    assert secrets(_writer(isvc(overlay))) == {"fraud-audit-writer", "fraud-audit-chain"}
    assert secrets(spec["transformer"]["containers"][0]) == set()
    (job,) = of_kind(overlay, "Job")
    assert secrets(_job_container(job)) == {"fraud-audit-migrator", "fraud-audit-writer", "fraud-audit-reader"}
    migrate_keys = {e["valueFrom"]["secretKeyRef"]["name"]: e["valueFrom"]["secretKeyRef"]["key"]
                    for e in _job_container(job)["env"] if "secretKeyRef" in e.get("valueFrom", {})
                    and e["valueFrom"]["secretKeyRef"]["name"] != "fraud-audit-migrator"}  # fmt: skip
    assert set(migrate_keys.values()) == {"username"}  # only the other roles' names, never their passwords
    (cronjob,) = of_kind(overlay, "CronJob")
    assert secrets(_job_container(cronjob)) == {"fraud-audit-reader", "fraud-mlflow"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_connections_to_the_stores_are_tls_verified(overlay):
    serving = configmap(overlay, "fraud-serving-config")
    assert serving["MLFLOW_TRACKING_URI"].startswith("https://")
    assert serving["FRAUD_REDIS_TLS"] == "true"
    predictor = _predictor(isvc(overlay))
    mount = mount_holding(predictor, serving["FRAUD_REDIS_CA_CERT"])
    volumes = {v["name"]: v for v in isvc(overlay)["spec"]["predictor"]["volumes"]}
    assert mount and volumes[mount["name"]]["secret"]["secretName"] == "fraud-redis-ca"
    (cronjob,) = of_kind(overlay, "CronJob")
    monitor = _job_container(cronjob)
    ca = env_entry(monitor, "MLFLOW_TRACKING_SERVER_CERT_PATH")["value"]
    mount = mount_holding(monitor, ca)
    assert (
        mount
        and {v["name"]: v for v in _job_volumes(cronjob)}[mount["name"]]["secret"]["secretName"] == "fraud-mlflow-ca"
    )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_predictor_learns_the_stable_version_from_the_rollout_state(overlay):
    """A live-updated ConfigMap volume (no subPath), optional so a first deployment starts."""
    predictor = _predictor(isvc(overlay))
    path = env_entry(predictor, "FRAUD_STABLE_VERSION_FILE")["value"]
    mount = mount_holding(predictor, path)
    assert mount is not None and "subPath" not in mount
    volume = {v["name"]: v for v in isvc(overlay)["spec"]["predictor"]["volumes"]}[mount["name"]]
    assert volume["configMap"]["name"] == "fraud-rollout-state" and volume["configMap"]["optional"] is True
    (item,) = volume["configMap"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == path
    assert "fraud-rollout-state" not in {c["metadata"]["name"] for c in of_kind(overlay, "ConfigMap")}  # the rollout's


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_predictor_leaves_rotation_on_its_audit_aware_readiness(overlay):
    from fraud.deploy.kserve_rollout import build_inference_service
    from fraud.deploy.overlay import load_inference_service
    from predictor.__main__ import READINESS_PATH

    assert _predictor(isvc(overlay))["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
    built = build_inference_service(load_inference_service(overlay), "ns", "7", "s3://b/7")
    assert _predictor(built)["readinessProbe"]["httpGet"]["path"] == READINESS_PATH


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_predictor_never_scales_to_zero_behind_a_readiness_checking_transformer(overlay):
    """The transformer is ready only while the predictor is (`--enable_predictor_health_check`): a
    predictor allowed to scale to zero would never be woken, since no request reaches it through a
    transformer that is out of rotation."""
    spec = isvc(overlay)["spec"]
    assert "--enable_predictor_health_check" in named_container(spec["transformer"], "kserve-container")["args"]
    assert spec["predictor"]["minReplicas"] >= 1
    assert spec["transformer"]["minReplicas"] >= 1
