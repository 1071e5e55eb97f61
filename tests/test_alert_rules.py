"""The PrometheusRule's alerts, checked and unit-tested by the real `promtool` (Debian package
`prometheus`, installed by `make services`): the rule groups are written to a plain rule file,
`promtool check rules` validates them, and `promtool test rules` runs tests/promtool/*.yaml -
input series and the exact alerts (labels and rendered annotations) expected from them, at least
one firing case per alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fraud.config import PROJECT_ROOT
from tests.conftest import require

RULES = PROJECT_ROOT / "manifests" / "prometheusrule.yaml"
UNIT_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))
PROMTOOL = shutil.which("promtool")


def rule_groups(rules: Path = RULES) -> list[dict]:
    document = yaml.safe_load(rules.read_text())
    assert document["kind"] == "PrometheusRule"
    return document["spec"]["groups"]


def alert_names() -> set[str]:
    return {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def write_rules(folder: Path, groups: list[dict]) -> Path:
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    require(PROMTOOL, "promtool (Debian package prometheus; `make services` installs it)")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def run_unit_tests(folder: Path, groups: list[dict], files: list[Path]) -> subprocess.CompletedProcess:
    """`promtool test rules` on copies of `files` next to `groups` written as rules.yaml."""
    write_rules(folder, groups)
    for path in files:
        shutil.copy(path, folder / path.name)
    return promtool("test", "rules", *(path.name for path in files), cwd=folder)


def test_promtool_checks_the_rules(tmp_path):
    result = promtool("check", "rules", str(write_rules(tmp_path, rule_groups())), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(group["rules"]) for group in rule_groups())
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(tmp_path):
    groups = rule_groups()
    groups[1]["rules"][2]["expr"] = "fraud:predictor_error_ratio:rate5m > > 0.01"
    result = promtool("check", "rules", str(write_rules(tmp_path, groups)), cwd=tmp_path)
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=[path.stem for path in UNIT_TESTS])
def test_alert_unit_tests_pass(tmp_path, unit_test):
    result = run_unit_tests(tmp_path, rule_groups(), [unit_test])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_unit_test():
    fired, referenced = set(), set()
    for path in UNIT_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == ["rules.yaml"], path.name
        for case in document["tests"]:
            for check in case.get("alert_rule_test", []):
                referenced.add(check["alertname"])
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert len(alert_names()) >= 18
    assert referenced - alert_names() == set(), "unit tests name alerts the rules do not define"
    assert alert_names() - fired == set(), "alerts without a unit test that makes them fire"


@pytest.mark.parametrize(
    ("rule_name", "field", "old", "new", "alert"),
    [
        ("FraudPredictorLatencySLOBurnFast", "expr", "(14.4 * 0.01)", "(24 * 0.01)", None),
        ("fraud:predictor_error_ratio:rate5m", "expr", 'outcome=~"error|unavailable"',
         'outcome=~"error|unavailable|invalid_input"', "FraudPredictorHighErrorRate"),
        ("FraudAuditBacklogGrowing", "expr", "max by (namespace, pod)", "sum by (namespace, pod)", None),
        ("FraudLiveQualityStale", "for", "6h", "2d", None),
        ("FraudDeclineRateAnomaly", "expr", "[1h])) > 0.1", "[1h])) > 0.01", None),
        ("FraudFeaturesMissing", "expr", "> 0.05", "> 0.1", None),
        ("FraudFeatureSnapshotStale", "expr", "min by (namespace, view)", "max by (namespace, view)", None),
    ],
)  # fmt: skip
def test_unit_tests_catch_a_changed_rule(tmp_path, rule_name, field, old, new, alert):
    """The unit tests are tight enough to notice a changed threshold, matcher, aggregation or `for`."""
    alert = alert or rule_name
    groups = rule_groups()
    (rule,) = [
        rule for group in groups for rule in group["rules"] if rule_name in (rule.get("alert"), rule.get("record"))
    ]
    assert old in rule[field]
    rule[field] = rule[field].replace(old, new)
    tests_of_alert = [path for path in UNIT_TESTS if f"alertname: {alert}" in path.read_text()]
    result = run_unit_tests(tmp_path, groups, tests_of_alert)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr
