"""Static checks of the container images (no Docker engine here): every file a Dockerfile copies
exists and survives .dockerignore, the lock files they install from exist, the images are
multi-stage, pinned, non-root, health-checked and read-only-root compatible, and the modules
their CMD runs exist and start (`--help`)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from fraud.config import PROJECT_ROOT

DOCKERFILES = {
    "core": PROJECT_ROOT / "docker" / "core.Dockerfile",
    "drift": PROJECT_ROOT / "docker" / "drift-transformer.Dockerfile",
}
SECRETISH = re.compile(r"(?i)(password|passwd|secret|token|api_?key|credential)")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, rest in instructions(path):
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], ""), parts[0])
            found.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""))
        elif found:
            found[-1].instructions.append((keyword, rest))
    return args, found


def copies(stage: Stage) -> list[tuple[list[str], str, str]]:
    """(sources, destination, workdir) of the stage's COPY instructions from the build context."""
    result, workdir = [], "/"
    for keyword, rest in stage.instructions:
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY":
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            result.append((paths[:-1], paths[-1], workdir))
    return result


def dockerignore_patterns() -> list[str]:
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a path is excluded if it or one of its parents matches a pattern."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!")
        regex = fnmatch.translate(body).replace(".*.*/", "(.*/)?").replace(".*.*", ".*")
        if (
            any(re.match(regex, c) for c in candidates)
            or (body.startswith("**/") and any(fnmatch.fnmatch(p, body[3:]) for p in parts))
        ) and not negate:
            return True
    return False


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copied_files_exist_and_are_in_the_build_context(image):
    _, found = stages(DOCKERFILES[image])
    patterns = dockerignore_patterns()
    copied = 0
    for stage in found:
        for sources, _, _ in copies(stage):
            for source in sources:
                assert (PROJECT_ROOT / source).exists(), f"{image}: COPY source {source} does not exist"
                assert not ignored(source, patterns), f"{image}: COPY source {source} is excluded by .dockerignore"
                copied += 1
    assert copied >= 3


def test_dockerignore_matching_works():
    patterns = dockerignore_patterns()
    assert ignored("drift_transformer/.venv/lib/x.py", patterns)
    assert ignored("fraud/__pycache__/a.pyc", patterns)
    assert ignored("data/raw/x.parquet", patterns)
    assert not ignored("fraud/bundle.py", patterns)
    assert not ignored("uv.lock", patterns)


@pytest.mark.parametrize(("image", "lock"), [("core", "uv.lock"), ("drift", "drift_transformer/uv.lock")])
def test_images_install_from_the_lock_file_without_dev_dependencies(image, lock):
    _, found = stages(DOCKERFILES[image])
    runs = [rest for stage in found for keyword, rest in stage.instructions if keyword == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--frozen" in r and "--no-dev" in r for r in syncs), syncs
    assert not any("pip install" in r and "uv==" not in r for r in runs), "dependencies must come from the lock"
    sources = [s for stage in found for srcs, _, _ in copies(stage) for s in srcs]
    assert lock in sources and (PROJECT_ROOT / lock).is_file()


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_pinned_multistage_nonroot_and_healthchecked(image):
    args, found = stages(DOCKERFILES[image])
    assert len(found) >= 2, "multi-stage build expected"
    for stage in found:
        assert re.fullmatch(
            r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?|python@sha256:[0-9a-f]{64}", stage.base
        ), stage.base
    final = found[-1]
    keywords = [k for k, _ in final.instructions]
    assert "HEALTHCHECK" in keywords
    users = [rest for k, rest in final.instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = " ".join(rest for k, rest in final.instructions if k == "ENV")
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env
    for keyword, rest in (item for stage in found for item in stage.instructions):
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not SECRETISH.search(rest), f"{image}: {keyword} {rest} looks like a credential"
    assert not any(SECRETISH.search(name) for name in args)


def _module_file(image: str) -> tuple[str, Path]:
    """The module the image's CMD runs and the repository file `python -m` would execute."""
    _, found = stages(DOCKERFILES[image])
    final = found[-1]
    (command,) = [json.loads(rest) for k, rest in final.instructions if k == "CMD"]
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    image_path = PurePosixPath("/app") / module.replace(".", "/") / "__main__.py"
    for stage in found:
        for sources, dest, workdir in copies(stage):
            target = PurePosixPath(workdir) / dest
            for source in sources:
                local = PROJECT_ROOT / source
                if local.is_dir():
                    try:
                        return module, local / image_path.relative_to(target)
                    except ValueError:
                        continue
                into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
                if (target / local.name if into_dir else target) == image_path:
                    return module, local
    raise AssertionError(f"{image}: no COPY puts {image_path} into the image")


@pytest.mark.parametrize(
    ("image", "python", "cwd"),
    [
        ("core", Path(sys.executable), PROJECT_ROOT),
        ("drift", PROJECT_ROOT / "drift_transformer" / ".venv" / "bin" / "python", PROJECT_ROOT / "drift_transformer"),
    ],
)
def test_entry_module_exists_and_starts(image, python, cwd):
    module, path = _module_file(image)
    if not path.is_file():
        pytest.skip(f"{path.relative_to(PROJECT_ROOT)} is not written yet (entry point of the {image} image)")
    assert python.exists(), f"{python} missing: run `make setup`"
    env = {**os.environ, "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [str(python), "-m", module, "--help"], cwd=cwd, capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--bundle" in result.stdout and "--model_name" in result.stdout


# --- Java for Spark in the core image --------------------------------------------------------------


def _env(stage: Stage) -> dict[str, str]:
    """The stage's ENV key=value pairs (the last one of a key wins)."""
    env: dict[str, str] = {}
    for keyword, rest in stage.instructions:
        if keyword == "ENV":
            for word in shlex.split(rest):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {rest!r}: use key=value"
                env[key] = value
    return env


def _java_install(stage: Stage) -> tuple[int, str]:
    """(index, command) of the stage's RUN that installs Debian's default Java runtime."""
    found = [
        (i, rest)
        for i, (keyword, rest) in enumerate(stage.instructions)
        if keyword == "RUN" and re.search(r"apt-get\s.*install\s.*\bdefault-jre-headless\b", rest)
    ]
    assert len(found) == 1, f"expected one RUN installing default-jre-headless, found {found}"
    return found[0]


def test_the_core_image_runtime_carries_a_java_runtime_for_spark():
    """Spark (the feature engine, the Feast Spark profile, the SparkApplication's pods) needs a JVM
    in the core image's runtime stage: Debian's default-jre-headless (OpenJDK 17 on bookworm),
    installed as root without recommends in one layer that drops the apt lists, with JAVA_HOME on
    Debian's architecture-independent link, checked at build time."""
    _, found = stages(DOCKERFILES["core"])
    build_stage, runtime = found[0], found[-1]
    index, command = _java_install(runtime)
    steps = [step.strip() for step in command.split("&&")]
    install = next(step for step in steps if "default-jre-headless" in step)
    assert "--no-install-recommends" in install and re.search(r"(^|\s)-y(\s|$)", install), install
    update = next(i for i, step in enumerate(steps) if re.search(r"apt-get\s+update", step))
    assert update < steps.index(install), "apt-get update must run in the same layer, before the install"
    assert any(re.fullmatch(r"rm -rf /var/lib/apt/lists/\*?", step) for step in steps[steps.index(install) :]), (
        "the same layer must remove /var/lib/apt/lists"
    )
    users = [i for i, (keyword, _) in enumerate(runtime.instructions) if keyword == "USER"]
    assert users and index < users[0], "the JRE is installed before the image drops root"
    # JAVA_HOME: set for the runtime (ENV, not a shell variable), architecture-independent, and
    # proven at build time by running its bin/java
    java_home = _env(runtime).get("JAVA_HOME", "")
    assert java_home == "/usr/lib/jvm/default-java", java_home
    env_index = next(i for i, (k, rest) in enumerate(runtime.instructions) if k == "ENV" and "JAVA_HOME=" in rest)
    assert env_index < index and any(
        step.startswith(('"$JAVA_HOME/bin/java"', "$JAVA_HOME/bin/java", f"{java_home}/bin/java"))
        and "-version" in step
        for step in steps
    ), steps
    assert not re.search(r"amd64|arm64|aarch64|x86_64", java_home)
    # the build stage stays without Java (nothing there runs Spark)
    assert not any(keyword == "RUN" and "jre" in rest for keyword, rest in build_stage.instructions)
    # the runtime's writable places stay below /tmp: HOME, TMPDIR, the data dir, and the JVM's
    # user.home (Spark's ivy cache), which Java reads from the passwd entry of the image's user
    env = _env(runtime)
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp" and env["FRAUD_DATA_DIR"].startswith("/tmp/")
    uid = [rest for keyword, rest in runtime.instructions if keyword == "USER"][-1].split(":")[0]
    (useradd,) = [rest for keyword, rest in runtime.instructions if keyword == "RUN" and "useradd" in rest]
    words = shlex.split(useradd.split("useradd", 1)[1])
    assert words[words.index("--uid") + 1] == uid and words[words.index("--home-dir") + 1] == "/tmp", useradd


def test_java_install_check_fails_without_the_jre_or_java_home(tmp_path):
    """The check above fails on a runtime stage without the install or with a JAVA_HOME that
    names one architecture's directory (the check can fail)."""
    text = DOCKERFILES["core"].read_text()
    without = tmp_path / "without.Dockerfile"
    without.write_text(text.replace("default-jre-headless", "curl"))
    with pytest.raises(AssertionError, match="default-jre-headless"):
        _java_install(stages(without)[1][-1])
    arch = tmp_path / "arch.Dockerfile"
    arch.write_text(text.replace("/usr/lib/jvm/default-java", "/usr/lib/jvm/java-17-openjdk-amd64"))
    assert _env(stages(arch)[1][-1])["JAVA_HOME"].endswith("amd64")


def _spark_pod_specs() -> list[tuple[str, dict]]:
    """(where, spec) of every SparkApplication in manifests/, the schedule's template included."""
    import yaml

    found = []
    for path in sorted((PROJECT_ROOT / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or not str(doc.get("apiVersion", "")).startswith("sparkoperator.k8s.io/"):
                continue
            where = f"{path.relative_to(PROJECT_ROOT)}: {doc['kind']} {doc['metadata']['name']}"
            spec = doc["spec"]["template"] if doc["kind"] == "ScheduledSparkApplication" else doc["spec"]
            found.append((where, spec))
    return found


def test_the_spark_pods_run_the_core_image_as_its_user_with_tmp_writable():
    """The SparkApplication template, the daily ScheduledSparkApplication and the builder's object
    run the image docker/core.Dockerfile builds (the one with the JRE), as its non-root user, with
    an emptyDir on /tmp (HOME, TMPDIR) and a spark-local-dir volume for Spark's scratch space."""
    from fraud.deploy import spark
    from fraud.deploy.kserve_rollout import DEFAULT_CORE_IMAGE

    core_repository = DEFAULT_CORE_IMAGE.rsplit(":", 1)[0]
    header = DOCKERFILES["core"].read_text().split("\nARG", 1)[0]
    assert f"-t {core_repository}:" in header, "docker/core.Dockerfile's build line must name the core image"
    _, found = stages(DOCKERFILES["core"])
    image_user = [rest for keyword, rest in found[-1].instructions if keyword == "USER"][-1]
    uid = int(image_user.split(":")[0])
    built = spark.spark_application(spark.SparkFeatureJob(name="x", namespace="y", image=DEFAULT_CORE_IMAGE))
    specs = [*_spark_pod_specs(), ("fraud.deploy.spark.spark_application", built["spec"])]
    assert len(specs) >= 3, specs
    for where, spec in specs:
        assert spec["image"].rsplit(":", 1)[0] == core_repository, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for role in ("driver", "executor"):
            pod = spec[role]
            assert pod["securityContext"]["runAsUser"] == uid, (where, role)
            assert pod["securityContext"]["readOnlyRootFilesystem"] is True, (where, role)
            mounts = {m["mountPath"]: m["name"] for m in pod["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], (where, role)
            assert any(name.startswith("spark-local-dir-") and "emptyDir" in volumes[name] for name in mounts.values())
            env = {e["name"] for e in pod.get("env", [])}
            assert not env & {"JAVA_HOME", "HOME"}, f"{where} {role} overrides the image's JAVA_HOME/HOME"


# --- the core image's entrypoint: Spark on Kubernetes' `driver` / `executor`, else pass-through -----

ENTRYPOINT_SCRIPT = PROJECT_ROOT / "docker" / "core-entrypoint.sh"
LOCAL_SPARK_HOME = Path(sys.executable).parent.parent / "lib" / "python3.11" / "site-packages" / "pyspark"


def _entrypoint_env(**extra: str) -> dict[str, str]:
    from fraud.features.spark_engine import java_executable

    java = Path(java_executable()).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_", "PYSPARK_"))}
    return {
        **env,
        "SPARK_HOME": str(LOCAL_SPARK_HOME),
        "JAVA_HOME": str(java.parent.parent),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        **extra,
    }


def test_the_core_image_starts_through_the_entrypoint_and_spark_home_is_the_locked_pyspark():
    """ENTRYPOINT is docker/core-entrypoint.sh (copied executable), the predictor stays the CMD,
    SPARK_HOME is the pyspark of the image's environment for the base image's Python (where the
    local environment, installed from the same lock, has spark-submit and the jars); the drift
    image has no entrypoint of its own."""
    _, found = stages(DOCKERFILES["core"])
    runtime = found[-1]
    (entrypoint,) = [json.loads(rest) for k, rest in runtime.instructions if k == "ENTRYPOINT"]
    copied = {dest: sources for sources, dest, _ in copies(runtime)}
    assert entrypoint == ["/usr/local/bin/fraud-entrypoint"], entrypoint
    assert copied[entrypoint[0]] == ["docker/core-entrypoint.sh"]
    (copy_line,) = [rest for k, rest in runtime.instructions if k == "COPY" and entrypoint[0] in rest]
    assert "--chmod=0755" in copy_line.split()
    assert os.access(ENTRYPOINT_SCRIPT, os.X_OK), "docker/core-entrypoint.sh must be executable in git too"
    python = re.match(r"python:(\d+\.\d+)\.", runtime.base)
    assert python, runtime.base
    spark_home = _env(runtime)["SPARK_HOME"]
    assert spark_home == f"/app/.venv/lib/python{python[1]}/site-packages/pyspark", spark_home
    assert python[1] == "3.11" and (LOCAL_SPARK_HOME / "bin" / "spark-submit").is_file()
    assert any((LOCAL_SPARK_HOME / "jars").glob("spark-kubernetes_*.jar")), "pyspark without its Kubernetes jars"
    assert not [rest for k, rest in stages(DOCKERFILES["drift"])[1][-1].instructions if k == "ENTRYPOINT"]


def test_the_entrypoint_runs_any_other_command_unchanged(tmp_path):
    env = _entrypoint_env()
    code = "import sys; print(sys.argv[1:]); sys.exit(3)"
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [str(ENTRYPOINT_SCRIPT), "python", "-c", code, "two words", "--flag"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "['two words', '--flag']\n"


def test_the_entrypoint_runs_a_spark_on_kubernetes_driver_with_spark_submit_in_client_mode(tmp_path):
    """`driver --properties-file F --class PythonRunner local:///job.py args`, as the driver pod is
    started: spark-submit of SPARK_HOME runs the job in client mode bound to SPARK_DRIVER_BIND_ADDRESS
    (a real JVM; the master comes from the properties file, local here)."""
    job = tmp_path / "job.py"
    job.write_text(
        "import sys\n"
        "from pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.getOrCreate()\n"
        "conf = spark.sparkContext.getConf()\n"
        "values = [spark.range(10).count(), conf.get('spark.submit.deployMode'),\n"
        "          conf.get('spark.driver.bindAddress')]\n"
        "open(sys.argv[1], 'w').write(' '.join(map(str, values)))\n"
        "spark.stop()\n"
    )
    properties = tmp_path / "spark.properties"
    properties.write_text(
        # as in the driver pod's properties file: written for the cluster-mode submission
        "spark.master=local[1]\nspark.submit.deployMode=cluster\nspark.app.name=entrypoint-test\n"
        "spark.ui.enabled=false\n"
        f"spark.local.dir={tmp_path / 'local'}\nspark.driver.host=127.0.0.1\n"
    )
    out = tmp_path / "out.txt"
    env = _entrypoint_env(SPARK_DRIVER_BIND_ADDRESS="127.0.0.1", TMPDIR=str(tmp_path))
    args = ["driver", "--properties-file", str(properties), "--class", "org.apache.spark.deploy.PythonRunner"]
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [str(ENTRYPOINT_SCRIPT), *args, f"local://{job}", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text() == "10 client 127.0.0.1"


def _executor_env(**extra: str) -> dict[str, str]:
    return _entrypoint_env(
        SPARK_EXECUTOR_MEMORY="256m",
        SPARK_EXECUTOR_ID="7",
        SPARK_EXECUTOR_CORES="2",
        SPARK_APPLICATION_ID="spark-app-1",
        SPARK_EXECUTOR_POD_IP="127.0.0.1",
        SPARK_RESOURCE_PROFILE_ID="0",
        SPARK_EXECUTOR_POD_NAME="fraud-features-exec-7",
        **extra,
    )


def test_the_entrypoint_starts_the_kubernetes_executor_backend_with_spark_s_environment(tmp_path):
    """`executor`: the JVM options SPARK_JAVA_OPT_<n> in numeric order, the heap, the classpath of
    SPARK_HOME's jars and the KubernetesExecutorBackend arguments from the pod's environment (a
    stand-in `java` records them)."""
    fake_home = tmp_path / "jre"
    (fake_home / "bin").mkdir(parents=True)
    record = tmp_path / "argv.json"
    java = fake_home / "bin" / "java"
    java.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    java.chmod(0o755)
    env = _executor_env(
        JAVA_HOME=str(fake_home),
        SPARK_DRIVER_URL="spark://CoarseGrainedScheduler@fraud-driver-svc:7078",
        SPARK_JAVA_OPT_10="-Dthird=3",
        SPARK_JAVA_OPT_2="-Dsecond=two words",
        SPARK_JAVA_OPT_0="-Dfirst=1",
        SPARK_CONF_DIR="/opt/spark/conf",
    )
    done = subprocess.run([str(ENTRYPOINT_SCRIPT), "executor"], capture_output=True, text=True, timeout=60, env=env)  # noqa: PLW1510
    assert done.returncode == 0, done.stderr
    argv = json.loads(record.read_text())
    assert argv[:5] == ["-Dfirst=1", "-Dsecond=two words", "-Dthird=3", "-Xms256m", "-Xmx256m"]
    classpath = argv[argv.index("-cp") + 1].split(":")
    assert classpath[0] == "/opt/spark/conf" and f"{LOCAL_SPARK_HOME}/jars/*" in classpath
    main = argv.index("org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend")
    options = dict(zip(argv[main + 1 :: 2], argv[main + 2 :: 2], strict=True))
    assert options == {
        "--driver-url": "spark://CoarseGrainedScheduler@fraud-driver-svc:7078",
        "--executor-id": "7",
        "--cores": "2",
        "--app-id": "spark-app-1",
        "--hostname": "127.0.0.1",
        "--resourceProfileId": "0",
        "--podName": "fraud-features-exec-7",
    }


def test_the_executor_backend_loads_from_spark_home_and_dials_the_driver(tmp_path):
    """With the real JVM the backend class loads from SPARK_HOME's jars and connects to the driver
    URL it was given (nothing listens there: it fails on that address)."""
    from fraud.net import free_port

    port = free_port()
    env = _executor_env(SPARK_DRIVER_URL=f"spark://CoarseGrainedScheduler@127.0.0.1:{port}", TMPDIR=str(tmp_path))
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted below
        [str(ENTRYPOINT_SCRIPT), "executor"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "KubernetesExecutorBackend" in output and f"127.0.0.1:{port}" in output, output[-3000:]
    assert "ClassNotFoundException" not in output
