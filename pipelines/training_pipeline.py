"""The training pipeline: ingest -> features -> training sets -> train -> evaluate -> gate ->
(if passed) register -> deploy canary -> analyse canary.

`legit_per_day` > 0 keeps at most that many legitimate transactions per training day in the
training frames (every fraud kept, the kept rows weighted back; `build_training_set`); 0, the
default, keeps everything.

A failed gate ends the run after `gate`: nothing is registered or deployed, and the reason is
the gate's `reason` output, its Metrics artifact and the `gate.reason` tag of the MLflow run.
"""

from kfp import compiler, dsl

from components.deploy import analyse_canary, deploy_model
from components.training import build_training_set, engineer_features, evaluate, gate, ingest, register, train
from fraud.config import MODEL_NAME
from pipelines.platform import DEPLOYER_TOKEN_DIR, configure_task

PIPELINE_NAME = "fraud-training"
#: The gate verdict that lets the run register and deploy.
GATE_PASSED = "passed"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate raw transactions, build Feast features, train and evaluate an XGBoost fraud model, "
    "gate it against the champion, register it in MLflow and roll it out as a canary.",
)
def training_pipeline(
    data_uri: str,
    train_start: str = "",
    feature_tables_uri: str = "",
    mlflow_tracking_uri: str = "",
    max_timestamp: str = "",
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    n_validation_folds: int = 3,
    legit_per_day: int = 0,
    small_grid: bool = False,
    compare_baselines: bool = False,
    decline_precision: float = 0.9,
    review_alerts_per_day: int = 100,
    min_average_precision: float = 0.5,
    max_ap_drop_vs_champion: float = 0.02,
    max_prediction_cost_us: float = 2000.0,
    deploy_target: str = "kubernetes",
    namespace: str = "fraud",
    canary_traffic_percent: int = 10,
    prometheus_url: str = "",
    canary_window_seconds: int = 600,
    rollout_policy: str = "",
    first_deploy: bool = False,
    overlay: str = "prod",
):
    ingest_task = ingest(data_uri=data_uri, max_timestamp=max_timestamp)
    ingest_task.set_display_name("ingest: validate raw transactions")
    configure_task(ingest_task, "ingest")

    features_task = engineer_features(
        valid_transactions=ingest_task.outputs["valid_transactions"], feature_tables_uri=feature_tables_uri
    )
    features_task.set_display_name("engineer_features: offline tables, feast apply, materialise")
    configure_task(features_task, "engineer-features")

    sets_task = build_training_set(
        valid_transactions=ingest_task.outputs["valid_transactions"],
        features_ready=features_task.outputs["Output"],
        feature_tables_uri=feature_tables_uri,
        train_start=train_start,
        train_days=train_days,
        delay_days=delay_days,
        test_days=test_days,
        n_validation_folds=n_validation_folds,
        legit_per_day=legit_per_day,
    )
    sets_task.set_display_name("build_training_set: point-in-time sets")
    configure_task(sets_task, "build-training-set")

    train_task = train(
        train_set=sets_task.outputs["train_set"],
        validation_folds=sets_task.outputs["validation_folds"],
        mlflow_tracking_uri=mlflow_tracking_uri,
        decline_precision=decline_precision,
        review_alerts_per_day=review_alerts_per_day,
        small_grid=small_grid,
    )
    train_task.set_display_name("train: prequential selection + XGBoost")
    configure_task(train_task, "train")

    evaluate_task = evaluate(
        model=train_task.outputs["model"],
        train_set=sets_task.outputs["train_set"],
        validation_folds=sets_task.outputs["validation_folds"],
        test_set=sets_task.outputs["test_set"],
        run_id=train_task.outputs["run_id"],
        mlflow_tracking_uri=mlflow_tracking_uri,
        compare_baselines=compare_baselines,
    )
    evaluate_task.set_display_name("evaluate: test window, champion comparison")
    configure_task(evaluate_task, "evaluate")

    gate_task = gate(
        test_average_precision=evaluate_task.outputs["test_average_precision"],
        champion_average_precision=evaluate_task.outputs["champion_average_precision"],
        prediction_cost_us=train_task.outputs["prediction_cost_us"],
        min_average_precision=min_average_precision,
        max_ap_drop_vs_champion=max_ap_drop_vs_champion,
        max_prediction_cost_us=max_prediction_cost_us,
        run_id=train_task.outputs["run_id"],
        mlflow_tracking_uri=mlflow_tracking_uri,
    )
    gate_task.set_display_name("gate: quality floor, champion, latency budget")
    configure_task(gate_task, "gate")

    with dsl.If(gate_task.outputs["Output"] == GATE_PASSED, name="gate-passed"):
        register_task = register(
            model=train_task.outputs["model"],
            evaluation=evaluate_task.outputs["evaluation"],
            run_id=train_task.outputs["run_id"],
            gate_decision=gate_task.outputs["decision"],
            mlflow_tracking_uri=mlflow_tracking_uri,
        )
        register_task.set_display_name("register: bundle + MLflow version (challenger)")
        configure_task(register_task, "register")

        deploy_task = deploy_model(
            model_name=MODEL_NAME,
            model_version=register_task.outputs["Output"],
            mlflow_tracking_uri=mlflow_tracking_uri,
            target=deploy_target,
            namespace=namespace,
            canary_traffic_percent=canary_traffic_percent,
            rollout_policy=rollout_policy,
            first_deploy=first_deploy,
            overlay=overlay,
            deployer_token_dir=DEPLOYER_TOKEN_DIR,
        )
        deploy_task.set_display_name("deploy: canary")
        configure_task(deploy_task, "deploy-model")

        analyse_task = analyse_canary(
            model_name=MODEL_NAME,
            model_version=register_task.outputs["Output"],
            mlflow_tracking_uri=mlflow_tracking_uri,
            target=deploy_target,
            namespace=namespace,
            prometheus_url=prometheus_url,
            window_seconds=canary_window_seconds,
            rollout=deploy_task.outputs["rollout"],
            rollout_policy=rollout_policy,
            overlay=overlay,
            deployer_token_dir=DEPLOYER_TOKEN_DIR,
        )
        analyse_task.set_display_name("analyse_canary: promote or roll back")
        configure_task(analyse_task, "analyse-canary")


def compile_pipeline(package_path: str) -> str:
    """Compile to KFP IR YAML at `package_path`."""
    compiler.Compiler().compile(pipeline_func=training_pipeline, package_path=package_path)
    return package_path
