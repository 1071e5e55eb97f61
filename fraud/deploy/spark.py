"""The offline feature build as a Kubeflow Spark Operator `SparkApplication`.

`spark_application(job)` is the one place the object is built (the KFP component, `fraud spark
submit` and the tests use it; `manifests/spark-features.yaml` holds the same object as a
template and a `ScheduledSparkApplication` for the daily build). Its driver runs
`fraud/features/spark_job.py` from the core image, which runs `fraud features build --engine spark`
on the master the operator submitted it to, with executors asked for in `spec.executor`.

`SparkApplicationRunner` creates the object through the Kubernetes API
(`kubernetes.client.CustomObjectsApi`), polls `status.applicationState.state` until the
application is COMPLETED, and raises `SparkApplicationError` with the driver's reason
(`status.applicationState.errorMessage`) when it FAILED or its submission failed.

Pods run as `fraud-spark` (driver: ServiceAccount `fraud-spark-driver`, which may create and
delete executor pods and their ConfigMaps in its own namespace only; executors: `fraud-spark-executor`,
no API access), non-root, all capabilities dropped, seccomp RuntimeDefault. Driver and executors
share the data volume (claim `data_claim`, ReadWriteMany): the raw transactions are read from it
and the feature tables written to it, then copied to `feature_tables_uri`. With `materialize`
(the daily ScheduledSparkApplication) the driver then runs `feast apply` and an incremental
materialisation into the online store the predictors read: only the driver gets the serving
namespace's store settings, the Redis CA and password and the registry's URL.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GROUP = "sparkoperator.k8s.io"
API_VERSION = "v1beta2"
KIND = "SparkApplication"
PLURAL = "sparkapplications"
SCHEDULED_KIND = "ScheduledSparkApplication"
#: the driver's main file inside the core image (the image copies the project to /app)
MAIN_APPLICATION_FILE = "local:///app/fraud/features/spark_job.py"
#: the Spark release line of the image's pyspark (uv.lock: pyspark 4.0.5); the operator records it
SPARK_VERSION = "4.0.5"
DRIVER_SERVICE_ACCOUNT = "fraud-spark-driver"
EXECUTOR_SERVICE_ACCOUNT = "fraud-spark-executor"
APP_NAME_LABEL = "fraud-spark"
DATA_MOUNT = "/data"
DATA_VOLUME = "data"
LOCAL_DIR_VOLUME = "spark-local-dir-1"
LOCAL_DIR_MOUNT = "/var/spark-local"
TMP_VOLUME = "tmp"
#: Secret with the object store credentials (the same one the pipeline's tasks read)
OBJECT_STORE_SECRET = "fraud-object-store"  # noqa: S105 - name of a Kubernetes Secret, not its value
#: non-secret settings of the pipeline's tasks (AWS_ENDPOINT_URL, FRAUD_* ...)
CONFIG_MAP = "fraud-pipeline-config"
#: A driver that materialises also reads the serving namespace's online-store settings (Redis
#: host, port, TLS: the ConfigMap the predictors read, so it loads the store they serve from),
#: the Redis CA, the Redis password and the Feast registry's URL, as the predictors and the
#: pipeline's materialise step do. Executors never get them.
SERVING_CONFIG_MAP = "fraud-serving-config"
MATERIALIZE_SECRETS: dict[str, tuple[str, str]] = {
    "FRAUD_FEAST_REGISTRY_URL": ("fraud-feast-registry", "url"),
    "FRAUD_REDIS_PASSWORD": ("fraud-redis", "password"),
}
REDIS_CA_SECRET = "fraud-redis-ca"  # noqa: S105 - name of a Kubernetes Secret, not its value
REDIS_CA_VOLUME = "redis-ca"
REDIS_CA_MOUNT = "/etc/fraud/redis-ca"  # FRAUD_REDIS_CA_CERT of fraud-serving-config points here
RUN_AS_USER = 10001
DRIVER_PORT = 7078
BLOCK_MANAGER_PORT = 7079

COMPLETED = "COMPLETED"
FAILED_STATES = frozenset({"FAILED", "SUBMISSION_FAILED", "INVALIDATING", "UNKNOWN"})

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[1-9][0-9]*[kmgt]$")


class SparkApplicationError(Exception):
    """The SparkApplication could not be created, failed, or did not finish in time."""


@dataclass(frozen=True)
class SparkFeatureJob:
    """One feature build on the Spark Operator. Memory sizes use Spark's units (`4g`, `512m`)."""

    name: str
    namespace: str
    image: str
    feature_tables_uri: str = ""
    executor_instances: int = 2
    executor_cores: int = 1
    executor_memory: str = "4g"
    driver_cores: int = 1
    driver_memory: str = "2g"
    #: PersistentVolumeClaim (ReadWriteMany) with the data directory: raw/ in, features/ out
    data_claim: str = "fraud-feature-data"
    #: after the build and the copy, `feast apply` and an incremental materialisation into the
    #: online store, from the driver (the daily ScheduledSparkApplication does; the Spark feature
    #: pipeline leaves it to its own materialise step)
    materialize: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for what in ("name", "namespace", "data_claim"):
            value = getattr(self, what)
            if not (isinstance(value, str) and len(value) <= 63 and _DNS_LABEL.match(value)):
                raise SparkApplicationError(f"{what} {value!r} is not a DNS-1123 label (a-z, 0-9, '-', <= 63)")
        if not self.image.strip():
            raise SparkApplicationError("image must name the core image (registry/name:tag)")
        for what in ("executor_instances", "executor_cores", "driver_cores"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SparkApplicationError(f"{what} must be a positive integer, got {value!r}")
        for what in ("executor_memory", "driver_memory"):
            if not _QUANTITY.match(str(getattr(self, what))):
                raise SparkApplicationError(f"{what} must be like 4g or 512m, got {getattr(self, what)!r}")
        if self.materialize and not self.feature_tables_uri:
            raise SparkApplicationError(
                "materialize needs feature_tables_uri: the tables are stored before the online store is loaded"
            )


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,  # scratch: the emptyDirs at /tmp and LOCAL_DIR_MOUNT
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod(role: str, cores: int, memory: str, service_account: str) -> dict[str, Any]:
    return {
        "cores": cores,
        "memory": memory,
        "serviceAccount": service_account,
        "labels": {
            "app.kubernetes.io/name": APP_NAME_LABEL,
            "app.kubernetes.io/component": role,
            "app.kubernetes.io/part-of": "fraud-platform",
        },
        "podSecurityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "securityContext": _security_context(),
        "envFrom": [{"configMapRef": {"name": CONFIG_MAP}}],
        "envSecretKeyRefs": {
            "AWS_ACCESS_KEY_ID": {"name": OBJECT_STORE_SECRET, "key": "access-key-id"},
            "AWS_SECRET_ACCESS_KEY": {"name": OBJECT_STORE_SECRET, "key": "secret-access-key"},
        },
        "env": [{"name": "FRAUD_DATA_DIR", "value": DATA_MOUNT}],
        "volumeMounts": [
            {"name": DATA_VOLUME, "mountPath": DATA_MOUNT},
            {"name": LOCAL_DIR_VOLUME, "mountPath": LOCAL_DIR_MOUNT},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 - an emptyDir mounted at /tmp, not a path used
        ],
    }


def spark_application(job: SparkFeatureJob) -> dict[str, Any]:
    """The SparkApplication running `fraud features build --engine spark` for `job`."""
    arguments = ["--data-dir", DATA_MOUNT]
    if job.feature_tables_uri:
        arguments += ["--feature-tables-uri", job.feature_tables_uri]
    if job.materialize:
        arguments.append("--materialize")
    arguments += list(job.extra_args)
    driver = _pod("driver", job.driver_cores, job.driver_memory, DRIVER_SERVICE_ACCOUNT)
    executor = _pod("executor", job.executor_cores, job.executor_memory, EXECUTOR_SERVICE_ACCOUNT)
    executor["instances"] = job.executor_instances
    executor["deleteOnTermination"] = True
    volumes: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": job.data_claim}},
        # Spark on Kubernetes uses volumes named spark-local-dir-* as its shuffle/spill space
        {"name": LOCAL_DIR_VOLUME, "emptyDir": {}},
        {"name": TMP_VOLUME, "emptyDir": {}},
    ]
    if job.materialize:
        driver["envFrom"].append({"configMapRef": {"name": SERVING_CONFIG_MAP}})
        driver["envSecretKeyRefs"].update(
            {env: {"name": secret, "key": key} for env, (secret, key) in MATERIALIZE_SECRETS.items()}
        )
        driver["volumeMounts"].append({"name": REDIS_CA_VOLUME, "mountPath": REDIS_CA_MOUNT, "readOnly": True})
        volumes.append(
            {
                "name": REDIS_CA_VOLUME,
                "secret": {"secretName": REDIS_CA_SECRET, "items": [{"key": "ca.crt", "path": "ca.crt"}]},
            }
        )
    return {
        "apiVersion": f"{GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": job.name,
            "namespace": job.namespace,
            "labels": {"app.kubernetes.io/name": APP_NAME_LABEL, "app.kubernetes.io/part-of": "fraud-platform"},
        },
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": job.image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": MAIN_APPLICATION_FILE,
            "arguments": arguments,
            "sparkVersion": SPARK_VERSION,
            "sparkConf": {
                "spark.sql.session.timeZone": "UTC",
                "spark.kubernetes.executor.deleteOnTermination": "true",
                # fixed ports, so the NetworkPolicy `fraud-spark` can name them
                "spark.driver.port": str(DRIVER_PORT),
                "spark.driver.blockManager.port": str(BLOCK_MANAGER_PORT),
                "spark.blockManager.port": str(BLOCK_MANAGER_PORT),
                "spark.ui.enabled": "false",
            },
            "restartPolicy": {"type": "Never"},
            "timeToLiveSeconds": 86_400,
            "volumes": volumes,
            "driver": driver,
            "executor": executor,
        },
    }


def application_state(obj: dict[str, Any]) -> tuple[str, str]:
    """(state, errorMessage) of a SparkApplication; ("", "") before the operator has seen it."""
    state = (obj.get("status") or {}).get("applicationState") or {}
    return str(state.get("state") or ""), str(state.get("errorMessage") or "")


class SparkApplicationRunner:
    """Creates SparkApplications in one namespace and waits for them, through the Kubernetes API."""

    def __init__(
        self,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        poll_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        self.namespace = namespace
        self.poll_seconds = poll_seconds
        self._sleep = sleep
        self._clock = clock
        try:
            api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
        except (ConfigException, OSError, TypeError) as exc:
            if kubeconfig is not None:
                raise SparkApplicationError(
                    f"cannot configure the Kubernetes client from {kubeconfig}: {exc}"
                ) from None
            try:  # no kubeconfig: the pod's own ServiceAccount
                config.load_incluster_config()
            except ConfigException:
                raise SparkApplicationError(
                    f"cannot configure the Kubernetes client: no kubeconfig and not in a cluster ({exc})"
                ) from None
            api_client = client.ApiClient()
        self.api = client.CustomObjectsApi(api_client)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(GROUP, API_VERSION, self.namespace, PLURAL, *args, _request_timeout=60)
        except ApiException as exc:
            raise SparkApplicationError(f"{what} failed: HTTP {exc.status} {_api_message(exc)}") from None
        except (HTTPError, OSError) as exc:
            raise SparkApplicationError(f"{what} failed: the Kubernetes API is unreachable ({exc})") from None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        return self._call(
            f"creating SparkApplication {self.namespace}/{name}", self.api.create_namespaced_custom_object, obj
        )

    def get(self, name: str) -> dict[str, Any]:
        return self._call(
            f"reading SparkApplication {self.namespace}/{name}", self.api.get_namespaced_custom_object, name
        )

    def wait(self, name: str, timeout_seconds: float) -> dict[str, Any]:
        """Poll until COMPLETED (returns the object); SparkApplicationError on failure or timeout."""
        deadline = self._clock() + timeout_seconds
        while True:
            obj = self.get(name)
            state, message = application_state(obj)
            if state == COMPLETED:
                return obj
            if state in FAILED_STATES:
                reason = message or "no error message from the driver"
                raise SparkApplicationError(f"SparkApplication {self.namespace}/{name} {state}: {reason}")
            if self._clock() >= deadline:
                raise SparkApplicationError(
                    f"SparkApplication {self.namespace}/{name} did not finish within {timeout_seconds:g} s "
                    f"(state {state or 'not yet submitted'})"
                )
            self._sleep(self.poll_seconds)

    def run(self, job: SparkFeatureJob, timeout_seconds: float) -> dict[str, Any]:
        """Create the job's SparkApplication and wait for it to complete."""
        if job.namespace != self.namespace:
            raise SparkApplicationError(f"job namespace {job.namespace} is not the runner's {self.namespace}")
        self.create(spark_application(job))
        return self.wait(job.name, timeout_seconds)


def _api_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)
