"""Talking to a Kubeflow Pipelines API server (kfp.Client): submit a run, upload the compiled
pipelines and their versions, create the recurring runs.

Every call goes through `api_errors`, which turns whatever the client raises for an unreachable
server (connection refused, DNS, TLS, timeouts) or a refused request (HTTP 4xx/5xx from the API)
into one `UserError` line naming the host and the reason: the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fraud.errors import UserError

#: Where a pod finds its ServiceAccount token (used when no token file is given).
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

#: KFP cron expressions have six fields (seconds first).
DAILY_FEATURES_CRON = "0 30 1 * * *"
WEEKLY_RETRAIN_CRON = "0 0 3 * * 1"


@dataclass(frozen=True)
class Endpoint:
    """A KFP API server and how to authenticate against it."""

    host: str
    namespace: str = ""
    token: str | None = None


def read_token(token_file: Path | None, in_cluster: Path = IN_CLUSTER_TOKEN) -> str | None:
    """The bearer token: from `token_file` if given, else the pod's ServiceAccount token if this
    runs in a pod, else None (an API server without authentication)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise UserError(f"the token file {token_file} is empty")
        return token
    if in_cluster.is_file():
        return in_cluster.read_text().strip() or None
    return None


def _reason(exc: BaseException) -> str:
    """One line saying why a call failed, from the exceptions kfp's client raises."""
    import kfp_server_api
    import urllib3

    if isinstance(exc, kfp_server_api.ApiException):
        detail = ""
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(exc.body or "")
            detail = body.get("error") or body.get("message") or ""
        if not detail and isinstance(exc.body, str):
            detail = exc.body.strip().splitlines()[0][:300] if exc.body.strip() else ""
        return f"the API answered HTTP {exc.status} {exc.reason or ''}".rstrip() + (f": {detail}" if detail else "")
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        cause = exc.reason
        return f"cannot connect ({type(cause).__name__}: {str(cause).split(': ', 1)[-1]})"
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return f"cannot connect ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def api_errors(endpoint: Endpoint, action: str) -> Iterator[None]:
    """Re-raise any failure of the client as one UserError line."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except UserError:
        raise
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        raise UserError(f"{action} ({endpoint.host}) failed: {_reason(exc)}") from None


def check_reachable(endpoint: Endpoint, timeout: float = 10.0) -> None:
    """One GET of the API's healthz endpoint: a UserError line when it cannot be reached or refuses
    (kfp.Client itself would retry a refusal five times, logging a traceback each time)."""
    import httpx

    headers = {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}
    url = f"{endpoint.host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UserError(f"connecting ({endpoint.host}) failed: cannot connect ({type(exc).__name__}: {exc})") from None
    if response.status_code >= 400:
        detail = ""
        with contextlib.suppress(ValueError, AttributeError):
            body = response.json()
            detail = body.get("error") or body.get("message") or ""
        reason = f"the API answered HTTP {response.status_code} {response.reason_phrase}".rstrip()
        raise UserError(f"connecting ({endpoint.host}) failed: {reason}" + (f": {detail}" if detail else ""))


def connect(endpoint: Endpoint):
    """A kfp.Client for `endpoint` (the namespace is the Kubeflow profile of a multi-user install)."""
    import warnings

    import kfp

    if not endpoint.host.startswith(("http://", "https://")):
        raise UserError(f"--host must be an http(s) URL of the KFP API, got {endpoint.host!r}")
    check_reachable(endpoint)
    with api_errors(endpoint, "connecting"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return kfp.Client(host=endpoint.host, namespace=endpoint.namespace or "kubeflow", existing_token=endpoint.token)


def _compiled(pipeline_func: Callable, folder: Path) -> Path:
    from kfp import compiler

    path = folder / f"{pipeline_func.name if hasattr(pipeline_func, 'name') else 'pipeline'}.yaml"
    compiler.Compiler().compile(pipeline_func=pipeline_func, package_path=str(path))
    return path


def submit_run(
    endpoint: Endpoint,
    pipeline_func: Callable,
    arguments: dict,
    *,
    experiment: str,
    service_account: str = "",
    run_name: str = "",
) -> str:
    """Create the experiment if needed and start one run of `pipeline_func`; return the run id."""
    client = connect(endpoint)
    with api_errors(endpoint, "submitting the run"):
        run = client.create_run_from_pipeline_func(
            pipeline_func,
            arguments=arguments,
            run_name=run_name or None,
            experiment_name=experiment,
            namespace=endpoint.namespace or None,
            service_account=service_account or None,
        )
    return run.run_id


@dataclass(frozen=True)
class Uploaded:
    name: str
    pipeline_id: str
    version_id: str
    version_name: str
    new_pipeline: bool


def default_version_name(name: str) -> str:
    return f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def upload(
    endpoint: Endpoint, pipeline_func: Callable, name: str, version: str = "", description: str = ""
) -> Uploaded:
    """Upload `pipeline_func` as pipeline `name`, or as a new version of it when it exists."""
    client = connect(endpoint)
    version = version or default_version_name(name)
    with tempfile.TemporaryDirectory(prefix="kfp-upload-") as tmp, api_errors(endpoint, f"uploading {name}"):
        package = _compiled(pipeline_func, Path(tmp))
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(
                str(package),
                pipeline_name=name,
                description=description or None,
                namespace=endpoint.namespace or None,
            )
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
            latest = (versions.pipeline_versions or [None])[0]
            if latest is None:
                raise UserError(f"the API created pipeline {name} ({pipeline_id}) without a version")
            return Uploaded(name, pipeline_id, latest.pipeline_version_id, latest.display_name, True)
        created = client.upload_pipeline_version(
            str(package), pipeline_version_name=version, pipeline_id=pipeline_id, description=description or None
        )
    return Uploaded(name, pipeline_id, created.pipeline_version_id, created.display_name, False)


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    pipeline: Uploaded
    arguments: dict


def validate_cron(cron: str) -> str:
    """KFP's cron format: six fields, seconds first."""
    if len(cron.split()) != 6:
        raise UserError(f"cron {cron!r} must have six fields (seconds minutes hours day month weekday)")
    return cron


def create_recurring_runs(
    endpoint: Endpoint, schedules: list[Schedule], *, experiment: str, service_account: str = ""
) -> list[str]:
    """Create one recurring run per schedule (no catch-up, one run at a time); return their ids."""
    client = connect(endpoint)
    ids = []
    with api_errors(endpoint, "creating the recurring runs"):
        experiment_id = client.create_experiment(experiment, namespace=endpoint.namespace or None).experiment_id
        for schedule in schedules:
            recurring = client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=schedule.name,
                cron_expression=validate_cron(schedule.cron),
                max_concurrency=1,
                no_catchup=True,
                params=schedule.arguments,
                pipeline_id=schedule.pipeline.pipeline_id,
                version_id=schedule.pipeline.version_id,
                service_account=service_account or None,
            )
            ids.append(recurring.recurring_run_id)
    return ids
