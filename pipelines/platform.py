"""Kubernetes configuration of the training pipeline's tasks (kfp-kubernetes), in one table.

Every task of a cluster run is its own pod. What a task may use besides its artifacts is declared
here and nowhere else:

* settings from the ConfigMap `fraud-pipeline-config` (service addresses, Feast profile, the
  scratch data directory) and credentials from Secrets, each only on the tasks that use that
  service (`TASK_SERVICES`);
* an emptyDir at `/scratch` (the task's data directory, gone with the pod);
* CPU / memory requests and limits (`TASK_RESOURCES`);
* retries with exponential back-off on the steps that are safe to repeat (`RETRIED_TASKS`);
* caching off on the steps with side effects (`UNCACHED_TASKS`);
* the deployer's credentials (the token of ServiceAccount `fraud-deployer`, from Secret
  `fraud-deployer-token`) mounted only into the deploy steps; the run's own ServiceAccount needs
  no Kubernetes API rights.

`kfp.local` ignores all of it: local runs take their settings from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import kubernetes
from kfp.dsl import PipelineTask

#: ConfigMap with the non-secret settings of every task (keys are environment variable names).
CONFIG_MAP = "fraud-pipeline-config"
#: Where each task's emptyDir is mounted; FRAUD_DATA_DIR in the ConfigMap points below it.
SCRATCH_MOUNT = "/scratch"
SCRATCH_VOLUME = "scratch"
#: Secret holding the `fraud-deployer` ServiceAccount token (type kubernetes.io/service-account-token).
DEPLOYER_SECRET = "fraud-deployer-token"  # noqa: S105 - name of a Kubernetes Secret, not its value
DEPLOYER_TOKEN_DIR = "/var/run/secrets/fraud-deployer"  # noqa: S105 - mount path of the Secret, not a password
#: Secret holding the `fraud-spark-submitter` ServiceAccount token: may create SparkApplications.
SPARK_SUBMITTER_SECRET = "fraud-spark-submitter-token"  # noqa: S105 - name of a Kubernetes Secret, not its value
SPARK_SUBMITTER_TOKEN_DIR = "/var/run/secrets/fraud-spark-submitter"  # noqa: S105 - mount path, not a password

#: Secret name -> {secret key: environment variable}.
SECRETS: dict[str, dict[str, str]] = {
    "fraud-object-store": {"access-key-id": "AWS_ACCESS_KEY_ID", "secret-access-key": "AWS_SECRET_ACCESS_KEY"},
    "fraud-feast-registry": {"url": "FRAUD_FEAST_REGISTRY_URL"},
    "fraud-redis": {"password": "FRAUD_REDIS_PASSWORD"},
    "fraud-mlflow": {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
}
OBJECT_STORE, FEAST_REGISTRY, REDIS, MLFLOW = SECRETS
#: Secrets a cluster may lack: Redis without a password, an MLflow server without authentication.
OPTIONAL_SECRETS: frozenset[str] = frozenset({REDIS, MLFLOW})

#: The services (secrets) each task uses.
TASK_SERVICES: dict[str, tuple[str, ...]] = {
    "ingest": (OBJECT_STORE,),
    "engineer-features": (OBJECT_STORE, FEAST_REGISTRY, REDIS),
    "build-training-set": (OBJECT_STORE,),
    "train": (MLFLOW,),
    "evaluate": (MLFLOW,),
    "gate": (MLFLOW,),
    "register": (MLFLOW,),
    "deploy-model": (MLFLOW,),
    "analyse-canary": (MLFLOW,),
    # the feature build on the Spark Operator: the driver gets the object store's secret itself
    "build-features-spark": (),
    "materialize-features": (OBJECT_STORE, FEAST_REGISTRY, REDIS),
}


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


TASK_RESOURCES: dict[str, Resources] = {
    "ingest": Resources("500m", "2", "1G", "4G"),
    "engineer-features": Resources("1", "2", "2G", "8G"),
    "build-training-set": Resources("1", "2", "2G", "8G"),
    "train": Resources("2", "4", "2G", "8G"),
    "evaluate": Resources("1", "2", "1G", "4G"),
    "gate": Resources("100m", "500m", "256M", "512M"),
    "register": Resources("250m", "1", "512M", "2G"),
    "deploy-model": Resources("100m", "500m", "256M", "1G"),
    "analyse-canary": Resources("100m", "500m", "256M", "1G"),
    "build-features-spark": Resources("100m", "500m", "256M", "512M"),
    "materialize-features": Resources("1", "2", "2G", "8G"),
}

#: Steps that only read inputs and write their own outputs (or idempotent service state: the
#: object store, a re-materialisation, MLflow tags): a network hiccup is retried. Not retried:
#: `train` (a second MLflow run), `register` (a second model version) and the deploy steps.
RETRIED_TASKS: frozenset[str] = frozenset(
    {"ingest", "engineer-features", "build-training-set", "evaluate", "gate", "materialize-features"}
)
RETRIES = 3
BACKOFF_DURATION = "30s"
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_DURATION = "10m"

#: Steps whose effect is outside their outputs (Redis / object store, MLflow registry, serving):
#: a cached result would skip the effect.
UNCACHED_TASKS: frozenset[str] = frozenset(
    {
        "engineer-features",
        "gate",
        "register",
        "deploy-model",
        "analyse-canary",
        "build-features-spark",
        "materialize-features",
    }
)
#: Steps that talk to the Kubernetes API as `fraud-deployer`.
DEPLOY_TASKS: frozenset[str] = frozenset({"deploy-model", "analyse-canary"})
#: Steps that create SparkApplications as `fraud-spark-submitter`.
SPARK_SUBMIT_TASKS: frozenset[str] = frozenset({"build-features-spark"})


def configure_task(task: PipelineTask, name: str) -> PipelineTask:
    """Apply this module's table to `task` (its component name `name`, e.g. "deploy-model")."""
    if name not in TASK_SERVICES:
        raise KeyError(f"no platform configuration for task {name!r}")
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {key: key for key in CONFIG_KEYS})
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {key: key for key in OPTIONAL_CONFIG_KEYS}, optional=True)
    for secret in TASK_SERVICES[name]:
        kubernetes.use_secret_as_env(task, secret, SECRETS[secret], optional=secret in OPTIONAL_SECRETS)
    kubernetes.empty_dir_mount(task, volume_name=SCRATCH_VOLUME, mount_path=SCRATCH_MOUNT)
    resources = TASK_RESOURCES[name]
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    if name in RETRIED_TASKS:
        task.set_retry(
            num_retries=RETRIES,
            backoff_duration=BACKOFF_DURATION,
            backoff_factor=BACKOFF_FACTOR,
            backoff_max_duration=BACKOFF_MAX_DURATION,
        )
    if name in UNCACHED_TASKS:
        task.set_caching_options(False)
    if name in DEPLOY_TASKS:
        kubernetes.use_secret_as_volume(task, secret_name=DEPLOYER_SECRET, mount_path=DEPLOYER_TOKEN_DIR)
    if name in SPARK_SUBMIT_TASKS:
        kubernetes.use_secret_as_volume(task, secret_name=SPARK_SUBMITTER_SECRET, mount_path=SPARK_SUBMITTER_TOKEN_DIR)
    return task


#: Keys of `fraud-pipeline-config`, each exported under its own name: required ...
CONFIG_KEYS: tuple[str, ...] = (
    "FRAUD_DATA_DIR",
    "FRAUD_FEAST_ONLINE",
    "FRAUD_FEAST_REGISTRY",
    "FRAUD_REDIS_HOST",
    "MLFLOW_TRACKING_URI",
)
#: ... and optional (AWS_ENDPOINT_URL only for MinIO / another S3-compatible server).
OPTIONAL_CONFIG_KEYS: tuple[str, ...] = (
    "FRAUD_FEAST_PROJECT",
    "FRAUD_REDIS_PORT",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def service_env_names() -> tuple[str, ...]:
    """Every environment variable through which a task reaches its services (ConfigMap keys and
    secret keys above, except the scratch directory): what an isolated local run passes on."""
    names = [key for key in (*CONFIG_KEYS, *OPTIONAL_CONFIG_KEYS) if key != "FRAUD_DATA_DIR"]
    names += [env for keys in SECRETS.values() for env in keys.values()]
    # local equivalents of the split Redis settings and of temporary S3 credentials
    names += ["FRAUD_REDIS_URL", "AWS_SESSION_TOKEN"]
    return tuple(dict.fromkeys(names))
