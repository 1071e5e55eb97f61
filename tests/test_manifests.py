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
    "HorizontalPodAutoscaler",
}
CUSTOM_KINDS = {"InferenceService", "PrometheusRule", "PodMonitor"}

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
        "Job",
        "PodMonitor",
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
    assert egress_ports == {53, 6379, 5000, 443, 5432}
    (postgres,) = [rule for rule in predictor["egress"] if any(p["port"] == 5432 for p in rule.get("ports", []))]
    assert [peer["podSelector"]["matchLabels"] for peer in postgres["to"]] == [{"app.kubernetes.io/name": "postgresql"}]
    assert all("namespaceSelector" not in peer for peer in postgres["to"])  # the namespace's own `postgres`


# ----------------------------------------------------------------------- metrics alignment


def _predictor_metric_names() -> set[str]:
    """Sample names the predictor exports, from its real prometheus_client registry."""
    import predictor.metrics  # noqa: F401  (registers the metrics)

    return _registered_names("fraud_predictor_")


def _audit_metric_names() -> set[str]:
    """Sample names of the audit trail (spool side in the predictor, drain side in the writer)."""
    import fraud.audit.metrics  # noqa: F401  (registers the metrics)

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


def resolved_url(container: dict, name: str) -> tuple[str, dict[str, str]]:
    """An env value with its `$(VAR)` references replaced by markers naming their source
    (`secret.<name>.<key>`, `field.<path>`: URL-safe); every reference must be to a variable defined earlier."""
    env = container.get("env", [])
    index = next(i for i, e in enumerate(env) if e["name"] == name)
    sources: dict[str, str] = {}
    for entry in env[:index]:
        source = entry.get("valueFrom", {})
        if "secretKeyRef" in source:
            sources[entry["name"]] = f"secret.{source['secretKeyRef']['name']}.{source['secretKeyRef']['key']}"
        elif "fieldRef" in source:
            sources[entry["name"]] = f"field.{source['fieldRef']['fieldPath']}"
        elif "value" in entry:
            sources[entry["name"]] = entry["value"]
    value = env[index].get("value", "")
    unknown = [ref for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value) if ref not in sources]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: sources.get(m.group(1), m.group(0)), value), {
        "unknown": ",".join(unknown)
    }


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
    if env_entry(writer, "FRAUD_AUDIT_DB_URL") is None:
        problems.append(f"{AUDIT_WRITER} has no FRAUD_AUDIT_DB_URL")
    else:
        from sqlalchemy.engine import make_url

        url_text, meta = resolved_url(writer, "FRAUD_AUDIT_DB_URL")
        url = make_url(url_text)
        if meta["unknown"]:
            problems.append(f"FRAUD_AUDIT_DB_URL references undefined variables {meta['unknown']}")
        if url.get_backend_name() != "postgresql":
            problems.append(f"audit database backend {url.get_backend_name()}, not PostgreSQL")
        if url.password != "secret.fraud-postgres.password":
            problems.append("the audit database password does not come from the fraud-postgres Secret")
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
        lambda d: env_entry(_writer(d), "FRAUD_AUDIT_DB_URL").update(value="postgresql://fraud:hunter2@postgres/fraud"),
        "password",
    ),
    "sqlite-audit-db": (
        lambda d: env_entry(_writer(d), "FRAUD_AUDIT_DB_URL").update(value="sqlite:////tmp/audit.db"),
        "not PostgreSQL",
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
    from fraud.deploy.kserve_rollout import ServingSpec, build_inference_service

    built = build_inference_service(
        "fraud-detector",
        "fraud-dev",
        "7",
        "s3://bucket/7/bundle",
        ServingSpec(core_image="r/core:1", drift_image="r/d:1"),
    )
    assert crd_validator.issues(built) == []
    assert audit_wiring_problems(built) == []
    manifest = yaml.safe_load((PROJECT_ROOT / "manifests" / "inferenceservice.yaml").read_text())
    without_image = lambda c: {k: v for k, v in c.items() if k != "image"}
    assert without_image(_writer(built)) == without_image(_writer(manifest))
    assert _writer(built)["image"] == _predictor(built)["image"] == "r/core:1"
    audit_env = lambda c: [e for e in c["env"] if e["name"].startswith("FRAUD_AUDIT")]
    assert audit_env(_predictor(built)) == audit_env(_predictor(manifest)) != []
    audit_volumes = lambda d: [v for v in d["spec"]["predictor"]["volumes"] if v["name"].startswith("audit")]
    assert audit_volumes(built) == audit_volumes(manifest) != []
    assert arg_value(_predictor(built), "--audit-spool-max-records") == arg_value(
        _predictor(manifest), "--audit-spool-max-records"
    )


def _job_container(doc: dict) -> dict:
    template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else doc["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return container


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_audit_database_for_writer_migration_and_retraining(overlay):
    (cronjob,) = of_kind(overlay, "CronJob")
    (job,) = of_kind(overlay, "Job")
    urls = {
        "writer": resolved_url(_writer(isvc(overlay)), "FRAUD_AUDIT_DB_URL"),
        "migration": resolved_url(_job_container(job), "FRAUD_AUDIT_DB_URL"),
        "retraining check": resolved_url(_job_container(cronjob), "FRAUD_AUDIT_DB_URL"),
    }
    assert len({url for url, _ in urls.values()}) == 1, urls
    assert all(meta["unknown"] == "" for _, meta in urls.values())


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
    assert resolved_url(container, "FRAUD_AUDIT_DB_URL")[0].count("secret.fraud-postgres.password") == 1
    # nobody else migrates
    assert all("--migrate" not in c.get("args", []) for c in isvc(overlay)["spec"]["predictor"]["containers"])


@needs_kubectl
def test_network_policies_let_the_audit_writer_work():
    policy = next(p["spec"] for p in of_kind("prod", "NetworkPolicy") if p["metadata"]["name"] == "fraud-predictor")
    writer = _writer(isvc("prod"))
    url_text, _ = resolved_url(writer, "FRAUD_AUDIT_DB_URL")
    from sqlalchemy.engine import make_url

    db_port = make_url(url_text).port
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
