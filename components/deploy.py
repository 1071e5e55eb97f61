"""KFP components that roll a registered model version out to serving and decide its fate.

`deploy_model` puts the version live as a canary (or records the decision only, for target
"record"); `analyse_canary` watches the canary for a window and promotes it (MLflow alias
`champion` moved, all traffic to the new revision) or rolls it back (traffic back to the stable
revision, reason recorded in MLflow). Both write the rollout record (JSON, see
`fraud.deploy.state.RolloutRecord`) as their artifact and return the rollout state.

Targets: "kubernetes" (KServe InferenceService in `namespace`, in-cluster credentials of the
pipeline's ServiceAccount; the pipeline's default), "local" (the local predictor processes behind
the local canary router), "record" (a test target: no serving stack and no canary, the decision is
recorded in MLflow + artifact only). The artifact's metadata says whether a canary ran
(`canary`) and under which traffic steps (`steps`), so the choice is visible in the run.

`rollout_policy` is the text of a rollout policy file (`kustomize/overlays/<env>/rollout-policy.yaml`);
"" = one step at `canary_traffic_percent` for `window_seconds` with the default checks.
`overlay` (kubernetes target): the kustomize overlay a first deployment creates the InferenceService
from, dev | staging | prod as packaged with `fraud` (see `fraud.deploy.overlay`).
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.base import CORE_IMAGE


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def deploy_model(
    model_name: str,
    model_version: str,
    mlflow_tracking_uri: str,
    target: str,
    namespace: str,
    canary_traffic_percent: int,
    rollout: Output[Artifact],
    rollout_policy: str = "",
    first_deploy: bool = False,
    overlay: str = "prod",
    deployer_token_dir: str = "",
) -> str:
    """Deploy `model_version` as a canary taking the first step's share of traffic; return the rollout state.
    `deployer_token_dir`: where the `fraud-deployer` ServiceAccount token is mounted (cluster runs)."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from pathlib import Path

    from components.base import deployer_kubeconfig
    from fraud.deploy.policy import parse_policy
    from fraud.deploy.rollout import AlreadyRolledBack, Connection, DeployRequest, deploy

    policy = parse_policy(rollout_policy) if rollout_policy.strip() else None
    try:
        record = deploy(
            DeployRequest(
                model_name=model_name,
                model_version=model_version,
                target=target,
                namespace=namespace,
                canary_traffic_percent=canary_traffic_percent,
                mlflow_tracking_uri=mlflow_tracking_uri,
                policy=policy,
                first_deploy=first_deploy,
                connection=Connection(kubeconfig=deployer_kubeconfig(deployer_token_dir), overlay=overlay),
            )
        )
    except AlreadyRolledBack as exc:  # a re-run of this step after its rollout was decided
        record = exc.record
    Path(rollout.path).parent.mkdir(parents=True, exist_ok=True)
    Path(rollout.path).write_text(record.to_json())
    steps = policy.steps if policy is not None else ()
    rollout.metadata.update(
        {
            **record.summary(),
            "canary": target != "record" and bool(record.previous_version),
            "steps": " -> ".join(f"{s.percent}%/{s.window_seconds}s" for s in steps) or f"{canary_traffic_percent}%",
        }
    )
    return record.state.value


@dsl.component(base_image=CORE_IMAGE, install_kfp_package=False)
def analyse_canary(
    model_name: str,
    model_version: str,
    mlflow_tracking_uri: str,
    target: str,
    namespace: str,
    prometheus_url: str,
    window_seconds: int,
    rollout: Input[Artifact],
    rollout_policy: str = "",
    overlay: str = "prod",
    deployer_token_dir: str = "",
) -> str:
    """Analyse the canary over `window_seconds`, then promote or roll back; return "promoted" or "rolled_back"."""
    from fraud.settings import read_at_entry

    read_at_entry()  # the one read of the environment in this task
    from pathlib import Path

    from components.base import deployer_kubeconfig
    from fraud.deploy.policy import parse_policy
    from fraud.deploy.rollout import AnalyseRequest, Connection, analyse
    from fraud.deploy.state import RolloutRecord

    deployed = RolloutRecord.from_json(Path(rollout.path).read_text())
    record = analyse(
        AnalyseRequest(
            model_name=model_name,
            model_version=model_version,
            target=target,
            namespace=namespace,
            prometheus_url=prometheus_url,
            window_seconds=window_seconds,
            mlflow_tracking_uri=mlflow_tracking_uri,
            connection=Connection(kubeconfig=deployer_kubeconfig(deployer_token_dir), overlay=overlay),
            policy=parse_policy(rollout_policy) if rollout_policy.strip() else None,
        ),
        deployed=deployed,
    )
    return record.state.value
