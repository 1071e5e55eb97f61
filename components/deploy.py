"""KFP components that roll a registered model version out to serving and decide its fate.

`deploy_model` puts the version live as a canary (or records the decision only, for target
"record"); `analyse_canary` watches the canary for a window and promotes it (MLflow alias
`champion` moved, all traffic to the new revision) or rolls it back (traffic back to the stable
revision, reason recorded in MLflow). Both write the rollout record (JSON, see
`fraud.deploy.state.RolloutRecord`) as their artifact and return the rollout state.

Targets: "record" (no serving stack: decision recorded in MLflow + artifact), "kubernetes" (KServe
InferenceService in `namespace`, in-cluster credentials of the pipeline's ServiceAccount),
"local" (the local predictor processes behind the local canary router).
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
    deployer_token_dir: str = "",
) -> str:
    """Deploy `model_version` as a canary taking `canary_traffic_percent`% of traffic; return the rollout state.
    `deployer_token_dir`: where the `fraud-deployer` ServiceAccount token is mounted (cluster runs)."""
    from pathlib import Path

    from components.base import deployer_kubeconfig
    from fraud.deploy.rollout import Connection, DeployRequest, deploy

    record = deploy(
        DeployRequest(
            model_name=model_name,
            model_version=model_version,
            target=target,
            namespace=namespace,
            canary_traffic_percent=canary_traffic_percent,
            mlflow_tracking_uri=mlflow_tracking_uri,
            connection=Connection(kubeconfig=deployer_kubeconfig(deployer_token_dir)),
        )
    )
    Path(rollout.path).parent.mkdir(parents=True, exist_ok=True)
    Path(rollout.path).write_text(record.to_json())
    rollout.metadata.update(record.summary())
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
    deployer_token_dir: str = "",
) -> str:
    """Analyse the canary over `window_seconds`, then promote or roll back; return "promoted" or "rolled_back"."""
    from pathlib import Path

    from components.base import deployer_kubeconfig
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
            connection=Connection(kubeconfig=deployer_kubeconfig(deployer_token_dir)),
        ),
        deployed=deployed,
    )
    return record.state.value
