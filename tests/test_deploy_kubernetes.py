"""Canary rollouts on KServe without a cluster: the real kubernetes/kserve clients talk to an
in-process Kubernetes API (loopback HTTP) that validates every InferenceService against the real
KServe CRD schema and simulates the controller; metrics come from a loopback Prometheus API;
the model registry is a real MLflow SQLite registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fraud.config import MODEL_NAME, PROJECT_ROOT
from fraud.deploy import rollout as rollout_mod
from fraud.deploy.canary import CanaryCriteria
from fraud.deploy.kserve_rollout import (
    AUDIT_SPOOL,
    AUDIT_WRITER_CONTAINER,
    MODEL_VARIANT_ENV,
    MODEL_VERSION_ENV,
    PREDICTOR_CONTAINER,
    STORAGE_URI_ENV,
    TRANSFORMER_CONTAINER,
    build_inference_service,
    serving_model,
)
from fraud.deploy.overlay import OVERLAYS, load_inference_service, packaged_path, render_kustomization
from fraud.deploy.policy import RolloutPolicy, Step
from fraud.deploy.rollout import AnalyseRequest, Connection, DeployRequest, KubernetesBackend
from fraud.deploy.state import ROLLOUT_ANNOTATION, VERSION_LABEL, RolloutError, RolloutState, StateStore
from tests.support.kserve_crd import load_validator
from tests.support.kube_api import FakeKServeAPI
from tests.support.prometheus_stub import FakePrometheus, drift_series, predictor_series
from tests.test_deploy_support import Registry, build_registry

SHARED = PROJECT_ROOT.parent / "shared"
CRD = SHARED / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
if not SHARED.is_dir():
    pytest.skip(
        f"{SHARED} is absent: the KServe CRD schema the fake API validates against is not available",
        allow_module_level=True,
    )

NAMESPACE = "fraud-staging"
#: the overlay whose namespace is NAMESPACE (what `fraud deploy --namespace fraud-staging` uses)
STAGING = load_inference_service("staging")


@pytest.fixture(scope="module")
def validator():
    return load_validator(CRD)


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("mlflow"), 3)


@pytest.fixture
def cluster(validator, tmp_path, data_dir, mlflow_registry):
    """A fake API server already serving version 1 (as `kubectl apply -k` would have left it)."""
    mlflow_registry.reset(champion=mlflow_registry.versions[0])
    with FakeKServeAPI(validator) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
        from kubernetes import client, config

        api_client = config.new_client_from_config(str(kubeconfig))
        first = mlflow_registry.versions[0]
        from fraud import registry

        body = build_inference_service(
            STAGING, NAMESPACE, first, registry.model_version_source(first, uri=mlflow_registry.uri)
        )
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", NAMESPACE, "inferenceservices", body
        )
        yield api, kubeconfig


def _connection(kubeconfig: Path, timeout: float = 5.0) -> Connection:
    return Connection(kubeconfig=str(kubeconfig), poll_seconds=0.05, ready_timeout_seconds=timeout)


def _deploy(reg: Registry, kubeconfig: Path, version: str, percent: int = 10, timeout: float = 5.0, **options):
    return rollout_mod.deploy(
        DeployRequest(
            MODEL_NAME,
            version,
            "kubernetes",
            NAMESPACE,
            percent,
            mlflow_tracking_uri=reg.uri,
            connection=_connection(kubeconfig, timeout),
            **options,
        )
    )


def _analyse(reg: Registry, kubeconfig: Path, version: str, prometheus_url: str, backend=None, policy=None):
    request = AnalyseRequest(
        MODEL_NAME,
        version,
        "kubernetes",
        NAMESPACE,
        prometheus_url,
        300,
        mlflow_tracking_uri=reg.uri,
        criteria=CanaryCriteria(),
        connection=_connection(kubeconfig),
        wait=False,
        policy=policy,
    )
    return rollout_mod.analyse(request, backend=backend)


def _variant(isvc: dict) -> str:
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    return env["FRAUD_MODEL_VARIANT"]


def _traffic(api: FakeKServeAPI) -> dict[str, int]:
    isvc = api.get(NAMESPACE, MODEL_NAME)
    return {t["revisionName"]: t["percent"] for t in isvc["status"]["components"]["predictor"]["traffic"]}


def _labels(version: str) -> dict[str, str]:
    return {"namespace": NAMESPACE}


def test_fake_api_rejects_invalid_objects_like_the_api_server(cluster, validator):
    api, kubeconfig = cluster
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))
    with pytest.raises(ApiException) as rejected:
        custom.patch_namespaced_custom_object(
            "serving.kserve.io",
            "v1beta1",
            NAMESPACE,
            "inferenceservices",
            MODEL_NAME,
            {"spec": {"predictor": {"canaryTraficPercent": 10}}},
        )
    assert rejected.value.status == 422
    assert "canaryTraficPercent" in json.loads(rejected.value.body)["message"]
    with pytest.raises(ApiException) as misplaced:
        custom.patch_namespaced_custom_object(
            "serving.kserve.io",
            "v1beta1",
            NAMESPACE,
            "inferenceservices",
            MODEL_NAME,
            {"spec": {"predictor": {"storageUri": "s3://m/1"}}},
        )
    assert misplaced.value.status == 422
    with pytest.raises(ApiException) as wrong_type:
        custom.patch_namespaced_custom_object(
            "serving.kserve.io",
            "v1beta1",
            NAMESPACE,
            "inferenceservices",
            MODEL_NAME,
            {"spec": {"predictor": {"minReplicas": "two"}}},
        )
    assert wrong_type.value.status == 422
    # a JSON patch is applied and validated too (the client sends custom-object patches as
    # merge patches unless the content type is overridden, as `kubectl patch --type json` does)
    json_patching = config.new_client_from_config(str(kubeconfig))
    json_patching.set_default_header("Content-Type", "application/json-patch+json")
    with pytest.raises(ApiException) as bad_json_patch:
        client.CustomObjectsApi(json_patching).patch_namespaced_custom_object(
            "serving.kserve.io",
            "v1beta1",
            NAMESPACE,
            "inferenceservices",
            MODEL_NAME,
            [{"op": "add", "path": "/spec/predictor/canaryTraficPercent", "value": 5}],
        )
    assert bad_json_patch.value.status == 422
    updated = client.CustomObjectsApi(json_patching).patch_namespaced_custom_object(
        "serving.kserve.io",
        "v1beta1",
        NAMESPACE,
        "inferenceservices",
        MODEL_NAME,
        [{"op": "replace", "path": "/spec/predictor/maxReplicas", "value": 5}],
    )
    assert updated["spec"]["predictor"]["maxReplicas"] == 5
    assert api.requests[-1]["content_type"] == "application/json-patch+json"
    assert updated["metadata"]["generation"] == 2
    # every object the fake serves, status included, is itself schema-valid
    assert validator.issues(api.get(NAMESPACE, MODEL_NAME)) == []


def test_healthy_canary_is_promoted(cluster, mlflow_registry):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    record = _deploy(mlflow_registry, kubeconfig, v2, percent=10)
    assert record.state is RolloutState.DEPLOYED
    assert (record.previous_version, record.model_version) == (v1, v2)
    isvc = api.get(NAMESPACE, MODEL_NAME)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert serving_model(isvc)[0] == v2
    assert sorted(_traffic(api).values()) == [10, 90]
    assert json.loads(isvc["metadata"]["annotations"][ROLLOUT_ANNOTATION])["state"] == "deployed"
    assert _variant(isvc) == "canary"  # the canary revision's audit records say canary

    series = predictor_series(
        v1, requests=900, server_errors=1, latency_seconds=0.01, extra_labels=_labels(v1)
    ) + predictor_series(v2, requests=100, server_errors=0, latency_seconds=0.01, extra_labels=_labels(v2))
    with FakePrometheus(series) as prometheus:
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
        assert any(f'model_version="{v2}"' in q and f'namespace="{NAMESPACE}"' in q for q in prometheus.queries)
    assert final.state is RolloutState.PROMOTED
    assert [t.state for t in final.history] == ["pending", "deployed", "analysing", "promoted"]
    assert mlflow_registry.champion() == v2
    assert mlflow_registry.decisions(v2)["canary"] == "promoted"
    isvc = api.get(NAMESPACE, MODEL_NAME)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert list(_traffic(api).values()) == [100]
    # promotion restarts the same model as `stable` (a new revision taking all traffic when ready)
    assert isvc["status"]["components"]["predictor"]["latestRolledoutRevision"].endswith("00003")
    assert _variant(isvc) == "stable" and serving_model(isvc)[0] == v2
    checks = {c["name"]: c for c in final.checks}
    assert checks["decision_share.decline"]["verdict"] == "pass" and checks["drift"]["verdict"] == "skip"
    assert mlflow_registry.decisions(v2)["canary.check.server_error_rate"].startswith("pass value=0")
    # the file mirror of the record agrees with the annotation
    mirrored = StateStore(rollout_mod.state_dir()).load("kubernetes", NAMESPACE, MODEL_NAME)
    assert mirrored is not None and mirrored.state is RolloutState.PROMOTED


@pytest.mark.parametrize(
    ("canary_errors", "canary_latency", "reason"),
    [(12, 0.01, "server_error_rate"), (0, 0.9, "p99_latency")],
    ids=["erroring", "slow"],
)
def test_bad_canary_is_rolled_back(cluster, mlflow_registry, canary_errors, canary_latency, reason):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    v1_uri = serving_model(api.get(NAMESPACE, MODEL_NAME))[1]
    _deploy(mlflow_registry, kubeconfig, v2, percent=20)
    series = predictor_series(v1, requests=800, extra_labels=_labels(v1)) + predictor_series(
        v2, requests=200, server_errors=canary_errors, latency_seconds=canary_latency, extra_labels=_labels(v2)
    )
    with FakePrometheus(series) as prometheus:
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
    assert final.state is RolloutState.ROLLED_BACK
    assert reason in final.reason
    assert mlflow_registry.champion() == v1  # alias untouched
    decisions = mlflow_registry.decisions(v2)
    assert decisions["canary"] == "rolled_back" and reason in decisions["canary.reason"]
    isvc = api.get(NAMESPACE, MODEL_NAME)
    assert serving_model(isvc) == (v1, v1_uri)  # the spec describes the stable model again
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 0
    traffic = isvc["status"]["components"]["predictor"]["traffic"]
    assert [(t["revisionName"].endswith("00001"), t["percent"]) for t in traffic if t["percent"]] == [(True, 100)]


def test_rollout_patches_keep_the_audit_writer(cluster, mlflow_registry):
    """The rollout merge-patches the predictor's whole containers list: the audit writer sidecar,
    the spool volume and the predictor's spool settings must come through canary and rollback."""
    api, kubeconfig = cluster
    v2 = mlflow_registry.versions[1]
    before = api.get(NAMESPACE, MODEL_NAME)["spec"]["predictor"]
    assert [c["name"] for c in before["containers"]] == [PREDICTOR_CONTAINER, AUDIT_WRITER_CONTAINER]
    _deploy(mlflow_registry, kubeconfig, v2, percent=20)
    canary = api.get(NAMESPACE, MODEL_NAME)["spec"]["predictor"]
    with FakePrometheus() as prometheus:
        prometheus.down = True
        assert _analyse(mlflow_registry, kubeconfig, v2, prometheus.url).state is RolloutState.ROLLED_BACK
    rolled_back = api.get(NAMESPACE, MODEL_NAME)["spec"]["predictor"]
    for spec in (canary, rolled_back):
        assert spec["containers"][1] == before["containers"][1]
        assert spec["volumes"] == before["volumes"]
        predictor_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert predictor_env["FRAUD_AUDIT_SPOOL"] == AUDIT_SPOOL and "FRAUD_AUDIT_DB_URL" not in predictor_env
        assert spec["containers"][0]["volumeMounts"] == before["containers"][0]["volumeMounts"]
    assert serving_model({"metadata": {}, "spec": {"predictor": canary}})[0] == v2


def test_prometheus_outage_rolls_back(cluster, mlflow_registry):
    _api, kubeconfig = cluster
    v2 = mlflow_registry.versions[1]
    _deploy(mlflow_registry, kubeconfig, v2)
    with FakePrometheus() as prometheus:
        prometheus.down = True
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
    assert final.state is RolloutState.ROLLED_BACK
    assert "metrics: " in final.reason and "unavailable" in final.reason
    assert mlflow_registry.champion() == mlflow_registry.versions[0]


def test_canary_that_never_becomes_ready_is_rolled_back_after_timeout(cluster, mlflow_registry):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    from fraud import registry

    api.never_ready.add(registry.model_version_source(v2, uri=mlflow_registry.uri))
    record = _deploy(mlflow_registry, kubeconfig, v2, timeout=0.5)
    assert record.state is RolloutState.ROLLED_BACK
    assert "never became ready" in record.reason and "not ready after" in record.reason
    assert [t.state for t in record.history] == ["pending", "rolled_back"]
    assert mlflow_registry.champion() == v1
    assert mlflow_registry.decisions(v2)["canary"] == "rolled_back"
    isvc = api.get(NAMESPACE, MODEL_NAME)
    assert serving_model(isvc)[0] == v1
    assert [p for p in _traffic(api).values() if p] == [100]
    # a new rollout may start after the rolled-back one
    assert _deploy(mlflow_registry, kubeconfig, mlflow_registry.versions[2]).state is RolloutState.DEPLOYED


class Crash(Exception):
    """Stands for the process being killed."""


def _crash(_: float) -> None:
    raise Crash


def test_crash_between_patch_and_analysis_resumes(cluster, mlflow_registry):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    from fraud import registry

    uri2 = registry.model_version_source(v2, uri=mlflow_registry.uri)
    api.never_ready.add(uri2)  # the revision is still starting when the process dies
    backend = KubernetesBackend(MODEL_NAME, NAMESPACE, StateStore(rollout_mod.state_dir()), _connection(kubeconfig))
    backend.rollout._sleep = _crash
    with pytest.raises(Crash):
        rollout_mod.deploy(
            DeployRequest(
                MODEL_NAME,
                v2,
                "kubernetes",
                NAMESPACE,
                10,
                mlflow_tracking_uri=mlflow_registry.uri,
                connection=_connection(kubeconfig),
            ),
            backend=backend,
        )
    isvc = api.get(NAMESPACE, MODEL_NAME)
    persisted = json.loads(isvc["metadata"]["annotations"][ROLLOUT_ANNOTATION])
    assert persisted["state"] == "pending" and persisted["generation"] == isvc["metadata"]["generation"] == 2
    spec_changes = api.spec_changes()

    api.never_ready.discard(uri2)  # meanwhile the revision came up
    record = _deploy(mlflow_registry, kubeconfig, v2)
    assert record.state is RolloutState.DEPLOYED
    assert api.spec_changes() == spec_changes  # the re-run did not patch the spec again
    assert api.get(NAMESPACE, MODEL_NAME)["metadata"]["generation"] == 2
    assert _deploy(mlflow_registry, kubeconfig, v2).state is RolloutState.DEPLOYED  # and again: a no-op

    # another version cannot start while this rollout is open
    with pytest.raises(RolloutError, match="still deployed"):
        _deploy(mlflow_registry, kubeconfig, mlflow_registry.versions[2])

    series = predictor_series(v1, requests=900, extra_labels=_labels(v1)) + predictor_series(
        v2, requests=100, extra_labels=_labels(v2)
    )
    with FakePrometheus(series) as prometheus:
        # crash after the verdict was persisted, before it was applied
        crashing = KubernetesBackend(
            MODEL_NAME, NAMESPACE, StateStore(rollout_mod.state_dir()), _connection(kubeconfig)
        )
        crashing.promote = lambda record: _crash(0)
        with pytest.raises(Crash):
            _analyse(mlflow_registry, kubeconfig, v2, prometheus.url, backend=crashing)
        persisted = json.loads(api.get(NAMESPACE, MODEL_NAME)["metadata"]["annotations"][ROLLOUT_ANNOTATION])
        assert (persisted["state"], persisted["decision"]) == ("analysing", "promoted")
        queries = len(prometheus.queries)
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
        assert len(prometheus.queries) == queries  # the verdict was applied, not re-analysed
    assert final.state is RolloutState.PROMOTED
    assert mlflow_registry.champion() == v2
    assert _analyse(mlflow_registry, kubeconfig, v2, "http://127.0.0.1:9").state is RolloutState.PROMOTED  # idempotent


def test_manual_rollback_after_promotion_restores_stable_and_champion(cluster, mlflow_registry):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    _deploy(mlflow_registry, kubeconfig, v2)
    series = predictor_series(v1, requests=900, extra_labels=_labels(v1)) + predictor_series(
        v2, requests=100, extra_labels=_labels(v2)
    )
    with FakePrometheus(series) as prometheus:
        assert _analyse(mlflow_registry, kubeconfig, v2, prometheus.url).state is RolloutState.PROMOTED
    record = rollout_mod.manual_rollback(
        "kubernetes",
        MODEL_NAME,
        NAMESPACE,
        "fraud analysts report false declines",
        mlflow_tracking_uri=mlflow_registry.uri,
        connection=_connection(kubeconfig),
    )
    assert record.state is RolloutState.ROLLED_BACK
    assert mlflow_registry.champion() == v1
    assert "false declines" in mlflow_registry.decisions(v2)["rollback"]
    isvc = api.get(NAMESPACE, MODEL_NAME)
    assert serving_model(isvc)[0] == v1
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    traffic = isvc["status"]["components"]["predictor"]["traffic"]
    assert [(t["revisionName"].endswith("00004"), t["percent"]) for t in traffic] == [(True, 100)]
    assert mlflow_registry.decisions(v2)["canary"] == "rolled_back"  # tags agree with what serves


def test_first_deployment_creates_the_inference_service(validator, tmp_path, data_dir, mlflow_registry):
    mlflow_registry.reset(champion=mlflow_registry.versions[0])
    with FakeKServeAPI(validator) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
        with pytest.raises(RolloutError, match="--first-deploy"):
            _deploy(mlflow_registry, kubeconfig, mlflow_registry.versions[1], percent=10)
        assert api.requests and {r["method"] for r in api.requests} == {"GET"}  # nothing created
        record = _deploy(mlflow_registry, kubeconfig, mlflow_registry.versions[1], percent=10, first_deploy=True)
        assert record.state is RolloutState.DEPLOYED
        assert record.previous_version == "" and record.canary_traffic_percent == 100
        isvc = api.get(NAMESPACE, MODEL_NAME)
        methods = [r["method"] for r in api.requests]
        assert methods.count("POST") == 1 and "PATCH" not in methods[: methods.index("POST")]
        assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
        assert validator.issues(isvc) == []
        # created from the staging overlay (the one of its namespace): its args, secrets and timeout
        assert _predictor_of(isvc)["args"] == _predictor_of(STAGING)["args"]
        assert isvc["spec"]["predictor"].get("timeout") == STAGING["spec"]["predictor"].get("timeout")
        # nothing to fall back to: a rollback by hand is refused and the version keeps serving
        with pytest.raises(RolloutError, match="leave nothing serving"):
            rollout_mod.manual_rollback(
                "kubernetes",
                MODEL_NAME,
                NAMESPACE,
                "test",
                mlflow_tracking_uri=mlflow_registry.uri,
                connection=_connection(kubeconfig),
            )
        assert api.get(NAMESPACE, MODEL_NAME) is not None


def test_deploy_refuses_unknown_version(cluster, mlflow_registry):
    _, kubeconfig = cluster
    with pytest.raises(RolloutError, match="version 999"):
        _deploy(mlflow_registry, kubeconfig, "999")


# ----------------------------------------------------------------------------- the API stand-in itself


def _raw(api: FakeKServeAPI, method: str, path: str, body, content_type: str = "application/json"):
    import httpx

    return httpx.request(
        method, f"{api.url}{path}", content=json.dumps(body), headers={"Content-Type": content_type}, timeout=5
    )


ISVC_PATH = f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices"


def test_api_stand_in_refuses_what_the_api_server_refuses(cluster):
    api, _ = cluster
    current = api.get(NAMESPACE, MODEL_NAME)
    patch = {"spec": {"predictor": {"minReplicas": 2}}}
    merge = "application/merge-patch+json"
    # a made-up API version: no such resource
    made_up = _raw(
        api,
        "PATCH",
        f"/apis/serving.kserve.io/v1gamma9/namespaces/{NAMESPACE}/inferenceservices/{MODEL_NAME}",
        patch,
        merge,
    )
    assert made_up.status_code == 404 and made_up.json()["reason"] == "NotFound"
    # strategic merge needs a Go struct: custom resources answer 415
    strategic = _raw(api, "PATCH", f"{ISVC_PATH}/{MODEL_NAME}", patch, "application/strategic-merge-patch+json")
    assert strategic.status_code == 415 and strategic.json()["reason"] == "UnsupportedMediaType"
    # an update carrying a resourceVersion that is no longer current: 409 Conflict
    stale = json.loads(json.dumps(current))
    stale["spec"]["predictor"]["minReplicas"] = 3
    assert _raw(api, "PATCH", f"{ISVC_PATH}/{MODEL_NAME}", patch, merge).status_code == 200  # moves the version on
    conflict = _raw(api, "PUT", f"{ISVC_PATH}/{MODEL_NAME}", stale)
    assert conflict.status_code == 409 and conflict.json()["reason"] == "Conflict"
    fresh = api.get(NAMESPACE, MODEL_NAME)
    fresh["spec"]["predictor"]["minReplicas"] = 3
    assert _raw(api, "PUT", f"{ISVC_PATH}/{MODEL_NAME}", fresh).status_code == 200  # the current one is accepted
    # a body naming another object than the URL: 400
    renamed = dict(api.get(NAMESPACE, MODEL_NAME), metadata={**fresh["metadata"], "name": "other"})
    renamed["metadata"].pop("resourceVersion")
    assert _raw(api, "PUT", f"{ISVC_PATH}/{MODEL_NAME}", renamed).status_code == 400
    moved = json.loads(json.dumps(current))
    moved["metadata"] = {"name": "second", "namespace": "elsewhere"}
    assert _raw(api, "POST", ISVC_PATH, moved).status_code == 400
    # the accepted requests changed exactly what they said
    assert api.get(NAMESPACE, MODEL_NAME)["spec"]["predictor"]["minReplicas"] == 3
    assert api.get(NAMESPACE, "second") is None and api.get("elsewhere", "second") is None


# ----------------------------------------------------------------------------- policy, steps, guards


def _healthy_series(v1: str, v2: str, **canary) -> list:
    return predictor_series(v1, requests=1800, extra_labels=_labels(v1)) + predictor_series(
        v2, requests=400, extra_labels=_labels(v2), **canary
    )


def test_progressive_steps_patch_canary_traffic_percent(cluster, mlflow_registry, validator):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    policy = RolloutPolicy(steps=(Step(5, 60), Step(25, 60), Step(50, 60)))
    record = _deploy(mlflow_registry, kubeconfig, v2, percent=5, policy=policy)
    assert record.canary_traffic_percent == 5 and sorted(_traffic(api).values()) == [5, 95]
    with FakePrometheus(_healthy_series(v1, v2)) as prometheus:
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
    assert final.state is RolloutState.PROMOTED, final.reason
    assert [(r["step"], r["percent"], r["decision"]) for r in final.step_results] == [
        (1, 5, "promoted"),
        (2, 25, "promoted"),
        (3, 50, "promoted"),
    ]
    shares = [
        r["body"]["spec"]["predictor"].get("canaryTrafficPercent", "absent")
        for r in api.requests
        if r["method"] == "PATCH" and "predictor" in (r["body"] or {}).get("spec", {})
    ]
    assert shares == [5, 25, 50, None]  # None: the merge patch removes it (promotion)
    assert validator.issues(api.get(NAMESPACE, MODEL_NAME)) == []
    assert mlflow_registry.champion() == v2


def test_a_crash_between_steps_resumes_at_the_step_it_was_in(cluster, mlflow_registry):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    policy = RolloutPolicy(steps=(Step(5, 60), Step(25, 60), Step(50, 60)))
    _deploy(mlflow_registry, kubeconfig, v2, percent=5, policy=policy)
    with FakePrometheus(_healthy_series(v1, v2)) as prometheus:
        crashing = KubernetesBackend(
            MODEL_NAME, NAMESPACE, StateStore(rollout_mod.state_dir()), _connection(kubeconfig)
        )
        real_set = crashing.set_traffic

        def set_then_crash(record, percent):
            real_set(record, percent)
            if percent == 50:
                raise Crash

        crashing.set_traffic = set_then_crash
        with pytest.raises(Crash):
            _analyse(mlflow_registry, kubeconfig, v2, prometheus.url, backend=crashing)
        persisted = json.loads(api.get(NAMESPACE, MODEL_NAME)["metadata"]["annotations"][ROLLOUT_ANNOTATION])
        assert (persisted["state"], persisted["step_index"], len(persisted["step_results"])) == ("analysing", 2, 2)
        assert sorted(_traffic(api).values()) == [50, 50]
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)  # the recorded policy is used
    assert final.state is RolloutState.PROMOTED
    assert [r["percent"] for r in final.step_results] == [5, 25, 50]  # steps 1 and 2 not redone


@pytest.mark.parametrize(
    ("canary", "check"),
    [
        ({"decision_shares": {"decline": 0.997, "approve": 0.003}}, "decision_share.decline"),
        ({"client_errors": 400}, "client_error_rate"),
        ({"missing": 200}, "missing_stale"),
    ],
    ids=["declines-everything", "answers-400", "missing-features"],
)
def test_canary_bad_for_the_business_is_rolled_back(cluster, mlflow_registry, canary, check):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    _deploy(mlflow_registry, kubeconfig, v2, percent=20)
    with FakePrometheus(_healthy_series(v1, v2, **canary)) as prometheus:
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
    assert final.state is RolloutState.ROLLED_BACK
    assert check in final.reason and "\n" not in final.reason
    assert {c["name"]: c["verdict"] for c in final.checks}[check] == "fail"
    assert mlflow_registry.decisions(v2)[f"canary.check.{check}"].startswith("fail ")
    assert mlflow_registry.champion() == v1 and serving_model(api.get(NAMESPACE, MODEL_NAME))[0] == v1


def test_drift_during_the_window_fails_the_drift_check(cluster, mlflow_registry):
    _api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    _deploy(mlflow_registry, kubeconfig, v2, percent=20)
    series = _healthy_series(v1, v2) + drift_series(1, age_seconds=100, extra_labels={"namespace": NAMESPACE})
    old_drift = drift_series(5, age_seconds=900, extra_labels={"namespace": NAMESPACE})  # before the window
    with FakePrometheus(series + old_drift) as prometheus:
        final = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
    checks = {c["name"]: c for c in final.checks}
    assert checks["drift"]["verdict"] == "fail" and checks["drift"]["value"] == 1.0
    assert final.state is RolloutState.ROLLED_BACK


def test_no_canary_against_an_unhealthy_stable(cluster, mlflow_registry):
    api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    from fraud import registry

    api.never_ready.add(registry.model_version_source(v1, uri=mlflow_registry.uri))  # stable stops being ready
    with pytest.raises(RolloutError, match=f"stable version {v1} .* is unhealthy"):
        _deploy(mlflow_registry, kubeconfig, v2)
    assert serving_model(api.get(NAMESPACE, MODEL_NAME))[0] == v1 and mlflow_registry.champion() == v1
    forced = _deploy(mlflow_registry, kubeconfig, v2, force=True)
    assert forced.state is RolloutState.DEPLOYED and forced.canary_traffic_percent == 100
    assert forced.previous_version == ""


def test_retry_of_a_rolled_back_version_and_history(cluster, mlflow_registry):
    _api, kubeconfig = cluster
    v1, v2 = mlflow_registry.versions[:2]
    _deploy(mlflow_registry, kubeconfig, v2)
    with FakePrometheus(_healthy_series(v1, v2, server_errors=100)) as prometheus:
        first = _analyse(mlflow_registry, kubeconfig, v2, prometheus.url)
    assert first.state is RolloutState.ROLLED_BACK
    with pytest.raises(rollout_mod.AlreadyRolledBack, match=r"past result.*--retry"):
        _deploy(mlflow_registry, kubeconfig, v2)
    again = _deploy(mlflow_registry, kubeconfig, v2, retry=True)
    assert again.state is RolloutState.DEPLOYED and again.rollout_id != first.rollout_id
    with FakePrometheus(_healthy_series(v1, v2)) as prometheus:
        assert _analyse(mlflow_registry, kubeconfig, v2, prometheus.url).state is RolloutState.PROMOTED
    past = rollout_mod.history("kubernetes", MODEL_NAME, NAMESPACE)
    assert [(r.model_version, r.state.value) for r in past][-2:] == [(v2, "rolled_back"), (v2, "promoted")]
    assert "server_error_rate" in past[-2].reason


def _predictor_of(isvc: dict) -> dict:
    return next(c for c in isvc["spec"]["predictor"]["containers"] if c["name"] == PREDICTOR_CONTAINER)


def _flatten(value, path: str = "") -> dict[str, object]:
    """Leaf path -> value; list items with a `name` are keyed by it (env, containers, volumes),
    so a path names the field and not its position."""
    if isinstance(value, dict):
        if not value:
            return {path: {}}
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list):
        if not value:
            return {path: []}
        named = all(isinstance(item, dict) and "name" in item for item in value)
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{path}[{item['name'] if named else index}]"))
        return out
    return {path: value}


def _diff(before: dict, after: dict) -> dict[str, tuple[object, object]]:
    a, b = _flatten(before), _flatten(after)
    return {path: (a.get(path), b.get(path)) for path in a.keys() | b.keys() if a.get(path) != b.get(path)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_created_inference_service_is_the_overlay_plus_rollout_fields(overlay, validator):
    """One InferenceService definition: what the Kubernetes backend creates is the overlay's
    rendered InferenceService with exactly the rollout fields added, and it is valid."""
    from fraud.deploy.state import RolloutRecord

    base = load_inference_service(overlay)
    namespace = base["metadata"]["namespace"]
    version, uri = "7", "s3://bucket/models/7/bundle"
    record = RolloutRecord(
        model_name=MODEL_NAME,
        model_version=version,
        target="kubernetes",
        namespace=namespace,
        state=RolloutState.PENDING,
        canary_traffic_percent=100,
        storage_uri=uri,
    )
    built = build_inference_service(base, namespace, version, uri, record=record)
    predictor = f"spec.predictor.containers[{PREDICTOR_CONTAINER}].env"
    transformer = f"spec.transformer.containers[{TRANSFORMER_CONTAINER}].env"
    rollout_fields = {
        f"metadata.labels.{VERSION_LABEL}": version,
        f"metadata.annotations.{ROLLOUT_ANNOTATION}": record.to_json(),
        f"spec.predictor.labels.{VERSION_LABEL}": version,
        f"{predictor}[{STORAGE_URI_ENV}].value": uri,
        f"{predictor}[{MODEL_VERSION_ENV}].value": version,
        f"{predictor}[{MODEL_VARIANT_ENV}].name": MODEL_VARIANT_ENV,
        f"{predictor}[{MODEL_VARIANT_ENV}].value": "stable",
        f"{transformer}[{STORAGE_URI_ENV}].value": uri,
    }
    overlay_flat = _flatten(base)
    expected = {path: (overlay_flat.get(path), value) for path, value in rollout_fields.items()}
    expected = {path: change for path, change in expected.items() if change[0] != change[1]}
    assert _diff(base, built) == expected
    # the rollout moves the model, so these always change
    assert {f"{predictor}[{STORAGE_URI_ENV}].value", f"metadata.annotations.{ROLLOUT_ANNOTATION}"} <= set(expected)
    assert validator.issues(built) == []
    assert base == load_inference_service(overlay)  # the overlay itself is not modified
    # another namespace than the overlay's: the namespace is the only further change
    moved = build_inference_service(base, "elsewhere", version, uri, record=record)
    assert _diff(built, moved) == {"metadata.namespace": (namespace, "elsewhere")}


@pytest.mark.skipif(not (PROJECT_ROOT / "kustomize").is_dir(), reason="no kustomize/ (installed package)")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_packaged_overlays_are_the_rendered_kustomize_overlays(overlay):
    """The wheel ships the overlays rendered; they must be what `kubectl kustomize` renders now
    (refresh with `python -m fraud.deploy.overlay`)."""
    import shutil

    import yaml

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: cannot render kustomize/overlays")
    rendered = render_kustomization(PROJECT_ROOT / "kustomize" / "overlays" / overlay)
    (isvc,) = [d for d in rendered if d["kind"] == "InferenceService" and d["metadata"]["name"] == MODEL_NAME]
    packaged = yaml.safe_load(packaged_path(overlay).read_text())
    assert packaged == isvc, f"{packaged_path(overlay)} is stale: run `python -m fraud.deploy.overlay`"
    assert load_inference_service(str(PROJECT_ROOT / "kustomize" / "overlays" / overlay)) == isvc


def test_bad_overlay_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from fraud.cli import app
    from fraud.deploy.overlay import overlay_for_namespace
    from fraud.errors import UserError

    with pytest.raises(RolloutError, match="neither one of dev, staging, prod"):
        load_inference_service("qa")
    with pytest.raises(RolloutError, match="--overlay"):
        overlay_for_namespace("fraud")
    empty = tmp_path / "empty.yaml"
    empty.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(RolloutError, match="expected one InferenceService named fraud-detector, found 0"):
        load_inference_service(str(empty))
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [\n")
    with pytest.raises(RolloutError, match="not valid YAML"):
        load_inference_service(str(broken))
    assert overlay_for_namespace(NAMESPACE) == "staging"
    result = CliRunner().invoke(
        app, ["deploy", "--target", "kubernetes", "--version", "3", "--namespace", "fraud", "--no-analyse"]
    )
    assert isinstance(result.exception, UserError) and "--overlay" in str(result.exception)
