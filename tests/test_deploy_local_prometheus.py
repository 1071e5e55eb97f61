"""The local canary (`fraud deploy --target local`) decided from a real Prometheus on loopback
(Debian package `prometheus`): it discovers the served predictors through the stack's
`prometheus-targets.json` (file_sd), scrapes their /metrics every second, and the analysis reads
it over its HTTP API (`PrometheusSource`, the same queries as on the cluster). A healthy first
version is promoted; a canary whose thresholds decline everything is rolled back on its decision
shares, before its window ends.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fraud.config import MODEL_NAME
from fraud.deploy.local import LocalStack, local_dir
from fraud.deploy.state import RolloutState
from tests.support.prometheus import LocalPrometheus
from tests.test_deploy_local import Traffic
from tests.test_deploy_local_scenarios import _analyse, _deploy, mlflow_registry  # noqa: F401 - fixture by name

pytestmark = pytest.mark.slow  # two predictor start-ups and Prometheus: minutes on a busy 2-core machine


def _queries_answered(prometheus: LocalPrometheus) -> float:
    """Instant queries Prometheus answered so far (its own /metrics)."""
    text = prometheus._client.get(f"{prometheus.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "prometheus_http_requests_total" and sample.labels.get("handler") == "/api/v1/query"
    )


def test_the_local_canary_promotes_and_rolls_back_from_a_real_prometheus(data_dir, mlflow_registry, tmp_path):  # noqa: F811 - fixture by name
    reg, variants = mlflow_registry
    reg.reset(champion=reg.versions[0])
    v1 = reg.versions[0]
    stack = LocalStack(local_dir(), MODEL_NAME)
    stack.root.mkdir(parents=True, exist_ok=True)
    prometheus = LocalPrometheus(
        tmp_path / "prometheus", {}, {"namespace": "local"}, file_sd={"predictors": stack.prometheus_targets_file}
    )
    with prometheus:
        try:
            first = _deploy(reg, v1, first_deploy=True)
            assert first.state is RolloutState.DEPLOYED
            router = stack.load().router_url
            prometheus.wait_for('up{job="predictors",variant="stable"} == 1')  # a first version serves as stable
            with Traffic(router) as traffic:
                asked = _queries_answered(prometheus)
                promoted = _analyse(reg, v1, 15, prometheus.url)
            assert promoted.state is RolloutState.PROMOTED, promoted.reason
            assert _queries_answered(prometheus) > asked  # the decision came from Prometheus
            assert set(traffic.statuses) == {200}

            declining = variants["decline-everything"]
            assert _deploy(reg, declining).state is RolloutState.DEPLOYED
            prometheus.wait_for(
                f'up{{job="predictors",variant="canary",instance="{stack.load().canary.url[7:]}"}} == 1'
            )
            with Traffic(router):
                final = _analyse(reg, declining, 120, prometheus.url)
            assert final.state is RolloutState.ROLLED_BACK
            assert final.step_results[-1]["early"] is True
            assert "decision_share.decline" in final.reason, final.reason
            assert final.analysis["aborted_after_seconds"] < 120
            assert reg.decisions(declining)["canary"] == "rolled_back" and reg.champion() == v1
            assert stack.load().canary is None
        finally:
            stack.stop_all()
