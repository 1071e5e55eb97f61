"""The velocity aggregator's manifests (manifests/aggregator.yaml): valid Kubernetes for a fixed
version in every overlay, and consistent with the code - the command exists, the probes and the
metrics port are the aggregator's, the HPA scales on the lag gauge the aggregator exports and
never beyond the partition count, the predictor and the aggregator share the stream settings,
and the NetworkPolicy lets Prometheus in and the pod out to Redis only."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from fraud.settings import Settings
from fraud.streaming.aggregator import AggregatorMetrics, AggregatorSettings
from fraud.streaming.events import StreamSettings
from tests.test_manifests import KUBERNETES_VERSION, OVERLAYS, configmap, needs_kubectl, of_kind

NAME = "fraud-velocity-aggregator"


def named(overlay: str, kind: str) -> dict:
    (found,) = [doc for doc in of_kind(overlay, kind) if doc["metadata"]["name"] == NAME]
    return found


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_aggregator_objects_are_valid_kubernetes(overlay):
    import kubernetes_validate

    for kind in ("Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceAccount"):
        kubernetes_validate.validate(named(overlay, kind), KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_runs_the_aggregator_hardened_and_probed(overlay):
    from fraud.cli import app

    pod = named(overlay, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "fraud.cli", "features", "aggregate"]
    args = container["args"]
    port = int(args[args.index("--metrics-port") + 1])
    assert port == AggregatorSettings().metrics_port
    # the command line parses: --help of the same command succeeds and lists every option used
    help_text = CliRunner().invoke(app, ["features", "aggregate", "--help"], env={"COLUMNS": "200"}).output
    assert all(option in help_text for option in args if option.startswith("--"))
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == NAME
    annotations = named(overlay, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    # the Redis password comes from a Secret, the stream settings from the predictor's ConfigMap
    password = next(e for e in container["env"] if e["name"] == "FRAUD_REDIS_PASSWORD")
    assert "secretKeyRef" in password["valueFrom"]
    assert {"fraud-serving-config"} <= {source["configMapRef"]["name"] for source in container["envFrom"]}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_predictor_and_aggregator_share_the_stream(overlay):
    (isvc,) = of_kind(overlay, "InferenceService")
    predictor = isvc["spec"]["predictor"]["containers"][0]
    assert "fraud-serving-config" in {s["configMapRef"]["name"] for s in predictor.get("envFrom", [])}
    data = configmap(overlay, "fraud-serving-config")
    assert data["FRAUD_STREAM_PUBLISH"] == "true"
    settings = StreamSettings.from_settings(Settings.from_env(data))  # the settings both processes read
    assert settings.partitions >= 1 and settings.prefix


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_the_exported_lag_up_to_the_partitions(overlay):
    hpa = named(overlay, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    (metric,) = hpa["metrics"]
    exported = {m.name for m in AggregatorMetrics(CollectorRegistry()).registry.collect()}
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] in exported
    partitions = StreamSettings.from_settings(Settings.from_env(configmap(overlay, "fraud-serving-config"))).partitions
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"] <= partitions


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_prometheus_and_reaches_only_dns_and_redis(overlay):
    policy = named(overlay, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": NAME}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [AggregatorSettings().metrics_port]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 6379}
