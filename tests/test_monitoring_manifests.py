"""The retraining CronJob as the overlays build it: valid Kubernetes (kubernetes_validate, strict),
least privilege, and its command line accepted by the real `fraud monitor check` — run once with
the CronJob's own arguments against a local /metrics server and audit database. Likewise the audit
trail's command lines: the migration Job's `fraud audit migrate` and the predictor pod's
`fraud audit writer` container, which must drain a spooled decision and serve every audit metric
the alerts and the dashboard read."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fraud.config import PROJECT_ROOT
from fraud.net import free_port
from tests.test_audit_support import pg_database  # noqa: F401 - fixture

KUBERNETES_VERSION = "1.32.0"
FRAUD = str(Path(sys.executable).with_name("fraud"))

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(PROJECT_ROOT / "kustomize" / "overlays" / "prod")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(cronjob: dict) -> dict:
    (found,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return found


def test_cronjob_objects_are_valid_kubernetes(prod):
    import kubernetes_validate

    for kind, name in (("CronJob", "fraud-retrain-check"), ("ServiceAccount", "fraud-monitor"),
                       ("PersistentVolumeClaim", "fraud-monitor-state")):  # fmt: skip
        kubernetes_validate.validate(named(prod, kind, name), KUBERNETES_VERSION, strict=True)
    broken = named(prod, "CronJob", "fraud-retrain-check")
    broken = {**broken, "spec": {**broken["spec"], "concurencyPolicy": "Forbid"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_checker_runs_with_least_privilege_and_never_twice(prod):
    cronjob = named(prod, "CronJob", "fraud-retrain-check")
    assert cronjob["metadata"]["namespace"] == "fraud-prod"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "fraud-monitor" and pod["automountServiceAccountToken"] is False
    assert named(prod, "ServiceAccount", "fraud-monitor")["automountServiceAccountToken"] is False
    bound = [s["name"] for d in prod if d["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in d["subjects"]]
    assert "fraud-monitor" not in bound
    main = container(cronjob)
    security = main["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert re.fullmatch(r"ghcr\.io/fraud-platform/fraud-core:\d+\.\d+\.\d+", main["image"]), main["image"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    state_dir = main["args"][main["args"].index("--state-dir") + 1]
    assert mounts["state"] == state_dir
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "fraud-monitor-state"
    for env in main["env"]:
        if re.search(r"(?i)password|token|secret", env["name"]):
            assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], env["name"]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion of container args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_the_cronjob_command_line_is_accepted_by_fraud_monitor_check(prod, tmp_path):
    main = container(named(prod, "CronJob", "fraud-retrain-check"))
    assert main["command"] == ["fraud", "monitor", "check"]
    registry = CollectorRegistry()
    Counter("fraud_drift_windows_evaluated", "x", registry=registry).inc(4)
    Counter("fraud_drift_windows_drifted", "x", registry=registry).inc(1)
    Gauge("fraud_drift_detected", "x", registry=registry).set(0)
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        audit_db = f"sqlite:///{tmp_path / 'audit.db'}"
        migrated = subprocess.run([FRAUD, "audit", "migrate", "--db-url", audit_db],
                                  capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert migrated.returncode == 0, migrated.stderr
        values = {
            "POD_NAMESPACE": "fraud-prod",
            "PROMETHEUS_URL": f"http://127.0.0.1:{server.server_address[1]}",  # stands in for /federate
        }
        args = [expand(a, values) for a in main["args"]]
        args[args.index("--state-dir") + 1] = str(tmp_path / "state")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "MLFLOW_"))}
        env.update(FRAUD_DATA_DIR=str(tmp_path / "data"), FRAUD_AUDIT_DB_URL=audit_db)
        result = subprocess.run([FRAUD, *main["command"][1:], *args], capture_output=True, text=True,
                                env=env, timeout=120, check=False)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    # parsed every option, scraped the drift series, read the (empty) live quality; nothing sustained
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "no retrain: no sustained drift or quality loss"
    state = yaml.safe_load((tmp_path / "state" / "state.json").read_text())
    assert state["drift"] == {"windows_evaluated": 4.0, "windows_drifted": 1.0, "streak": 0}


def audit_metrics_read_by_alerts_and_dashboard() -> set[str]:
    from tests.support.prometheus import names_read

    rules = yaml.safe_load((PROJECT_ROOT / "manifests" / "prometheusrule.yaml").read_text())
    exprs = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    dashboard = json.loads((PROJECT_ROOT / "manifests" / "fraud-detector-dashboard.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in exprs for name in names_read(expr) if name.startswith("fraud_audit_")}


def _container_env(container: dict, configmaps: dict[str, dict], secrets: dict[str, dict]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env entries
    (literal values with `$(VAR)` expanded, Secret keys from `secrets`)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@pytest.mark.postgres
def test_the_audit_migration_and_writer_command_lines_work(prod, tmp_path, pg_database):  # noqa: F811
    """The Job's and the writer container's own command lines and environments, run for real on
    PostgreSQL (a temporary file for the emptyDir): the migration role migrates and grants, the
    writer connects as the INSERT-only role whose password holds `@`, `/` and `:` (the URL is
    composed in code), a spooled decision reaches the database, /metrics serves what the alerts
    read, SIGTERM stops the writer cleanly. Local PostgreSQL has no TLS: sslmode is the only
    setting replaced (verify-full is tested against it separately)."""
    import uuid

    from httpx import get
    from prometheus_client.parser import text_string_to_metric_families
    from sqlalchemy import create_engine, text

    from fraud.audit import AuditSpool
    from fraud.audit.chain import verify_decisions
    from fraud.audit.store import find_decisions
    from tests.support.prometheus import exposition_names
    from tests.test_audit_support import PG_HOST, PG_PORT, make_decision

    (job,) = [d for d in prod if d["kind"] == "Job"]
    migrate = job["spec"]["template"]["spec"]["containers"][0]
    (isvc,) = [d for d in prod if d["kind"] == "InferenceService"]
    (writer,) = [c for c in isvc["spec"]["predictor"]["containers"] if c["name"] == "audit-writer"]
    suffix = uuid.uuid4().hex[:8]
    writer_role, reader_role = f"fraud_writer_{suffix}", f"fraud_reader_{suffix}"
    password = "p@ss/w:rd%40"
    for role in (writer_role, reader_role):
        pg_database.execute_admin(f"CREATE ROLE {role} LOGIN PASSWORD %s", password)
    configmaps = {
        name: dict(data)
        for name, data in ((d["metadata"]["name"], d.get("data", {})) for d in prod if d["kind"] == "ConfigMap")
    }
    audit_db = configmaps["fraud-audit-db"]
    assert audit_db["FRAUD_AUDIT_DB_SSLMODE"] == "verify-full"
    audit_db.update(FRAUD_AUDIT_DB_HOST=PG_HOST, FRAUD_AUDIT_DB_PORT=str(PG_PORT),
                    FRAUD_AUDIT_DB_NAME=pg_database.name, FRAUD_AUDIT_DB_SSLMODE="disable")  # fmt: skip
    secrets = {
        "fraud-audit-migrator": {"username": "postgres", "password": "unused"},
        "fraud-audit-writer": {"username": writer_role, "password": password},
        "fraud-audit-reader": {"username": reader_role, "password": password},
        "fraud-audit-chain": {"key": "chain-key"},
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "MLFLOW_"))}
    base["FRAUD_DATA_DIR"] = str(tmp_path / "data")
    try:
        migrate_env = base | _container_env(migrate, configmaps, secrets)
        assert migrate["command"][:1] == ["fraud"] and writer["command"][:1] == ["fraud"]
        migrate_args = [expand(a, migrate_env) for a in migrate.get("args", [])]
        migrated = subprocess.run([FRAUD, *migrate["command"][1:], *migrate_args],
                                  capture_output=True, text=True, env=migrate_env, timeout=120,
                                  check=False)  # fmt: skip
        assert migrated.returncode == 0, migrated.stderr
        assert "is at migration" in migrated.stdout and f"granted: {writer_role}" in migrated.stdout
        env = base | _container_env(writer, configmaps, secrets)
        assert "FRAUD_AUDIT_DB_URL" not in env and env["FRAUD_AUDIT_DB_PASSWORD"] == password
        args = list(writer["args"])
        spool_dir = tmp_path / "emptydir"
        spool = spool_dir / Path(args[args.index("--spool") + 1]).name
        args[args.index("--spool") + 1] = str(spool)
        port = free_port()
        args[args.index("--metrics-port") + 1] = str(port)
        spooled = AuditSpool(spool)
        spooled.append([make_decision(1)])
        spooled.close()
        process = subprocess.Popen([FRAUD, *writer["command"][1:], *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            engine = create_engine(pg_database.url)
            deadline = time.monotonic() + 60
            while not find_decisions(engine, "TX0000000001") and time.monotonic() < deadline:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.2)
            assert len(find_decisions(engine, "TX0000000001")) == 1
            exposition = get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            samples = {s.name: s.value for f in text_string_to_metric_families(exposition) for s in f.samples}
            assert samples["fraud_audit_written_total"] == 1.0 and samples["fraud_audit_spool_backlog"] == 0.0
            read = audit_metrics_read_by_alerts_and_dashboard()
            assert {
                "fraud_audit_spool_backlog",
                "fraud_audit_written_total",
                "fraud_audit_spool_appended_total",
            } <= read
            assert read - exposition_names(exposition) == set()
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "audit writer draining" in output
        drained = AuditSpool(spool)
        try:
            assert drained.depth() == 0
        finally:
            drained.close()
        assert verify_decisions(engine, b"chain-key").ok  # chained with the key from the Secret
        owner = create_engine(pg_database.url)
        with owner.connect() as connection:
            chained = connection.execute(text("SELECT count(*) FROM decisions WHERE chain_id IS NOT NULL"))
            assert chained.scalar_one() == 1
        owner.dispose()
        engine.dispose()
    finally:
        pg_database.drop_roles(writer_role, reader_role)
