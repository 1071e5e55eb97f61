"""The feature build on the Kubeflow Spark Operator: the SparkApplication object (validated against
the operator's published schema), its submission and wait through the Kubernetes API (a loopback
stand-in that refuses what the API server refuses), the manifests and the pipeline variant."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fraud.config import PROJECT_ROOT
from fraud.deploy import spark
from fraud.deploy.kserve_rollout import DEFAULT_CORE_IMAGE
from fraud.deploy.spark import (
    SparkApplicationError,
    SparkApplicationRunner,
    SparkFeatureJob,
    spark_application,
)
from tests.test_manifests import build, needs_kubectl

SCHEMAS = PROJECT_ROOT.parent / "shared" / "schemas" / "spark-operator"
needs_schemas = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"{SCHEMAS} is absent: no Spark Operator schema to validate against"
)
JOB = SparkFeatureJob(
    name="fraud-features-test",
    namespace="fraud-dev",
    image=DEFAULT_CORE_IMAGE,
    feature_tables_uri="s3://fraud-feature-tables-dev/offline",
)


def _validator(kind: str, plural: str, file: str):
    from tests.support.kserve_crd import json_schema_validator

    return json_schema_validator(SCHEMAS / file, group=spark.GROUP, version=spark.API_VERSION, kind=kind, plural=plural)


@pytest.fixture(scope="module")
def app_validator():
    return _validator(spark.KIND, spark.PLURAL, "sparkapplication_v1beta2.json")


@pytest.fixture(scope="module")
def scheduled_validator():
    return _validator(spark.SCHEDULED_KIND, "scheduledsparkapplications", "scheduledsparkapplication_v1beta2.json")


def _manifest_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- the object ------------------------------------------------------------------------------------


@needs_schemas
def test_the_built_application_is_valid_and_hardened(app_validator):
    app = spark_application(JOB)
    assert app_validator.issues(app) == []
    spec = app["spec"]
    assert spec["mainApplicationFile"] == "local:///app/fraud/features/spark_job.py"
    assert (PROJECT_ROOT / "fraud" / "features" / "spark_job.py").is_file()
    assert spec["arguments"] == ["--data-dir", "/data", "--feature-tables-uri", JOB.feature_tables_uri]
    for role in ("driver", "executor"):
        pod = spec[role]
        assert pod["podSecurityContext"]["runAsNonRoot"] is True
        assert pod["podSecurityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in pod["volumeMounts"]} == {"/data", "/var/spark-local", "/tmp"}
        assert pod["labels"]["app.kubernetes.io/name"] == "fraud-spark"
    assert spec["driver"]["serviceAccount"] == "fraud-spark-driver"
    from importlib.metadata import version

    assert spec["sparkVersion"] == version("pyspark")  # the Spark of the image's environment
    assert spec["executor"]["serviceAccount"] == "fraud-spark-executor"


@needs_schemas
def test_a_materialising_application_gives_the_store_credentials_to_its_driver_only(app_validator):
    app = spark_application(SparkFeatureJob(**{**JOB.__dict__, "materialize": True}))
    assert app_validator.issues(app) == []
    spec = app["spec"]
    assert spec["arguments"][-1] == "--materialize"
    driver, executor = spec["driver"], spec["executor"]
    assert [e["configMapRef"]["name"] for e in driver["envFrom"]] == ["fraud-pipeline-config", "fraud-serving-config"]
    assert {name: ref["name"] for name, ref in driver["envSecretKeyRefs"].items()} == {
        "AWS_ACCESS_KEY_ID": "fraud-object-store",
        "AWS_SECRET_ACCESS_KEY": "fraud-object-store",
        "FRAUD_FEAST_REGISTRY_URL": "fraud-feast-registry",
        "FRAUD_REDIS_PASSWORD": "fraud-redis",
    }
    # the Redis CA where the serving ConfigMap's FRAUD_REDIS_CA_CERT points
    serving = next(
        d
        for d in _manifest_docs(PROJECT_ROOT / "manifests" / "configmaps.yaml")
        if d["metadata"]["name"] == "fraud-serving-config"
    )
    ca = Path(serving["data"]["FRAUD_REDIS_CA_CERT"])
    (mount,) = [m for m in driver["volumeMounts"] if m["name"] == "redis-ca"]
    assert ca.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "redis-ca"]
    assert volume["secret"]["secretName"] == "fraud-redis-ca" and volume["secret"]["items"][0]["path"] == ca.name
    assert executor["envFrom"] == [{"configMapRef": {"name": "fraud-pipeline-config"}}]
    assert set(executor["envSecretKeyRefs"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "redis-ca" not in {m["name"] for m in executor["volumeMounts"]}
    # without it, nothing of the store reaches the driver either
    plain = spark_application(JOB)["spec"]
    assert "--materialize" not in plain["arguments"] and "redis-ca" not in {v["name"] for v in plain["volumes"]}
    assert set(plain["driver"]["envSecretKeyRefs"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@needs_schemas
@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda a: a["spec"].__setitem__("type", "Pyhton"), "spec.type"),
        (lambda a: a["spec"]["executor"].__setitem__("instance", 2), "spec.executor"),
        (lambda a: a["spec"].pop("mainApplicationFile"), "mainApplicationFile"),
        (lambda a: a["spec"]["driver"].__setitem__("cores", "one"), "spec.driver.cores"),
    ],
    ids=["bad-type", "misspelt-instances", "no-main-file", "cores-not-integer"],
)
def test_schema_validation_rejects_mistakes(app_validator, mutate, where):
    broken = copy.deepcopy(spark_application(JOB))
    mutate(broken)
    assert any(where in str(issue) for issue in app_validator.issues(broken))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Fraud_Features"}, "DNS-1123"),
        ({"executor_instances": 0}, "executor_instances"),
        ({"executor_memory": "4 GB"}, "executor_memory"),
        ({"image": " "}, "image"),
        ({"materialize": True, "feature_tables_uri": ""}, "materialize needs feature_tables_uri"),
    ],
)
def test_bad_job_settings_are_refused(change, message):
    settings = {**JOB.__dict__, **change}
    with pytest.raises(SparkApplicationError, match=message):
        SparkFeatureJob(**settings)


# --- the manifests -------------------------------------------------------------------------------


@needs_schemas
def test_the_template_and_the_daily_schedule_are_the_builders_object(app_validator, scheduled_validator):
    (template,) = _manifest_docs(PROJECT_ROOT / "manifests" / "spark" / "feature-build-sparkapplication.yaml")
    assert app_validator.issues(template) == []
    expected = spark_application(
        SparkFeatureJob(
            name=template["metadata"]["name"],
            namespace="x",
            image=DEFAULT_CORE_IMAGE,
            feature_tables_uri=template["spec"]["arguments"][3],
            materialize=True,  # build, copy, apply, materialise: the daily build's whole job
        )
    )
    del expected["metadata"]["namespace"]
    assert template == expected
    (scheduled,) = [
        d
        for d in _manifest_docs(PROJECT_ROOT / "manifests" / "spark-features.yaml")
        if "spec" in d and d["kind"] == spark.SCHEDULED_KIND
    ]
    assert scheduled_validator.issues(scheduled) == []
    assert scheduled["spec"]["template"] == template["spec"]
    assert scheduled["spec"]["concurrencyPolicy"] == "Forbid"


@needs_kubectl
@needs_schemas
@pytest.mark.parametrize("overlay", ["dev", "staging", "prod"])
def test_overlays_render_a_valid_daily_build_with_least_privilege(overlay, scheduled_validator):
    docs = build(overlay)
    (scheduled,) = [d for d in docs if d["kind"] == spark.SCHEDULED_KIND]
    assert scheduled_validator.issues(scheduled) == []
    template = scheduled["spec"]["template"]
    for role in ("driver", "executor"):  # Pod Security Standard `restricted`, as every other workload
        assert template[role]["podSecurityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert template[role]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert template[role]["securityContext"]["runAsNonRoot"] is True
    assert template["arguments"][3] == f"s3://fraud-feature-tables-{overlay}/offline"
    assert template["image"].startswith("ghcr.io/fraud-platform/fraud-core:")
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    driver_rules = roles["fraud-spark-driver"]["rules"]
    assert {r for rule in driver_rules for r in rule["resources"]} == {"pods", "configmaps"}
    assert all(rule["apiGroups"] == [""] and "*" not in rule["verbs"] for rule in driver_rules)
    (submit_rule,) = roles["fraud-spark-submitter"]["rules"]
    assert submit_rule["resources"] == ["sparkapplications"] and "patch" not in submit_rule["verbs"]
    # nobody else may create pods or SparkApplications
    creators = {
        name
        for name, role in roles.items()
        for rule in role["rules"]
        if {"pods", "sparkapplications"} & set(rule["resources"]) and "create" in rule["verbs"]
    }
    assert creators == {"fraud-spark-driver", "fraud-spark-submitter"}
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts["fraud-spark-executor"]["automountServiceAccountToken"] is False
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "fraud-spark")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "fraud-spark"}
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {spark.DRIVER_PORT, spark.BLOCK_MANAGER_PORT}
    cidrs = [peer["ipBlock"]["cidr"] for rule in policy["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer]
    assert cidrs and "192.0.2.0/24" not in cidrs
    # the driver reaches the Feast registry and the same Redis as the predictors; executors do not
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    driver_policy = policies["fraud-spark-driver"]["spec"]
    assert driver_policy["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "fraud-spark",
        "app.kubernetes.io/component": "driver",
    }
    assert driver_policy["policyTypes"] == ["Egress"]

    def redis_peers(policy: dict) -> list[dict]:
        return [peer for rule in policy["egress"] if rule["ports"][0]["port"] == 6379 for peer in rule["to"]]

    assert redis_peers(driver_policy) == redis_peers(policies["fraud-predictor"]["spec"])
    assert {p["port"] for rule in driver_policy["egress"] for p in rule["ports"]} == {5432, 6379}
    assert template["arguments"][-1] == "--materialize"
    conf = template["sparkConf"]
    assert conf["spark.driver.port"] == str(spark.DRIVER_PORT)
    assert conf["spark.blockManager.port"] == conf["spark.driver.blockManager.port"] == str(spark.BLOCK_MANAGER_PORT)


# --- submission and wait -------------------------------------------------------------------------


@pytest.fixture
def operator_api(app_validator):
    from tests.support.kube_api import FakeSparkOperatorAPI

    with FakeSparkOperatorAPI(
        app_validator,
        namespaces=["fraud-dev"],
        outcomes={
            "fraud-features-oom": (
                "FAILED",
                "Executor lost: Container killed on request. Exit code is 137 (OOMKilled)",
            ),
            "fraud-features-nosubmit": ("SUBMISSION_FAILED", "failed to run spark-submit: image pull back-off"),
        },
    ) as api:
        yield api


def _runner(api, tmp_path, namespace="fraud-dev") -> SparkApplicationRunner:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", namespace)
    return SparkApplicationRunner(namespace, kubeconfig=str(kubeconfig), poll_seconds=0.01)


@needs_schemas
def test_the_runner_creates_the_application_and_waits_for_completion(operator_api, tmp_path):
    final = _runner(operator_api, tmp_path).run(JOB, timeout_seconds=30)
    assert spark.application_state(final) == ("COMPLETED", "")
    stored = operator_api.objects[("fraud-dev", JOB.name)]
    assert stored["spec"] == spark_application(JOB)["spec"]
    states = [r for r in operator_api.requests if r["method"] == "GET"]
    assert len(states) == 3  # SUBMITTED, RUNNING, COMPLETED


@needs_schemas
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fraud-features-oom", "FAILED: Executor lost: Container killed on request. Exit code is 137 (OOMKilled)"),
        ("fraud-features-nosubmit", "SUBMISSION_FAILED: failed to run spark-submit: image pull back-off"),
    ],
)
def test_a_failed_application_raises_with_the_drivers_reason(operator_api, tmp_path, name, expected):
    job = SparkFeatureJob(**{**JOB.__dict__, "name": name})
    with pytest.raises(SparkApplicationError) as caught:
        _runner(operator_api, tmp_path).run(job, timeout_seconds=30)
    assert str(caught.value) == f"SparkApplication fraud-dev/{name} {expected}"


@needs_schemas
def test_the_stand_in_refuses_what_the_api_server_refuses(operator_api, tmp_path):
    runner = _runner(operator_api, tmp_path)
    invalid = spark_application(JOB)
    invalid["spec"]["executor"]["instances"] = "two"
    with pytest.raises(SparkApplicationError, match=r"HTTP 422 .*spec\.executor\.instances"):
        runner.create(invalid)
    runner.create(spark_application(JOB))
    with pytest.raises(SparkApplicationError, match=r"HTTP 409 .*already exists"):
        runner.create(spark_application(JOB))
    other = _runner(operator_api, tmp_path, namespace="fraud-prod")
    with pytest.raises(SparkApplicationError, match=r"HTTP 403 .*forbidden"):
        other.run(SparkFeatureJob(**{**JOB.__dict__, "namespace": "fraud-prod"}), timeout_seconds=5)
    with pytest.raises(SparkApplicationError, match="HTTP 404"):
        runner.get("no-such-application")


def test_an_unreachable_api_server_is_one_clear_error(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    runner = SparkApplicationRunner("fraud-dev", kubeconfig=str(tmp_path / "kubeconfig"))
    runner.api.api_client.configuration.retries = 0
    with pytest.raises(SparkApplicationError, match="unreachable"):
        runner.get("x")
    with pytest.raises(SparkApplicationError, match="cannot configure"):
        SparkApplicationRunner("fraud-dev", kubeconfig=str(tmp_path / "absent"))


@needs_schemas
def test_a_build_that_never_finishes_times_out(app_validator, tmp_path):
    from tests.support.kube_api import FakeSparkOperatorAPI

    with FakeSparkOperatorAPI(app_validator, namespaces=["fraud-dev"], outcomes={JOB.name: ("RUNNING", "")}) as api:
        clock = iter(range(1000))
        runner = SparkApplicationRunner(
            "fraud-dev", kubeconfig=str(api.kubeconfig(tmp_path / "k")), poll_seconds=0, clock=lambda: next(clock)
        )
        with pytest.raises(SparkApplicationError, match=r"did not finish within 5 s \(state RUNNING\)"):
            runner.run(JOB, timeout_seconds=5)


# --- the driver's main file and the pipeline -------------------------------------------------------


def test_the_main_file_runs_the_spark_build_on_the_submitted_master():
    from fraud.features.spark_job import build_arguments

    job = build_arguments(["--data-dir", "/data", "--feature-tables-uri", "s3://b/f"], "k8s://https://10.0.0.1:443")
    assert job.build == [
        "features",
        "build",
        "--engine",
        "spark",
        "--spark-master",
        "k8s://https://10.0.0.1:443",
        "--data-dir",
        "/data",
    ]
    assert job.feature_tables_uri == "s3://b/f" and job.then == [] and job.data_dir == "/data"
    assert build_arguments(["--feature-tables-uri", "s3://b/f"], None).data_dir is None
    job = build_arguments(["--data-dir", "/d"], None)
    assert job.build == ["features", "build", "--engine", "spark", "--data-dir", "/d"]
    assert job.feature_tables_uri == "" and job.then == []
    job = build_arguments(
        ["--materialize", "--feature-tables-uri", "s3://b/f", "--data-dir", "/d", "--spark-driver-memory", "8g"], None
    )
    assert job.build == ["features", "build", "--engine", "spark", "--data-dir", "/d", "--spark-driver-memory", "8g"]
    assert job.then == [
        ["features", "apply", "--data-dir", "/d"],
        ["features", "materialize", "--incremental", "--data-dir", "/d"],
    ]


def test_the_spark_feature_pipeline_submits_then_materialises(tmp_path):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.feature_pipeline import compile_spark_feature_pipeline

    out = tmp_path / "spark.yaml"
    compile_spark_feature_pipeline(str(out))
    pipeline, platform = yaml.safe_load_all(out.read_text())
    spec = json_format.ParseDict(pipeline, pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "fraud-features-spark"
    tasks = spec.root.dag.tasks
    assert set(tasks) == {"build-features-spark", "materialize-features"}
    assert list(tasks["materialize-features"].dependent_tasks) == ["build-features-spark"]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    submit = executors["exec-build-features-spark"]
    assert [v["secretName"] for v in submit["secretAsVolume"]] == ["fraud-spark-submitter-token"]
    assert "secretAsEnv" not in submit  # the submitting pod holds no store credentials
    materialise = executors["exec-materialize-features"]
    assert {e["secretName"] for e in materialise["secretAsEnv"]} == {
        "fraud-object-store",
        "fraud-feast-registry",
        "fraud-redis",
    }


# --- the command line ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    fraud = Path(sys.executable).with_name("fraud")
    return subprocess.run(
        [str(fraud), "spark", "submit", *args], check=False, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # three CLI processes: ~40 s on the shared 2-core machine
@needs_schemas
def test_cli_reports_completion_and_a_failed_application_in_one_line(operator_api, tmp_path):
    kubeconfig = str(operator_api.kubeconfig(tmp_path / "kubeconfig", "fraud-dev"))
    common = ["--namespace", "fraud-dev", "--kubeconfig", kubeconfig, "--poll", "0.01"]
    done = _cli(*common, "--name", "fraud-features-ok", "--feature-tables-uri", "s3://b/f")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SparkApplication fraud-dev/fraud-features-ok COMPLETED"
    failed = _cli(*common, "--name", "fraud-features-oom")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "error: SparkApplication fraud-dev/fraud-features-oom FAILED: Executor lost: Container killed on request. "
        "Exit code is 137 (OOMKilled)"
    ]
    bad = _cli(*common, "--executor-memory", "lots")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: executor_memory must be like 4g or 512m, got 'lots'"
    ]


# --- the step after the SparkApplication -----------------------------------------------------------


@pytest.mark.slow  # feast apply + materialisation: ~30 s on the shared machine
def test_the_materialise_step_fetches_the_tables_built_elsewhere(tmp_path, monkeypatch):
    from test_features_offline import random_transactions, write_raw_transactions

    from fraud.config import DataLayout
    from fraud.errors import UserError
    from fraud.feature_store import online_batch_features
    from fraud.features.offline import build_offline_features
    from fraud.training.steps import materialize_feature_tables

    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "driver"))
    driver = DataLayout.current()
    raw = write_raw_transactions(driver, random_transactions(seed=11, n_customers=20, n_terminals=15, n_days=30))
    built = build_offline_features(driver)

    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "task"))  # the materialise task's own scratch
    with pytest.raises(UserError, match="does not exist"):
        materialize_feature_tables(str(tmp_path / "nothing"), DataLayout.current())
    result = materialize_feature_tables(str(driver.features), DataLayout.current())
    assert result.customer_rows == built.customer.rows and result.terminal_rows == built.terminal.rows
    assert result.last_day == raw["tx_datetime"].max().date().isoformat() == built.last_day.isoformat()
    last = raw[raw["tx_datetime"].dt.date == raw["tx_datetime"].max().date()].iloc[0]
    online = online_batch_features([last["customer_id"]], [last["terminal_id"]])
    assert online.notna().any(axis=None)  # the last snapshots reached the online store


@pytest.mark.slow  # starts Spark (local mode) twice, feast apply + materialisation: ~1.5 min on the shared machine
def test_the_main_file_builds_on_spark_copies_the_tables_and_materialises(tmp_path, monkeypatch):
    import os
    import socket

    import pandas as pd

    from fraud.config import DataLayout
    from fraud.feature_store import online_batch_features
    from fraud.simulator import SimulationConfig, simulate_to
    from fraud.training.steps import feature_table_names

    simulate_to(SimulationConfig(n_customers=40, n_terminals=80, n_days=12, seed=4), tmp_path / "data" / "raw")
    main_file = PROJECT_ROOT / "fraud" / "features" / "spark_job.py"
    # the embedded profile (SQLite online store, file registry) inside the data directory
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FRAUD_FEAST_")},
        "FRAUD_SPARK_DRIVER_MEMORY": "1g",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(main_file), "--data-dir", str(tmp_path / "data"), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )

    layout = DataLayout(tmp_path / "data")
    assert not layout.feast.exists()
    built = run("--feature-tables-uri", str(tmp_path / "store"), "--materialize", "--spark-master", "local[1]")
    assert built.returncode == 0, built.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(feature_table_names())
    # applied and materialised: the last day's snapshots are in the data directory's online store
    for name in ("FRAUD_FEAST_ONLINE", "FRAUD_FEAST_REGISTRY", "FRAUD_FEAST_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FRAUD_DATA_DIR", str(layout.root))
    raw = pd.read_parquet(layout.transactions)
    last = raw[raw["tx_datetime"].dt.date == raw["tx_datetime"].max().date()].iloc[0]
    online = online_batch_features([last["customer_id"]], [last["terminal_id"]])
    assert online.notna().any(axis=None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = run("--spark-master", f"spark://127.0.0.1:{port}")
    assert unreachable.returncode != 0
    assert unreachable.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Spark master")
