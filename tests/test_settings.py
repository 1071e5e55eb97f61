"""fraud.settings: one typed settings object, one name per setting, documented in the README,
read once at the entry points, never written to the environment."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fraud.config import PROJECT_ROOT, DataLayout
from fraud.errors import UserError
from fraud.settings import Settings, SettingsError, activated, current, documentation_rows, documentation_table

FRAUD = str(Path(sys.executable).with_name("fraud"))
PRODUCT_DIRS = ("fraud", "predictor", "components", "pipelines", "drift_transformer/drift_transformer")

#: Reads of the process environment outside the settings modules, each with why it is not a setting.
ENVIRONMENT_READS = {
    # child processes get this process's environment (plus their settings): building it is no read of a setting
    "fraud/serving_stack.py": "child environments of the stack",
    "fraud/deploy/local.py": "child environment of the local canary processes",
    "fraud/commands/serving.py": "environment of the detached supervisor",
    "fraud/commands/pipeline.py": "environment of the pipeline's tasks",
    "fraud/monitoring/retrain.py": "environment of the retraining command",
    "pipelines/local_run.py": "PATH and locale of an isolated task",
    # Kubernetes's service-discovery variables of the pod
    "components/base.py": "KUBERNETES_SERVICE_HOST / _PORT",
    # whether spark-submit launched this process (its gateway variable), not a setting
    "fraud/features/spark_job.py": "PYSPARK_GATEWAY_PORT",
    # where Java is installed, read the way Spark itself reads it; not a setting of the platform
    "fraud/features/spark_engine.py": "JAVA_HOME",
    # the settings themselves
    "fraud/settings.py": "the one reader",
    "drift_transformer/drift_transformer/settings.py": "the transformer's one reader",
}


def product_files() -> list[Path]:
    return sorted(p for folder in PRODUCT_DIRS for p in (PROJECT_ROOT / folder).rglob("*.py"))


def environment_uses(path: Path) -> tuple[list[int], list[int]]:
    """(lines that write the environment, lines that read it) in `path`."""
    tree = ast.parse(path.read_text())
    writes: list[int] = []
    reads = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in ("environ", "getenv")
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    ]
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
                    writes.append(node.lineno)
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            if called in ("os.putenv", "os.unsetenv") or re.fullmatch(
                r"os\.environ\.(setdefault|update|pop|popitem|clear|__setitem__|__delitem__)", called
            ):
                writes.append(node.lineno)
    return writes, reads


def test_no_product_code_writes_the_environment():
    writers = {
        str(path.relative_to(PROJECT_ROOT)): lines for path in product_files() if (lines := environment_uses(path)[0])
    }
    assert writers == {}


def test_the_checker_sees_environment_writes(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '2')\ndel os.environ['A']\nos.putenv('C', '3')\n"
    )
    assert sorted(environment_uses(sample)[0]) == [2, 3, 4, 5]


def test_only_the_settings_modules_read_the_environment():
    readers = {
        str(path.relative_to(PROJECT_ROOT))
        for path in product_files()
        if environment_uses(path)[1] and str(path.relative_to(PROJECT_ROOT)) not in ENVIRONMENT_READS
    }
    assert readers == set()


def readme_table_rows() -> list[tuple[str, ...]]:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip() for cell in row.strip("|").split(" | ")) for row in rows]


def test_the_readme_table_lists_every_setting_and_nothing_else():
    documented = readme_table_rows()
    assert documented == documentation_rows()
    assert {row[0].strip("`") for row in documented} == set(Settings.model_fields)
    assert documentation_table() in (PROJECT_ROOT / "README.md").read_text()


def test_one_environment_variable_per_setting():
    names = list(Settings.env_names().values())
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"(FRAUD|MLFLOW)_[A-Z0-9_]+", name) for name in names)


def manifest_environment_names() -> set[str]:
    """FRAUD_* names the Kubernetes manifests set: container env entries and ConfigMap keys."""
    names: set[str] = set()
    for path in sorted((PROJECT_ROOT / "manifests").rglob("*.yaml")) + sorted(
        (PROJECT_ROOT / "kustomize").rglob("*.yaml")
    ):
        for document in yaml.safe_load_all(path.read_text()):
            if not isinstance(document, dict):
                continue
            if document.get("kind") == "ConfigMap":
                names |= {k for k in (document.get("data") or {}) if k.startswith("FRAUD_")}
            text = yaml.safe_dump(document)
            # variables only expanded into a container's arguments (`$(NAME)`) are no settings
            expanded = set(re.findall(r"\$\((FRAUD_[A-Z0-9_]+)\)", text))
            names |= set(re.findall(r"name: (FRAUD_[A-Z0-9_]+)", text)) - expanded
    return names


def test_every_setting_the_manifests_set_is_a_setting():
    known = set(Settings.env_names().values())
    unknown = manifest_environment_names() - known
    assert unknown == set(), f"manifests set {sorted(unknown)}, which no setting reads"


def test_values_are_typed_and_empty_means_unset(tmp_path):
    settings = Settings.from_env(
        {
            "FRAUD_DATA_DIR": str(tmp_path),
            "FRAUD_STREAM_PARTITIONS": "8",
            "FRAUD_REDIS_TLS": "true",
            "FRAUD_FEAST_ONLINE": "redis",
            "FRAUD_TRAIN_THREADS": "",
            "UNRELATED": "x",
        }
    )
    assert settings.data_dir == tmp_path and settings.stream_partitions == 8 and settings.redis_tls is True
    assert settings.feast_online == "redis" and settings.train_threads is None
    assert settings.layout == DataLayout(tmp_path.resolve())
    assert Settings.from_env(settings.env()) == settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FRAUD_STREAM_PARTITIONS", "many", "FRAUD_STREAM_PARTITIONS='many': Input should be a valid integer"),
        ("FRAUD_STREAM_PARTITIONS", "0", "FRAUD_STREAM_PARTITIONS='0': Input should be greater than or equal to 1"),
        ("FRAUD_FEAST_ONLINE", "memcached", "FRAUD_FEAST_ONLINE='memcached': Input should be 'sqlite' or 'redis'"),
        ("FRAUD_REDIS_PORT", "70000", "FRAUD_REDIS_PORT='70000': Input should be less than or equal to 65535"),
        ("FRAUD_AUDIT_SPOOL_SYNC", "OFF", "FRAUD_AUDIT_SPOOL_SYNC='OFF': Input should be 'NORMAL' or 'FULL'"),
        ("FRAUD_REDIS_TLS", "maybe", "FRAUD_REDIS_TLS='maybe': Input should be a valid boolean"),
    ],
)
def test_a_bad_value_names_its_variable(name, value, message):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, UserError)


def test_the_cli_reports_a_bad_setting_in_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "FRAUD_DATA_DIR": str(tmp_path), "FRAUD_STREAM_MAXLEN": "lots"}
    done = subprocess.run(
        [FRAUD, "score", "--sample", "1"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: FRAUD_STREAM_MAXLEN='lots': Input should be a valid integer, unable to parse string as an integer"
    ]
    assert "Traceback" not in done.stdout + done.stderr


def test_the_predictor_reports_a_bad_setting_in_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "FRAUD_MODEL_VARIANT": "beta"}
    done = subprocess.run(
        [sys.executable, "-m", "predictor", "--bundle", str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "python -m predictor: FRAUD_MODEL_VARIANT='beta': Input should be 'stable' or 'canary'"
    )


def test_activated_settings_are_what_the_library_sees(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "from-env"))
    assert DataLayout.current().root == (tmp_path / "from-env").resolve()
    with activated(current().with_data_dir(tmp_path / "passed")) as settings:
        assert DataLayout.current().root == (tmp_path / "passed").resolve() == settings.layout.root
        assert os.environ["FRAUD_DATA_DIR"] == str(tmp_path / "from-env")  # nothing written
    assert DataLayout.current().root == (tmp_path / "from-env").resolve()


def test_features_data_dir_option_is_passed_down_not_exported(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fraud.cli import app

    monkeypatch.setenv("FRAUD_DATA_DIR", str(tmp_path / "elsewhere"))
    result = CliRunner().invoke(app, ["features", "build", "--data-dir", str(tmp_path / "chosen")])
    assert result.exit_code != 0
    # the missing raw data of the chosen directory
    assert str(tmp_path / "chosen" / "raw") in str(result.exception)
    assert os.environ["FRAUD_DATA_DIR"] == str(tmp_path / "elsewhere")


def transformer_settings_class():
    path = PROJECT_ROOT / "drift_transformer" / "drift_transformer" / "settings.py"
    spec = importlib.util.spec_from_file_location("transformer_settings_under_test", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.TransformerSettings


def test_the_transformer_settings_share_names_and_defaults_with_the_core():
    transformer = transformer_settings_class()
    core = Settings.env_names()
    for name, env in transformer.env_names().items():
        assert core[name] == env, name
        assert transformer.model_fields[name].default == Settings.model_fields[name].default, name
    assert transformer.from_env({"FRAUD_BUNDLE": "/b"}).bundle == Path("/b")


def test_the_core_image_default_is_the_deploy_default():
    from fraud.deploy.kserve_rollout import DEFAULT_CORE_IMAGE

    assert Settings().core_image == DEFAULT_CORE_IMAGE


def test_embedded_pipeline_tasks_get_the_commands_settings(tmp_path, capfd):
    """`fraud pipeline run --local --data-dir D`: every task's environment carries D (built from the
    settings; this process's environment is not written)."""
    from pipelines.local_run import embedded_subprocess

    settings = current().with_data_dir(tmp_path / "chosen")
    run = embedded_subprocess({**os.environ, **settings.env()})
    code = "import os, sys; print('data', os.environ['FRAUD_DATA_DIR'], os.environ['EXTRA']); sys.exit(3)"
    assert run([sys.executable, "-c", code], {"EXTRA": "x"}) == 3
    assert f"data {tmp_path / 'chosen'} x" in capfd.readouterr().out
    assert os.environ.get("FRAUD_DATA_DIR") != str(tmp_path / "chosen")
