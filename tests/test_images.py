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
    (command,) = [json.loads(rest) for k, rest in final.instructions if k in ("CMD", "ENTRYPOINT")]
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
    # the runtime's writable places stay below /tmp (HOME is the JVM's user.home; hsperfdata in TMPDIR)
    env = _env(runtime)
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp" and env["FRAUD_DATA_DIR"].startswith("/tmp/")


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
